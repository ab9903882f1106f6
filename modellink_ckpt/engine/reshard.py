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

import time
from pathlib import Path

from modellink_ckpt.engine.manifest import hash_files, write_manifest
from modellink_ckpt.engine.progress import progress
from modellink_ckpt.engine.staging import StagedDir
from modellink_ckpt.errors import UsageError
from modellink_ckpt.formats.mindspore.files import STRATEGY_DIR, MsFiles, copy_strategy
from modellink_ckpt.formats.mindspore.lora import MsLora
from modellink_ckpt.formats.mindspore.store import LoraMergedStore, MsStore, source_strategy
from modellink_ckpt.formats.ms_strategy import load_strategy


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
