#!/usr/bin/env python
"""Entry point with the name and flags MindSpeed-LLM scripts call: `python convert_ckpt.py ...`."""

from modellink_ckpt.cli.entry import convert_ckpt

if __name__ == "__main__":
    convert_ckpt()
