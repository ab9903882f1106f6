"""`bench_convert.py --plot FILE.png`: the table as a chart, with no plotting library.

Left: throughput (GB/s) of every step as a bar, the `cp -r` floor as a line across. Right: the
`--workers` scaling of each shared step against the ideal line. Drawn into a numpy image with a
3x5 pixel font and written as a PNG (zlib + the chunk format, nothing else).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

# 3x5 glyphs, rows top to bottom, 3 bits each (4 = left pixel)
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 2, 2, 2), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7),
    "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2),
    "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2),
    "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
    "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2),
    "Z": (7, 1, 2, 4, 7), " ": (0, 0, 0, 0, 0), ".": (0, 0, 0, 0, 2), ",": (0, 0, 0, 2, 4), ":": (0, 2, 0, 2, 0),
    "-": (0, 0, 7, 0, 0), ">": (4, 2, 1, 2, 4), "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4), "/": (1, 1, 2, 4, 4),
    "=": (0, 7, 0, 7, 0), "%": (5, 1, 2, 4, 5),
}
_SCALE = 2  # pixels per font pixel
_COLORS = {"ink": (40, 40, 40), "bar": (70, 110, 180), "floor": (200, 60, 60), "grid": (225, 225, 225),
           "ideal": (160, 160, 160), "curve": (40, 150, 90)}


class Canvas:
    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        h, w, _ = self.pixels.shape
        x0, x1 = sorted((max(0, min(w, int(x0))), max(0, min(w, int(x1)))))
        y0, y1 = sorted((max(0, min(h, int(y0))), max(0, min(h, int(y1)))))
        self.pixels[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = _COLORS.get(color, color)

    def line(self, x0, y0, x1, y1, color, width: int = 2) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for t in np.linspace(0.0, 1.0, steps + 1):
            x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
            self.rect(x - width // 2, y - width // 2, x + (width + 1) // 2, y + (width + 1) // 2, color)

    def text(self, x: int, y: int, text: str, color="ink") -> int:
        """Draw `text` (upper-cased; unknown characters as spaces) at (x, y); returns its width."""
        text = text.upper().replace("→", ">").replace("×", "X")
        for i, char in enumerate(text):
            rows = _FONT.get(char, _FONT[" "])
            for r, bits in enumerate(rows):
                for c in range(3):
                    if bits & (4 >> c):
                        px, py = x + (i * 4 + c) * _SCALE, y + r * _SCALE
                        self.rect(px, py, px + _SCALE, py + _SCALE, color)
        return len(text) * 4 * _SCALE

    def png(self) -> bytes:
        height, width, _ = self.pixels.shape
        raw = b"".join(b"\x00" + self.pixels[row].tobytes() for row in range(height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + \
            chunk(b"IEND", b"")


def _rate(result: dict) -> float:
    return result["bytes"] / 1e9 / max(result["wall_s"], 1e-9)


def render(results: list[dict], title: str) -> bytes:
    """The chart of one benchmark run (the `steps` of its JSON record) as PNG bytes."""
    ok = [r for r in results if r.get("status") == "ok" and "wall_s" in r]
    floor = next((r for r in ok if r["step"] == "copy"), None)
    canvas = Canvas(1000, 460)
    canvas.text(20, 12, title)
    # left: GB/s per step
    left, top, width, row = 20, 50, 560, 26
    top_rate = max([_rate(r) for r in ok] + [1e-9])
    canvas.text(left, top - 16, "GB/S PER STEP (LINE: CP -R)")
    for i, r in enumerate(ok):
        y = top + i * row
        bar = width * _rate(r) / top_rate
        canvas.rect(left + 250, y, left + 250 + bar * 0.55, y + row - 8, "bar")
        canvas.text(left, y + 4, r["label"][:30])
        canvas.text(left + 256 + bar * 0.55, y + 4, f"{_rate(r):.2f}")
    if floor:
        x = left + 250 + width * _rate(floor) / top_rate * 0.55
        canvas.line(x, top - 4, x, top + len(ok) * row, "floor")
    # right: speedup against workers, per shared step
    shared: dict[str, list] = {}
    for r in ok:
        if "workers" in r:
            shared.setdefault(r["label"].rsplit(",", 1)[0], []).append(r)
    curves = {label: sorted(runs, key=lambda r: r["workers"]) for label, runs in shared.items() if len(runs) > 1}
    x0, y0, size = 640, 400, 320
    canvas.text(x0, 34, "SPEEDUP VS WORKERS (GREY: IDEAL)")
    canvas.line(x0, y0, x0 + size, y0, "ink", 1)
    canvas.line(x0, y0, x0, y0 - size, "ink", 1)
    most = max([r["workers"] for runs in curves.values() for r in runs] + [2])
    scale = size / most
    canvas.line(x0 + scale, y0 - scale, x0 + most * scale, y0 - most * scale, "ideal", 1)
    for n in range(1, most + 1):
        canvas.text(x0 + n * scale - 3, y0 + 8, str(n))
        canvas.text(x0 - 16, y0 - n * scale - 5, str(n))
    for k, (label, runs) in enumerate(curves.items()):
        one = next((r for r in runs if r["workers"] == 1), runs[0])
        points = [(x0 + r["workers"] * scale, y0 - one["wall_s"] / r["wall_s"] * scale) for r in runs]
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            canvas.line(xa, ya, xb, yb, "curve")
        canvas.text(x0 + 8, 50 + k * 14, label[:36], "curve")
    return canvas.png()
