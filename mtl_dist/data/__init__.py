"""Data: Parquet sources (source), their hive partitions (partitions) and row filters
(row_filter); the global row index cut per rank × worker (row_index), streamed and resumed
exactly (reader), with the filters' start-up checks (selection); model batches with their KJT
(batch), id hashing (ids), the synthetic generator with known true probabilities (synth:
synth_workloads, synth_model, synth_stats, synth_write, synth_ctcvr) and the public benchmarks'
preparers (public: ``mtl-prepare``).

May import: config, files, distributed.
"""
