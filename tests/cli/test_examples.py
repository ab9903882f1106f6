"""The example scripts run as written (paths from the environment) on tiny models."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_builders import with_mtp_layer
from util import ROOT, assert_same_tensors, load_hf_state

from modellink_ckpt.demo.models import build_hf_checkpoint

# the layout each folder's scripts run with here (from the environment, as a user overrides it)
LAYOUTS = {"llama2": {"NUM_LAYER_LIST": "1,1,1,1", "VPP_LAYERS": "1"}, "deepseek3": {"NUM_LAYER_LIST": "1,3"}}


@pytest.mark.parametrize("folder, family", [("llama2", "llama2"), ("qwen25", "qwen25"), ("qwen3", "qwen3"),
                                            ("mixtral", "mixtral"), ("qwen3_moe", "qwen3-moe"),
                                            ("deepseek3", "deepseek3")])
def test_example_scripts_round_trip(tmp_path, folder, family):
    """Each folder's scripts as written, run from another directory with the venv's Python found by
    the scripts themselves (no PATH set up) and the layout taken from the environment."""
    hf = build_hf_checkpoint(family, tmp_path / "hf", num_layers=4)
    if family == "deepseek3":  # as downloaded: with its multi-token-prediction layer

        hf, _ = with_mtp_layer(hf, tmp_path / "hf_mtp")
    original = load_hf_state(hf)
    env = {**os.environ, "HF_DIR": str(hf), "MCORE_DIR": str(tmp_path / "mcore"), "SRC_DIR": str(tmp_path / "mcore"),
           "DST_DIR": str(tmp_path / "mcore2"), "PYTHON": sys.executable, **LAYOUTS.get(folder, {})}
    scripts = sorted((p for p in (ROOT / "examples" / "mcore" / folder).glob("*.sh") if "lora" not in p.name and "optim" not in p.name), key=lambda p: ("mcore2mcore" in p.name, "mcore2hf" in p.name))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for script in scripts:
        result = subprocess.run(["bash", str(script)], cwd=elsewhere, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{script.name}: {result.stderr[-2000:]}"
    assert_same_tensors(original, load_hf_state(hf / "mg2hf"))
    if family == "llama2":  # TP4 PP2 with virtual stages of one layer
        state = torch.load(tmp_path / "mcore2" / "iter_0000001" / "mp_rank_03_001" / "model_optim_rng.pt",
                           weights_only=False)
        assert {"model0", "model1"} <= set(state)


def test_example_scripts_find_the_repositorys_python_without_path(tmp_path):
    """Run from any directory with no PYTHON set: env.sh finds the repository's .venv (or `python`)."""
    result = subprocess.run(["bash", "-c", f"source {ROOT / 'examples' / 'mcore' / 'env.sh'} && echo $REPO && echo $PYTHON"],
                            cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHON"},
                            capture_output=True, text=True, timeout=60)
    repo, python = result.stdout.split()
    assert Path(repo) == ROOT
    assert python == (str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists()
                      else "python")


def test_lora_example_scripts(tmp_path):
    """The three LoRA scripts as written (r 16, alpha 32, all four targets) on a real peft/megatron-core
    LoRA-only checkpoint: merged Megatron, merged HF, and the PEFT adapter."""
    from lora_fixtures import base_to_hf, build_lora_checkpoints
    from peft import LoraConfig

    fixture = build_lora_checkpoints(tmp_path / "ckpt", tp=1, lora_only=True, r=16, alpha=32.0)
    hf = base_to_hf(fixture, tmp_path / "hf_base")
    for name in ("merged_hf", "adapter_hf"):
        shutil.copytree(hf, tmp_path / name)
    env = {**os.environ, "MCORE_DIR": str(fixture.base_dir), "LORA_DIR": str(fixture.lora_dir),
           "MERGED_DIR": str(tmp_path / "merged_mg"), "PYTHON": sys.executable}
    runs = {"ckpt_convert_llama2_mg2mg_lora.sh": {}, "ckpt_convert_llama2_mcore2hf_lora.sh": {"HF_DIR": str(tmp_path / "merged_hf")},
            "ckpt_convert_llama2_lora2hf.sh": {"HF_DIR": str(tmp_path / "adapter_hf")}}
    for script, extra in runs.items():
        result = subprocess.run(["bash", str(ROOT / "examples" / "mcore" / "llama2" / script)], cwd=tmp_path,
                                env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{script}: {result.stderr[-2000:]}"
    assert (tmp_path / "merged_mg" / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt").is_file()
    merged = load_hf_state(tmp_path / "merged_hf" / "mg2hf")
    base = load_hf_state(hf)
    assert sorted(merged) == sorted(base)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    config = LoraConfig.from_pretrained(str(tmp_path / "adapter_hf" / "mg2hf"))
    assert (config.r, config.lora_alpha) == (16, 32)
    assert sorted(config.target_modules) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
