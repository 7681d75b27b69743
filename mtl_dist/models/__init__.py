"""Model pieces: single-process modules, no torch.distributed (sharding is applied from outside)."""
