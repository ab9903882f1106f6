"""Every output carries a manifest (BLAKE3, or sha256 on request, per file); --verify re-checks it
and the structure;
--dry-run and the free-space check stop a conversion before anything is written."""

import collections
import hashlib
import json
import shutil

import blake3
import pytest
import torch
from util import hf_to_mg, mg_to_hf, run_cli, run_convert

from modellink_ckpt.demo.models import build_hf_checkpoint
from modellink_ckpt.errors import UsageError
from modellink_ckpt.formats import file_io


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return build_hf_checkpoint("qwen25", tmp_path_factory.mktemp("hf") / "qwen", num_layers=4)


@pytest.fixture(scope="module")
def mg(hf, tmp_path_factory):
    return hf_to_mg(hf, tmp_path_factory.mktemp("mg") / "mg", "qwen25", "--target-tensor-parallel-size", "2",
                    "--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                    "--tokenizer-model", hf / "tokenizer.model")


def verify(path, *flags):
    return run_cli("--verify", path, *flags)


def test_manifest_lists_every_file_with_its_digest(mg, hf, tmp_path):
    iter_dir = mg / "iter_0000001"
    manifest = json.loads((iter_dir / "convert_manifest.json").read_text())
    rank_files = sorted(str(p.relative_to(iter_dir)) for p in iter_dir.glob("mp_rank_*/model_optim_rng.pt"))
    assert sorted(manifest["files"]) == rank_files and len(rank_files) == 4
    for name, entry in manifest["files"].items():
        data = (iter_dir / name).read_bytes()
        assert entry == {"bytes": len(data), "blake3": blake3.blake3(data).hexdigest()}  # the default
    assert manifest["layout"]["tensor_parallel"] == 2 and manifest["layout"]["virtual_pipeline_layers"] == 1
    assert manifest["source"]["type"] == "hf" and manifest["model_type_hf"] == "qwen25"

    back = mg_to_hf(mg, tmp_path, "qwen25", "--max-shard-size", "300KB")
    manifest = json.loads((back / "convert_manifest.json").read_text())
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model"} <= set(manifest["files"])
    assert any(name.startswith("model-00001-of-") for name in manifest["files"])


def test_verify_accepts_fresh_output_in_both_formats(mg, tmp_path):
    result = verify(mg)
    assert result.returncode == 0 and result.stdout.startswith("verified: "), result.stderr
    assert "4 rank files" in result.stdout and "VPP2" in result.stdout
    back = mg_to_hf(mg, tmp_path, "qwen25")
    for path in (back, tmp_path):  # the mg2hf folder itself, or the HF folder holding it
        result = run_cli("verify", path)
        assert result.returncode == 0 and "tensors match config.json" in result.stdout, result.stderr


def test_sha256_on_request_is_recorded_and_verified(hf, tmp_path):
    mg = hf_to_mg(hf, tmp_path / "mg", "qwen25", "--target-tensor-parallel-size", "2", "--hash", "sha256")
    iter_dir = mg / "iter_0000001"
    manifest = json.loads((iter_dir / "convert_manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (iter_dir / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    result = verify(mg)
    assert result.returncode == 0 and "sha256 as in the manifest" in result.stdout, result.stderr


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_a_whole_file_hashed_on_every_core_has_the_plain_digest(tmp_path, monkeypatch, algorithm):
    """file_digest (the parent's hashing of files several workers wrote, and --verify) spreads
    BLAKE3 over the cores and maps the file a window at a time: the digest must not change."""
    monkeypatch.setattr(file_io, "_MAP_WINDOW", 1 << 20)  # several windows, the last one partial
    data = torch.randint(0, 256, ((3 << 20) + 12345,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "blob"
    path.write_bytes(data.numpy().tobytes())
    expected = {"blake3": blake3.blake3, "sha256": hashlib.sha256}[algorithm](path.read_bytes()).hexdigest()
    assert file_io.file_digest(path, algorithm) == (path.stat().st_size, f"{algorithm}:{expected}")


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_verify_catches_a_flipped_byte_with_each_hash(hf, tmp_path, algorithm):
    mg = hf_to_mg(hf, tmp_path / "mg", "qwen25", "--target-tensor-parallel-size", "2", "--hash", algorithm)
    victim = mg / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside tensor data: torch.load would not notice
    victim.write_bytes(bytes(data))
    result = verify(mg)
    assert result.returncode == 1 and "mp_rank_01" in result.stderr and f"{algorithm} differs" in result.stderr


def test_verify_catches_a_flipped_byte_a_missing_rank_file_and_a_truncated_one(mg, tmp_path):
    broken = shutil.copytree(mg, tmp_path / "mg")
    victim = broken / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside tensor data: torch.load would not notice
    victim.write_bytes(bytes(data))
    result = verify(broken)
    assert result.returncode == 1 and "mp_rank_01_001" in result.stderr and "blake3 differs" in result.stderr

    (broken / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt").unlink()
    result = verify(broken)
    assert result.returncode == 1 and "mp_rank_00_000/model_optim_rng.pt: missing" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_verify_checks_structure_against_the_stored_args(mg, tmp_path):
    broken = shutil.copytree(mg, tmp_path / "mg")
    victim = broken / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = torch.load(victim, weights_only=False)
    del state["model1"]["decoder.layers.0.self_attention.linear_qkv.bias"]
    state["model1"]["decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(64, 3)
    torch.save(state, victim)
    result = verify(broken, "--no-hash")
    assert result.returncode == 1
    assert "missing tensor 'decoder.layers.0.self_attention.linear_qkv.bias'" in result.stderr
    assert "'decoder.layers.0.mlp.linear_fc2.weight' is [64, 3] float32, expected [64, 80] float32" in result.stderr


def test_verify_errors_are_one_line_for_non_checkpoints(tmp_path):
    result = verify(tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "neither a Megatron" in result.stderr


@pytest.mark.parametrize("raised,code,line", [
    (KeyboardInterrupt, 130, "error: interrupted"),
    (RuntimeError("boom"), 1, "error: internal error: RuntimeError: boom (set CONVERT_CKPT_DEBUG=1 for the traceback)"),
], ids=["ctrl-c", "bug"])
def test_verify_and_inspect_end_in_one_line_whatever_stops_them(mg, monkeypatch, capsys, raised, code, line):
    """Hashing a large checkpoint takes minutes: a Ctrl-C there (or a bug of ours) is one line too."""
    from modellink_ckpt import registry
    from modellink_ckpt import verify as verify_module
    from modellink_ckpt.cli import main as cli

    def stop(*args, **kwargs):
        raise raised

    monkeypatch.setattr(verify_module, "verify", stop)
    monkeypatch.setattr(registry, "detect", stop)
    for argv in (["--verify", str(mg)], ["inspect", str(mg)]):
        assert cli.main(argv) == code, argv
        assert capsys.readouterr().err == line + "\n", argv


def test_dry_run_prints_the_plan_and_writes_nothing(hf, tmp_path):
    result = run_cli("--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "qwen25",
                     "--load-dir", hf, "--save-dir", tmp_path / "out", "--target-pipeline-parallel-size", "2",
                     "--target-tensor-parallel-size", "2", "--noop-layers", "1,4", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "stage 0: model: layers 0,1(noop),2" in result.stdout
    assert "stage 1: model: layers 3,4(noop),5" in result.stdout
    assert result.stdout.count("model_optim_rng.pt") == 4 and "nothing written" in result.stdout
    assert not (tmp_path / "out").exists()


def test_not_enough_free_space_is_refused_before_writing(hf, tmp_path, monkeypatch):
    import modellink_ckpt.cli.convert as cli

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UsageError, match="needs 0.07 GB, only 0.00 GB free"):
        run_convert("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf,
                    "--save-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,expected", [("qwen3", "qwen3"), ("qwen3-moe", "qwen3-moe"), ("mixtral", "mixtral"),
                                             ("qwen25-tied", "qwen25")])
def test_verify_checks_an_hf_folder_transformers_wrote_as_its_own_family(tmp_path, family, expected):
    """No manifest: the family is found as a conversion finds it (config.json and tensors), and
    every tensor is checked against config.json; the missing manifest is said, not a failure."""
    folder = build_hf_checkpoint(family, tmp_path / family, num_layers=2, tokenizer=False)
    result = verify(folder)
    assert result.returncode == 0, result.stderr
    assert f"verified: {folder}: no convert_manifest.json (not written by this tool)" in result.stdout
    assert f"as --model-type-hf {expected} (from config.json" in result.stdout
    result = verify(folder, "--model-type-hf", "gemma")  # a family that does not convert it: said, not checked
    assert result.returncode == 2 and "which gemma does not convert" in result.stderr
    import safetensors.torch  # a missing tensor is still found

    weights = safetensors.torch.load_file(folder / "model.safetensors")
    del weights[sorted(weights)[-1]]
    safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    result = verify(folder)
    assert result.returncode == 1 and "missing tensor" in result.stderr


def test_verify_names_the_folder_it_checked(hf, tmp_path):
    """DIR holding no manifest but an mg2hf/ output: the summary and the errors name DIR/mg2hf."""
    outer = tmp_path / "hf"
    shutil.copytree(hf, outer / "mg2hf")
    result = verify(outer)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"verified: {outer / 'mg2hf'}: ")


@pytest.mark.parametrize("argv", [["verify", "--help"], ["--verify", "--help"], ["inspect", "--help"], ["--help"],
                                  ["--version"]])
def test_every_command_has_working_help(argv):
    result = run_cli(*argv)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "usage: convert_ckpt.py" in result.stdout or "(modellink-ckpt)" in result.stdout
