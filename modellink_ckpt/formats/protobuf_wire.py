"""The protobuf wire format, as much as MindSpore's ckpt and strategy files use: varints and
length-delimited fields, read and written without the protobuf package."""

from __future__ import annotations

from modellink_ckpt.errors import ConvertError


def encode_varint(value: int) -> bytes:
    """A varint; negative values as their 64-bit two's complement (int32/int64 fields)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(data, pos: int, end: int, where: str) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos` of `data` (bytes or a memory map)."""
    shift = result = 0
    while True:
        if pos >= end:
            raise ConvertError(f"{where}: truncated or corrupt protobuf (a varint runs past byte {end})")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ConvertError(f"{where}: corrupt protobuf (bad varint at byte {pos})")


def signed(value: int, bits: int = 64) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def key(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


def message(number: int, body: bytes) -> bytes:
    """A length-delimited field."""
    return key(number, 2) + encode_varint(len(body)) + body


def scalar(number: int, value: int) -> bytes:
    """A varint field."""
    return key(number, 0) + encode_varint(value)
