"""Byte-level file formats: how tensors sit in a file, read and written without the frameworks
that made them (torch zip, safetensors, the restricted unpickler, MindSpore ckpt and strategy
files). Nothing here knows model families or layouts."""
