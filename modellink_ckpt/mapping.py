"""Which HF tensors make which Megatron tensor, and how each is split across TP.

Each rule is small and named after what it does; most are one-to-one renames, the few that do
work (fused QKV, gated fc1) hold a transform pair from `transforms`. Messages between loader and
saver carry the Megatron tensors whole (TP = 1, unpadded vocabulary), keyed by the names below.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from modellink_ckpt import transforms as T
from modellink_ckpt.errors import ConvertError
from modellink_ckpt.model_cfg import ModelDims, ModelFamily

Tensors = list[torch.Tensor]

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor (`mcore`, layer-relative for layers) and the HF tensors it comes from.

    `merge(parts, out)` builds it from the HF parts and `split(full)` gives them back (tensors or
    `Rows`); a rule without them is a plain rename.
    """

    mcore: str
    hf: tuple[str, ...]
    tp: str  # a key of transforms.TP_SPLIT, or "vocab"
    merge: Callable[..., torch.Tensor] | None = None
    split: Callable[[torch.Tensor], list] | None = None
    targets: Callable[[torch.Tensor], list] | None = None  # per part: [(row_start, row_stop, view of out)]

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


def _rename(mcore: str, hf: str, tp: str) -> TensorRule:
    return TensorRule(mcore, (hf,), tp)


def _qkv_rule(mcore: str, param: str, family: ModelFamily, dims: ModelDims, layer: int) -> TensorRule:
    nh, ng, d = dims.num_attention_heads, dims.num_query_groups, dims.kv_channels
    qkv_type = family.qkv_type
    if qkv_type == "pack_self":  # already in Megatron's grouped order (InternLM2 wqkv)
        return _rename(mcore, family.hf_name("layers_self_attention_linear_qkv_pack", param, layer), "column")
    if qkv_type == "pack_gqa":  # HF-fused [Q; K; V]
        return TensorRule(
            mcore, (family.hf_name("layers_self_attention_linear_qkv_pack", param, layer),), "column",
            merge=lambda p, out=None: T.merge_qkv(*T.unpack_hf_qkv(p[0], nh, ng, d), ng, out=out),
            split=lambda full: [T.pack_hf_qkv(*T.split_qkv_rows(full, nh, ng, d))],
            targets=lambda out: T.packed_qkv_targets(out, nh, ng, d),
        )
    names = tuple(family.hf_name(f"layers_self_attention_linear_{x}_proj", param, layer) for x in "qkv")
    return TensorRule(
        mcore, names, "column",
        merge=lambda p, out=None: T.merge_qkv(p[0], p[1], p[2], ng, out=out),
        split=lambda full: list(T.split_qkv_rows(full, nh, ng, d)),
        targets=lambda out: T.qkv_targets(out, nh, ng, d),
    )


def _fc1_rule(mcore: str, param: str, family: ModelFamily, dims: ModelDims, layer: int) -> TensorRule:
    tp_kind = "gated_column" if dims.swiglu else "column"
    if family.fc_type == "gate_up_down":
        names = (family.hf_name("layers_mlp_gate_proj", param, layer), family.hf_name("layers_mlp_up_proj", param, layer))
        return TensorRule(mcore, names, tp_kind,
                          merge=lambda p, out=None: T.merge_gate_up(p[0], p[1], out=out),
                          split=lambda full: list(T.split_gate_up(full)),
                          targets=T.gate_up_targets)
    # "gate_up": HF already fuses [gate; up]; "h_to_4h": a plain (non-gated) up projection
    return _rename(mcore, family.hf_name("layers_mlp_linear_fc1", param, layer), tp_kind)


def layer_rules(family: ModelFamily, dims: ModelDims, layer: int) -> list[TensorRule]:
    """Rules for HF layer `layer` (its Megatron tensors are layer-relative: `self_attention...`)."""
    hf = family.hf_name
    rules = [
        _rename("input_layernorm.weight", hf("layers_input_layernorm", "weight", layer), "replicated"),
        _qkv_rule("self_attention.linear_qkv.weight", "weight", family, dims, layer),
    ]
    if dims.add_qkv_bias:
        rules.append(_qkv_rule("self_attention.linear_qkv.bias", "bias", family, dims, layer))
    if dims.qk_layernorm:
        rules += [
            _rename("self_attention.q_layernorm.weight", hf("layers_self_attention_q_layernorm", "weight", layer), "replicated"),
            _rename("self_attention.k_layernorm.weight", hf("layers_self_attention_k_layernorm", "weight", layer), "replicated"),
        ]
    rules.append(_rename("self_attention.linear_proj.weight", hf("layers_self_attention_linear_proj", "weight", layer), "row"))
    if dims.add_dense_bias:
        rules.append(_rename("self_attention.linear_proj.bias", hf("layers_self_attention_linear_proj", "bias", layer), "replicated"))
    rules += [
        _rename("pre_mlp_layernorm.weight", hf("layers_self_attention_pre_mlp_layernorm", "weight", layer), "replicated"),
        _fc1_rule("mlp.linear_fc1.weight", "weight", family, dims, layer),
    ]
    if dims.add_dense_bias:
        rules.append(_fc1_rule("mlp.linear_fc1.bias", "bias", family, dims, layer))
    rules.append(_rename("mlp.linear_fc2.weight", hf("layers_mlp_linear_fc2", "weight", layer), "row"))
    if dims.add_dense_bias:
        rules.append(_rename("mlp.linear_fc2.bias", hf("layers_mlp_linear_fc2", "bias", layer), "replicated"))
    return rules


def embedding_rules(family: ModelFamily) -> list[TensorRule]:
    return [_rename(EMBEDDING, family.hf_name("embedding_word_embeddings"), "vocab")]


def final_norm_rules(family: ModelFamily) -> list[TensorRule]:
    return [_rename(FINAL_NORM, family.hf_name("final_layernorm"), "replicated")]


def output_rules(family: ModelFamily, dims: ModelDims) -> list[TensorRule]:
    if dims.tie_word_embeddings:
        return []
    return [_rename(OUTPUT_LAYER, family.hf_name("output_layer"), "vocab")]


# Transformer Engine fuses the norms into the following linear layer's parameters.
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
LOCAL_NAMES = {te: local for local, te in TE_NAMES.items()}


def to_impl_name(local_name: str, transformer_impl: str) -> str:
    """Layer-relative local name -> the name used by `transformer_impl`."""
    if transformer_impl == "transformer_engine":
        return TE_NAMES.get(local_name, local_name)
    return local_name


def to_local_name(name: str) -> str:
    """Either spelling -> the local spelling (inverse of `to_impl_name`)."""
    return LOCAL_NAMES.get(name, name)


def tp_kind(rules: list[TensorRule]) -> dict[str, str]:
    return {rule.mcore: rule.tp for rule in rules}


def expected_shape(name: str, dims: ModelDims) -> tuple[int, ...] | None:
    """The whole (TP = 1, unpadded) shape of a Megatron tensor; None for names it does not know."""
    h, d = dims.hidden_size, dims.kv_channels
    fc1_rows = 2 * dims.ffn_hidden_size if dims.swiglu else dims.ffn_hidden_size
    shapes = {
        EMBEDDING: (dims.vocab_size, h),
        OUTPUT_LAYER: (dims.vocab_size, h),
        FINAL_NORM: (h,),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (dims.qkv_rows, h),
        "self_attention.linear_qkv.bias": (dims.qkv_rows,),
        "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (h, dims.num_attention_heads * d),
        "self_attention.linear_proj.bias": (h,),
        "mlp.linear_fc1.weight": (fc1_rows, h),
        "mlp.linear_fc1.bias": (fc1_rows,),
        "mlp.linear_fc2.weight": (h, dims.ffn_hidden_size),
        "mlp.linear_fc2.bias": (h,),
    }
    return shapes.get(name)


def check_shape(name: str, tensor: torch.Tensor, dims: ModelDims, *, where: str) -> None:
    expected = expected_shape(name, dims)
    if expected is not None and tuple(tensor.shape) != expected:
        raise ConvertError(f"{where}: {name} has shape {list(tensor.shape)}, expected {list(expected)} "
                           f"from the model config")


def model_messages(family: ModelFamily, dims: ModelDims, dtype: torch.dtype):
    """The messages a loader sends for this model, as meta tensors: (kind, hf layer, tensors).

    Lets the plan, `--dry-run` and `--verify` know every output tensor's shape without data.
    """

    def meta(rules):
        return {rule.mcore: torch.empty(expected_shape(rule.mcore, dims), dtype=dtype, device="meta")
                for rule in rules}

    yield "embeddings", None, meta(embedding_rules(family))
    for layer in range(dims.num_layers):
        yield "layer", layer, meta(layer_rules(family, dims, layer))
    yield "final_norm", None, meta(final_norm_rules(family))
    output = output_rules(family, dims)
    if output:
        yield "output_layer", None, meta(output)


def message_rules(kind: str, family: ModelFamily, dims: ModelDims, layer: int | None = None) -> list[TensorRule]:
    """The rules behind one message kind."""
    if kind == "embeddings":
        return embedding_rules(family)
    if kind == "layer":
        return layer_rules(family, dims, layer)
    if kind == "final_norm":
        return final_norm_rules(family)
    if kind == "output_layer":
        return output_rules(family, dims)
    return []
