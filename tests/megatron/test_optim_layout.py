"""Distributed-optimizer checkpoints (`distrib_optim.pt`) against megatron-core itself.

Fixtures are written by megatron-core 0.16.1's own DDP + DistributedOptimizer after real Adam steps
(`optim_fixtures`). Checked here, through `modellink_ckpt.formats.megatron.optim_layout`:

- the replayed grad-buffer layout equals the one megatron built (every parameter's place, every
  bucket), with several buckets and parameters whose sizes are not multiples of 64;
- reading: every parameter's fp32 master weight, exp_avg and exp_avg_sq recovered from the file
  equal the live optimizer's state, exactly (dense DP2; MoE EP2 with its [dense, expert] list and
  the None dense entry in the EP rank 1 file; bf16 params with fp32 master weights);
- writing the same layout back gives the same vectors (gaps included) and torch.load(weights_only)
  reads it;
- resharding (DP2 -> DP1 with another bucketing, DP1 -> DP2, TP2 -> TP1, PP2 -> PP1, EP2 -> EP1):
  the written distrib_optim.pt is loaded by megatron-core at the target layout with its own
  `load_parameter_state`; every parameter's state equals the source's mapped through the layout
  change (exact), and one more training step on the same global batch gives the same losses
  (before and after the update) within 1e-5.

The resharding is the converter's own (`convert_ckpt.py --load-model-type optim --save-model-type
mg`); the expected per-parameter state comes from reading the source files here, independently of
the pipeline, and is re-split with the TP rules for the comparison. HF output from optim must be
the fp32 master weights (cast as asked), not the model file's bf16 copies.

Timings on 2 shared, busy cores: the default run (pure tests + the dense DP2 fixture, its DP1
resume) ~30 s; `--run-slow` (16 tests, worlds up to 4) ~6 min, 15-55 s per megatron case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
from pathlib import Path

import optim_fixtures as F
import pytest
import torch
from util import ROOT, assert_one_line_error, load_hf_state, load_mg_state, run_cli, run_convert

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.formats.megatron import optim_layout as OL
from modellink_ckpt.formats.torch_zip import LazyTensor, load_lazy, loaded
from modellink_ckpt.model import transforms as T

LOSS_TOL = 1e-5
DENSE = F.Spec()  # fp32, TP1 PP1 DP2, overlap_grad_reduce, bucket_size 20000 -> 7 buckets


@pytest.fixture(scope="module")
def fixtures():
    made = {}

    def get(spec: F.Spec) -> Path:
        if spec not in made:
            made[spec] = F.make_fixture(spec)
        return made[spec]

    yield get
    for folder in made.values():
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def scratch(tmp_path):
    return tmp_path


# ----------------------------------------------------------------------------- reading a checkpoint


def iter_dir(ckpt: Path) -> Path:
    return ckpt / f"iter_{F.ITERATION:07d}"


def rank_folder(ckpt: Path, spec: F.Spec, tp: int, pp: int, ep: int) -> Path:
    return iter_dir(ckpt) / F.rank_dir_name(tp, pp, ep, spec.pp, spec.ep)


def model_key(spec: F.Spec, chunk: int) -> str:
    return "model" if spec.chunks == 1 else f"model{chunk}"


def read_rank(folder: Path, spec: F.Spec, pp: int):
    """(model file object, layout, entries) of one rank folder, through optim_layout only."""
    model_file = load_lazy(folder / OL.MODEL_FILE)
    args = model_file["args"]
    settings = OL.DdpSettings.from_args(args, source=str(folder))
    chunks = [OL.chunk_params(model_file[model_key(spec, v)], tied=not args.untie_embeddings_and_output_weights,
                              pp_size=args.pipeline_model_parallel_size, pp_rank=pp, chunk=v,
                              num_chunks=spec.chunks, expert_parallel=args.expert_model_parallel_size > 1)
              for v in range(spec.chunks)]
    entries = OL.optimizer_entries(OL.load_optim_file(folder / OL.OPTIM_FILE), source=str(folder),
                                   expected=2 if args.num_experts and args.expert_model_parallel_size > 1 else 1)
    layout = OL.match_layout(entries, chunks, settings, pp_rank=pp, source=str(folder))
    return model_file, layout, entries


def ranks_of(spec: F.Spec):
    for tp in range(spec.tp):
        for pp in range(spec.pp):
            for ep in range(spec.ep):
                yield tp, pp, ep


def check_read_exact(ckpt_root: Path, spec: F.Spec) -> int:
    """Every parameter's state from the files == the live optimizer's (exact); returns the count."""
    live = F.full_live_state(F.load_live(ckpt_root))
    dumps = F.load_live(ckpt_root)
    model_params = {}
    for dump in dumps:
        r = dump["ranks"]
        model_params.setdefault((r["tp"], r["pp"], r["ep"]), {}).update(dump["model_params"])
    checked = 0
    for tp, pp, ep in ranks_of(spec):
        folder = rank_folder(ckpt_root / "ckpt", spec, tp, pp, ep)
        _model, layout, entries = read_rank(folder, spec, pp)
        present = [i for i, e in enumerate(entries) if e is not None]
        assert present == [i for i, p in enumerate(OL.megatron_presence(ep, len(entries))) if p]
        expected = live[(tp, pp, ep)]
        seen = set()
        for opt, chunk, name, state in OL.read_param_states(folder / OL.OPTIM_FILE, layout, entries,
                                                            optimizers=present):
            ref = expected[(chunk, name)]
            for key in OL.STATE_KEYS:
                assert torch.equal(state[key], ref[key]), f"{folder.name} {name} {key}"
            if spec.dtype == "bf16":  # the model holds bf16 copies of the fp32 master weights
                weight = model_params[(tp, pp, ep)][(chunk, name)]
                assert torch.equal(state["param"].to(torch.bfloat16).float(), weight), name
            seen.add((chunk, name))
            checked += 1
        expert = (lambda name: spec.ep > 1 and OL.is_expert_name(name))
        wanted = {k for k in expected if (1 if expert(k[1]) else 0) in present}
        assert seen == wanted, f"{folder.name}: read {len(seen)} parameters, live {len(wanted)}"
    return checked


def check_replay_equals_megatron(ckpt_root: Path, spec: F.Spec) -> None:
    """optim_layout's replay == the buffers megatron built (offsets, buckets), for every rank."""
    for dump in F.load_live(ckpt_root):
        r = dump["ranks"]
        folder = rank_folder(ckpt_root / "ckpt", spec, r["tp"], r["pp"], r["ep"])
        _model, layout, _entries = read_rank(folder, spec, r["pp"])
        assert len(layout.optimizers) == len(dump["layouts"])
        for buffers, live_buffers in zip(layout.optimizers, dump["layouts"]):
            assert len(buffers) == len(live_buffers)
            for buffer, live in zip(buffers, live_buffers):
                assert buffer.chunk == live["chunk"] and buffer.dtype_key == live["key"]
                assert list(buffer.bucket_numel_unpadded) == [b[2] for b in live["buckets"]]
                assert buffer.numel_unpadded == live["numel_unpadded"]
                assert buffer.padded_numel(spec.dp if not buffer.is_expert else spec.dp // spec.ep) == live["numel"]
                file_base = [sum(b[2] for b in live["buckets"][:i]) for i in range(len(live["buckets"]))]
                want = {name: (file_base[bucket] + start - live["buckets"][bucket][0],
                               file_base[bucket] + end - live["buckets"][bucket][0], bucket)
                        for name, start, end, bucket in live["params"]}
                got = {s.name: (s.start, s.stop, s.bucket) for s in buffer.slots}
                assert got == want
                assert [s.name for s in buffer.slots] == [p[0] for p in live["params"]]


# ----------------------------------------------------------------------------- test-side resharder

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def tp_kind(name: str) -> str:
    if name.endswith("linear_fc1.weight"):
        return "gated_column"
    if name.endswith(("linear_qkv.weight", "word_embeddings.weight")) or name == "output_layer.weight":
        return "column"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    return "replicated"


def stage_layers(spec: F.Spec, pp: int, chunk: int) -> list[int]:
    """Global layers of (pp, chunk), uniform PP / VPP."""
    if spec.vpp_layers:
        virtual = chunk * spec.pp + pp
        return list(range(virtual * spec.vpp_layers, (virtual + 1) * spec.vpp_layers))
    per = spec.num_layers // spec.pp
    return list(range(pp * per, (pp + 1) * per))


def to_global(name: str, spec: F.Spec, pp: int, chunk: int, ep: int) -> str:
    """The layout-free name: global layer and expert indices; a tied output layer (PP > 1, a copy
    of the embedding kept in step by megatron) is the embedding."""
    if spec.tied and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    match = _LAYER.match(name)
    if not match:
        return name
    layer = stage_layers(spec, pp, chunk)[int(match.group(1))]
    rel = match.group(2)
    expert = _EXPERT.match(rel)
    if expert:
        rel = f"{expert.group(1)}{ep * (spec.experts // spec.ep) + int(expert.group(2))}{expert.group(3)}"
    return f"decoder.layers.{layer}.{rel}"


def read_full(ckpt: Path, spec: F.Spec):
    """Whole (TP-merged, global layer / expert) tensors: {global name: {param, exp_avg, exp_avg_sq,
    weight}}, plus the source's ParamOrder, 'optimizer' and 'opt_param_scheduler' entries."""
    shards: dict[str, dict[int, dict]] = {}
    dicts, optimizer, scheduler = [], None, None
    for tp, pp, ep in ranks_of(spec):
        folder = rank_folder(ckpt, spec, tp, pp, ep)
        model_file, layout, entries = read_rank(folder, spec, pp)
        dicts += [model_file[model_key(spec, v)] for v in range(spec.chunks)]
        if optimizer is None:
            optimizer, scheduler = model_file["optimizer"], model_file["opt_param_scheduler"]
        present = [i for i, e in enumerate(entries) if e is not None]
        for _opt, chunk, name, state in OL.read_param_states(folder / OL.OPTIM_FILE, layout, entries,
                                                             optimizers=present):
            weight = model_file[model_key(spec, chunk)][name]
            state["weight"] = weight.load() if isinstance(weight, LazyTensor) else weight
            by_tp = shards.setdefault(to_global(name, spec, pp, chunk, ep), {})
            if tp in by_tp:  # the tied copy on the last stage: the same weight and state
                assert all(torch.equal(by_tp[tp][k], state[k]) for k in state), f"tied {name} differs"
            else:
                by_tp[tp] = state
    full = {}
    for name, by_tp in shards.items():
        assert sorted(by_tp) == list(range(spec.tp)), name
        merge = T.TP_SPLIT[tp_kind(name)][1]
        full[name] = {key: T.as_tensor(merge([by_tp[r][key] for r in range(spec.tp)]))
                      for key in (*OL.STATE_KEYS, "weight")}
    return full, OL.ParamOrder.from_model_dicts(dicts), optimizer, scheduler


def convert_to(source_root: Path, target: F.Spec, save_dir: Path) -> Path:
    """The converter's own resharding: `--load-model-type optim --save-model-type mg` to the target
    layout, data-parallel size and DDP bucketing of the run that resumes."""
    flags = ["--target-tensor-parallel-size", target.tp, "--target-pipeline-parallel-size", target.pp,
             "--target-expert-parallel-size", target.ep, "--target-data-parallel-size", target.dp,
             "--target-overlap-grad-reduce", "on" if target.overlap_grad_reduce else "off",
             "--target-ddp-bucket-size", target.bucket_size or 0,
             "--make-vocab-size-divisible-by", target.divisible_by]
    if target.vpp_layers:
        flags += ["--num-layers-per-virtual-pipeline-stage", target.vpp_layers]
    run_convert("--load-model-type", "optim", "--save-model-type", "mg", "--model-type-hf",
                "mixtral" if target.moe else "llama2", "--load-dir", source_root / "ckpt", "--save-dir", save_dir, *flags)
    verified = run_cli("--verify", save_dir)  # manifest hashes (distrib_optim.pt too) and the rank files' tensors
    assert verified.returncode == 0, verified.stderr
    return save_dir


def check_resharded(source_root: Path, source: F.Spec, target: F.Spec, work: Path) -> None:
    full, _order, _optimizer, _scheduler = read_full(source_root / "ckpt", source)
    target_dir = convert_to(source_root, target, work / "target")
    resumed = F.resume(target, target_dir)
    try:
        live = F.full_live_state(F.load_live(resumed))
        assert sorted(live) == sorted(ranks_of(target))
        compared = set()
        for (tp, pp, ep), params in live.items():
            for (chunk, name), state in params.items():
                whole = full[to_global(name, target, pp, chunk, ep)]
                for key in OL.STATE_KEYS:
                    shard = T.as_tensor(T.TP_SPLIT[tp_kind(name)][0](whole[key], target.tp)[tp])
                    assert torch.equal(state[key], shard), f"rank {(tp, pp, ep)} {name} {key}"
                compared.add(to_global(name, target, pp, chunk, ep))
        assert compared == set(full)
        want = torch.load(source_root / "losses.pt", weights_only=True)
        got = torch.load(resumed / "losses.pt", weights_only=True)
        print(f"{source.label} -> {target.label}: loss deltas {got['loss_next'] - want['loss_next']:.2e} (step), "
              f"{got['loss_after'] - want['loss_after']:.2e} (after the update)")
        assert abs(got["loss_next"] - want["loss_next"]) < LOSS_TOL, (got, want)
        assert abs(got["loss_after"] - want["loss_after"]) < LOSS_TOL, (got, want)
    finally:
        shutil.rmtree(resumed, ignore_errors=True)


# ----------------------------------------------------------------------------- pure layout tests


def test_replay_alignment_and_buckets():
    params = [OL.ParamSpec("a", (3, 5)), OL.ParamSpec("b", (70,)), OL.ParamSpec("c", (64,)), OL.ParamSpec("d", (10,))]
    slots, buckets = OL.replay_buffer(params, None)  # reverse order, starts aligned to 64, one bucket
    assert [(s.name, s.start, s.stop) for s in slots] == [("d", 0, 10), ("c", 64, 128), ("b", 128, 198), ("a", 256, 271)]
    assert buckets == (271,)
    # a bucket closes at the end of the parameter that brings it to >= bucket_size elements
    slots, buckets = OL.replay_buffer(params, 100)
    assert buckets == (128, 143)
    assert [(s.name, s.start, s.stop, s.bucket) for s in slots] == [
        ("d", 0, 10, 0), ("c", 64, 128, 0), ("b", 128, 198, 1), ("a", 256, 271, 1)]
    # no alignment (Megatron before mid-2024)
    slots, buckets = OL.replay_buffer(params, None, align=1)
    assert buckets == (159,) and [s.start for s in slots] == [0, 10, 74, 144]
    # bucket-end padding is stripped in the file: the second bucket starts right after the first
    params = [OL.ParamSpec("a", (70,)), OL.ParamSpec("b", (100,))]
    slots, buckets = OL.replay_buffer(params, 90)
    assert buckets == (100, 70) and [(s.start, s.buffer_start) for s in slots] == [(0, 0), (100, 128)]


def test_shared_embedding_gets_its_own_bucket():
    params = [OL.ParamSpec("embedding.word_embeddings.weight", (10, 7), shared_embedding=True),
              OL.ParamSpec("x", (5,)), OL.ParamSpec("y", (3,))]
    slots, buckets = OL.replay_buffer(params, None)
    # y [0,3), x [64,69); the embedding closes the open bucket at the aligned start 128
    assert buckets == (128, 70)
    assert [(s.name, s.start, s.bucket) for s in slots] == [("y", 0, 0), ("x", 64, 0),
                                                            ("embedding.word_embeddings.weight", 128, 1)]


def test_param_order_learns_megatron_order():
    source = ["embedding.word_embeddings.weight", "decoder.layers.0.input_layernorm.weight",
              "decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
              "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.router.weight",
              "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight",
              "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight",
              "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight",
              "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight",
              "decoder.final_layernorm.weight", "output_layer.weight"]
    order = OL.ParamOrder(source)
    target = [n.replace("layers.0", "layers.1") for n in source[1:10]] + source[1:10]
    target += ["decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight",
               "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"]
    got = order.sort(reversed(target))
    layer0 = source[1:10] + ["decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight",
                             "decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight"]
    assert got == layer0 + [n.replace("layers.0", "layers.1") for n in source[1:10]]
    # builtin order (no source): local spelling, qkv after proj
    assert OL.ParamOrder().sort(["decoder.layers.0.self_attention.linear_qkv.weight",
                                 "decoder.layers.0.self_attention.linear_proj.weight"])[0].endswith("linear_proj.weight")
    with pytest.raises(ConvertError, match="registration order"):
        OL.ParamOrder().key("decoder.layers.0.mlp.something_new.weight")


def _synthetic(expert_parallel: bool):
    """A tiny two-chunk rank: sizes not multiples of 64, an expert parameter per chunk."""
    def chunk(v):
        return [OL.ParamSpec(f"decoder.layers.{v}.input_layernorm.weight", (7,), torch.bfloat16),
                OL.ParamSpec(f"decoder.layers.{v}.self_attention.linear_qkv.weight", (9, 7), torch.bfloat16),
                OL.ParamSpec(f"decoder.layers.{v}.mlp.experts.local_experts.0.linear_fc1.weight", (5, 7),
                             torch.bfloat16, is_expert=expert_parallel)]
    return [chunk(0), chunk(1)]


def test_writer_reader_roundtrip_and_alignment_detection(tmp_path):
    settings = OL.DdpSettings(data_parallel_size=2, overlap_grad_reduce=True, bucket_size=60)
    chunks = _synthetic(expert_parallel=True)
    gen = torch.Generator().manual_seed(0)
    states = {(c, p.name): {k: torch.randn(p.shape, generator=gen) for k in OL.STATE_KEYS}
              for c, params in enumerate(chunks) for p in params}
    for align in (64, 1):  # megatron-core today / before mid-2024
        layout = OL.rank_layout(chunks, settings, pp_rank=0, expert_optimizer=True, align=align)
        path = tmp_path / f"distrib_optim_{align}.pt"
        OL.write_distrib_optim(path, layout, lambda _o, c, n, k: states[(c, n)][k], present=(False, True))
        loaded = torch.load(path, weights_only=True)  # what megatron's load_parameter_state does
        assert loaded[0] is None and list(loaded[1]) == ["buckets_coalesced", 0, 1]
        entries = OL.optimizer_entries(OL.load_optim_file(path), source=str(path), expected=2)
        matched = OL.match_layout(entries, chunks, settings, pp_rank=0, source=str(path))
        assert matched.optimizers[1] == layout.optimizers[1]
        got = {(c, n): s for _o, c, n, s in OL.read_param_states(path, matched, entries, optimizers=[1])}
        assert set(got) == {k for k in states if "experts" in k[1]}
        for key, state in got.items():
            assert all(torch.equal(state[k], states[key][k]) for k in OL.STATE_KEYS)
        with pytest.raises(ConvertError, match="holds no state for optimizer 0"):
            list(OL.read_param_states(path, matched, entries))
    # args that do not describe the file (no bucketing, so alignment gaps where buckets ended):
    # named with the numbers found
    layout = OL.rank_layout(chunks, settings, pp_rank=0, expert_optimizer=True)
    path = tmp_path / "distrib_optim.pt"
    OL.write_distrib_optim(path, layout, lambda _o, c, n, k: states[(c, n)][k])
    entries = OL.optimizer_entries(OL.load_optim_file(path), source=str(path), expected=2)
    wrong = OL.DdpSettings(data_parallel_size=2, overlap_grad_reduce=False)
    with pytest.raises(ConvertError, match=r"optimizer 0 buffer 0 holds 70 elements, but replaying .* gives 71"):
        OL.match_layout(entries, chunks, wrong, pp_rank=0, source="x")
    # chunk 1 (and PP ranks > 0) are never bucketed; grads in fp32 or in the param dtype
    assert settings.chunk_bucket_size(0, 1) is None and settings.chunk_bucket_size(1, 0) is None
    assert OL.DdpSettings(overlap_grad_reduce=True, data_parallel_size=64).chunk_bucket_size(0, 0) == 64_000_000
    assert layout.optimizers[0][0].dtype_key == (torch.bfloat16, torch.float32)


def test_target_optimizer_entry_follows_expert_parallelism():
    def group(wd, expert, step=5):
        return {"wd_mult": wd, "lr_mult": 1.0, "is_expert_parallel": expert, "is_decoupled_lr": False,
                "lr": 0.1, "step": step}
    dense = {"optimizer": {"param_groups": [group(1.0, False), group(0.0, False)]}}
    expert = {"optimizer": {"param_groups": [group(1.0, True)]}}
    assert OL.optimizer_step([dense, expert]) == 5
    merged = OL.target_optimizer_entry([dense, expert], expert_optimizer=False)
    assert merged == dense  # the expert group joins the identical dense group
    split = OL.target_optimizer_entry(dense, expert_optimizer=True)
    assert split[0] == dense and all(g["is_expert_parallel"] for g in split[1]["optimizer"]["param_groups"])
    with pytest.raises(ConvertError, match="step counts"):
        OL.optimizer_step({"optimizer": {"param_groups": [group(1.0, False, 1), group(0.0, False, 2)]}})


def test_unsupported_formats_are_named(tmp_path):
    bucket = {"param": torch.zeros(4), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}
    cases = {
        "per-bucket list format": {0: {(torch.bfloat16, torch.float32): [bucket]}},
        "sharding type 'fully_reshardable'": {"param_state": {}, "param_state_sharding_type": "fully_reshardable"},
        "dp_reshardable": {"per_bucket_numel": [], "per_bucket_numel_unpadded": [], 0: {}},
        "no 'buckets_coalesced' key": {"something": 1},
    }
    for expected, obj in cases.items():
        path = tmp_path / "distrib_optim.pt"
        torch.save(obj, path)
        with pytest.raises(ConvertError, match=re.escape(expected)):
            OL.optimizer_entries(OL.load_optim_file(path), source=str(path))
    with pytest.raises(ConvertError, match="holds 2 optimizer state"):
        OL.optimizer_entries([None, None], source="x", expected=1)
    # torch_dist checkpoint folder / a model file without distrib_optim.pt
    (tmp_path / "iter").mkdir()
    (tmp_path / "iter" / ".metadata").write_bytes(b"")
    with pytest.raises(ConvertError, match="torch_dist"):
        OL.check_iteration_dir(tmp_path / "iter")
    (tmp_path / "it2" / "mp_rank_00").mkdir(parents=True)
    torch.save({}, tmp_path / "it2" / "mp_rank_00" / OL.MODEL_FILE)
    with pytest.raises(ConvertError, match="no distrib_optim.pt in mp_rank_00"):
        OL.check_iteration_dir(tmp_path / "it2")
    with pytest.raises(ConvertError, match="not trained with --use-distributed-optimizer"):
        OL.DdpSettings.from_args(argparse.Namespace(use_distributed_optimizer=False))


# ----------------------------------------------------------------------------- against megatron-core


def test_dense_read_roundtrip_and_reshard_dp2_to_dp1(fixtures, tmp_path):
    """The default megatron case: dense fp32 DP2, 7 buckets -> DP1 without bucketing."""
    root = fixtures(DENSE)
    check_replay_equals_megatron(root, DENSE)
    assert check_read_exact(root, DENSE) == 27

    # round trip at the same layout: same vectors (gaps too), loadable with weights_only
    folder = rank_folder(root / "ckpt", DENSE, 0, 0, 0)
    _model, layout, entries = read_rank(folder, DENSE, 0)
    states = {(c, n): s for _o, c, n, s in OL.read_param_states(folder / OL.OPTIM_FILE, layout, entries)}
    out = tmp_path / "distrib_optim.pt"
    writer = OL.write_distrib_optim(out, layout, lambda _o, c, n, k: states[(c, n)][k])
    assert writer.size == out.stat().st_size
    original = torch.load(folder / OL.OPTIM_FILE, weights_only=True)
    written = torch.load(out, weights_only=True)
    assert list(written) == list(original) and list(written[0]) == list(original[0])
    for key in (*OL.STATE_KEYS, "numel_unpadded"):
        a, b = original[0][(torch.float32, torch.float32)][key], written[0][(torch.float32, torch.float32)][key]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b

    assert OL.optimizer_step(load_lazy(folder / OL.MODEL_FILE)["optimizer"]) == F.ITERATION
    check_resharded(root, DENSE, DENSE.replace(dp=1, overlap_grad_reduce=False), tmp_path)


@pytest.mark.slow
def test_moe_ep2_bf16_read_exact(fixtures):
    spec = F.Spec(moe=True, ep=2, dtype="bf16")
    root = fixtures(spec)
    check_replay_equals_megatron(root, spec)
    assert check_read_exact(root, spec) == 39 + 16


@pytest.mark.slow
def test_moe_reshard_ep2_to_ep1(fixtures, tmp_path):
    source = F.Spec(moe=True, ep=2)
    root = fixtures(source)
    check_read_exact(root, source)
    check_resharded(root, source, source.replace(ep=1, dp=1, bucket_size=30000), tmp_path)


@pytest.mark.slow
def test_tied_pp2_shared_embedding_buckets(fixtures, tmp_path):
    """Tied embeddings at PP2: the embedding (stage 0) and its copy, the output layer (stage 1),
    each sit in a bucket of their own; both hold the same state. Resharded to PP1 (no copy)."""
    source = DENSE.replace(pp=2, tied=True)
    root = fixtures(source)
    check_replay_equals_megatron(root, source)
    check_read_exact(root, source)
    for pp, name in ((0, "embedding.word_embeddings.weight"), (1, "output_layer.weight")):
        _model, layout, _entries = read_rank(rank_folder(root / "ckpt", source, 0, pp, 0), source, pp)
        (buffer,) = layout.optimizers[0]
        slot = next(s for s in buffer.slots if s.name == name)
        assert [s for s in buffer.slots if s.bucket == slot.bucket] == [slot]
    check_resharded(root, source, source.replace(pp=1), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("source, target", [
    pytest.param(DENSE.replace(dp=1, global_batch=4), dict(dp=2, bucket_size=9000), id="dp1-to-dp2-other-buckets"),
    pytest.param(DENSE.replace(tp=2), dict(tp=1), id="tp2-to-tp1"),
    pytest.param(DENSE.replace(pp=2), dict(pp=1, dp=2), id="pp2-to-pp1"),
    # PP2 x VPP2: model0 / model1 per stage, one gbuf per chunk; chunk 1 is never bucketed
    pytest.param(DENSE.replace(pp=2, vpp_layers=1), dict(pp=1, vpp_layers=None), id="pp2-vpp2-to-pp1"),
])
def test_dense_read_and_reshard(fixtures, tmp_path, source, target):
    root = fixtures(source)
    check_replay_equals_megatron(root, source)
    check_read_exact(root, source)
    check_resharded(root, source, source.replace(**target), tmp_path)


@pytest.mark.slow
def test_dense_reshard_up_to_tp2_pp2(fixtures, tmp_path):
    """The split direction: TP1 PP1 DP2 -> TP2 PP2 DP1 (gated fc1 / grouped qkv / row splits)."""
    check_resharded(fixtures(DENSE), DENSE, DENSE.replace(tp=2, pp=2, dp=1), tmp_path)


@pytest.mark.slow
def test_moe_reshard_ep1_to_ep2(fixtures, tmp_path):
    """EP1 (experts in the dense optimizer, a dict file) -> EP2 ([dense, expert] files, the dense
    entry None on EP rank 1, a second 'optimizer' state made for the experts)."""
    source = F.Spec(moe=True, ep=1)
    root = fixtures(source)
    check_replay_equals_megatron(root, source)
    check_read_exact(root, source)
    check_resharded(root, source, source.replace(ep=2), tmp_path)


# ----------------------------------------------------------------------------- HF weights from the optimizer


def expected_hf_from_masters(root: Path, spec: F.Spec, dtype: torch.dtype, family=None) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the source, named and split as HF wants them (through the
    converter's mapping rules), cast to `dtype`; buffers (no master weight) left out."""
    from modellink_ckpt.formats.megatron.checkpoint import MegatronSource
    from modellink_ckpt.model import mapping
    from modellink_ckpt.model.families import load_family

    family = family or load_family("mixtral" if spec.moe else "llama2")
    dims = MegatronSource(root / "ckpt").dims()
    full, *_ = read_full(root / "ckpt", spec)
    masters = {name: state["param"] for name, state in full.items()}
    rules = [*mapping.embedding_rules(family, dims), *mapping.final_norm_rules(family, dims),
             *mapping.output_rules(family, dims)]
    for layer in range(dims.num_layers):
        rules += [dataclasses.replace(r, mcore=f"decoder.layers.{layer}.{r.mcore}")
                  for r in mapping.layer_rules(family, dims, layer)]
    expected = {}
    for rule in rules:
        if not OL.is_parameter_name(rule.mcore):
            continue
        master = masters[rule.mcore][:dims.vocab_size] if rule.tp == "vocab" else masters[rule.mcore]
        for name, part in zip(rule.hf, rule.to_hf(master)):
            expected[name] = T.as_tensor(part).to(dtype)
    return expected


def check_hf_from_optim(root: Path, spec: F.Spec, work: Path) -> None:
    family = "mixtral" if spec.moe else "llama2"
    for flags, dtype in (([], spec.params_dtype), (["--params-dtype", "fp32"], torch.float32)):
        out = work / ("hf-default" if not flags else "hf-fp32")
        run_convert("--load-model-type", "optim", "--save-model-type", "hf", "--model-type-hf", family,
                    "--load-dir", root / "ckpt", "--save-dir", out, *flags)
        got = load_hf_state(out / "mg2hf")
        want = expected_hf_from_masters(root, spec, dtype)
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == dtype and torch.equal(got[name], want[name]), name


def test_hf_from_optim_is_the_master_weights(fixtures, tmp_path):
    check_hf_from_optim(fixtures(DENSE), DENSE, tmp_path)


@pytest.mark.slow
def test_hf_from_optim_bf16_moe_is_the_master_weights_not_the_bf16_copies(fixtures, tmp_path):
    spec = F.Spec(moe=True, ep=2, dtype="bf16")
    root = fixtures(spec)
    check_hf_from_optim(root, spec, tmp_path)
    # the fp32 masters differ from the bf16 weights the model file holds: exported, not those
    fp32 = load_hf_state(tmp_path / "hf-fp32" / "mg2hf")
    bf16 = load_hf_state(tmp_path / "hf-default" / "mg2hf")
    assert any(not torch.equal(fp32[n].to(torch.bfloat16).float(), fp32[n]) for n in fp32)
    assert all(torch.equal(fp32[n].to(torch.bfloat16), bf16[n]) for n in fp32)


def test_cli_names_unsupported_optimizer_formats(fixtures, tmp_path):
    """A torch_dist folder, a checkpoint without distrib_optim.pt: one line naming what was found."""
    root = fixtures(DENSE)
    broken = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", broken)
    (iter_dir(broken) / "mp_rank_00" / OL.OPTIM_FILE).unlink()
    result = run_cli("--load-model-type", "optim", "--save-model-type", "hf", "--load-dir", broken,
                     "--save-dir", tmp_path / "out")
    line = assert_one_line_error(result.returncode, result.stderr)
    assert "no distrib_optim.pt in mp_rank_00" in line
    (iter_dir(broken) / ".metadata").write_bytes(b"")
    result = run_cli("--load-model-type", "optim", "--save-model-type", "mg", "--load-dir", broken,
                     "--save-dir", tmp_path / "out")
    assert "torch_dist" in assert_one_line_error(result.returncode, result.stderr)
    assert not (tmp_path / "out").exists()


def test_example_script_reshards_a_training_checkpoint(fixtures, tmp_path):
    """examples/mcore/llama2/ckpt_convert_llama2_optim.sh as written (layout from the environment):
    megatron-core resumes the result with the source's state and losses."""
    import os
    import subprocess
    import sys


    root = fixtures(DENSE)
    target = DENSE.replace(tp=2, dp=1)
    env = {**os.environ, "LOAD_DIR": str(root / "ckpt"), "SAVE_DIR": str(tmp_path / "target"), "TP": "2", "PP": "1",
           "DP": "1", "PYTHON": sys.executable}
    script = ROOT / "examples" / "mcore" / "llama2" / "ckpt_convert_llama2_optim.sh"
    result = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = F.resume(target, tmp_path / "target")
    try:
        want = torch.load(root / "losses.pt", weights_only=True)
        got = torch.load(resumed / "losses.pt", weights_only=True)
        assert abs(got["loss_next"] - want["loss_next"]) < LOSS_TOL
        assert abs(got["loss_after"] - want["loss_after"]) < LOSS_TOL
    finally:
        shutil.rmtree(resumed, ignore_errors=True)


# ----------------------------------------------------------------------------- tensors without optimizer state


def _expert_biases(ckpt: Path, spec: F.Spec) -> dict[str, torch.Tensor]:
    """{global name: tensor} of the routers' fp32 expert_bias buffers (EP / TP rank 0's files)."""
    found = {}
    for tp, pp, ep in ranks_of(spec):
        if tp == 0 and ep == 0:
            model_file = load_lazy(rank_folder(ckpt, spec, tp, pp, ep) / OL.MODEL_FILE)
            for v in range(spec.chunks):
                for name, value in model_file[model_key(spec, v)].items():
                    if name.endswith("router.expert_bias"):
                        found[to_global(name, spec, pp, v, ep)] = loaded(value)
    return found


@pytest.mark.slow
def test_moe_expert_bias_buffer_resharded_and_resumed(fixtures, tmp_path):
    """A sigmoid router's expert_bias is an fp32 buffer with no optimizer state: EP2 -> EP1 keeps
    it equal, every parameter's state stays exact and megatron-core resumes with the same losses."""
    spec = F.Spec(moe=True, ep=2, expert_bias=True)
    root = fixtures(spec)
    biases = _expert_biases(root / "ckpt", spec)
    assert len(biases) == spec.num_layers and all(b.dtype == torch.float32 and b.abs().sum() > 0 for b in biases.values())
    target = spec.replace(ep=1, dp=1, bucket_size=30000)
    check_resharded(root, spec, target, tmp_path)
    resharded = _expert_biases(tmp_path / "target", target)
    assert sorted(resharded) == sorted(biases) and all(torch.equal(resharded[n], biases[n]) for n in biases)


@pytest.mark.slow
def test_bf16_moe_expert_bias_keeps_fp32(fixtures, tmp_path):
    """bf16 MoE whose routers' expert_bias buffers are fp32: optim -> mg writes the weights in bf16
    (from the fp32 masters) and the bias in fp32, unchanged; optim -> hf too. (A bf16 resume across an
    EP change is not compared: the first step's loss matches exactly, but the fp32 gradient sums run
    in another order at another EP, and bf16 rounding of the updated weights then moves the loss by
    ~1e-3, with or without expert bias; fp32 resumes exactly, above.)"""
    spec = F.Spec(moe=True, ep=2, dtype="bf16", expert_bias=True)
    root = fixtures(spec)
    biases = _expert_biases(root / "ckpt", spec)
    target = spec.replace(ep=1, dp=1)
    convert_to(root, target, tmp_path / "target")
    for rank, state in load_mg_state(tmp_path / "target").items():
        for name, value in state["model"].items():
            want = torch.float32 if name.endswith("expert_bias") else torch.bfloat16
            assert value.dtype == want, (rank, name, value.dtype)
    resharded = _expert_biases(tmp_path / "target", target)
    assert sorted(resharded) == sorted(biases) and all(torch.equal(resharded[n], biases[n]) for n in biases)

    # HF output through a family that names the bias (a JSON entry, as a new family would be)
    cfg = json.loads((ROOT / "configs" / "checkpoint" / "model_cfg.json").read_text())
    cfg["model_mappings"]["mixtral-expert-bias"] = {"__base__": "mixtral", "model_hf_key_mapping": {
        "layers_mlp_router_bias": "model.layers[layer_idx].block_sparse_moe.gate.e_score_correction_bias"}}
    (tmp_path / "model_cfg.json").write_text(json.dumps(cfg))
    run_convert("--load-model-type", "optim", "--save-model-type", "hf", "--model-type-hf", "mixtral-expert-bias",
                "--model-cfg", tmp_path / "model_cfg.json", "--load-dir", root / "ckpt", "--save-dir", tmp_path / "hf")
    got = load_hf_state(tmp_path / "hf" / "mg2hf")
    from modellink_ckpt.model.families import load_family
    want = expected_hf_from_masters(root, spec, torch.bfloat16,
                                    load_family("mixtral-expert-bias", tmp_path / "model_cfg.json"))
    bias_names = [f"model.layers.{i}.block_sparse_moe.gate.e_score_correction_bias" for i in range(spec.num_layers)]
    assert sorted(set(got) - set(want)) == bias_names
    for layer, name in enumerate(bias_names):
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], biases[f"decoder.layers.{layer}.mlp.router.expert_bias"])
    for name in want:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name
