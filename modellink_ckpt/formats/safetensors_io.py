"""Reading and writing safetensors files without holding more than the tensors at hand.

The format is an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets: [begin, end]}}` and the data. Reading parses the header
once, checks every offset against the file size (a truncated download fails here with the
file's name, not later with a bus error), and reads one tensor at a time straight into the
memory that will cross to the saver process.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.file_io import FileReader, HashedFile, PositionalFile
from modellink_ckpt.model.transforms import Rows

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 << 20


def shared_empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in shared memory, so passing it to another process copies nothing."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)))[:nbytes]


class SafetensorsFile:
    """One `.safetensors` file, its header parsed and validated, tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConvertError(f"{self.path}: truncated safetensors file ({size} bytes)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise ConvertError(f"{self.path}: corrupt safetensors header (length {header_len}, "
                                       f"file {size} bytes)")
                header = json.loads(f.read(header_len))
        except OSError as exc:
            raise ConvertError(f"{self.path}: cannot read ({exc.strerror})") from None
        except (ValueError, UnicodeDecodeError):
            raise ConvertError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise ConvertError(f"{self.path}: corrupt safetensors header")
        self._reader = FileReader(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(x) for x in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{self.path}: corrupt safetensors entry for '{name}'") from None
            numel = 1
            for dim in shape:
                numel *= dim
            if end - begin != numel * dtype.itemsize or begin < 0:
                raise ConvertError(f"{self.path}: '{name}' has {end - begin} bytes for shape {list(shape)} "
                                   f"{info['dtype']}")
            if end > data_size:
                raise ConvertError(f"{self.path}: truncated: '{name}' ends at byte {self._data_start + end} "
                                   f"but the file has {size} bytes")
            self.entries[name] = (dtype, shape, begin, end)
        # The format's rule: the tensors tile the data region exactly. A header length cut short
        # (or grown) shifts every tensor; this is where it shows.
        position = 0
        for dtype, shape, begin, end in sorted(self.entries.values(), key=lambda e: (e[2], e[3])):
            if begin != position:
                raise ConvertError(f"{self.path}: corrupt safetensors header (tensor data does not start "
                                   f"where the previous one ends: byte {begin}, expected {position})")
            position = end
        if position != data_size:
            raise ConvertError(f"{self.path}: corrupt safetensors header (tensors cover {position} bytes, "
                               f"the data region has {data_size})")

    def keys(self):
        return self.entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        dtype, shape, _, _ = self.entries[name]
        return shape, dtype

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows [start, stop) of tensor `name` straight into `out` (contiguous, same dtype)."""
        dtype, shape, begin, _ = self.entries[name]
        row_bytes = dtype.itemsize * torch.Size(shape[1:]).numel()
        nbytes = (stop - start) * row_bytes
        if out.dtype != dtype or out.nbytes != nbytes or not out.is_contiguous() or stop > shape[0]:
            raise ConvertError(f"{self.path}: rows {start}:{stop} of '{name}' {DTYPE_NAMES[dtype]} {list(shape)} "
                               f"do not fit {DTYPE_NAMES.get(out.dtype, out.dtype)} {list(out.shape)}")
        self._reader.read_into(self._data_start + begin + start * row_bytes, out, f"'{name}'")

def planned_header(entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                   metadata: dict | None = None) -> tuple[bytes, dict[str, int], int]:
    """(the bytes before the data, {name: its first byte in the file}, tensor bytes) of a file
    holding `entries` in this order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, starts = 0, {}
    for name, shape, dtype in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        starts[name] = offset
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format allows space padding; keeps data aligned
    head = struct.pack("<Q", len(header_bytes)) + header_bytes
    return head, {name: len(head) + start for name, start in starts.items()}, offset


class SafetensorsWriter:
    """One safetensors file whose tensor list is known in advance, written as tensors arrive.

    The header goes first, so the full list (name, shape, dtype) must be planned; tensors (or
    `Rows`) are then streamed straight from the caller's memory, in the planned order.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict | None = None):
        head, _, self.tensor_bytes = planned_header(entries, metadata)
        self.path = Path(path)
        self._pending = list(reversed(entries))
        self._file = HashedFile(self.path)
        self._file.write(head)

    @property
    def complete(self) -> bool:
        return not self._pending

    def add(self, name: str, value) -> None:
        expected_name, shape, dtype = self._pending.pop()
        if (name, tuple(value.shape), value.dtype) != (expected_name, tuple(shape), dtype):
            raise ConvertError(f"{self.path}: got {name} {list(value.shape)} {value.dtype}, planned "
                               f"{expected_name} {list(shape)} {dtype} (mixed dtypes need --params-dtype)")
        for piece in (value.pieces if isinstance(value, Rows) else [value]):
            self._file.write_tensor(piece)

    def close(self) -> tuple[int, str]:
        """(file bytes, digest)."""
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()



class PlacedTensors:
    """Tensors written at their planned places in planned safetensors files, by several processes
    side by side (`--workers`): whichever comes first to a file gives it its header and full size
    (the same bytes from each), then each writes its own tensors. Unhashed: the files are hashed
    once complete."""

    def __init__(self, files: dict[str, tuple[str | Path, list, dict | None]]):
        """`files`: {file name: (path, entries, metadata)} as the files were planned."""
        self._files = {name: (Path(path), planned_header(entries, metadata)) for name, (path, entries, metadata)
                       in files.items()}
        self._where: dict[str, tuple[str, int, tuple, torch.dtype]] = {}
        for file, (_, entries, _) in files.items():
            starts = self._files[file][1][1]
            for name, shape, dtype in entries:
                self._where[name] = (file, starts[name], tuple(shape), dtype)
        self._open: dict[str, PositionalFile] = {}
        self.tensor_bytes = 0

    def _file(self, file: str) -> PositionalFile:
        if file not in self._open:
            path, (head, _, tensor_bytes) = self._files[file]
            placed = self._open[file] = PositionalFile(path, size=len(head) + tensor_bytes)
            placed.write_at(0, memoryview(head))
        return self._open[file]

    def add(self, name: str, value) -> None:
        file, offset, shape, dtype = self._where[name]
        if (tuple(value.shape), value.dtype) != (shape, dtype):
            raise ConvertError(f"{self._files[file][0]}: got {name} {list(value.shape)} {value.dtype}, planned "
                               f"{list(shape)} {dtype} (mixed dtypes need --params-dtype)")
        for piece in (value.pieces if isinstance(value, Rows) else [value]):
            offset += self._file(file).write_tensor_at(offset, piece)
        self.tensor_bytes += value.nbytes

    def close(self) -> None:
        for placed in self._open.values():
            placed.close()
        self._open.clear()


INDEX = "model.safetensors.index.json"


HF_METADATA = {"format": "pt"}  # what transformers' save_pretrained writes in every shard


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
                                              metadata=HF_METADATA)
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
        self._tensors = PlacedTensors({name: (folder / name, shard, HF_METADATA)
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


def parse_size(text: str, flag: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise UsageError(f"{flag} {text!r}: expected a size like 5GB or 500MB")
    unit = match[2].upper().replace("I", "").rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    return int(float(match[1]) * scale)
