"""The loader and saver processes and the queue between them.

The loader streams `meta`, `embeddings`, one `layer` message per model layer, `final_norm`,
`output_layer` and `done`. Tensors travel in a few shared-memory arenas that the loader reuses
once the saver acknowledges a message: at most `--max-queue-size` messages and `--max-queue-gb`
bytes (but always two messages) are in flight, whatever the model size. An arena is a sparse
`memfd` mapped by both processes (sent once, then tensors travel as offsets): a page costs memory
only once written, so bytes the kernel-copy path leaves in their files cost none, and a message
as large as a DeepSeek-V3 layer (22.5 GB) fits in a machine with less memory than that. If either process fails,
the parent stops the other at once and reports the cause as one line.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import resource
import signal
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.connection import wait
from multiprocessing.reduction import DupFd
from typing import Callable, Iterator

import torch
import torch.multiprocessing as mp

from modellink_ckpt.engine.staging import pid_alive
from modellink_ckpt.errors import ConvertError, Interrupted, Terminated
from modellink_ckpt.formats import file_io, kernel_copy
from modellink_ckpt.formats.file_io import first_read_time, use_hash
from modellink_ckpt.formats.safetensors_io import shared_empty

MESSAGE_KINDS = ("meta", "embeddings", "layer", "final_norm", "output_layer", "mtp_layer", "done")


class Message(dict):
    """One queue message: `kind`, optional `layer` (HF index) and `tensors` (whole Megatron tensors)."""

    @property
    def kind(self) -> str:
        return self["kind"]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.get("tensors", {})


_ALIGN = 64


class Arena:
    """The memory of one message: a shared buffer carved into tensors, reused after the saver's ack.

    Reusing a few buffers instead of allocating every tensor anew matters: freshly faulted-in
    memory costs more than the copy into it. Both processes map each buffer once.
    """

    def __init__(self, index: int, buffer: torch.Tensor):
        self.index, self.buffer, self.used = index, buffer, 0

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        start = -(-self.used // _ALIGN) * _ALIGN
        if start + nbytes > self.buffer.numel():  # larger than planned (mixed dtypes): a one-off buffer
            return shared_empty(nbytes).view(dtype).reshape(shape)
        self.used = start + nbytes
        return self.buffer[start:start + nbytes].view(dtype).reshape(shape)

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()


def sparse_shared(nbytes: int) -> tuple[torch.Tensor, int]:
    """(a uint8 tensor over a new memfd of `nbytes`, the memfd): zero pages that take memory only
    once written (torch's own shared allocator populates every page when it creates one)."""
    fd = os.memfd_create("modellink-arena", os.MFD_CLOEXEC)
    os.ftruncate(fd, nbytes)
    return _mapped(fd, nbytes), fd


def _mapped(fd: int, nbytes: int) -> torch.Tensor:
    with warnings.catch_warnings():  # torch warns that an mmap is not a bytearray; it is writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8)


def message_bytes(tensor_sizes) -> int:
    """Arena bytes for a message whose tensors have these byte sizes (with alignment)."""
    return sum(-(-n // _ALIGN) * _ALIGN for n in tensor_sizes)


class Sender:
    """The loader's end. `arena()` gives the memory for the next message, blocking until the saver
    has released one: at most `count` messages (and their bytes) are ever in flight."""

    def __init__(self, queue, acks, max_messages: int, max_bytes: int):
        self._queue, self._acks = queue, acks
        self._max_messages, self._max_bytes = max_messages, max_bytes
        self._buffers: list[torch.Tensor] = []
        self._fds: list[int | None] = []
        self._free: list[int] = []
        self._in_flight = 0
        self._arena_bytes = 0
        self._sent_arenas: set[int] = set()

    def plan(self, largest_message_bytes: int) -> None:
        """Size the arenas once the loader knows its largest message."""
        self._arena_bytes = max(largest_message_bytes, _ALIGN)
        count = max(2, min(self._max_messages, self._max_bytes // self._arena_bytes))
        self._free = list(range(count))
        self._buffers = [None] * count
        self._fds = [None] * count

    def arena(self) -> Arena:
        if not self._buffers:
            raise RuntimeError("Sender.plan() must be called before the first arena")
        while not self._free:
            self._release(self._acks.get())
        index = self._free.pop(0)
        if self._buffers[index] is None:
            self._buffers[index], self._fds[index] = sparse_shared(self._arena_bytes)
        kernel_copy.begin_message(self._buffers[index])
        return Arena(index, self._buffers[index])

    def _release(self, index) -> None:
        self._in_flight -= 1
        if index is not None:
            self._free.append(index)

    def send(self, kind: str, tensors: dict[str, torch.Tensor] | None = None, arena: Arena | None = None,
             **info) -> None:
        assert kind in MESSAGE_KINDS, kind
        tensors, placed = dict(tensors or {}), {}
        if tensors:
            arena = arena or self.arena()
            for name, tensor in list(tensors.items()):
                if not arena.holds(tensor):  # a tensor made elsewhere: copy it into the message's memory
                    tensor = arena.alloc(tensor.shape, tensor.dtype).copy_(tensor)
                if arena.holds(tensor):  # travels as its place in the arena
                    placed[name] = (tensor.data_ptr() - arena.buffer.data_ptr(), tuple(tensor.shape),
                                    tuple(tensor.stride()), tensor.dtype)
                    del tensors[name]
                else:  # a one-off buffer (larger than planned): torch shares it
                    tensors[name] = tensor
        message = Message(kind=kind, tensors=tensors, arena=arena.index if arena else None, **info)
        if placed:
            message["placed"] = placed
            if arena.index not in self._sent_arenas:  # the saver maps each arena once
                self._sent_arenas.add(arena.index)
                message["arena_fd"] = (DupFd(self._fds[arena.index]), arena.buffer.numel())
        if arena is not None:  # bytes left in their source files, for the saver to copy or read
            message["deferred"] = kernel_copy.take_segments(arena.buffer)
        self._queue.put(message)
        self._in_flight += 1
        if kind == "done":
            # Shared memory travels as file descriptors that this process hands out on request:
            # stay alive until the saver has taken every message.
            while self._in_flight:
                self._release(self._acks.get())


class Receiver:
    """The saver's end: yields messages in order and acknowledges each once handled."""

    def __init__(self, queue, acks):
        self._queue, self._acks = queue, acks
        self._arenas: dict[int, torch.Tensor] = {}  # mapped once, reused by every message in them

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self._queue.get()
            storage = None
            if "arena_fd" in message:
                handle, nbytes = message.pop("arena_fd")
                fd = handle.detach()
                self._arenas[message["arena"]] = _mapped(fd, nbytes)
                os.close(fd)  # the mapping keeps the memory
            if "placed" in message:
                arena = self._arenas[message["arena"]]
                storage = arena.untyped_storage()
                for name, (offset, shape, stride, dtype) in message.pop("placed").items():
                    message["tensors"][name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize,
                                                                                   shape, stride)
            kernel_copy.receive(storage, message.pop("deferred", None))
            if message.kind == "done":  # acknowledged first: a saver may stop iterating at "done"
                self._acks.put(None)
                yield message
                return
            yield message
            kernel_copy.release()  # the message's memory goes back to the loader
            self._acks.put(message.get("arena"))


def _die_with_parent(caller: int) -> None:
    """Linux: get SIGKILL when the parent dies, so no orphan keeps writing. The caller may have
    died before this was armed: then stop at once."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass
    if not pid_alive(caller):
        os._exit(1)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _quiet_thread_errors() -> None:
    """Errors in helper threads (e.g. multiprocessing's descriptor server when the other process
    died) are consequences: the parent reports the cause as one line."""
    if not os.environ.get("CONVERT_CKPT_DEBUG"):
        sys.excepthook = lambda *args: None
        threading.excepthook = lambda args: None
    sys.unraisablehook = _unraisable


def _unraisable(unraisable) -> None:
    """The parent's stop (SIGTERM -> SystemExit) can land inside a finalizer (a progress bar's
    __del__), where Python only prints it and carries on: exit for real, without the printout
    (the parent removes what the stopped process had staged)."""
    if isinstance(unraisable.exc_value, SystemExit):
        os._exit(unraisable.exc_value.code if isinstance(unraisable.exc_value.code, int) else 1)
    if os.environ.get("CONVERT_CKPT_DEBUG"):
        sys.__unraisablehook__(unraisable)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_child(role: str, work: Callable, plan, channel, errors, results, caller: int) -> None:
    _die_with_parent(caller)
    _quiet_thread_errors()
    # Being stopped by the parent raises SystemExit here, so the saver's cleanup still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held back by a forking parent
    # Two processes share the machine with the saver's hashing thread: torch's own thread pool
    # would only spin against them (measured: slower, not faster). Tensors are long-lived and
    # few, so the cyclic garbage collector only costs time.
    torch.set_num_threads(1)
    gc.disable()  # the parent decides; Ctrl-C reaches it too
    use_hash(plan.run.hash_algorithm)  # a forkserver child starts with the default
    copying = plan.run.kernel_copy
    kernel_copy.defer_reads(copying and role.startswith("loader"))
    try:
        with kernel_copy.saver_fills_on_touch(copying and role.startswith("saver")):
            outcome = work(plan, channel) or {}
        outcome["peak_rss"] = _peak_rss_bytes()
        outcome["kernel_copied"] = file_io.kernel_copied[0]
        outcome["first_read"] = first_read_time()
        results.put((role, outcome))
    except ConvertError as exc:
        errors.put((role, f"{exc} ({role})" if " of worker " in role else str(exc)))  # which of several
        sys.exit(1)
    except MemoryError:
        errors.put((role, f"{role} ran out of memory"))
        sys.exit(1)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        errors.put((role, f"{where}{exc.strerror or exc}"))
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException as exc:  # an internal error: one line, the traceback only on request
        if os.environ.get("CONVERT_CKPT_DEBUG"):
            traceback.print_exc()
        errors.put((role, f"internal error in the {role}: {type(exc).__name__}: {exc} "
                          f"(set CONVERT_CKPT_DEBUG=1 for the traceback)"))
        sys.exit(1)


def _stop(processes) -> None:
    processes = [p for p in processes if p.pid is not None]  # one that never started needs nothing
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 3
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _terminate(processes) -> None:
    """SIGTERM to the parent: stop every child, then fail the run with one line."""
    _stop(processes)
    raise Terminated()


# what the children of a forkserver need, imported once by the server rather than by every child
FORKSERVER_PRELOAD = ("torch", "modellink_ckpt.engine.pipeline", "modellink_ckpt.loaders.hf", "modellink_ckpt.loaders.mg",
                      "modellink_ckpt.savers.hf", "modellink_ckpt.savers.mg")


def _context(start_method: str):
    """`fork` for the command line, whose parent has run no parallel torch work and so is safe
    to fork (and starts children at once); `forkserver` for callers that may hold OpenMP threads
    (fork after OpenMP is unsafe): children come from a clean process that imports torch once."""
    available = mp.get_all_start_methods()
    if start_method not in available:
        return mp.get_context("spawn")
    ctx = mp.get_context(start_method)
    if start_method != "forkserver":
        return ctx
    ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return ctx


def _cause(processes, errors, first_error: str | None = None) -> str:
    """The message for a failed run: a process killed by a signal is the cause even when its
    partner reported an error first (the partner only lost its peer); else the first error."""
    started = time.monotonic()
    while True:  # give a killed partner a moment to be seen, and a late error report time to arrive
        waited = time.monotonic() - started
        killed = any(p.exitcode is not None and p.exitcode < 0 for p in processes)
        have_error = first_error is not None or not errors.empty()
        if killed or (have_error and waited >= 0.3) or waited >= 2.0:
            break
        time.sleep(0.05)
    for process in processes:
        if process.exitcode is not None and process.exitcode < 0:
            return f"the {process.name} process was killed by signal {-process.exitcode}; nothing was completed"
    if first_error is None and not errors.empty():
        first_error = errors.get()[1]
    if first_error:
        return first_error
    failed = next(p for p in processes if p.exitcode not in (None, 0))
    return f"the {failed.name} process exited with code {failed.exitcode}; nothing was completed"


def run(plan, load: Callable, save: Callable, start_method: str = "forkserver") -> dict:
    """Run `load(plan, sender)` and `save(plan, receiver)` in two processes; returns the saver's result.

    Raises ConvertError with the first failure's message.
    """
    return run_pairs([plan], load, save, start_method)[0]


def run_pairs(shares: list, load: Callable, save: Callable, start_method: str = "forkserver") -> list[dict]:
    """Run one loader -> saver pair per item of `shares` (each pair's plan), all at once; returns
    each saver's result, in order. The first failure of any process stops every other one and
    raises ConvertError with its message (naming the worker when there are several)."""
    ctx = _context(start_method)
    processes, caller = [], os.getpid()
    errors, results = ctx.SimpleQueue(), ctx.SimpleQueue()
    # held until the end: Process.start() drops its arguments, and a queue collected here unlinks
    # the semaphores a child may not have attached to yet
    channels = []
    for index, plan in enumerate(shares):
        queue = ctx.Queue(maxsize=max(1, plan.run.max_queue_size))
        acks = ctx.Queue()
        channels.append((queue, acks))
        sender = Sender(queue, acks, max(1, plan.run.max_queue_size), int(plan.run.max_queue_gb * (1 << 30)))
        suffix = f" of worker {index + 1}/{len(shares)}" if len(shares) > 1 else ""
        for role, work, channel in (("loader", load, sender), ("saver", save, Receiver(queue, acks))):
            name = role + suffix
            processes.append(ctx.Process(target=_run_child, name=name,
                                         args=(name, work, plan, channel, errors, results, caller)))
    outcomes: dict[str, dict] = {}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        # Ctrl-C or SIGTERM while a child is being forked runs the handler inside the fork's
        # after-fork callbacks, where Python prints the exception and drops it: the parent carried
        # on as if never stopped (7 of 12 trials with two workers). Held back until every child is
        # started and the handler is in place; each child lets them through once it has its own.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if start_method == "fork" else None
        try:
            for process in processes:
                process.start()
            signal.signal(signal.SIGTERM, lambda *_: _terminate(processes))
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        pending = {p.sentinel: p for p in processes}
        while pending:
            ready = wait(list(pending) + [errors._reader, results._reader], timeout=1.0)
            while not results.empty():
                role, outcome = results.get()
                outcomes[role] = outcome
            if not errors.empty():
                _, message = errors.get()
                message = _cause(processes, errors, message)
                _stop(processes)
                raise ConvertError(message)
            for sentinel in ready:
                process = pending.pop(sentinel, None)
                if process is None:
                    continue
                process.join()
                if process.exitcode != 0:
                    message = _cause(processes, errors)
                    _stop(processes)
                    raise ConvertError(message)
        while not results.empty():
            role, outcome = results.get()
            outcomes[role] = outcome
    except KeyboardInterrupt:
        _stop(processes)
        raise Interrupted() from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(processes)
        channels.clear()
    saved = []
    for loader, saver in zip(processes[0::2], processes[1::2]):
        result = dict(outcomes.get(saver.name, {}))
        result["peak_rss_loader"] = outcomes.get(loader.name, {}).get("peak_rss", 0)
        result["peak_rss_saver"] = result.pop("peak_rss", 0)
        result["first_read"] = outcomes.get(loader.name, {}).get("first_read")
        saved.append(result)
    return saved
