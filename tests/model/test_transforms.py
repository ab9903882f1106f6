"""Every tensor transform against its inverse and against the layout it must produce."""

import pytest
import torch

from modellink_ckpt.model import transforms as T


@pytest.mark.parametrize("nh, ng, d", [(8, 8, 4), (8, 2, 4), (8, 1, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_merge_groups_heads_and_splits_back(nh, ng, d, bias):
    tail = () if bias else (6,)
    q, k, v = torch.randn(nh * d, *tail), torch.randn(ng * d, *tail), torch.randn(ng * d, *tail)
    fused = T.merge_qkv(q, k, v, ng)
    per_group = nh // ng * d
    rows = fused.reshape(ng, per_group + 2 * d, *tail)
    for g in range(ng):  # megatron-format.md §5: [q heads of group g; k_g; v_g]
        assert torch.equal(rows[g, :per_group], q[g * per_group:(g + 1) * per_group])
        assert torch.equal(rows[g, per_group:per_group + d], k[g * d:(g + 1) * d])
        assert torch.equal(rows[g, per_group + d:], v[g * d:(g + 1) * d])
    for got, want in zip(T.split_qkv(fused, nh, ng, d), (q, k, v)):
        assert torch.equal(got, want)


def test_hf_packed_qkv_round_trip():
    q, k, v = torch.randn(32, 5), torch.randn(8, 5), torch.randn(8, 5)
    packed = T.as_tensor(T.pack_hf_qkv(q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(T.unpack_hf_qkv(packed, 8, 2, 4), (q, k, v)))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_column_split_puts_gate_and_up_chunks_on_each_rank(tp):
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    fc1 = T.merge_gate_up(gate, up)
    shards = T.split_gated_column(fc1, tp)
    for r, shard in enumerate(shards):
        g, u = torch.chunk(T.as_tensor(shard), 2)
        assert torch.equal(g, gate.chunk(tp)[r]) and torch.equal(u, up.chunk(tp)[r])
    assert torch.equal(T.merge_gated_column(shards), fc1)


@pytest.mark.parametrize("kind", ["column", "row", "replicated", "gated_column"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_split_and_merge_are_inverse(kind, tp):
    split, merge = T.TP_SPLIT[kind]
    full = torch.randn(8, 8).to(torch.bfloat16)
    shards = split(full, tp)
    assert len(shards) == tp and all(s.dtype == torch.bfloat16 for s in shards)
    assert torch.equal(merge(shards), full)


def test_vocab_padding_round_trip():
    table = torch.randn(503, 4)
    padded = T.as_tensor(T.pad_vocab(table, T.padded_vocab_size(503, 128, 2)))
    assert padded.shape == (512, 4) and torch.all(padded[503:] == 0)
    assert torch.equal(T.unpad_vocab(padded, 503), table)


def test_rows_slice_across_pieces_like_the_concatenated_tensor():
    pieces = [torch.randn(3, 4), torch.randn(5, 4), torch.randn(0, 4), torch.randn(4, 4)]
    rows, full = T.Rows(pieces), torch.cat(pieces)
    assert rows.shape == full.shape and rows.nbytes == full.nbytes
    for start, stop in [(0, 12), (2, 7), (3, 8), (7, 12), (5, 5)]:
        assert torch.equal(T.as_tensor(rows.rows(start, stop)), full[start:stop])
    assert all(torch.equal(T.as_tensor(c), f) for c, f in zip(rows.chunk(4), full.chunk(4)))


@pytest.mark.parametrize("kind", ["column", "row", "gated_column", "replicated"])
def test_merges_can_write_into_given_memory(kind):
    split, merge = T.TP_SPLIT[kind]
    full = torch.randn(8, 6)
    out = torch.empty_like(full)
    assert merge(split(full, 2), out=out) is out and torch.equal(out, full)
    q, k, v = torch.randn(16, 6), torch.randn(4, 6), torch.randn(4, 6)
    fused = torch.empty(24, 6)
    assert T.merge_qkv(q, k, v, 2, out=fused) is fused and torch.equal(fused, T.merge_qkv(q, k, v, 2))


@pytest.mark.parametrize("nh, ng, d", [(8, 8, 4), (8, 2, 4), (8, 1, 16)])
def test_row_targets_place_hf_rows_exactly_where_the_merges_do(nh, ng, d):
    q, k, v = torch.randn(nh * d, 6), torch.randn(ng * d, 6), torch.randn(ng * d, 6)

    def fill(targets_per_part, parts, rows):
        out = torch.full((rows, 6), float("nan"))
        for part, targets in zip(parts, targets_per_part(out)):
            for start, stop, view in targets:
                assert view.is_contiguous()
                view.copy_(part[start:stop])
        return out

    rows = (nh + 2 * ng) * d
    assert torch.equal(fill(lambda o: T.qkv_targets(o, nh, ng, d), (q, k, v), rows), T.merge_qkv(q, k, v, ng))
    packed = T.as_tensor(T.pack_hf_qkv(q, k, v))
    assert torch.equal(fill(lambda o: T.packed_qkv_targets(o, nh, ng, d), (packed,), rows), T.merge_qkv(q, k, v, ng))
    gate, up = torch.randn(10, 6), torch.randn(10, 6)
    assert torch.equal(fill(T.gate_up_targets, (gate, up), 20), T.merge_gate_up(gate, up))
