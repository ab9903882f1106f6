"""Pure tensor transforms, each with its inverse.

Shapes follow megatron-format.md: `nh` heads, `ng` query groups, `d` head dim. All functions
work on weights `[rows, in]` and on biases `[rows]` alike, and never change a dtype.
"""

from __future__ import annotations

import torch


# ---- fused QKV: HF q/k/v <-> Megatron's per-group order --------------------------------------

def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """[q; k; v] (HF, each contiguous) -> rows grouped per query group: [q_g..., k_g, v_g] for each g."""
    ng = num_query_groups
    tail = q.shape[1:]
    q_g = q.reshape(ng, -1, *tail)
    k_g = k.reshape(ng, -1, *tail)
    v_g = v.reshape(ng, -1, *tail)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """Inverse of `merge_qkv`: grouped rows -> (q, k, v) in HF order."""
    ng, d = num_query_groups, head_dim
    q_rows = num_heads // ng * d
    tail = qkv.shape[1:]
    grouped = qkv.reshape(ng, q_rows + 2 * d, *tail)
    q, k, v = torch.split(grouped, [q_rows, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def unpack_hf_qkv(packed: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """An HF-fused `[all Q; all K; all V]` projection (Phi-3 `qkv_proj`) -> (q, k, v)."""
    q_rows, kv_rows = num_heads * head_dim, num_query_groups * head_dim
    return torch.split(packed, [q_rows, kv_rows, kv_rows], dim=0)


def pack_hf_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_hf_qkv`."""
    return torch.cat([q, k, v], dim=0)


# ---- gated MLP: gate/up <-> linear_fc1 ------------------------------------------------------

def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    """Inverse of `merge_gate_up`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


# ---- tensor parallel splits (one pair per parallel kind) ------------------------------------

def split_column(full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Column-parallel: equal contiguous chunks of dim 0 (views, no copy)."""
    return list(torch.chunk(full, tp, dim=0))


def merge_column(shards: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(shards, dim=0) if len(shards) > 1 else shards[0]


def split_row(full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Row-parallel: equal chunks of dim 1."""
    return list(torch.chunk(full, tp, dim=1))


def merge_row(shards: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(shards, dim=1) if len(shards) > 1 else shards[0]


def split_gated_column(fc1: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Gated column-parallel `[G; U]`: rank r holds `[G_r; U_r]`, not the r-th chunk of `[G; U]`."""
    if tp == 1:
        return [fc1]
    gate, up = split_gate_up(fc1)
    return [torch.cat([g, u], dim=0) for g, u in zip(split_column(gate, tp), split_column(up, tp))]


def merge_gated_column(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_gated_column`: un-interleave `[G_0; U_0; G_1; U_1; ...]`."""
    if len(shards) == 1:
        return shards[0]
    pairs = [split_gate_up(shard) for shard in shards]
    return merge_gate_up(torch.cat([g for g, _ in pairs]), torch.cat([u for _, u in pairs]))


def replicate(full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [full] * tp


def merge_replicated(shards: list[torch.Tensor]) -> torch.Tensor:
    return shards[0]


TP_SPLIT = {
    "column": (split_column, merge_column),
    "row": (split_row, merge_row),
    "gated_column": (split_gated_column, merge_gated_column),
    "replicated": (replicate, merge_replicated),
}


# ---- vocabulary padding ----------------------------------------------------------------------

def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = max(1, divisible_by) * tp
    return -(-vocab_size // multiple) * multiple


def pad_vocab(table: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to `padded_rows` (only the first `vocab_size` logits are ever used)."""
    extra = padded_rows - table.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad a {table.shape[0]}-row table down to {padded_rows} rows")
    if extra == 0:
        return table
    return torch.cat([table, table.new_zeros((extra, *table.shape[1:]))], dim=0)


def unpad_vocab(table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of `pad_vocab`."""
    return table[:vocab_size]
