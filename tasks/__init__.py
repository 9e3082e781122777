"""squeezelab's science: one pure-PyTorch/numpy module per published method (no ray, no mlflow)."""
