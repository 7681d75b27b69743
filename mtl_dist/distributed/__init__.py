"""Distributed setup (process group, devices) and TorchRec sharding; the only torch.distributed users."""
