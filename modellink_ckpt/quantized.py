"""Quantized HF weights, dequantized while they are read: DeepSeek-V3/R1-style FP8 checkpoints
(`X.weight` in float8 with a `X.weight_scale_inv` of one fp32 scale per block of rows x columns,
128 x 128 by default, `quantization_config.weight_block_size` otherwise).

The arithmetic is the reference one (DeepSeek's `weight_dequant`, Megatron-Bridge's import):
`(w.float() * scale) -> the model's dtype`, so a converted checkpoint equals one converted from
the reference bf16 files bit for bit. The scales are consumed here and never reach a target.
"""

from __future__ import annotations

import math

import torch

from modellink_ckpt.errors import ConvertError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DEFAULT_BLOCK = (128, 128)
_CHUNK_ELEMENTS = 1 << 24  # rows are dequantized in pieces of about this many elements (64 MB in fp32)


def block_size(config: dict, source: str) -> tuple[int, int]:
    """The scale block of an HF config's `quantization_config` (FP8 only)."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method not in (None, "fp8"):
        raise ConvertError(f"{source}: quantization_config quant_method {method!r} is not supported "
                           f"(fp8 with weight_scale_inv blocks is)")
    block = quant.get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or min(block) < 1:
        raise ConvertError(f"{source}: quantization_config weight_block_size {block!r}: expected [rows, columns]")
    return int(block[0]), int(block[1])


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def check_scale(weight: str, shape, scale_shape, block: tuple[int, int], source: str) -> None:
    expected = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])) if len(shape) == 2 else None
    if expected is None or tuple(scale_shape) != expected:
        raise ConvertError(f"{source}: '{scale_name(weight)}' is {list(scale_shape)}; a {list(shape)} FP8 weight in "
                           f"{block[0]}x{block[1]} blocks needs {list(expected or ['2-D weight'])}")


def dequantize_rows(read_rows, weight: str, shape, start: int, stop: int, out: torch.Tensor,
                    block: tuple[int, int], stored: torch.dtype, scale_dtype: torch.dtype) -> None:
    """Rows [start, stop) of FP8 `weight` into `out` in `out.dtype`; `read_rows(name, start, stop,
    buffer)` reads stored rows of the weight or its scale."""
    rows_per_chunk = max(block[0], _CHUNK_ELEMENTS // max(shape[1], 1) // block[0] * block[0])
    row = start
    while row < stop:
        end = min(stop, (row // block[0]) * block[0] + rows_per_chunk)
        raw = torch.empty((end - row, shape[1]), dtype=stored)
        read_rows(weight, row, end, raw)
        first, last = row // block[0], (end - 1) // block[0] + 1
        scales = torch.empty((last - first, math.ceil(shape[1] / block[1])), dtype=scale_dtype)
        read_rows(scale_name(weight), first, last, scales)
        expanded = scales.float().repeat_interleave(block[0], 0)[row - first * block[0]:end - first * block[0]]
        expanded = expanded.repeat_interleave(block[1], 1)[:, :shape[1]]
        out[row - start:end - start].copy_((raw.float() * expanded).to(out.dtype))
        row = end
