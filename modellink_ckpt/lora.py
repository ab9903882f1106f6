"""LoRA in Megatron checkpoints: merging adapters into their base weights, and exporting them to PEFT.

MindSpeed-LLM fine-tunes with `peft` wrapped around the Megatron model (`LoraConfig(...,
megatron_config=..., megatron_core="megatron.core")`, peft's `LoraParallelLinear`). A wrapped
module `X` (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`, also under
`mlp.experts.local_experts.{j}.` and `mlp.shared_experts.`) is stored as

    X.base_layer.weight        the frozen base weight (absent from a LoRA-only checkpoint)
    X.lora_A.default.weight    [r, in]
    X.lora_B.default.weight    [out, r]

and a LoRA-only checkpoint (`--lora-ckpt-filter`) keeps only the keys containing `lora`.
The adapters are sharded like their base layer: column-parallel bases (`linear_qkv`,
`linear_fc1`) hold `lora_A` whole and `lora_B` split on dim 0; row-parallel bases
(`linear_proj`, `linear_fc2`) hold `lora_A` split on dim 1 and `lora_B` whole. So merging one
shard at a time, `W_shard + (alpha / r) * B_shard @ A_shard`, is exact. It is done in fp32 and
cast back to the weight's dtype (never in the weight's own half precision).

Export to PEFT: the TP-merged `A` and `B` of a module go to the HF module(s) its base weight
maps to, through the same `mapping.layer_rules` that convert the weights: `A` is reused for every
HF part (q/k/v, gate/up) and `B`'s rows are split exactly like the fused weight's rows.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from modellink_ckpt import mapping
from modellink_ckpt import transforms as T
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.torch_zip import LazyTensor, loaded

DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")
ROW_TARGETS = ("linear_proj", "linear_fc2")
# where a dense layer's targets live, relative to `decoder.layers.{i}.`
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
_LORA_EXTRA = re.compile(r"^.+\.lora_[AB]\.[^.]+\._extra_state$")
_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>[^.]+)$")
_GROUPED_LORA = re.compile(r"\.weight[12]_lora_[ab]$")


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


def spec_from_args(stored_args=None, *, r: int | None = None, alpha: float | None = None,
                   target_modules: Sequence[str] | None = None, source: str = "LoRA checkpoint") -> LoraSpec:
    """The LoRA settings: the command line's values, else the ones the training run stored
    (`lora_r`, `lora_alpha`, `lora_target_modules` in `args`). A stored r that differs from
    `--lora-r` is an error: the adapters were trained with the stored one."""
    stored_r = getattr(stored_args, "lora_r", None)
    stored_alpha = getattr(stored_args, "lora_alpha", None)
    stored_targets = getattr(stored_args, "lora_target_modules", None)
    if r is not None and stored_r is not None and int(stored_r) != int(r):
        raise ConvertError(f"{source}: was trained with lora_r {stored_r}, but --lora-r is {r}")
    r = r if r is not None else stored_r
    alpha = alpha if alpha is not None else stored_alpha
    if r is None:
        raise UsageError(f"--lora-r is required ({source} does not record lora_r)")
    if alpha is None:
        raise UsageError(f"--lora-alpha is required ({source} does not record lora_alpha)")
    targets = target_modules or stored_targets or DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = targets.replace(",", " ").split()
    return LoraSpec(int(r), float(alpha), tuple(targets))


def check_same_layout(base_args, lora_args, base_dir, lora_dir) -> None:
    """LoRA and base checkpoints are merged rank file by rank file: they must be sharded alike."""
    fields = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
              "num_layers", "num_layers_per_virtual_pipeline_stage")
    defaults = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1}

    def get(margs, field):
        value = getattr(margs, field, None)
        return defaults.get(field) if value is None else value

    for field in fields:
        ours, theirs = get(base_args, field), get(lora_args, field)
        if ours is not None and theirs is not None and ours != theirs:
            raise ConvertError(f"--lora-load {lora_dir}: {field} is {theirs}, but the base checkpoint {base_dir} "
                               f"has {ours}; LoRA and base checkpoints must be sharded the same way")


# ---- reading ---------------------------------------------------------------------------------

def _rows(tensor, start: int, stop: int) -> torch.Tensor:
    if isinstance(tensor, LazyTensor):
        return tensor.read_rows(start, stop, torch.empty((stop - start, *tensor.shape[1:]), dtype=tensor.dtype))
    return tensor[start:stop]


def merge_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """`W + scale * B @ A`, computed in fp32 and cast back to W's dtype (the same operations as
    peft's own merge, so an fp32 merge matches `merge_and_unload()` exactly)."""
    delta = (lora_b.float() @ lora_a.float()) * scale
    return (weight.float() + delta).to(weight.dtype)


class MergedLoraTensor(LazyTensor):
    """A base weight shard with its LoRA shards merged in, read on demand.

    It has the `LazyTensor` interface (`shape`, `dtype`, `nbytes`, `read_rows`, `read_into`,
    `load`) and is one, so readers that accept lazy tensors accept it: reading rows reads only
    those rows of the base weight and of `B` (and `A`, which has r rows), so memory stays at the
    rows asked for."""

    __slots__ = ("base", "lora_a", "lora_b", "scale", "name")

    def __init__(self, base, lora_a, lora_b, scale: float, name: str = ""):
        self.base, self.lora_a, self.lora_b, self.scale, self.name = base, lora_a, lora_b, float(scale), name
        self.dtype, self.shape = base.dtype, torch.Size(base.shape)
        self.file = getattr(base, "file", None)
        self.record_offset, self.offset = 0, 0
        stride, step = [], 1
        for size in reversed(self.shape):
            stride.append(step)
            step *= size
        self.stride = tuple(reversed(stride))

    def is_contiguous(self) -> bool:
        return True

    def read_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        if out.dtype != self.dtype or out.numel() != (stop - start) * self.shape[1:].numel() \
                or not 0 <= start <= stop <= self.shape[0]:
            raise ConvertError(f"{self.name}: rows {start}:{stop} of a merged {list(self.shape)} {self.dtype} "
                               f"tensor do not fit {list(out.shape)} {out.dtype}")
        merged = merge_weight(_rows(self.base, start, stop), loaded(self.lora_a), _rows(self.lora_b, start, stop),
                              self.scale)
        out.view(merged.shape).copy_(merged)
        return out

    def load(self) -> torch.Tensor:
        return self.read_into(torch.empty(self.shape, dtype=self.dtype))


# ---- merging ---------------------------------------------------------------------------------

def is_lora_key(name: str) -> bool:
    return "lora" in name


def _canonical(name: str) -> str:
    """`X.base_layer.weight` -> `X.weight` (other names unchanged)."""
    match = _BASE_LAYER.match(name)
    return f"{match['module']}.{match['param']}" if match else name


def _adapters(state: dict, path, into: dict) -> None:
    """Collect `{module: {"A": (tensor, path, key), "B": ...}}` from one state dict."""
    for name, tensor in state.items():
        if not is_lora_key(name) or _LORA_EXTRA.match(name):
            continue
        if _GROUPED_LORA.search(name):
            raise ConvertError(f"{path}: '{name}': LoRA on grouped-GEMM experts (--moe-grouped-gemm) is not "
                               f"supported; train with per-expert linear layers")
        match = _LORA_WEIGHT.match(name)
        if match is None:
            raise ConvertError(f"{path}: '{name}' is a LoRA tensor of a kind this converter does not know "
                               f"(only lora_A/lora_B weights of linear layers)")
        entry = into.setdefault(match["module"], {})
        adapter = entry.setdefault("adapter", match["adapter"])
        if adapter != match["adapter"]:
            raise ConvertError(f"{path}: '{match['module']}' has adapters '{adapter}' and '{match['adapter']}'; "
                               f"only one adapter can be merged")
        entry[match["ab"]] = (tensor, path, name)


def merge_lora(base_models: dict, lora_models: dict, spec: LoraSpec, path, lora_path=None) -> dict:
    """One rank file's models with the LoRA adapters merged in.

    `base_models` and `lora_models` are `{model_key: {name: tensor or LazyTensor}}` (`model`,
    `model0`, ...) of the base rank file and of the matching LoRA rank file; for a full LoRA
    checkpoint they are the same dict. As MindSpeed-LLM loads them, the LoRA checkpoint is laid over
    the base: its non-LoRA tensors (if any) replace the base's. The result has plain names
    (`X.base_layer.weight` -> `X.weight`), every targeted weight replaced by a `MergedLoraTensor`,
    and no `base_layer` / `lora_` entries. `path` / `lora_path` name the files in errors.
    """
    lora_path = lora_path or path
    same = lora_models is base_models
    extra = sorted(set(lora_models) - set(base_models))
    if extra:
        raise ConvertError(f"{lora_path}: has '{extra[0]}', which the base checkpoint {path} does not have "
                           f"(LoRA and base checkpoints must have the same pipeline layout)")
    result = {}
    for model_key, base_state in base_models.items():
        lora_state = lora_models.get(model_key, {})
        combined: dict[str, tuple] = {}
        for state, where in ((base_state, path),) + (() if same else ((lora_state, lora_path),)):
            for name, tensor in state.items():
                if is_lora_key(name):
                    continue
                key = _canonical(name)
                if key in combined and tensor is not None and combined[key][0] is not None \
                        and tuple(combined[key][0].shape) != tuple(tensor.shape):
                    raise ConvertError(f"{where}: '{name}' has shape {list(tensor.shape)}, but the base "
                                       f"checkpoint {path} has {list(combined[key][0].shape)} for it "
                                       f"(LoRA and base checkpoints are sharded differently)")
                combined[key] = (tensor, where, name)
        adapters: dict = {}
        _adapters(base_state, path, adapters)
        if not same:
            _adapters(lora_state, lora_path, adapters)

        for module, entry in adapters.items():
            for ab in "AB":
                if ab not in entry:
                    other = entry["B" if ab == "A" else "A"]
                    raise ConvertError(f"{other[1]}: '{other[2]}' has no matching lora_{ab} in '{model_key}'")
            (a, a_path, a_name), (b, b_path, b_name) = entry["A"], entry["B"]
            if not spec.targets(module):
                raise ConvertError(f"{a_path}: '{a_name}' adapts '{module}', which is not in --lora-target-modules "
                                   f"({' '.join(spec.target_modules)})")
            weight_key = f"{module}.weight"
            if weight_key not in combined or combined[weight_key][0] is None:
                raise ConvertError(f"{a_path}: LoRA tensor '{a_name}' has no base weight '{weight_key}' "
                                   f"(nor '{module}.base_layer.weight') in {path} '{model_key}'")
            weight, w_path, w_name = combined[weight_key]
            if len(a.shape) != 2 or len(b.shape) != 2 or len(weight.shape) != 2:
                raise ConvertError(f"{a_path}: '{a_name}' {list(a.shape)} / '{b_name}' {list(b.shape)} do not "
                                   f"adapt a 2-D weight '{w_name}' {list(weight.shape)}")
            for tensor, where, name, rank in ((a, a_path, a_name, a.shape[0]), (b, b_path, b_name, b.shape[1])):
                if rank != spec.r:
                    raise ConvertError(f"{where}: '{name}' {list(tensor.shape)} has rank {rank}, but --lora-r "
                                       f"is {spec.r}")
            if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
                raise ConvertError(
                    f"{a_path}: '{a_name}' {list(a.shape)} and '{b_name}' {list(b.shape)} do not fit the base "
                    f"weight '{w_name}' {list(weight.shape)} of {w_path} (B @ A would be "
                    f"{[b.shape[0], a.shape[1]]}): LoRA and base checkpoints are sharded differently")
            for tensor, where, name in ((a, a_path, a_name), (b, b_path, b_name), (weight, w_path, w_name)):
                if not tensor.dtype.is_floating_point:
                    raise ConvertError(f"{where}: '{name}' is {tensor.dtype}; LoRA merging needs floating point")
            combined[weight_key] = (MergedLoraTensor(weight, a, b, spec.scale, name=f"{w_path}: {w_name}"),
                                    w_path, w_name)

        for key, (tensor, where, name) in combined.items():
            module, _, param = key.rpartition(".")
            if param != "weight" or module in adapters or tensor is None:
                continue
            if name != key:
                raise ConvertError(f"{where}: '{name}' is a LoRA-wrapped weight without adapters "
                                   f"(no '{module}.lora_A.*' in {lora_path} '{model_key}')")
            if spec.targets(module) and len(tensor.shape) == 2:
                raise ConvertError(f"{lora_path}: no LoRA adapter for '{module}' in '{model_key}', which "
                                   f"--lora-target-modules targets")
        result[model_key] = {key: tensor for key, (tensor, _, _) in combined.items()}
    return result


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


def merge_adapter_shards(module: str, a_shards: Sequence, b_shards: Sequence,
                         swiglu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (TP = 1) A and B of one module from its TP shards (tensors or LazyTensors)."""
    a_kind, b_kind = adapter_tp_kinds(module, swiglu)
    a = T.TP_SPLIT[a_kind][1]([loaded(s) for s in a_shards])
    b = T.TP_SPLIT[b_kind][1]([loaded(s) for s in b_shards])
    return a, b


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


def load_layer_adapters(source, layout, family, dims, spec: LoraSpec) -> Iterator[tuple[int, dict]]:
    """`(hf layer, {layer-relative module: (A, B)})` for every layer of a Megatron LoRA checkpoint
    (`loaders.mg.MegatronSource`, full or LoRA-only), TP shards merged with the adapter rules.
    Routed experts are read from their EP rank's files (local index j) and keyed by their global
    index, as `peft_layer_tensors` wants them; with expert TP 1 their adapters are whole."""
    for slot in layout.slots():
        if slot.hf_layer is None:
            continue
        adapters = {}
        for rule in mapping.layer_rules(family, dims, slot.hf_layer):
            module = rule.mcore[:-len(".weight")] if rule.mcore.endswith(".weight") else None
            if module is None or not spec.targets(module):
                continue
            a_kind, b_kind = adapter_tp_kinds(module, dims.swiglu)
            file_module, ep_rank = module, None
            if rule.expert is not None:
                ep_rank, local = divmod(rule.expert, dims.num_experts // layout.ep)
                file_module = mapping.expert_name(local, module[len(mapping.expert_name(rule.expert, "")):])
                if layout.etp == 1 and layout.tp > 1:
                    a_kind = b_kind = "replicated"
            tensors = []
            for ab, kind in (("A", a_kind), ("B", b_kind)):
                name = f"decoder.layers.{slot.local_layer}.{file_module}.lora_{ab}.default.weight"
                try:
                    shards = source.shards(layout, slot.pp_rank, slot.vchunk, name, ep_rank=ep_rank)
                    tensors.append(source.take(layout, slot.pp_rank, slot.vchunk, name, kind, shards=shards))
                except ConvertError as exc:
                    raise ConvertError(f"layer {slot.mg_layer}: {exc}") from None
            lora_a, lora_b = tensors
            if lora_a.shape[0] != spec.r:
                raise ConvertError(f"{source.iter_dir}: layer {slot.mg_layer} '{file_module}.lora_A.default.weight' "
                                   f"has rank {lora_a.shape[0]}, but --lora-r is {spec.r}")
            adapters[module] = (lora_a, lora_b)
        yield slot.hf_layer, adapters


def hf_target_modules(tensors: Iterable[str]) -> list[str]:
    """The HF leaf module names (`q_proj`, ...) of PEFT tensor names."""
    return sorted({name.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for name in tensors})


def peft_config(spec: LoraSpec, target_modules: Sequence[str], base_model_name_or_path: str | None = None):
    """peft's own `LoraConfig` for an exported adapter."""
    from peft import LoraConfig

    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return LoraConfig(r=spec.r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                      target_modules=sorted(target_modules), task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model_name_or_path)


def write_peft_adapter(out_dir, tensors: dict[str, torch.Tensor], spec: LoraSpec,
                       base_model_name_or_path: str | None = None) -> Path:
    """A PEFT adapter folder: `adapter_config.json` (written by peft's `LoraConfig.save_pretrained`)
    and `adapter_model.safetensors`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not tensors:
        raise ConvertError(f"{out_dir}: no LoRA tensors to export")
    bad = [name for name in tensors if not name.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise ValueError(f"not PEFT LoRA tensor names: {bad[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_config(spec, hf_target_modules(tensors), base_model_name_or_path).save_pretrained(str(out_dir))
    config_path = out_dir / ADAPTER_CONFIG  # peft keeps target_modules as a set: sort it, for identical output
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))  # as peft writes it
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    return out_dir


def export_peft_adapter(out_dir, family, dims, layers: Iterable[tuple[int, dict]], spec: LoraSpec,
                        base_model_name_or_path: str | None = None) -> Path:
    """`write_peft_adapter` of every layer's `peft_layer_tensors` (`layers` as from
    `load_layer_adapters`)."""
    tensors = {}
    for layer, adapters in layers:
        tensors.update(peft_layer_tensors(family, dims, layer, adapters))
    return write_peft_adapter(out_dir, tensors, spec, base_model_name_or_path)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (for checks of a merge's precision)."""
    x = x.double().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


__all__ = ["LoraSpec", "MergedLoraTensor", "merge_lora", "merge_weight", "spec_from_args", "check_same_layout",
           "adapter_tp_kinds", "merge_adapter_shards", "peft_module_tensors", "peft_layer_tensors",
           "load_layer_adapters", "peft_config", "write_peft_adapter",
           "export_peft_adapter", "hf_target_modules", "bf16_ulp", "is_lora_key", "DEFAULT_TARGETS"]
