"""Loader for Hugging Face checkpoints: `*.safetensors` (sharded or single) or `pytorch_model*.bin`.

Tensors are read lazily, one layer at a time, straight into shared memory; the HF model is
never built and the checkpoint is never held whole.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from modellink_ckpt import mapping
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.model_cfg import ModelDims, ModelFamily, dims_from_hf_config
from modellink_ckpt.safe_pickle import load_torch
from modellink_ckpt.safetensors_io import SafetensorsFile, shared_empty

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "vocab.txt",
                   "chat_template.jinja")


class HfSource:
    """An HF model directory: its config and where each tensor lives."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise UsageError(f"--load-dir {self.dir}: not a directory")
        config_path = self.dir / "config.json"
        try:
            self.config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise UsageError(f"--load-dir {self.dir}: no config.json (is this a Hugging Face model directory?)") from None
        except ValueError as exc:
            raise ConvertError(f"{config_path}: not valid JSON ({exc})") from None
        self._open: dict[str, object] = {}
        self.weight_map = self._find_weights()

    def _find_weights(self) -> dict[str, str]:
        """{tensor name: file name}, from an index json or by listing the weight files."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.dir / index_name
            if index_path.exists():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                    if not isinstance(weight_map, dict):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise ConvertError(f"{index_path}: not a valid index (needs a 'weight_map' object)") from None
                missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
                if missing:
                    raise ConvertError(f"{index_path}: lists shard {missing[0]}, which is missing")
                return weight_map
        files = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("pytorch_model*.bin"))
        if not files:
            raise UsageError(f"--load-dir {self.dir}: no *.safetensors or pytorch_model*.bin weights found")
        weight_map = {}
        for path in files:
            for name in self._file(path.name).keys():
                weight_map[name] = path.name
        return weight_map

    def _file(self, file_name: str):
        if file_name not in self._open:
            path = self.dir / file_name
            if file_name.endswith(".safetensors"):
                self._open[file_name] = SafetensorsFile(path)
            else:
                state = load_torch(path, mmap=True)
                if not isinstance(state, dict):
                    raise ConvertError(f"{path}: expected a dict of tensors")
                self._open[file_name] = state
        return self._open[file_name]

    def read(self, name: str) -> torch.Tensor:
        try:
            file_name = self.weight_map[name]
        except KeyError:
            raise ConvertError(f"{self.dir}: tensor '{name}' not found in the checkpoint") from None
        source = self._file(file_name)
        if isinstance(source, SafetensorsFile):
            if name not in source.entries:
                raise ConvertError(f"{self.dir / file_name}: tensor '{name}' (listed in the index) is missing")
            return source.read(name)
        tensor = source.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise ConvertError(f"{self.dir / file_name}: tensor '{name}' (listed in the index) is missing")
        shared = shared_empty(tensor.nbytes).view(tensor.dtype).reshape(tensor.shape)
        return shared.copy_(tensor)

    def hf_layer_count(self) -> int:
        indices = {int(m.group(1)) for m in (re.search(r"\.layers\.(\d+)\.", k) for k in self.weight_map) if m}
        return max(indices) + 1 if indices else 0

    def dims(self, family: ModelFamily, overrides: dict | None = None) -> ModelDims:
        dims = dims_from_hf_config(family, self.config, source=str(self.dir / "config.json"), overrides=overrides)
        found = self.hf_layer_count()
        if found != dims.num_layers:
            raise ConvertError(f"{self.dir}: config.json says {dims.num_layers} layers but the weights hold {found}")
        return dims

    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (of the first matrix found)."""
        first = next(iter(self.weight_map))
        source = self._file(self.weight_map[first])
        if isinstance(source, SafetensorsFile):
            return source.entries[first][0]
        return source[first].dtype

    def tokenizer_files(self) -> list[Path]:
        return [self.dir / name for name in TOKENIZER_FILES if (self.dir / name).is_file()]


def _gather(source: HfSource, rules: list[mapping.TensorRule], dims: ModelDims) -> dict[str, torch.Tensor]:
    tensors = {}
    for rule in rules:
        parts = [source.read(name) for name in rule.hf]
        try:
            tensor = rule.to_mcore(parts)
        except RuntimeError as exc:
            shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in zip(rule.hf, parts))
            raise ConvertError(f"{source.dir}: cannot build {rule.mcore} from {shapes} ({exc})") from None
        mapping.check_shape(rule.mcore, tensor, dims, where=f"{source.dir}: {', '.join(rule.hf)}")
        tensors[rule.mcore] = tensor
    return tensors


def load(plan, sender) -> dict:
    """Stream the HF checkpoint in `plan.load_dir` as whole Megatron tensors."""
    source = HfSource(plan.load_dir)
    family, dims = plan.family, plan.dims
    sender.send("meta", dims=dims.to_dict(), source="hf", hf_config=source.config, dtype=source.dtype())
    sender.send("embeddings", _gather(source, mapping.embedding_rules(family), dims))
    for layer in range(dims.num_layers):
        sender.send("layer", _gather(source, mapping.layer_rules(family, dims, layer), dims), layer=layer)
    sender.send("final_norm", _gather(source, mapping.final_norm_rules(family), dims))
    output = mapping.output_rules(family, dims)
    if output:
        sender.send("output_layer", _gather(source, output, dims))
    sender.send("done")
    return {}
