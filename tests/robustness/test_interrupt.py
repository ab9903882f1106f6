"""Ctrl-C at any moment of a run: one line, exit code 130 (as shells report SIGINT), no target;
SIGTERM to the command (a scheduler's time limit) while it converts: one line, exit code 143.

A terminal sends SIGINT to the whole foreground process group: the command-line process and its
loader and saver. The trials do the same, to a run started in a session of its own with SIGINT at
its default (a background job of a non-interactive shell would inherit it ignored). SIGTERM goes
to the command alone, as `kill` and schedulers send it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from util import assert_one_line_error, cli_argv, looks_complete, staging_leftovers

from modellink_ckpt.demo.models import build_hf_checkpoint

INTERRUPTED = 130


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    # ~100 MB of fp32: the children work for about a second, time enough to be caught at it
    return build_hf_checkpoint("llama2", tmp_path_factory.mktemp("interrupt") / "hf", num_layers=8, hidden_size=512,
                               intermediate_size=1408, tokenizer=False, dtype=torch.float32)


def _start(hf_model, save_dir, *flags) -> subprocess.Popen:
    return subprocess.Popen(cli_argv("hf", "mg", hf_model, save_dir, "--target-tensor-parallel-size", "2",
                                     "--target-pipeline-parallel-size", "2", *flags),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt(process: subprocess.Popen, sig=signal.SIGINT) -> tuple[int, str]:
    if sig == signal.SIGINT:
        os.killpg(process.pid, sig)  # the terminal's foreground group
    else:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def _children_gone(pgid: int) -> bool:
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_while_starting_up_is_one_line(hf_model, tmp_path):
    """The first seconds of a run import torch: a Ctrl-C there (a wrong flag spotted) is no traceback."""
    process = _start(hf_model, tmp_path / "out")
    time.sleep(0.3)  # the interpreter is up; torch is still being imported (or, on a fast machine, the plan made)
    returncode, stderr = _interrupt(process)
    line = assert_one_line_error(returncode, stderr, "Ctrl-C at start-up")
    assert returncode == INTERRUPTED and "interrupted" in line, (returncode, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig,code,words", [(signal.SIGINT, 130, "interrupted; nothing was completed"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM); nothing was completed")],
                         ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_signal_while_converting_stops_every_process_and_publishes_nothing(hf_model, tmp_path, workers, sig, code,
                                                                             words):
    save_dir = tmp_path / "out"
    process = _start(hf_model, save_dir, "--workers", workers)
    deadline = time.monotonic() + 60
    while not staging_leftovers(tmp_path):  # the saver has begun writing
        assert process.poll() is None, f"the run ended before it could be interrupted: {process.communicate()}"
        assert time.monotonic() < deadline, "no staging folder appeared"
        time.sleep(0.002)
    returncode, stderr = _interrupt(process, sig)
    line = assert_one_line_error(returncode, stderr, f"{sig.name} mid-run")
    assert returncode == code and words in line, (returncode, line)
    assert _children_gone(process.pid), "a loader or saver outlived the interrupted run"
    assert not looks_complete(save_dir) and not staging_leftovers(tmp_path)
