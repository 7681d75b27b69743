"""Data: Parquet row ranges per rank/worker (reader) turned into model batches (batch)."""
