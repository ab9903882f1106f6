"""Checkpoint conversion between Hugging Face and Megatron-Core layouts."""

__version__ = "0.1.0"
