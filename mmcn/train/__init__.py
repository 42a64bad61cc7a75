"""Training: the Ray Train loop (driver and per-worker loop), checkpoints, model export."""
