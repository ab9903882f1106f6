#!/usr/bin/env python
"""MindFormers' `convert_weight.py` command line, run by this converter (see modellink_ckpt/cli/mindformers.py)."""

from modellink_ckpt.cli.entry import mindformers_convert_weight

if __name__ == "__main__":
    mindformers_convert_weight()
