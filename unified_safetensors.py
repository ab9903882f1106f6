#!/usr/bin/env python
"""MindFormers' `toolkit/safetensors/unified_safetensors.py` command line, run by this converter (see modellink_ckpt/cli/mindformers.py)."""

from modellink_ckpt.cli.entry import mindformers_unified_safetensors

if __name__ == "__main__":
    mindformers_unified_safetensors()
