"""The kernel-copy path: bytes that stay in their source file until something needs them.

Most of a conversion moves bytes unchanged: a renamed tensor, the rows of a column-parallel TP
shard, a QKV or gate/up row block, the vocabulary rows. Reading them into memory only to write
them out again costs two copies through user space; `copy_file_range` moves them from the source's
page cache to the target's inside the kernel (measured here: 0.55 s for 2.2 GB, against 2.1-6.6 s
for pread + write).

The loader, where it places a source byte range unchanged in a message (inside `placing()`),
records where the bytes are instead of reading them: a message then carries `deferred` segments
(arena offset, bytes, source file, file offset). In the saver the segments of the message at hand
are `Pending`: a writer asks `file_pieces()` and copies what is still in the files inside the
kernel; any other torch operation that would look at those bytes (a cast, a join, the gather of
a row-parallel shard, `.numpy()`) first reads them into the message's memory (`FillOnTouch`, a
TorchFunctionMode), so every code path that computes on a tensor sees its true bytes, and the
output is the same bytes with the path on or off (`--no-kernel-copy`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from modellink_ckpt.errors import ConvertError

# ---- loader side ------------------------------------------------------------------------------

_defer = {"on": False, "placing": 0, "base": 0, "size": 0, "segments": []}


def defer_reads(on: bool) -> None:
    """Whether this (loader) process may defer reads: only when the saver copies in the kernel."""
    _defer["on"] = on


def begin_message(buffer: torch.Tensor) -> None:
    """The arena the next message is built in (the loader's `Sender.arena()`)."""
    storage = buffer.untyped_storage()
    _defer.update(base=storage.data_ptr(), size=storage.nbytes(), segments=[])


def take_segments(buffer: torch.Tensor) -> list[tuple[int, int, str, int]]:
    """The deferred segments of the message built in `buffer` (sent with it)."""
    if buffer.untyped_storage().data_ptr() != _defer["base"]:
        return []
    segments, _defer["segments"] = _defer["segments"], []
    return segments


@contextlib.contextmanager
def placing():
    """Reads in here put source bytes unchanged into a message: they may be deferred. Only code
    that does nothing else with what it read may use it."""
    _defer["placing"] += 1
    try:
        yield
    finally:
        _defer["placing"] -= 1


def defer(path, offset: int, out: torch.Tensor) -> bool:
    """Record that `out` (arena memory) holds bytes [offset, offset + out.nbytes) of `path`,
    instead of reading them; False when the read must happen now."""
    if not (_defer["on"] and _defer["placing"]) or not out.nbytes or not out.is_contiguous():
        return False
    if out.untyped_storage().data_ptr() != _defer["base"]:
        return False  # not the message's memory (a scratch buffer the loader computes on)
    start, segments = out.data_ptr() - _defer["base"], _defer["segments"]
    path = str(path)
    if segments and segments[-1][2] == path and segments[-1][0] + segments[-1][1] == start \
            and segments[-1][3] + segments[-1][1] == offset:  # continues the previous one
        segments[-1] = (segments[-1][0], segments[-1][1] + out.nbytes, path, segments[-1][3])
    else:
        segments.append((start, out.nbytes, path, offset))
    return True


# ---- saver side -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRange:
    """Bytes [offset, offset + nbytes) of the file at `path`."""

    path: str
    offset: int
    nbytes: int


class Pending:
    """The deferred segments of the message the saver holds, over its arena's memory."""

    def __init__(self, storage: torch.UntypedStorage, segments):
        self.base = storage.data_ptr()
        self.memory = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        self.segments = sorted(segments)  # (arena start, bytes, path, file offset), disjoint
        self._starts = [s[0] for s in self.segments]
        self._files: dict[str, int] = {}

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() == self.base

    def _overlapping(self, start: int, end: int) -> range:
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        last = bisect.bisect_left(self._starts, end)
        return range(first, last)

    def fill(self, start: int = 0, end: int | None = None) -> None:
        """Read every segment that overlaps arena bytes [start, end) into memory; from then on
        they are memory like any other (a later write takes them from there)."""
        end = len(self.memory) if end is None else end
        hit = [i for i in self._overlapping(start, end)
               if self.segments[i][0] < end and self.segments[i][0] + self.segments[i][1] > start]
        for i in hit:
            at, nbytes, path, offset = self.segments[i]
            view, done = memoryview(self.memory)[at:at + nbytes], 0
            while done < nbytes:
                count = os.preadv(self._fd(path), [view[done:]], offset + done)
                if not count:

                    raise ConvertError(f"{path}: truncated (changed while it was being converted?)")
                done += count
        for i in reversed(hit):
            del self.segments[i], self._starts[i]

    def fill_tensor(self, tensor: torch.Tensor) -> None:
        self.fill(*_extent(tensor))

    def file_pieces(self, tensor: torch.Tensor) -> list | None:
        """A contiguous tensor of this message as [FileRange | memoryview] in order, or None when
        none of its bytes is still in a file."""
        if not self.segments or not self.holds(tensor) or not tensor.is_contiguous() or not tensor.nbytes:
            return None
        start, end = _extent(tensor)
        pieces, position = [], start
        for i in self._overlapping(start, end):
            at, nbytes, path, offset = self.segments[i]
            lo, hi = max(at, start), min(at + nbytes, end)
            if lo >= hi:
                continue
            if lo > position:
                pieces.append(memoryview(self.memory)[position:lo])
            pieces.append(FileRange(path, offset + lo - at, hi - lo))
            position = hi
        if position == start:
            return None
        if position < end:
            pieces.append(memoryview(self.memory)[position:end])
        return pieces

    def _fd(self, path: str) -> int:
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        return self._files[path]

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) of its storage that `tensor` spans."""
    first = tensor.storage_offset()
    span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) if tensor.numel() else 0
    return first * tensor.element_size(), (first + span) * tensor.element_size()


_current: list[Pending | None] = [None]
_saver = {"on": False, "inside": 0}  # fill on touch in this process; our own look at tensors under way


def receive(storage: torch.UntypedStorage | None, segments) -> None:
    """The saver took a message: its deferred segments are pending (read at once where this
    process does not fill on touch)."""
    release()
    if storage is None or not segments:
        return
    pending = Pending(storage, segments)
    if _saver["on"]:
        _current[0] = pending
    else:
        pending.fill()
        pending.close()


def release() -> None:
    """The message is handled (its memory goes back to the loader)."""
    if _current[0] is not None:
        _current[0].close()
        _current[0] = None


def file_pieces(tensor: torch.Tensor) -> list | None:
    """For a writer: `tensor` as file ranges and memory (see `Pending.file_pieces`), or None."""
    pending = _current[0]
    if pending is None:
        return None
    with _inside():
        return pending.file_pieces(tensor)


@contextlib.contextmanager
def _inside():
    """Our own look at tensors, which must not count as touching them."""
    _saver["inside"] += 1
    try:
        yield
    finally:
        _saver["inside"] -= 1


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


_T = torch.Tensor
# operations that only read a tensor's metadata
_METADATA = {_T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.layout.__get__, _T.ndim.__get__,
             _T.nbytes.__get__, _T.itemsize.__get__, _T.requires_grad.__get__, _T.is_quantized.__get__,
             _T.is_sparse.__get__, _T.is_nested.__get__, _T.is_leaf.__get__, _T.grad_fn.__get__,
             _T._backward_hooks.__get__, _T.size, _T.stride, _T.dim, _T.numel, _T.element_size,
             _T.is_contiguous, _T.storage_offset, _T.data_ptr, _T.is_floating_point, _T.__len__}
# operations whose result is normally a view (no byte read); one that copies is redone after a fill
_VIEWS = {_T.__getitem__, _T.view, _T.view_as, _T.reshape, _T.reshape_as, _T.narrow, _T.select, _T.split,
          _T.split_with_sizes, _T.chunk, _T.unbind, _T.tensor_split, _T.t, _T.transpose, _T.permute,
          _T.movedim, _T.unsqueeze, _T.squeeze, _T.flatten, _T.unflatten, _T.expand, _T.expand_as,
          _T.as_strided, _T.contiguous, _T.detach, _T.to, torch.narrow, torch.split, torch.chunk, torch.unbind,
          torch.tensor_split, torch.transpose, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
          torch.t, torch.permute, torch.select, torch.movedim, torch.detach}


class FillOnTouch(TorchFunctionMode):
    """Reads a message's deferred bytes into memory before any torch operation looks at them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pending = _current[0]
        if pending is None or not pending.segments or _saver["inside"] or func in _METADATA:
            return func(*args, **kwargs)
        touched = [t for t in _tensors((args, kwargs)) if pending.holds(t)]
        if not touched:
            return func(*args, **kwargs)
        if func in _VIEWS:
            result = func(*args, **kwargs)
            if all(pending.holds(t) for t in _tensors(result)):
                return result  # views only: nothing was read
        if func is _T.untyped_storage:  # the caller may read any byte of the storage
            pending.fill()
        else:
            for tensor in touched:
                pending.fill_tensor(tensor)
        return func(*args, **kwargs)


@contextlib.contextmanager
def saver_fills_on_touch(on: bool):
    """Run a saver with deferred bytes kept in their files until touched (or, off, read at once)."""
    _saver["on"] = on
    if not on:
        yield
        return
    with FillOnTouch():
        try:
            yield
        finally:
            release()
