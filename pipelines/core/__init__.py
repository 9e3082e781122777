"""One way to do each cross-cutting thing: config, tracking, Ray start-up, model artifacts."""
