"""Nothing left behind: every source tensor is converted or is on the named list of derivable ones;
a family that does not fit the checkpoint is refused before anything is written, naming the
tensors and the families that do fit. Without --model-type-hf the family is found and said."""

import json
import shutil

import pytest
import torch
from hf_builders import with_mtp_layer
from safetensors.torch import load_file, save_file
from util import (MEGATRON_LM_FIXTURES, assert_one_line_error, assert_same_tensors, cli_argv, load_hf_state,
                  looks_complete, run_argv, staging_leftovers)

from modellink_ckpt.demo.models import build_hf_checkpoint


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """One tiny checkpoint per family, built once."""
    root = tmp_path_factory.mktemp("accounting")
    return lambda family: build_hf_checkpoint(family, root / family, num_layers=2, tokenizer=False) \
        if not (root / family).exists() else root / family


def _convert(load_dir, save_dir, *flags, family: str | None = None, load_type="hf", save_type="mg"):
    argv = [a for a in cli_argv(load_type, save_type, load_dir, save_dir, *flags, quiet=False)]
    i = argv.index("--model-type-hf")
    if family is None:
        del argv[i:i + 2]
    else:
        argv[i + 1] = family
    return run_argv(argv)


def _refused(result, save_dir, *needles, code=2):
    line = assert_one_line_error(result.returncode, result.stderr)
    assert result.returncode == code, result.stderr
    for needle in needles:
        assert needle in line, line
    assert not looks_complete(save_dir) and not staging_leftovers(save_dir)
    return line


@pytest.mark.parametrize("source,family,left,fits", [
    ("qwen25", "llama2", "model.layers.0.self_attn.k_proj.bias", "qwen25"),   # qkv biases dropped
    ("qwen3", "llama2", "model.layers.0.self_attn.k_norm.weight", "qwen3"),   # q/k norms dropped
    ("mixtral", "llama2", "model.layers.0.block_sparse_moe.experts.0.w1.weight", "mixtral"),  # read as dense
])
def test_a_family_that_drops_tensors_is_refused_naming_them(tmp_path, hf, source, family, left, fits):
    result = _convert(hf(source), tmp_path / "mg", family=family)
    line = _refused(result, tmp_path / "mg", f"--model-type-hf {family} would leave behind", left,
                    f"families that convert it whole: {fits}")
    assert "tensor(s)" in line


@pytest.mark.parametrize("source,family,missing,fits", [
    ("llama2", "qwen25", "model.layers.0.self_attn.k_proj.bias", "llama2"),
    ("llama2", "qwen3", "model.layers.0.self_attn.k_norm.weight", "llama2"),
])
def test_a_family_that_needs_absent_tensors_is_refused(tmp_path, hf, source, family, missing, fits):
    result = _convert(hf(source), tmp_path / "mg", family=family)
    _refused(result, tmp_path / "mg", f"--model-type-hf {family} needs tensor '{missing}'",
             f"families that convert it whole: {fits}")


def test_a_family_whose_sizes_the_config_lacks_is_refused(tmp_path, hf):
    result = _convert(hf("llama2"), tmp_path / "mg", family="deepseek2-lite")
    _refused(result, tmp_path / "mg", "config.json: missing 'kv_lora_rank' (needed for --model-type-hf deepseek2-lite)",
             code=1)  # an input problem (errors.py), found before writing


def _with_extra(src, dst, extra: dict):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state.update(extra)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_stray_tensor_is_refused_and_no_family_claims_it(tmp_path, hf):
    source = _with_extra(hf("llama2"), tmp_path / "hf", {"model.layers.1.mlp.extra_proj.weight": torch.ones(4, 4)})
    result = _convert(source, tmp_path / "mg")
    _refused(result, tmp_path / "mg", "model.layers.1.mlp.extra_proj.weight",
             "no family in the model config converts it whole")


def test_derivable_tensors_are_not_counted(tmp_path, hf):
    """rotary inv_freq (older transformers saved it) is recomputed; the copy of a tied embedding
    is the embedding."""
    base = hf("qwen25-tied")
    state = load_file(base / "model.safetensors")
    assert "lm_head.weight" not in state
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8),
             "lm_head.weight": state["model.embed_tokens.weight"].clone()}
    source = _with_extra(base, tmp_path / "hf", extra)
    result = _convert(source, tmp_path / "mg", "--target-pipeline-parallel-size", "2")
    assert result.returncode == 0, result.stderr
    assert "family: --model-type-hf qwen25" in result.stdout  # found, then said
    out = tmp_path / "out"
    result = _convert(tmp_path / "mg", out, load_type="mg", save_type="hf")
    assert result.returncode == 0, result.stderr
    assert_same_tensors(load_hf_state(base), load_hf_state(out / "mg2hf"))


@pytest.mark.parametrize("family", ["llama2", "qwen25", "qwen3", "qwen25-tied", "mixtral", "qwen3-moe",
                                    "deepseek2-lite", "deepseek3"])
def test_without_model_type_hf_the_family_is_found_and_said(tmp_path, hf, family):
    expected = {"qwen25-tied": "qwen25"}.get(family, family)
    result = _convert(hf(family), tmp_path / "mg", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"family: --model-type-hf {expected} (from config.json model_type" in result.stdout


def test_mg_source_uses_the_family_its_args_record(tmp_path, hf):
    source = hf("qwen3")
    mg = tmp_path / "mg"
    assert _convert(source, mg, family="qwen3").returncode == 0
    result = _convert(mg, tmp_path / "out", load_type="mg", save_type="hf")
    assert result.returncode == 0, result.stderr
    assert "family: --model-type-hf qwen3 (recorded in its args)" in result.stdout
    assert_same_tensors(load_hf_state(source), load_hf_state(tmp_path / "out" / "mg2hf"))


def test_mtp_layers_are_never_dropped_silently(tmp_path):
    base = build_hf_checkpoint("deepseek3", tmp_path / "base", num_layers=2, tokenizer=False)
    source, layers = with_mtp_layer(base, tmp_path / "hf")
    result = _convert(source, tmp_path / "mg")
    _refused(result, tmp_path / "mg", "holds 1 multi-token-prediction layer(s)", f"model.layers.{layers}.",
             "--mtp-num-layers 1 to convert them", "--mtp-num-layers 0 to leave them out")
    assert _convert(source, tmp_path / "mg", "--mtp-num-layers", "0").returncode == 0


def test_an_unknown_model_type_without_a_fitting_family_asks_for_the_flag(tmp_path, hf):
    source = _with_extra(hf("llama2"), tmp_path / "hf", {"model.layers.1.mlp.extra_proj.weight": torch.ones(4, 4)})
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="mystery", architectures=["MysteryForCausalLM"])
    (source / "config.json").write_text(json.dumps(config))
    result = _convert(source, tmp_path / "mg")
    _refused(result, tmp_path / "mg", "model_type 'mystery'", "pass --model-type-hf")


# ---- an explicit family must convert the model the source describes ---------------------------

FIXTURE = MEGATRON_LM_FIXTURES / "torch"


@pytest.mark.parametrize("source,family,model_type", [
    ("llama2", "mixtral", "llama"),    # read as MoE: written with 0 experts
    ("llama2", "gemma", "llama"),      # zero-centred norms: other logits, every tensor present
    ("qwen3", "qwen3-moe", "qwen3"),   # a dense Qwen3 as Qwen3-MoE
])
def test_an_explicit_family_that_contradicts_config_json_is_refused(tmp_path, hf, source, family, model_type):
    result = _convert(hf(source), tmp_path / "mg", family=family)
    line = _refused(result, tmp_path / "mg", f"--model-type-hf {family}", f"model_type '{model_type}'",
                    f"which {family} does not convert", "families that fit:", "--skip-family-check")
    assert not (tmp_path / "mg").exists(), line


def test_mindspeed_scripts_keep_llama2_for_llama_architecture_models_and_qwen25_with_qkv_bias(tmp_path, hf):
    """MindSpeed-LLM's long-standing routes: --model-type-hf llama2 on Llama-architecture configs,
    and llama2 --add-qkv-bias on Qwen2.5 (model_type qwen2), in both directions."""
    for source, flags in (("llama2", ()), ("qwen25", ("--add-qkv-bias",))):
        mg = tmp_path / f"mg-{source}"
        assert _convert(hf(source), mg, *flags, family="llama2").returncode == 0
        result = _convert(mg, tmp_path / f"out-{source}", family="llama2", load_type="mg", save_type="hf")
        assert result.returncode == 0, result.stderr
        assert_same_tensors(load_hf_state(hf(source)), load_hf_state(tmp_path / f"out-{source}" / "mg2hf"))


@pytest.mark.parametrize("family,evidence", [
    ("mixtral", "records family llama2 (model_type 'llama'), which mixtral does not convert"),
    ("gemma", "records family llama2 (model_type 'llama'), which gemma does not convert"),
])
def test_an_explicit_family_that_contradicts_the_recorded_one_is_refused(tmp_path, hf, family, evidence):
    """mg -> hf with no HF config.json at hand (the output's config would be built from the family):
    the family our own checkpoint records is the evidence."""
    mg = tmp_path / "mg"
    assert _convert(hf("llama2"), mg, family="llama2").returncode == 0
    result = _convert(mg, tmp_path / "out", family=family, load_type="mg", save_type="hf")
    _refused(result, tmp_path / "out", f"--model-type-hf {family}", evidence)


@pytest.mark.parametrize("family,evidence", [
    ("mixtral", "mixtral is a mixture-of-experts family but the model has no experts"),
    ("deepseek2-lite", "deepseek2-lite is a mixture-of-experts family but the model has no experts"),
    ("gemma", "gemma computes with layernorm_zero_centered_gamma=True but the model with False"),
])
def test_an_explicit_family_that_contradicts_a_training_runs_args_is_refused(tmp_path, family, evidence):
    """A checkpoint Megatron-LM's training wrote records no family: its args are the evidence."""
    result = _convert(FIXTURE, tmp_path / "out", family=family, load_type="mg", save_type="hf")
    _refused(result, tmp_path / "out", f"--model-type-hf {family}", evidence)


def test_the_unsafe_flag_converts_against_the_evidence(tmp_path, hf):
    result = _convert(hf("llama2"), tmp_path / "mg", "--skip-family-check", family="gemma")
    assert result.returncode == 0, result.stderr
