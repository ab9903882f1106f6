"""Tiny, random, fully local Hugging Face checkpoints for tests, demos and benchmarks.

Nothing here touches the network: configs come from the ``transformers`` config classes,
weights are drawn from a seeded generator, and the tokenizer is a real SentencePiece BPE
model trained in-process on a generated English-like corpus.

Main entry points::

    build_hf_checkpoint("qwen3", tmp_path / "hf")      # -> pathlib.Path of the checkpoint dir
    hf_logits(model_dir, tokens)                         # reference logits [b, s, V] (float32)
    sample_tokens(vocab_size, batch=2, seq=8, seed=0)    # LongTensor [b, s]

Families (names as the converter's ``--model-type-hf`` uses them):

* ``llama2``      LlamaConfig, GQA 8 heads / 4 kv heads, rms_norm_eps 1e-5, rope_theta 1e4, untied.
* ``qwen25``      Qwen2Config (q/k/v bias), 8 heads / 2 kv heads, rope_theta 1e6, untied.
* ``qwen3``       Qwen3Config, 8 heads / 4 kv heads, head_dim 16 (!= hidden / heads = 8), q/k norm, untied.
* ``qwen25-tied`` Qwen2Config with ``tie_word_embeddings=True`` (like Qwen2.5-0.5B).

Mixture-of-experts / multi-latent-attention families (``MOE_FAMILIES``; 4 heads each):

* ``mixtral``        MixtralConfig, 4 heads / 2 kv heads, 4 experts (intermediate 96), top-2,
                     softmax -> top-k -> renormalise. Hub names ``block_sparse_moe.experts.{e}.w1/w2/w3``.
* ``qwen2-moe``      Qwen2MoeConfig, q/k/v bias, 4 experts (moe_intermediate 48) top-2 with
                     ``norm_topk_prob=False`` (softmax over all experts, no renormalisation), one
                     shared expert (shared_expert_intermediate_size 96) with a sigmoid
                     ``shared_expert_gate``; every layer sparse (decoder_sparse_step 1, mlp_only_layers []).
* ``qwen3-moe``      Qwen3MoeConfig, q/k norm, head_dim 32 (!= 64 / 4), 4 experts (48) top-2,
                     ``norm_topk_prob=True``.
* ``deepseek2-lite`` DeepseekV2Config (V2-Lite style MLA): no q LoRA (``q_proj``), kv_lora_rank 32,
                     qk_nope 16, qk_rope 8, v_head 24; layer 0 dense (first_k_dense_replace 1,
                     intermediate 160), then 4 routed experts (48) top-2 with 2 shared experts, softmax
                     "greedy" router, no renormalisation, routed_scaling_factor 1.0.
* ``deepseek3``      DeepseekV3Config: q LoRA (q_lora_rank 24), kv_lora_rank 32, qk_nope 16, qk_rope 8,
                     v_head 24; layer 0 dense; 8 routed experts (48) top-2 in 2 groups (topk_group 1),
                     1 shared expert, sigmoid router with a random nonzero ``e_score_correction_bias``,
                     norm_topk_prob True, routed_scaling_factor 2.5, no MTP layers (num_mtp_layers 0).

All MoE families use default (unscaled) rope; transformers 5 keeps the experts fused in memory
(``mlp.experts.gate_up_proj`` [E, 2F, H], ``down_proj`` [E, H, F]) but ``save_pretrained`` writes
the hub format, one tensor per expert (``mlp.experts.{e}.gate_proj.weight`` ...).

All families: hidden 64, 4 layers, vocab 503 (deliberately *not* a multiple of 128, so the
converter's vocab padding is exercised); the dense families use intermediate 160 and 8 heads.

Weights are "interesting": every norm weight is ``1 + 0.1 * randn``, every bias is nonzero and
linear weights are scaled ``1 / sqrt(fan_in)`` so logits are O(1) and any swapped/transposed
tensor visibly changes them. The values are drawn in float32 from a generator seeded with
``seed`` and only then cast to ``dtype``: the same seed gives the same model in every dtype,
file format and config style.

Run ``python -m modellink_ckpt.demo.models FAMILY OUT_DIR [options]`` to build one from a shell.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import pathlib
import random
import string
from typing import Any

import torch

#: Dense families (the ones the original converter tests iterate over).
FAMILIES = ("llama2", "qwen25", "qwen3", "qwen25-tied")
#: Mixture-of-experts families (the DeepSeek ones also use multi-latent attention).
MOE_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "deepseek2-lite", "deepseek3")
#: MoE families whose attention is multi-latent attention (MLA).
MLA_FAMILIES = ("deepseek2-lite", "deepseek3")
ALL_FAMILIES = FAMILIES + MOE_FAMILIES

#: Size the demo tokenizer is trained to (and so the default model vocab). 503 % 128 != 0.
DEFAULT_VOCAB_SIZE = 503

# Special token ids of the demo tokenizer (Llama-2 layout).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# What a transformers 4.x ``save_pretrained`` would have stamped into config.json.
V4_TRANSFORMERS_VERSION = "4.46.3"

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=8,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

# family -> (config class name, kwargs on top of _COMMON)
_FAMILY_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2": (
        "LlamaConfig",
        dict(
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
        ),
    ),
    "qwen25": (
        "Qwen2Config",
        dict(
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            num_key_value_heads=4,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            attention_bias=False,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "qwen25-tied": (
        "Qwen2Config",
        dict(
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            use_sliding_window=False,
            tie_word_embeddings=True,
        ),
    ),
    # ---- mixture of experts ----
    "mixtral": (
        "MixtralConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,  # Mixtral's experts use intermediate_size
            num_local_experts=4,
            num_experts_per_tok=2,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            max_position_embeddings=4096,
            sliding_window=None,
            router_jitter_noise=0.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            qkv_bias=True,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=False,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=4096,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            attention_bias=False,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=4096,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "deepseek2-lite": (
        "DeepseekV2Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=24,
            first_k_dense_replace=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            n_shared_experts=2,
            topk_method="greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            n_group=None,
            topk_group=None,
            attention_bias=False,
            mlp_bias=False,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    "deepseek3": (
        "DeepseekV3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=24,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
            num_mtp_layers=0,
            attention_bias=False,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_COMMON_WORDS = (
    "the of and to in is was that for it with as on be at by this had not are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long here get both between "
    "life being under never day same another know while last might us great old year off come since "
    "against go came right used take three model layer weight tensor parallel pipeline checkpoint "
    "quick brown fox jumps over lazy dog zebra quiz jazz extra vex box"
).split()


def _corpus(num_lines: int = 3000, seed: int = 1234) -> list[str]:
    """A deterministic English-like corpus: common words, pseudo-words, digits, punctuation."""
    rng = random.Random(seed)
    onsets = "b c d f g h j k l m n p qu r s t v w x y z th st ch sh tr br pl gr".split()
    vowels = "a e i o u ea ou ai ee oo y".split()
    codas = ["", "n", "t", "s", "r", "l", "nd", "st", "ng", "ck", "m", "x", "z"]

    def pseudo_word() -> str:
        w = rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
        if rng.random() < 0.4:
            w += rng.choice(vowels) + rng.choice(codas)
        return w

    pseudo = [pseudo_word() for _ in range(1500)]
    lines = []
    for _ in range(num_lines):
        words = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.6:
                words.append(rng.choice(_COMMON_WORDS))
            elif r < 0.93:
                words.append(rng.choice(pseudo))
            elif r < 0.97:
                words.append(str(rng.randint(0, 2048)))
            else:
                words.append("".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(1, 4))))
        if rng.random() < 0.3:
            i = rng.randrange(len(words))
            words[i] = words[i] + rng.choice([",", ";", ":"])
        line = " ".join(words)
        line = line[0].upper() + line[1:] + rng.choice([".", ".", ".", "!", "?"])
        if rng.random() < 0.05:
            line = '"' + line + '"'
        lines.append(line)
    return lines


@functools.lru_cache(maxsize=None)
def train_tokenizer_model(vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Train (once per process and size) a SentencePiece BPE model; returns the serialized proto.

    Llama-2 layout and options: ``<unk>``=0, ``<s>``=1, ``</s>``=2, byte fallback
    (``<0x00>``..``<0xFF>``), digits split, identity normalization, no pad piece.
    ``hard_vocab_limit=False``, so the result may be smaller than asked when the corpus cannot
    support that many pieces; it is exactly 503 for the default.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(f"the demo tokenizer needs vocab_size >= 300 (256 byte pieces + specials), got {vocab_size}")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",  # as Llama-2's tokenizer.model (and the HF side: no normalizer)
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    return buf.getvalue()


def save_tokenizer(out_dir, vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    """Write ``tokenizer.model`` plus a transformers tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``) into ``out_dir``; returns the tokenizer's vocab size.

    The transformers side is a ``LlamaTokenizer`` (tokenizers backend) built from the
    SentencePiece vocab + merges directly. (transformers 5 can also convert ``tokenizer.model`` on
    load, but that path needs ``protobuf``, which this project does not depend on; shipping
    ``tokenizer.json`` avoids it.) It adds ``<s>`` at the start, as Llama-2 does.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proto = train_tokenizer_model(vocab_size)
    (out_dir / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        unk_token=sp.id_to_piece(UNK_ID),
        bos_token=sp.id_to_piece(BOS_ID),
        eos_token=sp.id_to_piece(EOS_ID),
        add_bos_token=True,
        add_eos_token=False,
    )
    tok.save_pretrained(out_dir)
    return sp.get_piece_size()


def tokenizer_vocab_size(vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=train_tokenizer_model(vocab_size)).get_piece_size()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def make_config(family: str, *, num_layers: int = 4, vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides):
    """The transformers config object of a demo family (``overrides`` win over the defaults)."""
    import transformers

    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    cls_name, spec = _FAMILY_SPECS[family]
    kwargs = {**_COMMON, **spec, "num_hidden_layers": num_layers, "vocab_size": vocab_size, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter and every weight buffer with seeded, dtype-independent,
    'interesting' values.

    norm weights: 1 + 0.1*randn; biases: 0.1*randn; embedding: randn; other matrices (also the
    fused 3-D expert stacks ``[E, out, in]``): randn / sqrt(fan_in = last dim). Parameters are
    visited in sorted-name order (tied parameters once). Then the persistent floating-point
    buffers (those ``state_dict`` saves; e.g. DeepSeek-V3's router ``e_score_correction_bias``,
    which transformers initialises to zeros) are drawn from the same generator in sorted-name
    order: ``e_score_correction_bias`` gets 0.3*randn (large enough to change which experts are
    picked), any other 1-D buffer 0.1*randn. Non-persistent buffers (rotary ``inv_freq``) are left
    alone. Models without persistent buffers (the dense families) draw exactly what they always drew.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        x = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1 and "norm" in name:
            x = 1.0 + 0.1 * x
        elif name.endswith(".bias"):
            x = 0.1 * x
        elif "embed_tokens" in name:
            pass
        elif p.ndim >= 2:
            x = x / math.sqrt(p.shape[-1])
        else:
            x = 0.1 * x
        p.copy_(x.to(p.dtype))
    persistent = set(model.state_dict().keys())
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if name not in persistent or not b.is_floating_point() or "inv_freq" in name:
            continue
        x = torch.randn(b.shape, generator=gen, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            x = 0.3 * x
        elif b.ndim >= 2:
            x = x / math.sqrt(b.shape[-1])
        else:
            x = 0.1 * x
        b.copy_(x.to(b.dtype))
    return model


def build_model(family: str, *, dtype=torch.float32, num_layers: int = 4, seed: int = 0,
                vocab_size: int = DEFAULT_VOCAB_SIZE, attn_implementation: str | None = None, **overrides):
    """An in-memory random ``*ForCausalLM`` of a family (eval mode); the same model that
    ``build_hf_checkpoint`` with the same arguments saves."""
    from transformers import AutoModelForCausalLM

    config = make_config(family, num_layers=num_layers, vocab_size=vocab_size, **overrides)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # transformers 5: the keyword is ``dtype`` (``torch_dtype`` is deprecated).
    model = AutoModelForCausalLM.from_config(config, dtype=_resolve_dtype(dtype), **kwargs)
    randomize_(model, seed)
    return model.eval()


def _untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the second and later names of shared tensors dropped
    (so a tied ``lm_head.weight`` goes; ``model.embed_tokens.weight`` stays)."""
    seen: set[tuple] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().clone().contiguous()
    return out


def _hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The untied state dict in the hub (on-disk) naming, as ``save_pretrained`` writes it.

    transformers 5 keeps MoE experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2F, H],
    ``mlp.experts.down_proj`` [E, H, F]) and converts back to one tensor per expert
    (``mlp.experts.{e}.gate_proj.weight``, Mixtral ``block_sparse_moe.experts.{e}.w1.weight`` ...)
    on save; a transformers 4.x ``.bin`` held that per-expert layout, so the ``.bin`` writer does
    the same conversion. Dense models come back unchanged."""
    state_dict = _untied_state_dict(model)
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(model, state_dict)
    return {k: v.detach().clone().contiguous() for k, v in reverted.items()}


def _save_bin(model, out_dir: pathlib.Path, max_shard_size) -> None:
    """Write ``pytorch_model.bin`` (or ``pytorch_model-0000k-of-0000n.bin`` +
    ``pytorch_model.bin.index.json``) the way transformers 4.x did: transformers 5's
    ``save_pretrained`` writes safetensors only."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state_dict = _hub_state_dict(model)
    split = split_torch_state_dict_into_shards(
        state_dict,
        filename_pattern="pytorch_model{suffix}.bin",
        max_shard_size=max_shard_size if max_shard_size is not None else "50GB",
    )
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: state_dict[n] for n in names}, out_dir / filename)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # What save_pretrained does to the config before writing it.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def _remove_stale_weights(out_dir: pathlib.Path) -> None:
    """Delete weight files a previous build left in ``out_dir`` (so a rebuild in another format or
    sharding never leaves two competing sets of weights)."""
    for p in out_dir.iterdir():
        n = p.name
        if p.is_file() and (
            (n.startswith("model") and (n.endswith(".safetensors") or n == "model.safetensors.index.json"))
            or (n.startswith("pytorch_model") and (n.endswith(".bin") or n == "pytorch_model.bin.index.json"))
        ):
            p.unlink()


def rewrite_config_v4(out_dir) -> dict:
    """Rewrite ``config.json`` the way transformers 4.x wrote it: top-level ``rope_theta`` and
    ``rope_scaling`` instead of the ``rope_parameters`` dict, ``torch_dtype`` instead of
    ``dtype``, no ``layer_types`` list, a 4.x ``transformers_version``. Returns the new dict."""
    path = pathlib.Path(out_dir) / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        cfg["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type", "default")
        cfg["rope_scaling"] = None if rope_type == "default" and not rope else {"rope_type": rope_type, **rope}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    cfg["transformers_version"] = V4_TRANSFORMERS_VERSION
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    return cfg


def build_hf_checkpoint(
    family: str,
    out_dir,
    *,
    dtype=torch.float32,
    num_layers: int = 4,
    seed: int = 0,
    weights_format: str = "safetensors",
    max_shard_size=None,
    config_style: str = "v5",
    tokenizer: bool = True,
    vocab_size: int | None = None,
    **overrides,
) -> pathlib.Path:
    """Build a tiny random HF checkpoint of ``family`` in ``out_dir`` and return its path.

    weights_format: ``"safetensors"`` (``model.safetensors`` or sharded ``model-0000k-of-0000n``
        + ``model.safetensors.index.json``) or ``"bin"`` (``pytorch_model.bin`` / shards +
        ``pytorch_model.bin.index.json``; tied duplicates are not stored).
    max_shard_size: e.g. ``"200KB"``; ``None`` -> a single file.
    config_style: ``"v5"`` (``rope_parameters`` dict, ``dtype``, as transformers 5 writes) or
        ``"v4"`` (top-level ``rope_theta``/``rope_scaling``, ``torch_dtype``).
    tokenizer: also write ``tokenizer.model`` + ``tokenizer.json`` + ``tokenizer_config.json``.
    vocab_size: model vocab; default is the tokenizer's size (503). With a tokenizer it must be
        >= the tokenizer's size (a larger value just leaves unused rows); a value below 503
        trains a smaller tokenizer.
    overrides: passed to the config class (e.g. ``hidden_size=128``, ``rope_theta=5e5``).
    """
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    if config_style not in ("v4", "v5"):
        raise ValueError(f"config_style must be 'v4' or 'v5', got {config_style!r}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if tokenizer:
        tok_target = DEFAULT_VOCAB_SIZE if vocab_size is None else min(vocab_size, DEFAULT_VOCAB_SIZE)
        tok_size = save_tokenizer(out_dir, tok_target)
        if vocab_size is None:
            vocab_size = tok_size
        elif vocab_size < tok_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tok_size}")
    elif vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE

    model = build_model(family, dtype=dtype, num_layers=num_layers, seed=seed, vocab_size=vocab_size, **overrides)
    _remove_stale_weights(out_dir)
    if weights_format == "safetensors":
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out_dir, **kwargs)
    else:
        _save_bin(model, out_dir, max_shard_size)

    if config_style == "v4":
        rewrite_config_v4(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# Reference forward
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_logits(model_dir, tokens, dtype=torch.float32, attn_implementation: str = "eager") -> torch.Tensor:
    """Load ``model_dir`` with transformers (in ``dtype``), run ``tokens`` [b, s] through it
    (no attention mask, no cache) and return the logits [b, s, V] as float32 on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=_resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    model.eval()
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim == 1:
        tokens = tokens[None]
    out = model(input_ids=tokens, use_cache=False)
    return out.logits.float().cpu()


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 8, seed: int = 0) -> torch.LongTensor:
    """Seeded uniform token ids in ``[0, vocab_size)``, shape [batch, seq]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(vocab_size), (batch, seq), generator=gen, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build a tiny random Hugging Face checkpoint.")
    p.add_argument("family", choices=ALL_FAMILIES)
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-format", default="safetensors", choices=("safetensors", "bin"))
    p.add_argument("--max-shard-size", default=None)
    p.add_argument("--config-style", default="v5", choices=("v4", "v5"))
    p.add_argument("--no-tokenizer", action="store_true")
    p.add_argument("--vocab-size", type=int, default=None)
    a = p.parse_args(argv)
    path = build_hf_checkpoint(
        a.family,
        a.out_dir,
        dtype=_resolve_dtype(a.dtype),
        num_layers=a.num_layers,
        seed=a.seed,
        weights_format=a.weights_format,
        max_shard_size=a.max_shard_size,
        config_style=a.config_style,
        tokenizer=not a.no_tokenizer,
        vocab_size=a.vocab_size,
    )
    files = sorted(f for f in os.listdir(path))
    print(f"{a.family} -> {path}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
