"""Parallel workers on one machine (`--workers N`): the target split into disjoint shares, one
loader -> saver pair per share, all writing into the one folder the parent staged. The parent
writes the manifest and publishes the folder only after every worker has reported success (a
failure anywhere stops all and publishes nothing). Each part of the target is written by exactly
one worker, exactly as a single worker writes it, so the output is byte-identical whatever N.

- A Megatron (torch-format) target is shared by pipeline stage: worker k writes every rank file
  (all TP and EP ranks) of a contiguous run of stages, and its loader sends only the messages those
  stages hold (their layers; the embedding to the first stage, and to the last when tied; final
  norm, output layer and MTP layers to the last). From a Megatron source a share holds whole
  source stages, so each source rank file is read, and checked, by one worker. With more workers
  than such groups of stages (a PP1 target, say) the rank files themselves are shared.
- A target whose files every worker writes into at planned places (HF safetensors shards, whose
  header fixes every tensor's offset; complete MindSpore safetensors; a torch_dist store, whose
  blobs are planned in `savers.torch_dist.StoreLayout`) is shared by message: runs of layers with
  about the same bytes, whatever the layouts; the parent hashes those files at the end.
- A distributed MindSpore target is shared by rank: runs of ranks with about the same bytes, each
  worker's loader sending the messages its ranks hold a slice of.

Where a share is not whole source stages (rank files, ranks, messages), each Megatron source stage
is also read whole, and checked for tensors nothing explains, by the worker that reads most of it.
"""

from __future__ import annotations

import dataclasses
import os

from modellink_ckpt.errors import UsageError
from modellink_ckpt.model import mapping

# a worker pair holds about two messages in flight and a layer being split: with the arenas
# bounded by --max-queue-gb (split between workers), this is what one more worker costs
_WORKER_OVERHEAD_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Share:
    """What one worker writes, into `folder`: the pipeline stages `stages` of the target, or the
    `parts` of a target shared otherwise (MindSpore ranks, Megatron (tp, pp, ep) rank files, or
    message groups `message_group` of a target whose files every worker writes into), whose
    loader sends the `messages` (message groups) and checks the Megatron source stages
    `source_stages`."""

    index: int
    count: int
    stages: tuple[int, ...]
    folder: str
    parts: tuple | None = None
    messages: frozenset | None = None
    source_stages: frozenset[int] | None = None
    by_message: bool = False  # the parts are message groups

    def holds_rank(self, rank: tuple[int, int, int]) -> bool:
        """Whether this worker writes the files of Megatron rank (tp, pp, ep)."""
        return rank in self.parts if self.parts is not None else rank[1] in self.stages

    def owns(self, kind: str, layer: int | None) -> bool:
        """Whether this worker writes this message (a worker of a share by message also receives
        the rest of the source stages it checks, which another worker writes)."""
        return not self.by_message or message_group(kind, layer) in self.parts

    def describe(self) -> str:
        if self.parts is None:
            return ",".join(map(str, self.stages))
        if self.by_message:
            layers = [layer for kind, layer in self.parts if kind == "layer"]
            words = ["embedding"] * (("embeddings", None) in self.parts)
            if layers:  # a share of a small model may hold only the embedding or only the head
                words.append(f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}")
            return ", ".join(words + ["head"] * (("tail", None) in self.parts))
        return ",".join(".".join(map(str, r)) if isinstance(r, tuple) else str(r) for r in self.parts)

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
    groups = balanced_runs([sum(weights[pp] for pp in block) for block in blocks], workers)
    return [tuple(sorted(pp for b in group for pp in blocks[b])) for group in groups]


def balanced_runs(weights: list[float], workers: int) -> list[tuple[int, ...]]:
    """At most `workers` contiguous runs of the items 0..n-1 of about the same total weight (an
    item goes to the run its middle falls in); no run is empty."""
    count, total, done = max(1, min(workers, len(weights))), sum(weights), 0
    runs: list[list[int]] = [[] for _ in range(count)]
    for item, weight in enumerate(weights):
        middle, done = done + weight / 2, done + weight
        runs[min(count - 1, int(middle * count / total)) if total else item * count // len(weights)].append(item)
    return [tuple(run) for run in runs if run]


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


def plan_shares(plan, workers: int) -> list[tuple[int, ...]]:
    """`stage_shares` of a conversion plan's target (aligned with a Megatron source's stages)."""
    return stage_shares(plan.target.layout, workers, plan.source.layout if plan.source.format == "mg" else None)


def _with_share(plan, share: Share):
    """`plan` for one worker: its share, its part of the queue memory (`--max-queue-gb`), and
    quiet but for the first worker."""
    run = dataclasses.replace(plan.run, max_queue_gb=plan.run.max_queue_gb / share.count,
                              quiet=plan.run.quiet or share.index > 0)
    return dataclasses.replace(plan, share=share, run=run)


def share_plans(plan, workers: int, folder: str) -> list:
    """One plan per worker, each with its `Share` of the stages, writing into `folder`. Pure:
    every torchrun rank gets the same."""
    groups = plan_shares(plan, workers)
    held = stage_messages(plan.target.layout, tied_copy=plan.dims.tie_word_embeddings)
    plans = []
    for k, stages in enumerate(groups):
        share = Share(k, len(groups), stages, folder, messages=frozenset().union(*(held[pp] for pp in stages)))
        if plan.source.format == "mg":
            checked = source_stages_of(share, plan.target.layout, plan.source.layout)
            share = dataclasses.replace(share, source_stages=frozenset(checked))
        plans.append(_with_share(plan, share))
    return plans


def message_group(kind: str, layer: int | None) -> tuple[str, int | None]:
    """What a loader sends together: a layer, the embedding, or the tail (final norm, output layer
    and multi-token-prediction layers, which a Megatron source keeps on its last stage)."""
    if kind in ("layer", "embeddings"):
        return kind, layer
    return "tail", None


def stage_messages(layout, tied_copy: bool = False) -> dict[int, set]:
    """{pipeline stage: the message groups it holds} (`tied_copy`: the last stage keeps its own
    copy of a tied embedding, as a Megatron torch-format target does)."""
    held: dict[int, set] = {pp: set() for pp in range(layout.pp)}
    for hf, slot in layout.slot_of_hf_layer().items():
        held[slot.pp_rank].add(("layer", hf))
    held[layout.first_stage[0]].add(("embeddings", None))
    held[layout.last_stage[0]].add(("tail", None))
    if tied_copy:
        held[layout.last_stage[0]].add(("embeddings", None))
    return held


def share_plans_by_parts(plan, workers: int, folder: str, part_bytes: list[int], part_messages: list[set],
                         labels: list | None = None, by_message: bool = False) -> list:
    """One plan per worker of a target shared by parts (ranks, rank files, or with `by_message`
    message groups): contiguous runs of parts with about the same bytes (`part_bytes`), each
    sending the message groups its parts hold (`part_messages`); the shares name their parts by
    `labels` (default: 0..n-1). From a Megatron source, every source stage is read whole by one
    worker, which checks that nothing in it is left unexplained. Pure."""
    labels = labels or list(range(len(part_bytes)))
    groups = balanced_runs(part_bytes, workers)
    messages = [set().union(*(part_messages[part] for part in group)) for group in groups]
    checked: list[set[int]] = [set() for _ in groups]
    if plan.source.format == "mg":
        for pp, held in stage_messages(plan.source.layout).items():
            # the worker already reading most of it; among equals, the one checking fewest stages
            reader = max(range(len(groups)), key=lambda k: (len(held & messages[k]), -len(checked[k]), -k))
            messages[reader] |= held
            checked[reader].add(pp)
    return [_with_share(plan, Share(k, len(groups), (), folder, parts=tuple(labels[r] for r in group),
                                    messages=frozenset(messages[k]), source_stages=frozenset(checked[k]),
                                    by_message=by_message))
            for k, group in enumerate(groups)]


def message_share_plans(plan, workers: int, folder: str) -> list:
    """One plan per worker of a target whose files every worker writes into at planned places (HF
    shards, complete MindSpore safetensors, a torch_dist store): runs of messages (the embedding,
    layers, the head) with about the same bytes, whatever the layouts. Pure."""
    sizes: dict[tuple, int] = {}
    dtype = plan.target.params_dtype or plan.source.dtype
    for kind, layer, tensors in mapping.model_messages(plan.family, plan.dims, dtype):
        group = message_group(kind, layer)
        sizes[group] = sizes.get(group, 0) + sum(t.numel() * t.element_size() for t in tensors.values())
    groups = list(sizes)
    return share_plans_by_parts(plan, workers, folder, list(sizes.values()), [{group} for group in groups], groups,
                            by_message=True)


def why_not_shared(plan, target) -> str | None:
    """Why this conversion is done by one process (None: several workers can share it)."""
    reason = target.why_one_process(plan)
    if reason is not None:
        return reason
    if plan.source.format not in ("hf", "mg") or plan.source.lora is not None:
        return "only hf and mg sources without LoRA are read by several processes"
    return None


def check_workers(requested: int | None, plan, target) -> tuple[int, str | None]:
    """(the number of workers to run, a note when it is fewer than asked): what was asked (or the
    default), at most one per share of the target, one where the source or target cannot be shared."""
    if requested is not None and requested < 1:
        raise UsageError(f"--workers {requested}: must be at least 1")
    wanted = requested or default_workers()
    if wanted == 1:
        return 1, None
    reason = why_not_shared(plan, target)
    count = 1 if reason is not None else len(target.share_plans(plan, wanted, ""))
    if not requested or count == requested:
        return count, None
    why = reason or f"the target has {count} part{'s' * (count > 1)} that workers can write side by side"
    return count, f"--workers {requested}: running {count}; {why}"


def wanted(plan, kind: str, layer: int | None) -> bool:
    """Whether the loader of `plan`'s share sends this message (always, without a share)."""
    share = getattr(plan, "share", None)
    return share is None or kind in ("meta", "done") or message_group(kind, layer) in share.messages


def owned(plan, messages):
    """The messages this worker writes, of those its loader sends (all of them but where a share by
    message also receives source stages it only checks)."""
    share = getattr(plan, "share", None)
    for message in messages:
        if share is None or message.kind in ("meta", "done") or share.owns(message.kind, message.get("layer")):
            yield message


def written_layers(plan) -> int:
    """How many layers this worker writes (its progress bar's length)."""
    share = getattr(plan, "share", None)
    return sum(1 for layer in range(plan.dims.num_layers)
               if wanted(plan, "layer", layer) and (share is None or share.owns("layer", layer)))


def merged_outputs(results: list[dict]) -> tuple[dict, dict]:
    """(every worker's written files {name: (bytes, digest)}, the manifest's fields with every
    worker's tensors kept in their own dtype) for a target whose files each worker hashed."""
    written = {name: entry for result in results for name, entry in result["written"].items()}
    manifest = dict(results[0]["manifest"])
    manifest["dtypes"] = {k: v for result in results for k, v in result["manifest"]["dtypes"].items()}
    return written, manifest


def combined_result(results: list[dict], **fields) -> dict:
    """The summary of several workers' saver results (for the one-line summary)."""
    return {"bytes": sum(r["bytes"] for r in results), "seconds": max(r["seconds"] for r in results),
            "kernel_copied": sum(r.get("kernel_copied", 0) for r in results),
            "target": results[0]["target"], "workers": len(results),
            "peak_rss_loader": max(r["peak_rss_loader"] for r in results),
            "peak_rss_saver": max(r["peak_rss_saver"] for r in results),
            "peak_rss_total": sum(r["peak_rss_loader"] + r["peak_rss_saver"] for r in results),
            "first_read": min((r["first_read"] for r in results if r.get("first_read")), default=None), **fields}
