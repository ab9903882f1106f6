"""The example scripts run as written (paths from the environment) on tiny models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modellink_ckpt.demo_models import build_hf_checkpoint
from util import ROOT, assert_same_tensors, load_hf_state


@pytest.mark.parametrize("folder, family, layers", [("llama2", "llama2", 32), ("qwen25", "qwen25", 4), ("qwen3", "qwen3", 4),
                                                    ("mixtral", "mixtral", 4), ("qwen3_moe", "qwen3-moe", 4),
                                                    ("deepseek3", "deepseek3", 4)])
def test_example_scripts_round_trip(tmp_path, folder, family, layers):
    hf = build_hf_checkpoint(family, tmp_path / "hf", num_layers=layers)
    original = load_hf_state(hf)
    env = {**os.environ, "HF_DIR": str(hf), "MCORE_DIR": str(tmp_path / "mcore"),
           "SRC_DIR": str(tmp_path / "mcore"), "NUM_LAYER_LIST": "1,3", "DST_DIR": str(tmp_path / "mcore2"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    scripts = sorted((ROOT / "examples" / "mcore" / folder).glob("*.sh"), key=lambda p: ("mcore2mcore" in p.name, "mcore2hf" in p.name))
    for script in scripts:
        result = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{script.name}: {result.stderr[-2000:]}"
    assert_same_tensors(original, load_hf_state(hf / "mg2hf"))
    if family == "llama2":
        assert (tmp_path / "mcore2" / "iter_0000001" / "mp_rank_03_001" / "model_optim_rng.pt").is_file()
