#!/usr/bin/env python
"""MindFormers' `transform_checkpoint.py` command line, run by this converter (see modellink_ckpt/mindformers_cli.py)."""

import sys

from modellink_ckpt.mindformers_cli import transform_checkpoint_main

if __name__ == "__main__":
    sys.exit(transform_checkpoint_main())
