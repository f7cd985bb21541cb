"""Training utilities: optimizers, learning-rate schedulers, mixed precision."""
