"""Megatron torch_dist checkpoints (torch.distributed.checkpoint stores) read without megatron-core:
the real training save of tests/fixtures/megatron-lm-core_v0.16.1/torch_dist, and bad input.

Conversions of it checked by Megatron-Core are in test_training_checkpoints.py.
"""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hf_builders import with_mtp_layer
from mcore_harness import mcore_logits
from util import (MEGATRON_LM_FIXTURES, assert_one_line_error, assert_same_checkpoint, assert_same_tensors, hf_to_mg,
                  load_hf_state, looks_complete, mg_to_hf, mg_to_mg, run_cli, run_convert)

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits, sample_tokens
from modellink_ckpt.formats.torch_dist import TorchDistStore

FIXTURE = MEGATRON_LM_FIXTURES / "torch_dist"


@pytest.fixture
def dist(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "dist"))


def test_store_reads_what_torch_distributed_checkpoint_reads(dist):
    """Every tensor (TP/PP/layer chunks stitched) equals torch's own dcp.load of it; layer regions
    read alone equal the matching slice."""
    import torch.distributed.checkpoint as dcp

    store = TorchDistStore(dist / "iter_0000007")
    reader = dcp.FileSystemReader(str(dist / "iter_0000007"))
    assert "decoder.layers.mlp.linear_fc1.weight" in store.tensors and store.objects
    for key, entry in store.tensors.items():
        reference = torch.empty(entry.shape, dtype=entry.dtype)
        dcp.load({key: reference}, storage_reader=reader, no_dist=True)
        assert torch.equal(store.read(key), reference), key
        if key.startswith("decoder.layers."):
            assert torch.equal(store.read(key, (slice(1, 2),))[0], reference[1]), key


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _convert(dist, out):
    return run_cli("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama2",
                   "--load-dir", dist, "--save-dir", out)


def test_bad_torch_dist_input_is_one_line(dist, tmp_path):
    iteration = dist / "iter_0000007"
    cases = {}

    def case(name, damage, message):
        broken = Path(shutil.copytree(dist, tmp_path / name))
        damage(broken / "iter_0000007")
        cases[name] = (broken, message)

    case("missing-distcp", lambda d: (d / "__0_1.distcp").unlink(), "__0_1.distcp: missing")
    case("truncated-metadata", lambda d: (d / ".metadata").write_bytes((iteration / ".metadata").read_bytes()[:500]),
         ".metadata: cannot read torch_dist metadata")
    case("truncated-distcp", lambda d: (d / "__0_0.distcp").write_bytes((iteration / "__0_0.distcp").read_bytes()[:9000]),
         "__0_0.distcp")
    marker = tmp_path / "pwned"

    def hostile_common(d):
        state = torch.load(d / "common.pt", weights_only=False)
        state["hook"] = _RunsCode(marker)
        torch.save(state, d / "common.pt")

    case("hostile-common", hostile_common, "refused to load: its pickle references posix.system")

    def hostile_metadata(d):
        with open(d / ".metadata", "wb") as f:
            pickle.dump(_RunsCode(marker), f)

    case("hostile-metadata", hostile_metadata, "refused to load")

    def key_missing(d):  # the store lacks a tensor the model needs
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(str(d))
        metadata = reader.read_metadata()
        del metadata.state_dict_metadata["decoder.final_layernorm.weight"]
        with open(d / ".metadata", "wb") as f:
            pickle.dump(metadata, f)

    case("key-missing", key_missing, "missing tensor 'decoder.final_layernorm.weight'")
    case("no-metadata-json", lambda d: (d / "metadata.json").unlink(), "an incomplete torch_dist checkpoint")
    for name, (broken, message) in cases.items():
        out = tmp_path / f"out-{name}"
        result = _convert(broken, out)
        line = assert_one_line_error(result.returncode, result.stderr, name)
        assert message in line, (name, line)
        assert not looks_complete(out), name
    assert not marker.exists()


# ---- writing torch_dist, loaded by megatron-core's own dist_checkpointing -------------------------------

DIST = ["--ckpt-format", "torch_dist"]


def to_dist(source, out, family, load_type="hf", *flags) -> Path:
    run_convert("--load-model-type", load_type, "--save-model-type", "mg", "--model-type-hf", family,
                "--load-dir", source, "--save-dir", out, *DIST, *flags)
    return Path(out)


@pytest.mark.parametrize("family, layout, flags", [
    pytest.param("llama2", {"tp": 1}, [], id="tp1"),
    pytest.param("llama2", {"tp": 2}, ["--target-tensor-parallel-size", "2"], id="tp2"),
    pytest.param("qwen25", {"pp": 2}, [], id="pp2", marks=pytest.mark.slow),
    pytest.param("qwen3", {"pp": 2, "vpp_layers": 1}, [], id="pp2-vpp2", marks=pytest.mark.slow),
    pytest.param("mixtral", {"ep": 2}, [], id="mixtral-ep2"),
])
def test_megatron_core_loads_our_torch_dist_strictly(tmp_path, family, layout, flags):
    """hf -> torch_dist, loaded by megatron-core's dist_checkpointing.load(strict=RAISE_ALL) into
    a GPTModel at TP1 / TP2 / PP2 / PP2xVPP2 / EP2: logits within 1e-4 of HF; the stored
    vocabulary is padded as Megatron pads it for the target TP (a wrong row count would load
    silently, so it is compared)."""
    hf = build_hf_checkpoint(family, tmp_path / "hf", tokenizer=False)
    out = to_dist(hf, tmp_path / "dist", family, "hf", *flags)
    from modellink_ckpt.formats.torch_dist import TorchDistStore

    store = TorchDistStore(out / "iter_0000001")
    tp = int(flags[flags.index("--target-tensor-parallel-size") + 1]) if flags else 1
    assert store.tensors["embedding.word_embeddings.weight"].shape[0] == -(-503 // tp) * tp
    tokens = sample_tokens(503, batch=2, seq=8)
    expected = hf_logits(hf, tokens)
    got = mcore_logits(out, tokens, layout=layout)[..., :503]
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"{family} {layout}: max |logit diff| {diff:.3g}"
    verified = run_cli("--verify", out)
    assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize("family, flags", [
    pytest.param("llama2", ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"], id="tp2pp2"),
    pytest.param("mixtral", ["--target-expert-parallel-size", "2", "--target-pipeline-parallel-size", "2"],
                 id="mixtral-ep2pp2"),
    pytest.param("qwen3", ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
                 id="pp2-vpp2", marks=pytest.mark.slow),
])
def test_torch_and_torch_dist_round_trips_are_bit_exact(tmp_path, family, flags):
    hf = build_hf_checkpoint(family, tmp_path / "hf", tokenizer=False, dtype=torch.bfloat16)
    legacy = hf_to_mg(hf, tmp_path / "legacy", family, *flags)
    dist = to_dist(legacy, tmp_path / "dist", family, "mg", *flags)
    back = mg_to_mg(dist, tmp_path / "back", family, *flags)
    assert_same_checkpoint(back, legacy)
    dist2 = to_dist(hf, tmp_path / "dist2", family)
    assert_same_tensors(load_hf_state(hf), load_hf_state(mg_to_hf(dist2, tmp_path / "hf_back", family)), "hf->dist->hf")
    run_convert("--load-model-type", "mg", "--save-model-type", "ms", "--model-type-hf", family, "--load-dir", dist2,
                "--save-dir", tmp_path / "ms")  # every target works from torch_dist: MindSpore too
    run_convert("--load-model-type", "ms", "--save-model-type", "hf", "--model-type-hf", family, "--load-dir",
                tmp_path / "ms", "--save-dir", tmp_path / "ms_back")
    assert_same_tensors(load_hf_state(hf), load_hf_state(tmp_path / "ms_back" / "mg2hf"), "hf->dist->ms->hf")


def test_megatron_reads_common_pt_with_weights_only(tmp_path):
    """megatron-core 0.16.1 loads common.pt with weights_only=True (its SAFE_GLOBALS registered):
    what we write loads there, for args we build and for a training run's args carried over
    (Megatron enums, signal.Signals, dtypes)."""
    import signal

    from megatron.core import dist_checkpointing
    from megatron.core.enums import ModelType

    training = Path(shutil.copytree(MEGATRON_LM_FIXTURES / "torch",
                                    tmp_path / "training"))
    carried = to_dist(training, tmp_path / "carried", "llama2", "mg")
    hf = build_hf_checkpoint("llama2", tmp_path / "hf", tokenizer=False)
    built = to_dist(hf, tmp_path / "built", "llama2")
    for out, iteration in ((carried, 7), (built, 1)):
        common = dist_checkpointing.load_common_state_dict(str(out / f"iter_{iteration:07d}"))
        assert common["iteration"] == iteration and common["checkpoint_version"] == 3.0
        assert common["args"].no_save_optim and common["args"].no_save_rng
        assert common["args"].ckpt_format == "torch_dist"
    args = dist_checkpointing.load_common_state_dict(str(carried / "iter_0000007"))["args"]
    assert args.model_type is ModelType.encoder_or_decoder and args.exit_signal is signal.SIGTERM


@pytest.mark.parametrize("family, flags", [
    pytest.param("mixtral", ["--target-expert-parallel-size", "2"], id="mixtral-ep2"),
    pytest.param("llama2", ["--target-tensor-parallel-size", "2"], id="dense-tp2", marks=pytest.mark.slow),
])
def test_torch_dist_saved_by_megatron_core_reads_like_the_torch_format(tmp_path, family, flags):
    """megatron-core's own dist_checkpointing.save of a model (EP2 MoE, TP2 dense) -> hf and -> mg
    torch: tensor by tensor what the same weights give from the torch format."""
    from mcore_harness import mcore_save_dist

    hf = build_hf_checkpoint(family, tmp_path / "hf", tokenizer=False)
    legacy = hf_to_mg(hf, tmp_path / "legacy", family, *flags)
    mcore_save_dist(legacy, tmp_path / "saved")
    assert_same_tensors(load_hf_state(mg_to_hf(tmp_path / "saved", tmp_path / "from_dist", family)),
                        load_hf_state(mg_to_hf(legacy, tmp_path / "from_torch", family)), "megatron's torch_dist")
    assert_same_checkpoint(mg_to_mg(tmp_path / "saved", tmp_path / "mg_from_dist", family, *flags), legacy)


@pytest.mark.slow
def test_deepseek3_torch_dist_with_per_layer_keys(tmp_path):
    """DeepSeek-V3 (dense first layer, MoE after, MLA): megatron-core stores per-layer keys; it
    loads ours strictly at TP1 with the HF logits, and round-trips bit-exactly."""
    hf = build_hf_checkpoint("deepseek3", tmp_path / "hf", tokenizer=False)
    out = to_dist(hf, tmp_path / "dist", "deepseek3", "hf", "--mla-spelling", "mcore")
    tokens = sample_tokens(503, batch=2, seq=8)
    diff = (mcore_logits(out, tokens)[..., :503] - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= 1e-4, diff
    assert_same_tensors(load_hf_state(hf), load_hf_state(mg_to_hf(out, tmp_path / "back", "deepseek3")), "deepseek3")


@pytest.mark.parametrize("spelling", ["mcore", "mindspeed"])
def test_mtp_layers_in_torch_dist_round_trip(tmp_path, spelling):
    """DeepSeek-V3 with a multi-token-prediction layer: torch_dist stores it under megatron-core's
    keys (`mtp.layers.0.{enorm,hnorm,eh_proj,final_layernorm}` and the layer's own
    `mtp.layers.0.transformer_layer.*`, experts on a global axis); hf -> torch_dist -> hf and
    torch (either MLA spelling, TP2 EP2 PP2) -> torch_dist -> torch are bit-exact."""
    base = build_hf_checkpoint("deepseek3", tmp_path / "base", tokenizer=False, dtype=torch.bfloat16)
    hf, _ = with_mtp_layer(base, tmp_path / "hf")
    mtp = ("--mtp-num-layers", "1")
    dist = to_dist(hf, tmp_path / "dist", "deepseek3", "hf", *mtp, "--mla-spelling", spelling)
    from modellink_ckpt.formats.torch_dist import TorchDistStore

    stored = set(TorchDistStore(dist / "iter_0000001").tensors)
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
            "mtp.layers.0.final_layernorm.weight"} <= stored
    assert any(k.startswith("mtp.layers.0.transformer_layer.mlp.experts.experts.") for k in stored)
    assert_same_tensors(load_hf_state(hf), load_hf_state(mg_to_hf(dist, tmp_path / "back", "deepseek3")), "hf->dist->hf")
    verified = run_cli("--verify", dist)
    assert verified.returncode == 0, verified.stderr
    flags = ("--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
             "--target-pipeline-parallel-size", "2", "--mla-spelling", spelling)
    legacy = hf_to_mg(hf, tmp_path / "legacy", "deepseek3", *mtp, *flags)
    dist2 = to_dist(legacy, tmp_path / "dist2", "deepseek3", "mg")
    assert_same_checkpoint(mg_to_mg(dist2, tmp_path / "legacy2", "deepseek3", *flags), legacy)


@pytest.mark.slow
def test_megatron_core_loads_mtp_layers_from_our_torch_dist(tmp_path):
    """megatron-core builds DeepSeek-V3 with its MTP block and loads our torch_dist strictly (every
    MTP key requested is there, none left over); the main head's logits are the HF model's."""
    base = build_hf_checkpoint("deepseek3", tmp_path / "base", tokenizer=False)
    hf, _ = with_mtp_layer(base, tmp_path / "hf")
    out = to_dist(hf, tmp_path / "dist", "deepseek3", "hf", "--mla-spelling", "mcore", "--mtp-num-layers", "1")
    tokens = sample_tokens(503, batch=2, seq=8)
    diff = (mcore_logits(out, tokens)[..., :503] - hf_logits(base, tokens)).abs().max().item()
    assert diff <= 1e-4, diff



@pytest.mark.slow
def test_torch_dist_saved_after_training_steps_reads_like_the_torch_save(tmp_path):
    """A MoE model (EP2, 4 experts, bf16 with fp32 main params) trained for real Adam steps by
    megatron-core's DDP + DistributedOptimizer, then saved by the same run both ways: its
    dist_checkpointing.save converts to hf tensor for tensor like its torch-format save."""
    import optim_fixtures as F

    spec = F.Spec(moe=True, ep=2, dtype="bf16", save_dist=True)
    run = F.make_fixture(spec)
    try:
        from_dist = mg_to_hf(run / "dist", tmp_path / "from_dist", "mixtral")
        from_torch = mg_to_hf(run / "ckpt", tmp_path / "from_torch", "mixtral")
        assert_same_tensors(load_hf_state(from_torch), load_hf_state(from_dist), "after training: dist vs torch")
    finally:
        shutil.rmtree(run, ignore_errors=True)
