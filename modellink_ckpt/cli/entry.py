"""The command lines' entry points (`convert_ckpt.py`, `convert_weight.py`,
`transform_checkpoint.py`, `python -m modellink_ckpt` and the installed scripts).

Light to import on purpose: the command's own module imports torch, which takes the first one to
three seconds of every run, and a Ctrl-C in that time, when a user spots a wrong flag, must end
like one later on, with one line and exit code 130, not a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import signal
import sys

from modellink_ckpt.errors import Interrupted, missing_package


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C that lands while torch (with numpy) imports until the import is done, then
    raise it: inside those imports a KeyboardInterrupt is swallowed in places (leaving a half
    imported numpy that every forked loader and saver inherits) or turns into a C++ abort."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def load_torch() -> None:
    """Import torch, the first seconds of every command that converts or reads a checkpoint."""
    with interrupts_deferred():
        import torch  # noqa: F401


def _run(target: str) -> int:
    """Import `module:function` and call it; its exit code."""
    module, _, function = target.partition(":")
    try:
        with interrupts_deferred():  # a command module may import torch as it loads
            main = getattr(importlib.import_module(module), function)
    except KeyboardInterrupt:
        print(f"error: {Interrupted.message}", file=sys.stderr)
        return Interrupted.exit_code
    except ModuleNotFoundError as exc:  # run with a Python that lacks the converter's packages
        if missing_package(exc) is None:
            raise
        print(f"error: {missing_package(exc)}", file=sys.stderr)
        return 1
    return main()


def exit_fast(code: int):
    """Leave the command line: run the exit handlers (multiprocessing stops its helper processes
    and removes its files; tqdm closes its bars), flush, and skip the interpreter's teardown of
    every module, which with torch loaded costs ~0.2 s of each run (measured here)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def convert_ckpt():
    """MindSpeed-LLM's `python convert_ckpt.py ...` (also `convert-ckpt`, `python -m modellink_ckpt`)."""
    exit_fast(_run("modellink_ckpt.cli.main:main"))


def mindformers_convert_weight():
    """MindFormers' `python convert_weight.py ...` (also `mindformers-convert-weight`)."""
    exit_fast(_run("modellink_ckpt.cli.mindformers:convert_weight_main"))


def mindformers_transform_checkpoint():
    """MindFormers' `python transform_checkpoint.py ...` (also `mindformers-transform-checkpoint`)."""
    exit_fast(_run("modellink_ckpt.cli.mindformers:transform_checkpoint_main"))


def mindformers_transform_ckpt_lora():
    """MindFormers' `python transform_ckpt_lora.py ...` (also `mindformers-transform-ckpt-lora`)."""
    exit_fast(_run("modellink_ckpt.cli.mindformers:transform_ckpt_lora_main"))


def mindformers_unified_safetensors():
    """MindFormers' `python unified_safetensors.py ...` (also `mindformers-unified-safetensors`)."""
    exit_fast(_run("modellink_ckpt.cli.mindformers:unified_safetensors_main"))
