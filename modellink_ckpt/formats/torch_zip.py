"""Write a `torch.save`-compatible file one tensor at a time.

`torch.save` needs the whole object in memory and writes it at the end. A zip reader finds
records through the central directory, so the tensor records can be written first, as they
arrive, straight from the tensor's memory, and the small pickle that ties them together last.
`torch.load` (also with `mmap=True`) reads the result like a file `torch.save` wrote: same record
names, same pickle, data aligned to 64 bytes, zip64 sizes so files may exceed 4 GB. Tensor records
carry no CRC-32 (as with torch's own writer when CRCs are off): the manifest's digest covers them.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import io
import math
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.formats.file_io import FileReader, HashedFile
from modellink_ckpt.formats.safe_pickle import (Placeholder, RestrictedUnpickler, is_placeholder_class, load_torch,
                                                repicklable)
from modellink_ckpt.model.transforms import Rows

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


class _Pickler(pickle._Pickler):
    """torch.save's pickle (protocol 2, storages as persistent ids). The pure-Python pickler, so
    that the placeholders of a training run's args (Megatron enums, never imported here) are
    written back under their own names; the pickle is small, its speed does not matter."""

    def reducer_override(self, obj):
        # An enum member (a training run's exit signal) by value, `Signals(15)`, whatever this
        # Python's default: Debian's 3.11.2 writes the bare global `signal.SIGTERM`, which
        # torch.load(weights_only=True) -- megatron's common.pt loader -- refuses.
        if isinstance(obj, enum.Enum):
            return type(obj), (obj.value,)
        if isinstance(obj, Placeholder):  # under the global it was read from (save_global below)
            return obj.written_back()
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None

    def save_global(self, obj, name=None):
        if not is_placeholder_class(obj):
            return super().save_global(obj, name)
        if not repicklable(obj):
            raise ConvertError(f"{obj._qualname}: an object of this class cannot be written back (only Megatron's "
                               f"and MindSpeed's own classes are)")
        self.write(pickle.GLOBAL + f"{obj._module}\n{obj._name}\n".encode())
        self.memoize(obj)


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

    def __init__(self, path: str | Path, sink: HashedFile | None = None):
        """`sink`: append the zip to this open file instead (a blob of a larger file, as
        torch.distributed.checkpoint stores tensors; its offsets count from the blob's start)."""
        self.path = Path(path)
        self._archive = self.path.stem  # torch names the top folder of the zip after the file
        self._file = sink if sink is not None else HashedFile(self.path)
        self._owns_file = sink is None
        self._base = self._file.size
        self._offset = 0
        self._entries: list[tuple[bytes, int, int, int]] = []  # (name, local header offset, size, crc32)
        self._count = 0
        self.bytes_written = 0

    # ---- zip records -------------------------------------------------------------------------

    def _write(self, data) -> None:
        self._file.write(data)
        self._offset = self._file.size - self._base

    def _record(self, name: str, data: bytes) -> None:
        self._record_start(name, len(data), zlib.crc32(data))
        self._write(data)

    def _record_start(self, name: str, size: int, crc: int = 0) -> None:
        """The local header of a stored zip entry of `size` bytes; its data must follow."""
        name_bytes = f"{self._archive}/{name}".encode()
        zip64 = struct.pack("<HHQQ", _ZIP64_EXTRA_ID, 16, size, size)
        header_len = 30 + len(name_bytes) + len(zip64) + 4
        padding = (-(self._offset + header_len)) % ALIGNMENT
        extra = zip64 + struct.pack("<HH", _PAD_EXTRA_ID, padding) + b"Z" * padding
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, _VERSION, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                             len(name_bytes), len(extra))
        self._entries.append((name_bytes, self._offset, size, crc))
        self._write(header + name_bytes + extra)

    def _central_directory(self) -> None:
        start = self._offset
        directory = bytearray()
        for name, offset, size, crc in self._entries:
            extra = struct.pack("<HHQQQ", _ZIP64_EXTRA_ID, 24, size, size, offset)
            directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _VERSION, _VERSION, 0, 0, 0, 0, crc,
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
            self._file.write_tensor(piece)
            self._offset = self._file.size - self._base
        self.bytes_written += numel * value.dtype.itemsize
        return TensorRef(_StorageRef(key, _storage_type(value.dtype), numel), tuple(value.shape), value.dtype)

    def close(self, obj) -> None:
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(obj)
        pickled = buffer.getvalue()
        self._record("data.pkl", pickled)
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(ALIGNMENT).encode())
        self._record("byteorder", sys.byteorder.encode())
        self._record("version", b"3\n")
        # torch writes a random id here; one derived from the contents keeps the output the same
        # bytes on every run (and whatever --workers), and still tells different files apart
        self._record(".data/serialization_id", hashlib.blake2b(pickled, digest_size=16,
                                                                person=b"serialization_id").hexdigest().encode())
        self._central_directory()
        if self._owns_file:
            self.size, self.digest = self._file.close()
        else:
            self.size, self.digest = self._offset, None

    def abort(self) -> None:
        self._file.abort()


# ---- reading ------------------------------------------------------------------------------------

_DTYPE_OF_STORAGE = {storage: dtype for dtype, storage in _STORAGE_TYPES.items()}


class LazyTensor:
    """A tensor inside a torch zip file, known by shape and place; its bytes are read on demand
    straight into the caller's memory (no memory map, so reading leaves nothing resident)."""

    __slots__ = ("file", "record_offset", "dtype", "shape", "stride", "offset")

    def __init__(self, file: "TorchZipFile", record_offset: int, dtype, shape, stride, offset: int):
        self.file, self.record_offset, self.dtype = file, record_offset, dtype
        self.shape, self.stride, self.offset = torch.Size(shape), tuple(stride), offset

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        return all(s == e or n == 1 for s, e, n in zip(self.stride, reversed(expected), self.shape))

    def read_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) into `out` (contiguous, same dtype, matching size)."""
        row_bytes = self.shape[1:].numel() * self.dtype.itemsize
        if out.dtype != self.dtype or not out.is_contiguous() or out.nbytes != (stop - start) * row_bytes:
            raise ConvertError(f"{self.file.path}: rows {start}:{stop} of a {list(self.shape)} "
                               f"{self.dtype} tensor do not fit {list(out.shape)} {out.dtype}")
        if not self.is_contiguous():  # a strided view was saved: read it whole, then copy
            out.copy_(self.load()[start:stop].reshape(out.shape))
            return out
        start_byte = self.record_offset + self.offset * self.dtype.itemsize + start * row_bytes
        self.file.read_into(start_byte, out)
        return out

    def read_into(self, out: torch.Tensor) -> torch.Tensor:
        return self.read_rows(0, self.shape[0] if self.shape else 1, out.view(self.shape) if self.shape else out)

    def read_block(self, index: tuple[slice, ...], out: torch.Tensor) -> bool:
        """The part `index` (a slice per dimension) straight into `out` (contiguous, same dtype)
        where that part is one run of the stored bytes: single indices first, then one range, then
        whole dimensions. False, reading nothing, for any other part (the caller gathers it)."""
        sizes = [s.stop - s.start for s in index]
        if len(index) != len(self.shape) or out.dtype != self.dtype or not out.is_contiguous() \
                or out.numel() != math.prod(sizes) or not self.is_contiguous():
            return False
        ranged = next((d for d, n in enumerate(sizes) if n != 1), len(sizes))
        if any(s.start != 0 or s.stop != n for s, n in zip(index[ranged + 1:], self.shape[ranged + 1:])):
            return False
        start = sum(s.start * math.prod(self.shape[d + 1:]) for d, s in enumerate(index))
        self.file.read_into(self.record_offset + (self.offset + start) * self.dtype.itemsize, out)
        return True

    def load(self) -> torch.Tensor:
        """The tensor itself (allocated here)."""
        if self.is_contiguous():
            return self.read_into(torch.empty(self.shape, dtype=self.dtype))
        extent = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if self.shape.numel() else 0
        flat = torch.empty(extent, dtype=self.dtype)
        self.file.read_into(self.record_offset + self.offset * self.dtype.itemsize, flat)
        return flat.as_strided(self.shape, self.stride).clone()


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of a file, as a file of their own (a torch.save blob inside a
    torch.distributed.checkpoint data file)."""

    def __init__(self, raw, start: int, length: int):
        self._raw, self._start, self._length, self._pos = raw, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._length}[whence] + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        size = self._length - self._pos if size is None or size < 0 else min(size, self._length - self._pos)
        self._raw.seek(self._start + self._pos)
        data = self._raw.read(max(size, 0))
        self._pos += len(data)
        return data


class TorchZipFile:
    """A `torch.save` zip file read without torch.load: the pickle through the restricted unpickler,
    every tensor as a `LazyTensor`. `start`/`length`: a blob inside a larger file."""

    def __init__(self, path: str | Path, start: int = 0, length: int | None = None):
        self.path = Path(path)
        self._reader = FileReader(self.path)
        where = f"{self.path}" + (f" (bytes {start}+{length})" if start or length is not None else "")
        try:
            size = self.path.stat().st_size
            length = size - start if length is None else length
            if start + length > size:
                raise ConvertError(f"{where}: truncated: the blob ends past the end of the file")
            with open(self.path, "rb") as raw, zipfile.ZipFile(_Window(raw, start, length)) as archive:
                self._records = {}
                for info in archive.infolist():
                    raw.seek(start + info.header_offset)
                    local = raw.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise ConvertError(f"{where}: corrupt zip entry '{info.filename}'")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    self._records[info.filename.split("/", 1)[-1]] = (
                        start + info.header_offset + 30 + name_len + extra_len, info.file_size)
                offset, record_length = self._records["data.pkl"]
                raw.seek(offset)
                pickled = raw.read(record_length)  # tensor records carry no CRC (see StreamingTorchWriter)
        except OSError as exc:  # e.g. a zip directory pointing past a truncated end
            raise ConvertError(f"{where}: cannot read checkpoint: truncated or unreadable ({exc.strerror or exc})") from None
        except (zipfile.BadZipFile, StopIteration, ValueError, KeyError) as exc:
            raise ConvertError(f"{where}: cannot read checkpoint ({exc or type(exc).__name__})") from None
        for name, (offset, record_length) in self._records.items():
            if offset + record_length > start + length:
                raise ConvertError(f"{where}: truncated: record '{name}' ends past the end of the file")
        self._pickled = pickled

    def load(self):
        reader = self

        class Unpickler(RestrictedUnpickler):
            source = str(self.path)

            def find_class(self, module, name):
                if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
                    return _lazy_rebuild
                if (module, name) == ("torch._utils", "_rebuild_parameter"):
                    return lambda data, requires_grad=False, hooks=None: data
                return super().find_class(module, name)

            def persistent_load(self, saved_id):
                kind, storage_type, key, _location, _numel = saved_id
                if kind != "storage" or f"data/{key}" not in reader._records:
                    raise ConvertError(f"{reader.path}: references a missing record data/{key}")
                dtype = _DTYPE_OF_STORAGE.get(storage_type, torch.uint8)
                return reader, reader._records[f"data/{key}"], dtype

        try:
            return Unpickler(io.BytesIO(self._pickled)).load()
        except ConvertError:
            raise
        except Exception as exc:  # a corrupt pickle: name the file once
            raise ConvertError(f"{self.path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None

    def read_into(self, offset: int, out: torch.Tensor) -> None:
        self._reader.read_into(offset, out)


def loaded(value):
    """A tensor for a tensor or a LazyTensor (read whole); anything else unchanged."""
    return value.load() if isinstance(value, LazyTensor) else value


def _lazy_rebuild(storage, storage_offset, size, stride, *_ignored):
    reader, (record_offset, record_bytes), dtype = storage
    tensor = LazyTensor(reader, record_offset, dtype, size, stride, storage_offset)
    extent = storage_offset + (1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
                               if tensor.shape.numel() else 0)
    if extent * dtype.itemsize > record_bytes:
        raise ConvertError(f"{reader.path}: a tensor {list(tensor.shape)} reaches past its record")
    return tensor


def _refuse_broken_zip(path: Path) -> None:
    """A file that starts like a `torch.save` zip but has no readable end: say so in a few words
    (torch's own message for it is ~450 characters)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read ({exc.strerror})") from None
    if head == b"PK\x03\x04":
        raise ConvertError(f"{path}: cannot read checkpoint: truncated or corrupt ({path.stat().st_size} bytes; a "
                           f"torch.save zip file whose end, the zip directory, is missing or damaged)")


def load_lazy(path: str | Path):
    """The object saved in a torch file, with `LazyTensor`s for tensors (zip format), or real
    tensors through the restricted unpickler for the old non-zip format."""
    if zipfile.is_zipfile(path):
        return TorchZipFile(path).load()
    _refuse_broken_zip(Path(path))

    return load_torch(path, mmap=False)
