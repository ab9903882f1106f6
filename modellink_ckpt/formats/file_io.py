"""Moving tensor bytes between memory and files, with no copy on the way.

`HashedFile` is an output file that hashes what it writes (the digest goes to the manifest;
hashing runs on a second thread while the bytes are written, both release the GIL) and names
itself in every write error. `FileReader` reads byte ranges straight into a tensor's memory.

Digests are `"<algorithm>:<hex>"`: BLAKE3 by default (about 5x sha256 on one core, measured 5.9
against 1.3 GB/s here, so hashing stays off the critical path), sha256 on request (`--hash`).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.formats import kernel_copy

# Writes go out in 256 KiB pieces: measured on Linux 6.x, one large write(2) makes the kernel
# build large page-cache folios, which on a VM with free-page reporting costs ~5x more system
# time (0.3-0.5 GB/s) than 256 KiB writes (2.4-3.4 GB/s) -- see bench/README.md.
_CHUNK = 256 << 10
_READ_CHUNK = 64 << 20
_THREAD_MIN = 64 << 10  # below this, handing the hash to the thread costs more than it saves
_MAP_WINDOW = 64 << 20  # a kernel-copied range is hashed through a map of at most this many bytes at a time
_executors: dict[int, ThreadPoolExecutor] = {}
# errors of copy_file_range that mean "not between these files": the bytes go through memory instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
kernel_copied = [0]  # bytes this process copied file to file inside the kernel


def _hasher_thread() -> ThreadPoolExecutor:
    """One hashing thread per process (created after fork, never inherited)."""
    pid = os.getpid()
    if pid not in _executors:
        _executors[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
    return _executors[pid]


def _blake3(parallel: bool = False):
    import blake3  # imported on first use: start-up stays lean

    # BLAKE3 is a tree: one large update can be split over every core. Only where nothing else
    # runs beside it (a whole file hashed after the fact); a saver's hashing thread already runs
    # beside its writes, one core each.
    return blake3.blake3(max_threads=blake3.blake3.AUTO if parallel else 1)


def _sha256(parallel: bool = False):
    return hashlib.sha256()  # a chain: no parallel form


HASHES = {"blake3": _blake3, "sha256": _sha256}
DEFAULT_HASH = "blake3" if importlib.util.find_spec("blake3") else "sha256"
_hash_in_use = [DEFAULT_HASH]


def use_hash(algorithm: str) -> None:
    """The algorithm of every digest this process makes from now on (a saver sets its plan's)."""
    if algorithm not in HASHES:
        raise ConvertError(f"--hash {algorithm}: unknown (known: {', '.join(HASHES)})")
    _hash_in_use[0] = algorithm


def new_hash(algorithm: str | None = None, parallel: bool = False):
    """(algorithm, a fresh hash object) for `algorithm` or the one in use; `parallel`: one that
    may spread a large update over every core."""
    algorithm = algorithm or _hash_in_use[0]
    try:
        return algorithm, HASHES[algorithm](parallel)
    except ImportError:
        raise ConvertError(f"{algorithm}: the package is not installed (pip install {algorithm}), "
                           f"or pass --hash sha256") from None


def split_digest(digest: str) -> tuple[str, str]:
    """("blake3", hex) of a digest string; a bare hex string is sha256 (older manifests)."""
    algorithm, sep, value = digest.partition(":")
    return (algorithm, value) if sep else ("sha256", digest)


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
        self._algorithm, self._hash = new_hash()
        self.size = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if not len(view):
            return
        hashed = _hasher_thread().submit(self._hash.update, view) if len(view) >= _THREAD_MIN else None
        if hashed is None:
            self._hash.update(view)
        try:
            self._write_unhashed(view)
        finally:
            if hashed is not None:
                hashed.result()  # the view must outlive the hashing

    def _write_unhashed(self, view: memoryview) -> None:
        try:
            for start in range(0, len(view), _CHUNK):
                chunk = view[start:start + _CHUNK]
                while len(chunk):
                    chunk = chunk[os.write(self._fd, chunk):]
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self.size += len(view)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        """A tensor's bytes in row-major order: the parts still in their source file (the
        kernel-copy path) copied file to file, the rest from memory."""
        pieces = kernel_copy.file_pieces(tensor)
        if pieces is None:
            self.write(tensor_bytes(tensor))
            return
        for piece in pieces:
            if isinstance(piece, kernel_copy.FileRange):
                self.copy_range(piece)
            else:
                self.write(piece)

    def copy_range(self, source: "kernel_copy.FileRange") -> None:
        """Append bytes of another file: inside the kernel where the two files allow it, hashed
        meanwhile from a read-only map of the source (its page cache: no copy either)."""
        src = _source_fd(source.path)
        hashed = _hasher_thread().submit(_hash_file_range, self._hash, src, source.offset, source.nbytes)
        try:
            if not _copy_in_kernel(src, self._fd, source, self.path):
                _copy_through_memory(src, source, lambda done, view: self._write_unhashed(view))
            else:
                self.size += source.nbytes
        finally:
            hashed.result()

    def close(self) -> tuple[int, str]:
        """Close the file; returns (bytes, digest)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError as exc:
                raise write_error(self.path, exc) from None
            self._fd = None
        return self.size, f"{self._algorithm}:{self._hash.hexdigest()}"

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


class PositionalFile:
    """An existing file (planned at its full size) written at given offsets, unhashed: several
    processes fill their parts of it side by side."""

    def __init__(self, path: str | Path, size: int):
        """Open `path`, made if missing, at `size` bytes (never truncating what others wrote)."""
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def write_tensor_at(self, offset: int, tensor: torch.Tensor) -> int:
        """Write `tensor`'s bytes at `offset` (the parts still in a source file copied in the
        kernel, as `HashedFile.write_tensor`); returns the bytes written."""
        pieces = kernel_copy.file_pieces(tensor)
        start = offset
        for piece in ([memoryview(tensor_bytes(tensor)).cast("B")] if pieces is None else pieces):
            if isinstance(piece, kernel_copy.FileRange):
                src = _source_fd(piece.path)
                if not _copy_in_kernel(src, self._fd, piece, self.path, offset):
                    _copy_through_memory(src, piece, lambda done, view, at=offset: self.write_at(at + done, view))
                offset += piece.nbytes
            else:
                view = memoryview(piece).cast("B")
                self.write_at(offset, view)
                offset += len(view)
        return offset - start

    def write_at(self, offset: int, view: memoryview) -> None:
        try:
            for start in range(0, len(view), _CHUNK):
                chunk = view[start:start + _CHUNK]
                while len(chunk):
                    written = os.pwrite(self._fd, chunk, offset + start)
                    chunk, start = chunk[written:], start + written
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _copy_in_kernel(src: int, dst: int, source: "kernel_copy.FileRange", dst_path: Path,
                    dst_offset: int | None = None) -> bool:
    """Copy a file range into `dst` (at its position, or at `dst_offset`) inside the kernel;
    False, with nothing copied, where the kernel refuses these two files."""
    done = 0
    while done < source.nbytes:
        try:
            count = os.copy_file_range(src, dst, source.nbytes - done, source.offset + done,
                                       None if dst_offset is None else dst_offset + done)
        except OSError as exc:
            if exc.errno in _NO_KERNEL_COPY and done == 0:
                return False
            raise write_error(dst_path, exc) from None
        if not count:
            raise ConvertError(f"{source.path}: truncated (changed while it was being converted?)")
        done += count
    kernel_copied[0] += done
    return True


def _copy_through_memory(src: int, source: "kernel_copy.FileRange", write) -> None:
    """A file range read into memory a chunk at a time and given to `write(position in the range,
    bytes)` (where the kernel refused to copy: another file system, an old kernel)."""
    buffer = scratch_tensor((min(source.nbytes, _READ_CHUNK),), torch.uint8).numpy()
    done = 0
    while done < source.nbytes:
        count = os.preadv(src, [memoryview(buffer)[:source.nbytes - done]], source.offset + done)
        if not count:
            raise ConvertError(f"{source.path}: truncated (changed while it was being converted?)")
        write(done, memoryview(buffer)[:count])
        done += count


_sources: dict[tuple[int, str], int] = {}


def _source_fd(path: str) -> int:
    """A read-only descriptor of a source file, one per process, kept open."""
    key = (os.getpid(), path)
    if key not in _sources:
        try:
            _sources[key] = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ConvertError(f"{path}: cannot read ({exc.strerror})") from None
    return _sources[key]


def _hash_file_range(hasher, fd: int, offset: int, nbytes: int) -> None:
    """Feed bytes [offset, offset + nbytes) of a file to `hasher` through read-only maps of a
    window at a time (the source's page cache itself, so memory does not grow with the range)."""
    position, end = offset, offset + nbytes
    while position < end:
        start = position - position % mmap.ALLOCATIONGRANULARITY
        length = min(end, start + _MAP_WINDOW) - start
        with mmap.mmap(fd, length, offset=start, prot=mmap.PROT_READ) as window:
            with memoryview(window) as view, view[position - start:length] as part:
                hasher.update(part)
        position = start + length


_scratch: dict[tuple[int, str], torch.Tensor] = {}


def scratch_tensor(shape, dtype: torch.dtype, slot: str = "gather") -> torch.Tensor:
    """A per-process buffer, reused (freshly faulted-in memory costs more than the copy into it).
    Valid until the next call for the same `slot` in the same process."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    key = (os.getpid(), slot)
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _scratch[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    return buffer[:nbytes].view(dtype).view(shape)


def tensor_bytes(tensor: torch.Tensor):
    """The bytes of `tensor` in row-major order, for writing: a contiguous tensor gives its own
    memory; a strided view (a row-parallel TP shard) is gathered into the scratch buffer."""
    if tensor.is_contiguous():
        return tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
    gathered = scratch_tensor(tensor.shape, tensor.dtype).copy_(tensor)
    return gathered.reshape(-1).view(torch.uint8).numpy()


def file_digest(path: str | Path, algorithm: str | None = None) -> tuple[int, str]:
    """(bytes, digest) of an existing file, through maps of a window at a time (constant memory),
    on every core where the algorithm allows (the parent's hashing of files several workers wrote,
    `--verify`)."""
    algorithm, hasher = new_hash(algorithm, parallel=True)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        _hash_file_range(hasher, f.fileno(), 0, size)
    return size, f"{algorithm}:{hasher.hexdigest()}"


_first_read: list[float | None] = [None]  # wall-clock time of this process's first read of checkpoint bytes


def first_read_time() -> float | None:
    return _first_read[0]


class FileReader:
    """Positional reads of one file into tensors, with one descriptor per process (kept open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: tuple[int, int] | None = None

    def read_into(self, offset: int, out: torch.Tensor, what: str = "a tensor") -> None:
        if self._fd is None or self._fd[1] != os.getpid():
            self._fd = (os.open(self.path, os.O_RDONLY), os.getpid())
        if _first_read[0] is None:
            _first_read[0] = time.time()
        if kernel_copy.defer(self.path, offset, out):
            return  # the saver copies these bytes file to file (or reads them when it needs them)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.nbytes else memoryview(b"")
        done = 0
        while done < len(view):
            count = os.preadv(self._fd[0], [view[done:]], offset + done)
            if not count:
                raise ConvertError(f"{self.path}: truncated while reading {what}")
            done += count

    def __getstate__(self):  # a descriptor never crosses a process boundary
        return {"path": self.path, "_fd": None}
