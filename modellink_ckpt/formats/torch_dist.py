"""Megatron's `torch_dist` checkpoints, read without megatron-core and without running pickled code.

An iteration folder holds a `torch.distributed.checkpoint` store: `.metadata` (a pickled
`Metadata`: per key the global shape, dtype and chunks; per chunk the data file, offset and
length), data files `__<rank>_<i>.distcp` (each chunk a `torch.save` blob, each object a
`torch.save([obj])` blob), plus `common.pt` (everything that is not a tensor: `args`, iteration)
and `metadata.json` (`{"sharded_backend": "torch_dist", ...}`, written last). Stored tensors are
layout-independent global tensors: a Megatron layer's tensor is the TP = 1 tensor, stacked on a
leading global-layer axis (and, for routed experts, a global-expert axis); only the chunking
depends on the layout that wrote them.

`.metadata` and `common.pt` go through the restricted unpickler (DCP's metadata classes, and
megatron's in checkpoints of megatron-core <= 0.15, become inert placeholders whose fields are
read); every chunk is read lazily, straight into the caller's memory.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.formats.safe_pickle import Placeholder, RestrictedUnpickler, placeholder_class
from modellink_ckpt.formats.torch_zip import LazyTensor, TorchZipFile, load_lazy

METADATA_JSON = "metadata.json"
DCP_METADATA = ".metadata"
COMMON = "common.pt"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
           "common_backend_version": 1}


def is_torch_dist(folder: Path) -> bool:
    return (folder / METADATA_JSON).is_file() and (folder / DCP_METADATA).is_file()


class _MetadataUnpickler(RestrictedUnpickler):
    """DCP's metadata dataclasses (and megatron's, in older files) as placeholders: read, never
    imported or called."""

    def find_class(self, module: str, name: str):
        if module.startswith(("torch.distributed.checkpoint", "megatron.")) or \
                (module, name) == ("torch.serialization", "_get_layout"):
            return placeholder_class(module, name)
        return super().find_class(module, name)


def _fields(obj) -> dict:
    """A placeholder dataclass's fields (pickled as its __dict__ or a (None, slots) pair)."""
    state = obj.state if isinstance(obj, Placeholder) else None
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}
    if not isinstance(state, dict):
        if isinstance(obj, Placeholder) and obj.args:  # frozen dataclasses may pickle by arguments
            return {"args": obj.args}
        raise ConvertError(f"unexpected object in a torch_dist .metadata: {obj!r}")
    return state


@dataclasses.dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclasses.dataclass
class DistTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[Chunk]


class TorchDistStore:
    """One torch_dist iteration folder: keys, global shapes, dtypes; tensors read region by region."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._check_backend()
        path = self.folder / DCP_METADATA
        try:
            raw = path.read_bytes()
            metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
        except ConvertError as exc:
            raise ConvertError(f"{path}: {exc}") from None
        except OSError as exc:
            raise ConvertError(f"{path}: cannot read ({exc.strerror})") from None
        except Exception as exc:  # a truncated or corrupt pickle
            raise ConvertError(f"{path}: cannot read torch_dist metadata ({type(exc).__name__}: {exc})") from None
        self.tensors: dict[str, DistTensor] = {}
        self.objects: dict[str, tuple[str, int, int]] = {}
        self._parse(metadata, path)
        self._files: dict[tuple[str, int], TorchZipFile] = {}

    def _check_backend(self) -> None:
        path = self.folder / METADATA_JSON
        try:
            backend = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConvertError(f"{path}: missing (not a complete torch_dist checkpoint)") from None
        except ValueError:
            raise ConvertError(f"{path}: not valid JSON") from None
        if backend.get("sharded_backend") != "torch_dist":
            raise ConvertError(f"{path}: sharded_backend {backend.get('sharded_backend')!r}, not torch_dist")

    def _parse(self, metadata, path: Path) -> None:
        fields = _fields(metadata)
        storage = {}
        for index, info in (fields.get("storage_data") or {}).items():
            index_fields, info_fields = _fields(index), _fields(info)
            offset = index_fields.get("offset")
            key = (index_fields["fqn"], tuple(offset) if offset is not None else None)
            storage[key] = (info_fields["relative_path"], int(info_fields["offset"]), int(info_fields["length"]))
            if info_fields.get("transform_descriptors"):
                raise ConvertError(f"{path}: '{index_fields['fqn']}' is stored with transforms "
                                   f"{info_fields['transform_descriptors']}, which are not supported")
        for key, entry in (fields.get("state_dict_metadata") or {}).items():
            if type(entry).__name__ == "BytesStorageMetadata":
                if (key, None) not in storage:
                    raise ConvertError(f"{path}: object '{key}' has no storage entry")
                self.objects[key] = storage[key, None]
                continue
            entry_fields = _fields(entry)
            properties = entry_fields["properties"]
            prop_state = properties.state if isinstance(properties, Placeholder) else None
            dtype = prop_state[0] if isinstance(prop_state, tuple) else _fields(properties).get("dtype")
            if not isinstance(dtype, torch.dtype):
                raise ConvertError(f"{path}: '{key}' has no dtype")
            chunks = []
            for chunk in entry_fields["chunks"]:
                chunk_fields = _fields(chunk)
                offsets, sizes = tuple(chunk_fields["offsets"]), tuple(chunk_fields["sizes"])
                where = storage.get((key, offsets))
                if where is None:
                    raise ConvertError(f"{path}: chunk {list(offsets)} of '{key}' has no storage entry")
                chunks.append(Chunk(offsets, sizes, *where))
            self.tensors[key] = DistTensor(tuple(entry_fields["size"]), dtype, chunks)
        for files in {c.file for t in self.tensors.values() for c in t.chunks} | {o[0] for o in self.objects.values()}:
            if not (self.folder / files).is_file():
                raise ConvertError(f"{self.folder / files}: missing (the .metadata stores data in it)")

    def common(self) -> dict:
        """`common.pt` (args, iteration, ...), through the restricted unpickler."""
        path = self.folder / COMMON
        if not path.is_file():
            raise ConvertError(f"{path}: missing (megatron-core >= 0.19 keeps it inside the store, which is not "
                               f"supported yet)")
        state = load_lazy(path)
        if not isinstance(state, dict):
            raise ConvertError(f"{path}: not a dict")
        return state

    def _blob(self, chunk: Chunk):
        key = (chunk.file, chunk.offset)
        if key not in self._files:
            self._files[key] = TorchZipFile(self.folder / chunk.file, chunk.offset, chunk.length)
        return self._files[key]

    def read(self, key: str, region: tuple[slice, ...] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key`, or the part of it in `region` (one slice per leading dimension, e.g.
        `(slice(L, L + 1),)` for one layer of a stacked tensor), from every chunk it overlaps."""
        entry = self.tensors.get(key)
        if entry is None:
            raise ConvertError(f"{self.folder}: tensor '{key}' is not in the checkpoint")
        bounds = [(0, n) for n in entry.shape]
        for dim, piece in enumerate(region or ()):
            bounds[dim] = (piece.start, piece.stop)
        shape = tuple(b - a for a, b in bounds)
        out = torch.empty(shape, dtype=entry.dtype) if out is None else out
        covered = 0
        for chunk in entry.chunks:
            lo = [max(a, o) for (a, _), o in zip(bounds, chunk.offsets)]
            hi = [min(b, o + s) for (_, b), o, s in zip(bounds, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            stored = self._blob(chunk).load()
            if not isinstance(stored, (LazyTensor, torch.Tensor)) or tuple(stored.shape) != chunk.sizes \
                    or stored.dtype != entry.dtype:
                held = f"{list(stored.shape)} {stored.dtype}" if hasattr(stored, "shape") else type(stored).__name__
                raise ConvertError(f"{self.folder / chunk.file}: chunk {list(chunk.offsets)} of '{key}' holds "
                                   f"{held}, the metadata says {list(chunk.sizes)} {entry.dtype}")
            source = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, chunk.offsets))
            target = out[tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, bounds))]
            # a run of the chunk's bytes goes straight to its place (or stays in the file for the
            # saver, the kernel-copy path); any other part is gathered from the whole chunk
            if not (isinstance(stored, LazyTensor) and stored.read_block(source, target)):
                target.copy_((stored.load() if isinstance(stored, LazyTensor) else stored)[source])
            covered += target.numel()
        if covered != out.numel():  # chunks of one key do not overlap (DCP writes each element once)
            raise ConvertError(f"{self.folder}: the chunks of '{key}' cover {covered} of {out.numel()} elements "
                               f"of the region read")
        return out
