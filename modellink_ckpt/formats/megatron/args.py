"""The `args` Namespace stored in every Megatron rank file, in both directions.

Training reads these back with `--use-checkpoint-args`, so the names are Megatron's
(megatron-format.md §2); a reader takes them from checkpoints written by any tool.
"""

from __future__ import annotations

import argparse
import re

import torch

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.formats.megatron.names import Spelling
from modellink_ckpt.model.families import COMPUTE_ARGS, ModelDims, in_use
from modellink_ckpt.model.layout import ParallelLayout, parse_int_list

DTYPE_FLAGS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_args(dims: ModelDims, layout: ParallelLayout, *, padded_vocab: int, divisible_by: int,
              dtype: torch.dtype, spelling: Spelling, model_type_hf: str, iteration: int = 1,
              tokenizer_model: str | None = None) -> argparse.Namespace:
    moe = bool(dims.num_experts)
    moe_slots = {slot.mg_layer for slot in layout.slots() if slot.hf_layer in dims.moe_layers}
    args = argparse.Namespace(
        num_layers=layout.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        group_query_attention=dims.num_query_groups != dims.num_attention_heads,
        kv_channels=dims.kv_channels,
        max_position_embeddings=dims.max_position_embeddings,
        seq_length=dims.max_position_embeddings,
        rotary_base=dims.rotary_base,
        normalization=dims.normalization,
        norm_epsilon=dims.norm_epsilon,
        add_bias_linear=dims.add_dense_bias,
        add_qkv_bias=dims.add_qkv_bias,
        # Megatron builds MLA's q_layernorm (with q LoRA) and kv_layernorm only with qk_layernorm
        qk_layernorm=dims.qk_layernorm or dims.multi_latent_attention,
        post_norm=dims.post_norm,
        norm_has_bias=dims.norm_has_bias,
        embed_layernorm=dims.embed_layernorm,
        untie_embeddings_and_output_weights=not dims.tie_word_embeddings,
        vocab_size=dims.vocab_size,
        padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        num_layers_per_virtual_pipeline_stage=layout.vpp_layers,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layer_list=",".join(map(str, layout.num_layer_list)) or None,
        noop_layers=",".join(map(str, layout.noop_layers)) or None,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        transformer_impl=spelling.transformer_impl,
        use_mcore_models=True,
        model_type_hf=model_type_hf,
        tokenizer_model=tokenizer_model,
        # mixture of experts (None for a dense model)
        num_experts=dims.num_experts or None,
        moe_router_topk=dims.moe_router_topk if moe else None,
        moe_ffn_hidden_size=dims.moe_ffn_hidden_size if moe else None,
        moe_layer_freq=[int(i in moe_slots) for i in range(layout.num_layers)] if moe else None,
        first_k_dense_replace=(min(dims.moe_layers) if dims.moe_layers else None) if moe else None,
        moe_shared_expert_intermediate_size=dims.shared_expert_ffn_hidden_size or None,
        n_shared_experts=(dims.shared_expert_ffn_hidden_size // dims.moe_ffn_hidden_size
                          if moe and dims.shared_expert_ffn_hidden_size else None),
        moe_shared_expert_gate=dims.shared_expert_gate,
        shared_expert_gate=dims.shared_expert_gate,
        moe_router_score_function=dims.router_score_function if moe else None,
        moe_router_pre_softmax=dims.router_pre_softmax,
        moe_router_enable_expert_bias=dims.router_expert_bias,
        moe_router_topk_scaling_factor=dims.router_topk_scaling_factor,
        moe_router_num_groups=dims.router_num_groups,
        moe_router_group_topk=dims.router_group_topk,
        norm_topk_prob=(not dims.router_pre_softmax) if moe else None,
        expert_tensor_parallel_size=layout.etp,
        moe_grouped_gemm=spelling.expert_layout != "per_expert" and moe,
        # multi-latent attention
        multi_latent_attention=dims.multi_latent_attention,
        mla_spelling=spelling.mla if dims.multi_latent_attention else None,
        q_lora_rank=dims.q_lora_rank,
        kv_lora_rank=dims.kv_lora_rank or None,
        qk_head_dim=dims.qk_head_dim or None,
        qk_pos_emb_head_dim=dims.qk_pos_emb_head_dim or None,
        v_head_dim=dims.v_head_dim or None,
        mtp_num_layers=dims.mtp_num_layers or None,
        iteration=iteration,
    )
    for name, value in compute_args(dims).items():
        setattr(args, name, value)
    return args


def compute_args(dims: ModelDims) -> dict:
    """What the model computes with, as Megatron / MindSpeed-LLM args: every COMPUTE_ARGS field
    (the ones not in use at their off value, so a reader knows they were considered) and the
    Megatron-Core spellings of the same facts."""
    values = {**COMPUTE_ARGS, **dims.computes}
    act, gated = values["hidden_act"], dims.swiglu
    values.update(
        swiglu=gated and act == "silu",
        gated_linear_unit=gated,
        geglu=gated and act.startswith("gelu"),
        gelu_tanh=act in GELU_TANH,
        squared_relu=act == "relu2",
        use_rotary_position_embeddings=values["position_embedding_type"] == "rope",
        # Megatron-Core: llama3 scaling as use_rope_scaling, linear as a sequence interpolation factor
        use_rope_scaling=values["rope_scaling_type"] == "llama3",
        rotary_scaling_factor=values["rope_scaling_factor"] if values["rope_scaling_type"] == "llama3" else None,
        rotary_seq_len_interpolation_factor=values["rope_scaling_factor"]
        if values["rope_scaling_type"] == "linear" else None,
    )
    return values


GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def recorded_computes(margs) -> frozenset:
    """The COMPUTE_ARGS stored args hold a value for (ours hold every one; a training run's, those
    Megatron-LM also has)."""
    return frozenset(name for name in COMPUTE_ARGS if getattr(margs, name, None) is not None)


def _computes_from_args(margs) -> dict:
    """The inverse of `compute_args`: COMPUTE_ARGS from stored args, ours or a training run's (which
    may hold only the Megatron-Core spellings)."""
    values = {name: getattr(margs, name, None) for name in COMPUTE_ARGS}
    if values["rope_scaling_type"] is None:
        if _get(margs, "use_rope_scaling", False):  # Megatron-Core's llama3 scaling and its fixed factors
            values.update(rope_scaling_type="llama3",
                          rope_scaling_factor=float(_get(margs, "rotary_scaling_factor",
                                                         _get(margs, "rope_scaling_factor", 8.0))),
                          low_freq_factor=1.0, high_freq_factor=4.0,
                          rope_scaling_original_max_position_embeddings=8192)
        elif _get(margs, "rotary_seq_len_interpolation_factor") is not None:
            values.update(rope_scaling_type="linear",
                          rope_scaling_factor=float(margs.rotary_seq_len_interpolation_factor))
    if values["hidden_act"] is None:
        if _get(margs, "squared_relu", False):
            values["hidden_act"] = "relu2"
        elif _get(margs, "geglu", False) or not _get(margs, "swiglu", True):
            values["hidden_act"] = "gelu_pytorch_tanh" if _get(margs, "gelu_tanh", False) else "gelu"
    return in_use(values)


# Fields that say how a checkpoint is laid out and stored. A conversion between Megatron layouts
# sets these for the target and keeps every other field of the source run's args, so training
# resumes with the same arguments (besides the new layout's).
LAYOUT_FIELDS = (
    "num_layers", "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "num_layers_per_virtual_pipeline_stage", "virtual_pipeline_model_parallel_size",
    "num_layer_list", "noop_layers", "padded_vocab_size", "make_vocab_size_divisible_by", "transformer_impl",
    "moe_grouped_gemm", "mla_spelling", "params_dtype", "bf16", "fp16",
)
# The args that decide whether a module exists: set for the target from the tensors it holds (a
# source's own may contradict them: an MLA model stored with qk_layernorm False, a conversion
# that leaves the MTP layers out)
MODULE_FIELDS = (
    "qk_layernorm", "add_qkv_bias", "add_bias_linear", "untie_embeddings_and_output_weights", "num_experts",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "shared_expert_gate",
    "moe_router_enable_expert_bias", "multi_latent_attention", "q_lora_rank", "mtp_num_layers",
)
# How the checkpoint is stored (`--ckpt-format`): set for the target where the source recorded it
FORMAT_FIELDS = ("ckpt_format", "use_dist_ckpt")
# What the checkpoint holds besides the weights: a weights-only output says it has no optimizer
# and no RNG state, so that Megatron-LM does not ask for them when it resumes
CONTENT_FIELDS = ("no_save_optim", "no_save_rng")
# Megatron-LM's other ways to write an uneven pipeline split: replaced by num_layer_list
PIPELINE_SPLIT_FIELDS = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers")
# What our reader needs and a training run may not have stored
READER_FIELDS = ("vocab_size",)


# (arg, what a true value builds: a pattern of the tensor names it adds) for the flags Megatron
# builds modules from; `module_contradictions` holds stored args against the tensors present
_MODULE_PATTERNS = (
    ("qk_layernorm", r"self_attention\.(q_layernorm|k_layernorm|kv_layernorm)\.|"
                     r"self_attention\.linear_(q|kv)_up_proj\.layer_norm_weight"),
    ("add_bias_linear", r"self_attention\.linear_proj\.bias"),
    ("moe_shared_expert_gate", r"mlp\.shared_experts\.gate_weight"),
    ("moe_router_enable_expert_bias", r"mlp\.router\.expert_bias"),
    ("num_experts", r"mlp\.router\.weight"),
    ("mtp_num_layers", r"^mtp\."),
)


def module_contradictions(margs, names) -> list[str]:
    """Where the stored args and the tensors disagree on a module: Megatron builds its model from
    the args, so a run started from them could not load the file (e.g. an MLA model's q/kv norms
    with qk_layernorm False). `names`: every tensor name of the checkpoint, any rank, any chunk."""
    names = set(names)
    problems = []
    checks = list(_MODULE_PATTERNS)
    if not _get(margs, "multi_latent_attention", False):  # MLA has no fused q/k/v projection bias
        checks.append(("add_qkv_bias", r"self_attention\.linear_qkv\.bias"))
    for arg, pattern in checks:
        said = bool(_get(margs, arg, False))
        if arg == "add_qkv_bias":
            said = said or bool(_get(margs, "add_bias_linear", False))  # Megatron: either makes the bias
        found = sorted(n for n in names if re.search(pattern, n))
        if said != bool(found):
            problems.append(f"stored args say {arg}={_get(margs, arg)!r}, but the tensors "
                            + (f"hold '{found[0]}' ({len(found)} such)" if found else "hold none it builds"))
    mtp = {m.group(1) for m in map(re.compile(r"^mtp\.(?:layers|final_layernorms)\.(\d+)\.").match, names) if m}
    if mtp and len(mtp) != int(_get(margs, "mtp_num_layers", 0)):
        problems.append(f"stored args say mtp_num_layers={_get(margs, 'mtp_num_layers')!r}, but the tensors hold "
                        f"{len(mtp)} multi-token-prediction layer(s)")
    return problems


def mark_weights_only(args: argparse.Namespace) -> argparse.Namespace:
    for name in CONTENT_FIELDS:
        setattr(args, name, True)
    return args


def carry_over(source_args: argparse.Namespace, target_args: argparse.Namespace, *,
               drop_prefixes: tuple[str, ...] = (), ckpt_format: str = "torch") -> argparse.Namespace:
    """The source run's args with the target's layout fields (`target_args` as `make_args` builds
    them) and storage format; fields starting with `drop_prefixes` removed (a merged LoRA's `lora_*`)."""
    args = argparse.Namespace(**{k: v for k, v in vars(source_args).items()
                                 if not (drop_prefixes and k.startswith(drop_prefixes))})
    for name in LAYOUT_FIELDS:
        setattr(args, name, getattr(target_args, name))
    for name in MODULE_FIELDS:  # what the target holds; a field the run never had stays out while off
        if hasattr(args, name) or getattr(target_args, name):
            setattr(args, name, getattr(target_args, name))
    for name in PIPELINE_SPLIT_FIELDS:
        if getattr(args, name, None) is not None:
            setattr(args, name, None)
    if hasattr(args, "ckpt_format"):
        args.ckpt_format = ckpt_format
    if hasattr(args, "use_dist_ckpt"):
        args.use_dist_ckpt = ckpt_format != "torch"
    for name in READER_FIELDS:
        if getattr(args, name, None) is None and getattr(target_args, name, None) is not None:
            setattr(args, name, getattr(target_args, name))
    if getattr(source_args, "noop_layers", None) != target_args.noop_layers and target_args.moe_layer_freq is not None:
        args.moe_layer_freq = target_args.moe_layer_freq  # one entry per Megatron layer slot
    return args


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
        post_norm=bool(_get(margs, "post_norm", False)),
        norm_has_bias=bool(_get(margs, "norm_has_bias", False)),
        embed_layernorm=bool(_get(margs, "embed_layernorm", False)),
        swiglu=bool(_get(margs, "gated_linear_unit", _get(margs, "swiglu", True) or _get(margs, "geglu", False))),
        normalization=str(_get(margs, "normalization", "RMSNorm")),
        mtp_num_layers=int(_get(margs, "mtp_num_layers", 0)),
        computes=_computes_from_args(margs),
        **_moe_and_mla_from_args(margs, num_layers, noop),
    )


def _moe_and_mla_from_args(margs, num_layers: int, noop: tuple[int, ...]) -> dict:
    fields = {}
    experts = int(_get(margs, "num_experts", 0))
    if experts:
        freq = _get(margs, "moe_layer_freq", 1)
        if isinstance(freq, int):  # every freq-th layer, after the first_k_dense_replace dense ones
            dense_first = int(_get(margs, "first_k_dense_replace", 0))
            pattern = [int(i % freq == 0 and i >= dense_first) for i in range(num_layers)]
        else:  # one entry per Megatron layer
            pattern = list(parse_int_list(freq, "moe_layer_freq") if isinstance(freq, str) else map(int, freq))
        real = [slot for slot in range(num_layers) if slot not in set(noop)]  # the slot of each HF layer
        moe_layers = tuple(hf for hf, slot in enumerate(real) if pattern[slot])
        mtp = int(_get(margs, "mtp_num_layers", 0))
        if mtp and real and pattern[real[-1]]:  # MTP layers are built like the last decoder layer
            moe_layers += tuple(range(len(real), len(real) + mtp))
        moe_ffn = int(_get(margs, "moe_ffn_hidden_size", _get(margs, "ffn_hidden_size", 0)))
        shared = int(_get(margs, "moe_shared_expert_intermediate_size", 0)) \
            or int(_get(margs, "n_shared_experts", 0)) * moe_ffn
        fields.update(
            num_experts=experts, moe_ffn_hidden_size=moe_ffn, moe_layers=moe_layers,
            moe_router_topk=int(_get(margs, "moe_router_topk", 2)),
            shared_expert_ffn_hidden_size=shared,
            shared_expert_gate=bool(_get(margs, "moe_shared_expert_gate", _get(margs, "shared_expert_gate", False))),
            router_score_function=str(_get(margs, "moe_router_score_function", "softmax")),
            router_pre_softmax=bool(_get(margs, "moe_router_pre_softmax", False)),
            router_expert_bias=bool(_get(margs, "moe_router_enable_expert_bias", False)),
            router_topk_scaling_factor=_get(margs, "moe_router_topk_scaling_factor"),
            router_num_groups=_get(margs, "moe_router_num_groups"),
            router_group_topk=_get(margs, "moe_router_group_topk"),
        )
    if _get(margs, "multi_latent_attention", False):
        fields.update(
            multi_latent_attention=True, q_lora_rank=_get(margs, "q_lora_rank"),
            kv_lora_rank=int(_get(margs, "kv_lora_rank", 0)), qk_head_dim=int(_get(margs, "qk_head_dim", 0)),
            qk_pos_emb_head_dim=int(_get(margs, "qk_pos_emb_head_dim", 0)), v_head_dim=int(_get(margs, "v_head_dim", 0)))
    return fields


def spelling_from_args(margs) -> Spelling:
    """The tensor spelling a checkpoint's stored args promise (mg_names)."""
    impl = _get(margs, "transformer_impl", "local")
    grouped = bool(_get(margs, "moe_grouped_gemm", False))
    layout = ("te_grouped" if impl == "transformer_engine" else "grouped_gemm") if grouped else "per_expert"
    return Spelling(impl, layout, _get(margs, "mla_spelling", "mindspeed"))


def _first_last_split(margs) -> str | None:
    """Megatron-LM's uneven split (`--decoder-first/last-pipeline-num-layers`: the first and/or
    last stage hold the given counts, the others share the rest evenly) as a num_layer_list."""
    first, last = _get(margs, PIPELINE_SPLIT_FIELDS[0]), _get(margs, PIPELINE_SPLIT_FIELDS[1])
    pp = int(_get(margs, "pipeline_model_parallel_size", 1))
    if first is None and last is None or pp == 1:
        return None
    fixed = [int(first) if first is not None else None] + [None] * (pp - 2) + [int(last) if last is not None else None]
    free = [i for i, n in enumerate(fixed) if n is None]
    rest = int(margs.num_layers) - sum(n for n in fixed if n is not None)
    if free and rest % len(free):
        raise ConvertError(f"decoder_first/last_pipeline_num_layers leave {rest} layers for {len(free)} stages")
    counts = [n if n is not None else rest // len(free) for n in fixed]
    return ",".join(map(str, counts))


def layout_from_args(margs, dims: ModelDims, *, source: str) -> ParallelLayout:
    """The layout a checkpoint was written with; validated like a target layout."""
    if _get(margs, "pipeline_model_parallel_layout") is not None:
        raise ConvertError(f"{source}: its args use pipeline_model_parallel_layout, which is not supported "
                           f"(uneven stages as num_layer_list or decoder_first/last_pipeline_num_layers are)")
    try:
        return ParallelLayout.build(
            dims.num_layers,
            tp=int(_get(margs, "tensor_model_parallel_size", 1)),
            pp=int(_get(margs, "pipeline_model_parallel_size", 1)),
            ep=int(_get(margs, "expert_model_parallel_size", 1)),
            vpp_layers=_get(margs, "num_layers_per_virtual_pipeline_stage"),
            num_layer_list=_get(margs, "num_layer_list") or _first_last_split(margs),
            noop_layers=_get(margs, "noop_layers"),
            num_heads=dims.num_attention_heads,
            num_query_groups=None if dims.multi_latent_attention else dims.num_query_groups,
            num_experts=dims.num_experts,
            expert_tp=_get(margs, "expert_tensor_parallel_size"),
            prefix="source ",
        )
    except ConvertError as exc:
        raise ConvertError(f"{source}: inconsistent stored args: {exc}") from None
