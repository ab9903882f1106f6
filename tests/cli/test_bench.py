"""The benchmark's own arithmetic and drawing: the scaling table's steady rates, cores busy and
ceiling; bench/plot.py's PNG (no plotting library), a valid image of the planned size with bars,
the copy line and the scaling curve in their colours."""

import struct
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_convert  # noqa: E402
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


def _step(workers, wall, first_byte, cpu):
    return {"step": "mg2mg", "label": f"mg→mg TP2PP2→TP1PP2, {workers} worker(s)", "status": "ok", "kernel_copy": True,
            "workers": workers, "wall_s": wall, "first_byte_s": first_byte, "cpu_s": cpu, "bytes": 2e9}


def test_scaling_table_gives_the_ceiling_the_cores_allow():
    one, two = _step(1, 5.0, 1.0, 1.0 + 1.6 * 4.0), _step(2, 4.0, 1.0, 1.0 + 1.9 * 3.0)
    rate, busy = bench_convert.steady(one)
    assert (round(rate, 6), round(busy, 6)) == (0.5, 1.6)  # 2 GB over the 4 s after start-up, 1.6 cores
    rows = bench_convert.scaling_table([one, two], cores=2).splitlines()[2:]
    # steady × 1 worker 0.6667 / 0.5; ceiling min(2, 2 cores / 1.6) = 1.25
    assert rows[1] == "| mg→mg TP2PP2→TP1PP2 | 2 | 4.00 | 0.50 | 1.25 | 0.67 | 1.33 | 1.90 | 1.25 |"
    assert bench_convert.scaling_table([one, two], cores=16).splitlines()[3].endswith("| 2.00 |")  # min(W, …)


def test_steady_state_is_unknown_without_a_first_byte():
    assert bench_convert.steady(_step(1, 5.0, None, 6.0)) == (None, None)
    row = {**_step(1, 5.0, None, None), "peak_rss": 1e9, "peak_pss": 5e8}
    assert "| 5.00 | – | 0.40 | – | – | – | 1.00 GB |" in bench_convert.table([row], copy_wall=None)


def test_cores_busy_is_not_guessed_from_a_steady_state_too_short_to_measure():
    assert bench_convert.steady(_step(1, 2.5, 2.0, 2.2))[1] is None  # 0.5 s after start-up
    assert bench_convert.steady(_step(1, 4.0, 2.0, 1.5))[1] is None  # less CPU than the start-up took
