"""What several methods share: registries, datasets, model files, seeding, statistics."""
