"""MindFormers' own training checkpoint folder, "Checkpoint 2.0" (`use_legacy: False`,
`mindformers.checkpoint.save_checkpoint`): a tracker `latest_checkpointed_iteration.txt` beside
`iteration_<8 digits>/` folders. Each iteration folder holds the model's MindSpore safetensors
(`[<prefix>-]model-<rank:07d>-<ranks:07d>.safetensors`), the optimizer's (`opt-...`), `common.json`
(step counters) and, written by rank 0 when there are several ranks, `metadata.json`: which chunk
(global offset, local shape) of which tensor each file holds."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError, UsageError

TRACKER = "latest_checkpointed_iteration.txt"
ITERATION_PREFIX = "iteration_"
METADATA = "metadata.json"
COMMON = "common.json"
MODEL_FILE = re.compile(r"^(?:(?P<prefix>.+)-)?model-(?P<rank>\d{7})-(?P<ranks>\d{7})\.safetensors$")
OPTIMIZER_FILE = re.compile(r"^(?:.+-)?opt-\d{7}-\d{7}\.safetensors$")
# what a conversion reads only the model weights of, by name (reported in the summary)
LEFT_OUT = "optimizer state and step counters"


def iteration_folder_name(iteration: int) -> str:
    return f"{ITERATION_PREFIX}{iteration:08d}"


def model_file_name(rank: int, ranks: int, prefix: str | None = None) -> str:
    return f"{prefix + '-' if prefix else ''}model-{rank:07d}-{ranks:07d}.safetensors"


def _holds_model_files(folder: Path) -> bool:
    return folder.is_dir() and any(MODEL_FILE.match(p.name) for p in folder.iterdir())


def is_checkpoint2(path: Path) -> bool:
    """A Checkpoint 2.0 root (tracker + iteration folders) or one of its iteration folders."""
    path = Path(path)
    if not path.is_dir():
        return False
    if path.name.startswith(ITERATION_PREFIX):
        return _holds_model_files(path)
    return (path / TRACKER).is_file() and any(path.glob(f"{ITERATION_PREFIX}*")) \
        or any(_holds_model_files(p) for p in path.glob(f"{ITERATION_PREFIX}*"))


def iterations(root: Path) -> list[int]:
    return sorted(int(p.name[len(ITERATION_PREFIX):]) for p in root.glob(f"{ITERATION_PREFIX}*")
                  if p.name[len(ITERATION_PREFIX):].isdigit())


def iteration_folder(path: Path, iteration: int | None = None) -> Path:
    """The iteration folder to read: `path` itself, `--iteration N`'s, else the tracker's."""
    path = Path(path)
    if path.name.startswith(ITERATION_PREFIX):
        if iteration is not None and path.name != iteration_folder_name(iteration):
            raise UsageError(f"--iteration {iteration}: --load-dir {path} is the folder of another iteration")
        return path
    if iteration is None:
        tracker = path / TRACKER
        if not tracker.is_file():
            raise UsageError(f"--load-dir {path}: no {TRACKER}; pass --iteration (found: {iterations(path)})")
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise ConvertError(f"{tracker}: not an iteration number ({text[:40]!r})")
        folder = path / iteration_folder_name(int(text))
        if not folder.is_dir():
            raise ConvertError(f"{tracker}: points to {folder.name}, which does not exist (found: {iterations(path)})")
        return folder
    folder = path / iteration_folder_name(iteration)
    if not folder.is_dir():
        raise UsageError(f"--iteration {iteration}: {path} has no {folder.name} (found: {iterations(path)})")
    return folder


def model_files(folder: Path) -> list[Path]:
    """The model's files of one iteration folder, one per rank, all ranks present."""
    found = sorted(p for p in folder.iterdir() if MODEL_FILE.match(p.name))
    if not found:
        raise ConvertError(f"{folder}: no model-<rank>-<ranks>.safetensors (the model weights of a Checkpoint 2.0 "
                           f"iteration)")
    ranks = {int(MODEL_FILE.match(p.name)["ranks"]) for p in found}
    if len(ranks) != 1:
        raise ConvertError(f"{folder}: model files of {sorted(ranks)} ranks side by side")
    world = ranks.pop()
    present = {int(MODEL_FILE.match(p.name)["rank"]) for p in found}
    missing = sorted(set(range(world)) - present)
    if missing:
        raise ConvertError(f"{folder}: the model file of rank {missing[0]} is missing ({world} ranks)")
    return found


def left_out_files(folder: Path) -> list[str]:
    """The files of an iteration folder a conversion does not read: optimizer state, counters."""
    return sorted(p.name for p in folder.iterdir() if OPTIMIZER_FILE.match(p.name) or p.name == COMMON)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it starts in the whole tensor, its shape, its file."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    file: Path


def slice_offset(slice_id: int, fragments: tuple[int, ...], local_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Where slice `slice_id` of a tensor cut into `fragments` pieces per axis starts. MindFormers
    records a chunk's `global_offset` as this one number: the slices counted row-major over the
    axes (the last axis fastest), as its layouts flatten their tensor maps."""
    coords = []
    for count in reversed(fragments):
        slice_id, coord = divmod(slice_id, count)
        coords.append(coord)
    if slice_id:
        raise ValueError("slice id beyond the fragments")
    return tuple(c * n for c, n in zip(reversed(coords), local_shape))


def chunks(folder: Path, names: set[str]) -> dict[str, tuple[tuple[int, ...], list[Chunk]]]:
    """{tensor: (whole shape, its chunks)} of the model tensors `names` from `metadata.json`."""
    path = folder / METADATA
    try:
        metadata = json.loads(path.read_text())
        tensors, storage = metadata["state_dict_metadata"], metadata["storage_data"]
    except FileNotFoundError:
        raise ConvertError(f"{folder}: model files of several ranks but no {METADATA} (rank 0 writes it)") from None
    except (ValueError, KeyError, TypeError):
        raise ConvertError(f"{path}: not MindFormers checkpoint metadata (state_dict_metadata, storage_data)") from None
    found = {}
    for name in sorted(names):
        meta = tensors.get(name)
        if meta is None:
            raise ConvertError(f"{path}: says nothing of '{name}', which a model file holds")
        shape = tuple(meta["global_shape"])
        fragments = tuple(meta.get("axis_fragmentations") or (1,) * len(shape))
        pieces = []
        for chunk in meta["chunk"]:
            recorded, local = tuple(chunk["global_offset"]), tuple(chunk["local_shape"])
            if len(recorded) != 1 or len(fragments) != len(shape) or \
                    tuple(n * f for n, f in zip(local, fragments)) != shape:
                raise ConvertError(f"{path}: '{name}' chunk at {list(recorded)} of {list(local)} is no slice of "
                                   f"{list(shape)} in {list(fragments)} pieces")
            places = storage.get(str((name, recorded)))  # MindFormers' shard id: str((name, offset))
            model = [p["file_name"] for p in places or () if MODEL_FILE.match(p["file_name"])]
            if not model:
                raise ConvertError(f"{path}: no model file holds '{name}' at offset {list(recorded)}")
            try:
                offset = slice_offset(recorded[0], fragments, local)
            except ValueError:
                raise ConvertError(f"{path}: '{name}' has no slice {recorded[0]} in {list(fragments)} pieces") from None
            pieces.append(Chunk(offset, local, folder / model[0]))
        if len({p.offset for p in pieces}) != len(pieces) or len(pieces) != torch.Size(fragments).numel():
            raise ConvertError(f"{path}: the chunks of '{name}' do not make its {list(shape)}")
        found[name] = (shape, pieces)
    return found
