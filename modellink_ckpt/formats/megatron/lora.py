"""LoRA adapters in Megatron checkpoints (MindSpeed-LLM's peft-wrapped modules): reading them
from rank files, merging them into their base weights as the weights are read, and the settings a
training run stored.

A wrapped module `X` (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`, also under
`mlp.experts.local_experts.{j}.` and `mlp.shared_experts.`) is stored as

    X.base_layer.weight        the frozen base weight (absent from a LoRA-only checkpoint)
    X.lora_A.default.weight    [r, in]
    X.lora_B.default.weight    [out, r]

and a LoRA-only checkpoint (`--lora-ckpt-filter`) keeps only the keys containing `lora`. The
adapters are sharded like their base layer, so merging one shard at a time is exact
(`model.lora`: the math, in fp32).
"""

from __future__ import annotations

import re
from typing import Iterator, Sequence

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.torch_zip import LazyTensor, loaded
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.lora import DEFAULT_TARGETS, LoraSpec, adapter_tp_kinds, merge_weight

_LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


_LORA_EXTRA = re.compile(r"^.+\.lora_[AB]\.[^.]+\._extra_state$")


_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>[^.]+)$")


_GROUPED_LORA = re.compile(r"\.weight[12]_lora_[ab]$")


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


def _rows(tensor, start: int, stop: int) -> torch.Tensor:
    if isinstance(tensor, LazyTensor):
        return tensor.read_rows(start, stop, torch.empty((stop - start, *tensor.shape[1:]), dtype=tensor.dtype))
    return tensor[start:stop]


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


def load_layer_adapters(source, layout, family, dims, spec: LoraSpec) -> Iterator[tuple[int, dict]]:
    """`(hf layer, {layer-relative module: (A, B)})` for every layer of a Megatron LoRA checkpoint
    (`formats.megatron.checkpoint.MegatronSource`, full or LoRA-only), TP shards merged with the adapter rules.
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


def merge_adapter_shards(module: str, a_shards: Sequence, b_shards: Sequence,
                         swiglu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (TP = 1) A and B of one module from its TP shards (tensors or LazyTensors)."""
    a_kind, b_kind = adapter_tp_kinds(module, swiglu)
    a = T.TP_SPLIT[a_kind][1]([loaded(s) for s in a_shards])
    b = T.TP_SPLIT[b_kind][1]([loaded(s) for s in b_shards])
    return a, b
