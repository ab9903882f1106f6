#!/usr/bin/env python
"""Entry point with the name and flags MindSpeed-LLM scripts call: `python convert_ckpt.py ...`."""

import sys

from modellink_ckpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
