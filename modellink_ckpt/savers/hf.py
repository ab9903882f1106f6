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

from modellink_ckpt import mapping, registry, workers
from modellink_ckpt import transforms as T
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.manifest import hash_files, write_manifest
from modellink_ckpt.model_cfg import dims_from_hf_config, hf_config_from_dims
from modellink_ckpt.formats.safetensors_io import PlacedTensors, SafetensorsWriter
from modellink_ckpt.progress import progress as show_progress
from modellink_ckpt.staging import StagedDir, check_target

HF_SUBDIR = "mg2hf"
INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_METADATA = {"format": "pt"}  # what transformers' save_pretrained writes


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
                                              metadata=_METADATA)
        self._current.add(name, value)
        if self._current.complete:
            self.files[self.names[self._index]] = self._current.close()
            self.total_bytes += self._current.tensor_bytes
            self._current, self._index = None, self._index + 1

    def finish(self) -> None:
        if self._index != len(self._shards):
            raise RuntimeError(f"only {self._index} of {len(self._shards)} planned shards were completed")

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()


class PlacedShards:
    """The planned shards of a shared target (`--workers`): each worker writes the tensors of its
    messages at their planned places; the files are hashed when every worker is done."""

    def __init__(self, folder: Path, shards):
        self.names = shard_names(len(shards))
        self._tensors = PlacedTensors({name: (folder / name, shard, _METADATA)
                                       for name, shard in zip(self.names, shards)})
        self.files: dict[str, tuple[int, str]] = {}  # hashed by the parent

    @property
    def total_bytes(self) -> int:
        return self._tensors.tensor_bytes

    def add(self, name: str, value) -> None:
        self._tensors.add(name, value)

    def finish(self) -> None:
        self._tensors.close()

    def abort(self) -> None:
        self._tensors.close()


def write_index(folder: Path, names: list[str], shards, file_name: str = INDEX) -> list[str]:
    """model.safetensors.index.json (or MindSpore's `param_name_map.json`, the same structure), for
    a model in several shards; returns what it wrote."""
    if len(shards) < 2:
        return []
    weight_map = {entry[0]: name for name, shard in zip(names, shards) for entry in shard}
    total = sum(torch.Size(shape).numel() * dtype.itemsize for shard in shards for _, shape, dtype in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / file_name).write_text(json.dumps(index, indent=2) + "\n")
    return [file_name]


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
    """Write the HF model, or with `plan.share` (`--workers`) the tensors of the share's messages
    into the folder and shards the parent staged (the parent then publishes it, `publish_shares`)."""
    started = time.monotonic()
    dims, family = plan.dims, plan.family
    messages = iter(receiver)
    meta = next(messages)
    share = getattr(plan, "share", None)
    dtypes = mapping.TensorDtypes.from_meta(meta, cast=plan.params_dtype)
    dtype = dtypes.default
    staging = None if share else StagedDir(plan.save_dir / HF_SUBDIR, overwrite=plan.overwrite)
    folder = Path(share.folder) if share else staging.path
    entries = hf_tensors(plan, dtypes)
    odd_dtypes = {name: str(dt) for name, _, dt in entries if dt != dtype}
    shards = plan_shards(entries, plan.max_shard_bytes)
    output = PlacedShards(folder, shards) if share else ShardedOutput(folder, shards)
    stacks = SlabStacks()
    layers = workers.written_layers(plan)
    progress = show_progress(total=layers, desc="saving layers", unit="layer", quiet=plan.quiet)
    try:
        for message in workers.owned(plan, messages):
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
        small, tokenizer = [], []  # config, tokenizer and index: written once (by the first worker)
        if share is None or share.index == 0:
            index = write_index(folder, output.names, shards)
            (folder / "config.json").write_text(json.dumps(_hf_config(plan, meta, dtype), indent=2) + "\n")
            tokenizer = _copy_tokenizer(plan, folder)
            small = ["config.json", *tokenizer, *index]
        manifest = dict(kind="hf", model_type_hf=family.name,
                        source={"type": plan.load_type, "dir": str(Path(plan.load_dir).resolve())},
                        dtype=str(dtype), vocab_size=dims.vocab_size, dtypes=odd_dtypes)
        if staging is not None:
            write_manifest(folder, {**output.files, **hash_files(folder, small)}, **manifest)
            target = staging.publish()
    except BaseException:
        progress.close()
        output.abort()
        if staging is not None:
            staging.discard()
        raise
    return {"bytes": output.total_bytes, "seconds": time.monotonic() - started,
            "target": str(plan.save_dir / HF_SUBDIR if share else target), "files": len(output.names),
            "tokenizer_files": tokenizer, "shards": output.names, "small_files": small, "manifest": manifest}


def publish_shares(staging: StagedDir, results: list[dict]) -> dict:
    """Every worker succeeded: hash the shards (side by side) and the small files, write the
    manifest, and put the folder in place."""
    first = next(r for r in results if r["small_files"])
    files = hash_files(staging.path, [*first["shards"], *first["small_files"]])
    write_manifest(staging.path, files, **first["manifest"])
    staging.publish()
    return workers.combined_result(results, files=len(first["shards"]))


class HfTargetFormat(registry.TargetFormat):
    name = "hf"
    description = "Hugging Face safetensors shards, index, config.json and tokenizer in <save-dir>/mg2hf"
    saver = "modellink_ckpt.savers.hf:save"

    def copies_in_kernel(self, plan) -> bool:
        return True

    def why_one_process(self, plan) -> str | None:
        return None  # --workers: each worker writes some layers into the planned shards

    def shares(self, plan, count: int) -> tuple:
        staging = StagedDir(plan.save_dir / HF_SUBDIR, overwrite=plan.overwrite)
        return staging, self.share_plans(plan, count, str(staging.path))

    def share_plans(self, plan, count: int, folder: str) -> list:
        return workers.message_share_plans(plan, count, folder)

    def publish(self, staged, results: list[dict]) -> dict:
        return publish_shares(staged, results)

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
