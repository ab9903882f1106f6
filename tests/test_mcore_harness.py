"""Validate tests/mcore_harness.py without the converter.

A random tiny megatron-core GPTModel is built and run directly in one spawned process (the
reference). Its weights are then written in the legacy layout at several TP / PP / VPP / noop /
uneven-PP layouts by a tiny resharding helper written here, independently of the harness, and the
harness logits are compared with the direct forward.

Timings measured on 2 cores (process spawn + megatron import dominate; forward is ms): reference
model ~6 s per variant, TP1PP1 / noop ~5 s, PP2 layouts (VPP, uneven) ~6-8 s, TP2PP2 ~13 s.
Default run (slow tests skipped) ~41 s; with --run-slow ~2 min.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import pytest
import torch

import mcore_harness
from mcore_harness import mcore_logits, spawn_ranks

TOL = 1e-4
VOCAB = 256
SEQ = 12

BASE_ARGS = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    group_query_attention=True,
    kv_channels=16,
    max_position_embeddings=64,
    position_embedding_type="rope",
    rotary_base=10000,
    normalization="RMSNorm",
    norm_epsilon=1e-6,
    swiglu=True,
    add_bias_linear=False,
    add_qkv_bias=False,
    qk_layernorm=False,
    untie_embeddings_and_output_weights=True,
    padded_vocab_size=VOCAB,
    make_vocab_size_divisible_by=1,
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    expert_model_parallel_size=1,
    num_layers_per_virtual_pipeline_stage=None,
    num_layer_list=None,
    noop_layers=None,
    params_dtype=torch.float32,
    bf16=False,
    fp16=False,
    transformer_impl="local",
)


# ----------------------------------------------------------------------------- reference model


def _reference_worker(rank, world, out_dir, payload):
    """Build a random GPTModel at TP1PP1 (layer-spec path, not the harness's block-spec path),
    randomise every parameter, and run it directly."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    a = argparse.Namespace(**payload["args"])
    parallel_state.initialize_model_parallel(1, 1)
    config = TransformerConfig(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups,
        kv_channels=a.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=a.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=a.add_qkv_bias,
        qk_layernorm=a.qk_layernorm,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=a.qk_layernorm, normalization="RMSNorm")
    model = GPTModel(
        config,
        spec,
        vocab_size=a.padded_vocab_size,
        max_sequence_length=a.max_position_embeddings,
        share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=a.rotary_base,
    ).eval()
    gen = torch.Generator().manual_seed(payload["seed"])
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 1 and "bias" not in name:  # norm weights
                param.copy_(1.0 + 0.2 * noise)
            elif "word_embeddings" in name:
                param.copy_(noise)
            elif param.dim() == 2:
                param.copy_(noise / param.shape[1] ** 0.5)
            else:
                param.copy_(0.1 * noise)
        tokens = payload["tokens"]
        b, s = tokens.shape
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
        logits = model(tokens, position_ids, mask)
    # megatron adds `*._extra_state: None` entries for its linear layers; they carry no weights.
    state = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    torch.save({"state": state, "logits": logits}, os.path.join(out_dir, "reference.pt"))


def build_reference(tokens, seed=0, **overrides):
    args = {**BASE_ARGS, **overrides}
    out_dir = spawn_ranks(_reference_worker, 1, {"args": args, "tokens": tokens, "seed": seed}, timeout=120)
    try:
        ref = torch.load(os.path.join(out_dir, "reference.pt"), weights_only=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return args, ref["state"], ref["logits"]


# ----------------------------------------------------------------------------- resharding helper


def _tp_shard(name, tensor, tp, r):
    """Rank r's shard of a full (TP1) mcore tensor (megatron-format notes, sections 3, 5, 6)."""
    if tp == 1:
        return tensor.clone()
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[r], up.chunk(tp, 0)[r]], 0).clone()
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")):
        return tensor.chunk(tp, 0)[r].clone()
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return tensor.chunk(tp, 1)[r].clone()
    return tensor.clone()


def _placement(num_layers, pp, per_virtual, layer_list):
    """placement[p][v] = global Megatron slots held by stage p, chunk v, in local order."""
    if per_virtual:
        vpp = num_layers // pp // per_virtual
        return [[list(range((v * pp + p) * per_virtual, (v * pp + p + 1) * per_virtual)) for v in range(vpp)] for p in range(pp)]
    if layer_list:
        start = [sum(layer_list[:p]) for p in range(pp)]
        return [[list(range(start[p], start[p] + layer_list[p]))] for p in range(pp)]
    n = num_layers // pp
    return [[list(range(p * n, (p + 1) * n))] for p in range(pp)]


def save_megatron(
    root,
    base_args,
    full_state,
    tp=1,
    pp=1,
    per_virtual=None,
    layer_list=None,
    noop=(),
    te_names=False,
    dtype=torch.float32,
    iteration=1,
):
    """Write full_state (a TP1 GPTModel state dict of the real layers) in the legacy layout."""
    real_layers = base_args["num_layers"]
    num_layers = real_layers + len(noop)
    tied = not base_args["untie_embeddings_and_output_weights"]
    args = argparse.Namespace(
        **{
            **base_args,
            "num_layers": num_layers,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "num_layers_per_virtual_pipeline_stage": per_virtual,
            "num_layer_list": ",".join(map(str, layer_list)) if layer_list else None,
            "noop_layers": ",".join(map(str, noop)) if noop else None,
            "params_dtype": dtype,
            "bf16": dtype == torch.bfloat16,
            "transformer_impl": "transformer_engine" if te_names else "local",
        }
    )
    # Megatron slot -> real (HF) layer; noop slots hold nothing.
    slot_to_real = dict(zip([i for i in range(num_layers) if i not in noop], range(real_layers)))
    placement = _placement(num_layers, pp, per_virtual, layer_list)
    chunks = len(placement[0])
    it_dir = os.path.join(root, f"iter_{iteration:07d}")
    for p in range(pp):
        for r in range(tp):
            models = []
            for v in range(chunks):
                first, last = (p == 0 and v == 0), (p == pp - 1 and v == chunks - 1)
                sd = {}
                for name, tensor in full_state.items():
                    if name.endswith("._extra_state"):
                        continue
                    if name.startswith("embedding."):
                        if first:
                            sd[name] = tensor
                    elif name.startswith("decoder.final_layernorm") or name.startswith("output_layer."):
                        if last:
                            sd[name] = tensor
                    elif name.startswith("decoder.layers."):
                        global_real = int(name.split(".")[2])
                        for local, slot in enumerate(placement[p][v]):
                            if slot_to_real.get(slot) == global_real:
                                rest = name.split(".", 3)[3]
                                sd[f"decoder.layers.{local}.{rest}"] = tensor
                    else:
                        raise KeyError(name)
                if tied and last and pp > 1:
                    sd["output_layer.weight"] = full_state["embedding.word_embeddings.weight"]
                sd = {k: _tp_shard(k, t, tp, r).to(dtype) for k, t in sd.items()}
                if te_names:
                    sd = {
                        k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight").replace(
                            "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"
                        ): t
                        for k, t in sd.items()
                    }
                models.append(sd)
            rank_dir = os.path.join(it_dir, f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{p:03d}")
            os.makedirs(rank_dir, exist_ok=True)
            payload = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
            if chunks == 1:
                payload["model"] = models[0]
            else:
                payload.update({f"model{v}": m for v, m in enumerate(models)})
            torch.save(payload, os.path.join(rank_dir, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return root


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def untied(tokens):
    return build_reference(tokens)


def _check(logits, expected):
    assert logits.shape == expected.shape, (logits.shape, expected.shape)
    assert logits.dtype == torch.float32
    diff = (logits - expected).abs().max().item()
    assert diff < TOL, f"max |logit diff| {diff}"
    return diff


# ----------------------------------------------------------------------------- tests


def test_reference_is_discriminative(untied):
    """The random model's logits are O(1), so a 1e-4 tolerance catches layout bugs."""
    _, _, logits = untied
    assert logits.std() > 0.3


def test_tp1pp1_matches_direct_forward(untied, tokens, tmp_path):
    args, state, expected = untied
    load_dir = save_megatron(tmp_path, args, state)
    _check(mcore_logits(load_dir, tokens), expected)


def test_noop_layer(untied, tokens, tmp_path):
    """num_layers 5 with slot 2 empty == the 4-layer model."""
    args, state, expected = untied
    load_dir = save_megatron(tmp_path, args, state, noop=(2,))
    _check(mcore_logits(load_dir, tokens), expected)


def test_uneven_pp(untied, tokens, tmp_path):
    args, state, expected = untied
    load_dir = save_megatron(tmp_path, args, state, pp=2, layer_list=[1, 3])
    _check(mcore_logits(load_dir, tokens), expected)


def test_vpp(untied, tokens, tmp_path):
    args, state, expected = untied
    load_dir = save_megatron(tmp_path, args, state, pp=2, per_virtual=1)
    _check(mcore_logits(load_dir, tokens), expected)


def test_child_failure_surfaces(untied, tokens, tmp_path):
    """A strict-load failure in a child is raised in the parent with the child's traceback."""
    args, state, _ = untied
    state = {k: v for k, v in state.items() if k != "decoder.layers.1.mlp.linear_fc2.weight"}
    load_dir = save_megatron(tmp_path, args, state)
    with pytest.raises(Exception, match="linear_fc2.weight") as info:
        mcore_logits(load_dir, tokens, timeout=120)
    assert "load_state_dict" in str(info.value)


def _sleep_worker(rank, world, out_dir, payload):
    time.sleep(payload)


def test_timeout_kills_children():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        spawn_ranks(_sleep_worker, 2, 600, timeout=3)
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_tp2pp2_matches_tp1pp1(untied, tokens, tmp_path):
    args, state, expected = untied
    tp1 = mcore_logits(save_megatron(tmp_path / "tp1", args, state), tokens)
    tp2pp2 = mcore_logits(save_megatron(tmp_path / "tp2pp2", args, state, tp=2, pp=2), tokens)
    _check(tp2pp2, expected)
    assert (tp2pp2 - tp1).abs().max().item() < TOL


@pytest.mark.slow
def test_tp2_vpp_noop_uneven_combinations(untied, tokens, tmp_path):
    args, state, expected = untied
    # TP2 x VPP (PP2, 1 layer per virtual stage) with a noop slot: 6 slots, 3 virtual chunks.
    d1 = save_megatron(tmp_path / "a", args, state, tp=2, pp=2, per_virtual=1, noop=(1, 4))
    _check(mcore_logits(d1, tokens), expected)
    # uneven PP with a noop slot in the second stage.
    d2 = save_megatron(tmp_path / "b", args, state, pp=2, layer_list=[2, 3], noop=(3,))
    _check(mcore_logits(d2, tokens), expected)


@pytest.mark.slow
def test_tied_qkv_bias_qk_norm_te_names_bf16(tokens, tmp_path):
    args, state, expected = build_reference(
        tokens, seed=3, untie_embeddings_and_output_weights=False, add_qkv_bias=True, qk_layernorm=True
    )
    assert "output_layer.weight" not in state
    # tied, PP2 (last stage stores output_layer.weight), TP2, te norm names
    d1 = save_megatron(tmp_path / "a", args, state, tp=2, pp=2, te_names=True)
    _check(mcore_logits(d1, tokens), expected)
    # bf16 checkpoint: equals the fp32 model whose weights are rounded to bf16
    rounded = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in state.items()}
    bf16 = mcore_logits(save_megatron(tmp_path / "b", args, state, dtype=torch.bfloat16), tokens)
    fp32_rounded = mcore_logits(save_megatron(tmp_path / "c", args, rounded), tokens)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32_rounded).abs().max().item() < TOL


@pytest.mark.slow
def test_failure_on_one_pipeline_rank_does_not_hang(untied, tokens, tmp_path):
    args, state, _ = untied
    state = {k: v for k, v in state.items() if k != "decoder.layers.3.self_attention.linear_proj.weight"}
    load_dir = save_megatron(tmp_path, args, state, pp=2)
    with pytest.raises(Exception, match="linear_proj.weight"):
        mcore_logits(load_dir, tokens, timeout=120)


def test_layer_slots_plan():
    ns = argparse.Namespace
    assert mcore_harness.layer_slots(ns(num_layers=4, pipeline_model_parallel_size=2)) == [[[0, 1]], [[2, 3]]]
    assert mcore_harness.layer_slots(
        ns(num_layers=4, pipeline_model_parallel_size=2, num_layer_list="1,3")
    ) == [[[0]], [[1, 2, 3]]]
    assert mcore_harness.layer_slots(
        ns(num_layers=8, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2)
    ) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
