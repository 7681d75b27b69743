"""Model pieces: embedding lookups, interaction, stacked experts, gates, heads, towers, the
ranker. Single-process: no ``torch.distributed``; sharding and the trainer's update gate are
applied from outside.

May import: config, files, data (the Batch it reads).
"""
