"""Data tools: synthetic data from a hidden teacher (``synth``) and Criteo TSV to Parquet (``preprocess``)."""
