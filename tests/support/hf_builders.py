"""Tiny HF checkpoints beyond what a transformers class builds: a DeepSeek-V3 folder with its
multi-token-prediction layer, and families without a transformers class repacked by name and shape
from a model that has one."""

from __future__ import annotations

import json
import shutil

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modellink_ckpt.demo.models import randomize_


def with_mtp_layer(hf_dir, out_dir):
    """The checkpoint plus one DeepSeek-V3 multi-token-prediction layer (HF `model.layers.{L}`: its
    norms, projection, a full MoE decoder layer, and copies of the embedding and output layer);
    transformers does not build these layers, so they are added to the files here."""
    shutil.copytree(hf_dir, out_dir)
    (weights,) = sorted(out_dir.glob("*.safetensors"))
    state = load_file(weights)
    config = json.loads((out_dir / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    gen = torch.Generator().manual_seed(7)
    dtype = state["model.embed_tokens.weight"].dtype
    for name, value in list(state.items()):
        if name.startswith(f"model.layers.{layers - 1}."):
            noise = torch.randn(value.shape, generator=gen)
            state[name.replace(f".{layers - 1}.", f".{layers}.", 1)] = (value.float() + noise).to(value.dtype)
    mtp = f"model.layers.{layers}."
    for name, shape in (("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)), ("eh_proj.weight", (hidden, 2 * hidden)),
                        ("shared_head.norm.weight", (hidden,))):
        state[mtp + name] = torch.randn(shape, generator=gen).to(dtype)
    state[mtp + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    state[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, weights, metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir, layers


VOCAB = 503


COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
              num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)


def _group_qkv(q, k, v, groups):
    """InternLM2's wqkv: per KV group [its q heads; k; v] (Megatron's own order)."""
    d = 8  # head_dim of COMMON (64 / 8)
    q, k, v = (t.reshape(groups, -1, d, *t.shape[1:]) for t in (q, k, v))
    return torch.cat([q, k, v], 1).reshape(-1, *q.shape[3:])


# family without a transformers class -> (the class-backed family whose model it repacks, its config
# arguments, {fused name: (q, k, v) names} joiner, name replacements, config.json changes)
REPACKED = {
    # InternLM2 / 2.5: wqkv in Megatron's per-group order, feed_forward.w1/w3/w2
    "internlm2": ("llama2", "LlamaConfig", dict(), "group",
                  {"model.embed_tokens.": "model.tok_embeddings.", "lm_head.": "output.",
                   ".self_attn.o_proj.": ".attention.wo.", ".mlp.gate_proj.": ".feed_forward.w1.",
                   ".mlp.up_proj.": ".feed_forward.w3.", ".mlp.down_proj.": ".feed_forward.w2.",
                   ".input_layernorm.": ".attention_norm.", ".post_attention_layernorm.": ".ffn_norm.",
                   ".self_attn.qkv.": ".attention.wqkv."},
                  dict(model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=False)),
    # Qwen-1: fused [Q; K; V] c_attn with bias, mlp.w2 = gate, w1 = up, intermediate_size = 2 x the MLP width
    "qwen": ("qwen25", "Qwen2Config", dict(num_key_value_heads=8), "cat",
             {"model.embed_tokens.": "transformer.wte.", "model.layers.": "transformer.h.", "model.norm.": "transformer.ln_f.",
              ".self_attn.o_proj.": ".attn.c_proj.", ".mlp.gate_proj.": ".mlp.w2.", ".mlp.up_proj.": ".mlp.w1.",
              ".mlp.down_proj.": ".mlp.c_proj.", ".input_layernorm.": ".ln_1.", ".post_attention_layernorm.": ".ln_2.",
              ".self_attn.qkv.": ".attn.c_attn."},
             dict(model_type="qwen", architectures=["QWenLMHeadModel"], intermediate_size=2 * 96,
                  layer_norm_epsilon=1e-6, rotary_emb_base=10000.0, kv_channels=8)),
    # ChatGLM3 / GLM-4-9B (chat): the model transformers ports as `glm`, under THUDM's own names
    "chatglm3": ("glm", "GlmConfig", dict(head_dim=8, partial_rotary_factor=0.5, rms_norm_eps=1e-5), "cat",
                 {"model.embed_tokens.": "transformer.embedding.word_embeddings.",
                  "model.layers.": "transformer.encoder.layers.", "model.norm.": "transformer.encoder.final_layernorm.",
                  "lm_head.": "transformer.output_layer.", ".self_attn.o_proj.": ".self_attention.dense.",
                  ".mlp.gate_up_proj.": ".mlp.dense_h_to_4h.", ".mlp.down_proj.": ".mlp.dense_4h_to_h.",
                  ".self_attn.qkv.": ".self_attention.query_key_value."},
                 dict(model_type="chatglm", architectures=["ChatGLMModel"], num_layers=4, multi_query_attention=True,
                      multi_query_group_num=2, padded_vocab_size=VOCAB, ffn_hidden_size=96, kv_channels=8,
                      seq_length=64, layernorm_epsilon=1e-5, add_qkv_bias=True, rope_ratio=1.0)),
    # MiniCPM (2B): Llama's names, tied, with MiniCPM's multipliers (carried in the args)
    "minicpm": ("llama2", "LlamaConfig", dict(tie_word_embeddings=True), "unpacked", {},
                dict(model_type="minicpm", architectures=["MiniCPMForCausalLM"], scale_emb=12, scale_depth=1.4,
                     dim_model_base=16)),
    # Baichuan-7B: llama with a fused [Q; K; V] W_pack
    "baichuan": ("llama2", "LlamaConfig", dict(num_key_value_heads=8), "cat", {".self_attn.qkv.": ".self_attn.W_pack."},
                 dict(model_type="baichuan", architectures=["BaiChuanForCausalLM"])),
    # Baichuan2-7B: the same plus NormHead, folded into the rows on the way in (the base is normalized alike)
    "baichuan2": ("llama2", "LlamaConfig", dict(num_key_value_heads=8), "cat", {".self_attn.qkv.": ".self_attn.W_pack."},
                  dict(model_type="baichuan", architectures=["BaichuanForCausalLM"])),
}


def build_repacked(family, root):
    """(its folder, its tensors, the class-backed model's folder) of a `REPACKED` family's tiny
    checkpoint, built by name and shape from a model transformers has a class for."""
    _, cls, extra, join, renames, config_update = REPACKED[family]
    base = root / "base"
    config = getattr(transformers, cls)(**{**COMMON, **extra})
    randomize_(AutoModelForCausalLM.from_config(config), seed=5).save_pretrained(base)
    state = load_file(base / "model.safetensors")
    repacked = {}
    for name, tensor in state.items():
        if join != "unpacked" and (".self_attn.k_proj." in name or ".self_attn.v_proj." in name):
            continue
        if join != "unpacked" and ".self_attn.q_proj." in name:
            q, k, v = (state[name.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj"))
            tensor = _group_qkv(q, k, v, config.num_key_value_heads) if join == "group" else torch.cat([q, k, v])
            name = name.replace("q_proj", "qkv")
        for old, new in renames.items():
            name = name.replace(old, new)
        repacked[name] = tensor
    source = root / family
    source.mkdir()
    save_file(repacked, source / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((base / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**hf_config, **config_update}))
    if family == "baichuan2":  # NormHead: the model the family stands for divides each output row by its norm
        state["lm_head.weight"] = torch.nn.functional.normalize(state["lm_head.weight"], dim=-1)
        save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    return source, repacked, base
