"""Training: the trainer, objectives, optimiser, data, workdir, FLOPs, AOT fit checks."""
