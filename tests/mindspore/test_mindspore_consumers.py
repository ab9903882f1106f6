"""The real consumers of our MindSpore output: MindSpore 2.10 and MindFormers 2.1.0 (CPU), run in
their own venv (`make setup-ms`; numpy < 2, safetensors < 0.8). Slow tier: CI runs them.

- `mindspore.load_checkpoint` of every file we write returns exactly our tensors (what MindSpore
  read is written again by MindSpore's own writer and compared bit for bit);
- with hand-written strategies (mp2, dp2 x mp2 with optimizer shard, pp2 x mp2 merged), our split
  equals `mindspore.transform_checkpoints` / `transform_checkpoint_by_rank` of the same complete
  checkpoint, MindSpore merges our rank files back to it, and we merge MindSpore's;
- MindFormers builds tiny Qwen3 (mcore) and Llama (legacy) models, loads our output strictly and
  matches the HF logits; a conversion with q and k swapped is caught.
"""

import json
import shutil
from pathlib import Path

import ms_fixtures as F
import numpy as np
import pytest
import torch
from cli_process import run_script
from hf_builders import build_repacked
from ms_fixtures import LAYOUTS, hf_to_ms, ms_to, read_store, run_ms, strategy_for
from safetensors.torch import save_file
from util import ROOT, assert_same_tensors, load_hf_state

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits, sample_tokens
from modellink_ckpt.formats.ms_ckpt import write_ckpt
from modellink_ckpt.formats.ms_strategy import load_strategy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms_consumers")
    built = {}

    def get(family, dtype=torch.float32):
        if (family, dtype) not in built:
            built[family, dtype] = build_hf_checkpoint(family, root / f"{family}-{str(dtype)[6:]}", dtype=dtype,
                                                       num_layers=2, tokenizer=False)
        return built[family, dtype]
    return get


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mindspore_loads_exactly_our_tensors(tmp_path, hf_models, fmt, dtype):
    ms = hf_to_ms(hf_models("qwen3", dtype), tmp_path / "ms", "qwen3", "--ms-format", fmt)
    (ours,) = ms.glob(f"*.{fmt}")
    run_ms("resave", ours, tmp_path / "resaved.ckpt", cwd=tmp_path / "run")
    assert_same_tensors(read_store(tmp_path / "resaved.ckpt"), read_store(ms), f"{fmt} {dtype}")


def _as_mindspore_source(complete: Path, folder: Path) -> Path:
    """A complete checkpoint as MindSpore's transform tools take one: <folder>/rank_0/<file>."""
    (folder / "rank_0").mkdir(parents=True)
    for path in complete.glob("model.*"):
        shutil.copy(path, folder / "rank_0" / path.name)
    return folder


def _rank_stores(folder: Path, world: int) -> list[dict]:
    return [read_store(next((folder / f"rank_{r}").glob("*.*"))) for r in range(world)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_our_split_and_merge_equal_mindspore(tmp_path, hf_models, layout):
    hf = hf_models("qwen3")
    strategy, _ = strategy_for(tmp_path, hf, "qwen3", **LAYOUTS[layout])
    world = load_strategy(strategy).world_size
    complete = hf_to_ms(hf, tmp_path / "complete", "qwen3", "--ms-format", "ckpt")
    ours = hf_to_ms(hf, tmp_path / "ours", "qwen3", "--ms-format", "ckpt", "--dst-strategy", strategy)
    source = _as_mindspore_source(complete, tmp_path / "ms_src")
    run_ms("transform", source, tmp_path / "theirs", "none", strategy, "ckpt", cwd=tmp_path / "run")
    for rank, (a, b) in enumerate(zip(_rank_stores(ours, world), _rank_stores(tmp_path / "theirs", world))):
        assert_same_tensors(a, b, f"{layout} rank {rank}")
    run_ms("by-rank", complete / "model.ckpt", strategy, world - 1, tmp_path / "by_rank.ckpt", cwd=tmp_path / "run")
    assert_same_tensors(read_store(tmp_path / "by_rank.ckpt"), _rank_stores(ours, world)[world - 1], "by rank")
    # MindSpore merges our rank files back; we merge MindSpore's
    ours_as_source = tmp_path / "ours_src"
    shutil.copytree(ours, ours_as_source, ignore=shutil.ignore_patterns("strategy", "*.json"))
    run_ms("transform", ours_as_source, tmp_path / "merged_by_ms", strategy, "none", "ckpt", cwd=tmp_path / "run")
    full = read_store(complete)
    assert_same_tensors(read_store(next((tmp_path / "merged_by_ms" / "rank_0").glob("*.ckpt"))), full, "MindSpore merge")
    shutil.copy(complete / "config.json", tmp_path / "theirs" / "config.json")
    merged = ms_to("ms", tmp_path / "theirs", tmp_path / "merged_by_us", "qwen3", "--src-strategy", strategy,
                   "--ms-format", "ckpt")
    assert_same_tensors(read_store(merged), full, "our merge of MindSpore's rank files")


def test_pipeline_strategies_merged_by_mindspore_read_alike(tmp_path, hf_models):
    """Per-stage strategy files merged by mindspore.merge_pipeline_strategys, our merged file and
    the folder of per-stage files all describe the same layout."""
    hf = hf_models("qwen3")
    folder, _ = strategy_for(tmp_path, hf, "qwen3", pp=2, mp=2, per_stage_files=True)
    merged_by_us, _ = strategy_for(tmp_path, hf, "qwen3", pp=2, mp=2)
    run_ms("merge-strategies", folder, tmp_path / "merged_by_ms.ckpt", cwd=tmp_path / "run")
    reference = load_strategy(merged_by_us).layouts
    assert load_strategy(tmp_path / "merged_by_ms.ckpt").layouts == reference
    assert load_strategy(folder).layouts == reference


def test_mindspore_unifies_our_distributed_safetensors(tmp_path, hf_models):
    hf = hf_models("qwen3", torch.bfloat16)
    strategy, _ = strategy_for(tmp_path, hf, "qwen3", dp=2, mp=2, opt_shard=True)
    ours = hf_to_ms(hf, tmp_path / "ours", "qwen3", "--dst-strategy", strategy)
    source = tmp_path / "ours_src"
    shutil.copytree(ours, source, ignore=shutil.ignore_patterns("strategy", "*.json"))
    run_ms("unify", source, strategy, tmp_path / "unified", cwd=tmp_path / "run")
    unified = {}
    for path in sorted((tmp_path / "unified").glob("*.safetensors")):
        unified.update(read_store(path))
    full = read_store(hf_to_ms(hf, tmp_path / "complete", "qwen3"))
    assert_same_tensors({k: v for k, v in unified.items() if k in full}, full, "unified_safetensors")


def _mf_logits(tmp_path, command, hf, ckpt, *extra) -> tuple[float, float]:
    tokens = sample_tokens(503, batch=2, seq=8)
    np.save(tmp_path / "ids.npy", tokens.numpy())
    run_ms(command, Path(hf) / "config.json", ckpt, tmp_path / "ids.npy", tmp_path / "logits.npy", *extra,
           cwd=tmp_path / "run")
    reference = hf_logits(hf, tokens)
    got = torch.from_numpy(np.load(tmp_path / "logits.npy")).reshape(reference.shape)
    return (got - reference).abs().max().item(), reference.abs().max().item()


@pytest.mark.parametrize("fmt, naming", [("safetensors", "mcore"), ("ckpt", "mcore"), ("ckpt", "mcore-contiguous")])
def test_mindformers_mcore_qwen3_matches_hf(tmp_path, hf_models, fmt, naming):
    hf = hf_models("qwen3")
    ms = hf_to_ms(hf, tmp_path / "ms", "qwen3", "--ms-format", fmt, "--ms-naming", naming)
    diff, scale = _mf_logits(tmp_path, "mf-qwen3", hf, next(ms.glob(f"model.{fmt}")),
                             "contiguous" if naming == "mcore-contiguous" else "interleaved")
    print(f"MindFormers {naming} Qwen3 ({fmt}): max |logit diff| {diff:.2e} (logits up to {scale:.2f})")
    assert diff <= 5e-3  # its attention casts q/k/v to fp16 (reference notes)


def test_mindformers_catches_a_broken_conversion(tmp_path, hf_models):
    """Negative control: q and k swapped inside the fused qkv changes the logits by order 1."""
    hf = hf_models("qwen3")
    ms = hf_to_ms(hf, tmp_path / "ms", "qwen3", "--ms-format", "ckpt")
    state = read_store(ms)
    config = __import__("json").loads((Path(hf) / "config.json").read_text())
    groups, heads, d = config["num_key_value_heads"], config["num_attention_heads"], config["head_dim"]
    for name in [n for n in state if n.endswith("linear_qkv.weight")]:
        grouped = state[name].reshape(groups, (heads // groups + 2) * d, -1).clone()
        q, k = grouped[:, :d].clone(), grouped[:, heads // groups * d:(heads // groups + 1) * d].clone()
        grouped[:, :d], grouped[:, heads // groups * d:(heads // groups + 1) * d] = k, q
        state[name] = grouped.reshape(state[name].shape)
    write_ckpt(tmp_path / "broken.ckpt", state)
    diff, _ = _mf_logits(tmp_path, "mf-qwen3", hf, tmp_path / "broken.ckpt")
    assert diff > 0.1, diff


@pytest.mark.parametrize("naming", ["legacy", "legacy-concat"])
def test_mindformers_legacy_llama_matches_hf(tmp_path, hf_models, naming):
    hf = hf_models("llama2")
    ms = hf_to_ms(hf, tmp_path / "ms", "llama2", "--ms-format", "ckpt", "--ms-naming", naming)
    diff, scale = _mf_logits(tmp_path, "mf-llama", hf, ms / "model.ckpt",
                             "concat" if naming == "legacy-concat" else "plain")
    print(f"MindFormers legacy Llama ({naming}): max |logit diff| {diff:.2e} (logits up to {scale:.2f})")
    assert diff <= 1e-4
    back = ms_to("hf", ms, tmp_path / "back", "llama2")
    assert_same_tensors(load_hf_state(hf), load_hf_state(back), naming)


def test_mindformers_glm_n_loads_strictly(tmp_path):
    """`convert_weight.py --model glm-n` output (GLM-4-9B in the ChatGLM format) loads strictly, every
    name and shape, into MindFormers' ChatGLM2 model as its glm-n configs build it (qkv_concat,
    mlp_concat). Its CPU logits are not compared: they differ from transformers' GLM for the same
    weights even at position 0, for a reason not found yet."""
    import subprocess
    import sys


    hf, _, _ = build_repacked("chatglm3", tmp_path)
    ckpt = tmp_path / "glm.ckpt"
    result = subprocess.run([sys.executable, str(ROOT / "convert_weight.py"), "--model", "glm-n", "--input_path", hf,
                             "--output_path", ckpt, "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    np.save(tmp_path / "ids.npy", sample_tokens(503, batch=2, seq=8).numpy())
    run_ms("mf-glm", hf / "config.json", ckpt, tmp_path / "ids.npy", tmp_path / "logits.npy", cwd=tmp_path / "run")
    assert (tmp_path / "logits.npy").is_file()  # built, loaded strictly (else it exits non-zero), ran


@pytest.mark.parametrize("style, naming, family, targets", [
    ("mcore", "mcore", "qwen3", "MCORE_TARGETS"), ("mindpet", "legacy", "llama2", "LEGACY_TARGETS")])
def test_our_lora_merge_equals_mindformers_tool(tmp_path, hf_models, style, naming, family, targets):
    """MindFormers' own tools/transform_ckpt_lora.py and our merge give the same weights."""
    ms = hf_to_ms(hf_models(family), tmp_path / "ms", family, "--ms-format", "ckpt", "--ms-naming", naming)
    F.add_adapters(ms, style, getattr(F, targets))
    run_ms("lora-merge", ms / "model.ckpt", tmp_path / "theirs", "4", cwd=tmp_path / "run")
    ours = ms_to("ms", ms, tmp_path / "ours", family, "--lora-scaling", "4", "--ms-format", "ckpt", "--ms-naming", naming)
    theirs = read_store(next((tmp_path / "theirs").glob("*.ckpt")))
    assert_same_tensors(read_store(ours), theirs, f"{style} merge")
    # the same command line, run by our drop-in: the same file, the same tensors
    (tmp_path / "dropin").mkdir()
    result = run_script(ROOT / "transform_ckpt_lora.py", ["--src_ckpt_path_or_dir", ms / "model.ckpt", "--dst_ckpt_dir",
                                                          tmp_path / "dropin", "--lora_scaling", "4"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "theirs").glob("*.ckpt")) == \
        sorted(p.name for p in (tmp_path / "dropin").glob("*.ckpt")) == ["merged_lora.ckpt"]
    assert_same_tensors(read_store(tmp_path / "dropin" / "merged_lora.ckpt"), theirs, f"{style} drop-in")


def test_mindformers_checkpoint2_in_and_out(tmp_path, hf_models):
    """MindFormers' own training checkpoint (Checkpoint 2.0, `save_checkpoint` with an AdamW
    optimizer, a model MindFormers built and initialised) converts to HF whose transformers
    logits are MindFormers' own; converted back to Checkpoint 2.0 (iteration kept), MindFormers'
    `load_checkpoint` fills every parameter from it and gives the same logits."""
    config = hf_models("qwen3") / "config.json"
    tokens = sample_tokens(503, batch=2, seq=8)
    np.save(tmp_path / "ids.npy", tokens.numpy())
    run_ms("mf-save-checkpoint2", config, tmp_path / "ids.npy", tmp_path / "mf", tmp_path / "mf_logits.npy",
           cwd=tmp_path / "run")
    theirs = torch.from_numpy(np.load(tmp_path / "mf_logits.npy")).reshape(2, 8, -1)

    hf = ms_to("hf", tmp_path / "mf", tmp_path / "hf", "qwen3", "--hf-cfg-dir", config.parent)
    diff = (hf_logits(hf, tokens) - theirs).abs().max().item()
    print(f"MindFormers Checkpoint 2.0 -> HF: max |logit diff| {diff:.2e}")
    assert diff <= 5e-3

    back = ms_to("ms", tmp_path / "mf", tmp_path / "c2", "qwen3", "--hf-cfg-dir", config.parent,
                 "--ms-format", "checkpoint2")
    assert (back / "latest_checkpointed_iteration.txt").read_text() == "3"
    run_ms("mf-load-checkpoint2", config, back, tmp_path / "ids.npy", tmp_path / "back_logits.npy",
           cwd=tmp_path / "run")
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "back_logits.npy")).reshape(2, 8, -1), theirs)

    # the same iteration as four ranks (dp 2 x mp 2) save it, metadata.json by MindFormers' own writer:
    # MindFormers reassembles it to the same logits, and so do we, to the same tensors
    run_ms("mf-split-checkpoint2", tmp_path / "mf", tmp_path / "mf4", cwd=tmp_path / "run")
    run_ms("mf-load-checkpoint2", config, tmp_path / "mf4", tmp_path / "ids.npy", tmp_path / "mf4_logits.npy",
           cwd=tmp_path / "run")
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "mf4_logits.npy")).reshape(2, 8, -1), theirs)
    four = ms_to("hf", tmp_path / "mf4", tmp_path / "hf4", "qwen3", "--hf-cfg-dir", config.parent)
    assert_same_tensors(load_hf_state(hf), load_hf_state(four), "four ranks")


def test_our_unified_safetensors_equals_mindspore(tmp_path, hf_models):
    """`unified_safetensors.py` (ours) and `mindspore.unified_safetensors` on the same rank files
    of a training step, with and without redundancy: the same part files, names, tensors, weight
    map and hyper parameters."""
    hf = hf_models("qwen3", torch.bfloat16)
    strategy, _ = strategy_for(tmp_path, hf, "qwen3", dp=2, mp=2)
    dist = F.as_training_rank_files(hf_to_ms(hf, tmp_path / "dist", "qwen3", "--dst-strategy", strategy), "1_1",
                                    {"global_step": torch.tensor([7.0])})
    # and as a redundancy-free save leaves it (each replicated slice on one rank)
    lean = F.without_redundancy(dist, strategy, read_store(hf_to_ms(hf, tmp_path / "complete", "qwen3")),
                                tmp_path / "lean")
    for source, redundancy in ((dist, "True"), (lean, "False")):
        theirs = tmp_path / f"theirs-{redundancy}"
        run_ms("unify", source, strategy, theirs, redundancy, cwd=tmp_path / "run")
        result = run_script(ROOT / "unified_safetensors.py",
                            ["--mindspore_ckpt_dir", source, "--src_strategy_dirs", strategy, "--has_redundancy",
                             redundancy, "--output_dir", tmp_path / f"out-{redundancy}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        ours = tmp_path / f"out-{redundancy}" / "1_1_ckpt_convert" / "unified_safe"
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
        for name in sorted(p.name for p in theirs.glob("*.safetensors")):
            assert_same_tensors(read_store(ours / name), read_store(theirs / name), f"{name} ({redundancy})")
        assert json.loads((ours / "param_name_map.json").read_text()) == \
            json.loads((theirs / "param_name_map.json").read_text())


def test_unified_safetensors_of_a_pipeline_run_takes_its_strategy_folder(tmp_path, hf_models):
    """A pipeline run (pp2 x mp2) leaves one strategy file per stage: `--src_strategy_dirs` takes
    that folder, our `merge_strategy.ckpt` lays out what `mindspore.merge_pipeline_strategys`
    does, and the parts equal `mindspore.unified_safetensors` given MindSpore's merged file."""
    hf = hf_models("qwen3")
    folder, _ = strategy_for(tmp_path, hf, "qwen3", pp=2, mp=2, per_stage_files=True)
    dist = F.as_training_rank_files(hf_to_ms(hf, tmp_path / "dist", "qwen3", "--dst-strategy", folder), "1_1")
    run_ms("merge-strategies", folder, tmp_path / "merged_by_ms.ckpt", cwd=tmp_path / "run")
    run_ms("unify", dist, tmp_path / "merged_by_ms.ckpt", tmp_path / "theirs", cwd=tmp_path / "run")
    result = run_script(ROOT / "unified_safetensors.py", ["--mindspore_ckpt_dir", dist, "--src_strategy_dirs", folder,
                                                          "--output_dir", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = tmp_path / "out" / "1_1_ckpt_convert"
    assert load_strategy(ours / "merge_strategy" / "merge_strategy.ckpt").layouts == \
        load_strategy(tmp_path / "merged_by_ms.ckpt").layouts
    theirs = tmp_path / "theirs"
    assert sorted(p.name for p in (ours / "unified_safe").iterdir()) == sorted(p.name for p in theirs.iterdir())
    for name in sorted(p.name for p in theirs.glob("*.safetensors")):
        assert_same_tensors(read_store(ours / "unified_safe" / name), read_store(theirs / name), name)


def test_unified_safetensors_leaves_out_what_the_prefix_names_as_mindspore_does(tmp_path, hf_models):
    """Optimizer moments laid out like their weights (`adam_m.*` in the strategy and in every rank
    file): `--filter_out_param_prefix adam_` gives the parts and weight map MindSpore's merge gives
    with MindFormers' prefix filter. (MindSpore also copies rank 0's filtered slices into
    hyper_param.safetensors; ours keeps them out, as the filter asks.)"""
    hf = hf_models("qwen3")
    plain, entries = strategy_for(tmp_path, hf, "qwen3", dp=2, mp=2)
    strategy = F.write_model_strategy(tmp_path / "with_moments.ckpt",
                                      entries + [(f"adam_m.{name}", shape) for name, shape in entries], 2, dp=2, mp=2)
    dist = F.as_training_rank_files(hf_to_ms(hf, tmp_path / "dist", "qwen3", "--dst-strategy", plain), "1_1")
    for folder in sorted(dist.glob("rank_*")):
        (path,) = folder.glob("*.safetensors")
        state = read_store(path)
        save_file({**state, **{f"adam_m.{k}": v * 0.5 for k, v in state.items()}}, path, metadata={"format": "ms"})
    run_ms("unify", dist, strategy, tmp_path / "theirs", "True", "adam_", cwd=tmp_path / "run")
    result = run_script(ROOT / "unified_safetensors.py", ["--mindspore_ckpt_dir", dist, "--src_strategy_dirs", strategy,
                                                          "--filter_out_param_prefix", "adam_",
                                                          "--output_dir", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours, theirs = tmp_path / "out" / "1_1_ckpt_convert" / "unified_safe", tmp_path / "theirs"
    for name in sorted(p.name for p in theirs.glob("part*.safetensors")):
        assert_same_tensors(read_store(ours / name), read_store(theirs / name), name)
    assert json.loads((ours / "param_name_map.json").read_text()) == \
        json.loads((theirs / "param_name_map.json").read_text())
    assert not any(name.startswith("adam_") for name in read_store(ours / "part0.safetensors"))
