"""Training: the typed config, the IMLE training loop (pool search, then steps on the pool; `trainer`),
what can go wrong in it (`faults`), what it logs (`runlog`), its checkpoints, and torchrun/DDP."""
