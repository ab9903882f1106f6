"""Families that are JSON entries only: a tiny random checkpoint with the real on-disk names (built
by the transformers class), hf -> mg (TP2 PP2) -> hf bit-exact, and transformers gives the original
logits from the output, also when the original config.json is not at hand; Megatron-Core parity
where a GPTModel expresses the architecture."""

import json

import pytest
import torch
import transformers
from hf_builders import COMMON, REPACKED, VOCAB, build_repacked
from mcore_harness import mcore_logits
from transformers import AutoModelForCausalLM
from util import assert_one_line_error, assert_same_tensors, hf_to_mg, load_hf_state, load_mg_state, mg_to_hf, run_cli

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits, randomize_, sample_tokens

# family -> (transformers config class, its arguments beyond COMMON, Megatron-Core expresses it)
FAMILIES = {
    # Llama-3.x rope scaling with Megatron-Core's fixed factors (original context 8192): with head_dim 8
    # one frequency is interpolated and one divided by 8
    "llama": ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=8192)), True),
    "magistral": ("MistralConfig", dict(head_dim=16), True),             # head_dim != hidden / heads
    "qwen2": ("Qwen2Config", dict(), True),
    "seed-oss": ("SeedOssConfig", dict(head_dim=16, attention_bias=True, attention_out_bias=False), True),
    "phi3": ("Phi3Config", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4,
                                                     original_max_position_embeddings=8,
                                                     short_factor=[1.0, 1.5, 2.0, 4.0],
                                                     long_factor=[2.0, 3.0, 5.0, 8.0])), False),
    "gemma": ("GemmaConfig", dict(head_dim=8, hidden_act="gelu_pytorch_tanh"), False),
    "phi3.5": ("Phi3Config", dict(), True),
    # Gemma 2: sandwich norms (post_attention_layernorm is the norm *after* attention), attention and
    # final logit soft-capping, query_pre_attn_scalar, sliding window on every other layer
    "gemma2": ("Gemma2Config", dict(head_dim=16, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=3),
               False),
    # Gemma 3 (text): Gemma 2's norms plus per-head q/k norms, a rope per layer type (local base, linear
    # scaling on the global layers), 5:1 sliding window, no soft-capping
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                            "rope_theta": 5e5},
                                                         "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 100.0}}), False),
    # GLM-4-9B (hf): fused gate_up, qkv bias, half-rotary heads rotated in interleaved pairs
    "glm": ("GlmConfig", dict(head_dim=16, partial_rotary_factor=0.5), True),
    # GLM-4-0414: GLM plus sandwich norms (post_self_attn_layernorm, post_mlp_layernorm)
    "glm4": ("Glm4Config", dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=False), False),
    "glm4_9b": ("Glm4Config", dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True), False),
    # MiniCPM3: multi-latent attention on a dense MLP, tied, embedding / residual / logit multipliers
    "minicpm3": ("MiniCPM3Config", dict(num_key_value_heads=8, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                                        qk_rope_head_dim=8, v_head_dim=8, scale_emb=12, scale_depth=1.4,
                                        dim_model_base=16), False),
    # StarCoder2: LayerNorms with biases (final norm too), biases on every linear, non-gated GELU c_fc/c_proj
    "starcoder2": ("Starcoder2Config", dict(hidden_act="gelu_pytorch_tanh", use_bias=True), True),
    # BLOOM: ALiBi, a LayerNorm after the embedding, fused per-head qkv (Megatron's own order), 4h MLP
    "bloom": ("BloomConfig", dict(), False),
    # GLM-4.5: DeepSeek-V3-style MoE (sigmoid router with a score bias, shared experts, dense first
    # layers) on plain attention with qkv bias and half-rotary heads; GLM-4.5 itself adds q/k norms
    "glm45-air": ("Glm4MoeConfig", dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True, n_routed_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                                        first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                                        use_qk_norm=False), True),
    "glm45": ("Glm4MoeConfig", dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True, n_routed_experts=4,
                                    num_experts_per_tok=2,
                                    moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                    topk_group=1, routed_scaling_factor=2.5, use_qk_norm=True), True),
    # dots.llm1: Qwen3's attention (per-head q/k norms, no qkv bias) on DeepSeek-V3's MoE (sigmoid
    # router with a score bias, shared experts, dense first layers)
    "dots1": ("Dots1Config", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                  norm_topk_prob=True), True),
    # Hunyuan-A13B: q/k norms per head applied after the rotary embedding, a shared MLP beside the
    # experts, NTK-alpha rope
    "hunyuan-moe": ("HunYuanMoEV1Config", dict(head_dim=8, num_experts=4, moe_topk=2,
                                               rope_parameters=dict(rope_type="dynamic", alpha=1000.0, factor=1.0,
                                                                    rope_theta=1e4)),
                    False),
    # ERNIE 4.5 MoE: MoE layers from moe_layer_start_index to moe_layer_end_index every
    # moe_layer_interval, a softmax router whose choice adds a score bias stored as a [1, E] table,
    # shared experts, heads rotated in interleaved pairs, tied embeddings
    # (Megatron-Core takes a router expert bias with sigmoid scores only)
    "ernie4.5-moe": ("Ernie4_5_MoeConfig", dict(num_hidden_layers=6, moe_num_experts=4, moe_k=2,
                                                moe_intermediate_size=32, moe_num_shared_experts=1,
                                                moe_layer_start_index=1, moe_layer_end_index=4, moe_layer_interval=2),
                     False),
    # gpt-oss: experts fused on disk ([E, in, 2F] with gate/up columns alternating, [E, F, in]) with
    # biases, a router bias, a learnt sink logit per head, clamped SwiGLU with (up + 1), yarn rope,
    # sliding window on every other layer
    "gpt-oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
                                     layer_types=["sliding_attention", "full_attention"] * 2, swiglu_limit=1.5),
                False),
}


# layout flags a family needs beyond TP2 PP2 (Megatron-Core holds biased experts only at expert TP 1)
EXTRA_FLAGS = {"gpt-oss": ("--expert-tensor-parallel-size", "1"), "dots1": ("--target-expert-parallel-size", "2"),
               "hunyuan-moe": ("--target-expert-parallel-size", "2"),
               "ernie4.5-moe": ("--target-expert-parallel-size", "2")}


def _build(family, folder):
    cls, extra, _ = FAMILIES[family]
    common = {k: v for k, v in COMMON.items() if not (cls == "BloomConfig" and k == "intermediate_size")}  # 4h
    config = getattr(transformers, cls)(**{**common, **extra})
    model = randomize_(AutoModelForCausalLM.from_config(config), seed=11)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_round_trips_and_keeps_its_logits(tmp_path, family):
    hf = _build(family, tmp_path / "hf")
    result = run_cli("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf,
                     "--save-dir", tmp_path / "mg", "--target-tensor-parallel-size", "2",
                     "--target-pipeline-parallel-size", "2", *EXTRA_FLAGS.get(family, ()), "--dry-run")
    assert result.returncode == 0, result.stderr  # found from config.json: the entry converts every tensor
    mg = hf_to_mg(hf, tmp_path / "mg", family, "--target-tensor-parallel-size", "2",
                  "--target-pipeline-parallel-size", "2", *EXTRA_FLAGS.get(family, ()))
    tokens = sample_tokens(VOCAB, seq=12)
    expected = hf_logits(hf, tokens)
    for name, back in (("original config", mg_to_hf(mg, hf, family)),
                       ("config from the args", mg_to_hf(mg, tmp_path / "fresh", family))):
        assert_same_tensors(load_hf_state(hf), load_hf_state(back), f"{family} ({name})")
        diff = (hf_logits(back, tokens) - expected).abs().max().item()
        assert diff <= 1e-6, f"{family} ({name}): {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f, (_, _, mcore) in FAMILIES.items() if mcore])
def test_family_in_megatron_core_matches_hf(tmp_path, family):
    hf = _build(family, tmp_path / "hf")
    mg = hf_to_mg(hf, tmp_path / "mg", family, "--target-tensor-parallel-size", "2", *EXTRA_FLAGS.get(family, ()))
    tokens = sample_tokens(VOCAB)
    expected = hf_logits(hf, tokens)
    diff = (mcore_logits(mg, tokens)[..., :VOCAB] - expected).abs().max().item()
    assert diff <= 1e-4, f"{family}: {diff}"


@pytest.mark.parametrize("family", list(REPACKED))
def test_family_without_a_class_equals_the_model_it_repacks(tmp_path, family):
    """Built by name and shape from a model transformers has a class for: converted as `family` it
    gives exactly the rank files (and what the args say the model computes) of the class-backed
    family (which Megatron-Core checks), and converts back to its own names bit for bit."""
    base_family, config_update = REPACKED[family][0], REPACKED[family][-1]
    source, repacked, base = build_repacked(family, tmp_path)
    state = {name: tensor for name, tensor in load_hf_state(base).items()}

    layout = ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    expected = load_mg_state(hf_to_mg(base, tmp_path / "mg_base", base_family, *layout))
    got = load_mg_state(hf_to_mg(source, tmp_path / "mg", family, *layout))
    for rank, files in expected.items():
        assert_same_tensors(files["model"], got[rank]["model"], rank)
        for field in ("ffn_hidden_size", "num_query_groups", "kv_channels", "rotary_base", "rotary_percent",
                      "rotary_interleaved", "add_qkv_bias", "swiglu", "norm_epsilon", "max_position_embeddings"):
            assert getattr(files["args"], field) == getattr(got[rank]["args"], field), field
    back = mg_to_hf(tmp_path / "mg", tmp_path / "fresh", family)
    if family == "baichuan2":  # the folded rows come back (NormHead normalizes them again, to themselves)
        repacked["lm_head.weight"] = state["lm_head.weight"]
    assert_same_tensors(repacked, load_hf_state(back))
    rebuilt = json.loads((back / "config.json").read_text())
    assert rebuilt["model_type"] == config_update["model_type"]
    carried = ("intermediate_size", "rope_ratio", "scale_emb", "scale_depth", "dim_model_base")
    assert all(rebuilt.get(k) == v for k, v in config_update.items() if k in carried)


def test_kimi_k2_is_found_from_its_own_config_and_travels_with_its_code(tmp_path):
    """Kimi-K2 ships DeepSeek-V3's architecture under model_type `kimi_k2`, with its tokenizer and
    model code for trust_remote_code: found without a flag or an edited config.json, written back
    under its own model_type with the code and tiktoken files beside it, DeepSeek-V3's logits kept."""
    hf = build_hf_checkpoint("deepseek3", tmp_path / "hf", dtype=torch.float32, num_layers=4, tokenizer=False)
    config = json.loads((hf / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                                  "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    code = {name: f"# {name}: the release's own code\n" for name in
            ("configuration_deepseek.py", "modeling_deepseek.py", "tokenization_kimi.py")}
    for name, text in {**code, "tiktoken.model": "token 0\n", "unrelated.py": "# not named by auto_map\n"}.items():
        (hf / name).write_text(text)

    result = run_cli("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf,
                     "--save-dir", tmp_path / "mg", "--target-tensor-parallel-size", "2",
                     "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "mg" / "iter_0000001" / "convert_manifest.json").read_text())
    assert manifest["model_type_hf"] == "kimi-k2"

    tokens = sample_tokens(VOCAB, seq=12)
    expected = _deepseek_logits(hf, tokens)
    for back in (mg_to_hf(tmp_path / "mg", hf, "kimi-k2"), mg_to_hf(tmp_path / "mg", tmp_path / "fresh", "kimi-k2")):
        assert json.loads((back / "config.json").read_text())["model_type"] == "kimi_k2"
        assert_same_tensors(load_hf_state(hf), load_hf_state(back), "kimi-k2")
        assert (_deepseek_logits(back, tokens) - expected).abs().max().item() <= 1e-6
    back = tmp_path / "hf" / "mg2hf"
    for name, text in {**code, "tiktoken.model": "token 0\n"}.items():
        assert (back / name).read_text() == text, name
    assert not (back / "unrelated.py").exists()


def _deepseek_logits(folder, tokens):
    """Kimi-K2's remote code is DeepSeek-V3's model: transformers' own class stands in for it."""
    config = json.loads((folder / "config.json").read_text())
    config = transformers.DeepseekV3Config.from_dict({k: v for k, v in config.items()
                                                      if k not in ("model_type", "auto_map")})
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens[None] if tokens.ndim == 1 else tokens, use_cache=False).logits.float()


def test_a_per_layer_expert_count_converts_only_when_every_layer_agrees(tmp_path):
    """Hunyuan's config may list `num_experts` / `moe_topk` per layer: one value for all converts,
    different ones stop the run by name (a Megatron model has one expert count)."""
    hf = _build("hunyuan-moe", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    flags = ("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf, "--save-dir", tmp_path / "mg",
             "--dry-run")
    (hf / "config.json").write_text(json.dumps({**config, "num_experts": [4, 4], "moe_topk": [2, 2]}))
    assert run_cli(*flags).returncode == 0
    (hf / "config.json").write_text(json.dumps({**config, "num_experts": [4, 2]}))
    result = run_cli(*flags)
    line = assert_one_line_error(result.returncode, result.stderr, "per-layer experts")
    assert "'num_experts' differs between layers ([4, 2])" in line
