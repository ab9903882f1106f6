"""Saver for Hugging Face output: safetensors shards, their index, config.json and tokenizer files.

Written to `<save-dir>/mg2hf/`, where MindSpeed-LLM users look for it. Tensors are gathered
into shards of at most `--max-shard-size` (a shard is the most memory this saver holds), named
`model-0000k-of-0000n.safetensors` once the count is known, and the folder is published only
when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from modellink_ckpt import mapping
from modellink_ckpt.model_cfg import hf_config_from_dims
from modellink_ckpt.safetensors_io import write_safetensors
from modellink_ckpt.staging import StagedDir

HF_SUBDIR = "mg2hf"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ShardWriter:
    """Collects tensors into shards of at most `max_bytes` and writes each when full."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._pending and self._pending_bytes + tensor.nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += tensor.nbytes

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards) + 1:05d}.safetensors"
        self.total_bytes += write_safetensors(path, self._pending, metadata={"format": "pt"})[0]
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map, names = {}, []
        for index, (path, tensor_names) in enumerate(self._shards, start=1):
            name = "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update({tensor: name for tensor in tensor_names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _hf_config(plan, meta, dtype: torch.dtype) -> dict:
    """The original config.json where there is one, else one built from the model sizes."""
    for folder in (plan.hf_config_dir, plan.save_dir):
        if folder is not None and (Path(folder) / "config.json").is_file():
            config = json.loads((Path(folder) / "config.json").read_text())
            break
    else:
        config = meta.get("hf_config") or hf_config_from_dims(plan.family, plan.dims, _DTYPE_NAMES.get(dtype, "float32"))
    config = dict(config)
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
    staging = StagedDir(plan.save_dir / HF_SUBDIR, overwrite=plan.overwrite)
    shards = ShardWriter(staging.path, plan.max_shard_bytes)
    written_dtype: list[torch.dtype] = []

    def add(rules, tensors: dict[str, torch.Tensor]) -> None:
        for rule in rules:  # rules and tensors both follow mapping.message_rules
            full = tensors[rule.mcore]
            if plan.params_dtype is not None and full.is_floating_point():
                full = full.to(plan.params_dtype)
            if not written_dtype and full.is_floating_point():
                written_dtype.append(full.dtype)
            for name, part in zip(rule.hf, rule.to_hf(full)):
                shards.add(name, part.contiguous())

    progress = tqdm(total=dims.num_layers, desc="saving layers", unit="layer", disable=plan.quiet)
    try:
        for message in messages:
            add(mapping.message_rules(message.kind, family, dims, message.get("layer")), message.tensors)
            if message.kind == "layer":
                progress.update(1)
        progress.close()
        files = shards.finish()
        config = _hf_config(plan, meta, written_dtype[0] if written_dtype else torch.float32)
        (staging.path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = _copy_tokenizer(plan, staging.path)
        target = staging.publish()
    except BaseException:
        progress.close()
        staging.discard()
        raise
    return {"bytes": shards.total_bytes, "seconds": time.monotonic() - started, "target": str(target),
            "files": len(files), "tokenizer_files": tokenizer}
