#!/usr/bin/env python
"""Entry point with the name and flags MindSpeed-LLM scripts call: `python convert_ckpt.py ...`."""

from modellink_ckpt.cli import exit_fast, main

if __name__ == "__main__":
    exit_fast(main())
