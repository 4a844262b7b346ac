"""Data: the Parquet data set format, synthetic data, Criteo preprocessing, the per-rank loader."""
