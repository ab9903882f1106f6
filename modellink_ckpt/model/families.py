"""Model families as data: `configs/checkpoint/model_cfg.json` and the sizes of one model.

A family entry says which parts a model is made of (`config_set_value`), where its sizes sit in
the HF `config.json` (`config_hf_key_mapping`) and what its HF modules are called
(`model_hf_key_mapping`). The code knows parts, never family names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from modellink_ckpt.errors import ConvertError, UsageError

DEFAULT_MODEL_CFG = Path(__file__).resolve().parents[2] / "configs" / "checkpoint" / "model_cfg.json"

# What a model computes with besides its sizes and parts: Megatron / MindSpeed-LLM argument name ->
# its value when the feature is off (such a value is not stored). The base entry of model_cfg.json
# says where each sits in an HF config.json (`config_hf_key_mapping`; a family may move one), and a
# family may fix one (`config_set_value`, e.g. Gemma's zero-centred norms).
COMPUTE_ARGS = {
    "position_embedding_type": "rope",           # rope, alibi or none
    "rotary_percent": 1.0,                       # partial rotary: the share of each head that rotates
    "rotary_interleaved": False,                 # rotate (x0, x1), (x2, x3), ... rather than two halves
    "rope_scaling_type": None,                   # linear, dynamic, yarn, longrope, llama3
    "rope_scaling_factor": None,
    "rope_scaling_original_max_position_embeddings": None,
    "low_freq_factor": None,                     # llama3
    "high_freq_factor": None,
    "rope_scaling_beta_fast": None,              # yarn
    "rope_scaling_beta_slow": None,
    "rope_scaling_mscale": None,
    "rope_scaling_mscale_all_dim": None,
    "rope_scaling_attention_factor": None,       # yarn, longrope
    "rope_scaling_alpha": None,                  # Hunyuan's NTK alpha: the rope base times alpha ** (d / (d - 2))
    "long_factor": None,                         # longrope
    "short_factor": None,
    "hidden_act": "silu",                        # the MLP activation (gated or not: the family's swiglu)
    "layernorm_zero_centered_gamma": False,      # norms scale by (1 + w)
    "input_embeds_norm": False,                  # embeddings scaled by sqrt(hidden) (Gemma)
    "embedding_multiplier_scale": None,          # embeddings scaled by this (MiniCPM scale_emb, Granite)
    "residual_multiplier": None,                 # Granite
    "scale_depth": None,                         # MiniCPM: residual branches scaled by scale_depth / sqrt(layers)
    "dim_model_base": None,                      # MiniCPM: logits divided by hidden / dim_model_base
    "output_multiplier_scale": None,             # logits multiplied (Cohere logit_scale) ...
    "logits_scaling": None,                      # ... or divided (Granite)
    "attention_multiplier": None,                # Granite: the softmax scale
    "query_pre_attn_scalar": None,               # Gemma 2/3: the softmax scale is query_pre_attn_scalar ** -0.5
    "attn_logit_softcapping": None,              # Gemma 2
    "output_logit_softcapping": None,            # Gemma 2 final logits
    "sliding_window": None,                      # attention window (tokens)
    "use_sliding_window": False,                 # Qwen2 family switch
    "max_window_layers": None,                   # Qwen2: layers from this index on use the window
    "attention_layer_types": None,               # per layer: sliding_attention / full_attention
    "rope_local_base_freq": None,                # Gemma 3: the rope base of the sliding-window layers
    "rope_scaling_truncate": None,               # yarn: False keeps the correction range unrounded (gpt-oss)
    "softmax_type": "vanilla",                   # learnable: a learnt sink logit per head joins each softmax
    "qk_layernorm_after_rope": False,            # q/k norms applied to the rotated heads (Hunyuan)
    "glu_linear_offset": 0.0,                    # gated MLP: act(gate) * (up + offset)
    "activation_func_clamp_value": None,         # gate clamped above, up on both sides (gpt-oss swiglu_limit)
    "swiglu_alpha": None,                        # gate * sigmoid(alpha * gate) (gpt-oss; Megatron: quick_gelu)
    # not computed with, but a config rebuilt without them may name ids outside the vocabulary
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
# HF keys of the rope dict (transformers 5 `rope_parameters`, 4.x `rope_scaling`)
ROPE_DICT_KEYS = ("rope_type", "type", "factor", "original_max_position_embeddings", "low_freq_factor",
                  "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                  "long_factor", "short_factor", "partial_rotary_factor", "truncate", "alpha")

DEFAULT_FAMILY = "llama2"  # when nothing says which family a checkpoint is
QKV_TYPES = ("unpack", "pack_gqa", "pack_self")
FC_TYPES = ("gate_up_down", "gate_up", "h_to_4h")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One resolved `model_mappings` entry (with its `__base__` chain applied)."""

    name: str
    settings: dict[str, Any]
    config_keys: dict[str, str]
    hf_modules: dict[str, str]
    mindspore: dict[str, list] = dataclasses.field(default_factory=dict)  # MindFormers namings (ms_names)
    cfg_path: str | None = None  # the model_cfg.json it comes from (None: the built-in one)

    @property
    def qkv_type(self) -> str:
        return self.settings.get("qkv_type", "unpack")

    @property
    def fc_type(self) -> str:
        return self.settings.get("fc_type", "gate_up_down")

    @property
    def fused_experts(self) -> dict | None:
        """How HF stacks a layer's routed experts in one tensor per projection, or None (a module
        per expert): `orientation` in_out ([E, in, out], gpt-oss) or out_in, `gate_up` interleaved
        (gate and up columns alternate) or halves."""
        if "layers_mlp_experts_fused_fc1" not in self.hf_modules:
            return None
        return {"orientation": "in_out", "gate_up": "halves", **self.settings.get("fused_experts", {})}

    def hf_name(self, module: str, param: str | None = "weight", layer: int | None = None,
                expert: int | None = None) -> str:
        """HF tensor name of `param` of the logical `module` (e.g. layers_mlp_gate_proj) at `layer`
        (and `expert`); `param=None` when the template names the tensor itself."""
        template = self.hf_modules.get(module)
        if template is None:  # fine between Megatron layouts; `require_hf_names` stops HF input/output
            return f"{UNMAPPED}{module}"
        if layer is not None:
            template = template.replace("[layer_idx]", f".{layer}")
        if expert is not None:
            template = template.replace("[expert_idx]", f".{expert}")
        return template if param is None else f"{template}.{param}"

    def has(self, module: str) -> bool:
        return module in self.hf_modules

    @property
    def model_types(self) -> tuple[str, ...]:
        """The config.json `model_type`s this family converts faithfully: its own, and those the
        entry lists in `hf_model_types_also` (MindSpeed-LLM's `llama2` serves Mistral, Qwen2, ...)."""
        own = self.settings.get("hf_model_type", "llama")
        return (own, *[t for t in self.settings.get("hf_model_types_also", ()) if t != own])

    @property
    def has_experts(self) -> bool:
        """Whether the family's layers may be mixture-of-experts layers (it maps routed experts)."""
        return any(module.startswith(("layers_mlp_experts_", "layers_mlp_router")) for module in self.hf_modules)

    def fits_config(self, config: dict) -> bool:
        """Whether an HF config.json describes a model of this family (by `model_type` or `architectures`)."""
        architectures = set(config.get("architectures") or [])
        return config.get("model_type") in self.model_types or \
            bool(architectures & set(self.settings.get("hf_architectures") or []))

    def config_key(self, arg: str) -> str:
        """The config.json key (first spelling) an argument is read from."""
        return config_key_spellings(self.config_keys.get(arg, arg))[0][0]

    def layer_of(self, hf_name: str) -> int | None:
        """The HF layer an HF tensor belongs to (`model.layers.3.` / BLOOM's `transformer.h.3.`), or None."""
        template = self.hf_modules.get("layers_input_layernorm", "model.layers[layer_idx]")
        prefix = template.split("[layer_idx]")[0]
        match = re.match(re.escape(prefix) + r"\.(\d+)\.", hf_name)
        return int(match.group(1)) if match else None


UNMAPPED = "<unmapped>:"  # the HF name of a module the family does not map


def load_family(name: str, cfg_path: str | Path | None = None) -> ModelFamily:
    path = Path(cfg_path) if cfg_path else DEFAULT_MODEL_CFG
    try:
        mappings = json.loads(path.read_text())["model_mappings"]
    except FileNotFoundError:
        raise UsageError(f"model config file not found: {path}") from None
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{path}: not a model_cfg.json with 'model_mappings' ({exc})") from None
    if name not in mappings:
        known = ", ".join(sorted(k for k in mappings if k != "base"))
        raise UsageError(f"--model-type-hf {name}: unknown model family (known: {known})")

    chain, entry = [], name
    while entry is not None:
        if entry in chain:
            raise UsageError(f"{path}: '__base__' cycle through '{entry}'")
        if entry not in mappings:
            raise UsageError(f"{path}: entry '{chain[-1]}' has unknown __base__ '{entry}'")
        chain.append(entry)
        entry = mappings[entry].get("__base__")

    merged: dict[str, dict] = {"config_set_value": {}, "config_hf_key_mapping": {}, "model_hf_key_mapping": {}}
    mindspore: dict[str, list] = {}  # naming -> rules; a derived entry's rule replaces one for the same Megatron tensors
    for entry in reversed(chain):  # base first, so the named entry overrides
        for section, values in merged.items():
            values.update(mappings[entry].get(section, {}))
        for naming, rules in (mappings[entry].get("mindspore") or {}).items():
            replaced = {json.dumps(rule.get("mg")) for rule in rules}
            mindspore[naming] = [r for r in mindspore.get(naming, []) if json.dumps(r.get("mg")) not in replaced] + rules
    settings = merged["config_set_value"]
    if settings.get("qkv_type", "unpack") not in QKV_TYPES:
        raise UsageError(f"{path}: '{name}' has qkv_type {settings['qkv_type']!r}; supported: {', '.join(QKV_TYPES)}")
    if settings.get("fc_type", "gate_up_down") not in FC_TYPES:
        raise UsageError(f"{path}: '{name}' has fc_type {settings['fc_type']!r}; supported: {', '.join(FC_TYPES)}")
    return ModelFamily(name, settings, merged["config_hf_key_mapping"], merged["model_hf_key_mapping"], mindspore,
                       str(cfg_path) if cfg_path else None)


def family_names(cfg_path: str | Path | None = None) -> list[str]:
    """The family entries of a model_cfg.json, in file order (`base` is a template, not a family)."""
    path = Path(cfg_path) if cfg_path else DEFAULT_MODEL_CFG
    return [n for n in json.loads(path.read_text())["model_mappings"] if n != "base"]


def family_to_check(explicit: str | None, *recorded: str | None, cfg_path=None) -> ModelFamily:
    """The family a checkpoint is checked as (`--verify`): --model-type-hf, else the first one
    it records (its args, its manifest), else the default."""
    return load_family(explicit or next((r for r in recorded if isinstance(r, str)), None) or DEFAULT_FAMILY,
                       cfg_path)


def families_for_config(config: dict, cfg_path: str | Path | None = None) -> list[str]:
    """The family entries whose `hf_model_type` / `hf_architectures` match an HF config.json."""
    names = family_names(cfg_path)
    architectures = set(config.get("architectures") or [])
    by_architecture, by_type = [], []
    for name in names:
        settings = load_family(name, cfg_path).settings
        if architectures & set(settings.get("hf_architectures") or []):
            by_architecture.append(name)
        elif config.get("model_type") and settings.get("hf_model_type") == config.get("model_type"):
            by_type.append(name)
    # a model_type that names an entry outranks the shared class (Kimi-K2 ships DeepseekV3ForCausalLM)
    by_architecture.sort(key=lambda name: load_family(name, cfg_path).settings.get("hf_model_type")
                         != config.get("model_type"))
    return by_architecture or by_type


UNSAFE_FLAG = "--skip-family-check"  # converts with an explicit family although the evidence disagrees


def check_family_fits_config(family: ModelFamily, config: dict, where: str) -> None:
    """Refuse an explicit family that does not convert the model `config` (an HF config.json at
    `where`) describes: such a conversion writes a different model (a Gemma's zero-centred norms
    onto a Llama, a Mixtral with no experts) without a tensor going missing."""
    if family.fits_config(config):
        return
    architectures = "/".join(config.get("architectures") or []) or "no architectures"
    fitting = [name for name in family_names(family.cfg_path)
               if load_family(name, family.cfg_path).fits_config(config)]
    hint = f"families that fit: {', '.join(fitting)}" if fitting else "no family of the model config fits it"
    raise UsageError(f"--model-type-hf {family.name}: {where} describes model_type {config.get('model_type')!r} "
                     f"({architectures}), which {family.name} does not convert ({hint}; {UNSAFE_FLAG} converts "
                     f"anyway, unsafe)")


def check_family_fits_recorded(family: ModelFamily, recorded: str, where: str) -> None:
    """Refuse an explicit family that does not convert the model a checkpoint records it was
    converted as (`recorded`: the model_cfg.json entry in its args or manifest)."""
    try:
        model_type = load_family(recorded, family.cfg_path).settings.get("hf_model_type", "llama")
    except UsageError:  # an entry of another model_cfg.json: nothing to compare
        return
    if model_type in family.model_types:
        return
    fitting = [name for name in family_names(family.cfg_path)
               if model_type in load_family(name, family.cfg_path).model_types]
    raise UsageError(f"--model-type-hf {family.name}: {where} records family {recorded} (model_type "
                     f"{model_type!r}), which {family.name} does not convert (families that fit: "
                     f"{', '.join(fitting)}; {UNSAFE_FLAG} converts anyway, unsafe)")


def check_family_fits_dims(family: ModelFamily, dims: "ModelDims", where: str, recorded: frozenset = frozenset()) -> None:
    """Refuse a family whose parts contradict the model's own description (a Megatron run's args):
    experts, multi-latent attention, and what the family fixes of the computation that the
    description records (`recorded`: the COMPUTE_ARGS it holds a value for)."""
    problems = []
    if family.has_experts != bool(dims.num_experts):
        problems.append(f"{family.name} is a {'mixture-of-experts' if family.has_experts else 'dense'} family "
                        f"but the model has {dims.num_experts or 'no'} experts")
    if bool(family.settings.get("multi_latent_attention")) != dims.multi_latent_attention:
        problems.append(f"{family.name} {'uses' if family.settings.get('multi_latent_attention') else 'has no'} "
                        f"multi-latent attention but the model {'does' if dims.multi_latent_attention else 'does not'}")
    for name, value in family.settings.items():
        if name in COMPUTE_ARGS and name not in family.config_keys and name in recorded \
                and dims.computes.get(name, COMPUTE_ARGS[name]) != value:
            problems.append(f"{family.name} computes with {name}={value!r} but the model with "
                            f"{dims.computes.get(name, COMPUTE_ARGS[name])!r}")
    if problems:
        raise UsageError(f"--model-type-hf {family.name}: {where}: {problems[0]} ({UNSAFE_FLAG} converts anyway, "
                         f"unsafe)")


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Sizes and part choices of one model, independent of any parallel layout.

    `num_layers` counts real (HF) layers; noop slots belong to the layout, not the model.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: float
    tie_word_embeddings: bool
    add_qkv_bias: bool
    add_dense_bias: bool
    qk_layernorm: bool
    swiglu: bool
    normalization: str = "RMSNorm"
    post_norm: bool = False                   # sandwich norms: one more norm after attention and after the MLP
    norm_has_bias: bool = False               # LayerNorms with a bias (every norm of the model)
    embed_layernorm: bool = False             # a norm right after the embedding (BLOOM)
    # mixture of experts (num_experts 0: a dense model)
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 0
    moe_layers: tuple[int, ...] = ()          # the HF layers that are MoE layers
    shared_expert_ffn_hidden_size: int = 0    # all shared experts together; 0: none
    shared_expert_gate: bool = False          # Qwen2-MoE's sigmoid gate on the shared expert
    router_score_function: str = "softmax"    # or "sigmoid" (DeepSeek-V3)
    router_pre_softmax: bool = False          # softmax over all experts, top-k not renormalised
    router_expert_bias: bool = False          # DeepSeek-V3 e_score_correction_bias
    router_topk_scaling_factor: float | None = None
    router_num_groups: int | None = None
    router_group_topk: int | None = None
    # multi-latent attention (DeepSeek-V2/V3)
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None            # None: a plain q projection
    kv_lora_rank: int = 0
    qk_head_dim: int = 0                      # the non-rope part of a q/k head
    qk_pos_emb_head_dim: int = 0              # the rope part
    v_head_dim: int = 0
    # DeepSeek-V3 multi-token prediction: layers after the decoder (HF model.layers.{num_layers + k})
    mtp_num_layers: int = 0
    # what the model computes with besides its sizes: {COMPUTE_ARGS name: value}, features in use only
    computes: dict = dataclasses.field(default_factory=dict)

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["moe_layers"] = list(self.moe_layers)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "ModelDims":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in names}
        if "moe_layers" in values:
            values["moe_layers"] = tuple(values["moe_layers"])
        return cls(**values)


def in_use(values: dict) -> dict:
    """The COMPUTE_ARGS of `values` that change what the model computes (not None, not off)."""
    used = {}
    for name, value in values.items():
        if value is None or value == COMPUTE_ARGS[name] or (name == "rope_scaling_type" and value == "default") \
                or (name == "attention_layer_types" and set(value) == {"full_attention"}):
            continue
        used[name] = list(value) if isinstance(value, tuple) else value
    return used


def config_key_spellings(keys) -> list[tuple[str, float | None]]:
    """[(config.json key, scale)] of one `config_hf_key_mapping` entry: a key, a list of alternative
    spellings, or {"key": ..., "scale": s} for a value stored in other units (Qwen-1's
    intermediate_size is twice the MLP width: scale 0.5; ChatGLM's rope_ratio is rotary_base / 1e4)."""
    if isinstance(keys, dict):
        return [(keys["key"], float(keys["scale"]))]
    return [(key, None) for key in ([keys] if isinstance(keys, str) else keys)]


def _scaled(value, scale: float):
    scaled = value * scale
    return int(scaled) if isinstance(value, int) and float(scaled).is_integer() else scaled


def _hf_value(config: dict, key: str):
    """A value of an HF config, in either the transformers 4 or 5 spelling.

    transformers 5 moved `rope_theta` (and the rope scaling keys) into `rope_parameters`.
    """
    if key in config and config[key] is not None:
        return config[key]
    for nested in ("rope_parameters", "rope_scaling"):
        rope = config.get(nested)
        if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):  # one per layer type (Gemma 3)
            if key == "rope_local_base_freq":
                return (rope.get("sliding_attention") or {}).get("rope_theta")
            rope = rope["full_attention"]
        if isinstance(rope, dict) and key in rope:
            return rope[key]
    return None


def dims_from_hf_config(family: ModelFamily, config: dict, *, source: str = "config.json",
                        overrides: dict | None = None) -> ModelDims:
    """Read a model's sizes from its HF `config.json` through the family's key mapping."""
    values: dict[str, Any] = {}
    for arg, keys in family.config_keys.items():
        for key, scale in config_key_spellings(keys):
            value = _hf_value(config, key)
            if value is not None:
                values[arg] = value if scale is None else _scaled(value, scale)
                break
    for required in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if required not in values:
            raise ConvertError(f"{source}: missing '{family.config_key(required)}' "
                               f"(needed for --model-type-hf {family.name})")
    settings = dict(family.settings)
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    computes = in_use({**{k: values.get(k) for k in COMPUTE_ARGS}, **{k: settings[k] for k in COMPUTE_ARGS
                                                                      if k in settings}})
    heads = int(values["num_attention_heads"])
    return ModelDims(
        num_layers=int(values["num_layers"]),
        hidden_size=int(values["hidden_size"]),
        ffn_hidden_size=int(values.get("ffn_hidden_size", 4 * values["hidden_size"])),
        num_attention_heads=heads,
        num_query_groups=int(values.get("num_query_groups", heads)),
        kv_channels=int(values.get("kv_channels", values["hidden_size"] // heads)),
        vocab_size=int(values["vocab_size"]),
        max_position_embeddings=int(values.get("max_position_embeddings", 4096)),
        norm_epsilon=float(values.get("norm_epsilon", 1e-6)),
        rotary_base=float(values.get("rotary_base", 10000.0)),
        tie_word_embeddings=bool(values.get("tie_word_embeddings", settings.get("tie_word_embeddings", False))),
        add_qkv_bias=_part("add_qkv_bias", values, settings, overrides),
        add_dense_bias=_part("add_dense_bias", values, settings, overrides),
        qk_layernorm=_part("qk_layernorm", values, settings, overrides),
        post_norm=_part("post_norm", values, settings, overrides),
        norm_has_bias=_part("norm_has_bias", values, settings, overrides),
        embed_layernorm=_part("embed_layernorm", values, settings, overrides),
        swiglu=bool(settings.get("swiglu", True)),
        normalization=str(settings.get("normalization", "RMSNorm")),
        mtp_num_layers=int(settings.get("mtp_num_layers") or 0),
        computes=computes,
        **_moe_and_mla(values, settings, int(values["num_layers"]), family, source),
    )


def _part(name: str, values: dict, settings: dict, overrides: dict | None) -> bool:
    """Whether the model has an optional part: a flag asks for it, else config.json says (where the
    family maps a key for it, e.g. GLM-4.5's attention_bias / use_qk_norm), else the family does."""
    flag = (overrides or {}).get(name)
    if flag is not None:
        return bool(flag)
    return bool(values[name] if values.get(name) is not None else settings.get(name, False))


def _moe_and_mla(values: dict, settings: dict, num_layers: int, family: ModelFamily, source: str) -> dict:
    """The MoE and MLA fields of ModelDims from the mapped HF config values and family settings."""
    fields: dict[str, Any] = {}
    needed = ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim") \
        if settings.get("multi_latent_attention") else ()
    for arg in needed:  # a family may fix a size its config.json lacks (MiniCPM3's v_head_dim)
        if values.get(arg) is None and settings.get(arg) is not None:
            values[arg] = settings[arg]
    for arg in needed + (("topk_group",) if int(values.get("n_group") or 1) > 1 else ()):
        if values.get(arg) is None:
            raise ConvertError(f"{source}: missing '{family.config_key(arg)}' "
                               f"(needed for --model-type-hf {family.name})")
    for arg in ("num_experts", "moe_router_topk", "moe_ffn_hidden_size"):  # Hunyuan may list one per layer
        if isinstance(values.get(arg), list):
            if len(set(values[arg])) != 1:
                raise ConvertError(f"{source}: '{family.config_key(arg)}' differs between layers ({values[arg]}); "
                                   f"only one value for every layer converts")
            values[arg] = values[arg][0]
    experts = int(values.get("num_experts") or 0)
    if experts:
        dense_first = int(values.get("first_k_dense_replace") or settings.get("first_k_dense_replace") or 0)
        step = int(values.get("decoder_sparse_step") or 1)
        dense_only = set(values.get("mlp_only_layers") or ())
        mtp = int(settings.get("mtp_num_layers") or 0)
        last = values.get("last_moe_layer")  # ERNIE 4.5's moe_layer_end_index (-1: the last layer)
        last = num_layers + mtp if last is None or int(last) < 0 else int(last)
        moe_layers = tuple(i for i in range(num_layers + mtp)  # MTP layers are built like decoder layers
                           if dense_first <= i <= last and (i + 1) % step == 0 and i not in dense_only)
        moe_ffn = int(values.get("moe_ffn_hidden_size") or values.get("ffn_hidden_size"))
        shared = int(values.get("shared_expert_intermediate_size") or 0) \
            or int(values.get("n_shared_experts") or 0) * moe_ffn
        norm_topk = bool(values.get("norm_topk_prob", settings.get("norm_topk_prob", True)))
        score = str(settings.get("router_score_function", "softmax"))
        scaling = values.get("routed_scaling_factor")
        groups = values.get("n_group")
        fields.update(
            num_experts=experts, moe_ffn_hidden_size=moe_ffn, moe_layers=moe_layers,
            moe_router_topk=int(values.get("moe_router_topk") or 2),
            shared_expert_ffn_hidden_size=shared,
            shared_expert_gate=bool(settings.get("shared_expert_gate", False)) and shared > 0,
            router_score_function=score,
            # softmax then top-k without renormalising (HF norm_topk_prob False) is Megatron's pre-softmax
            router_pre_softmax=score == "softmax" and not norm_topk,
            router_expert_bias=bool(settings.get("router_bias", False)),
            router_topk_scaling_factor=float(scaling) if scaling not in (None, 1, 1.0) else None,
            router_num_groups=int(groups) if groups and int(groups) > 1 else None,
            router_group_topk=int(values["topk_group"]) if groups and int(groups) > 1 else None,
        )
    if settings.get("multi_latent_attention"):
        q_lora = values.get("q_lora_rank")
        fields.update(
            multi_latent_attention=True, q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(values["kv_lora_rank"]), qk_head_dim=int(values["qk_head_dim"]),
            qk_pos_emb_head_dim=int(values["qk_pos_emb_head_dim"]), v_head_dim=int(values["v_head_dim"]))
    return fields


def _derived_values(dims: ModelDims) -> dict:
    """Config values (by `config_hf_key_mapping` name) that ModelDims holds in another form: the
    inverse of `_moe_and_mla`."""
    if not dims.num_experts:
        return {}
    moe = set(dims.moe_layers)
    return {
        "shared_expert_intermediate_size": dims.shared_expert_ffn_hidden_size,
        "n_shared_experts": dims.shared_expert_ffn_hidden_size // dims.moe_ffn_hidden_size,
        "first_k_dense_replace": min(moe) if moe else dims.num_layers,
        "last_moe_layer": max(moe) if moe else -1,
        "decoder_sparse_step": _sparse_step(moe),
        "mlp_only_layers": [i for i in range(dims.num_layers) if i not in moe],
        "norm_topk_prob": not dims.router_pre_softmax,
        "routed_scaling_factor": dims.router_topk_scaling_factor or 1.0,
        "n_group": dims.router_num_groups or 1,
        "topk_group": dims.router_group_topk or 1,
        "num_nextn_predict_layers": dims.mtp_num_layers,
    }


def _sparse_step(moe_layers: set[int]) -> int:
    """The largest step s with every MoE layer i at (i + 1) % s == 0 (ERNIE 4.5's moe_layer_interval,
    Qwen2-MoE's decoder_sparse_step; the layers between the first and last MoE layer that the step
    skips are the dense ones)."""
    if not moe_layers:
        return 1
    first, last = min(moe_layers), max(moe_layers)
    for step in range(last + 1, 1, -1):
        if moe_layers == {i for i in range(first, last + 1) if (i + 1) % step == 0}:
            return step
    return 1


def hf_config_from_dims(family: ModelFamily, dims: ModelDims, dtype_name: str) -> dict:
    """A `config.json` for HF output when no original one is at hand, built through the same mapping."""
    by_arg = {**dims.to_dict(), **_derived_values(dims)}
    config: dict[str, Any] = {
        "architectures": list(family.settings.get("hf_architectures", ["LlamaForCausalLM"])),
        "model_type": family.settings.get("hf_model_type", "llama"),
        "hidden_act": dims.computes.get("hidden_act", "silu"),
        "dtype": dtype_name,
    }
    by_arg.update(dims.computes)
    rope = {"rope_type": "default"}
    for arg, keys in family.config_keys.items():
        if arg in by_arg and (arg not in COMPUTE_ARGS or arg in dims.computes):
            key, scale = config_key_spellings(keys)[0]
            value = by_arg[arg] if scale is None else _scaled(by_arg[arg], 1 / scale)
            if key in ROPE_DICT_KEYS or key == "rope_theta":  # transformers 5 nests these; it reads 4.x too
                rope[key] = value
            else:
                config[key] = value
    if "rope_local_base_freq" in config:  # Gemma 3: a rope per layer type, the local one plain
        local = config.pop("rope_local_base_freq")
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    if len(rope) > 1:
        config["rope_parameters"] = rope
    if dims.add_qkv_bias and family.settings.get("hf_model_type") in (None, "llama", "mistral"):
        config["attention_bias"] = True
    return config
