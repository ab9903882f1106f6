"""`inspect --explain TENSOR`: where one tensor goes, traced through the conversion's own rules,
must be where a real conversion put its bytes: every element of every piece it names, read back
from the written files, is the HF element it says."""

import pytest
import torch
from util import load_hf_state, load_mg_state, run_cli, run_convert

from modellink_ckpt.cli.arguments import build_parser
from modellink_ckpt.cli.convert import build_plan
from modellink_ckpt.demo.models import build_hf_checkpoint
from modellink_ckpt.explain import index_of, part_of, trace
from modellink_ckpt.formats.torch_dist import TorchDistStore

CASES = {
    "qkv": ("llama2", "model.layers.1.self_attn.k_proj.weight", ["--target-tensor-parallel-size", "2"]),
    "gate-up": ("llama2", "model.layers.2.mlp.up_proj.weight",
                ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]),
    "expert-grouped": ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w1.weight",
                       ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
                        "--moe-grouped-gemm"]),
    "padded-embedding": ("llama2", "model.embed_tokens.weight",
                         ["--target-tensor-parallel-size", "2", "--make-vocab-size-divisible-by", "64"]),
    "torch_dist-qkv": ("qwen25", "model.layers.0.self_attn.q_proj.bias", ["--ckpt-format", "torch_dist"]),
    "mindspore-legacy-qkv": ("llama2", "model.layers.1.self_attn.v_proj.weight",
                             ["--save-model-type", "ms", "--ms-naming", "legacy-concat"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    return {family: build_hf_checkpoint(family, root / family, num_layers=4, tokenizer=False)
            for family in ("llama2", "mixtral", "qwen25")}


def _written(save_type: str, out, file: str, piece: str, dims: int) -> torch.Tensor:
    """The bytes a real conversion wrote for one piece `inspect --explain` names (`dims`: its rank)."""
    if save_type == "torch_dist":  # "<key> (global [..], at [..])": a layer / expert index leads the store tensor
        store = TorchDistStore(next(out.glob("iter_*")))
        key, _, where = piece.partition(" (global ")
        offsets = [int(x) for x in where.split("at [")[1].rstrip("])").split(", ")]
        entry = store.tensors[key]
        whole = torch.empty(entry.shape, dtype=entry.dtype)
        store.read(key, tuple(slice(0, n) for n in entry.shape), whole)
        return whole[tuple(offsets[:len(offsets) - dims])]
    if save_type == "ms":
        from modellink_ckpt.formats.mindspore.store import MsStore

        return MsStore(out).read(piece)
    rank_dir, rest = file.split("/", 1)
    return load_mg_state(out)[rank_dir][rest.split("[")[1].rstrip("]")][piece]


@pytest.mark.parametrize("case", list(CASES))
def test_explained_pieces_hold_the_bytes_a_conversion_writes(models, tmp_path, case):
    family, name, flags = CASES[case]
    hf = models[family]
    save_type = "ms" if "--save-model-type" in flags else "torch_dist" if "torch_dist" in flags else "mg"
    conversion = [a for a in flags if a not in ("--save-model-type", "ms")]
    argv = ["--load-model-type", "hf", "--save-model-type", "ms" if save_type == "ms" else "mg",
            "--model-type-hf", family, "--load-dir", str(hf), "--save-dir", str(tmp_path / "out"), *conversion]
    run_convert(*argv)
    found = trace(build_plan(build_parser().parse_args(argv + ["--quiet"]), writes=False), name)
    original = load_hf_state(hf)[name]
    checked = 0
    for file, piece, rows, cols in found.pieces:
        mine = part_of(rows) == found.part
        if not mine.any():
            continue
        written = _written(save_type, tmp_path / "out", file, piece, rows.dim())
        assert written.shape == rows.shape, (file, piece)
        hf_rows, hf_cols = index_of(rows)[mine], index_of(cols)[mine]
        expected = original[hf_rows, hf_cols] if original.dim() > 1 else original[hf_rows]
        assert torch.equal(written[mine], expected), (file, piece)
        checked += int(mine.sum())
    assert checked == original.numel()  # every element of the tensor is in exactly the pieces named
    result = run_cli("inspect", hf, "--explain", name, *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{name}: --model-type-hf {family}")


def test_an_unknown_tensor_is_one_line_with_close_names(models):
    result = run_cli("inspect", models["llama2"], "--explain", "model.layers.1.self_attn.qq_proj.weight")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "did you mean model.layers.1.self_attn.q_proj.weight" in result.stderr
