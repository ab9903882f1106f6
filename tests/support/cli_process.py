"""Running one of the command-line scripts as its own process, the way the tests need it often.

A fresh `python convert_ckpt.py ...` spends ~2 s of CPU importing torch before it reads a byte:
the default suite starts ~420 of them, and that was 80% of its CPU time on a 2-core machine. So a
command runs in a process forked from the test process's fork server (tests/conftest.py), which
imported torch and the converter once and has run no torch operation: the script's own
`__main__` code runs there with its arguments, working directory and environment, and its exit
status, stdout and stderr come back as from `subprocess.run`. What a fresh interpreter adds is its
start-up and the imports; the tests about those (--help without torch, a Python without the
packages, Ctrl-C while torch imports, kills, torchrun) start real interpreters themselves.

`FRESH_CLI=1` starts a fresh interpreter for every command instead (`make test FRESH_CLI=1`; CI
runs the suite that way too).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

FRESH = os.environ.get("FRESH_CLI", "") not in ("", "0")


def run_script(script: Path, argv, *, cwd, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGV...` in its own process; text stdout and stderr, like subprocess.run."""
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    if FRESH:
        return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=env)
    with tempfile.TemporaryDirectory(prefix="cli_") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = multiprocessing.get_context("forkserver").Process(
            target=_run_as_main, args=(str(script), argv, str(cwd), env, str(out), str(err)), name="cli")
        process.start()
        process.join(timeout)
        if process.is_alive():  # its loader and saver die with it (they watch their parent)
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([str(script), *argv], timeout, out.read_bytes(), err.read_bytes())
        return subprocess.CompletedProcess([str(script), *argv], process.exitcode, out.read_text(), err.read_text())


def _run_as_main(script: str, argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the new process: become `python SCRIPT ARGV...` and end with its exit status."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    # the streams a fresh interpreter makes for files: stdout block-buffered, stderr line-buffered
    # (what a process killed by a signal leaves unwritten is the same)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *argv]
    status = 1
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as stop:  # what the interpreter makes of sys.exit(code)
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:  # an uncaught exception: the traceback and exit status 1, as python does
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
