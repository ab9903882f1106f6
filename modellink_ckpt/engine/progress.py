"""Progress of long work: a bar on a terminal, a few plain lines in a log.

A bar redraws itself with carriage returns, which a log file keeps as one ever-growing line; so
a bar is drawn only when stderr is a terminal. Elsewhere (a job's log, `2> file`, a pipe) the
same progress is a plain line at every tenth of the work and at its end.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

PLAIN_STEPS = 10  # lines a plain progress writes at most (besides its last)


class PlainProgress:
    """tqdm's `update` / `close` (and iteration), written as "desc: 8/32 layers (25%), 1.2 s" lines."""

    def __init__(self, iterable=None, *, total: int | None, desc: str, unit: str):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.done, self.started, self._next, self._closed = 0, time.monotonic(), 1, False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def _line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        return f"{self.desc}: {self.done}{total} {self.unit}s{share}, {time.monotonic() - self.started:.1f} s"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.total and self.done < self.total and self.done * PLAIN_STEPS >= self._next * self.total:
            self._next = self.done * PLAIN_STEPS // self.total + 1
            print(self._line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self._closed and self.done:
            print(self._line(), file=sys.stderr, flush=True)
        self._closed = True


def progress(iterable=None, *, total: int | None = None, desc: str, unit: str, quiet: bool = False):
    """A progress bar (stderr a terminal) or plain lines (anything else); nothing when `quiet`."""
    if quiet:
        return tqdm(iterable, total=total, disable=True)
    if not sys.stderr.isatty():
        return PlainProgress(iterable, total=total, desc=desc, unit=unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit)
