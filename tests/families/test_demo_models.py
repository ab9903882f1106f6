"""Tests for modellink_ckpt.demo.models: the tiny random HF checkpoints the rest of the suite uses."""

import json

import pytest
import torch
from safetensors import safe_open

from modellink_ckpt.demo import models as dm

LAYOUTS = {
    # name: (weights_format, max_shard_size)
    "st": ("safetensors", None),
    "st-sharded": ("safetensors", "200KB"),
    "bin": ("bin", None),
    "bin-sharded": ("bin", "200KB"),
}
STYLES = ("v5", "v4")


def _weight_keys(d):
    """Tensor names stored in checkpoint dir ``d``, whatever the layout."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).exists():
            return set(json.loads((d / index).read_text())["weight_map"])
    if (d / "model.safetensors").exists():
        with safe_open(d / "model.safetensors", "pt") as f:
            return set(f.keys())
    return set(torch.load(d / "pytorch_model.bin", weights_only=True))


@pytest.fixture(scope="module")
def reference_logits():
    """family -> (tokens, logits of the in-memory model that build_hf_checkpoint(seed=0) saves)."""
    out = {}
    tokens = dm.sample_tokens(dm.DEFAULT_VOCAB_SIZE, batch=2, seq=8, seed=0)
    for family in dm.FAMILIES:
        model = dm.build_model(family, seed=0, attn_implementation="eager")
        with torch.no_grad():
            out[family] = (tokens, model(input_ids=tokens, use_cache=False).logits.float())
    return out


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", dm.FAMILIES)
def test_checkpoint_loads_and_matches(family, layout, style, tmp_path, reference_logits):
    from transformers import AutoModelForCausalLM

    fmt, shard = LAYOUTS[layout]
    d = dm.build_hf_checkpoint(family, tmp_path / "hf", weights_format=fmt, max_shard_size=shard, config_style=style)
    assert d == tmp_path / "hf"

    # Files: the layout asked for, and only it.
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= names
    if fmt == "safetensors":
        assert not any(n.endswith(".bin") for n in names)
        assert ("model.safetensors.index.json" in names) == bool(shard)
        assert ("model.safetensors" in names) == (not shard)
    else:
        assert not any(n.endswith(".safetensors") for n in names)
        assert ("pytorch_model.bin.index.json" in names) == bool(shard)
        assert ("pytorch_model.bin" in names) == (not shard)
    if shard:
        index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        index = json.loads((d / index_name).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and shards <= names
        assert index["metadata"]["total_size"] > 0

    # Config style.
    cfg = json.loads((d / "config.json").read_text())
    if style == "v5":
        assert "rope_parameters" in cfg and "rope_theta" not in cfg
        assert cfg["dtype"] == "float32" and "torch_dtype" not in cfg
    else:
        assert "rope_parameters" not in cfg and cfg["rope_scaling"] is None
        assert cfg["rope_theta"] == (10000.0 if family == "llama2" else 1e6)
        assert cfg["torch_dtype"] == "float32" and "dtype" not in cfg
        assert cfg["transformers_version"].startswith("4.")

    # Stored keys: no tied duplicate.
    keys = _weight_keys(d)
    assert ("lm_head.weight" in keys) == (family != "qwen25-tied")

    model, info = AutoModelForCausalLM.from_pretrained(
        d, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    assert info["missing_keys"] in (set(), [])
    assert info["unexpected_keys"] in (set(), [])
    assert not info["mismatched_keys"]
    assert not info["error_msgs"]
    assert model.config.rope_parameters["rope_theta"] == (10000.0 if family == "llama2" else 1e6)

    tokens, ref = reference_logits[family]
    logits = dm.hf_logits(d, tokens)
    assert logits.shape == (2, 8, dm.DEFAULT_VOCAB_SIZE)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # Same seed -> same model, whatever the file format or config style (catches a misread rope_theta).
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


def test_family_shapes_and_features():
    llama = dm.make_config("llama2")
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.tie_word_embeddings) == (8, 4, False)
    assert llama.rope_parameters["rope_theta"] == 10000.0

    qwen25 = dm.build_model("qwen25")
    assert qwen25.config.num_key_value_heads == 2 and not qwen25.config.tie_word_embeddings
    attn = qwen25.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None

    qwen3 = dm.build_model("qwen3")
    c = qwen3.config
    assert c.head_dim == 16 != c.hidden_size // c.num_attention_heads
    attn = qwen3.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (c.num_attention_heads * 16, c.hidden_size)
    assert attn.k_proj.weight.shape == (c.num_key_value_heads * 16, c.hidden_size)
    assert attn.o_proj.weight.shape == (c.hidden_size, c.num_attention_heads * 16)
    assert attn.q_norm.weight.shape == (16,) and attn.k_norm.weight.shape == (16,)

    for family in dm.FAMILIES:
        assert dm.make_config(family).vocab_size % 128 != 0


def test_tied_family_really_ties(tmp_path):
    from transformers import AutoModelForCausalLM

    d = dm.build_hf_checkpoint("qwen25-tied", tmp_path / "tied", weights_format="bin")
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is True
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in sd
    torch.testing.assert_close(m.lm_head.weight, sd["model.embed_tokens.weight"], rtol=0, atol=0)

    untied = dm.build_model("qwen25")
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_weights_are_interesting():
    model = dm.build_model("qwen25")
    sd = model.state_dict()
    norms = [k for k in sd if k.endswith("norm.weight")]
    assert norms
    for k in norms:
        assert not torch.allclose(sd[k], torch.ones_like(sd[k])), k
        assert (sd[k] - 1).abs().max() < 1.0
    biases = [k for k in sd if k.endswith(".bias")]
    assert len(biases) == 3 * 4
    for k in biases:
        assert (sd[k] != 0).all(), k

    # Swapping two layers' q_proj (same shape) must visibly change the logits.
    tokens = dm.sample_tokens(503, seed=1)
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        a, b = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
        wa = a.weight.clone()
        a.weight.copy_(b.weight)
        b.weight.copy_(wa)
        after = model(input_ids=tokens).logits
    assert before.std() > 0.1  # logits are not flat
    assert (before - after).abs().max() > 1e-2


def test_seed_and_dtype(tmp_path):
    a = dm.build_model("llama2", seed=0).state_dict()
    b = dm.build_model("llama2", seed=0).state_dict()
    c = dm.build_model("llama2", seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])

    d = dm.build_hf_checkpoint("llama2", tmp_path / "bf16", dtype=torch.bfloat16, config_style="v4", num_layers=2)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 2
    with safe_open(d / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.up_proj.weight")
    assert w.dtype == torch.bfloat16
    # bf16 checkpoint == fp32 model rounded to bf16 (values are drawn in fp32, then cast).
    fp32 = dm.build_model("llama2", num_layers=2).state_dict()["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(w, fp32.to(torch.bfloat16))
    logits = dm.hf_logits(d, dm.sample_tokens(503), dtype="bf16")
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_tokenizer(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = dm.build_hf_checkpoint("qwen3", tmp_path / "tok", num_layers=1)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert sp.get_piece_size() == dm.DEFAULT_VOCAB_SIZE == dm.tokenizer_vocab_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == sp.get_piece_size()
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    text = "The quick brown fox jumps over the lazy dog in 2024, said the model!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == sp.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert max(tok("Ünïcödé → byte fallback ✓")["input_ids"]) < json.loads((d / "config.json").read_text())["vocab_size"]
    # Trained once per process.
    assert dm.train_tokenizer_model() is dm.train_tokenizer_model()


def test_vocab_size_options(tmp_path):
    from transformers import AutoModelForCausalLM

    d = dm.build_hf_checkpoint("llama2", tmp_path / "big", vocab_size=640, num_layers=1)
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 640
    m, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert m.model.embed_tokens.weight.shape[0] == 640 and not info["missing_keys"]

    d = dm.build_hf_checkpoint("llama2", tmp_path / "notok", tokenizer=False, vocab_size=300, num_layers=1)
    assert not (d / "tokenizer.model").exists()
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 300

    d = dm.build_hf_checkpoint("qwen25", tmp_path / "ovr", num_layers=1, hidden_size=128, num_attention_heads=4)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"]) == (128, 4)

    with pytest.raises(ValueError):
        dm.build_hf_checkpoint("gpt2", tmp_path / "bad")
    with pytest.raises(ValueError):
        dm.build_hf_checkpoint("llama2", tmp_path / "bad", weights_format="gguf")
    with pytest.raises(ValueError):
        dm.build_hf_checkpoint("llama2", tmp_path / "bad", config_style="v3")


def test_sample_tokens():
    t = dm.sample_tokens(503, batch=3, seq=5, seed=7)
    assert t.shape == (3, 5) and t.dtype == torch.long
    assert int(t.min()) >= 0 and int(t.max()) < 503
    assert torch.equal(t, dm.sample_tokens(503, batch=3, seq=5, seed=7))
    assert not torch.equal(t, dm.sample_tokens(503, batch=3, seq=5, seed=8))


def test_cli(tmp_path, capsys):
    assert dm.main(["qwen25-tied", str(tmp_path / "cli"), "--weights-format", "bin", "--max-shard-size", "100KB",
                    "--config-style", "v4", "--num-layers", "2", "--dtype", "bf16"]) == 0
    assert (tmp_path / "cli" / "pytorch_model.bin.index.json").exists()
    assert "qwen25-tied" in capsys.readouterr().out


# ---------------------------------------------------------------- MoE / MLA families

# family -> (a per-expert hub key of layer 1, expected number of routed experts)
MOE_KEYS = {
    "mixtral": ("model.layers.1.block_sparse_moe.experts.3.w1.weight", 4),
    "qwen2-moe": ("model.layers.1.mlp.experts.3.gate_proj.weight", 4),
    "qwen3-moe": ("model.layers.1.mlp.experts.3.up_proj.weight", 4),
    "deepseek2-lite": ("model.layers.1.mlp.experts.3.down_proj.weight", 4),
    "deepseek3": ("model.layers.1.mlp.experts.7.gate_proj.weight", 8),
}


@pytest.mark.parametrize("family", dm.MOE_FAMILIES)
def test_moe_checkpoint_per_expert_and_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    assert set(MOE_KEYS) == set(dm.MOE_FAMILIES)
    tokens = dm.sample_tokens(dm.DEFAULT_VOCAB_SIZE, batch=2, seq=8, seed=0)
    model = dm.build_model(family, attn_implementation="eager")
    with torch.no_grad():
        ref = model(input_ids=tokens, use_cache=False).logits.float()
    assert ref.std() > 0.3

    fmt = "bin" if family == "mixtral" else "safetensors"  # the .bin writer converts to the hub layout too
    d = dm.build_hf_checkpoint(family, tmp_path / "hf", tokenizer=False, weights_format=fmt)
    keys = _weight_keys(d)
    key, experts = MOE_KEYS[family]
    assert key in keys
    # hub layout only: one tensor per expert, no fused in-memory stacks
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
    per_expert = {k for k in keys if k.startswith("model.layers.1.") and ".experts." in k}
    assert len(per_expert) == 3 * experts
    assert ("model.layers.1.mlp.gate.e_score_correction_bias" in keys) == (family == "deepseek3")
    if family in dm.MLA_FAMILIES:  # layer 0 is dense (first_k_dense_replace = 1)
        assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.0.mlp.gate.weight" not in keys
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "default"

    loaded, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    logits = dm.hf_logits(d, tokens)
    assert logits.shape == (2, 8, dm.DEFAULT_VOCAB_SIZE)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


def test_moe_family_features():
    c = dm.make_config("mixtral")
    assert (c.num_local_experts, c.num_experts_per_tok, c.num_attention_heads, c.hidden_size) == (4, 2, 4, 64)

    c = dm.make_config("qwen2-moe")
    assert (c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, c.decoder_sparse_step, c.mlp_only_layers) == (4, 2, False, 1, [])
    assert c.qkv_bias and c.shared_expert_intermediate_size == 96
    m = dm.build_model("qwen2-moe", num_layers=1)
    assert m.model.layers[0].mlp.shared_expert_gate.weight.shape == (1, 64)
    assert m.model.layers[0].self_attn.q_proj.bias is not None

    c = dm.make_config("qwen3-moe")
    assert c.head_dim == 32 != c.hidden_size // c.num_attention_heads and c.norm_topk_prob

    c = dm.make_config("deepseek2-lite")
    assert c.q_lora_rank is None and (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (32, 16, 8, 24)
    assert (c.first_k_dense_replace, c.n_shared_experts, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor) == (1, 2, "greedy", False, 1.0)

    c = dm.make_config("deepseek3")
    assert c.q_lora_rank == 24 and (c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok) == (8, 2, 1, 2)
    assert (c.n_shared_experts, c.norm_topk_prob, c.routed_scaling_factor, c.rope_interleave) == (1, True, 2.5, True)
    for family in dm.MOE_FAMILIES:
        assert dm.make_config(family).vocab_size % 128 != 0


@pytest.mark.parametrize("family", ["deepseek3", "qwen2-moe"])
def test_moe_weights_are_interesting(family):
    """Every parameter and weight buffer is random (no zero / all-ones tensor left from init),
    and DeepSeek-V3's e_score_correction_bias visibly changes the routing."""
    model = dm.build_model(family)
    sd = model.state_dict()
    for k, t in sd.items():
        assert t.abs().max() > 0, k
        if k.endswith("norm.weight"):
            assert not torch.allclose(t, torch.ones_like(t)), k
    tokens = dm.sample_tokens(503, seed=1)
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        if family == "deepseek3":
            bias = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
            assert len(bias) == 3 and all((b != 0).all() and b.dtype == torch.float32 for b in bias)
            for b in bias:
                b.zero_()
        else:  # swap two experts of layer 0
            gu = model.model.layers[0].mlp.experts.gate_up_proj
            gu.copy_(gu[[1, 0, 2, 3]])
        after = model(input_ids=tokens).logits
    assert (before - after).abs().max() > 1e-2


def test_moe_v4_config_style(tmp_path):
    d = dm.build_hf_checkpoint("deepseek3", tmp_path / "v4", tokenizer=False, config_style="v4", num_layers=2)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None and "rope_parameters" not in cfg
    tokens = dm.sample_tokens(503, seed=3)
    ref = dm.build_model("deepseek3", num_layers=2)(input_ids=tokens).logits.detach()
    torch.testing.assert_close(dm.hf_logits(d, tokens), ref, rtol=0, atol=1e-5)
