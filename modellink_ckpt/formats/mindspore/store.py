"""A MindSpore / MindFormers checkpoint opened for reading: `.ckpt` or MindSpore safetensors,
complete (one file, or shards with `param_name_map.json`) or distributed (`rank_<r>/*` files laid
out by a strategy). Every tensor is read whole by name, a distributed one assembled from the
distinct slices of the ranks that hold it (each read once)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.mindspore import checkpoint2
from modellink_ckpt.formats.mindspore.files import STRATEGY_DIR
from modellink_ckpt.formats.mindspore.lora import MsLora, find_adapters, is_adapter, merged
from modellink_ckpt.formats.ms_ckpt import MsCkptFile
from modellink_ckpt.formats.ms_strategy import Strategy, load_strategy
from modellink_ckpt.formats.safetensors_io import SafetensorsFile

SUFFIXES = (".safetensors", ".ckpt")


NAME_MAP = "param_name_map.json"


def source_strategy(path: Path, given: Path | None) -> Strategy | None:
    """The strategy a distributed source is read by: `--src-strategy`, else the `strategy/` copy
    that this converter's distributed output keeps beside its rank folders."""
    if given is not None:
        return load_strategy(given)
    own = Path(path) / STRATEGY_DIR
    return load_strategy(own) if own.is_dir() and len(rank_folders(Path(path))) > 1 else None


def open_file(path: Path):
    return MsCkptFile(path) if path.suffix == ".ckpt" else SafetensorsFile(path)


def rank_folders(folder: Path) -> dict[int, Path]:
    found = {}
    for sub in folder.glob("rank_*"):
        if sub.is_dir() and sub.name[5:].isdigit():
            found[int(sub.name[5:])] = sub
    return found


def checkpoint_files(folder: Path, error=ConvertError) -> list[Path]:
    """The .ckpt or the .safetensors files of a folder, sorted; both side by side are ambiguous."""
    kinds = {suffix: sorted(folder.glob(f"*{suffix}")) for suffix in SUFFIXES}
    if kinds[".ckpt"] and kinds[".safetensors"]:
        raise ConvertError(f"{folder}: holds both .ckpt and .safetensors files; keep one format per folder")
    files = kinds[".ckpt"] or kinds[".safetensors"]
    if not files:
        raise error(f"{folder}: no MindSpore .ckpt or .safetensors file")
    return files


def rank_file(folder: Path, file_suffix: str | None = None) -> Path:
    """The checkpoint of one rank folder: its one file, or where a training run left one per saved
    step (`<prefix>-<epoch>_<step>.ckpt`) the one whose name ends in `file_suffix` (`2_2`). Several
    without a suffix are refused by name: the last in sorted order is not the latest (`-10_10`
    sorts before `-2_2`) and nothing says which step the user means."""
    files = checkpoint_files(folder)
    if file_suffix:
        chosen = [f for f in files if f.stem.endswith(file_suffix)]
        if len(chosen) != 1:
            raise UsageError(f"--file-suffix {file_suffix}: {len(chosen) or 'no'} file(s) of {folder} end in it "
                             f"({', '.join(f.name for f in files)})")
        return chosen[0]
    if len(files) > 1:
        example = files[-1].stem.rsplit("-", 1)[-1]
        raise UsageError(f"{folder}: {len(files)} checkpoint files ({', '.join(f.name for f in files)}); "
                         f"choose one step with --file-suffix (e.g. --file-suffix {example})")
    return files[0]


class MsStore:
    """Every tensor of a MindSpore checkpoint by name, whole: `shape_dtype(name)`, `read(name)`."""

    def __init__(self, path: str | Path, strategy: Strategy | None = None, file_suffix: str | None = None,
                 iteration: int | None = None):
        self.path = Path(path)
        self.strategy = strategy
        self.file_suffix = file_suffix  # which step's file of each rank folder (rank_file)
        self.files: list[Path] = []
        self.left_out: list[str] = []             # files not read (a Checkpoint 2.0 folder's optimizer state)
        self.iteration: int | None = None         # a Checkpoint 2.0 folder's iteration
        self._where: dict[str, object] = {}       # complete: name -> open file
        self._ranks: dict[int, object] = {}       # distributed: rank -> open file
        self._chunks: dict[str, list] = {}        # several ranks: name -> [(ranges, the open file to read it from)]
        self._shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if self.path.is_file():
            self._complete([self.path])
        elif not self.path.is_dir():
            raise UsageError(f"--load-dir {self.path}: no such file or folder")
        elif checkpoint2.is_checkpoint2(self.path):
            if strategy is not None:
                raise UsageError(f"--src-strategy: {self.path} is a Checkpoint 2.0 folder, whose metadata.json says "
                                 f"where each slice is")
            self._checkpoint2(iteration)
        elif iteration is not None:
            raise UsageError(f"--iteration {iteration}: {self.path} is no Checkpoint 2.0 folder (iteration_* folders)")
        elif rank_folders(self.path) and len(rank_folders(self.path)) > 1 or strategy is not None:
            self._distributed()
        else:
            self._complete(self._complete_files())

    # ---- complete checkpoints ----------------------------------------------------------------

    def _complete_files(self) -> list[Path]:
        folder = self.path
        ranks = rank_folders(folder)
        if ranks:  # a complete checkpoint as MindSpore's tools take one: rank_0/x.ckpt
            return [rank_file(ranks[0], self.file_suffix)]
        for index in (NAME_MAP, "model.safetensors.index.json"):
            if (folder / index).is_file():
                try:
                    weight_map = json.loads((folder / index).read_text())["weight_map"]
                except (ValueError, KeyError, TypeError):
                    raise ConvertError(f"{folder / index}: not a valid index (needs a 'weight_map' object)") from None
                files = sorted({folder / name for name in weight_map.values()})
                missing = [f for f in files if not f.is_file()]
                if missing:
                    raise ConvertError(f"{folder / index}: lists {missing[0].name}, which is missing")
                return files
        files = checkpoint_files(folder, UsageError)
        if len(files) > 1 and files[0].suffix == ".ckpt":
            raise UsageError(f"--load-dir {folder}: {len(files)} .ckpt files; point --load-dir at one of them")
        return files

    def _complete(self, files: list[Path]) -> None:
        self.files = files
        for path in files:
            opened = open_file(path)
            for name in opened.keys():
                if name in self._where:
                    raise ConvertError(f"{path}: '{name}' is also in {self._where[name].path}")
                self._where[name] = opened
                self._shapes[name] = opened.shape_dtype(name)

    # ---- MindFormers' Checkpoint 2.0 ----------------------------------------------------------

    def _checkpoint2(self, iteration: int | None) -> None:
        folder = checkpoint2.iteration_folder(self.path, iteration)
        self.iteration = int(folder.name[len(checkpoint2.ITERATION_PREFIX):])
        self.left_out = checkpoint2.left_out_files(folder)
        files = checkpoint2.model_files(folder)
        if len(files) == 1:  # one rank: every tensor whole
            self._complete(files)
            return
        self.files = files
        opened = {path: SafetensorsFile(path) for path in files}
        names = {name for file in opened.values() for name in file.keys()}
        for name, (shape, pieces) in checkpoint2.chunks(folder, names).items():  # (which checks they tile it)
            self._chunks[name] = []
            for piece in pieces:
                file = opened.get(piece.file)
                if file is None or name not in file:
                    raise ConvertError(f"{folder / checkpoint2.METADATA}: puts '{name}' at {list(piece.offset)} in "
                                       f"{piece.file.name}, which does not hold it")
                stored, dtype = file.shape_dtype(name)
                if tuple(stored) != piece.shape:
                    raise ConvertError(f"{piece.file}: '{name}' is {list(stored)}; {checkpoint2.METADATA} says "
                                       f"{list(piece.shape)}")
                self._chunks[name].append((tuple((o, o + n) for o, n in zip(piece.offset, piece.shape)), file))
            self._shapes[name] = (shape, dtype)

    # ---- distributed checkpoints -------------------------------------------------------------

    def _distributed(self) -> None:
        if self.strategy is None:
            raise UsageError(f"--load-dir {self.path}: a distributed checkpoint (rank_* folders) needs --src-strategy")
        ranks = rank_folders(self.path)
        world = self.strategy.world_size
        for rank in range(world):
            if rank not in ranks:
                raise ConvertError(f"{self.path}: rank_{rank} is missing (the strategy {self.strategy.source} "
                                   f"has {world} ranks)")
        extra = sorted(r for r in ranks if r >= world)
        if extra:
            raise ConvertError(f"{self.path / f'rank_{extra[0]}'}: not part of the strategy ({world} ranks)")
        self.files = [rank_file(ranks[r], self.file_suffix) for r in range(world)]
        self._ranks = {rank: open_file(path) for rank, path in enumerate(self.files)}
        names: dict[str, tuple] = {}
        for rank, opened in self._ranks.items():
            for name in opened.keys():
                if not self.strategy.holds(name, rank):
                    raise ConvertError(f"{opened.path}: holds '{name}', which the strategy puts on another stage")
                names.setdefault(name, opened.shape_dtype(name))
        for name, (stored, dtype) in names.items():
            layout = self.strategy.layouts.get(name)
            if layout is None:  # not in the strategy (e.g. step counters): held whole
                holder = next(opened for opened in self._ranks.values() if name in opened)
                self._shapes[name] = (tuple(stored), dtype)
                self._chunks[name] = [(tuple((0, n) for n in stored), holder)]
                continue
            splits = list(layout.splits())
            if layout.opt_shard_size and splits:
                splits[0] *= layout.opt_shards()
            if len(splits) != len(stored):
                raise ConvertError(f"{self.strategy.source}: '{name}' has a {len(splits)}-dimensional layout, the "
                                   f"checkpoint a {len(stored)}-dimensional slice")
            full = tuple(n * s for n, s in zip(stored, splits))
            self._shapes[name] = (full, dtype)
            self._chunks[name] = []
            # every distinct slice from one rank that holds it: a redundancy-free checkpoint
            # (`remove_redundancy=True`) stores a replicated slice on one of its ranks only
            for ranges, holders in self.strategy.holders(name, full).items():
                present = [rank for rank in holders if name in self._ranks[rank]]
                if not present:
                    ranks = ", ".join(map(str, holders))
                    raise ConvertError(f"{self.path}: no rank file holds '{name}' {[list(r) for r in ranges]} (the "
                                       f"strategy {self.strategy.source} puts it on rank {ranks})")
                want = tuple(b - a for a, b in ranges)
                for rank in present:
                    got, got_dtype = self._ranks[rank].shape_dtype(name)
                    if tuple(got) != want or got_dtype != dtype:
                        raise ConvertError(f"{self._ranks[rank].path}: '{name}' is {list(got)} {got_dtype}; the "
                                           f"strategy {self.strategy.source} gives this rank {list(want)} {dtype}")
                self._chunks[name].append((ranges, self._ranks[present[0]]))

    # ---- reading -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._shapes:
            raise ConvertError(f"{self.path}: tensor '{name}' not found in the checkpoint")
        return self._shapes[name]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        shape, dtype = self.shape_dtype(name)
        out = torch.empty(shape, dtype=dtype) if out is None else out
        if name not in self._chunks:  # complete: one file holds it whole
            self._where[name].read_rows(name, 0, shape[0] if shape else 1, out.view(shape) if shape else out)
            return out
        for ranges, opened in self._chunks[name]:
            piece_shape = tuple(b - a for a, b in ranges)
            view = out[tuple(slice(a, b) for a, b in ranges)]
            if view.is_contiguous():
                target = view
            else:
                target = torch.empty(piece_shape, dtype=dtype)
            opened.read_rows(name, 0, piece_shape[0] if piece_shape else 1,
                             target.view(piece_shape) if piece_shape else target)
            if target is not view:
                view.copy_(target)
        return out

    def verify(self) -> None:
        """Integrity checks that read whole files (a ckpt's CRC trailer)."""
        for opened in list(self._where.values()) + list(self._ranks.values()):
            if isinstance(opened, MsCkptFile):
                opened.verify_crc()


class LoraMergedStore:
    """A store whose weights come with their MindFormers LoRA adapters merged in (`ms_lora`); the
    adapters sit in the same checkpoint or in another (`--lora-load`)."""

    def __init__(self, base: MsStore, adapters: MsStore, lora: MsLora):
        self.base, self._adapter_store, self.lora = base, adapters, lora
        self.path, self.strategy, self.files = base.path, base.strategy, base.files
        self.left_out, self.iteration = base.left_out, base.iteration
        self.adapters = find_adapters(adapters.names(), set(base.names()), str(adapters.path))
        if not self.adapters:
            raise UsageError(f"{adapters.path}: no LoRA adapters to merge (lora_A/lora_B, mindpet_delta_lora_a/b, "
                             f"tk_delta_lora_a/b)")

    def names(self) -> list[str]:
        return [name for name in self.base.names() if not is_adapter(name)]

    def __contains__(self, name: str) -> bool:
        return name in self.base and not is_adapter(name)

    def shape_dtype(self, name: str):
        return self.base.shape_dtype(name)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.base.read(name)
        if name in self.adapters:
            a_name, b_name = self.adapters[name]
            weight = merged(weight, self._adapter_store.read(a_name), self._adapter_store.read(b_name), self.lora, name)
        return weight if out is None else out.copy_(weight)

    def verify(self) -> None:
        self.base.verify()
        if self._adapter_store is not self.base:
            self._adapter_store.verify()
