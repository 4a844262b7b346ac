"""distrec: synchronous multi-GPU training of DLRM-style recommendation models."""
__version__ = "0.1.0"
