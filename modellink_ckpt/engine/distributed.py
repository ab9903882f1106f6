"""Conversion spread over the processes of a `torchrun` job (several nodes on a shared filesystem).

`torchrun --nnodes 2 --nproc-per-node 8 ... convert_ckpt.py <the usual flags>`: every rank parses
the same command line and plans the same conversion; rank k then runs the loader -> saver pair of
the k-th share of the target (`--workers` with one share per rank: the target's `share_plans`;
ranks beyond the shares idle). Rank 0 stages the target folder on the shared filesystem and
broadcasts where it is; every rank writes its files there. The target is published by rank 0
only after every rank reported success over torch.distributed (gloo): an error on any rank, or
the death of one, stops every rank with one line naming the rank, and nothing is published (the
staged folder is hidden and removed by rank 0, or by the next run when rank 0 itself died).
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time

from modellink_ckpt.engine import pipeline, workers
from modellink_ckpt.errors import ConvertError, Terminated, UsageError

_DONE = "modellink_ckpt/done/"  # store keys: a rank's outcome, set before the final exchange
_BEAT = "modellink_ckpt/beat/"  # store counters: a rank's heartbeat, so the others can tell it died
_BEAT_SECONDS = 0.5
_TIMEOUT = datetime.timedelta(hours=4)  # a rank may wait this long for the slowest one


def launched() -> bool:
    """Whether this process is one rank of a multi-process torchrun (or torch.distributed) job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def run(plan, target, load, save) -> dict:
    """This rank's part of the conversion; the summary of the whole job (published by rank 0)."""
    import torch.distributed as dist

    reason = workers.why_not_shared(plan, target)
    if reason is not None:
        raise UsageError(f"torchrun: {reason}; run it without torchrun")
    dist.init_process_group("gloo", timeout=_TIMEOUT)
    rank, size = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    heartbeat = _Heartbeat(store, rank)
    staged, folder = None, [None]
    previous = signal.signal(signal.SIGTERM, _stop)  # torchrun stops the other ranks when one fails
    try:
        if rank == 0:
            staged, _ = target.shares(plan, size)
            folder = [str(staged.folder)]
        dist.broadcast_object_list(folder, src=0)
        plans = target.share_plans(plan, size, folder[0])
        outcome = _convert_share(plans[rank] if rank < len(plans) else None, load, save, rank)
        store.set(f"{_DONE}{rank}", outcome[0])
        outcomes = _gather(dist, store, outcome, rank, size)
        failed = [(r, message) for r, (status, message) in enumerate(outcomes) if status == "error"]
        if failed:
            raise ConvertError(f"rank {failed[0][0]} of {size}: {failed[0][1]}; nothing was published")
        result = None
        if rank == 0:
            result = target.publish(staged, [r for _, results in outcomes for r in results])
        dist.barrier()
    except _Stopped:
        if staged is not None:
            staged.discard()
        dead = _dead_ranks(store, rank, size)
        who = f"rank {dead[0]} of {size} died or failed" if dead else "another rank failed"
        raise ConvertError(f"{who}, and torchrun stopped rank {rank}; nothing was published") from None
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        heartbeat.stop()
        dist.destroy_process_group()
    if result is None:  # the other ranks say what they wrote
        mine = outcome[1]
        result = {"bytes": sum(r["bytes"] for r in mine), "files": sum(r["files"] for r in mine),
                  "target": str(plan.target.path), "peak_rss_loader": max([r["peak_rss_loader"] for r in mine] or [0]),
                  "peak_rss_saver": max([r["peak_rss_saver"] for r in mine] or [0])}
    result["rank"] = f"{rank}/{size}"
    return result


class _Stopped(BaseException):
    """SIGTERM: torchrun stops the surviving ranks when one failed."""


def _stop(*_) -> None:
    raise _Stopped()


def _convert_share(plan, load, save, rank: int) -> tuple[str, object]:
    """("ok", [saver result]) or ("error", message) for this rank's share (None: nothing to do)."""
    if plan is None:
        return "ok", []
    try:
        return "ok", pipeline.run_pairs([plan], load, save, start_method="forkserver")
    except Terminated as exc:  # run_pairs stopped its processes on SIGTERM (and restored our handler)
        raise _Stopped() from exc
    except ConvertError as exc:
        return "error", str(exc)


def _gather(dist, store, outcome, rank: int, size: int) -> list:
    """Every rank's outcome; a rank that died (or was stopped) before reporting is named."""
    outcomes = [None] * size
    try:
        dist.all_gather_object(outcomes, outcome)
    except (RuntimeError, ValueError) as exc:
        dead = _dead_ranks(store, rank, size)
        who = f"rank {dead[0]} of {size}" if dead else "a rank"
        raise ConvertError(f"{who} died or was stopped before it finished ({str(exc).splitlines()[0][:120]}); "
                           f"nothing was published") from None
    return outcomes


def _dead_ranks(store, rank: int, size: int) -> list[int]:
    """The ranks whose heartbeat stopped without an outcome (a busy rank keeps beating; a rank
    that learnt of the failure says so first, so that it is not taken for the dead one)."""
    try:
        if not store.check([f"{_DONE}{rank}"]):
            store.set(f"{_DONE}{rank}", "stopped")
        before = {r: store.add(f"{_BEAT}{r}", 0) for r in range(size) if r != rank}
        time.sleep(4 * _BEAT_SECONDS)
        return [r for r, beats in before.items()
                if store.add(f"{_BEAT}{r}", 0) == beats and not store.check([f"{_DONE}{r}"])]
    except (RuntimeError, ValueError):  # the store is gone too (its host died)
        return []


class _Heartbeat:
    """A thread counting up this rank's store counter until stopped."""

    def __init__(self, store, rank: int):
        self._store, self._key, self._stopped = store, f"{_BEAT}{rank}", threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stopped.wait(_BEAT_SECONDS):
            try:
                self._store.add(self._key, 1)
            except (RuntimeError, ValueError):
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
