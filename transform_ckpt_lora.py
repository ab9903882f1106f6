#!/usr/bin/env python
"""MindFormers' `tools/transform_ckpt_lora.py` command line, run by this converter (see modellink_ckpt/cli/mindformers.py)."""

from modellink_ckpt.cli.entry import mindformers_transform_ckpt_lora

if __name__ == "__main__":
    mindformers_transform_ckpt_lora()
