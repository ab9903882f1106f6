"""Args carry what the model computes with: rope scaling, activation, sliding window, ... hf -> mg
stores them under Megatron / MindSpeed-LLM names, and mg -> hf without the original config.json
rebuilds one that gives transformers the original logits."""

import json
import shutil

import pytest
from util import assert_same_tensors, hf_to_mg, load_hf_state, load_mg_state, mg_to_hf

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits, sample_tokens

HEAD_HALF = 4  # head_dim 8 (hidden 64, 8 heads): longrope lists one factor per rotary frequency

# name -> (family, config overrides, {Megatron arg: value} the rank files must hold, config key it affects)
CASES = {
    "llama3": ("llama2", dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=4)),
        dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             rope_scaling_original_max_position_embeddings=4, use_rope_scaling=True, rotary_scaling_factor=8.0),
        "rope_parameters"),
    "linear": ("llama2", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=3.0)),
               dict(rope_scaling_type="linear", rope_scaling_factor=3.0, rotary_seq_len_interpolation_factor=3.0),
               "rope_parameters"),
    "dynamic": ("llama2", dict(max_position_embeddings=4, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
        dict(rope_scaling_type="dynamic", rope_scaling_factor=2.0), "rope_parameters"),
    "yarn": ("qwen3", dict(max_position_embeddings=32, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8, beta_fast=16.0,
        beta_slow=2.0)),
        dict(rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_scaling_beta_fast=16.0,
             rope_scaling_beta_slow=2.0, rope_scaling_original_max_position_embeddings=8), "rope_parameters"),
    "longrope": ("llama2", dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=4,
        short_factor=[1.0, 1.5, 2.0, 4.0][:HEAD_HALF], long_factor=[2.0, 3.0, 5.0, 8.0][:HEAD_HALF])),
        dict(rope_scaling_type="longrope", short_factor=[1.0, 1.5, 2.0, 4.0], long_factor=[2.0, 3.0, 5.0, 8.0]),
        "rope_parameters"),
    "gelu": ("llama2", dict(hidden_act="gelu_pytorch_tanh"),
             dict(hidden_act="gelu_pytorch_tanh", swiglu=False, gated_linear_unit=True, geglu=True, gelu_tanh=True),
             "hidden_act"),
    "sliding-window": ("qwen25", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1,
                                      layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                   "sliding_attention"]),
                       dict(sliding_window=3, use_sliding_window=True,
                            attention_layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                   "sliding_attention"]),
                       "layer_types"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_args_carry_what_the_model_computes_with(tmp_path, case):
    family, overrides, expected_args, key = CASES[case]
    hf = build_hf_checkpoint(family, tmp_path / "hf", num_layers=4, tokenizer=False, **overrides)
    mg = hf_to_mg(hf, tmp_path / "mg", family, "--target-tensor-parallel-size", "2",
                  "--target-pipeline-parallel-size", "2")
    args = vars(next(iter(load_mg_state(mg).values()))["args"])
    assert {name: args.get(name) for name in expected_args} == expected_args

    back = mg_to_hf(mg, tmp_path / "fresh", family)  # no config.json there: rebuilt from the args
    assert_same_tensors(load_hf_state(hf), load_hf_state(back))
    tokens = sample_tokens(503, seq=12)
    original = hf_logits(hf, tokens)
    assert (hf_logits(back, tokens) - original).abs().max().item() <= 1e-6

    # the setting matters: without it the same weights give other logits
    dropped = tmp_path / "dropped"
    shutil.copytree(back, dropped)
    config = json.loads((dropped / "config.json").read_text())
    config.pop(key)
    if key == "layer_types":
        config.pop("sliding_window")
    (dropped / "config.json").write_text(json.dumps(config))
    assert (hf_logits(dropped, tokens) - original).abs().max().item() > 1e-3


def test_megatron_core_spellings_are_read_back(tmp_path):
    """A training run's args may say llama3 scaling only as Megatron-Core does (use_rope_scaling)."""
    import argparse

    from modellink_ckpt.formats.megatron.args import dims_from_args

    margs = argparse.Namespace(num_layers=2, hidden_size=64, num_attention_heads=8, padded_vocab_size=512,
                               use_rope_scaling=True, rotary_scaling_factor=32.0, swiglu=True)
    computes = dims_from_args(margs, source="test").computes
    assert computes == {"rope_scaling_type": "llama3", "rope_scaling_factor": 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "rope_scaling_original_max_position_embeddings": 8192}
    margs = argparse.Namespace(num_layers=2, hidden_size=64, num_attention_heads=8, padded_vocab_size=512,
                               rotary_seq_len_interpolation_factor=4.0, swiglu=False, squared_relu=True)
    dims = dims_from_args(margs, source="test")
    assert dims.computes == {"rope_scaling_type": "linear", "rope_scaling_factor": 4.0, "hidden_act": "relu2"}
    assert not dims.swiglu
