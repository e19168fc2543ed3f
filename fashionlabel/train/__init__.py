"""Training: losses, metrics, the Ray Train loop, checkpoints and the exported model artifact."""
