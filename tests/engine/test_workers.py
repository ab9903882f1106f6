"""--workers N: several loader -> saver pairs, each writing its share of the target (pipeline
stages or rank files of a Megatron target, torch or torch_dist; source stages of an HF target or
of complete MindSpore safetensors; ranks of a distributed MindSpore target). The output is the same
bytes whatever N (manifests equal, with more than one worker really run), a failing worker stops
every worker and publishes nothing, and what cannot be shared is refused by name."""

import json
import re

import pytest
from ms_fixtures import LAYOUTS, strategy_for
from util import assert_one_line_error, cli_argv, hf_to_mg, looks_complete, run_argv, run_cli, staging_leftovers

from modellink_ckpt.demo.models import build_hf_checkpoint
from modellink_ckpt.engine.workers import Share, source_stages_of, stage_shares
from modellink_ckpt.model.layout import ParallelLayout


def _convert(*argv, workers: int):
    """`convert_ckpt.py ... --workers N` as a user runs it; asserts that it succeeded and that more
    than one worker ran when more were asked (same bytes from a single worker would prove nothing)."""
    result = run_cli(*argv, "--workers", workers)
    assert result.returncode == 0, result.stderr
    ran = re.search(r", (\d+) workers, ", result.stdout)
    assert (ran is not None and int(ran.group(1)) > 1) == (workers > 1), result.stdout
    return result


def _files(mg):
    """{rank file: (bytes, digest)} of a Megatron target's manifest."""
    (manifest,) = mg.glob("iter_*/convert_manifest.json")
    return json.loads(manifest.read_text())["files"]


def test_stage_shares_are_balanced_contiguous_and_follow_the_source_stages():
    target = ParallelLayout.build(22, tp=2, pp=4, num_layer_list="6,6,5,5")
    assert stage_shares(target, 1) == [(0, 1, 2, 3)]
    assert stage_shares(target, 2) == [(0, 1), (2, 3)]
    assert stage_shares(target, 3) == [(0,), (1, 2), (3,)]
    assert stage_shares(target, 8) == [(0,), (1,), (2,), (3,)]
    # from a Megatron source every source stage is read by one worker: PP2 (11 + 11 layers) -> PP4
    # 6,6,5,5 shares target stage 1 between both source stages, so the stages stay together
    assert stage_shares(target, 4, ParallelLayout.build(22, pp=2)) == [(0, 1, 2, 3)]
    aligned = ParallelLayout.build(24, pp=4)
    assert stage_shares(aligned, 4, ParallelLayout.build(24, pp=2)) == [(0, 1), (2, 3)]
    share = Share(1, 2, (2, 3), "")
    assert source_stages_of(share, aligned, ParallelLayout.build(24, pp=2)) == {1}
    # virtual pipeline: a stage's chunks are not contiguous, a share still holds whole stages
    assert stage_shares(ParallelLayout.build(8, pp=2, vpp_layers=2), 2) == [(0,), (1,)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    return {family: build_hf_checkpoint(family, root / family, num_layers=4, tokenizer=False)
            for family in ("llama2", "qwen25-tied", "mixtral")}


@pytest.mark.parametrize("family,layout", [
    ("llama2", ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "4")),
    ("qwen25-tied", ("--target-pipeline-parallel-size", "4")),  # the last stage's copy of the embedding
    ("llama2", ("--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1")),
    ("mixtral", ("--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2")),
    # PP1: more workers than stages share the rank files, each reading every layer
    ("llama2", ("--target-tensor-parallel-size", "4")),
    ("mixtral", ("--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2")),
    # torch_dist: one data file, each worker writing its stages' chunks at their planned places
    ("llama2", ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "4", "--ckpt-format",
                "torch_dist")),
    ("qwen25-tied", ("--target-pipeline-parallel-size", "4", "--ckpt-format", "torch_dist")),
    ("mixtral", ("--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2", "--ckpt-format",
                 "torch_dist")),
    ("llama2", ("--target-tensor-parallel-size", "2", "--ckpt-format", "torch_dist")),  # PP1: by layers
], ids=["dense-tp2pp4", "tied-pp4", "vpp", "moe-ep2pp2", "by-rank-tp4", "by-rank-moe-tp2ep2", "torch_dist-tp2pp4",
        "torch_dist-tied-pp4", "torch_dist-moe-ep2pp2", "torch_dist-tp2pp1"])
def test_hf_to_mg_is_the_same_bytes_for_any_number_of_workers(tmp_path, models, family, layout):
    flag = {"qwen25-tied": "qwen25"}.get(family, family)
    flags = ("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", flag,
             "--load-dir", models[family], *layout)
    for n in (1, 2, 3):
        _convert(*flags, "--save-dir", tmp_path / f"w{n}", workers=n)
        assert _files(tmp_path / f"w{n}") == _files(tmp_path / "w1"), n


@pytest.mark.parametrize("source_format,ckpt_format", [("torch", "torch"), ("torch", "torch_dist"),
                                                        ("torch_dist", "torch")])
def test_mg_to_mg_is_the_same_bytes_for_any_number_of_workers(tmp_path, models, source_format, ckpt_format):
    """A torch_dist source reads as one TP1 PP1 rank: the target's rank files are shared, and one
    worker reads (and checks) the whole store."""
    source = hf_to_mg(models["mixtral"], tmp_path / "src", "mixtral", "--target-tensor-parallel-size", "2",
                      "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2",
                      "--ckpt-format", source_format)
    layout = ("--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "4",
              "--target-expert-parallel-size", "1", "--ckpt-format", ckpt_format)
    flags = ("--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", source)
    outputs = {}
    for n in (1, 2, 3):
        _convert(*flags, "--save-dir", tmp_path / f"w{n}", *layout, workers=n)
        outputs[n] = _files(tmp_path / f"w{n}")
    assert outputs[1] == outputs[2] == outputs[3]


def test_a_failing_worker_stops_all_and_publishes_nothing(tmp_path, models):
    """An unexplained tensor in the source's second stage: the worker reading it stops the run,
    with one line naming the file and the worker; no target, no staging left."""
    import torch

    source = hf_to_mg(models["llama2"], tmp_path / "src", "llama2", "--target-pipeline-parallel-size", "2")
    victim = source / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = torch.load(victim, weights_only=False)
    state["model"]["decoder.layers.0.mystery.weight"] = torch.zeros(3)
    torch.save(state, victim)

    strategy, _ = strategy_for(tmp_path, models["llama2"], "llama2", mp=2)
    for save_type in ("mg", "hf", "ms"):
        save = tmp_path / f"out-{save_type}"
        layout = {"mg": ("--target-pipeline-parallel-size", "2"), "hf": (), "ms": ("--dst-strategy", strategy)}
        result = run_argv(cli_argv("mg", save_type, source, save, *layout[save_type], "--workers", "2"))
        line = assert_one_line_error(result.returncode, result.stderr, f"worker failure ({save_type})")
        assert "mystery" in line and "mp_rank_00_001" in line and "worker 2/2" in line, line
        assert not looks_complete(save) and not staging_leftovers(save) and not staging_leftovers(save / "mg2hf")


@pytest.mark.parametrize("family,pp", [("llama2", 4), ("qwen25-tied", 4), ("mixtral", 4), ("llama2", 1)])
def test_mg_to_hf_is_the_same_bytes_for_any_number_of_workers(tmp_path, models, family, pp):
    """An HF target: each worker writes the tensors of some layers at their planned places in the
    planned shards (from a PP1 source too: one worker reads and checks the whole source stage);
    the parent hashes the shards."""
    flag = {"qwen25-tied": "qwen25"}.get(family, family)
    ep = ("--target-expert-parallel-size", "2") if family == "mixtral" else ()
    source = hf_to_mg(models[family], tmp_path / "src", flag, "--target-tensor-parallel-size", "2",
                      "--target-pipeline-parallel-size", str(pp), *ep)
    for shard_size, shards in (("5GB", 1), ("100KB", 4)):  # one file every worker writes into; many
        manifests = {}
        for n in (1, 2, 3):
            save = tmp_path / f"{shard_size}-w{n}"
            _convert("--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", "hf",
                     "--model-type-hf", flag, "--load-dir", source, "--save-dir", save,
                     "--max-shard-size", shard_size, workers=n)
            manifests[n] = json.loads((save / "mg2hf" / "convert_manifest.json").read_text())["files"]
        assert len([name for name in manifests[1] if name.endswith(".safetensors")]) >= shards
        assert manifests[1] == manifests[2] == manifests[3], shard_size


@pytest.mark.slow
@pytest.mark.parametrize("load_type,save_type,flags", [
    ("hf", "mg", ("--target-tensor-parallel-size", "2")),  # 2 rank files
    ("mg", "hf", ()),  # 6 messages: shares of the embedding alone and of the head alone
    ("hf", "ms", ()),  # complete MindSpore safetensors, by message like HF
], ids=["by-rank", "hf-by-message", "ms-by-message"])
def test_more_workers_than_the_target_has_parts_write_what_one_writes(tmp_path, models, load_type, save_type, flags):
    """--workers 64 on a 4-layer model: the count is cut to the parts there are, and every share,
    also one without a layer, writes exactly what one worker writes."""
    source = models["llama2"] if load_type == "hf" else \
        hf_to_mg(models["llama2"], tmp_path / "src", "llama2", "--target-pipeline-parallel-size", "4")
    manifests = {}
    for n in (1, 64):
        save = tmp_path / f"w{n}"
        _convert("--model-type", "GPT", "--load-model-type", load_type, "--save-model-type", save_type,
                 "--load-dir", source, "--save-dir", save, *flags, workers=n)
        (manifest,) = save.rglob("convert_manifest.json")
        manifests[n] = json.loads(manifest.read_text())["files"]
    assert manifests[64] == manifests[1]


def test_workers_below_one_are_refused(tmp_path, models):
    result = run_argv(cli_argv("hf", "mg", models["llama2"], tmp_path / "out", "--target-pipeline-parallel-size",
                                     "2", "--workers", "0"))
    line = assert_one_line_error(result.returncode, result.stderr, "refused")
    assert "--workers 0: must be at least 1" in line, line


@pytest.mark.parametrize("save_type,flags,expected", [
    ("ms", ("--ms-format", "ckpt", "--workers", "2"),
     "note: --workers 2: running 1; a complete MindSpore ckpt target is written by one process"),
    ("mg", ("--workers", "64"), "note: --workers 64: running 2; the target has 2 parts that workers can write side by side"),
])
def test_fewer_workers_than_asked_run_and_say_so_in_one_line(tmp_path, models, save_type, flags, expected):
    """One rule for every target: as many workers as it has parts (one where it cannot be shared),
    said in one line, and the conversion goes on."""
    layout = ("--target-pipeline-parallel-size", "2") if save_type == "mg" else ()
    result = run_argv(cli_argv("hf", save_type, models["llama2"], tmp_path / "out", *layout, *flags))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: --workers")]
    assert len(notes) == 1 and notes[0].startswith(expected), notes


def test_dry_run_shows_each_workers_stages(tmp_path, models):
    result = run_argv(cli_argv("hf", "mg", models["llama2"], tmp_path / "out", "--target-pipeline-parallel-size",
                                     "4", "--workers", "3", "--dry-run"))
    assert result.returncode == 0, result.stderr
    assert "workers: 3, writing stages 0 | 1,2 | 3" in result.stdout, result.stdout
    result = run_argv(cli_argv("hf", "mg", models["mixtral"], tmp_path / "out", "--target-tensor-parallel-size",
                                     "2", "--target-expert-parallel-size", "2", "--workers", "3", "--dry-run",
                                     "--model-type-hf", "mixtral"))
    assert result.returncode == 0, result.stderr
    assert "workers: 3, writing rank files (tp.pp.ep) 0.0.0 | 1.0.0,0.0.1 | 1.0.1" in result.stdout, result.stdout
    # more workers than messages: one share each, some with no layer at all
    result = run_argv(cli_argv("hf", "mg", models["llama2"], tmp_path / "out", "--ckpt-format", "torch_dist",
                                     "--workers", "64", "--dry-run"))
    assert result.returncode == 0, result.stderr
    assert "workers: 6, writing embedding | layer 0 | layer 1 | layer 2 | layer 3 | head\n" in result.stdout, \
        result.stdout
    assert not (tmp_path / "out").exists()


def test_a_share_by_message_names_what_it_holds():
    def share(*parts):
        return Share(0, 2, (), "", parts=parts, by_message=True)

    assert share(("embeddings", None)).describe() == "embedding"
    assert share(("tail", None)).describe() == "head"
    assert share(("embeddings", None), ("layer", 0)).describe() == "embedding, layer 0"
    assert share(("layer", 1), ("layer", 2), ("layer", 3), ("tail", None)).describe() == "layers 1-3, head"


@pytest.mark.parametrize("source_type", ["hf", "mg"])
@pytest.mark.parametrize("layout,fmt", [("mp2", "ckpt"), ("pp2mp2", "safetensors"), ("dp2mp2-opt", "ckpt")])
def test_distributed_mindspore_target_is_the_same_bytes_for_any_number_of_workers(tmp_path, models, source_type,
                                                                                   layout, fmt):
    """A MindSpore target split by a strategy is shared by rank: each worker writes some ranks' files
    (from a Megatron source each source stage is read whole by one worker, also where the
    strategy's stages cut across the source's)."""
    from modellink_ckpt.formats.ms_strategy import load_strategy

    strategy, _ = strategy_for(tmp_path, models["mixtral"], "mixtral", **LAYOUTS[layout])
    source = models["mixtral"] if source_type == "hf" else \
        hf_to_mg(models["mixtral"], tmp_path / "src", "mixtral", "--target-pipeline-parallel-size", "4",
                 "--target-expert-parallel-size", "2")
    manifests = {}
    for n in (1, 2, 3):
        save = tmp_path / f"w{n}"
        _convert("--model-type", "GPT", "--load-model-type", source_type, "--save-model-type", "ms",
                 "--model-type-hf", "mixtral", "--load-dir", source, "--save-dir", save,
                 "--dst-strategy", strategy, "--ms-format", fmt, workers=n)
        manifests[n] = json.loads((save / "convert_manifest.json").read_text())
        del manifests[n]["created"]
        assert not staging_leftovers(save)
    world = load_strategy(strategy).world_size
    assert world > 1 and len([name for name in manifests[1]["files"] if name.startswith("rank_")]) == world
    assert manifests[1] == manifests[2] == manifests[3]


@pytest.mark.parametrize("source_type", ["hf", "mg"])
def test_complete_mindspore_safetensors_is_the_same_bytes_for_any_number_of_workers(tmp_path, models, source_type):
    """Complete MindSpore safetensors: shared by layers like an HF target, in one file every worker
    writes into and in many shards (with their name map)."""
    source = models["mixtral"] if source_type == "hf" else \
        hf_to_mg(models["mixtral"], tmp_path / "src", "mixtral", "--target-pipeline-parallel-size", "4",
                 "--target-expert-parallel-size", "2")
    for shard_size, shards in (("5GB", 1), ("100KB", 4)):
        manifests = {}
        for n in (1, 2, 3):
            save = tmp_path / f"{shard_size}-w{n}"
            _convert("--model-type", "GPT", "--load-model-type", source_type, "--save-model-type", "ms",
                     "--model-type-hf", "mixtral", "--load-dir", source, "--save-dir", save,
                     "--max-shard-size", shard_size, workers=n)
            manifests[n] = json.loads((save / "convert_manifest.json").read_text())["files"]
        assert len([name for name in manifests[1] if name.endswith(".safetensors")]) >= shards
        assert ("param_name_map.json" in manifests[1]) == (shards > 1)
        assert manifests[1] == manifests[2] == manifests[3], shard_size
