"""The `args` Namespace stored in every Megatron rank file, in both directions.

Training reads these back with `--use-checkpoint-args`, so the names are Megatron's
(megatron-format.md §2); a reader takes them from checkpoints written by any tool.
"""

from __future__ import annotations

import argparse

import torch

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.layout import ParallelLayout, parse_int_list
from modellink_ckpt.model_cfg import ModelDims

DTYPE_FLAGS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_args(dims: ModelDims, layout: ParallelLayout, *, padded_vocab: int, divisible_by: int,
              dtype: torch.dtype, transformer_impl: str, model_type_hf: str, iteration: int = 1,
              tokenizer_model: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=layout.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        group_query_attention=dims.num_query_groups != dims.num_attention_heads,
        kv_channels=dims.kv_channels,
        max_position_embeddings=dims.max_position_embeddings,
        seq_length=dims.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=dims.rotary_base,
        normalization=dims.normalization,
        norm_epsilon=dims.norm_epsilon,
        swiglu=dims.swiglu,
        add_bias_linear=dims.add_dense_bias,
        add_qkv_bias=dims.add_qkv_bias,
        qk_layernorm=dims.qk_layernorm,
        untie_embeddings_and_output_weights=not dims.tie_word_embeddings,
        vocab_size=dims.vocab_size,
        padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        num_layers_per_virtual_pipeline_stage=layout.vpp_layers,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp_layers else None,
        num_layer_list=",".join(map(str, layout.num_layer_list)) or None,
        noop_layers=",".join(map(str, layout.noop_layers)) or None,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        transformer_impl=transformer_impl,
        use_mcore_models=True,
        model_type_hf=model_type_hf,
        tokenizer_model=tokenizer_model,
        # MoE and MLA sizes: this is a dense model with standard attention
        num_experts=None,
        moe_router_topk=None,
        moe_ffn_hidden_size=None,
        moe_grouped_gemm=False,
        n_shared_experts=None,
        first_k_dense_replace=None,
        moe_layer_freq=None,
        multi_latent_attention=False,
        q_lora_rank=None,
        kv_lora_rank=None,
        qk_head_dim=None,
        qk_pos_emb_head_dim=None,
        v_head_dim=None,
        iteration=iteration,
    )


def _get(margs, name, default=None):
    value = getattr(margs, name, default)
    return default if value is None else value


def dims_from_args(margs, *, source: str, vocab_size: int | None = None) -> ModelDims:
    """Model sizes from a stored Namespace (ours or a training run's)."""
    try:
        num_layers = int(margs.num_layers)
        hidden = int(margs.hidden_size)
        heads = int(margs.num_attention_heads)
    except (AttributeError, TypeError, ValueError):
        raise ConvertError(f"{source}: its 'args' lack num_layers/hidden_size/num_attention_heads") from None
    noop = parse_int_list(_get(margs, "noop_layers"), "noop_layers")
    groups = int(_get(margs, "num_query_groups", heads)) if _get(margs, "group_query_attention", True) else heads
    padded = _get(margs, "padded_vocab_size")
    true_vocab = vocab_size or _get(margs, "vocab_size") or padded
    if true_vocab is None:
        raise ConvertError(f"{source}: its 'args' lack padded_vocab_size")
    return ModelDims(
        num_layers=num_layers - len(noop),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(margs, "ffn_hidden_size", 4 * hidden)),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=int(_get(margs, "kv_channels", hidden // heads)),
        vocab_size=int(true_vocab),
        max_position_embeddings=int(_get(margs, "max_position_embeddings", 4096)),
        norm_epsilon=float(_get(margs, "norm_epsilon", _get(margs, "layernorm_epsilon", 1e-5))),
        rotary_base=float(_get(margs, "rotary_base", 10000)),
        tie_word_embeddings=not _get(margs, "untie_embeddings_and_output_weights", False),
        add_qkv_bias=bool(_get(margs, "add_qkv_bias", False)),
        add_dense_bias=bool(_get(margs, "add_bias_linear", False)),
        qk_layernorm=bool(_get(margs, "qk_layernorm", False)),
        swiglu=bool(_get(margs, "swiglu", True)),
        normalization=str(_get(margs, "normalization", "RMSNorm")),
    )


def layout_from_args(margs, dims: ModelDims, *, source: str) -> ParallelLayout:
    """The layout a checkpoint was written with; validated like a target layout."""
    try:
        return ParallelLayout.build(
            dims.num_layers,
            tp=int(_get(margs, "tensor_model_parallel_size", 1)),
            pp=int(_get(margs, "pipeline_model_parallel_size", 1)),
            ep=int(_get(margs, "expert_model_parallel_size", 1)),
            vpp_layers=_get(margs, "num_layers_per_virtual_pipeline_stage"),
            num_layer_list=_get(margs, "num_layer_list"),
            noop_layers=_get(margs, "noop_layers"),
            num_heads=dims.num_attention_heads,
            num_query_groups=dims.num_query_groups,
            prefix="source ",
        )
    except ConvertError as exc:
        raise ConvertError(f"{source}: inconsistent stored args: {exc}") from None
