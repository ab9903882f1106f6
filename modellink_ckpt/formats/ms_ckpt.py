"""MindSpore `.ckpt` files, read and written without MindSpore or protobuf.

A `.ckpt` is the protobuf message `Checkpoint { repeated Value value = 1; }` with
`Value { string tag = 1; TensorProto tensor = 2; }` and
`TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }`,
written as one serialized `Checkpoint` per value, back to back (protobuf merges concatenated
messages), which is how MindSpore streams it too. A tensor over 512 MiB is written as several
consecutive values with the same tag and full dims, each with a piece of the raw bytes; a reader
concatenates consecutive same-tag pieces. An optional trailer `b"crc_num"` + the CRC-32 of all
preceding bytes as 10 big-endian bytes guards the file (MindSpore's `crc_check`).

The reader scans the records once (only their headers are touched) and reads each tensor's bytes
on demand straight into the caller's memory.
"""

from __future__ import annotations

import mmap
import zlib
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.formats import protobuf_wire as W
from modellink_ckpt.formats.file_io import FileReader, HashedFile, tensor_bytes
from modellink_ckpt.model.transforms import Rows

# MindSpore's tensor_type strings (str(mstype))
MS_DTYPES = {
    "Float32": torch.float32, "Float16": torch.float16, "BFloat16": torch.bfloat16, "Float64": torch.float64,
    "Int8": torch.int8, "UInt8": torch.uint8, "Int16": torch.int16, "UInt16": torch.uint16, "Int32": torch.int32,
    "UInt32": torch.uint32, "Int64": torch.int64, "UInt64": torch.uint64, "Bool": torch.bool,
}
MS_DTYPE_NAMES = {dtype: name for name, dtype in MS_DTYPES.items()}
SLICE_BYTES = 512 << 20            # MindSpore's SLICE_SIZE: larger tensors are written in pieces
CRC_MARK = b"crc_num"
CRC_TRAILER = len(CRC_MARK) + 10   # marker + the CRC-32 as 10 big-endian bytes


def _value_header(tag: str, dims: tuple[int, ...], type_name: str, content_bytes: int) -> bytes:
    """A serialized `Checkpoint{value: [Value{tag, tensor}]}` up to (not including) the raw bytes."""
    tensor = b"".join(W.key(1, 0) + W.encode_varint(d) for d in dims)           # dims, unpacked as MindSpore writes
    tensor += W.key(2, 2) + W.encode_varint(len(type_name)) + type_name.encode()
    tensor += W.key(3, 2) + W.encode_varint(content_bytes)
    tensor_len = len(tensor) + content_bytes
    name = tag.encode()
    value = W.key(1, 2) + W.encode_varint(len(name)) + name + W.key(2, 2) + W.encode_varint(tensor_len)
    value_len = len(value) + tensor_len
    return W.key(1, 2) + W.encode_varint(value_len) + value + tensor


class MsCkptWriter:
    """A `.ckpt` written one tensor at a time, as `mindspore.save_checkpoint` writes it."""

    def __init__(self, path: str | Path, crc: bool = True, slice_bytes: int = SLICE_BYTES):
        self.path = Path(path)
        self._file = HashedFile(self.path)
        self._crc = 0 if crc else None
        self._slice = slice_bytes
        self.tensor_bytes = 0

    def _write(self, data) -> None:
        if self._crc is not None:
            self._crc = zlib.crc32(data, self._crc)
        self._file.write(data)

    def add(self, name: str, value) -> None:
        """Write tensor (or `Rows`) `value` under `name`, in pieces of at most 512 MiB."""
        if value.dtype not in MS_DTYPE_NAMES:
            raise ConvertError(f"{self.path}: '{name}' has dtype {value.dtype}, which a MindSpore ckpt cannot hold")
        dims, type_name = tuple(value.shape), MS_DTYPE_NAMES[value.dtype]
        total = value.shape.numel() * value.dtype.itemsize
        self.tensor_bytes += total
        if total == 0:
            self._write(_value_header(name, dims, type_name, 0))
            return
        left_in_slice = written = 0  # each slice: its own value with the same tag and full dims
        for piece in (value.pieces if isinstance(value, Rows) else [value]):
            view = memoryview(tensor_bytes(piece)).cast("B")  # valid until the next tensor_bytes call
            while len(view):
                if not left_in_slice:
                    left_in_slice = min(self._slice, total - written)
                    self._write(_value_header(name, dims, type_name, left_in_slice))
                take = min(left_in_slice, len(view))
                self._write(view[:take])
                view, left_in_slice, written = view[take:], left_in_slice - take, written + take

    def close(self) -> tuple[int, str]:
        """Write the CRC trailer (if asked); returns (file bytes, digest)."""
        if self._crc is not None:
            self._file.write(CRC_MARK + self._crc.to_bytes(10, "big"))
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()


class _Cursor:
    """Protobuf wire-format reading over a memory map (only what is parsed is touched)."""

    def __init__(self, data, path: Path, start: int, end: int):
        self.data, self.path, self.pos, self.end = data, path, start, end

    def varint(self) -> int:
        value, self.pos = W.read_varint(self.data, self.pos, self.end, str(self.path))
        return value

    def length_delimited(self) -> tuple[int, int]:
        length = self.varint()
        start = self.pos
        if start + length > self.end:
            raise ConvertError(f"{self.path}: truncated or corrupt ckpt (a field of {length} bytes at byte {start} "
                               f"runs past its record)")
        self.pos = start + length
        return start, start + length

    def skip(self, wire: int) -> None:
        if wire == 0:
            self.varint()
        elif wire == 1:
            self.pos += 8
        elif wire == 2:
            self.length_delimited()
        elif wire == 5:
            self.pos += 4
        else:
            raise ConvertError(f"{self.path}: corrupt ckpt (wire type {wire} at byte {self.pos})")


class MsCkptFile:
    """A `.ckpt` file scanned once: every tag's dims, dtype and where its bytes lie."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as exc:
            raise ConvertError(f"{self.path}: cannot read ({exc.strerror})") from None
        try:
            self.crc = None
            end = size
            if size >= CRC_TRAILER and data[size - CRC_TRAILER:size - 10] == CRC_MARK:
                self.crc = int.from_bytes(data[size - 10:size], "big")
                end = size - CRC_TRAILER
            self._data_end = end
            # {tag: (dtype or None for str, dims, [(offset, length)])}
            self.entries: dict[str, tuple[torch.dtype | None, tuple[int, ...], list[tuple[int, int]]]] = {}
            self._scan(data, end)
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
        self._reader = FileReader(self.path)
        for name, (dtype, dims, pieces) in self.entries.items():
            if dtype is None:
                continue
            want = torch.Size(dims).numel() * dtype.itemsize
            have = sum(length for _, length in pieces)
            if have != want:
                raise ConvertError(f"{self.path}: '{name}' holds {have} bytes for dims {list(dims)} "
                                   f"{MS_DTYPE_NAMES[dtype]} ({want} expected): truncated or corrupt")

    def _scan(self, data, end: int) -> None:
        top = _Cursor(data, self.path, 0, end)
        previous = None
        while top.pos < end:
            key = top.varint()
            if key >> 3 != 1 or key & 7 != 2:
                raise ConvertError(f"{self.path}: not a MindSpore ckpt (unexpected field {key >> 3} at byte {top.pos})")
            start, stop = top.length_delimited()
            tag, dims, type_name, content = self._value(_Cursor(data, self.path, start, stop))
            if type_name == "str":
                self.entries[tag] = (None, dims, [])
                previous = None
                continue
            if type_name not in MS_DTYPES:
                raise ConvertError(f"{self.path}: '{tag}' has tensor_type {type_name!r}, which is not supported")
            if tag == previous:  # the next piece of a sliced tensor
                self.entries[tag][2].append(content)
                continue
            if tag in self.entries:
                raise ConvertError(f"{self.path}: '{tag}' appears twice, not as consecutive pieces (corrupt)")
            self.entries[tag] = (MS_DTYPES[type_name], dims, [content])
            previous = tag

    def _value(self, cursor: _Cursor):
        tag, dims, type_name, content = None, [], None, None
        while cursor.pos < cursor.end:
            key = cursor.varint()
            field, wire = key >> 3, key & 7
            if field == 1 and wire == 2:
                start, stop = cursor.length_delimited()
                tag = bytes(cursor.data[start:stop]).decode("utf-8", "replace")
            elif field == 2 and wire == 2:
                start, stop = cursor.length_delimited()
                inner = _Cursor(cursor.data, self.path, start, stop)
                while inner.pos < inner.end:
                    key = inner.varint()
                    field, wire = key >> 3, key & 7
                    if field == 1 and wire == 0:
                        dims.append(inner.varint())
                    elif field == 1 and wire == 2:  # packed dims
                        s, e = inner.length_delimited()
                        packed = _Cursor(cursor.data, self.path, s, e)
                        while packed.pos < packed.end:
                            dims.append(packed.varint())
                    elif field == 2 and wire == 2:
                        s, e = inner.length_delimited()
                        type_name = bytes(cursor.data[s:e]).decode("ascii", "replace")
                    elif field == 3 and wire == 2:
                        s, e = inner.length_delimited()
                        content = (s, e - s)
                    else:
                        inner.skip(wire)
            elif field == 3 and wire == 2:
                raise ConvertError(f"{self.path}: holds a MapTensor (an embedding hash table), which is not supported")
            else:
                cursor.skip(wire)
        if tag is None or type_name is None:
            raise ConvertError(f"{self.path}: corrupt ckpt (a value without tag or tensor_type near byte {cursor.pos})")
        dims = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)
        return tag, dims, type_name, content or (0, 0)

    def verify_crc(self) -> None:
        """Check the CRC trailer, if the file has one (reads the whole file once)."""
        if self.crc is None:
            return
        crc, remaining = 0, self._data_end
        with open(self.path, "rb", buffering=0) as f:
            while remaining:
                block = f.read(min(64 << 20, remaining))
                if not block:
                    break
                crc = zlib.crc32(block, crc)
                remaining -= len(block)
        if crc != self.crc:
            raise ConvertError(f"{self.path}: CRC check failed (the file was changed or corrupted)")

    # ---- the SafetensorsFile interface -------------------------------------------------------

    def keys(self):
        return [name for name, entry in self.entries.items() if entry[0] is not None]

    def __contains__(self, name: str) -> bool:
        return name in self.entries and self.entries[name][0] is not None

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        dtype, dims, _ = self.entries[name]
        return dims, dtype

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows [start, stop) of tensor `name` straight into `out` (contiguous, same dtype)."""
        dtype, dims, pieces = self.entries[name]
        row = dtype.itemsize * torch.Size(dims[1:]).numel()
        lo, hi = start * row, stop * row
        if out.dtype != dtype or out.nbytes != hi - lo or not out.is_contiguous() or (dims and stop > dims[0]):
            raise ConvertError(f"{self.path}: rows {start}:{stop} of '{name}' {MS_DTYPE_NAMES[dtype]} {list(dims)} "
                               f"do not fit {out.dtype} {list(out.shape)}")
        flat = out.reshape(-1).view(torch.uint8)
        position = 0  # byte position within the tensor
        for offset, length in pieces:
            a, b = max(lo, position), min(hi, position + length)
            if a < b:
                self._reader.read_into(offset + a - position, flat[a - lo:b - lo], f"'{name}'")
            position += length


def write_ckpt(path: str | Path, tensors: dict, crc: bool = True) -> tuple[int, str]:
    """A whole `.ckpt` from {name: tensor} (small files: tests, metadata)."""
    writer = MsCkptWriter(path, crc=crc)
    for name, value in tensors.items():
        writer.add(name, value)
    return writer.close()
