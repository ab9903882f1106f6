"""The layout plan on its own: placement of layers, noop slots, VPP chunks, validation."""

import pytest

from modellink_ckpt.errors import UsageError
from modellink_ckpt.model.layout import ParallelLayout


def placement(layout):
    return [(s.mg_layer, s.pp_rank, s.vchunk, s.local_layer, s.hf_layer) for s in layout.slots()]


def test_uniform_pipeline_stages_hold_consecutive_layers_with_local_indices():
    layout = ParallelLayout.build(8, tp=2, pp=4)
    assert [(s.pp_rank, s.local_layer) for s in layout.slots()] == [(p, i) for p in range(4) for i in range(2)]
    assert layout.rank_dir(1, 3) == "mp_rank_01_003"
    assert ParallelLayout.build(8).rank_dir(0, 0) == "mp_rank_00"
    assert layout.model_key(0) == "model"


def test_num_layer_list_gives_uneven_stages():
    layout = ParallelLayout.build(6, pp=3, num_layer_list="1,3,2")
    assert [s.pp_rank for s in layout.slots()] == [0, 1, 1, 1, 2, 2]
    assert [s.local_layer for s in layout.slots()] == [0, 0, 1, 2, 0, 1]


def test_vpp_interleaves_chunks_across_stages():
    layout = ParallelLayout.build(8, pp=2, vpp_layers=2)
    assert layout.vpp == 2
    # chunk v of stage p holds global layers [(v*PP+p)*Lv, (v*PP+p+1)*Lv)
    assert [(s.pp_rank, s.vchunk, s.local_layer) for s in layout.slots()] == [
        (0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
    assert layout.model_key(1) == "model1"
    assert layout.last_stage == (1, 1)
    assert layout.last_hf_layer_of_stage(0) == 5


def test_noop_slots_hold_no_hf_layer_and_keep_local_numbering():
    layout = ParallelLayout.build(6, pp=2, noop_layers="1,7")
    assert layout.num_layers == 8
    assert placement(layout) == [
        (0, 0, 0, 0, 0), (1, 0, 0, 1, None), (2, 0, 0, 2, 1), (3, 0, 0, 3, 2),
        (4, 1, 0, 0, 3), (5, 1, 0, 1, 4), (6, 1, 0, 2, 5), (7, 1, 0, 3, None)]
    assert layout.slot_of_hf_layer()[1].local_layer == 2


def test_padded_vocab_is_multiple_of_divisor_times_tp():
    assert ParallelLayout.build(4, tp=2).padded_vocab(503, 128) == 512
    assert ParallelLayout.build(4, tp=4).padded_vocab(503, 128) == 512
    assert ParallelLayout.build(4, tp=8).padded_vocab(1100, 128) == 2048
    assert ParallelLayout.build(4, tp=2).padded_vocab(503, 1) == 504


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=3, num_heads=8, num_query_groups=4), "does not divide the 4 query groups"),
    (dict(pp=3), "does not divide the 8 layers"),
    (dict(pp=2, num_layer_list="3,3"), "sum to 8"),
    (dict(pp=2, num_layer_list="8"), "needs 2 entries"),
    (dict(pp=2, num_layer_list="4,4", vpp_layers=2), "exclusive"),
    (dict(pp=2, vpp_layers=3), "does not divide the 4 layers per pipeline stage"),
    (dict(noop_layers="12"), "outside the 9 Megatron layers"),
    (dict(num_layer_list="x,y", pp=2), "comma-separated integers"),
])
def test_invalid_layouts_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ParallelLayout.build(8, **kwargs)


def test_noop_layers_can_make_pp_fit():
    layout = ParallelLayout.build(7, pp=4, noop_layers="7")
    assert layout.stage_layer_counts() == (2, 2, 2, 2)
