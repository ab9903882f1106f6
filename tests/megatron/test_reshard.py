"""mg -> mg resharding equals a direct hf -> mg conversion to the target, tensor by tensor."""

import pytest
import torch
from util import assert_same_checkpoint, hf_to_mg, load_mg_state, mg_to_mg

from modellink_ckpt.demo.models import build_hf_checkpoint

TP2PP2 = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]
TP1PP4_NOOP = ["--target-pipeline-parallel-size", "4", "--noop-layers", "2,5"]
TP4PP1 = ["--target-tensor-parallel-size", "4", "--make-vocab-size-divisible-by", "128"]
PP2_VPP = ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chain_of_reshards_equals_direct_conversion(tmp_path, dtype):
    hf = build_hf_checkpoint("llama2", tmp_path / "hf", dtype=dtype, num_layers=6, tokenizer=False)
    a = hf_to_mg(hf, tmp_path / "a", "llama2", *TP2PP2)
    b = mg_to_mg(a, tmp_path / "b", "llama2", *TP1PP4_NOOP)
    assert_same_checkpoint(b, hf_to_mg(hf, tmp_path / "b_direct", "llama2", *TP1PP4_NOOP))
    c = mg_to_mg(b, tmp_path / "c", "llama2", *TP4PP1)
    assert_same_checkpoint(c, hf_to_mg(hf, tmp_path / "c_direct", "llama2", *TP4PP1))
    d = mg_to_mg(c, tmp_path / "d", "llama2", *PP2_VPP)  # keeps c's padding rule (divisible by 128)
    assert_same_checkpoint(d, hf_to_mg(hf, tmp_path / "d_direct", "llama2", *PP2_VPP,
                                       "--make-vocab-size-divisible-by", "128"))


def test_reshard_tied_qwen3_with_uneven_pipeline(tmp_path):
    hf = build_hf_checkpoint("qwen3", tmp_path / "hf", tie_word_embeddings=True, tokenizer=False)
    uneven = ["--target-pipeline-parallel-size", "2", "--num-layer-list", "3,1", "--target-tensor-parallel-size", "2"]
    a = hf_to_mg(hf, tmp_path / "a", "qwen3", "--target-pipeline-parallel-size", "4")
    b = mg_to_mg(a, tmp_path / "b", "qwen3", *uneven)
    assert_same_checkpoint(b, hf_to_mg(hf, tmp_path / "b_direct", "qwen3", *uneven))
    last = load_mg_state(b)["mp_rank_01_001"]["model"]
    first = load_mg_state(b)["mp_rank_01_000"]["model"]
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
