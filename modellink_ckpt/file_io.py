"""Moving tensor bytes between memory and files, with no copy on the way.

`HashedFile` is an output file that hashes what it writes (the sha256 goes to the manifest;
hashing runs on a second thread while the bytes are written, both release the GIL) and names
itself in every write error. `FileReader` reads byte ranges straight into a tensor's memory.
"""

from __future__ import annotations

import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError

# Writes go out in 256 KiB pieces: measured on Linux 6.x, one large write(2) makes the kernel
# build large page-cache folios, which on a VM with free-page reporting costs ~5x more system
# time (0.3-0.5 GB/s) than 256 KiB writes (2.4-3.4 GB/s) -- see bench/README.md.
_CHUNK = 256 << 10
_READ_CHUNK = 64 << 20
_THREAD_MIN = 64 << 10  # below this, handing the hash to the thread costs more than it saves
_executors: dict[int, ThreadPoolExecutor] = {}


def _hasher_thread() -> ThreadPoolExecutor:
    """One hashing thread per process (created after fork, never inherited)."""
    pid = os.getpid()
    if pid not in _executors:
        _executors[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    return _executors[pid]


def write_error(path: Path, exc: OSError) -> ConvertError:
    if exc.errno == errno.ENOSPC:
        return ConvertError(f"{path}: no space left on device (the partial output has been removed)")
    return ConvertError(f"{path}: cannot write ({exc.strerror or exc})")


class HashedFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if not len(view):
            return
        hashed = _hasher_thread().submit(self._sha.update, view) if len(view) >= _THREAD_MIN else None
        if hashed is None:
            self._sha.update(view)
        try:
            for start in range(0, len(view), _CHUNK):
                chunk = view[start:start + _CHUNK]
                while len(chunk):
                    chunk = chunk[os.write(self._fd, chunk):]
        except OSError as exc:
            raise write_error(self.path, exc) from None
        finally:
            if hashed is not None:
                hashed.result()  # the view must outlive the hashing
        self.size += len(view)

    def close(self) -> tuple[int, str]:
        """Close the file; returns (bytes, sha256 hex)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError as exc:
                raise write_error(self.path, exc) from None
            self._fd = None
        return self.size, self._sha.hexdigest()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


_scratch: dict[int, torch.Tensor] = {}


def scratch_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """A per-process buffer, reused (freshly faulted-in memory costs more than the copy into it).
    Valid until the next call in the same process."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    pid = os.getpid()
    buffer = _scratch.get(pid)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _scratch[pid] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    return buffer[:nbytes].view(dtype).view(shape)


def tensor_bytes(tensor: torch.Tensor):
    """The bytes of `tensor` in row-major order, for writing: a contiguous tensor gives its own
    memory; a strided view (a row-parallel TP shard) is gathered into the scratch buffer."""
    if tensor.is_contiguous():
        return tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
    gathered = scratch_tensor(tensor.shape, tensor.dtype).copy_(tensor)
    return gathered.reshape(-1).view(torch.uint8).numpy()


def sha256_of(path: str | Path) -> tuple[int, str]:
    """(bytes, sha256 hex) of an existing file, read in chunks (constant memory)."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(_READ_CHUNK)
            if not block:
                return size, sha.hexdigest()
            sha.update(block)
            size += len(block)


class FileReader:
    """Positional reads of one file into tensors, with one descriptor per process (kept open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: tuple[int, int] | None = None

    def read_into(self, offset: int, out: torch.Tensor, what: str = "a tensor") -> None:
        if self._fd is None or self._fd[1] != os.getpid():
            self._fd = (os.open(self.path, os.O_RDONLY), os.getpid())
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.nbytes else memoryview(b"")
        done = 0
        while done < len(view):
            count = os.preadv(self._fd[0], [view[done:]], offset + done)
            if not count:
                raise ConvertError(f"{self.path}: truncated while reading {what}")
            done += count

    def __getstate__(self):  # a descriptor never crosses a process boundary
        return {"path": self.path, "_fd": None}
