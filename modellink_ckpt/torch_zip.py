"""Write a `torch.save`-compatible file one tensor at a time.

`torch.save` needs the whole object in memory and writes it at the end. A zip reader finds
records through the central directory, so the tensor records can be written first, as they
arrive, straight from the tensor's memory, and the small pickle that ties them together last.
`torch.load` (also with `mmap=True`) reads the result like a file `torch.save` wrote: same record
names, same pickle, data aligned to 64 bytes, zip64 sizes so files may exceed 4 GB.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import uuid
from pathlib import Path

import torch

from modellink_ckpt.hashed_file import HashedFile, tensor_bytes
from modellink_ckpt.transforms import Rows

ALIGNMENT = 64
_ZIP64_EXTRA_ID = 0x0001
_PAD_EXTRA_ID = 0x4246  # the id torch's own writer uses for its alignment padding ("FB")
_VERSION = 45           # zip64


class _StorageRef:
    """A storage already written as record `data/{key}`."""

    __slots__ = ("key", "storage_type", "numel")

    def __init__(self, key: str, storage_type, numel: int):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class TensorRef:
    """Pickles exactly as a contiguous CPU tensor backed by a written storage."""

    __slots__ = ("storage", "shape", "dtype")

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...], dtype: torch.dtype):
        self.storage, self.shape, self.dtype = storage, shape, dtype

    def __reduce__(self):
        stride, step = [], 1
        for size in reversed(self.shape):
            stride.append(step)
            step *= size
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


_STORAGE_TYPES = {
    torch.float32: torch.FloatStorage, torch.float64: torch.DoubleStorage, torch.float16: torch.HalfStorage,
    torch.bfloat16: torch.BFloat16Storage, torch.int64: torch.LongStorage, torch.int32: torch.IntStorage,
    torch.int16: torch.ShortStorage, torch.int8: torch.CharStorage, torch.uint8: torch.ByteStorage,
    torch.bool: torch.BoolStorage, torch.complex64: torch.ComplexFloatStorage,
    torch.complex128: torch.ComplexDoubleStorage,
}


def _storage_type(dtype: torch.dtype):
    """The legacy storage class `torch.save` names in the pickle (e.g. torch.BFloat16Storage)."""
    return _STORAGE_TYPES[dtype]


class StreamingTorchWriter:
    """`add_tensor` writes the bytes at once and returns a reference; `close(obj)` writes the pickle.

    `obj` may hold the references returned by `add_tensor` wherever a tensor would be.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._archive = self.path.stem  # torch names the top folder of the zip after the file
        self._file = HashedFile(self.path)
        self._offset = 0
        self._entries: list[tuple[bytes, int, int]] = []  # (name, local header offset, size)
        self._count = 0
        self.bytes_written = 0

    # ---- zip records -------------------------------------------------------------------------

    def _write(self, data) -> None:
        self._file.write(data)
        self._offset = self._file.size

    def _record(self, name: str, data: bytes) -> None:
        self._record_start(name, len(data))
        self._write(data)

    def _record_start(self, name: str, size: int) -> None:
        """The local header of a stored zip entry of `size` bytes; its data must follow."""
        name_bytes = f"{self._archive}/{name}".encode()
        zip64 = struct.pack("<HHQQ", _ZIP64_EXTRA_ID, 16, size, size)
        header_len = 30 + len(name_bytes) + len(zip64) + 4
        padding = (-(self._offset + header_len)) % ALIGNMENT
        extra = zip64 + struct.pack("<HH", _PAD_EXTRA_ID, padding) + b"Z" * padding
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, _VERSION, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                             len(name_bytes), len(extra))
        self._entries.append((name_bytes, self._offset, size))
        self._write(header + name_bytes + extra)

    def _central_directory(self) -> None:
        start = self._offset
        directory = bytearray()
        for name, offset, size in self._entries:
            extra = struct.pack("<HHQQQ", _ZIP64_EXTRA_ID, 24, size, size, offset)
            directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _VERSION, _VERSION, 0, 0, 0, 0, 0,
                                     0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF)
            directory += name + extra
        count = len(self._entries)
        end64_at = start + len(directory)
        directory += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, _VERSION, _VERSION, 0, 0, count, count,
                                 end64_at - start, start)
        directory += struct.pack("<IIQI", 0x07064B50, 0, end64_at, 1)
        directory += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        self._write(directory)

    # ---- public ------------------------------------------------------------------------------

    def add_tensor(self, value) -> TensorRef:
        """Write a tensor (or `Rows`, piece by piece) now; returns what to pickle in its place."""
        key = str(self._count)
        self._count += 1
        numel = value.shape.numel()
        self._record_start(f"data/{key}", numel * value.dtype.itemsize)
        for piece in (value.pieces if isinstance(value, Rows) else [value]):
            self._write(tensor_bytes(piece))
        self.bytes_written += numel * value.dtype.itemsize
        return TensorRef(_StorageRef(key, _storage_type(value.dtype), numel), tuple(value.shape), value.dtype)

    def close(self, obj) -> None:
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(obj)
        self._record("data.pkl", buffer.getvalue())
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(ALIGNMENT).encode())
        self._record("byteorder", sys.byteorder.encode())
        self._record("version", b"3\n")
        self._record(".data/serialization_id", uuid.uuid4().hex.encode())
        self._central_directory()
        self.size, self.sha256 = self._file.close()

    def abort(self) -> None:
        self._file.abort()
