"""Bad input: one clear line on stderr, a non-zero exit, and no target that looks complete."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from util import hf_to_mg, run_cli

from modellink_ckpt.demo.models import build_hf_checkpoint


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return build_hf_checkpoint("llama2", tmp_path_factory.mktemp("hf") / "llama", tokenizer=False,
                               max_shard_size="300KB")


@pytest.fixture(scope="module")
def mg(hf, tmp_path_factory):
    return hf_to_mg(hf, tmp_path_factory.mktemp("mg") / "mg", "llama2",
                    "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")


def hf2mg(load, save, *flags):
    return run_cli("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg",
                   "--load-dir", load, "--save-dir", save, *flags)


def mg2hf(load, save, *flags):
    return run_cli("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", load, "--save-dir", save,
                   *flags)


def one_line_error(result, *fragments, code=None):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stderr
    if code is not None:
        assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def nothing_complete(save_dir):
    """No tracker, no published iteration, no leftover partial folder."""
    if not save_dir.exists():
        return True
    names = [p.name for p in save_dir.rglob("*")]
    return not any(n == "latest_checkpointed_iteration.txt" or n.startswith("iter_") or "partial" in n
                   or n == "mg2hf" for n in names)


@pytest.mark.parametrize("flags, fragments", [
    (["--target-tensor-parallel-size", "3"], ["--target-tensor-parallel-size 3", "4 query groups"]),
    (["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,2"], ["--num-layer-list 1,2", "sum to 4"]),
    (["--target-pipeline-parallel-size", "3"], ["does not divide the 4 layers"]),
    (["--model-type-hf", "llama9"], ["--model-type-hf llama9", "unknown model family", "llama2"]),
    (["--num-layers-per-virtual-pipeline-stage", "3", "--target-pipeline-parallel-size", "2"], ["virtual"]),
    (["--target-tensor-parallel-size", "x"], ["invalid int value"]),
])
def test_invalid_layout_exits_2_and_writes_nothing(hf, tmp_path, flags, fragments):
    save = tmp_path / "out"
    one_line_error(hf2mg(hf, save, *flags), *fragments, code=2)
    assert not save.exists()


def test_missing_shard_named(hf, tmp_path):
    broken = shutil.copytree(hf, tmp_path / "hf")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (broken / victim).unlink()
    one_line_error(hf2mg(broken, tmp_path / "out"), victim, "missing")
    assert nothing_complete(tmp_path / "out")


def test_truncated_shard_read_mid_stream_stops_both_processes(hf, tmp_path):
    broken = shutil.copytree(hf, tmp_path / "hf")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = broken / index["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    os.truncate(victim, victim.stat().st_size - 1000)
    result = hf2mg(broken, tmp_path / "out", "--target-pipeline-parallel-size", "2")
    one_line_error(result, victim.name, "truncated")
    assert nothing_complete(tmp_path / "out")


def test_truncated_single_file(tmp_path):
    hf = build_hf_checkpoint("qwen25", tmp_path / "hf", tokenizer=False)
    os.truncate(hf / "model.safetensors", 5000)
    one_line_error(hf2mg(hf, tmp_path / "out"), "model.safetensors", "truncated")
    assert nothing_complete(tmp_path / "out")


def test_layer_count_not_matching_config(hf, tmp_path):
    broken = shutil.copytree(hf, tmp_path / "hf")
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (broken / "config.json").write_text(json.dumps(config))
    one_line_error(hf2mg(broken, tmp_path / "out"), "5 layers", "weights hold 4")


def test_missing_rank_file(mg, tmp_path):
    broken = shutil.copytree(mg, tmp_path / "mg")
    (broken / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt").unlink()
    one_line_error(mg2hf(broken, tmp_path / "out"), "mp_rank_01_001", "missing rank file")
    assert nothing_complete(tmp_path / "out")


def test_truncated_rank_file(mg, tmp_path):
    broken = shutil.copytree(mg, tmp_path / "mg")
    victim = broken / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    os.truncate(victim, victim.stat().st_size // 2)
    one_line_error(mg2hf(broken, tmp_path / "out"), "mp_rank_00_001", "cannot read checkpoint")
    assert nothing_complete(tmp_path / "out")


def test_shape_mismatch_names_the_tensor(mg, tmp_path):
    broken = shutil.copytree(mg, tmp_path / "mg")
    victim = broken / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt"
    state = torch.load(victim, weights_only=False)
    state["model"]["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(64, 7)
    torch.save(state, victim)
    one_line_error(mg2hf(broken, tmp_path / "out"), "linear_fc2")
    assert nothing_complete(tmp_path / "out")


def test_malicious_pickle_in_rank_file_is_refused_and_runs_nothing(mg, tmp_path):
    broken = shutil.copytree(mg, tmp_path / "mg")
    victim = broken / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = torch.load(victim, weights_only=False)
    state["rng_state"] = Evil()
    torch.save(state, victim)
    one_line_error(mg2hf(broken, tmp_path / "out"), "refused to load", "posix.system")
    assert not marker.exists()
    assert nothing_complete(tmp_path / "out")


def test_existing_target_needs_overwrite(mg, hf, tmp_path):
    out = hf_to_mg(hf, tmp_path / "mg", "llama2")
    before = (out / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").read_bytes()
    one_line_error(hf2mg(hf, out, "--target-tensor-parallel-size", "2"), "--overwrite", code=2)
    assert (out / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").read_bytes() == before
    result = hf2mg(hf, out, "--target-tensor-parallel-size", "2", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / "iter_0000001" / "mp_rank_01").is_dir() and not (out / "iter_0000001" / "mp_rank_00_000").exists()


def test_success_prints_a_one_line_summary(hf, tmp_path):
    result = hf2mg(hf, tmp_path / "out", "--target-tensor-parallel-size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: wrote ") and "GB/s" in result.stdout and "peak memory" in result.stdout


@pytest.mark.parametrize("cut", [0.5, 0.05], ids=["half", "head"])
def test_a_truncated_rank_file_is_one_short_line_and_leaves_no_folder_behind(mg, tmp_path, cut):
    """Torch's own message for a zip without its end is ~450 characters; ours names the file and
    what is wrong. The save dir the failed run created is gone again."""
    broken = shutil.copytree(mg, tmp_path / "mg")
    victim = broken / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    os.truncate(victim, int(victim.stat().st_size * cut))
    save_dir = tmp_path / "new" / "out"
    result = mg2hf(broken, save_dir)
    one_line_error(result, str(victim), "truncated or corrupt")
    assert len(result.stderr) < 300, result.stderr
    assert not (tmp_path / "new").exists()


def test_a_failed_run_into_a_missing_save_dir_removes_what_it_created(mg, tmp_path):
    broken = shutil.copytree(mg, tmp_path / "mg")
    (broken / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt").unlink()
    one_line_error(mg2hf(broken, tmp_path / "a" / "b"), "missing rank file")
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder that was there before the run stays
    one_line_error(mg2hf(broken, kept), "missing rank file")
    assert kept.is_dir()


@pytest.mark.parametrize("save", ["file", "under-file", "read-only"])
def test_a_target_that_cannot_be_written_is_refused_before_writing_also_on_dry_run(hf, tmp_path, save):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    save_dir = {"file": blocker, "under-file": blocker / "out", "read-only": Path("/sys/convert-ckpt-test/out")}[save]
    expected = {"file": f"--save-dir {blocker}: is a file, not a folder",
                "under-file": f"--save-dir {blocker / 'out'}: lies under {blocker}, which is a file",
                "read-only": "--save-dir /sys/convert-ckpt-test/out: cannot write there (in /sys"}[save]
    for flags in (["--dry-run"], []):
        one_line_error(hf2mg(hf, save_dir, *flags), expected, code=2)
    assert blocker.read_text() == "not a folder"


def test_inspect_of_a_missing_path_names_it(tmp_path):
    one_line_error(run_cli("inspect", tmp_path / "nowhere"), f"{tmp_path / 'nowhere'}: does not exist", code=2)
