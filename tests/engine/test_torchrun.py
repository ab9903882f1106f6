"""Conversion spread over a torchrun job: two node launches (`torchrun --nnodes 2 --node-rank 0/1`,
rendezvous on 127.0.0.1) of two processes each write the same bytes as one process; SIGKILL of one
rank mid-run publishes nothing and the surviving ranks stop with one line naming it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from ms_fixtures import strategy_for
from util import ROOT, looks_complete, run_cli, staging_leftovers

from modellink_ckpt.demo.models import build_hf_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LAYOUT = ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "4")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_nodes(script, hf, save, log_dir, env=None, target=("--save-model-type", "mg", *LAYOUT)):
    """Both node launches of a 2 x 2 torchrun job; returns their Popen objects and log paths."""
    port, procs = _free_port(), []
    for node in (0, 1):
        log = log_dir / f"node{node}.log"
        command = [*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0",
                   "--log-dir", str(log_dir / f"ranks{node}"), "--redirects", "3",  # each rank's output apart
                   str(script), "--model-type", "GPT", "--load-model-type", "hf", "--model-type-hf", "llama2",
                   "--load-dir", str(hf), "--save-dir", str(save), *map(str, target), "--quiet"]
        procs.append((subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                       env={**os.environ, **(env or {})}), log))
    return procs


def _rank_outputs(log_dir) -> dict:
    """{log file: text} of every rank's stdout and stderr (torchrun --log-dir, --redirects 3)."""
    return {str(path): path.read_text() for path in sorted(log_dir.glob("ranks*/**/std*.log"))}


def _manifest_files(target):
    (manifest,) = [*target.glob("iter_*/convert_manifest.json"), *target.glob("convert_manifest.json")]
    return json.loads(manifest.read_text())["files"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return build_hf_checkpoint("llama2", tmp_path_factory.mktemp("torchrun") / "hf", num_layers=4, tokenizer=False)


@pytest.mark.parametrize("target", ["torch", "torch_dist", "mindspore"])
def test_two_nodes_of_two_ranks_write_what_one_process_writes(tmp_path, hf, target):
    """Each rank writes its share: stages of a Megatron target (torch, torch_dist), ranks of a
    MindSpore target split by a strategy."""
    if target == "mindspore":
        strategy, _ = strategy_for(tmp_path, hf, "llama2", pp=2, mp=2)
        flags = ("--save-model-type", "ms", "--dst-strategy", strategy)
    else:
        flags = ("--save-model-type", "mg", *LAYOUT, "--ckpt-format", target)
    single = run_cli("--model-type", "GPT", "--load-model-type", "hf", "--model-type-hf", "llama2", "--load-dir", hf,
                     "--save-dir", tmp_path / "single", *flags, "--workers", "1")
    assert single.returncode == 0, single.stderr
    procs = _launch_nodes(ROOT / "convert_ckpt.py", hf, tmp_path / "job", tmp_path, target=flags)
    for proc, log in procs:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    lines = [line for output in _rank_outputs(tmp_path).values() for line in output.splitlines()
             if line.startswith("rank ")]
    assert sorted(line.split(":")[0] for line in lines) == [f"rank {r}/4" for r in range(4)], lines
    assert _manifest_files(tmp_path / "job") == _manifest_files(tmp_path / "single")


_SLOW_RANK = """
import os, runpy, sys, time
if os.environ.get("RANK") == "3":  # this rank stalls before converting its share, to be killed there
    from modellink_ckpt.engine import pipeline
    def stalled(*args, **kwargs):
        open(os.environ["STALLED"], "w").write(str(os.getpid()))
        time.sleep(120)
    pipeline.run_pairs = stalled
sys.argv = [{convert!r}, *sys.argv[1:]]
runpy.run_path({convert!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_killed_rank_publishes_nothing_and_the_others_name_it(tmp_path, hf):
    script = tmp_path / "slow_rank.py"
    script.write_text(_SLOW_RANK.format(convert=str(ROOT / "convert_ckpt.py")))
    marker, save = tmp_path / "stalled", tmp_path / "job"
    procs = _launch_nodes(script, hf, save, tmp_path, env={"STALLED": str(marker)})
    deadline = time.monotonic() + 120
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), procs[1][1].read_text()[-3000:]
    time.sleep(2)  # the other ranks finish their shares and wait for rank 3
    os.kill(int(marker.read_text()), signal.SIGKILL)
    for proc, _ in procs:
        proc.wait(timeout=120)
    outputs = _rank_outputs(tmp_path)
    stderr = {path: text for path, text in outputs.items() if path.endswith("stderr.log") and text.strip()}
    # the ranks that were not stopped by torchrun (the killed rank's node-mate is) say one line each
    errors = [line for text in stderr.values() for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) >= 2 and all("rank 3 of 4 died" in line for line in errors), outputs
    for path, text in stderr.items():
        assert "Traceback" not in text, (path, text)
        ours = [line for line in text.splitlines() if not line.startswith(("[W", "[E", "Exception raised", "frame #",
                                                                          "<omitting"))]
        assert len(ours) <= 1, (path, text)
    assert not looks_complete(save) and not staging_leftovers(save), sorted(map(str, save.parent.iterdir()))
