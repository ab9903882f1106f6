"""Which HF tensors make which Megatron tensor, and how each is split across TP.

Each rule is small and named after what it does; most are one-to-one renames, the few that do
work (fused QKV, gated fc1) hold a transform pair from `transforms`. Messages between loader and
saver carry the Megatron tensors whole (TP = 1, unpadded vocabulary), keyed by the names below.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.accounting import account
from modellink_ckpt.model.families import (UNMAPPED, ModelDims, ModelFamily, dims_from_hf_config, families_for_config,
                                           family_names, load_family)

Tensors = list[torch.Tensor]

EMBEDDING = "embedding.word_embeddings.weight"
EMBEDDING_NORM = "embedding.word_embeddings.norm."  # + weight / bias: BLOOM's LayerNorm after the embedding
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor (`mcore`, layer-relative for layers) of `shape` and the HF tensors it
    comes from.

    `merge(parts, out)` builds it from the HF parts and `split(full)` gives them back (tensors or
    `Rows`); a rule without them is a plain rename. `tp` says how it is split across tensor-parallel
    ranks; `expert` is the global expert index of a routed expert's tensor (placed by EP rank).
    """

    mcore: str
    hf: tuple[str, ...]
    tp: str  # a key of transforms.TP_SPLIT, or "vocab"
    shape: tuple[int, ...] = ()
    merge: Callable[..., torch.Tensor] | None = None
    split: Callable[[torch.Tensor], list] | None = None
    targets: Callable[[torch.Tensor], list] | None = None  # per part: [(row_start, row_stop, view of out)]
    expert: int | None = None
    fold: Callable[[torch.Tensor], torch.Tensor] | None = None  # in place, once read from HF (no inverse)
    # (index, count): the HF part is slab `index` (on dim 0) of one HF tensor stacking `count` of them
    # (routed experts stored fused); `merge` / `split` convert the slab
    slab: tuple[int, int] | None = None

    @property
    def is_rename(self) -> bool:
        return self.merge is None

    def to_mcore(self, parts: Tensors, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.merge is None:
            return T.merge_replicated(parts, out=out)
        return self.merge(parts, out=out)

    def to_hf(self, full: torch.Tensor) -> list:
        return [full] if self.split is None else self.split(full)

    def part_targets(self, out: torch.Tensor) -> list:
        """For each HF part, the row ranges of it that land in contiguous views of `out`."""
        if self.targets is None:
            return [[(0, out.shape[0], out)]]
        return list(self.targets(out))


def _rename(mcore: str, hf: str, tp: str, shape: tuple[int, ...], expert: int | None = None) -> TensorRule:
    return TensorRule(mcore, (hf,), tp, tuple(shape), expert=expert)


def _qkv_rule(mcore: str, param: str, family: ModelFamily, dims: ModelDims, layer: int) -> TensorRule:
    nh, ng, d = dims.num_attention_heads, dims.num_query_groups, dims.kv_channels
    shape = (dims.qkv_rows, dims.hidden_size) if param == "weight" else (dims.qkv_rows,)
    qkv_type = family.qkv_type
    if qkv_type == "pack_self":  # already in Megatron's grouped order (InternLM2 wqkv)
        return _rename(mcore, family.hf_name("layers_self_attention_linear_qkv_pack", param, layer), "column", shape)
    if qkv_type == "pack_gqa":  # HF-fused [Q; K; V]
        return TensorRule(
            mcore, (family.hf_name("layers_self_attention_linear_qkv_pack", param, layer),), "column", shape,
            merge=lambda p, out=None: T.merge_qkv(*T.unpack_hf_qkv(p[0], nh, ng, d), ng, out=out),
            split=lambda full: [T.pack_hf_qkv(*T.split_qkv_rows(full, nh, ng, d))],
            targets=lambda out: T.packed_qkv_targets(out, nh, ng, d),
        )
    names = tuple(family.hf_name(f"layers_self_attention_linear_{x}_proj", param, layer) for x in "qkv")
    return TensorRule(
        mcore, names, "column", shape,
        merge=lambda p, out=None: T.merge_qkv(p[0], p[1], p[2], ng, out=out),
        split=lambda full: list(T.split_qkv_rows(full, nh, ng, d)),
        targets=lambda out: T.qkv_targets(out, nh, ng, d),
    )


def _gated_fc1_rule(mcore: str, gate: str, up: str, rows: int, hidden: int, tp: str, expert=None) -> TensorRule:
    shape = (2 * rows, hidden) if mcore.endswith("weight") else (2 * rows,)
    return TensorRule(mcore, (gate, up), tp, shape,
                      merge=lambda p, out=None: T.merge_gate_up(p[0], p[1], out=out),
                      split=lambda full: list(T.split_gate_up(full)),
                      targets=T.gate_up_targets, expert=expert)


def _fc1_rule(mcore: str, param: str, family: ModelFamily, dims: ModelDims, layer: int) -> TensorRule:
    tp_kind = "gated_column" if dims.swiglu else "column"
    if family.fc_type == "gate_up_down":
        return _gated_fc1_rule(mcore, family.hf_name("layers_mlp_gate_proj", param, layer),
                               family.hf_name("layers_mlp_up_proj", param, layer), dims.ffn_hidden_size,
                               dims.hidden_size, tp_kind)
    # "gate_up": HF already fuses [gate; up]; "h_to_4h": a plain (non-gated) up projection
    rows = 2 * dims.ffn_hidden_size if dims.swiglu else dims.ffn_hidden_size
    shape = (rows, dims.hidden_size) if param == "weight" else (rows,)
    return _rename(mcore, family.hf_name("layers_mlp_linear_fc1", param, layer), tp_kind, shape)


def _attention_rules(family: ModelFamily, dims: ModelDims, layer: int) -> list[TensorRule]:
    hf = family.hf_name
    h, d = dims.hidden_size, dims.kv_channels
    rules = [_qkv_rule("self_attention.linear_qkv.weight", "weight", family, dims, layer)]
    if dims.add_qkv_bias:
        rules.append(_qkv_rule("self_attention.linear_qkv.bias", "bias", family, dims, layer))
    if dims.qk_layernorm:
        rules += [
            _rename("self_attention.q_layernorm.weight", hf("layers_self_attention_q_layernorm", "weight", layer), "replicated", (d,)),
            _rename("self_attention.k_layernorm.weight", hf("layers_self_attention_k_layernorm", "weight", layer), "replicated", (d,)),
        ]
    rules.append(_rename("self_attention.linear_proj.weight", hf("layers_self_attention_linear_proj", "weight", layer),
                         "row", (h, dims.num_attention_heads * d)))
    if dims.add_dense_bias:
        rules.append(_rename("self_attention.linear_proj.bias", hf("layers_self_attention_linear_proj", "bias", layer),
                             "replicated", (h,)))
    if dims.computes.get("softmax_type") == "learnable":  # a learnt sink logit per head (gpt-oss)
        rules.append(_rename("self_attention.core_attention.softmax_offset",
                             hf("layers_self_attention_sinks", None, layer), "column", (dims.num_attention_heads,)))
    return rules


def _mla_rules(family: ModelFamily, dims: ModelDims, layer: int) -> list[TensorRule]:
    """Multi-latent attention, in the upstream Megatron-Core names (all plain renames; Megatron's
    MLA orders the rope dims like HF). `mg_names` gives the MindSpeed-LLM spelling."""
    hf = family.hf_name
    h, nh = dims.hidden_size, dims.num_attention_heads
    q_head = dims.qk_head_dim + dims.qk_pos_emb_head_dim
    kv_down = dims.kv_lora_rank + dims.qk_pos_emb_head_dim
    if dims.q_lora_rank:
        rules = [
            _rename("self_attention.linear_q_down_proj.weight", hf("layers_self_attention_linear_q_proj", "weight", layer),
                    "replicated", (dims.q_lora_rank, h)),
            _rename("self_attention.q_layernorm.weight", hf("layers_self_attention_q_layernorm", "weight", layer),
                    "replicated", (dims.q_lora_rank,)),
            _rename("self_attention.linear_q_up_proj.weight", hf("layers_self_attention_linear_q_up_proj", "weight", layer),
                    "column", (nh * q_head, dims.q_lora_rank)),
        ]
    else:
        rules = [_rename("self_attention.linear_q_proj.weight", hf("layers_self_attention_linear_q_proj", "weight", layer),
                         "column", (nh * q_head, h))]
    return rules + [
        _rename("self_attention.linear_kv_down_proj.weight", hf("layers_self_attention_linear_kv_proj", "weight", layer),
                "replicated", (kv_down, h)),
        _rename("self_attention.kv_layernorm.weight", hf("layers_self_attention_kv_layernorm", "weight", layer),
                "replicated", (dims.kv_lora_rank,)),
        _rename("self_attention.linear_kv_up_proj.weight", hf("layers_self_attention_linear_kv_up_proj", "weight", layer),
                "column", (nh * (dims.qk_head_dim + dims.v_head_dim), dims.kv_lora_rank)),
        _rename("self_attention.linear_proj.weight", hf("layers_self_attention_linear_proj", "weight", layer),
                "row", (h, nh * dims.v_head_dim)),
    ]


def _dense_mlp_rules(family: ModelFamily, dims: ModelDims, layer: int) -> list[TensorRule]:
    hf, h = family.hf_name, dims.hidden_size
    rules = [_fc1_rule("mlp.linear_fc1.weight", "weight", family, dims, layer)]
    if dims.add_dense_bias:
        rules.append(_fc1_rule("mlp.linear_fc1.bias", "bias", family, dims, layer))
    rules.append(_rename("mlp.linear_fc2.weight", hf("layers_mlp_linear_fc2", "weight", layer), "row",
                         (h, dims.ffn_hidden_size)))
    if dims.add_dense_bias:
        rules.append(_rename("mlp.linear_fc2.bias", hf("layers_mlp_linear_fc2", "bias", layer), "replicated", (h,)))
    return rules


EXPERT_PREFIX = "mlp.experts.local_experts."


def expert_name(expert: int, rest: str) -> str:
    """Message name of a routed expert's tensor (global expert index), e.g. `...3.linear_fc1.weight`."""
    return f"{EXPERT_PREFIX}{expert}.{rest}"


def _expert_rules(family: ModelFamily, dims: ModelDims, layer: int, e: int) -> list[TensorRule]:
    """Routed expert `e`, stored in HF as modules of its own."""
    hf, h, f = family.hf_name, dims.hidden_size, dims.moe_ffn_hidden_size
    rules = []
    for param in ("weight", "bias") if dims.add_dense_bias else ("weight",):
        rules += [
            _gated_fc1_rule(expert_name(e, f"linear_fc1.{param}"), hf("layers_mlp_experts_gate_proj", param, layer, e),
                            hf("layers_mlp_experts_up_proj", param, layer, e), f, h, "gated_column", expert=e),
            _rename(expert_name(e, f"linear_fc2.{param}"), hf("layers_mlp_experts_linear_fc2", param, layer, e),
                    "row" if param == "weight" else "replicated", (h, f) if param == "weight" else (h,), expert=e),
        ]
    return rules


def _fused_expert_rules(family: ModelFamily, dims: ModelDims, layer: int, e: int) -> list[TensorRule]:
    """Routed expert `e` of an HF checkpoint that stacks all experts of a layer in one tensor per
    projection (`fused_experts`: its orientation and gate/up order are the family's)."""
    h, f, count = dims.hidden_size, dims.moe_ffn_hidden_size, dims.num_experts
    fused = family.fused_experts
    rules = []
    for param in ("weight", "bias") if dims.add_dense_bias else ("weight",):
        suffix = "" if param == "weight" else "_bias"
        for fc, shape, tp, interleaved in (("fc1", (2 * f, h), "gated_column", fused["gate_up"] == "interleaved"),
                                           ("fc2", (h, f), "row", False)):
            if param == "bias":
                shape, tp = shape[:1], ("gated_column" if fc == "fc1" else "replicated")
            options = {"transposed": fused["orientation"] == "in_out", "interleaved": interleaved}
            rules.append(TensorRule(
                expert_name(e, f"linear_{fc}.{param}"),
                (family.hf_name(f"layers_mlp_experts_fused_{fc}{suffix}", None, layer),), tp, shape,
                merge=lambda p, out=None, o=options: T.from_fused_expert(p[0], out=out, **o),
                split=lambda full, o=options: [T.to_fused_expert(full, **o)],
                expert=e, slab=(e, count)))
    return rules


def _moe_rules(family: ModelFamily, dims: ModelDims, layer: int) -> list[TensorRule]:
    hf, h = family.hf_name, dims.hidden_size
    rules = [_rename("mlp.router.weight", hf("layers_mlp_router", "weight", layer), "replicated", (dims.num_experts, h))]
    if dims.add_dense_bias:  # Megatron's add_bias_linear: the router and every expert have biases
        rules.append(_rename("mlp.router.bias", hf("layers_mlp_router", "bias", layer), "replicated", (dims.num_experts,)))
    if dims.router_expert_bias and family.settings.get("router_bias_as_row"):  # HF: [1, E] (ERNIE 4.5)
        rules.append(TensorRule("mlp.router.expert_bias", (hf("layers_mlp_router_bias", None, layer),), "replicated",
                                (dims.num_experts,), merge=lambda p, out=None: T.from_one_row(p[0], out=out),
                                split=lambda full: [T.to_one_row(full)],
                                targets=lambda out: [[(0, 1, T.to_one_row(out))]]))
    elif dims.router_expert_bias:
        rules.append(_rename("mlp.router.expert_bias", hf("layers_mlp_router_bias", None, layer), "replicated",
                             (dims.num_experts,)))
    experts = _fused_expert_rules if family.fused_experts else _expert_rules
    for e in range(dims.num_experts):
        rules += experts(family, dims, layer, e)
    if dims.shared_expert_ffn_hidden_size:
        fs = dims.shared_expert_ffn_hidden_size
        rules += [
            _gated_fc1_rule("mlp.shared_experts.linear_fc1.weight", hf("layers_mlp_shared_experts_gate_proj", "weight", layer),
                            hf("layers_mlp_shared_experts_up_proj", "weight", layer), fs, h, "gated_column"),
            _rename("mlp.shared_experts.linear_fc2.weight", hf("layers_mlp_shared_experts_linear_fc2", "weight", layer),
                    "row", (h, fs)),
        ]
        if dims.shared_expert_gate:
            rules.append(_rename("mlp.shared_experts.gate_weight", hf("layers_mlp_shared_expert_gate", "weight", layer),
                                 "replicated", (1, h)))
    return rules


def layer_rules(family: ModelFamily, dims: ModelDims, layer: int) -> list[TensorRule]:
    """Rules for HF layer `layer` (its Megatron tensors are layer-relative: `self_attention...`)."""
    attention = _mla_rules if dims.multi_latent_attention else _attention_rules
    mlp = _moe_rules if dims.is_moe_layer(layer) else _dense_mlp_rules
    # sandwich norms (GLM-4-0414, Gemma 2/3): each sublayer's output is normed before the residual add
    post_attn = _norm("post_attn_norm.weight", "layers_self_attention_post_attention_layernorm", family, dims,
                      layer) if dims.post_norm else []
    post_mlp = _norm("post_mlp_layernorm.weight", "layers_self_attention_post_mlp_layernorm", family, dims,
                     layer) if dims.post_norm else []
    return [
        *_norm("input_layernorm.weight", "layers_input_layernorm", family, dims, layer),
        *attention(family, dims, layer),
        *post_attn,
        *_norm("pre_mlp_layernorm.weight", "layers_self_attention_pre_mlp_layernorm", family, dims, layer),
        *mlp(family, dims, layer),
        *post_mlp,
    ]


def _norm(mcore: str, module: str, family: ModelFamily, dims: ModelDims, layer: int | None = None,
          size: int | None = None) -> list[TensorRule]:
    """A norm's weight, and its bias for LayerNorms with one (`norm_has_bias`); `mcore` ends in `.weight`."""
    shape = (size or dims.hidden_size,)
    rules = [_rename(mcore, family.hf_name(module, "weight", layer), "replicated", shape)]
    if dims.norm_has_bias:
        rules.append(_rename(mcore[:-len("weight")] + "bias", family.hf_name(module, "bias", layer), "replicated", shape))
    return rules


def embedding_rules(family: ModelFamily, dims: ModelDims) -> list[TensorRule]:
    rules = [_rename(EMBEDDING, family.hf_name("embedding_word_embeddings"), "vocab", (dims.vocab_size, dims.hidden_size))]
    if dims.embed_layernorm:
        rules += _norm(EMBEDDING_NORM + "weight", "embedding_word_embeddings_norm", family, dims)
    return rules


def final_norm_rules(family: ModelFamily, dims: ModelDims) -> list[TensorRule]:
    return _norm(FINAL_NORM, "final_layernorm", family, dims)


def output_rules(family: ModelFamily, dims: ModelDims) -> list[TensorRule]:
    if dims.tie_word_embeddings:
        return []
    rule = _rename(OUTPUT_LAYER, family.hf_name("output_layer"), "vocab", (dims.vocab_size, dims.hidden_size))
    if family.settings.get("normalize_output_layer"):  # Baichuan2's NormHead
        rule = dataclasses.replace(rule, fold=T.normalize_rows_)
    return [rule]


def tp_kind(rules: list[TensorRule]) -> dict[str, str]:
    return {rule.mcore: rule.tp for rule in rules}


MTP_COPIES = (EMBEDDING, OUTPUT_LAYER)  # HF keeps its own copies of these in every MTP layer


def mtp_rules(family: ModelFamily, dims: ModelDims, k: int) -> list[TensorRule]:
    """Multi-token-prediction layer `k` (HF `model.layers.{num_layers + k}`), megatron-format §9:
    its own norms and projection, a full decoder layer (`transformer_layer.*`), and HF's copies of
    the embedding and output layer, which Megatron shares with the main model."""
    hf, h, layer = family.hf_name, dims.hidden_size, dims.num_layers + k
    inner = [dataclasses.replace(rule, mcore=f"transformer_layer.{rule.mcore}")
             for rule in layer_rules(family, dims, layer)]
    return [
        _rename("enorm.weight", hf("mtp_layers_enorm", "weight", layer), "replicated", (h,)),
        _rename("hnorm.weight", hf("mtp_layers_hnorm", "weight", layer), "replicated", (h,)),
        _rename("eh_proj.weight", hf("mtp_layers_eh_proj", "weight", layer), "column", (h, 2 * h)),
        *inner,
        _rename("final_layernorm.weight", hf("mtp_layers_shared_head_norm", "weight", layer), "replicated", (h,)),
        _rename(EMBEDDING, hf("mtp_layers_embed_tokens", "weight", layer), "vocab", (dims.vocab_size, h)),
        _rename(OUTPUT_LAYER, hf("mtp_layers_shared_head_head", "weight", layer), "vocab", (dims.vocab_size, h)),
    ]


def model_messages(family: ModelFamily, dims: ModelDims, dtype: torch.dtype):
    """The messages a loader sends for this model, as meta tensors: (kind, hf layer, tensors).

    Lets the plan, `--dry-run` and `--verify` know every output tensor's shape without data.
    """

    def meta(rules):
        return {rule.mcore: torch.empty(rule.shape, dtype=dtype, device="meta") for rule in rules}

    yield "embeddings", None, meta(embedding_rules(family, dims))
    for layer in range(dims.num_layers):
        yield "layer", layer, meta(layer_rules(family, dims, layer))
    yield "final_norm", None, meta(final_norm_rules(family, dims))
    output = output_rules(family, dims)
    if output:
        yield "output_layer", None, meta(output)
    for k in range(dims.mtp_num_layers):
        yield "mtp_layer", k, meta(mtp_rules(family, dims, k))


def require_hf_names(family: ModelFamily, dims: ModelDims) -> None:
    """Stop before any work when HF tensors are to be read or written and the family does not say
    what HF calls one of the model's tensors (a Megatron -> Megatron conversion needs no HF names)."""
    for kind, layer, _ in model_messages(family, dims, torch.float32):
        for rule in message_rules(kind, family, dims, layer):
            for name in rule.hf:
                if name.startswith(UNMAPPED):
                    raise UsageError(f"--model-type-hf {family.name}: the model has '{rule.mcore}' but the family "
                                     f"has no HF mapping for '{name[len(UNMAPPED):]}' (add it to model_cfg.json "
                                     f"or pick a family that has it)")


def message_key(kind: str, layer: int | None, name: str) -> str:
    """A message tensor's name across the whole model (for per-tensor facts such as its dtype)."""
    return f"{kind}:{'' if layer is None else layer}:{name}"


class TensorDtypes:
    """The dtype each message tensor is written in.

    A loader declares the model's dtype and every tensor stored in another one ({message key:
    dtype}: an fp32 router or expert bias in a bf16 model); a tensor keeps its declared dtype
    unless `--params-dtype` asks for one cast. A message may carry a tensor in higher precision
    than declared (a distributed optimizer's fp32 master weights): it is rounded to the declared
    dtype, as training rounds it into the model.
    """

    def __init__(self, default: torch.dtype, exceptions: dict | None = None, cast: torch.dtype | None = None):
        self.default, self.cast = cast or default, cast
        self.exceptions = {} if cast else dict(exceptions or {})

    def of(self, kind: str, layer: int | None, name: str) -> torch.dtype:
        return self.exceptions.get(message_key(kind, layer, name), self.default)

    def apply(self, kind: str, layer: int | None, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in its written dtype (floating tensors only; a no-op when it already is)."""
        if not tensor.is_floating_point():
            return tensor
        return tensor.to(self.of(kind, layer, name))

    @classmethod
    def from_meta(cls, meta, cast: torch.dtype | None = None) -> "TensorDtypes":
        return cls(meta["dtype"], meta.get("dtypes"), cast)


def message_rules(kind: str, family: ModelFamily, dims: ModelDims, layer: int | None = None) -> list[TensorRule]:
    """The rules behind one message kind."""
    if kind == "embeddings":
        return embedding_rules(family, dims)
    if kind == "layer":
        return layer_rules(family, dims, layer)
    if kind == "final_norm":
        return final_norm_rules(family, dims)
    if kind == "output_layer":
        return output_rules(family, dims)
    if kind == "mtp_layer":
        return mtp_rules(family, dims, layer)
    return []


# HF tensors a checkpoint may hold that no conversion needs, because they are derived from others:
# nothing else may be left behind (`unconverted_hf_tensors`).
DERIVABLE = {
    "rotary inv_freq (recomputed from the rope settings)": re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
}
TIED_OUTPUT_COPY = "the output layer of a model with tied embeddings (a copy of the embedding)"

def consumed_hf_names(family: ModelFamily, dims: ModelDims) -> set[str]:
    """Every HF tensor the family's rules read for this model."""
    names = set()
    for kind, layer, _ in model_messages(family, dims, torch.float32):
        for rule in message_rules(kind, family, dims, layer):
            names.update(rule.hf)
    return names


def derivable_reason(family: ModelFamily, dims: ModelDims, name: str) -> str | None:
    """Why HF tensor `name` may be left out, or None when it carries weights of its own."""
    for reason, pattern in DERIVABLE.items():
        if pattern.search(name):
            return reason
    if dims.tie_word_embeddings and name == family.hf_name("output_layer"):
        return TIED_OUTPUT_COPY
    return None


def hf_accounting(family: ModelFamily, dims: ModelDims, names: Iterable[str],
                  skipped_layers: Iterable[int] = ()) -> tuple[list[str], list[str]]:
    """(missing, left over): the HF tensors the family needs that `names` lacks, and the ones of
    `names` it would not convert (neither derivable nor in an HF layer `skipped_layers` leaves out
    on request), each in checkpoint order."""
    skipped = set(skipped_layers)
    result = account(consumed_hf_names(family, dims), names,
                     excused=lambda name: derivable_reason(family, dims, name) is not None
                     or family.layer_of(name) in skipped)
    return result.missing, result.unexplained


def families_fitting(config: dict, names: Iterable[str], cfg_path=None, skipped_layers: Iterable[int] = (),
                     candidates: Iterable[str] | None = None) -> list[str]:
    """The families (of `candidates`, default all) that convert exactly the HF tensors `names`:
    nothing missing, nothing left behind."""
    names, fitting = list(names), []
    for name in family_names(cfg_path) if candidates is None else candidates:
        family = load_family(name, cfg_path)
        try:
            dims = dims_from_hf_config(family, config, overrides={"mtp_num_layers": None})
        except (ConvertError, KeyError, TypeError, ValueError):
            continue  # the config lacks what this family needs: not a fit
        mtp_layers = {layer for layer in map(family.layer_of, names) if layer is not None and layer >= dims.num_layers}
        missing, left = hf_accounting(family, dims, names, set(skipped_layers) | mtp_layers)
        if not missing and not left:
            fitting.append(name)
    return fitting


def family_of_hf(config: dict, names: Iterable[str], cfg_path=None) -> tuple[str, str]:
    """(family, how it was found) of an HF checkpoint: the entry whose `hf_model_type` /
    `hf_architectures` match config.json and that converts every tensor (`names`); else any entry
    config.json names (its accounting will say what does not fit); else any entry that converts
    every tensor."""
    names = list(names)
    said = f"config.json model_type {config.get('model_type')!r}"
    matching = families_for_config(config, cfg_path)
    fitting = families_fitting(config, names, cfg_path, candidates=matching)
    if fitting:
        return fitting[0], f"from {said}"
    if matching:
        return matching[0], f"from {said}"
    fitting = families_fitting(config, names, cfg_path)
    if fitting:
        return fitting[0], f"by its tensor names; no entry names {said}"
    raise UsageError(f"no entry of the model config matches {said} or converts its tensors; pass --model-type-hf")
