"""Hand-written MindSpore strategies for the test models, and running checks in the MindSpore venv.

MindSpore cannot emit a strategy file on a CPU (it needs Ascend/GPU to compile a distributed
graph), so the tests write strategies the way MindSpore's C++ writer does, with MindFormers'
usual layouts: column-parallel weights cut along dim 0 by the model-parallel axis, row-parallel
ones along dim 1, norms and routers replicated; optionally the optimizer shard over the
data-parallel replicas; with pipeline stages, layers split evenly, embedding on the first stage and
the head on the last (a pipeline-merged file, names `<stage>-<param>`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from modellink_ckpt.formats.ms_strategy import ParamLayout, write_strategy
from util import ROOT

_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "word_embeddings.weight",
           "output_layer.weight", "linear_qb.weight", "linear_kvb.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def layout_for(name: str, shape: tuple[int, ...], dp: int, mp: int, opt_shard: bool, stage: int) -> ParamLayout:
    dev = (dp, mp)
    if name.endswith(_COLUMN) and shape[0] % mp == 0:
        tensor_map = (0,) + (-1,) * (len(shape) - 1)
    elif name.endswith(_ROW) and len(shape) == 2 and shape[1] % mp == 0:
        tensor_map = (-1, 0)
    else:
        tensor_map = (-1,) * len(shape)
    step = size = 0
    if opt_shard and dp > 1:
        split = any(k >= 0 for k in tensor_map)
        # replicas of an mp-split parameter sit mp ranks apart; a fully replicated one is repeated
        # on every rank (a group of all dp*mp devices, stride 1)
        size, step = (dp, mp) if split else (dp * mp, 1)
        rows = shape[0] // (mp if tensor_map and tensor_map[0] == 0 else 1)
        if not shape or rows % size:
            step = size = 0
    return ParamLayout(dev, tensor_map, step, size, stage)


def stage_of(name: str, num_layers: int, pp: int) -> int:
    match = _LAYER.match(name)
    if match:
        return int(match.group(1)) * pp // num_layers
    return 0 if "embedding" in name else pp - 1


def write_model_strategy(path: Path, entries, num_layers: int, *, dp: int = 1, mp: int = 1, pp: int = 1,
                         opt_shard: bool = False, per_stage_files: bool = False) -> Path:
    """A strategy for the MindSpore tensors `entries` [(name, shape)]: one file (pipeline-merged
    names when pp > 1), or with `per_stage_files` a folder of per-stage files."""
    layouts = {name: layout_for(name, tuple(shape), dp, mp, opt_shard, stage_of(name, num_layers, pp))
               for name, shape in entries}
    if per_stage_files:
        path.mkdir(parents=True, exist_ok=True)
        for stage in range(pp):
            write_strategy(path / f"ckpt_strategy_rank_{stage * dp * mp}.ckpt",
                           {n: l for n, l in layouts.items() if l.stage == stage}, stage=stage)
        return path
    write_strategy(path, layouts, stage=0, merged=pp > 1)
    return path


# ---- the MindSpore test venv -----------------------------------------------------------------------

MS_VENV = ROOT / ".venv-ms"
CHECK = ROOT / "tests" / "ms_checks" / "ms_check.py"


def ms_python() -> str:
    python = os.environ.get("MS_PYTHON") or str(MS_VENV / "bin" / "python")
    if not Path(python).exists():
        if os.environ.get("REQUIRE_MINDSPORE"):
            pytest.fail(f"{python}: no MindSpore test venv (make setup-ms)")
        pytest.skip("no MindSpore test venv: run `make setup-ms` (make test-slow does)")
    return python


def run_ms(*args, cwd: Path, timeout: float = 600) -> str:
    """`ms_check.py <args>` in the MindSpore venv; returns its stdout, fails the test on an error."""
    cwd.mkdir(parents=True, exist_ok=True)  # MindFormers writes ./output/log into the working folder
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["GLOG_v"] = "3"
    result = subprocess.run([ms_python(), str(CHECK), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join(line for line in result.stderr.splitlines() if "WARNING" not in line)[-3000:]
        raise AssertionError(f"ms_check.py {' '.join(map(str, args))} failed:\n{tail}")
    shutil.rmtree(cwd / "output", ignore_errors=True)
    return result.stdout
