"""Megatron-LM's own training loader accepts what we write: `load_checkpoint` of Megatron-LM
core_v0.16.1 (vendored, see `megatron_lm.py`) with a real optimizer, on a training command line for
the same model, loads our torch_dist and torch output strictly, the loaded model gives transformers'
logits, and one more training step runs. Slow tier: each case starts a Megatron-LM run."""

import pytest
import torch
from megatron_lm import load_with_megatron_lm
from util import hf_to_mg

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits, sample_tokens

pytestmark = pytest.mark.slow

VOCAB = 503
# the Megatron-LM command line of the model build_hf_checkpoint("llama2") makes
MODEL_FLAGS = ("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "160", "--num-attention-heads", "8",
               "--group-query-attention", "--num-query-groups", "4", "--swiglu", "--normalization", "RMSNorm",
               "--norm-epsilon", "1e-5", "--position-embedding-type", "rope", "--rotary-base", "10000",
               "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--seq-length", "16",
               "--max-position-embeddings", "4096", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "128")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return build_hf_checkpoint("llama2", tmp_path_factory.mktemp("mlm") / "hf", num_layers=2, tokenizer=False)


def _check(result, hf, tokens, run_flags):
    # a resume goes on from our iteration (1 from HF), a fine-tuning run starts at 0
    assert result["iteration"] == (0 if "--finetune" in run_flags else 1)
    diff = (result["logits"][..., :VOCAB] - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= 1e-4, diff
    assert result["updated"] and torch.isfinite(torch.tensor(result["loss"]))


# a weights-only checkpoint: Megatron-LM 0.16.1 still reads `state_dict['optimizer']` on a resume
# with an optimizer unless told --no-load-optim (our args' no_save_optim only keeps the optimizer out
# of the sharded load), whatever the format
RESUME = ("--no-load-optim", "--no-load-rng")


@pytest.mark.parametrize("run_flags", [RESUME, ("--finetune",)], ids=["resume", "finetune"])
def test_megatron_lm_loads_our_torch_dist_at_another_tp(tmp_path, hf, run_flags):
    """Written at TP1, read by a TP2 run (torch_dist is layout-free)."""
    mg = hf_to_mg(hf, tmp_path / "mg", "llama2", "--ckpt-format", "torch_dist", "--make-vocab-size-divisible-by", "128")
    tokens = sample_tokens(VOCAB, seq=12)
    result = load_with_megatron_lm(mg, [*MODEL_FLAGS, "--ckpt-format", "torch_dist", "--tensor-model-parallel-size",
                                        "2", *run_flags], tokens, world=2)
    _check(result, hf, tokens, run_flags)


@pytest.mark.parametrize("run_flags", [RESUME, ("--finetune",)], ids=["resume", "finetune"])
def test_megatron_lm_loads_our_torch_output(tmp_path, hf, run_flags):
    """The legacy torch format at the run's own TP2: Megatron-LM reads our rank files itself."""
    mg = hf_to_mg(hf, tmp_path / "mg", "llama2", "--make-vocab-size-divisible-by", "128",
                  "--target-tensor-parallel-size", "2")
    tokens = sample_tokens(VOCAB, seq=12)
    result = load_with_megatron_lm(mg, [*MODEL_FLAGS, "--ckpt-format", "torch", "--tensor-model-parallel-size", "2",
                                        *run_flags], tokens, world=2)
    _check(result, hf, tokens, run_flags)
