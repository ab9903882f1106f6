"""LoRA, whatever the checkpoint it comes from: the adapter settings, the merge (in fp32), how an
adapter is split over TP like its base layer, and which HF modules a Megatron module's adapter
becomes (PEFT names).

A target module `X` holds `lora_A` [r, in] and `lora_B` [out, r] beside its base weight `W`, and
computes `W + (alpha / r) * B @ A`. Column-parallel bases (`linear_qkv`, `linear_fc1`) hold
`lora_A` whole and `lora_B` split on dim 0; row-parallel bases (`linear_proj`, `linear_fc2`) hold
`lora_A` split on dim 1 and `lora_B` whole, so merging one shard at a time is exact. It is done in
fp32 and cast back to the weight's dtype (never in the weight's own half precision).

Export to PEFT: the TP-merged `A` and `B` of a module go to the HF module(s) its base weight
maps to, through the same `mapping.layer_rules` that convert the weights: `A` is reused for every
HF part (q/k/v, gate/up) and `B`'s rows are split exactly like the fused weight's rows. Reading
adapters is each ecosystem's: `formats.megatron.lora`, `formats.mindspore.lora`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T

DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")
ROW_TARGETS = ("linear_proj", "linear_fc2")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# the options (argparse dests) of a LoRA merge or export, for the sources that hold adapters
LORA_FLAGS = frozenset({"lora_load", "lora_r", "lora_alpha", "lora_target_modules", "save_lora_to_hf"})


def lora_request(options: dict) -> dict | None:
    """The LoRA part of a source's flags: {load, r, alpha, scaling, target_modules, export}, or
    None when no adapter is to be merged or exported."""
    if not (options.get("lora_load") or options.get("save_lora_to_hf") or options.get("lora_r") is not None
            or options.get("lora_scaling") is not None):
        return None
    return {"load": options.get("lora_load"), "r": options.get("lora_r"), "alpha": options.get("lora_alpha"),
            "scaling": options.get("lora_scaling"), "target_modules": options.get("lora_target_modules"),
            "export": bool(options.get("save_lora_to_hf"))}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """`--lora-r`, `--lora-alpha`, `--lora-target-modules` (Megatron leaf names)."""

    r: int
    alpha: float
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if int(self.r) <= 0:
            raise UsageError(f"--lora-r {self.r}: must be a positive integer")
        object.__setattr__(self, "r", int(self.r))
        object.__setattr__(self, "target_modules", tuple(self.target_modules or DEFAULT_TARGETS))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def targets(self, module: str) -> bool:
        """Whether the module path `module` is one of the targets (peft's suffix match)."""
        return any(module == t or module.endswith("." + t) for t in self.target_modules)


def merge_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """`W + scale * B @ A`, computed in fp32 and cast back to W's dtype (the same operations as
    peft's own merge, so an fp32 merge matches `merge_and_unload()` exactly)."""
    delta = (lora_b.float() @ lora_a.float()) * scale
    return (weight.float() + delta).to(weight.dtype)


# ---- export to PEFT --------------------------------------------------------------------------

def adapter_tp_kinds(module: str, swiglu: bool = True) -> tuple[str, str]:
    """The `transforms.TP_SPLIT` kinds of (lora_A, lora_B) of a target module."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf == "linear_qkv":
        return "replicated", "column"
    if leaf == "linear_fc1":
        return "replicated", "gated_column" if swiglu else "column"
    if leaf in ROW_TARGETS:
        return "row", "replicated"
    raise ConvertError(f"LoRA on '{module}': only {', '.join(DEFAULT_TARGETS)} can be exported")


def peft_module_tensors(hf_weight_names: Sequence[str], lora_a: torch.Tensor, lora_b: torch.Tensor,
                        split: Callable[[torch.Tensor], list] | None = None,
                        prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """PEFT tensors of the HF module(s) one Megatron module maps to: `split(B)` gives B's rows for
    each HF weight (in `hf_weight_names` order); A is the same for all of them."""
    parts = [lora_b] if split is None else list(split(lora_b))
    if len(parts) != len(hf_weight_names):
        raise ValueError(f"{len(parts)} parts of lora_B for {len(hf_weight_names)} HF weights")
    out = {}
    for hf_name, part in zip(hf_weight_names, parts):
        module = hf_name[:-len(".weight")] if hf_name.endswith(".weight") else hf_name
        out[f"{prefix}{module}.lora_A.weight"] = lora_a.contiguous().clone()
        out[f"{prefix}{module}.lora_B.weight"] = T.as_tensor(part).contiguous().clone()
    return out


def peft_layer_tensors(family, dims, layer: int, adapters: dict, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """PEFT tensors of HF layer `layer` from `{layer-relative module: (A, B)}` (whole, TP-merged),
    e.g. `{"self_attention.linear_qkv": (A, B)}`. Which HF modules a module feeds, and how B's rows
    split between them, comes from `mapping.layer_rules`: every family's qkv and fc1 layout, and
    MoE layers' routed experts (`mlp.experts.local_experts.{e}.linear_fc1`, `e` the GLOBAL expert
    index) and shared experts (`mlp.shared_experts.linear_fc1`)."""
    rules = {rule.mcore: rule for rule in mapping.layer_rules(family, dims, layer)}
    out = {}
    for module, (lora_a, lora_b) in adapters.items():
        rule = rules.get(f"{module}.weight")
        if rule is None:
            raise ConvertError(f"LoRA on '{module}' of layer {layer}: --model-type-hf {family.name} has no "
                               f"HF weight for it")
        if rule.slab is not None:
            raise ConvertError(f"LoRA on '{module}' of layer {layer}: --model-type-hf {family.name} stores routed "
                               f"experts fused, and PEFT has no per-expert module to put it on")
        expected = rule.shape
        if expected and (lora_b.shape[0], lora_a.shape[1]) != tuple(expected):
            raise ConvertError(f"LoRA on '{module}' of layer {layer}: B @ A is {[lora_b.shape[0], lora_a.shape[1]]}, "
                               f"the weight is {list(expected)}")
        out.update(peft_module_tensors(rule.hf, lora_a, lora_b, split=None if rule.is_rename else rule.to_hf,
                                       prefix=prefix))
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (for checks of a merge's precision)."""
    x = x.double().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)
