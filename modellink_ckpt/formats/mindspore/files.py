"""MindSpore / MindFormers checkpoint files written: complete (`model.ckpt`, `model.safetensors`
or shards with `param_name_map.json`) or one file per rank of a strategy
(`rank_<r>/<prefix><r>.{ckpt,safetensors}`), each tensor sliced for every rank that holds a part."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from modellink_ckpt.formats.ms_ckpt import MsCkptWriter
from modellink_ckpt.formats.ms_strategy import Strategy
from modellink_ckpt.formats.safetensors_io import PlacedTensors, SafetensorsWriter, plan_shards, write_index

NAME_MAP = "param_name_map.json"


STRATEGY_DIR = "strategy"


DEFAULT_PREFIX = "checkpoint_"


_METADATA = {"format": "ms"}


def rank_tensors(entries, strategy: Strategy, rank: int):
    """The (name, slice shape, dtype) that rank `rank` holds, in order."""
    return [(name, tuple(b - a for a, b in strategy.slice_of(name, shape, rank)), dtype)
            for name, shape, dtype in entries if strategy.holds(name, rank)]


class MsFiles:
    """The open output files of a MindSpore checkpoint (complete, or a rank file per rank of
    `strategy`, or of the ranks `ranks` only) and where each tensor, or its slices, goes.
    `entries`: every tensor in arrival order [(name, shape, dtype)]. With `placed`, complete
    safetensors shards are written at their planned places by several workers side by side
    (`--workers`), and hashed once all are done."""

    def __init__(self, folder: Path, fmt: str, entries, *, strategy: Strategy | None = None,
                 prefix: str | None = None, max_shard_bytes: int = 5 * 10**9, file_name: str | None = None,
                 ranks=None, placed: bool = False):
        self.folder, self.format, self.strategy = folder, fmt, strategy
        self.files: dict[str, tuple[int, str]] = {}
        self.unhashed: list[str] = []  # placed shards: the parent hashes them
        self.tensor_bytes = 0
        self._placed = None
        self._writers: list[tuple[str, object, object]] = []  # (relative path, writer, rank or None)
        suffix = ".ckpt" if self.format == "ckpt" else ".safetensors"
        if self.strategy is not None:
            prefix = prefix or DEFAULT_PREFIX
            for rank in (range(self.strategy.world_size) if ranks is None else ranks):
                (folder / f"rank_{rank}").mkdir(parents=True, exist_ok=True)
                name = f"rank_{rank}/{prefix}{rank}{suffix}"
                writer = self._open(folder / name, rank_tensors(entries, self.strategy, rank))
                self._writers.append((name, writer, rank))
            self.shards = None
        elif self.format == "ckpt":  # MindSpore loads a complete checkpoint from one .ckpt
            name = file_name or "model.ckpt"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            self._writers.append((name, self._open(folder / name, entries), None))
        else:
            self.shards = plan_shards(entries, max_shard_bytes)
            names = [file_name or "model.safetensors"] if len(self.shards) == 1 else \
                [f"model-{k:05d}-of-{len(self.shards):05d}.safetensors" for k in range(1, len(self.shards) + 1)]
            (folder / names[0]).parent.mkdir(parents=True, exist_ok=True)  # a Checkpoint 2.0 iteration folder
            self._shard_of = {entry[0]: i for i, shard in enumerate(self.shards) for entry in shard}
            self._names = names
            self._open_shard = {}
            if placed:
                self._placed = PlacedTensors({name: (folder / name, shard, _METADATA)
                                              for name, shard in zip(names, self.shards)})
                self.unhashed = names

    def _open(self, path: Path, entries):
        if self.format == "ckpt":
            return MsCkptWriter(path)
        return SafetensorsWriter(path, entries, metadata=_METADATA)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.strategy is not None:
            shape = tuple(tensor.shape)
            for path, writer, rank in self._writers:
                if self.strategy.holds(name, rank):
                    ranges = self.strategy.slice_of(name, shape, rank)
                    writer.add(name, tensor[tuple(slice(a, b) for a, b in ranges)])
            return
        if self.format == "ckpt":
            self._writers[0][1].add(name, tensor)
            return
        if self._placed is not None:
            self._placed.add(name, tensor)
            return
        index = self._shard_of[name]
        if index not in self._open_shard:
            self._open_shard[index] = self._open(self.folder / self._names[index], self.shards[index])
        writer = self._open_shard[index]
        writer.add(name, tensor)
        if writer.complete:
            self.files[self._names[index]] = writer.close()
            self.tensor_bytes += writer.tensor_bytes
            del self._open_shard[index]

    def close(self) -> None:
        for path, writer, _ in self._writers:
            self.files[path] = writer.close()
            self.tensor_bytes += writer.tensor_bytes
        if self._placed is not None:
            self._placed.close()
            self.tensor_bytes = self._placed.tensor_bytes
        elif self.strategy is None and self.format == "safetensors" and self._open_shard:
            raise RuntimeError("a planned safetensors shard was not completed")

    def write_index(self) -> list[str]:
        """MindSpore's unified-checkpoint index, for complete safetensors in several shards."""
        if self.strategy is None and self.format == "safetensors":
            return write_index(self.folder, self._names, self.shards, NAME_MAP)
        return []

    def abort(self) -> None:
        for _, writer, _ in self._writers:
            writer.abort()
        for writer in getattr(self, "_open_shard", {}).values():
            writer.abort()
        if self._placed is not None:
            self._placed.close()


def copy_strategy(source: Path, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in ([source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())):
        shutil.copy2(path, folder / path.name)
        copied.append(f"{STRATEGY_DIR}/{path.name}")
    return copied
