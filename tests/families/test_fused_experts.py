"""Routed experts stored fused on disk (gpt-oss): one tensor per projection and layer, `gate_up_proj`
[E, in, 2F] with gate and up columns alternating and `down_proj` [E, F, in], with biases, plus the
parts that come with it (router bias, attention sinks, clamped SwiGLU); and the MXFP4 release,
dequantized while read. Checked against the consumers: Megatron-Core with genuine TP / EP
processes, transformers' own MXFP4 dequantization, transformers' logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM
from util import assert_same_tensors, hf_to_mg, load_hf_state, load_mg_state, mg_to_hf, run_cli

from modellink_ckpt.demo.models import hf_logits, randomize_, sample_tokens

VOCAB = 211
EXPERTS, FFN, HIDDEN = 4, 64, 64  # square experts, as gpt-oss: only the values tell the orientation


def build_gpt_oss(folder, rope=None, dtype=torch.float32):
    """A tiny random gpt-oss saved by transformers (fused experts on disk, as the real release)."""
    config = GptOssConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=16, num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=64,
                          num_local_experts=EXPERTS, num_experts_per_tok=2, sliding_window=3, swiglu_limit=1.5,
                          layer_types=["sliding_attention", "full_attention"] * 2, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, **({"rope_parameters": rope} if rope else {}))
    model = randomize_(GptOssForCausalLM(config), seed=5).to(dtype)
    model.save_pretrained(folder)
    return folder


def test_fused_experts_land_as_megatron_gate_up_halves(tmp_path):
    """Known answer, independent of our mapping: expert e's fc1 is [gate; up] = the even and the odd
    columns of gate_up_proj[e], transposed; fc2 is down_proj[e] transposed; biases alike."""
    hf = build_gpt_oss(tmp_path / "hf")
    mg = hf_to_mg(hf, tmp_path / "mg", "gpt-oss")
    (rank,) = load_mg_state(mg).values()
    model, state = rank["model"], load_hf_state(hf)
    for e in range(EXPERTS):
        local = f"decoder.layers.1.mlp.experts.local_experts.{e}."
        gate_up, bias = state["model.layers.1.mlp.experts.gate_up_proj"][e], \
            state["model.layers.1.mlp.experts.gate_up_proj_bias"][e]
        assert torch.equal(model[local + "linear_fc1.weight"], torch.cat([gate_up[:, 0::2].t(), gate_up[:, 1::2].t()]))
        assert torch.equal(model[local + "linear_fc1.bias"], torch.cat([bias[0::2], bias[1::2]]))
        assert torch.equal(model[local + "linear_fc2.weight"], state["model.layers.1.mlp.experts.down_proj"][e].t())
        assert torch.equal(model[local + "linear_fc2.bias"], state["model.layers.1.mlp.experts.down_proj_bias"][e])
    assert torch.equal(model["decoder.layers.1.self_attention.core_attention.softmax_offset"],
                       state["model.layers.1.self_attn.sinks"])
    assert torch.equal(model["decoder.layers.1.mlp.router.bias"], state["model.layers.1.mlp.router.bias"])


def test_gpt_oss_read_as_another_moe_family_is_refused_naming_gpt_oss(tmp_path):
    hf = build_gpt_oss(tmp_path / "hf")
    result = run_cli("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf,
                     "--save-dir", tmp_path / "mg", "--model-type-hf", "mixtral")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--model-type-hf mixtral would leave behind" in result.stderr, result.stderr
    assert "families that convert it whole: gpt-oss" in result.stderr
    assert not (tmp_path / "mg").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--target-tensor-parallel-size", "2", "--expert-tensor-parallel-size", "1"),
                                    ("--target-expert-parallel-size", "2", "--target-pipeline-parallel-size", "2")],
                         ids=["tp2", "ep2pp2"])
def test_gpt_oss_in_megatron_core_matches_hf(tmp_path, layout):
    """Sinks (softmax_type learnable), alternating sliding window, clamped SwiGLU with (up + 1),
    biased experts and router: Megatron-Core's GPTModel on our shards gives transformers' logits
    (plain rope: the harness maps no rope scaling)."""
    from mcore_harness import mcore_logits

    hf = build_gpt_oss(tmp_path / "hf", rope={"rope_type": "default", "rope_theta": 10000.0})
    mg = hf_to_mg(hf, tmp_path / "mg", "gpt-oss", *layout)
    tokens = sample_tokens(VOCAB, seq=12)
    diff = (mcore_logits(mg, tokens)[..., :VOCAB] - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= 1e-4, diff


def build_mxfp4(hf, folder, seed=3):
    """The MXFP4 release of `hf` (as gpt-oss ships): every fused expert tensor replaced by random
    packed FP4 `_blocks` [E, out, in/32, 16] and `_scales` [E, out, in/32] (exponents around 2^0),
    the rest as it is, and config.json's quantization_config."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(seed)
    state, packed = load_hf_state(hf), {}
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = state.pop(name).shape
        packed[name + "_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8,
                                                 generator=generator)
        packed[name + "_scales"] = torch.randint(122, 130, (experts, outputs, inputs // 32), dtype=torch.uint8,
                                                 generator=generator)
    save_file({**state, **packed}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, packed


def test_mxfp4_release_is_dequantized_like_transformers(tmp_path):
    """hf (MXFP4) -> mg -> hf: every expert tensor equals transformers' own dequantization
    (`convert_moe_packed_tensors`, into the [E, in, out] bf16 layout), nothing else changes, and the
    output holds no blocks, scales or quantization_config; -> mg equals the conversion of that
    reference bf16 checkpoint bit for bit."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = build_gpt_oss(tmp_path / "hf", dtype=torch.bfloat16)
    quantized, packed = build_mxfp4(hf, tmp_path / "mxfp4")
    reference = load_hf_state(hf)
    for name in [n[:-len("_blocks")] for n in packed if n.endswith("_blocks")]:
        reference[name] = convert_moe_packed_tensors(packed[name + "_blocks"], packed[name + "_scales"],
                                                     dtype=torch.bfloat16)
    (tmp_path / "ref").mkdir()
    save_file(reference, tmp_path / "ref" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ref" / "config.json").write_text((hf / "config.json").read_text())

    mg = hf_to_mg(quantized, tmp_path / "mg", "gpt-oss", "--target-expert-parallel-size", "2")
    back = mg_to_hf(mg, tmp_path / "back", "gpt-oss")
    assert_same_tensors(reference, load_hf_state(back), "dequantized")
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    mg_reference = hf_to_mg(tmp_path / "ref", tmp_path / "mg_ref", "gpt-oss", "--target-expert-parallel-size", "2")
    for rank, state in load_mg_state(mg_reference).items():
        assert_same_tensors(state["model"], load_mg_state(mg)[rank]["model"], rank)
    tokens = sample_tokens(VOCAB, seq=10)
    assert torch.equal(hf_logits(back, tokens), hf_logits(tmp_path / "ref", tokens))


def test_mxfp4_with_another_layout_is_refused(tmp_path):
    hf = build_gpt_oss(tmp_path / "hf", dtype=torch.bfloat16)
    quantized, packed = build_mxfp4(hf, tmp_path / "mxfp4")
    state = load_file(quantized / "model.safetensors")
    state["model.layers.0.mlp.experts.down_proj_scales"] = state["model.layers.0.mlp.experts.down_proj_scales"][:, :, :1].contiguous()
    save_file(state, quantized / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir",
                     quantized, "--save-dir", tmp_path / "mg", "--model-type-hf", "gpt-oss")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "down_proj_blocks" in result.stderr and "not MXFP4" in result.stderr, result.stderr


@pytest.mark.slow
def test_gpt_oss_torch_dist_loads_in_megatron_core_at_another_layout(tmp_path):
    """torch_dist written at EP2: megatron-core's dist_checkpointing loads it strictly at TP2 PP2
    (expert biases and sinks on their global axes) and gives transformers' logits."""
    from mcore_harness import mcore_logits

    hf = build_gpt_oss(tmp_path / "hf", rope={"rope_type": "default", "rope_theta": 10000.0})
    mg = hf_to_mg(hf, tmp_path / "mg", "gpt-oss", "--target-expert-parallel-size", "2", "--ckpt-format", "torch_dist",
                  "--make-vocab-size-divisible-by", "8")
    tokens = sample_tokens(VOCAB, seq=12)
    got = mcore_logits(mg, tokens, layout={"tp": 2, "pp": 2, "etp": 1})[..., :VOCAB]
    assert (got - hf_logits(hf, tokens)).abs().max().item() <= 1e-4
