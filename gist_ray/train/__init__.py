"""The per-worker training loop (plain torch.distributed, no Ray) and what it uses: checkpoints,
optimiser, gradient caching, the step log, evaluation during training."""
