"""Checkpoints written by Megatron-LM's own training code (`tests/fixtures/megatron-lm-core_v0.16.1`,
see its README): what a training run pickles loads, converts, and comes back out for training.

The fixtures are copied to a temporary folder first and never modified.
"""

import shutil
from pathlib import Path

import pytest
import torch
from mcore_harness import mcore_logits
from util import (MEGATRON_LM_FIXTURES, assert_one_line_error, assert_same_tensors, load_hf_state, load_mg_state,
                  looks_complete, mg_to_hf, mg_to_mg, run_cli)

from modellink_ckpt.demo.models import hf_logits, sample_tokens
from modellink_ckpt.formats.megatron.args import CONTENT_FIELDS, FORMAT_FIELDS, LAYOUT_FIELDS
from modellink_ckpt.formats.safe_pickle import Placeholder
from modellink_ckpt.formats.torch_zip import load_lazy

FIXTURES = MEGATRON_LM_FIXTURES
VOCAB = 127  # padded to 128 in the checkpoint


@pytest.fixture
def training_ckpt(tmp_path) -> Path:
    """A copy of the torch-format training checkpoint (iteration 7, TP1 PP1, bf16)."""
    return Path(shutil.copytree(FIXTURES / "torch", tmp_path / "training"))


def test_training_args_load_with_their_enums(training_ckpt):
    args = load_lazy(training_ckpt / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt")["args"]
    import signal

    assert args.exit_signal is signal.SIGTERM  # rebuilt by member lookup: the real enum member
    assert isinstance(args.model_type, Placeholder) and args.model_type.args == (1,)  # megatron: inert
    assert isinstance(args.attention_backend, Placeholder)
    assert args.params_dtype is torch.bfloat16 and args.padded_vocab_size == 128


def test_training_checkpoint_to_hf_matches_megatron_core(training_ckpt, tmp_path):
    """torch format -> HF: transformers' logits on our output equal those of a Megatron-Core
    GPTModel loaded from the training checkpoint itself."""
    hf = mg_to_hf(training_ckpt, tmp_path / "out", "llama2")
    tokens = sample_tokens(VOCAB, batch=2, seq=8)
    reference = mcore_logits(training_ckpt, tokens)[..., :VOCAB]
    got = hf_logits(hf, tokens, dtype=torch.float32)
    diff = (got - reference).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.3g}"
    verified = run_cli("--verify", hf)
    assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize("layout", [
    pytest.param(["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"], id="tp2pp2"),
    pytest.param(["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], id="pp2vpp2",
                 marks=pytest.mark.slow),
])
def test_training_checkpoint_reshards_and_keeps_its_args(training_ckpt, tmp_path, layout):
    """torch format -> mg at another layout: Megatron-Core loads it (strict) with the original
    logits; the stored args are the training run's own, with only the layout fields changed, so
    Megatron-LM resumes with the same arguments; the iteration is kept."""
    out = mg_to_mg(training_ckpt, tmp_path / "resharded", "llama2", *layout)
    tokens = sample_tokens(VOCAB, batch=2, seq=8)
    diff = (mcore_logits(out, tokens)[..., :VOCAB] - mcore_logits(training_ckpt, tokens)[..., :VOCAB]).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.3g}"

    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    source = load_mg_state(training_ckpt)["mp_rank_00"]["args"]  # torch.load: megatron's real classes
    for rank, state in load_mg_state(out).items():
        args = state["args"]
        assert state["iteration"] == 7
        changed = {k for k in set(vars(args)) | set(vars(source))
                   if getattr(args, k, None) != getattr(source, k, None)}
        allowed = set(LAYOUT_FIELDS) | set(CONTENT_FIELDS)  # and what the checkpoint holds: weights only
        assert changed <= allowed, f"{rank}: non-layout args changed: {sorted(changed - allowed)}"
        assert args.no_save_optim and args.no_save_rng
        assert args.exit_signal == source.exit_signal and type(args.model_type) is type(source.model_type)
        assert args.model_type == source.model_type and args.attention_backend == source.attention_backend
        assert args.make_vocab_size_divisible_by == 128  # as the run computes it at the new TP
        assert args.padded_vocab_size == 128 * args.tensor_model_parallel_size
    verified = run_cli("--verify", out)
    assert verified.returncode == 0, verified.stderr


class _InstallsHandler:
    """Unpickling this would install a signal handler (signal.signal, next to the allowed enum)."""

    def __reduce__(self):
        import signal

        return signal.signal, (signal.SIGUSR1, signal.SIG_IGN)


def test_training_checkpoint_smuggling_a_signal_function_is_refused(training_ckpt, tmp_path):
    path = training_ckpt / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)  # the fixture is trusted; the tampered copy is not
    state["args"].exit_handler = _InstallsHandler()
    torch.save(state, path)
    result = run_cli("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama2",
                     "--load-dir", training_ckpt, "--save-dir", tmp_path / "out")
    line = assert_one_line_error(result.returncode, result.stderr)
    assert "signal.signal" in line and str(path) in line
    assert not looks_complete(tmp_path / "out")


# ---- the same training run saved as torch_dist (megatron-core's dist_checkpointing store) -------------


@pytest.fixture
def training_dist(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "torch_dist", tmp_path / "training_dist"))


def test_torch_dist_training_checkpoint_converts_like_the_torch_one(training_ckpt, training_dist, tmp_path):
    """The run's torch_dist save gives the same HF tensors as its torch save (whose HF logits
    match Megatron-Core above), and reshards into a legacy checkpoint that Megatron-Core loads
    with the training checkpoint's logits and the training run's args."""
    from_dist = mg_to_hf(training_dist, tmp_path / "from_dist", "llama2")
    from_torch = mg_to_hf(training_ckpt, tmp_path / "from_torch", "llama2")
    assert_same_tensors(load_hf_state(from_dist), load_hf_state(from_torch), "torch_dist vs torch")
    out = mg_to_mg(training_dist, tmp_path / "legacy_tp2", "llama2", "--target-tensor-parallel-size", "2")
    tokens = sample_tokens(VOCAB, batch=2, seq=8)
    diff = (mcore_logits(out, tokens)[..., :VOCAB] - mcore_logits(training_ckpt, tokens)[..., :VOCAB]).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.3g}"
    args = load_lazy(out / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt")["args"]
    source = load_lazy(training_dist / "iter_0000007" / "common.pt")["args"]
    changed = {k for k in set(vars(args)) | set(vars(source)) if getattr(args, k, None) != getattr(source, k, None)}
    allowed = set(LAYOUT_FIELDS) | set(FORMAT_FIELDS) | set(CONTENT_FIELDS)
    assert changed <= allowed, sorted(changed - allowed)
    assert (source.ckpt_format, args.ckpt_format, args.use_dist_ckpt) == ("torch_dist", "torch", False)
