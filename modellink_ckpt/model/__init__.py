"""What every model is made of, as data and pure functions: families (model_cfg.json), the
tensor rules between Hugging Face and Megatron names, the transforms, the parallel layout, LoRA math."""
