"""The built-in example: tiny random models with a trained tokenizer, and the demo run."""
