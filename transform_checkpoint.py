#!/usr/bin/env python
"""MindFormers' `transform_checkpoint.py` command line, run by this converter (see modellink_ckpt/cli/mindformers.py)."""

from modellink_ckpt.cli.entry import mindformers_transform_checkpoint

if __name__ == "__main__":
    mindformers_transform_checkpoint()
