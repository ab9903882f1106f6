"""Megatron-LM / MindSpeed-LLM on-disk conventions: tensor names and spellings, the stored args,
the distributed-optimizer layout."""
