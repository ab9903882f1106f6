"""Parallel workers on one machine (`--workers N`): the target's files split into disjoint shares,
one loader -> saver pair per share, published together.

An HF target from a Megatron source is shared by source stage: worker k reads (and checks) whole
source stages and writes their tensors at their planned places in the planned shards (the
safetensors header fixes every tensor's offset; the parent writes the headers first and hashes the
shards at the end).

A Megatron target is shared by pipeline stage: worker k writes every rank file (all TP and EP
ranks) of a contiguous run of stages, and its loader sends only the messages those stages hold
(their layers; the embedding to the first stage, and to the last when tied; final norm, output
layer and MTP layers to the last). Each rank file is written by exactly one worker, exactly as a
single worker writes it, so the output is byte-identical whatever N. Every worker writes into the
one staged folder the parent created; the parent writes the manifest and publishes the folder only
after every worker has reported success (a failure anywhere stops all and publishes nothing).
"""

from __future__ import annotations

import dataclasses
import os

from modellink_ckpt.errors import UsageError

# a worker pair holds about two messages in flight and a layer being split: with the arenas
# bounded by --max-queue-gb (split between workers), this is what one more worker costs
_WORKER_OVERHEAD_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Share:
    """What one worker writes: the pipeline stages `stages` of the target, into `folder`."""

    index: int
    count: int
    stages: tuple[int, ...]
    folder: str

    def holds_stage(self, pp_rank: int) -> bool:
        return pp_rank in self.stages


def stage_shares(layout, workers: int, source_layout=None) -> list[tuple[int, ...]]:
    """At most `workers` groups of target pipeline stages with about the same number of layer
    slots each (the embedding and the output layer count as one slot each). From a Megatron
    source (`source_layout`) a group also holds whole source stages, so that every source rank
    file is read, and checked for tensors nothing explains, by one worker: target stages sharing
    a layer with one source stage stay together. Pure, so every worker and the parent agree."""
    weights = [count + (pp == 0) + (pp == layout.pp - 1) for pp, count in enumerate(_slots_per_stage(layout))]
    blocks = _aligned_blocks(layout, source_layout)
    count, total, done = max(1, min(workers, len(blocks))), sum(weights), 0
    shares: list[list[int]] = [[] for _ in range(count)]
    for block in blocks:
        weight = sum(weights[pp] for pp in block)
        middle, done = done + weight / 2, done + weight
        shares[min(count - 1, int(middle * count / total))].extend(block)
    return [tuple(sorted(share)) for share in shares if share]


def _aligned_blocks(layout, source_layout) -> list[tuple[int, ...]]:
    """The smallest groups of target stages that read whole source stages (each target stage
    alone without a Megatron source), in stage order."""
    group = list(range(layout.pp))  # union-find over target stages

    def root(pp: int) -> int:
        while group[pp] != pp:
            pp = group[pp]
        return pp

    if source_layout is not None:
        target_stage = {hf: slot.pp_rank for hf, slot in layout.slot_of_hf_layer().items()}
        first_target = {}
        for hf, slot in source_layout.slot_of_hf_layer().items():
            first = first_target.setdefault(slot.pp_rank, target_stage[hf])
            group[root(target_stage[hf])] = root(first)
    blocks: dict[int, list[int]] = {}
    for pp in range(layout.pp):
        blocks.setdefault(root(pp), []).append(pp)
    return sorted((tuple(block) for block in blocks.values()), key=lambda block: block[0])


def source_stages_of(share: Share, layout, source_layout) -> set[int]:
    """The source stages whose every layer lies in `share` (the ones this worker checks)."""
    layers: dict[int, list[int]] = {}
    target_stage = {hf: slot.pp_rank for hf, slot in layout.slot_of_hf_layer().items()}
    for hf, slot in source_layout.slot_of_hf_layer().items():
        layers.setdefault(slot.pp_rank, []).append(hf)
    return {pp for pp, hfs in layers.items() if all(share.holds_stage(target_stage[hf]) for hf in hfs)}


def _slots_per_stage(layout) -> list[int]:
    counts = [0] * layout.pp
    for slot in layout.slots():
        counts[slot.pp_rank] += 1
    return counts


def default_workers() -> int:
    """One worker per two cores (a worker is a loader and a saver process), as many as memory
    allows with room for the page cache."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    by_memory = max(1, _available_memory() // (4 * _WORKER_OVERHEAD_BYTES))
    return max(1, min(cpus // 2, by_memory))


def _available_memory() -> int:
    """MemAvailable (free plus reclaimable page cache), or 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def share_layout(plan):
    """The layout whose pipeline stages the workers divide: the target's, or for a target without
    stages (HF) the Megatron source's; None when there is neither."""
    if plan.target_layout is not None:
        return plan.target_layout
    return plan.source_layout if plan.load_type == "mg" else None


def plan_shares(plan, workers: int) -> list[tuple[int, ...]]:
    """`stage_shares` of a conversion plan's target (aligned with a Megatron source's stages)."""
    aligned = plan.source_layout if plan.load_type == "mg" and plan.target_layout is not None else None
    return stage_shares(share_layout(plan), workers, aligned)


def share_plans(plan, workers: int, folder: str) -> list:
    """One plan per worker, each with its `Share` of the stages, writing into `folder`; the queue
    memory (`--max-queue-gb`) is split between them. Pure: every torchrun rank gets the same."""
    groups = plan_shares(plan, workers)
    return [dataclasses.replace(plan, share=Share(k, len(groups), stages, folder),
                                max_queue_gb=plan.max_queue_gb / len(groups), quiet=plan.quiet or k > 0)
            for k, stages in enumerate(groups)]


def why_not_shared(plan, target) -> str | None:
    """Why this conversion is done by one process (None: it can be shared by stage)."""
    if not getattr(target, "shared_by_stage", False) or share_layout(plan) is None:
        return (f"a {plan.target_format} target from {plan.load_type} is written by one process (Megatron "
                f"torch-format targets are shared by pipeline stage, HF targets from Megatron by source stage)")
    if plan.load_type not in ("hf", "mg") or plan.lora is not None:
        return "only hf and mg sources without LoRA are read by several processes"
    return None


def check_workers(requested: int | None, plan, target) -> int:
    """The number of workers to run: what was asked (or the default), at most one per stage
    share; refused where the source or target cannot be shared."""
    if requested is not None and requested < 1:
        raise UsageError(f"--workers {requested}: must be at least 1")
    wanted = requested or default_workers()
    if wanted == 1:
        return 1
    reason = why_not_shared(plan, target)
    if reason is not None:
        if requested:
            raise UsageError(f"--workers {requested}: {reason}")
        return 1
    return len(plan_shares(plan, wanted))


def wanted(plan, kind: str, layer: int | None) -> bool:
    """Whether the loader of `plan`'s share sends this message (always, without a share)."""
    share = getattr(plan, "share", None)
    if share is None or kind in ("meta", "done"):
        return True
    layout = share_layout(plan)
    last = layout.pp - 1
    if kind == "layer":
        return share.holds_stage(layout.slot_of_hf_layer()[layer].pp_rank)
    if kind == "embeddings":  # a Megatron target's last stage keeps its own copy of a tied table
        tied_copy = plan.dims.tie_word_embeddings and plan.target_layout is not None
        return share.holds_stage(0) or (tied_copy and share.holds_stage(last))
    return share.holds_stage(last)  # final norm, output layer, MTP layers


def combined_result(results: list[dict], **fields) -> dict:
    """The summary of several workers' saver results (for the one-line summary)."""
    return {"bytes": sum(r["bytes"] for r in results), "seconds": max(r["seconds"] for r in results),
            "kernel_copied": sum(r.get("kernel_copied", 0) for r in results),
            "target": results[0]["target"], "workers": len(results),
            "peak_rss_loader": max(r["peak_rss_loader"] for r in results),
            "peak_rss_saver": max(r["peak_rss_saver"] for r in results),
            "peak_rss_total": sum(r["peak_rss_loader"] + r["peak_rss_saver"] for r in results),
            "first_read": min((r["first_read"] for r in results if r.get("first_read")), default=None), **fields}
