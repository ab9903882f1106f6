"""MindSpore / MindFormers on-disk conventions: tensor namings, LoRA adapters, re-sharding by strategy."""
