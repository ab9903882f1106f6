"""Saver for Hugging Face output: safetensors shards, their index, config.json and tokenizer files.

Written to `<save-dir>/mg2hf/`, where MindSpeed-LLM users look for it. The shards are planned
before the first tensor arrives (every tensor's name and shape follow from the model sizes), so
each tensor is written into its shard as soon as it arrives and nothing is held back; the folder
is published only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from modellink_ckpt import mapping, registry
from modellink_ckpt import transforms as T
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.manifest import hash_files, write_manifest
from modellink_ckpt.model_cfg import dims_from_hf_config, hf_config_from_dims
from modellink_ckpt.formats.safetensors_io import SafetensorsWriter
from modellink_ckpt.staging import StagedDir, check_target

HF_SUBDIR = "mg2hf"
INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_tensors(plan, dtypes: "mapping.TensorDtypes") -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every HF tensor the saver will write, in arrival order, with the dtype it is written in
    (from the model sizes and the loader's declared dtypes alone)."""
    family, dims = plan.family, plan.dims
    entries = []
    for kind, layer, tensors in mapping.model_messages(family, dims, dtypes.default):
        for rule in mapping.message_rules(kind, family, dims, layer):
            own = dtypes.of(kind, layer, rule.mcore)
            for name, part in zip(rule.hf, rule.to_hf(tensors[rule.mcore])):
                if rule.slab is None:
                    entries.append((name, tuple(part.shape), own))
                elif rule.slab[0] == rule.slab[1] - 1:  # a fused tensor is written once its last slab is in
                    entries.append((name, (rule.slab[1], *part.shape), own))
    return entries


class SlabStacks:
    """Fused HF tensors being filled one slab (one routed expert) at a time: a layer's worth at most."""

    def __init__(self):
        self._open: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, name: str, slab: tuple[int, int], part) -> torch.Tensor | None:
        """Put `part` in its place; the fused tensor once every slab is in, else None."""
        (index, count), part = slab, T.as_tensor(part)
        stack, filled = self._open.get(name) or (torch.empty((count, *part.shape), dtype=part.dtype), 0)
        stack[index].copy_(part)
        if filled + 1 < count:
            self._open[name] = (stack, filled + 1)
            return None
        self._open.pop(name, None)
        return stack


def plan_shards(entries, max_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = torch.Size(entry[1]).numel() * entry[2].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


class ShardedOutput:
    """The planned shards, opened one after the other as the tensors arrive."""

    def __init__(self, folder: Path, shards):
        self.folder, self._shards = folder, shards
        self.names = shard_names(len(shards))
        self._current: SafetensorsWriter | None = None
        self._index = 0
        self.files: dict[str, tuple[int, str]] = {}
        self.total_bytes = 0

    def add(self, name: str, value) -> None:
        if self._current is None:
            self._current = SafetensorsWriter(self.folder / self.names[self._index], self._shards[self._index],
                                              metadata={"format": "pt"})
        self._current.add(name, value)
        if self._current.complete:
            self.files[self.names[self._index]] = self._current.close()
            self.total_bytes += self._current.tensor_bytes
            self._current, self._index = None, self._index + 1

    def finish(self) -> None:
        if self._index != len(self._shards):
            raise RuntimeError(f"only {self._index} of {len(self._shards)} planned shards were completed")
        if len(self._shards) > 1:
            weight_map = {entry[0]: name for name, shard in zip(self.names, self._shards) for entry in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()


def _hf_config(plan, meta, dtype: torch.dtype) -> dict:
    """The original config.json where there is one, else one built from the model sizes."""
    for folder in (plan.hf_config_dir, plan.save_dir):
        if folder is not None and (Path(folder) / "config.json").is_file():
            config = json.loads((Path(folder) / "config.json").read_text())
            break
    else:
        config = meta.get("hf_config") or hf_config_from_dims(plan.family, plan.dims, _DTYPE_NAMES.get(dtype, "float32"))
    config = {k: v for k, v in config.items() if k != "quantization_config"}  # the weights are never quantized
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    return config


def _copy_tokenizer(plan, folder: Path) -> list[str]:
    from modellink_ckpt.loaders.hf import TOKENIZER_FILES

    copied = []
    candidates = [Path(d) / n for d in (plan.hf_config_dir, plan.save_dir, plan.tokenizer_dir()) if d
                  for n in TOKENIZER_FILES]
    for explicit in (plan.source_tokenizer, plan.tokenizer_model):
        if explicit:
            candidates.insert(0, Path(explicit))
    for path in candidates:
        if path.is_file() and path.name not in copied:
            shutil.copy2(path, folder / path.name)
            copied.append(path.name)
    return copied


def save(plan, receiver) -> dict:
    started = time.monotonic()
    dims, family = plan.dims, plan.family
    messages = iter(receiver)
    meta = next(messages)
    dtypes = mapping.TensorDtypes.from_meta(meta, cast=plan.params_dtype)
    dtype = dtypes.default
    staging = StagedDir(plan.save_dir / HF_SUBDIR, overwrite=plan.overwrite)
    entries = hf_tensors(plan, dtypes)
    odd_dtypes = {name: str(dt) for name, _, dt in entries if dt != dtype}
    output = ShardedOutput(staging.path, plan_shards(entries, plan.max_shard_bytes))
    stacks = SlabStacks()
    progress = tqdm(total=dims.num_layers, desc="saving layers", unit="layer", disable=plan.quiet)
    try:
        for message in messages:
            for rule in mapping.message_rules(message.kind, family, dims, message.get("layer")):
                full = dtypes.apply(message.kind, message.get("layer"), rule.mcore, message.tensors[rule.mcore])
                for name, part in zip(rule.hf, rule.to_hf(full)):
                    if rule.slab is not None and (part := stacks.add(name, rule.slab, part)) is None:
                        continue
                    output.add(name, part)
            if message.kind == "layer":
                progress.update(1)
        progress.close()
        output.finish()
        config = _hf_config(plan, meta, dtype)
        (staging.path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = _copy_tokenizer(plan, staging.path)
        extra = ["config.json", *tokenizer] + ([INDEX] if len(output.names) > 1 else [])
        write_manifest(staging.path, {**output.files, **hash_files(staging.path, extra)}, kind="hf",
                       model_type_hf=family.name, source={"type": plan.load_type, "dir": str(Path(plan.load_dir).resolve())},
                       dtype=str(dtype), vocab_size=dims.vocab_size, dtypes=odd_dtypes)
        target = staging.publish()
    except BaseException:
        progress.close()
        output.abort()
        staging.discard()
        raise
    return {"bytes": output.total_bytes, "seconds": time.monotonic() - started, "target": str(target),
            "files": len(output.names), "tokenizer_files": tokenizer}


class HfTargetFormat(registry.TargetFormat):
    name = "hf"
    description = "Hugging Face safetensors shards, index, config.json and tokenizer in <save-dir>/mg2hf"
    saver = "modellink_ckpt.savers.hf:save"
    kernel_copy = True

    def check(self, plan) -> None:
        check_target(plan.save_dir / HF_SUBDIR, plan.overwrite)
        _check_config_matches(plan.dims, plan.family, plan.hf_config_dir or plan.save_dir)

    def files(self, plan) -> dict[str, int]:
        dtype = plan.params_dtype or plan.source_dtype
        shards = plan_shards(hf_tensors(plan, mapping.TensorDtypes(dtype)), plan.max_shard_bytes)
        return {name: sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in shard)
                for name, shard in zip(shard_names(len(shards)), shards)}

    def where(self, plan) -> str:
        return str(plan.save_dir / HF_SUBDIR)


def _check_config_matches(dims, family, folder: Path | None) -> None:
    """An original config.json used for HF output must describe the model being written."""
    if folder is None or not (folder / "config.json").is_file():
        return
    try:
        config = json.loads((folder / "config.json").read_text())
        other = dims_from_hf_config(family, config, source=str(folder / "config.json"))
    except (ValueError, ConvertError):
        return  # not an HF config for this family; the saver builds one
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
        if getattr(other, field) != getattr(dims, field):
            raise UsageError(f"{folder / 'config.json'}: describes a different model ({field} "
                             f"{getattr(other, field)}, the checkpoint has {getattr(dims, field)})")


TARGET = HfTargetFormat()
