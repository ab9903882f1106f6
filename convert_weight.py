#!/usr/bin/env python
"""MindFormers' `convert_weight.py` command line, run by this converter (see modellink_ckpt/mindformers_cli.py)."""

import sys

from modellink_ckpt.mindformers_cli import convert_weight_main

if __name__ == "__main__":
    sys.exit(convert_weight_main())
