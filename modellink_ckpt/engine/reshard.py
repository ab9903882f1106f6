"""Re-sharding a MindSpore checkpoint between strategies, tensor by tensor, with no model knowledge
(what MindFormers' `transform_checkpoint.py` and `mindspore.transform_checkpoints` do): complete ->
distributed, distributed -> complete, distributed -> another strategy; LoRA adapters merged on the
way where asked (`transform_ckpt_lora.py`).

Each tensor is assembled whole from the source's distinct slices (each read once) and written at
once, sliced for every target rank; memory holds one tensor. The output folder is staged and
published whole, with a manifest. Conversions that change names or layouts (HF, Megatron,
another MindFormers naming) go through the converter's pipeline instead (`--load-model-type ms`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from modellink_ckpt.engine.manifest import hash_files, write_manifest
from modellink_ckpt.engine.progress import progress
from modellink_ckpt.engine.staging import StagedDir
from modellink_ckpt.errors import UsageError
from modellink_ckpt.formats.mindspore.files import NAME_MAP, STRATEGY_DIR, MsFiles, copy_strategy
from modellink_ckpt.formats.mindspore.lora import MsLora
from modellink_ckpt.formats.mindspore.store import LoraMergedStore, MsStore, open_file, source_strategy
from modellink_ckpt.formats.ms_strategy import load_strategy, write_strategy


def reshard(src: Path, dst: Path, *, src_strategy: Path | None, dst_strategy: Path | None, prefix: str,
            world_size: int | None = None, fmt: str | None = None, overwrite: bool = False,
            quiet: bool = False, file_suffix: str | None = None, lora: MsLora | None = None,
            file_name: str | None = None) -> dict:
    """`src` laid out by `dst_strategy` (or complete: one file, `file_name` if given) in `dst`; with
    `lora`, each weight with LoRA adapters beside it is written merged and the adapters dropped
    (MindFormers' `transform_ckpt_lora.py`)."""
    started = time.monotonic()
    source = MsStore(src, source_strategy(src, src_strategy), file_suffix)
    if lora is not None:
        source = LoraMergedStore(source, source, lora)
    target = load_strategy(dst_strategy, flag="--dst_strategy") if dst_strategy else None
    if world_size not in (None, 1) and target is not None and world_size != target.world_size:
        raise UsageError(f"--world_size {world_size}: the target strategy {target.source} has "
                         f"{target.world_size} ranks")
    fmt = fmt or ("ckpt" if all(f.suffix == ".ckpt" for f in source.files) else "safetensors")
    entries = [(name, *source.shape_dtype(name)) for name in source.names()]
    if target is not None:
        for name, shape, _ in entries:
            if name in target.layouts:
                target.layouts[name].check_shape(tuple(shape), name, target.source)
        unknown = sorted(set(target.layouts) - set(source.names()))
        if unknown:
            raise UsageError(f"--dst_strategy {target.source}: lays out '{unknown[0]}' ({len(unknown)} in all), "
                             f"which {src} does not hold")
    source.verify()
    staging = StagedDir(dst, overwrite=overwrite)
    files = None
    try:
        files = MsFiles(staging.path, fmt, entries, strategy=target, prefix=prefix, file_name=file_name)
        for name, _, _ in progress(entries, total=len(entries), desc="re-sharding", unit="tensor", quiet=quiet):
            files.add(name, source.read(name))
        files.close()
        extra = copy_strategy(Path(dst_strategy), staging.path / STRATEGY_DIR) if dst_strategy else []
        write_manifest(staging.path, {**files.files, **hash_files(staging.path, extra)}, kind="ms-reshard",
                       ms_format=fmt, source={"type": "ms", "dir": str(Path(src).resolve())},
                       world_size=target.world_size if target else None,
                       lora_merged=sorted(source.adapters) if lora is not None else None)
        published = staging.publish()
    except BaseException:
        if files is not None:
            files.abort()
        staging.discard()
        raise
    seconds = time.monotonic() - started
    return {"bytes": files.tensor_bytes, "files": len(files.files), "seconds": seconds, "wall_seconds": seconds,
            "describe": f"{published} ({f'{target.world_size} ranks' if target else 'complete'}, {fmt})"}


UNIFIED_PART_BYTES = 3 * 2**30  # MindSpore's unified_safetensors: as many parts as 3 GiB pieces
HYPER_PARAM = "hyper_param.safetensors"


def unified_parts(sizes: dict[str, int]) -> list[list[str]]:
    """The part files of `mindspore.unified_safetensors`, assigned as it does: one part per
    3 GiB (at most one per tensor), the largest tensor first into the part with the fewest bytes."""
    count = min(max(1, -(-sum(sizes.values()) // UNIFIED_PART_BYTES)), max(1, len(sizes)))
    parts, totals = [[] for _ in range(count)], [0] * count
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        index = totals.index(min(totals))
        parts[index].append(name)
        totals[index] += size
    return parts


UNIFIED_DIR, MERGED_STRATEGY = "unified_safe", "merge_strategy/merge_strategy.ckpt"


def unify(src: Path, dst: Path, *, strategy: Path, file_suffix: str | None, drop_prefix: str | None = None,
          quiet: bool = False) -> dict:
    """A distributed MindSpore safetensors checkpoint merged into complete parts as MindFormers'
    `unified_safetensors.py` leaves them in `dst`: `unified_safe/` as `mindspore.unified_safetensors`
    writes it (`part<k>.safetensors`, `param_name_map.json`, `hyper_param.safetensors`: what rank 0
    holds that the strategy does not lay out, such as step counters) and the strategy it used in
    `merge_strategy/merge_strategy.ckpt`. Tensors named with `drop_prefix` (optimizer moments,
    `adam_`) and gradient accumulators are left out; a redundancy-free source reads each slice from
    the rank that kept it."""
    started = time.monotonic()
    source = MsStore(src, source_strategy(src, strategy), file_suffix)
    if any(f.suffix != ".safetensors" for f in source.files):
        raise UsageError(f"--mindspore_ckpt_dir {src}: holds .ckpt files; unified_safetensors merges safetensors")
    laid_out = set(source.strategy.layouts)
    names = [n for n in source.names() if n in laid_out and not n.startswith("accu_grads")
             and not (drop_prefix and n.startswith(drop_prefix))]
    hyper = [n for n in open_file(source.files[0]).keys()  # (MindSpore's keeps even filtered ones here)
             if n not in laid_out and not (drop_prefix and n.startswith(drop_prefix))]
    sizes = {n: torch.Size(source.shape_dtype(n)[0]).numel() * source.shape_dtype(n)[1].itemsize for n in names}
    parts = unified_parts(sizes)
    source.verify()
    staging = StagedDir(dst, overwrite=True)  # as MindFormers' script, which clears its output folder first
    written = {}
    try:
        (staging.path / MERGED_STRATEGY).parent.mkdir(parents=True)
        write_strategy(staging.path / MERGED_STRATEGY, source.strategy.layouts, merged=True)
        for index, part in enumerate(progress(parts, total=len(parts), desc="unifying", unit="part", quiet=quiet)):
            written.update(_whole_in_one_file(source, part, staging.path, f"{UNIFIED_DIR}/part{index}.safetensors"))
        if hyper:
            written.update(_whole_in_one_file(source, hyper, staging.path, f"{UNIFIED_DIR}/{HYPER_PARAM}"))
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {n: f"part{k}.safetensors" for k, part in enumerate(parts) for n in part}}
        (staging.path / UNIFIED_DIR / NAME_MAP).write_text(json.dumps(index, indent=4))
        small = [f"{UNIFIED_DIR}/{NAME_MAP}", MERGED_STRATEGY]
        write_manifest(staging.path, {**written, **hash_files(staging.path, small)}, kind="ms-unified",
                       ms_format="safetensors", source={"type": "ms", "dir": str(Path(src).resolve())})
        published = staging.publish()
    except BaseException:
        staging.discard()
        raise
    seconds = time.monotonic() - started
    return {"bytes": sum(sizes.values()), "files": len(written) + 1, "seconds": seconds, "wall_seconds": seconds,
            "describe": f"{published / UNIFIED_DIR} ({len(parts)} part(s), {len(names)} tensors"
                        f"{f', {len(hyper)} in {HYPER_PARAM}' if hyper else ''})"}


def _whole_in_one_file(source, names: list[str], folder: Path, file_name: str) -> dict[str, tuple[int, str]]:
    """The tensors `names` of `source`, whole, in one MindSpore safetensors file; {file: (bytes, digest)}."""
    files = MsFiles(folder, "safetensors", [(n, *source.shape_dtype(n)) for n in names], max_shard_bytes=2**63,
                    file_name=file_name)
    try:
        for name in names:
            files.add(name, source.read(name))
        files.close()
    except BaseException:
        files.abort()
        raise
    return files.files
