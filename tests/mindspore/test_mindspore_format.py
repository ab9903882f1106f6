"""MindSpore / MindFormers checkpoints without MindSpore: the ckpt and strategy codecs, every
conversion direction bit-exact, distributed layouts by strategy, and one-line errors.

The real MindSpore and MindFormers check the same files in test_mindspore_consumers.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_process import run_script
from hf_builders import build_repacked
from ms_fixtures import (LAYOUTS, LEGACY_TARGETS, MCORE_TARGETS, add_adapters, as_training_rank_files, hf_to_ms, ms_to,
                         read_store, strategy_for, without_redundancy)
from safetensors.torch import save_file
from util import (ROOT, assert_one_line_error, assert_same_checkpoint, assert_same_tensors, hf_to_mg, load_hf_state,
                  looks_complete, run_cli, run_convert)

from modellink_ckpt.demo.models import build_hf_checkpoint
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.mindspore import names as ms_names
from modellink_ckpt.formats.mindspore.checkpoint2 import slice_offset
from modellink_ckpt.formats.ms_ckpt import MsCkptFile, MsCkptWriter, write_ckpt
from modellink_ckpt.formats.ms_strategy import ParamLayout, load_strategy, write_strategy
from modellink_ckpt.formats.safetensors_io import SafetensorsFile
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.families import load_family


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms_hf")
    built = {}

    def get(family, dtype=torch.bfloat16):
        key = (family, dtype)
        if key not in built:
            built[key] = build_hf_checkpoint(family, root / f"{family}-{str(dtype)[6:]}", dtype=dtype, num_layers=4,
                                             tokenizer=False)
        return built[key]
    return get


# ---- codecs -----------------------------------------------------------------------------------------


def test_ckpt_codec_round_trip_with_slices_scalars_and_crc(tmp_path):
    tensors = {"w": torch.randn(5, 7, dtype=torch.float32), "b": torch.randn(9).to(torch.bfloat16),
               "s": torch.tensor(3.5), "e": torch.empty(0, 4, dtype=torch.float16), "i": torch.arange(6),
               "t": torch.randn(7, 5).t()}
    writer = MsCkptWriter(tmp_path / "x.ckpt", slice_bytes=24)  # every tensor over 24 bytes in pieces
    for name, value in tensors.items():
        writer.add(name, value)
    writer.close()
    opened = MsCkptFile(tmp_path / "x.ckpt")
    opened.verify_crc()
    assert len(opened.entries["w"][2]) == 6  # 140 bytes in 24-byte pieces
    for name, value in tensors.items():
        shape, dtype = opened.shape_dtype(name)
        out = torch.empty(shape, dtype=dtype)
        opened.read_rows(name, 0, shape[0] if shape else 1, out.view(shape) if shape else out)
        assert dtype == value.dtype and torch.equal(out, value.contiguous()), name


def test_ckpt_corruption_is_found(tmp_path):
    path = tmp_path / "x.ckpt"
    write_ckpt(path, {"w": torch.randn(64, 8)})
    data = bytearray(path.read_bytes())
    data[100] ^= 0x40
    (tmp_path / "flipped.ckpt").write_bytes(data)
    with pytest.raises(ConvertError, match="CRC check failed"):
        MsCkptFile(tmp_path / "flipped.ckpt").verify_crc()
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:700])
    with pytest.raises(ConvertError, match="truncated or corrupt"):
        MsCkptFile(tmp_path / "cut.ckpt")


@pytest.mark.parametrize("tensor_map, step, size, expected", [
    ((0, -1), 0, 0, [(0, 4), (4, 8), (0, 4), (4, 8)]),
    ((1, -1), 0, 0, [(0, 4), (0, 4), (4, 8), (4, 8)]),
    ((0, -1), 2, 2, [(0, 2), (4, 6), (2, 4), (6, 8)]),
    ((1, -1), 1, 2, [(0, 2), (2, 4), (4, 6), (6, 8)]),
    ((-1, -1), 1, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
])
def test_strategy_slices_match_mindspore(tmp_path, tensor_map, step, size, expected):
    """The rows each rank holds of an 8-row tensor, dev_matrix [2, 2] (as MindSpore's
    transform_checkpoints cuts them; see the MindSpore checks for the same against MindSpore)."""
    write_strategy(tmp_path / "s.ckpt", {"w": ParamLayout((2, 2), tensor_map, step, size)})
    strategy = load_strategy(tmp_path / "s.ckpt")
    assert [strategy.slice_of("w", (8, 4), r)[0] for r in range(4)] == expected


def test_strategy_json_and_per_stage_folder(tmp_path):
    layouts = {"a": ParamLayout((1, 2), (0, -1), 0, 0, 0), "b": ParamLayout((1, 2), (-1, 0), 0, 0, 1)}
    write_strategy(tmp_path / "merged.ckpt", layouts, merged=True)
    folder = tmp_path / "ranks"
    folder.mkdir()
    write_strategy(folder / "ckpt_strategy_rank_0.ckpt", {"a": layouts["a"]}, stage=0)
    write_strategy(folder / "ckpt_strategy_rank_2.ckpt", {"b": layouts["b"]}, stage=1)
    as_json = {"current_stage": 0, "parallel_layout_item": {
        "0-a": {"dev_matrix": [1, 2], "tensor_map": [0, -1], "opt_weight_shard_step": 0, "opt_weight_shard_size": 0},
        "1-b": {"dev_matrix": [1, 2], "tensor_map": [-1, 0]}}}
    (tmp_path / "s.json").write_text(json.dumps(as_json))
    for source in (tmp_path / "merged.ckpt", folder, tmp_path / "s.json"):
        strategy = load_strategy(source)
        assert strategy.layouts == layouts and strategy.world_size == 4, source


# ---- conversions ------------------------------------------------------------------------------------

CASES = [
    pytest.param("qwen3", "mcore", "safetensors", id="qwen3-mcore-safetensors"),
    pytest.param("qwen3", "mcore", "ckpt", id="qwen3-mcore-ckpt"),
    pytest.param("qwen3-moe", "mcore-contiguous", "safetensors", id="qwen3-moe-mcore-contiguous"),
    pytest.param("llama2", "legacy", "ckpt", id="llama-legacy-ckpt"),
    pytest.param("qwen25", "legacy-concat", "safetensors", id="qwen25-legacy-concat", marks=pytest.mark.slow),
    pytest.param("qwen25", "legacy", "ckpt", id="qwen25-legacy", marks=pytest.mark.slow),
    pytest.param("mixtral", "mcore", "safetensors", id="mixtral-mcore"),
    pytest.param("mixtral", "legacy", "ckpt", id="mixtral-legacy", marks=pytest.mark.slow),
    pytest.param("qwen3-moe", "mcore", "ckpt", id="qwen3-moe-mcore", marks=pytest.mark.slow),
    pytest.param("deepseek3", "mcore", "safetensors", id="deepseek3-mcore"),
    pytest.param("deepseek3", "mcore", "ckpt", id="deepseek3-mcore-ckpt", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family, naming, fmt", CASES)
def test_hf_to_ms_to_hf_is_bit_exact(tmp_path, models, family, naming, fmt):
    hf = models(family)
    ms = hf_to_ms(hf, tmp_path / "ms", family, "--ms-format", fmt, "--ms-naming", naming)
    assert ms_names.detect_naming(read_store(ms)) == naming.replace("-contiguous", "")  # the manifest tells
    back = ms_to("hf", ms, tmp_path / "back", family)
    assert_same_tensors(load_hf_state(hf), load_hf_state(back), f"{family} {naming} {fmt}")
    for folder in (ms, back):
        verified = run_cli("--verify", folder)
        assert verified.returncode == 0, verified.stderr


def test_mindformers_layouts_of_the_fused_tensors(tmp_path, models):
    """mcore names with MindFormers' layouts: per-group qkv (as Megatron), fc1 rows interleaved
    g0,u0,g1,u1,..., experts stacked transposed ([E*H, 2F] / [E*F, H]); DeepSeek-V3 MLA qkv
    concatenated [q_a; kv_a] and kv norm named k_layernorm."""
    hf = load_hf_state(models("mixtral", torch.float32))
    ms = read_store(hf_to_ms(models("mixtral", torch.float32), tmp_path / "mix", "mixtral"))
    gate = hf["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    up = hf["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    down = hf["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    hidden, ffn = gate.shape[1], gate.shape[0]
    weight1 = ms["decoder.layers.1.mlp.experts.weight1"].reshape(-1, hidden, 2 * ffn)
    assert torch.equal(weight1[2], torch.cat([gate.t(), up.t()], dim=1))
    assert torch.equal(ms["decoder.layers.1.mlp.experts.weight2"].reshape(-1, ffn, hidden)[2], down.t())

    hf = load_hf_state(models("qwen3", torch.float32))
    ms = read_store(hf_to_ms(models("qwen3", torch.float32), tmp_path / "q3", "qwen3"))
    fc1 = ms["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[0::2], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[1::2], hf["model.layers.0.mlp.up_proj.weight"])

    hf = load_hf_state(models("deepseek3", torch.float32))
    ms = read_store(hf_to_ms(models("deepseek3", torch.float32), tmp_path / "ds", "deepseek3"))
    assert torch.equal(ms["decoder.layers.0.self_attention.linear_qkv.weight"],
                       torch.cat([hf["model.layers.0.self_attn.q_a_proj.weight"],
                                  hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]]))
    assert torch.equal(ms["decoder.layers.0.self_attention.k_layernorm.weight"],
                       hf["model.layers.0.self_attn.kv_a_layernorm.weight"])


TP2PP2 = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]


@pytest.mark.parametrize("family", ["llama2", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_mg_to_ms_to_mg_equals_direct(tmp_path, models, family):
    hf = models(family)
    mg = hf_to_mg(hf, tmp_path / "mg", family, *TP2PP2)
    ms = run_convert("--load-model-type", "mg", "--save-model-type", "ms", "--model-type-hf", family,
                     "--load-dir", mg, "--save-dir", tmp_path / "ms", "--ms-format", "ckpt")
    assert ms["files"] == 1
    back = ms_to("mg", tmp_path / "ms", tmp_path / "back", family, *TP2PP2)
    assert_same_checkpoint(back, hf_to_mg(hf, tmp_path / "direct", family, *TP2PP2))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["qwen3", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_distributed_output_holds_the_strategy_slices(tmp_path, models, family, layout):
    """hf -> distributed MindSpore: each rank file holds exactly its slices of the complete
    checkpoint; the distributed checkpoint converts back to HF bit-exactly and to another
    strategy (ms -> ms) equal to converting straight to that one."""
    hf = models(family)
    strategy, entries = strategy_for(tmp_path, hf, family, **LAYOUTS[layout])
    complete = read_store(hf_to_ms(hf, tmp_path / "complete", family))
    dist = hf_to_ms(hf, tmp_path / "dist", family, "--dst-strategy", strategy, "--ms-format", "ckpt")
    loaded = load_strategy(strategy)
    assert sorted(p.name for p in dist.glob("rank_*")) == sorted(f"rank_{r}" for r in range(loaded.world_size))
    for rank in range(loaded.world_size):
        (path,) = (dist / f"rank_{rank}").glob("*.ckpt")
        assert path.name == f"checkpoint_{rank}.ckpt"
        opened = MsCkptFile(path)
        for name, full in complete.items():
            if not loaded.holds(name, rank):
                assert name not in opened
                continue
            ranges = loaded.slice_of(name, tuple(full.shape), rank)
            shape, dtype = opened.shape_dtype(name)
            got = torch.empty(shape, dtype=dtype)
            opened.read_rows(name, 0, shape[0], got)
            assert torch.equal(got, full[tuple(slice(a, b) for a, b in ranges)]), (rank, name)
    back = ms_to("hf", dist, tmp_path / "back", family, "--src-strategy", strategy)
    assert_same_tensors(load_hf_state(hf), load_hf_state(back), f"{family} {layout}")
    own = ms_to("hf", dist, tmp_path / "own", family)  # by the strategy/ copy our output keeps
    assert_same_tensors(load_hf_state(hf), load_hf_state(own), f"{family} {layout} (own strategy)")
    other, _ = strategy_for(tmp_path, hf, family, mp=4)
    resharded = ms_to("ms", dist, tmp_path / "resharded", family, "--src-strategy", strategy,
                      "--dst-strategy", other)
    direct = hf_to_ms(hf, tmp_path / "direct", family, "--dst-strategy", other)
    for rank in range(4):
        a = read_store(resharded / f"rank_{rank}")
        b = read_store(direct / f"rank_{rank}")
        assert_same_tensors(a, b, f"rank {rank}")
    merged = ms_to("ms", dist, tmp_path / "merged", family, "--src-strategy", strategy)
    assert_same_tensors(read_store(merged), complete, "distributed -> complete")


# ---- bad input ----------------------------------------------------------------------------------------


def _cli(*argv):
    return run_cli("--model-type-hf", "qwen3", *argv)


def test_bad_mindspore_input_is_one_line(tmp_path, models):
    hf = models("qwen3")
    strategy, _ = strategy_for(tmp_path, hf, "qwen3", mp=2)
    dist = hf_to_ms(hf, tmp_path / "dist", "qwen3", "--dst-strategy", strategy, "--ms-format", "ckpt")
    complete = hf_to_ms(hf, tmp_path / "complete", "qwen3", "--ms-format", "ckpt")
    cases = {}
    # a truncated ckpt, and one with a flipped byte (CRC)
    cut = Path(shutil.copytree(complete, tmp_path / "cut"))
    data = (cut / "model.ckpt").read_bytes()
    (cut / "model.ckpt").write_bytes(data[:len(data) // 2])
    cases["truncated"] = (["--load-dir", cut], "truncated or corrupt")
    flipped = Path(shutil.copytree(complete, tmp_path / "flipped"))
    data = bytearray((flipped / "model.ckpt").read_bytes())
    data[len(data) // 2] ^= 1
    (flipped / "model.ckpt").write_bytes(data)
    cases["crc"] = (["--load-dir", flipped], "CRC check failed")
    # distributed: no strategy, an empty strategy, a strategy for other shapes, a missing rank file,
    # both formats in one rank folder
    bare = Path(shutil.copytree(dist, tmp_path / "bare"))
    shutil.rmtree(bare / "strategy")  # rank files as a training run leaves them (ours keep a strategy/ copy)
    cases["no strategy"] = (["--load-dir", bare], "needs --src-strategy")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases["empty strategy"] = (["--load-dir", dist, "--src-strategy", tmp_path / "empty.ckpt"], "empty strategy")
    wrong, _ = strategy_for(tmp_path, hf, "qwen3", mp=4)
    cases["other strategy"] = (["--load-dir", dist, "--src-strategy", wrong], "rank_2 is missing")
    other_mp2 = tmp_path / "rows.ckpt"
    write_strategy(other_mp2, {"embedding.word_embeddings.weight": ParamLayout((2,), (-1, 0))})
    cases["disagreeing strategy"] = (["--load-dir", dist, "--src-strategy", other_mp2], "strategy")
    missing = Path(shutil.copytree(dist, tmp_path / "missing"))
    shutil.rmtree(missing / "rank_1")
    cases["missing rank"] = (["--load-dir", missing, "--src-strategy", strategy], "rank_1 is missing")
    both = Path(shutil.copytree(dist, tmp_path / "both"))
    (both / "rank_0" / "extra.safetensors").write_bytes(b"")
    cases["both formats"] = (["--load-dir", both, "--src-strategy", strategy], "both .ckpt and .safetensors")
    for what, (flags, message) in cases.items():
        out = tmp_path / f"out-{what.replace(' ', '-')}"
        result = _cli("--load-model-type", "ms", "--save-model-type", "hf", *flags, "--save-dir", out)
        line = assert_one_line_error(result.returncode, result.stderr, what)
        assert message in line, (what, line)
        assert not looks_complete(out), what
    # a target strategy for another model: rows that do not divide, a tensor the model lacks
    odd_rows = tmp_path / "odd.ckpt"
    write_strategy(odd_rows, {"embedding.word_embeddings.weight": ParamLayout((2,), (0, -1))})  # 503 rows
    stranger = tmp_path / "stranger.ckpt"
    write_strategy(stranger, {"decoder.layers.9.mlp.linear_fc1.weight": ParamLayout((2,), (0, -1))})
    for bad, message in ((odd_rows, "does not split into [2, 1] equal slices"), (stranger, "does not have")):
        result = _cli("--load-model-type", "hf", "--save-model-type", "ms", "--load-dir", hf, "--dst-strategy", bad,
                      "--save-dir", tmp_path / "out-dst")
        assert message in assert_one_line_error(result.returncode, result.stderr)
        assert not looks_complete(tmp_path / "out-dst")


def test_a_rank_folder_with_several_steps_needs_the_step(tmp_path, models):
    """A training run leaves one file per saved step in each rank folder (`-2_2`, `-10_10`): the
    converter, transform_checkpoint.py and inspect name the candidates; --file-suffix picks one.
    Sorted order would have taken the older step here (`-10_10` sorts before `-2_2`)."""
    hf = models("qwen3")
    strategy, _ = strategy_for(tmp_path, hf, "qwen3", mp=2)
    dist = hf_to_ms(hf, tmp_path / "dist", "qwen3", "--dst-strategy", strategy, "--ms-format", "ckpt")
    for rank in range(2):
        folder = dist / f"rank_{rank}"
        (folder / f"checkpoint_{rank}.ckpt").rename(folder / f"checkpoint_{rank}-10_10.ckpt")
        (folder / f"checkpoint_{rank}-2_2.ckpt").write_bytes(b"an older step, not a checkpoint")
    flags = ("--load-model-type", "ms", "--save-model-type", "hf", "--load-dir", dist, "--src-strategy", strategy)
    result = _cli(*flags, "--save-dir", tmp_path / "ambiguous")
    line = assert_one_line_error(result.returncode, result.stderr, "several steps")
    assert "2 checkpoint files (checkpoint_0-10_10.ckpt, checkpoint_0-2_2.ckpt)" in line and "--file-suffix" in line
    assert not looks_complete(tmp_path / "ambiguous")
    result = _cli(*flags, "--file-suffix", "5_5", "--save-dir", tmp_path / "none")
    assert "--file-suffix 5_5: no file(s)" in assert_one_line_error(result.returncode, result.stderr, "no such step")

    back = ms_to("hf", dist, tmp_path / "back", "qwen3", "--src-strategy", strategy, "--file-suffix", "10_10")
    assert_same_tensors(load_hf_state(hf), load_hf_state(back), "the chosen step")

    tool = ["--src_checkpoint", dist, "--src_strategy", strategy, "--dst_checkpoint_dir"]
    result = _script("transform_checkpoint.py", *tool, tmp_path / "merged-ambiguous")
    assert "--file_suffix" in assert_one_line_error(result.returncode, result.stderr, "transform_checkpoint")
    result = _script("transform_checkpoint.py", *tool, tmp_path / "merged", "--file_suffix", "10_10")
    assert result.returncode == 0, result.stderr
    complete = read_store(hf_to_ms(hf, tmp_path / "complete", "qwen3", "--ms-format", "ckpt"))
    assert_same_tensors(read_store(next((tmp_path / "merged").glob("rank_0"), tmp_path / "merged")), complete)

    shown = run_cli("inspect", dist)
    assert shown.returncode == 0, shown.stderr
    assert "10_10" in shown.stdout and "2_2" in shown.stdout, shown.stdout


def test_mindformers_checkpoint2_folder_in_and_out(tmp_path, models):
    """MindFormers' Checkpoint 2.0 (tracker + iteration_<N>/model-<rank>-<ranks>.safetensors): written
    with --ms-format checkpoint2, read back bit-exact, its optimizer file and common.json left out by
    name in the summary; inspect and --verify know it (its tracker is no Megatron one). MindFormers
    itself writes and loads these folders in test_mindspore_consumers.py."""
    hf = models("qwen3")
    c2 = hf_to_ms(hf, tmp_path / "c2", "qwen3", "--ms-format", "checkpoint2")
    assert (c2 / "latest_checkpointed_iteration.txt").read_text() == "1"
    model = c2 / "iteration_00000001" / "model-0000000-0000001.safetensors"
    assert sorted(p.name for p in model.parent.iterdir()) == [model.name]
    assert SafetensorsFile(model).metadata == {"format": "ms"}
    assert run_cli("--verify", c2).returncode == 0
    shown = run_cli("inspect", c2)
    assert "MindFormers Checkpoint 2.0, iteration_00000001" in shown.stdout, shown.stdout + shown.stderr

    # as training leaves it: the optimizer's file and the step counters beside the model
    (model.parent / "opt-0000000-0000001.safetensors").write_bytes(model.read_bytes())
    (model.parent / "common.json").write_text(json.dumps({"global_step": 1}))
    flags = ("--load-model-type", "ms", "--save-model-type", "hf", "--load-dir", c2)
    result = _cli(*flags, "--save-dir", tmp_path / "back")
    assert result.returncode == 0, result.stderr
    assert "left out: common.json, opt-0000000-0000001.safetensors (optimizer state and step counters)" in \
        result.stdout.splitlines()[-1]
    assert_same_tensors(load_hf_state(hf), load_hf_state(tmp_path / "back" / "mg2hf"), "checkpoint2")
    again = run_cli("--load-model-type", "ms", "--save-model-type", "ms", "--ms-format", "checkpoint2", "--load-dir",
                    c2, "--save-dir", tmp_path / "again", "--iteration", "1")
    assert again.returncode == 0, again.stderr
    assert_same_tensors(read_store(model), read_store(tmp_path / "again"), "checkpoint2 -> checkpoint2")

    cases = {"no such iteration": (["--iteration", "7"], "--iteration 7: ", "has no iteration_00000007 (found: [1])")}
    stale = Path(shutil.copytree(c2, tmp_path / "stale"))
    (stale / "latest_checkpointed_iteration.txt").write_text("5")
    cases["stale tracker"] = (["--load-dir", stale], "latest_checkpointed_iteration.txt: points to iteration_00000005",
                              "which does not exist")
    ranks = Path(shutil.copytree(c2, tmp_path / "ranks"))
    (ranks / "iteration_00000001" / "model-0000000-0000001.safetensors").rename(
        ranks / "iteration_00000001" / "model-0000001-0000002.safetensors")
    cases["missing rank"] = (["--load-dir", ranks], "iteration_00000001: the model file of rank 0 is missing", "")
    for what, (extra, *messages) in cases.items():
        result = _cli(*flags, *extra, "--save-dir", tmp_path / f"out-{what.replace(' ', '-')}")
        line = assert_one_line_error(result.returncode, result.stderr, what)
        assert all(m in line for m in messages), (what, line)
    foreign = Path(shutil.copytree(c2, tmp_path / "foreign"))  # as MindFormers writes it: no manifest, no config
    for name in ("convert_manifest.json", "config.json"):
        (foreign / name).unlink()
    result = run_cli("--verify", foreign)
    assert "a MindFormers Checkpoint 2.0 folder this converter did not write" in \
        assert_one_line_error(result.returncode, result.stderr, "verify")
    strategy, _ = strategy_for(tmp_path, hf, "qwen3", mp=2)
    refused = _cli("--load-model-type", "hf", "--save-model-type", "ms", "--load-dir", hf, "--ms-format", "checkpoint2",
                   "--dst-strategy", strategy, "--save-dir", tmp_path / "split")
    assert "drop --dst-strategy" in assert_one_line_error(refused.returncode, refused.stderr)


def test_checkpoint2_slice_ids_count_row_major():
    """MindFormers' chunk offset is one slice id over the axis fragments, the last axis fastest."""
    assert [slice_offset(i, (2, 2), (32, 64)) for i in range(4)] == [(0, 0), (0, 64), (32, 0), (32, 64)]
    assert slice_offset(0, (1,), (64,)) == (0,)


def test_unexplained_mindspore_tensor_is_refused(tmp_path, models):
    """A tensor no rule of the naming explains stops the conversion and is named; training state
    (optimizer moments, step counters) is recognised and left out."""
    ms = hf_to_ms(models("qwen3"), tmp_path / "ms", "qwen3", "--ms-format", "ckpt")
    state = read_store(ms)
    write_ckpt(ms / "model.ckpt", {**state, "adam_m.decoder.final_layernorm.weight": torch.zeros(64),
                                   "global_step": torch.tensor(3)})
    result = _cli("--load-model-type", "ms", "--save-model-type", "hf", "--load-dir", ms, "--save-dir", tmp_path / "ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith("left out: 2 training-state tensors (adam_m.*, global_step)")
    assert "model.norm.weight" in load_hf_state(tmp_path / "ok" / "mg2hf")
    write_ckpt(ms / "model.ckpt", {**state, "decoder.layers.0.mlp.extra_bias": torch.zeros(4)})
    result = _cli("--load-model-type", "ms", "--save-model-type", "hf", "--load-dir", ms,
                  "--save-dir", tmp_path / "bad")
    assert "decoder.layers.0.mlp.extra_bias" in assert_one_line_error(result.returncode, result.stderr)


# ---- LoRA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style, naming, family, targets", [
    ("mcore", "mcore", "qwen3", MCORE_TARGETS),
    ("mindpet", "legacy", "llama2", LEGACY_TARGETS),
    ("tk", "legacy", "llama2", LEGACY_TARGETS),
])
def test_mindformers_lora_merge_and_export(tmp_path, models, style, naming, family, targets):
    """Adapters merged as MindFormers merges them (W + scaling * B @ A, in fp32, in W's dtype) at
    any target; exported as a PEFT adapter that peft loads, whose merge gives the same HF weights."""
    hf = models(family, torch.float32)
    ms = hf_to_ms(hf, tmp_path / "ms", family, "--ms-format", "ckpt", "--ms-naming", naming)
    base = read_store(ms)
    adapters = add_adapters(ms, style, targets)
    scaling = 0.5
    merged = ms_to("ms", ms, tmp_path / "merged", family, "--lora-scaling", scaling, "--ms-format", "ckpt",
                   "--ms-naming", naming)
    got = read_store(merged)
    for name, weight in base.items():
        want = weight if name not in adapters else weight + scaling * adapters[name][1] @ adapters[name][0]
        assert torch.equal(got[name], want.to(weight.dtype)), name
    # unmerged adapters are refused by name; r/alpha work like --lora-scaling
    result = _cli("--load-model-type", "ms", "--save-model-type", "hf", "--load-dir", ms, "--save-dir",
                  tmp_path / "refused", "--model-type-hf", family)
    assert "holds LoRA adapters" in assert_one_line_error(result.returncode, result.stderr)
    merged_hf = ms_to("hf", ms, tmp_path / "merged_hf", family, "--lora-r", 4, "--lora-alpha", 2)
    plain_hf = ms_to("hf", merged, tmp_path / "plain_hf", family)
    assert_same_tensors(load_hf_state(merged_hf), load_hf_state(plain_hf), "r/alpha = scaling")

    run_convert("--load-model-type", "ms", "--save-model-type", "hf", "--model-type-hf", family, "--load-dir", ms,
                "--save-dir", tmp_path / "adapter", "--save-lora-to-hf", "--lora-scaling", scaling)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    peft_merged = PeftModel.from_pretrained(model, tmp_path / "adapter" / "mg2hf").merge_and_unload().state_dict()
    for name, tensor in load_hf_state(merged_hf).items():
        assert torch.allclose(peft_merged[name], tensor, atol=1e-6, rtol=0), name


# ---- MindFormers users' command lines -------------------------------------------------------------------


def _script(name, *argv):
    return run_script(ROOT / name, [*argv, "--quiet"], cwd=ROOT, timeout=300)


def test_convert_weight_command_line(tmp_path, models):
    """`convert_weight.py --model llama --input_path HF --output_path X.ckpt` and back with
    --reversed (to a torch state dict file, as MindFormers writes, and to an HF folder)."""
    hf = models("llama2")
    out = tmp_path / "ms_weights" / "llama.ckpt"
    out.parent.mkdir()
    result = _script("convert_weight.py", "--model", "llama", "--input_path", hf, "--output_path", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["llama.ckpt"]
    assert "model.layers.0.attention.wq.weight" in read_store(out)
    back = tmp_path / "llama.bin"
    result = _script("convert_weight.py", "--model", "llama", "--reversed", "--input_path", out, "--output_path", back,
                     "--config", Path(hf) / "config.json")
    assert result.returncode == 0, result.stderr
    assert_same_tensors(load_hf_state(hf), torch.load(back, weights_only=True), "convert_weight --reversed")
    result = _script("convert_weight.py", "--model", "llama", "--reversed", "--input_path", out,
                     "--output_path", tmp_path / "hf_back", "--config", hf, "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert {t.dtype for t in load_hf_state(tmp_path / "hf_back").values()} == {torch.float32}
    # one-line errors: an unknown model, an existing output, no config for --reversed
    for argv, message in ((["--model", "telechat", "--input_path", hf, "--output_path", tmp_path / "x.ckpt"],
                           "--model telechat: not converted: TeleChat's weight layout"),
                          (["--model", "baichuan", "--input_path", hf, "--output_path", tmp_path / "x.ckpt"],
                           "--model baichuan: supported here"),
                          (["--model", "llama", "--input_path", hf, "--output_path", out], "already exists"),
                          (["--model", "llama", "--reversed", "--input_path", out, "--output_path", tmp_path / "y"],
                           "config.json")):
        result = _script("convert_weight.py", *argv)
        assert message in assert_one_line_error(result.returncode, result.stderr), argv


@pytest.mark.parametrize("model, family", [("qwen3", "qwen3"), ("qwen3_moe", "qwen3-moe")])
def test_convert_weight_takes_mindformers_qwen3_names(tmp_path, models, model, family):
    """`--model qwen3` / `qwen3_moe` write the mcore names MindFormers' Qwen3 models load (the same
    file as --save-model-type ms) and come back with --reversed bit for bit."""
    hf = models(family)
    out = tmp_path / "ms" / f"{model}.safetensors"
    result = _script("convert_weight.py", "--model", model, "--input_path", hf, "--output_path", out)
    assert result.returncode == 0, result.stderr
    assert_same_tensors(read_store(out), read_store(hf_to_ms(hf, tmp_path / "direct", family)), model)
    back = tmp_path / "back"
    result = _script("convert_weight.py", "--model", model, "--reversed", "--input_path", out, "--output_path", back,
                     "--config", hf)
    assert result.returncode == 0, result.stderr
    assert_same_tensors(load_hf_state(hf), load_hf_state(back), f"{model} --reversed")


def test_transform_checkpoint_command_line(tmp_path, models):
    """`transform_checkpoint.py` splits a complete checkpoint by a strategy, re-shards and merges,
    tensor by tensor, equal to the converter's own distributed output."""
    hf = models("qwen3")
    mp2, _ = strategy_for(tmp_path, hf, "qwen3", mp=2)
    pp2, _ = strategy_for(tmp_path, hf, "qwen3", pp=2, mp=2)
    complete = hf_to_ms(hf, tmp_path / "complete", "qwen3", "--ms-format", "ckpt")
    result = _script("transform_checkpoint.py", "--src_checkpoint", complete / "model.ckpt",
                     "--dst_checkpoint_dir", tmp_path / "mp2", "--dst_strategy", mp2)
    assert result.returncode == 0, result.stderr
    direct = hf_to_ms(hf, tmp_path / "direct", "qwen3", "--ms-format", "ckpt", "--dst-strategy", mp2)
    for rank in range(2):
        assert_same_tensors(read_store(tmp_path / "mp2" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"),
                            read_store(direct / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"), f"rank {rank}")
    result = _script("transform_checkpoint.py", "--src_checkpoint", tmp_path / "mp2", "--src_strategy", mp2,
                     "--dst_checkpoint", tmp_path / "pp2", "--dst_strategy", pp2, "--world_size", 4, "--prefix", "qwen3_")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pp2" / "rank_3" / "qwen3_3.ckpt").is_file()
    result = _script("transform_checkpoint.py", "--src_checkpoint", tmp_path / "pp2", "--src_strategy", pp2,
                     "--dst_checkpoint_dir", tmp_path / "merged", "--dst_strategy", "None")
    assert result.returncode == 0, result.stderr
    assert_same_tensors(read_store(tmp_path / "merged" / "model.ckpt"), read_store(complete), "merged back")
    result = _script("transform_checkpoint.py", "--src_checkpoint", complete / "model.ckpt", "--dst_checkpoint_dir",
                     tmp_path / "bad", "--dst_strategy", mp2, "--world_size", 8)
    assert "--world_size 8" in assert_one_line_error(result.returncode, result.stderr)
    assert not looks_complete(tmp_path / "bad") and not (tmp_path / "bad").exists()


def test_transform_ckpt_lora_command_line(tmp_path, models):
    """`transform_ckpt_lora.py` as MindFormers users run it: a checkpoint file's adapters merged into
    `<dst>/merged_lora.<format>` (an empty folder the user made is filled), equal to the converter's
    own merge; a distributed source (`--src_ckpt_strategy`) gives the same; `--dst_ckpt_strategy`
    one merged file per rank. MindFormers' own tool gives the same file (test_mindspore_consumers.py)."""
    hf = models("qwen3")
    ms = hf_to_ms(hf, tmp_path / "ms", "qwen3", "--ms-format", "ckpt")
    add_adapters(ms, "mcore", MCORE_TARGETS)
    ours = read_store(ms_to("ms", ms, tmp_path / "ours", "qwen3", "--lora-scaling", "4", "--ms-format", "ckpt"))
    (tmp_path / "dst").mkdir()
    result = _script("transform_ckpt_lora.py", "--src_ckpt_path_or_dir", ms / "model.ckpt", "--dst_ckpt_dir",
                     tmp_path / "dst", "--lora_scaling", "4")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["convert_manifest.json", "merged_lora.ckpt"]
    assert_same_tensors(read_store(tmp_path / "dst" / "merged_lora.ckpt"), ours, "file")

    mp2, _ = strategy_for(tmp_path, hf, "qwen3", mp=2)
    split = _script("transform_checkpoint.py", "--src_checkpoint", ms / "model.ckpt", "--dst_checkpoint_dir",
                    tmp_path / "split", "--dst_strategy", mp2)
    assert split.returncode == 0, split.stderr
    result = _script("transform_ckpt_lora.py", "--src_ckpt_path_or_dir", tmp_path / "split", "--src_ckpt_strategy", mp2,
                     "--dst_ckpt_dir", tmp_path / "from-ranks", "--lora_scaling", "4", "--save_format", "safetensors")
    assert result.returncode == 0, result.stderr
    assert_same_tensors(read_store(tmp_path / "from-ranks" / "merged_lora.safetensors"), ours, "distributed source")
    result = _script("transform_ckpt_lora.py", "--src_ckpt_path_or_dir", ms / "model.ckpt", "--dst_ckpt_strategy", mp2,
                     "--dst_ckpt_dir", tmp_path / "ranks", "--lora_scaling", "4", "--prefix", "qwen3_")
    assert result.returncode == 0, result.stderr
    direct = hf_to_ms(hf, tmp_path / "direct", "qwen3", "--ms-format", "ckpt", "--dst-strategy", mp2)
    strategy = load_strategy(mp2)
    for rank in range(2):
        got = read_store(tmp_path / "ranks" / f"rank_{rank}" / f"qwen3_{rank}.ckpt")
        assert sorted(got) == sorted(read_store(direct / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")), rank
        for name, full in ours.items():
            ranges = strategy.slice_of(name, tuple(full.shape), rank) if name in strategy.layouts else None
            expected = full[tuple(slice(a, b) for a, b in ranges)] if ranges else full
            assert torch.equal(got[name], expected), (rank, name)
    bare = Path(shutil.copytree(tmp_path / "split", tmp_path / "bare"))
    shutil.rmtree(bare / "strategy")  # ours keep a strategy/ copy, which is read when no strategy is given
    result = _script("transform_ckpt_lora.py", "--src_ckpt_path_or_dir", bare,
                     "--dst_ckpt_dir", tmp_path / "no-strategy")
    assert "--src_ckpt_strategy" in assert_one_line_error(result.returncode, result.stderr, "no strategy")


def test_unified_safetensors_command_line(tmp_path, models):
    """`unified_safetensors.py` as MindFormers users run it: rank files of one step merged into
    `<output_dir>/<suffix>_ckpt_convert/unified_safe/` (part files, param_name_map.json, the step
    counters in hyper_param.safetensors), `--filter_out_param_prefix adam_`, and a redundancy-free
    source (each replicated slice kept by one rank only) with `--has_redundancy False`. MindSpore's
    own unified_safetensors gives the same in test_mindspore_consumers.py."""
    hf = models("qwen3")
    strategy, _ = strategy_for(tmp_path, hf, "qwen3", dp=2, mp=2)
    complete = read_store(hf_to_ms(hf, tmp_path / "complete", "qwen3"))
    moments = {"adam_m.decoder.final_layernorm.weight": torch.zeros(64), "global_step": torch.tensor([7.0])}
    dist = as_training_rank_files(hf_to_ms(hf, tmp_path / "dist", "qwen3", "--dst-strategy", strategy), "1_1", moments)
    flags = ["--mindspore_ckpt_dir", dist, "--src_strategy_dirs", strategy, "--output_dir", tmp_path / "out"]
    result = _script("unified_safetensors.py", *flags)
    assert result.returncode == 0, result.stderr
    unified = tmp_path / "out" / "1_1_ckpt_convert" / "unified_safe"
    assert sorted(p.name for p in unified.iterdir()) == ["hyper_param.safetensors", "param_name_map.json",
                                                         "part0.safetensors"]
    assert (tmp_path / "out" / "1_1_ckpt_convert" / "merge_strategy" / "merge_strategy.ckpt").is_file()
    weight_map = json.loads((unified / "param_name_map.json").read_text())["weight_map"]
    assert weight_map == {name: "part0.safetensors" for name in complete}
    assert_same_tensors(read_store(unified / "part0.safetensors"), complete, "unified")
    assert sorted(read_store(unified / "hyper_param.safetensors")) == sorted(moments)
    result = _script("unified_safetensors.py", *flags, "--filter_out_param_prefix", "adam_")
    assert result.returncode == 0, result.stderr
    assert "adam_m.decoder.final_layernorm.weight" not in read_store(unified / "hyper_param.safetensors")

    # redundancy-free: of the two dp replicas of every slice, only the second keeps it
    lean = without_redundancy(dist, strategy, complete, tmp_path / "lean")
    loaded = load_strategy(strategy)
    lean_flags = ["--mindspore_ckpt_dir", lean, "--src_strategy_dirs", strategy, "--has_redundancy", "False"]
    result = _script("unified_safetensors.py", *lean_flags, "--output_dir", tmp_path / "lean_out")
    assert result.returncode == 0, result.stderr
    assert_same_tensors(read_store(tmp_path / "lean_out" / "1_1_ckpt_convert" / "unified_safe" / "part0.safetensors"),
                        complete, "redundancy-free")
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    (keeper,) = {holders[-1] for ranges, holders in loaded.holders(qkv, tuple(complete[qkv].shape)).items()
                 if ranges[0][0] == 0}
    (path,) = (lean / f"rank_{keeper}").glob("*.safetensors")  # now no rank keeps the first rows of qkv
    save_file({k: v for k, v in read_store(path).items() if k != qkv}, path, metadata={"format": "ms"})
    result = _script("unified_safetensors.py", *lean_flags, "--output_dir", tmp_path / "broken")
    assert f"no rank file holds '{qkv}'" in assert_one_line_error(result.returncode, result.stderr)
    result = _script("unified_safetensors.py", *flags[:-1], tmp_path / "other", "--file_suffix", "2_2")
    assert "--file_suffix 2_2: no file(s)" in assert_one_line_error(result.returncode, result.stderr)


def test_glm_n_names_are_mindformers_chatglm_format(tmp_path):
    """`convert_weight.py --model glm-n` on a GLM-4-9B checkpoint in the ChatGLM format writes what
    MindFormers' glm2 `convert_pt_to_ms` writes with its default qkv_concat / mlp_concat: the HF
    names, `word_embeddings.weight` -> `embedding_weight`, the tensors unchanged; `--ms-naming
    legacy-split` is its qkv_concat / mlp_concat False form (np.split of query_key_value and
    dense_h_to_4h). Both convert back bit for bit, and to Megatron like the HF checkpoint does."""
    hf, state, _ = build_repacked("chatglm3", tmp_path)
    out = tmp_path / "glm.ckpt"
    result = _script("convert_weight.py", "--model", "glm-n", "--input_path", hf, "--output_path", out)
    assert result.returncode == 0, result.stderr
    expected = {name.replace("word_embeddings.weight", "embedding_weight"): tensor for name, tensor in state.items()}
    assert_same_tensors(expected, read_store(out), "glm-n as MindFormers writes it")
    back = tmp_path / "glm.bin"
    result = _script("convert_weight.py", "--model", "glm-n", "--reversed", "--input_path", out, "--output_path", back,
                     "--config", hf / "config.json")
    assert result.returncode == 0, result.stderr
    assert_same_tensors(state, torch.load(back, weights_only=True), "glm-n --reversed")

    split = hf_to_ms(hf, tmp_path / "split", "chatglm3", "--ms-naming", "legacy-split")
    q_size, kv_size, ffn = 8 * 8, 2 * 8, 96
    expected = {}
    for name, tensor in state.items():
        name = name.replace("word_embeddings.weight", "embedding_weight")
        if "query_key_value" in name:
            for part, piece in zip(("wq", "wk", "wv"), torch.split(tensor, [q_size, kv_size, kv_size])):
                expected[name.replace("query_key_value", part)] = piece
        elif "dense_h_to_4h" in name:
            for part, piece in zip(("dense_left", "dense_right"), torch.split(tensor, [ffn, ffn])):
                expected[name.replace("dense_h_to_4h", part)] = piece
        else:
            expected[name] = tensor
    assert_same_tensors(expected, read_store(split), "legacy-split")
    shutil.copy(hf / "config.json", split / "config.json")
    assert_same_tensors(state, load_hf_state(ms_to("hf", split, tmp_path / "split_back", "chatglm3")), "split back")
    for ms in (split,):
        mg = ms_to("mg", ms, tmp_path / "mg_from_ms", "chatglm3", "--target-tensor-parallel-size", "2")
        direct = hf_to_mg(hf, tmp_path / "mg_direct", "chatglm3", "--target-tensor-parallel-size", "2")
        assert_same_checkpoint(mg, direct)


def test_glm4_mcore_names_follow_mindformers_weight_mapping(tmp_path):
    """MindFormers' mcore GLM4 (`models/glm4` weight_mapping): HF `mlp.gate_up_proj` goes straight to
    `linear_fc1` (contiguous [gate; up], no interleave), the sandwich norms keep their HF names
    under `decoder.layers.`, q/k/v fuse per query group as for every mcore model."""
    from transformers import AutoModelForCausalLM, Glm4Config

    from modellink_ckpt.demo.models import randomize_

    config = Glm4Config(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=8, num_hidden_layers=2, vocab_size=503, partial_rotary_factor=0.5, pad_token_id=0,
                        eos_token_id=2, bos_token_id=1)
    hf = tmp_path / "hf"
    randomize_(AutoModelForCausalLM.from_config(config), seed=2).save_pretrained(hf)
    state = load_hf_state(hf)
    ms = read_store(hf_to_ms(hf, tmp_path / "ms", "glm4"))
    layer = "decoder.layers.1."
    assert torch.equal(ms[layer + "mlp.linear_fc1.weight"], state["model.layers.1.mlp.gate_up_proj.weight"])
    assert torch.equal(ms[layer + "post_self_attn_layernorm.weight"],
                       state["model.layers.1.post_self_attn_layernorm.weight"])
    assert torch.equal(ms[layer + "post_mlp_layernorm.weight"], state["model.layers.1.post_mlp_layernorm.weight"])
    assert torch.equal(ms[layer + "pre_mlp_layernorm.weight"], state["model.layers.1.post_attention_layernorm.weight"])
    q, k, v = (state[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    grouped = torch.cat([q.view(2, 4 * 8, -1), k.view(2, 8, -1), v.view(2, 8, -1)], 1).reshape(-1, 64)
    assert torch.equal(ms[layer + "self_attention.linear_qkv.weight"], grouped)
    shutil.copy(hf / "config.json", tmp_path / "ms" / "config.json")
    assert_same_tensors(state, load_hf_state(ms_to("hf", tmp_path / "ms", tmp_path / "back", "glm4")), "glm4 mcore")


@pytest.mark.parametrize("family", ["mixtral", "qwen25", "deepseek3"])
def test_a_transform_that_moves_rows_is_its_row_order(models, family):
    """The MindSpore loader gathers the parts of a row-moving transform (interleaved fc1, split
    QKV, stacked experts) by `ms_names.row_order` instead of running it, and the saver makes the
    MindSpore tensors by `ms_names.row_places` (`RowGather`): the same tensors both ways, for every
    naming; only a transpose (`stack_transposed`) and 1-D tensors are left to the transform."""
    from modellink_ckpt.model.families import dims_from_hf_config
    from modellink_ckpt.savers.ms import RowGather

    family_cfg = load_family(family)
    dims = dims_from_hf_config(family_cfg, json.loads((Path(models(family)) / "config.json").read_text()))
    moved = set()
    for naming_name in ms_names.NAMINGS:
        try:
            naming = ms_names.load_naming(family_cfg, naming_name)
            messages = list(ms_names.model_ms_tensors(naming, family_cfg, dims, mapping.TensorDtypes(torch.float32)))
        except UsageError:  # a legacy naming without names for this family
            continue
        for (kind, layer, tensors), (_, _, mg) in zip(messages, mapping.model_messages(family_cfg, dims, torch.float32)):
            shapes = {name: tuple(t.shape) for name, t in ms_names.global_message(kind, layer, mg).items()}
            for inst in naming.plan(kind, layer, shapes, dims):
                ms = [torch.randn(tensors[name].shape) for name in inst.ms]
                part_shapes = [shapes[name] for name in inst.mg]
                order = ms_names.row_order(inst.transform, [tuple(t.shape) for t in ms], part_shapes, dims)
                name = next(n for n, t in ms_names.TRANSFORMS.items() if t is inst.transform)
                if order is None:
                    assert name in ("rename", "stack_transposed") or any(len(s) < 2 for s in part_shapes), name
                    continue
                rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in ms])
                expected = inst.transform.from_ms(ms, part_shapes, dims)
                for part, index, shape in zip(expected, order, part_shapes):
                    assert torch.equal(rows.index_select(0, index).view(shape), part), (naming_name, inst.ms)
                made = RowGather(dims)(inst, list(expected))
                assert made is not None or name == "rename", name
                for got, want in zip(made or [], inst.transform.to_ms(list(expected), dims)):
                    assert torch.equal(got, T.as_tensor(want)), (naming_name, inst.ms)
                moved.add(name)
    assert moved >= {"mixtral": {"split_qkv", "stack", "stack_halves"},
                     "qwen25": {"interleave_halves", "split_halves", "split_qkv"},
                     "deepseek3": {"cat_rows", "interleave_halves"}}[family], moved
