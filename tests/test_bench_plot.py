"""bench/plot.py draws the benchmark table as a PNG with no plotting library: a valid image of the
planned size, with bars, the copy line and the scaling curve in their colours."""

import struct
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import plot  # noqa: E402


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", png[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + data)
        chunks[kind] = data
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].reshape(height, width, 3)


def test_chart_has_bars_floor_and_scaling_curve():
    steps = [
        {"step": "copy", "label": "cp -r HF (floor)", "status": "ok", "wall_s": 1.0, "bytes": 2e9},
        {"step": "hf2mg", "label": "hf→mg TP2PP2, 1 worker", "status": "ok", "wall_s": 4.0, "bytes": 2e9, "workers": 1},
        {"step": "hf2mg", "label": "hf→mg TP2PP2, 2 workers", "status": "ok", "wall_s": 2.5, "bytes": 2e9, "workers": 2},
        {"step": "mg2hf", "label": "mg→hf", "status": "FAILED"},
    ]
    image = _decode(plot.render(steps, "test"))
    assert image.shape == (460, 1000, 3)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    for name in ("bar", "floor", "curve", "ideal", "ink"):
        assert plot._COLORS[name] in colours, name
