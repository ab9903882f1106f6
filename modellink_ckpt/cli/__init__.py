"""The command lines: MindSpeed-LLM's convert_ckpt.py and MindFormers' drop-ins."""
