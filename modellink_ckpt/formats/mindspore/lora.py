"""MindFormers LoRA adapters: found by name, merged into their base while it is read, or exported.

MindFormers names an adapter of the tensor `X.weight` one of these ways:
- mcore (PEFT-like): `X.lora_A.weight` [r, in], `X.lora_B.weight` [out, r];
- legacy, mindpet 1.x: `X.mindpet_delta_lora_a` / `X.mindpet_delta_lora_b`;
- legacy, older mindpet/tk: `X.tk_delta_lora_a` / `X.tk_delta_lora_b`;
- legacy conversions of HF PEFT adapters: `X.lora_a` / `X.lora_b`.
The merge is MindFormers' own (`tools/transform_ckpt_lora.py`): `W' = W + scaling * B @ A`, here in
fp32 and cast back to W's dtype; `scaling` is `--lora-scaling` (MindFormers' convention) or
`--lora-alpha / --lora-r`.
"""

from __future__ import annotations

import dataclasses

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.mindspore import names as ms_names
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.lora import peft_module_tensors

# (A suffix, B suffix) -> the base tensor is the name before the suffix + ".weight"
STYLES = ((".lora_A.weight", ".lora_B.weight"), (".mindpet_delta_lora_a", ".mindpet_delta_lora_b"),
          (".tk_delta_lora_a", ".tk_delta_lora_b"), (".lora_a", ".lora_b"))


def is_adapter(name: str) -> bool:
    return name.endswith(tuple(s for pair in STYLES for s in pair))


def find_adapters(names, base_names, where: str) -> dict[str, tuple[str, str]]:
    """{base tensor: (A name, B name)} of every adapter among `names`; a lone A or B, or an adapter
    whose base is not among `base_names`, is an error."""
    names = set(names)
    found: dict[str, tuple[str, str]] = {}
    for a_suffix, b_suffix in STYLES:
        for name in sorted(n for n in names if n.endswith(a_suffix) or n.endswith(b_suffix)):
            stem = name[:-len(a_suffix)] if name.endswith(a_suffix) else name[:-len(b_suffix)]
            a_name, b_name = stem + a_suffix, stem + b_suffix
            if a_name not in names or b_name not in names:
                raise ConvertError(f"{where}: '{name}' has no matching "
                                   f"'{b_name if name == a_name else a_name}' (a lone LoRA tensor)")
            base = stem + ".weight"
            if base not in base_names:
                raise ConvertError(f"{where}: LoRA adapter '{stem}' has no base tensor '{base}'")
            found[base] = (a_name, b_name)
    return found


@dataclasses.dataclass(frozen=True)
class MsLora:
    """How to apply the adapters: `scaling` for the merge; `r` (if given) is checked."""

    scaling: float
    r: int | None = None
    alpha: float | None = None

    @classmethod
    def from_flags(cls, scaling: float | None, r: int | None, alpha: float | None) -> "MsLora":
        if scaling is not None:
            return cls(float(scaling), r, alpha)
        if r is None or alpha is None:
            raise UsageError("MindSpore LoRA: pass --lora-scaling (MindFormers' scaling) or --lora-r and --lora-alpha")
        if r <= 0:
            raise UsageError(f"--lora-r {r}: must be a positive integer")
        return cls(float(alpha) / r, r, alpha)


def merged(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, lora: MsLora, name: str) -> torch.Tensor:
    """`base + scaling * B @ A` in fp32, in base's dtype."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0] or \
            (lora_b.shape[0], lora_a.shape[1]) != tuple(base.shape):
        raise ConvertError(f"LoRA of '{name}': B {list(lora_b.shape)} @ A {list(lora_a.shape)} does not fit the "
                           f"weight {list(base.shape)}")
    if lora.r is not None and lora_a.shape[0] != lora.r:
        raise ConvertError(f"LoRA of '{name}' has rank {lora_a.shape[0]}, but --lora-r is {lora.r}")
    delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)
    return (base.to(torch.float32) + lora.scaling * delta).to(base.dtype)


# Transforms that only move whole rows (dim 0): an adapter's B moves the same way, A stays.
ROW_TRANSFORMS = ("rename", "interleave_halves", "split_qkv", "split_halves", "cat_rows")


def peft_tensors(naming, family, dims, kind: str, layer, shapes: dict, adapters: dict, read, shape_of) -> dict:
    """PEFT tensors (`base_model.model.<hf module>.lora_{A,B}.weight`) of the adapters of one
    message's MindSpore tensors. Which HF rows each MindSpore row becomes is traced through the
    naming and the HF mapping with row ids; B's rows follow them, A is shared. `adapters`: {base:
    (A name, B name)}; `read(name)`, `shape_of(name)` read the checkpoint."""
    rules = {rule.mcore: rule for rule in mapping.message_rules(kind, family, dims, layer)}
    out = {}
    for inst in naming.plan(kind, layer, shapes, dims):
        for traced in (name for name in inst.ms if name in adapters):
            if inst.transform not in [ms_names.TRANSFORMS[t] for t in ROW_TRANSFORMS]:
                raise ConvertError(f"LoRA on '{traced}': its MindSpore layout (stacked experts) cannot be exported "
                                   f"as a PEFT adapter")
            ids = [torch.arange(shape_of(n)[0], dtype=torch.float64)[:, None] if n == traced
                   else torch.full((shape_of(n)[0], 1), -1.0, dtype=torch.float64) for n in inst.ms]
            parts = inst.transform.from_ms(ids, [(shapes[p][0], 1) for p in inst.mg], dims)
            lora_a, lora_b = (read(n) for n in adapters[traced])
            for part_name, part in zip(inst.mg, parts):
                rule = rules[ms_names.local_name(kind, layer, part_name)]
                for hf_name, hf_rows in zip(rule.hf, rule.to_hf(part)):
                    rows = T.as_tensor(hf_rows)[:, 0]
                    if bool((rows < 0).all()):
                        continue
                    if bool((rows < 0).any()):
                        raise ConvertError(f"LoRA on '{traced}': '{hf_name}' is made of rows of several MindSpore "
                                           f"tensors with adapters of their own; no single PEFT adapter can hold it")
                    out.update(peft_module_tensors([hf_name], lora_a, lora_b[rows.long()]))
    return out
