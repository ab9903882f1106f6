"""How a Megatron rank file spells one layer's tensors: the file side of a layer message.

Messages carry whole tensors in one canonical spelling (`mapping`: local names, upstream
Megatron-Core MLA names, one tensor per routed expert with its global index). Checkpoints in the
wild spell them in several ways, and a conversion may change between them:

- local or Transformer Engine names (TE fuses norms into the following linear layer);
- MLA: the MindSpeed-LLM fused, replicated `linear_qkv` (= [q_down or q_proj; kv_down]), or the
  upstream Megatron-Core `linear_q_down_proj` / `linear_kv_down_proj` / `linear_q_proj`;
- routed experts: one module per expert (`local_experts.{j}`), grouped GEMM (`weight1`/`weight2`,
  the transposed stacked layout), or Transformer Engine grouped (`linear_fc1.weight{j}`),
  `j` being the expert's index on its expert-parallel rank.

A `FileRule` is one tensor of the file made of one or more message tensors (`parts`): the parts
are split across TP ranks first (each by its own kind), then `join` builds the file's TP shard from
the parts' shards; `split` is its inverse. See megatron-format.md §8-9.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from modellink_ckpt.errors import UsageError
from modellink_ckpt.model import mapping

EXPERT_LAYOUTS = ("per_expert", "grouped_gemm", "te_grouped")
MLA_SPELLINGS = ("mindspeed", "mcore")


@dataclasses.dataclass(frozen=True)
class Spelling:
    transformer_impl: str = "local"
    expert_layout: str = "per_expert"
    mla: str = "mindspeed"


@dataclasses.dataclass(frozen=True)
class FileRule:
    file: str                       # layer-relative name in the rank file
    parts: tuple[str, ...]          # message tensors it is made of
    ep_rank: int | None = None      # the expert-parallel rank holding it; None: every EP rank
    join: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    split: Callable[[torch.Tensor], list[torch.Tensor]] | None = None


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, 0)


def _split_rows(rows: list[int]):
    return lambda shard: list(shard.split(rows, 0))


def _stack_fc1(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Grouped GEMM `weight1` [H, E_local*2F/TP]: the row-major reshape of the stack of fc1_j^T."""
    return torch.stack([b.t() for b in blocks]).reshape(blocks[0].shape[1], -1)


def _stack_fc2(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Grouped GEMM `weight2` [E_local*F/TP, H]: the reshape of the stack of fc2_j^T."""
    return torch.stack([b.t() for b in blocks]).reshape(-1, blocks[0].shape[0])


def _unstack_fc1(count: int):
    return lambda weight1: [block.t() for block in weight1.view(count, weight1.shape[0], -1)]


def _unstack_fc2(count: int):
    return lambda weight2: [block.t() for block in weight2.view(count, -1, weight2.shape[1])]


def _te_name(name: str, rules_by_name: dict, dims) -> str:
    """The Transformer Engine spelling of a layer-relative local name."""
    stem, _, param = name.rpartition(".")
    if stem == "input_layernorm" and not dims.multi_latent_attention:
        return f"self_attention.linear_qkv.layer_norm_{param}"
    if stem == "pre_mlp_layernorm" and "mlp.linear_fc1.weight" in rules_by_name:
        return f"mlp.linear_fc1.layer_norm_{param}"  # MoE layers keep their own norm
    if name == "self_attention.q_layernorm.weight" and dims.multi_latent_attention:
        return "self_attention.linear_q_up_proj.layer_norm_weight"
    if name == "self_attention.kv_layernorm.weight":
        return "self_attention.linear_kv_up_proj.layer_norm_weight"
    return name


def _expert_rules(expert_rules: list, dims, ep: int, layout: str) -> list[FileRule]:
    per_rank = dims.num_experts // ep
    rules = []
    if layout == "grouped_gemm":
        biased = next((rule.mcore for rule in expert_rules if not rule.mcore.endswith(".weight")), None)
        if biased is not None:  # Megatron's GroupedMLP has no biases: they would be lost
            raise UsageError(f"the legacy grouped GEMM layout (--moe-grouped-gemm, local) cannot hold expert biases "
                             f"('{biased}'); use the per-expert layout or --transformer-impl transformer_engine")
        for ep_rank in range(ep):
            experts = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
            rules += [
                FileRule("mlp.experts.weight1", tuple(mapping.expert_name(e, "linear_fc1.weight") for e in experts),
                         ep_rank, _stack_fc1, _unstack_fc1(per_rank)),
                FileRule("mlp.experts.weight2", tuple(mapping.expert_name(e, "linear_fc2.weight") for e in experts),
                         ep_rank, _stack_fc2, _unstack_fc2(per_rank)),
            ]
        return rules
    for rule in expert_rules:
        ep_rank, local = divmod(rule.expert, per_rank)
        rest = rule.mcore[len(mapping.expert_name(rule.expert, "")):]  # e.g. linear_fc1.weight
        if layout == "te_grouped":
            module, param = rest.rsplit(".", 1)
            file = f"mlp.experts.{module}.{param}{local}"
        else:
            file = mapping.expert_name(local, rest)
        rules.append(FileRule(file, (rule.mcore,), ep_rank))
    return rules


def layer_file_rules(rules: list, dims, spelling: Spelling, ep: int) -> list[FileRule]:
    """The rank-file tensors of one layer whose message tensors follow `rules` (mapping.layer_rules)."""
    by_name = {rule.mcore: rule for rule in rules}
    out: list[FileRule] = []
    experts = [rule for rule in rules if rule.expert is not None]
    mindspeed_mla = dims.multi_latent_attention and spelling.mla == "mindspeed"
    q_in = "self_attention.linear_q_down_proj.weight" if dims.q_lora_rank else "self_attention.linear_q_proj.weight"
    for rule in rules:
        if rule.expert is not None:
            continue
        if mindspeed_mla and rule.mcore == "self_attention.linear_kv_down_proj.weight":
            continue  # part of the fused linear_qkv below
        if mindspeed_mla and rule.mcore == q_in:
            parts = (q_in, "self_attention.linear_kv_down_proj.weight")
            rows = [by_name[p].shape[0] for p in parts]
            out.append(FileRule("self_attention.linear_qkv.weight", parts, None, _cat_rows, _split_rows(rows)))
            continue
        name = rule.mcore
        if spelling.transformer_impl == "transformer_engine":
            name = _te_name(name, by_name, dims)
        out.append(FileRule(name, (rule.mcore,)))
    if experts:
        out += _expert_rules(experts, dims, ep, spelling.expert_layout)
    return out


def part_tp_kind(rule, spelling_mla: str, dims, expert_tp: int, tp: int) -> str:
    """How one message tensor is split across TP ranks in a given file spelling."""
    if rule.expert is not None and expert_tp == 1 and tp > 1:
        return "replicated"  # whole experts on every TP rank
    if dims.multi_latent_attention and spelling_mla == "mindspeed" \
            and rule.mcore == "self_attention.linear_q_proj.weight":
        return "replicated"  # inside MindSpeed's replicated linear_qkv
    return rule.tp


def detect_spelling(names) -> Spelling:
    """The spelling of a rank file, from its tensor names (any layer, any model chunk)."""
    names = list(names)
    if any(".mlp.experts.weight1" in n for n in names):
        layout = "grouped_gemm"
    elif any(".mlp.experts.linear_fc1.weight" in n for n in names):
        layout = "te_grouped"
    else:
        layout = "per_expert"
    if any(n.startswith(MINDSPEED_MTP_NORMS) for n in names):  # MTP layers say it without MLA (GLM-4.5)
        mla = "mindspeed"
    elif any(n.startswith("mtp.layers.") and ".final_layernorm." in n and MTP_INNER not in n for n in names) \
            or any(".linear_q_down_proj." in n or ".linear_kv_down_proj." in n or ".linear_q_proj." in n for n in names):
        mla = "mcore"
    else:
        mla = "mindspeed"
    te = layout == "te_grouped" or any(n.endswith(".layer_norm_weight") for n in names)
    return Spelling("transformer_engine" if te else "local", layout, mla)


# With MTP layers, MindSpeed-LLM's GPT model (mindspeed_llm/core/models/gpt/gpt_model.py and
# core/transformer/{transformer_block,multi_token_prediction}.py) moves every final norm out of its
# module: the main model's from the decoder to the top level (`final_layernorm`, the decoder has
# none) and each MTP layer's into a list of the MTP block (`mtp.final_layernorms.<k>`).
# Megatron-Core 0.16.1 keeps `decoder.final_layernorm` and `mtp.layers.<k>.final_layernorm`.
# `Spelling.mla` "mindspeed" / "mcore" chooses between the two models for MTP as for MLA.
MINDSPEED_MTP_NORMS = "mtp.final_layernorms."
_DECODER_FINAL_NORM = "decoder.final_layernorm."


def plain_file_name(name: str, dims, spelling: Spelling) -> str:
    """File name of a message tensor outside the layers (embedding, final norm, output layer)."""
    if dims.mtp_num_layers and spelling.mla == "mindspeed" and name.startswith(_DECODER_FINAL_NORM):
        return name[len("decoder."):]
    return name


def mtp_file_name(k: int, name: str, spelling: Spelling) -> str:
    """File name of an MTP layer's own tensor (`enorm.weight`, `hnorm.weight`, `eh_proj.weight`,
    `final_layernorm.weight`)."""
    if name.startswith("final_layernorm.") and spelling.mla == "mindspeed":
        return f"{MINDSPEED_MTP_NORMS}{k}.{name.rpartition('.')[2]}"
    return f"mtp.layers.{k}.{name}"


MTP_INNER = "transformer_layer."  # message names of an MTP layer's decoder layer start with this


def mtp_file_rules(rules: list, dims, spelling: Spelling, ep: int, k: int):
    """MTP layer `k`'s file tensors, from its message rules (mapping.mtp_rules), in two groups:
    (inner rules renamed layer-relative, their [(FileRule, prefix)]) for its decoder layer and
    (own rules, their [(FileRule, "")]) for its norms and projection. HF's copies of the embedding
    and output layer have no file: Megatron shares the main model's."""
    inner = [dataclasses.replace(r, mcore=r.mcore[len(MTP_INNER):]) for r in rules if r.mcore.startswith(MTP_INNER)]
    inner_files = [(f, f"mtp.layers.{k}.{MTP_INNER}") for f in layer_file_rules(inner, dims, spelling, ep)]
    own = [r for r in rules if not r.mcore.startswith(MTP_INNER) and r.mcore not in mapping.MTP_COPIES]
    own_files = [(FileRule(mtp_file_name(k, r.mcore, spelling), (r.mcore,)), "") for r in own]
    return (inner, inner_files), (own, own_files)
