"""Hand-written MindSpore strategies for the test models, and running checks in the MindSpore venv.

MindSpore cannot emit a strategy file on a CPU (it needs Ascend/GPU to compile a distributed
graph), so the tests write strategies the way MindSpore's C++ writer does, with MindFormers'
usual layouts: column-parallel weights cut along dim 0 by the model-parallel axis, row-parallel
ones along dim 1, norms and routers replicated; optionally the optimizer shard over the
data-parallel replicas; with pipeline stages, layers split evenly, embedding on the first stage and
the head on the last (a pipeline-merged file, names `<stage>-<param>`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from util import ROOT, run_convert

from modellink_ckpt.formats.mindspore import names as ms_names
from modellink_ckpt.formats.mindspore.store import MsStore
from modellink_ckpt.formats.ms_ckpt import write_ckpt
from modellink_ckpt.formats.ms_strategy import ParamLayout, load_strategy, write_strategy
from modellink_ckpt.model import mapping
from modellink_ckpt.model.families import dims_from_hf_config, load_family

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
CHECK = Path(__file__).resolve().parent / "ms_checks" / "ms_check.py"


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


# ---- conversions and stores --------------------------------------------------------------------------


def hf_to_ms(hf, out, family, *flags) -> Path:
    run_convert("--load-model-type", "hf", "--save-model-type", "ms", "--model-type-hf", family,
                "--load-dir", hf, "--save-dir", out, *flags)
    return Path(out)


def ms_to(save_type, ms, out, family, *flags) -> Path:
    run_convert("--load-model-type", "ms", "--save-model-type", save_type, "--model-type-hf", family,
                "--load-dir", ms, "--save-dir", out, *flags)
    return Path(out) / "mg2hf" if save_type == "hf" else Path(out)


def read_store(path, strategy=None) -> dict[str, torch.Tensor]:
    store = MsStore(path, load_strategy(strategy) if strategy else None)
    return {name: store.read(name) for name in store.names()}


def strategy_for(tmp_path, hf, family, naming="mcore", **layout):
    """A hand-written strategy for the MindSpore tensors of this model."""
    family_cfg = load_family(family)
    config = json.loads((Path(hf) / "config.json").read_text())
    dims = dims_from_hf_config(family_cfg, config)
    entries = [(name, tuple(t.shape)) for _, _, tensors in ms_names.model_ms_tensors(
        ms_names.load_naming(family_cfg, naming), family_cfg, dims, mapping.TensorDtypes(torch.float32))
        for name, t in tensors.items()]
    name = "_".join(f"{k}{v}" for k, v in layout.items())
    return write_model_strategy(tmp_path / f"strategy_{name}.ckpt", entries, dims.num_layers, **layout), entries


# the MindFormers layouts the distributed tests cover, as write_model_strategy arguments
LAYOUTS = {"mp2": dict(mp=2), "dp2mp2-opt": dict(dp=2, mp=2, opt_shard=True), "pp2mp2": dict(pp=2, mp=2)}


def add_adapters(ms_dir: Path, style: str, targets, r: int = 4, seed: int = 0) -> dict:
    """Random adapters (`style`: mcore `.lora_A.weight`, `mindpet` or `tk` deltas) on the MindSpore
    tensors `targets` of the complete ckpt in `ms_dir`; returns {base: (A, B)}."""
    suffixes = {"mcore": (".lora_A.weight", ".lora_B.weight"), "mindpet": (".mindpet_delta_lora_a", ".mindpet_delta_lora_b"),
                "tk": (".tk_delta_lora_a", ".tk_delta_lora_b")}[style]
    state = read_store(ms_dir)
    gen = torch.Generator().manual_seed(seed)
    added = {}
    for base in targets:
        out, inp = state[base].shape
        a = (torch.randn(r, inp, generator=gen) * 0.1).to(state[base].dtype)
        b = (torch.randn(out, r, generator=gen) * 0.1).to(state[base].dtype)
        stem = base[:-len(".weight")]
        state[stem + suffixes[0]], state[stem + suffixes[1]] = a, b
        added[base] = (a, b)
    write_ckpt(next(ms_dir.glob("model.ckpt")), state)
    return added


MCORE_TARGETS = ["decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.1.mlp.linear_fc1.weight",
                 "decoder.layers.1.self_attention.linear_proj.weight"]

LEGACY_TARGETS = ["model.layers.0.attention.wq.weight", "model.layers.1.feed_forward.w1.weight",
                  "model.layers.1.attention.wo.weight"]


def as_training_rank_files(dist: Path, step: str, extra: dict | None = None) -> Path:
    """Our distributed safetensors output as a training run leaves it: `<prefix><r>-<step>` files,
    no strategy copy, and `extra` tensors (step counters) in every rank file."""
    shutil.rmtree(dist / "strategy")
    for folder in sorted(dist.glob("rank_*")):
        (path,) = folder.glob("*.safetensors")
        if extra:
            save_file({**read_store(path), **extra}, path, metadata={"format": "ms"})
        path.rename(folder / f"{path.stem}-{step}.safetensors")
    return dist


def without_redundancy(dist: Path, strategy: Path, complete: dict, out: Path) -> Path:
    """A copy of the distributed safetensors `dist` as `remove_redundancy=True` saves it: each
    replicated slice kept by one of its ranks only (here the last)."""
    lean = Path(shutil.copytree(dist, out))
    loaded = load_strategy(strategy)
    for name, full in complete.items():
        for holders in loaded.holders(name, tuple(full.shape)).values():
            for rank in holders[:-1]:
                (path,) = (lean / f"rank_{rank}").glob("*.safetensors")
                save_file({k: v for k, v in read_store(path).items() if k != name}, path, metadata={"format": "ms"})
    return lean
