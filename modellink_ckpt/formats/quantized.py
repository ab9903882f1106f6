"""Quantized HF weights, dequantized while they are read: DeepSeek-V3/R1-style FP8 checkpoints
(`X.weight` in float8 with a `X.weight_scale_inv` of one fp32 scale per block of rows x columns,
128 x 128 by default, `quantization_config.weight_block_size` otherwise) and the MXFP4 release of
gpt-oss (`X_blocks` / `X_scales`, see `Mxfp4Tensor`).

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
    if method not in (None, "fp8", "mxfp4"):
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


# ---- MXFP4 (OCP microscaling FP4, gpt-oss) ---------------------------------------------------------
# `X_blocks` uint8 [*lead, R, G, 16]: 32 FP4 (e2m1) values per group, two per byte, low nibble first;
# `X_scales` uint8 [*lead, R, G]: one power-of-two exponent per group, biased by 127. The groups run
# along each row's input dimension, so a row of R is an output: gpt-oss's experts are stored
# [E, out, in] packed, where its bf16 release is [E, in, out]. Read, like transformers does, as the
# bf16 layout: [*lead, G * 32, R] (PR #3743 of Megatron-Bridge: a square expert cannot be told apart
# by shape, so the orientation is fixed here, per format).

BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_SCALE_BIAS = 127


def mxfp4_pairs(names) -> dict[str, tuple[str, str]]:
    """{tensor: (its blocks, its scales)} for every `X_blocks` with an `X_scales` next to it."""
    names = set(names)
    return {name[:-len(BLOCKS_SUFFIX)]: (name, name[:-len(BLOCKS_SUFFIX)] + SCALES_SUFFIX) for name in names
            if name.endswith(BLOCKS_SUFFIX) and name[:-len(BLOCKS_SUFFIX)] + SCALES_SUFFIX in names}


def check_mxfp4(name: str, blocks: tuple, scales: tuple, source: str) -> tuple[int, ...]:
    """The dequantized shape of `name` from its (shape, dtype) of blocks and scales."""
    (block_shape, block_dtype), (scale_shape, scale_dtype) = blocks, scales
    if block_dtype != torch.uint8 or scale_dtype != torch.uint8 or len(block_shape) != 4 \
            or block_shape[-1] != 16 or tuple(block_shape[:-1]) != tuple(scale_shape):
        raise ConvertError(f"{source}: '{name}{BLOCKS_SUFFIX}' {list(block_shape)} and '{name}{SCALES_SUFFIX}' "
                           f"{list(scale_shape)} are not MXFP4 (uint8 [E, R, G, 16] and uint8 [E, R, G])")
    stacked, rows, groups, _ = block_shape
    return stacked, groups * 32, rows


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, G, 16] packed values and [R, G] exponents -> [R, G * 32] in `dtype`, the reference way
    (transformers' `convert_moe_packed_tensors`: table look-up in `dtype`, then ldexp)."""
    table = torch.tensor(FP4_VALUES, dtype=dtype)
    rows, groups, width = blocks.shape
    out = torch.empty((rows * groups, width * 2), dtype=dtype)
    flat = blocks.reshape(rows * groups, width)
    out[:, 0::2] = table[(flat & 0x0F).to(torch.int)]
    out[:, 1::2] = table[(flat >> 4).to(torch.int)]
    torch.ldexp(out, scales.reshape(rows * groups, 1).to(torch.int32) - MXFP4_SCALE_BIAS, out=out)
    return out.reshape(rows, groups * width * 2)


def dequantize_mxfp4_rows(read_rows, pair: tuple[str, str], stored_shape, start: int, stop: int,
                          out: torch.Tensor) -> None:
    """Rows [start, stop) (of the leading dim, e.g. experts) of an MXFP4 tensor into `out`
    ([stop - start, G * 32, R]), one leading row at a time: memory stays at one expert."""
    blocks_name, scales_name = pair
    for row in range(start, stop):
        blocks = torch.empty((1, *stored_shape[1:]), dtype=torch.uint8)
        scales = torch.empty((1, *stored_shape[1:-1]), dtype=torch.uint8)
        read_rows(blocks_name, row, row + 1, blocks)
        read_rows(scales_name, row, row + 1, scales)
        out[row - start].copy_(dequantize_mxfp4(blocks[0], scales[0], out.dtype).t())
