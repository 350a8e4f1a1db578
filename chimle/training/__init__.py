"""Training: the typed config, the IMLE training loop (pool search, then steps on the pool), its
checkpoints, and torchrun/DDP."""
