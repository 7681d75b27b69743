"""Data: Parquet sources, partitions and row filters (source), row ranges per rank × worker
streamed and resumed exactly (reader), model batches with their KJT (batch), id hashing (ids)
and the synthetic generator with known true probabilities (synth).

May import: config, files, distributed.
"""
