"""Pure tensor transforms, each with its inverse.

Shapes follow megatron-format.md: `nh` heads, `ng` query groups, `d` head dim. All functions
work on weights `[rows, in]` and on biases `[rows]` alike, and never change a dtype.
"""

from __future__ import annotations

import torch


class Rows:
    """A tensor given as pieces stacked along dim 0, so it can be written without being copied
    together: the TP shard `[G_r; U_r]`, a padded vocabulary, HF q rows gathered from groups.
    Pieces may be views with strided rows (a dim-1 slice); each row is contiguous."""

    def __init__(self, pieces):
        self.pieces = [p for p in pieces if p.shape[0]] or list(pieces[:1])
        first = self.pieces[0]
        self.shape = torch.Size((sum(p.shape[0] for p in self.pieces), *first.shape[1:]))
        self.dtype = first.dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def rows(self, start: int, stop: int) -> "Rows":
        taken, offset = [], 0
        for piece in self.pieces:
            lo, hi = max(start - offset, 0), min(stop - offset, piece.shape[0])
            if lo < hi:
                taken.append(piece[lo:hi])
            offset += piece.shape[0]
        return Rows(taken or [self.pieces[0][:0]])

    def chunk(self, n: int) -> list["Rows"]:
        step = self.shape[0] // n
        return [self.rows(i * step, (i + 1) * step) for i in range(n)]

    def to(self, dtype: torch.dtype) -> "Rows":
        return Rows([p.to(dtype) for p in self.pieces])

    def materialize(self) -> torch.Tensor:
        return cat(self.pieces, dim=0) if len(self.pieces) > 1 else self.pieces[0]


# ---- joining tensors ------------------------------------------------------------------------
# Plans run every transform on meta tensors (shapes only). torch's meta kernels for cat and stack
# import its compiler stack on first use (measured: 0.7 s of start-up), so shapes are worked out
# here for meta tensors.

def cat(tensors, dim: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.cat (into `out` when given)."""
    tensors = list(tensors)
    if out is None and tensors[0].is_meta:
        shape = list(tensors[0].shape)
        shape[dim] = sum(t.shape[dim] for t in tensors)
        return torch.empty(shape, dtype=tensors[0].dtype, device="meta")
    return torch.cat(tensors, dim=dim, out=out) if out is not None else torch.cat(tensors, dim=dim)


def stack(tensors, dim: int = 0) -> torch.Tensor:
    """torch.stack."""
    tensors = list(tensors)
    if tensors[0].is_meta:
        shape = list(tensors[0].shape)
        shape.insert(dim if dim >= 0 else len(shape) + 1 + dim, len(tensors))
        return torch.empty(shape, dtype=tensors[0].dtype, device="meta")
    return torch.stack(tensors, dim=dim)


def as_tensor(value) -> torch.Tensor:
    return value.materialize() if isinstance(value, Rows) else value


def _into(out: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor:
    if out is None:
        return tensor
    return out.copy_(tensor)


# ---- fused QKV: HF q/k/v <-> Megatron's per-group order --------------------------------------

def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """[q; k; v] (HF, each contiguous) -> rows grouped per query group: [q_g..., k_g, v_g] for each g."""
    ng = num_query_groups
    tail = q.shape[1:]
    parts = [q.reshape(ng, -1, *tail), k.reshape(ng, -1, *tail), v.reshape(ng, -1, *tail)]
    rows = sum(p.shape[1] for p in parts)
    if out is not None:
        cat(parts, dim=1, out=out.view(ng, rows, *tail))
        return out
    return cat(parts, dim=1).reshape(-1, *tail)


def qkv_targets(out: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """Where `merge_qkv` puts HF rows, as (row_start, row_stop, contiguous view of `out`) per part
    (q, k, v): lets a reader fill `out` straight from a file, with no merge copy."""
    ng, d = num_query_groups, head_dim
    q_rows = num_heads // ng * d
    grouped = out.view(ng, q_rows + 2 * d, *out.shape[1:])
    return ([(g * q_rows, (g + 1) * q_rows, grouped[g, :q_rows]) for g in range(ng)],
            [(g * d, (g + 1) * d, grouped[g, q_rows:q_rows + d]) for g in range(ng)],
            [(g * d, (g + 1) * d, grouped[g, q_rows + d:]) for g in range(ng)])


def split_qkv_rows(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """Inverse of `merge_qkv`, as row pieces of `qkv` (no copy): (q, k, v) in HF order."""
    ng, d = num_query_groups, head_dim
    q_rows = num_heads // ng * d
    step = q_rows + 2 * d
    starts = [g * step for g in range(ng)]
    return (Rows([qkv[s:s + q_rows] for s in starts]),
            Rows([qkv[s + q_rows:s + q_rows + d] for s in starts]),
            Rows([qkv[s + q_rows + d:s + step] for s in starts]))


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """Inverse of `merge_qkv`: grouped rows -> (q, k, v) in HF order."""
    return tuple(part.materialize() for part in split_qkv_rows(qkv, num_heads, num_query_groups, head_dim))


def unpack_hf_qkv(packed: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """An HF-fused `[all Q; all K; all V]` projection (Phi-3 `qkv_proj`) -> (q, k, v) views."""
    q_rows, kv_rows = num_heads * head_dim, num_query_groups * head_dim
    return torch.split(packed, [q_rows, kv_rows, kv_rows], dim=0)


def packed_qkv_targets(out: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """`qkv_targets` for an HF-fused `[Q; K; V]` source: one part, its k and v rows offset."""
    q, k, v = qkv_targets(out, num_heads, num_query_groups, head_dim)
    k_at, v_at = num_heads * head_dim, (num_heads + num_query_groups) * head_dim
    return [q + [(a + k_at, b + k_at, view) for a, b, view in k] + [(a + v_at, b + v_at, view) for a, b, view in v]]


def pack_hf_qkv(q, k, v) -> Rows:
    """Inverse of `unpack_hf_qkv` (q, k, v may be tensors or Rows)."""
    pieces = []
    for part in (q, k, v):
        pieces += part.pieces if isinstance(part, Rows) else [part]
    return Rows(pieces)


# ---- gated MLP: gate/up <-> linear_fc1 ------------------------------------------------------

def merge_gate_up(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return cat([gate, up], dim=0, out=out)


def gate_up_targets(out: torch.Tensor):
    """Where `merge_gate_up` puts gate and up rows (see `qkv_targets`)."""
    gate, up = split_gate_up(out)
    return [(0, gate.shape[0], gate)], [(0, up.shape[0], up)]


def split_gate_up(fc1: torch.Tensor):
    """Inverse of `merge_gate_up` (views, no copy)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


# ---- tensor parallel splits (one pair per parallel kind) ------------------------------------
# Splits return views or Rows (nothing is copied; writers take both); merges take `out` so the
# result can land straight in the memory that travels to the saver.

def split_column(full, tp: int) -> list:
    """Column-parallel: equal contiguous chunks of dim 0."""
    return full.chunk(tp) if isinstance(full, Rows) else list(torch.chunk(full, tp, dim=0))


def merge_column(shards, out: torch.Tensor | None = None) -> torch.Tensor:
    shards = [as_tensor(s) for s in shards]
    if len(shards) == 1:
        return _into(out, shards[0])
    return cat(shards, dim=0, out=out)


def split_row(full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Row-parallel: equal chunks of dim 1 (strided views whose rows are contiguous)."""
    return list(torch.chunk(full, tp, dim=1))


def merge_row(shards, out: torch.Tensor | None = None) -> torch.Tensor:
    if len(shards) == 1:
        return _into(out, shards[0])
    return cat(shards, dim=1, out=out)


def split_gated_column(fc1: torch.Tensor, tp: int) -> list:
    """Gated column-parallel `[G; U]`: rank r holds `[G_r; U_r]`, not the r-th chunk of `[G; U]`."""
    if tp == 1:
        return [fc1]
    gate, up = split_gate_up(fc1)
    return [Rows([g, u]) for g, u in zip(split_column(gate, tp), split_column(up, tp))]


def merge_gated_column(shards, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `split_gated_column`: un-interleave `[G_0; U_0; G_1; U_1; ...]`."""
    shards = [as_tensor(s) for s in shards]
    if len(shards) == 1:
        return _into(out, shards[0])
    pairs = [split_gate_up(shard) for shard in shards]
    if out is None:
        out = torch.empty((sum(s.shape[0] for s in shards), *shards[0].shape[1:]), dtype=shards[0].dtype)
    gate_out, up_out = split_gate_up(out)
    cat([g for g, _ in pairs], dim=0, out=gate_out)
    cat([u for _, u in pairs], dim=0, out=up_out)
    return out


def replicate(full, tp: int) -> list:
    return [full] * tp


def merge_replicated(shards, out: torch.Tensor | None = None) -> torch.Tensor:
    return _into(out, as_tensor(shards[0]))


TP_SPLIT = {
    "column": (split_column, merge_column),
    "row": (split_row, merge_row),
    "gated_column": (split_gated_column, merge_gated_column),
    "replicated": (replicate, merge_replicated),
}


# ---- one-row tensors ---------------------------------------------------------------------------

def from_one_row(row: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[1, n] -> [n]: a vector HF stores as a one-row table (ERNIE 4.5's router score bias)."""
    if row.ndim != 2 or row.shape[0] != 1:
        raise ValueError(f"expected a one-row table, got shape {tuple(row.shape)}")
    return _into(out, row[0])


def to_one_row(vector: torch.Tensor) -> torch.Tensor:
    """Inverse of `from_one_row`."""
    return vector.reshape(1, -1)


# ---- vocabulary padding ----------------------------------------------------------------------

def normalize_rows_(table: torch.Tensor) -> torch.Tensor:
    """Baichuan2's NormHead folded into the weights: each output row divided by its L2 norm, in the
    table's dtype, as the model does in its forward. One way only: the model normalizes again, and
    a normalized row stays one, so the HF side keeps the folded rows."""
    return table.copy_(torch.nn.functional.normalize(table, dim=-1))


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = max(1, divisible_by) * tp
    return -(-vocab_size // multiple) * multiple


def pad_vocab(table: torch.Tensor, padded_rows: int):
    """Append zero rows up to `padded_rows` (only the first `vocab_size` logits are ever used)."""
    extra = padded_rows - table.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad a {table.shape[0]}-row table down to {padded_rows} rows")
    if extra == 0:
        return table
    return Rows([table, table.new_zeros((extra, *table.shape[1:]))])


def unpad_vocab(table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of `pad_vocab`."""
    return table[:vocab_size]


# ---- MindFormers layouts (fused and stacked tensors), each with its inverse ------------------------


def interleave_halves(fused: torch.Tensor) -> torch.Tensor:
    """[G; U] -> rows g0, u0, g1, u1, ... (MindFormers' interleaved fc1)."""
    half = fused.shape[0] // 2
    return stack([fused[:half], fused[half:]], dim=1).reshape(fused.shape)


def deinterleave_halves(interleaved: torch.Tensor) -> torch.Tensor:
    """Inverse of `interleave_halves`."""
    half = interleaved.shape[0] // 2
    pairs = interleaved.reshape(half, 2, *interleaved.shape[1:])
    return cat([pairs[:, 0], pairs[:, 1]], dim=0)


def stack_transposed(blocks: list[torch.Tensor]) -> torch.Tensor:
    """[x_e (R, C)] -> (E*C, R): every block transposed, stacked (MindFormers' experts weight1/weight2)."""
    return stack([b.t() for b in blocks]).reshape(-1, blocks[0].shape[0])


def unstack_transposed(stacked: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Inverse of `stack_transposed` for `count` blocks."""
    rows = stacked.shape[1]
    return list(stacked.reshape(count, -1, rows).transpose(1, 2).unbind(0))


def stack_halves(fused_blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[[G_e; U_e]] -> (stack of G_e, stack of U_e): legacy MindFormers Mixtral w1 / w3 [E, F, H]."""
    halves = [split_gate_up(block) for block in fused_blocks]
    return stack([g for g, _ in halves]), stack([u for _, u in halves])


def unstack_halves(gates: torch.Tensor, ups: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `stack_halves`."""
    return [cat([g, u], dim=0) for g, u in zip(gates.unbind(0), ups.unbind(0))]


# ---- routed experts stored fused in HF: one tensor for all experts of a layer ------------------
# gpt-oss keeps `experts.gate_up_proj` [E, in, 2F] with gate and up columns alternating and
# `experts.down_proj` [E, F, in]; each expert's slab maps to its own Megatron tensor [out, in].

def from_fused_expert(slab: torch.Tensor, *, transposed: bool, interleaved: bool,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert's slab of a fused HF tensor ([in, out] when `transposed`; gate/up rows
    alternating when `interleaved`) -> its Megatron tensor ([out, in], [gate; up])."""
    full = slab.t() if transposed and slab.dim() == 2 else slab
    if interleaved:
        full = deinterleave_halves(full)
    return _into(out, full)


def to_fused_expert(full: torch.Tensor, *, transposed: bool, interleaved: bool) -> torch.Tensor:
    """Inverse of `from_fused_expert` (a view where no reordering is needed)."""
    slab = interleave_halves(full) if interleaved else full
    return slab.t() if transposed and slab.dim() == 2 else slab
