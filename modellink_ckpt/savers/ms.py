"""Saver for MindSpore / MindFormers checkpoints: `.ckpt` or MindSpore safetensors (`--ms-format`),
complete or distributed by a strategy file (`--dst-strategy`), in the family's MindSpore naming
(`--ms-naming`: MindFormers mcore by default, or the legacy `convert_weight.py` names).

Layout of `--save-dir`:
- complete: `model.safetensors` (or shards `model-0000k-of-0000n.safetensors` + `param_name_map.json`
  beyond `--max-shard-size`) or `model.ckpt`;
- distributed: `rank_<r>/<prefix><r>.{safetensors,ckpt}` for every rank of the strategy, the
  strategy file(s) under `strategy/`;
- plus the model's HF `config.json` (the sizes a MindSpore checkpoint does not record) and the
  manifest. The folder is staged and published whole.

Every file's tensor list is planned from the model sizes before the first message arrives; each
tensor is written (sliced per rank) as soon as it arrives, so memory holds one layer. Tensors the
naming only reorders by rows (interleaved fc1, split QKV, stacked experts) are made in one reused
buffer (`RowGather`). With
`--workers` a distributed target is shared by rank (each worker writes the rank files of some
ranks), complete safetensors by layers (each worker writes the tensors of some layers at their
planned places in the shards), into the folder the parent staged; the parent publishes it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from modellink_ckpt import file_io, mapping, ms_names, registry, workers
from modellink_ckpt.errors import UsageError
from modellink_ckpt.formats.ms_ckpt import MsCkptWriter
from modellink_ckpt.formats.ms_strategy import Strategy, load_strategy
from modellink_ckpt.formats.safetensors_io import PlacedTensors, SafetensorsWriter
from modellink_ckpt.manifest import hash_files, write_manifest
from modellink_ckpt.savers.hf import _hf_config, plan_shards, write_index
from modellink_ckpt.progress import progress as show_progress
from modellink_ckpt.staging import StagedDir, check_target

NAME_MAP = "param_name_map.json"
STRATEGY_DIR = "strategy"
DEFAULT_PREFIX = "checkpoint_"
_METADATA = {"format": "ms"}


def planned_tensors(plan, dtypes: mapping.TensorDtypes) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every MindSpore tensor in arrival order, with shape and dtype (from the model sizes)."""
    naming = ms_names.load_naming(plan.family, plan.target_options["naming"])
    return [(name, tuple(t.shape), t.dtype)
            for _, _, tensors in ms_names.model_ms_tensors(naming, plan.family, plan.dims, dtypes)
            for name, t in tensors.items()]


def rank_tensors(entries, strategy: Strategy, rank: int):
    """The (name, slice shape, dtype) that rank `rank` holds, in order."""
    return [(name, tuple(b - a for a, b in strategy.slice_of(name, shape, rank)), dtype)
            for name, shape, dtype in entries if strategy.holds(name, rank)]


class MsFiles:
    """The open output files of a MindSpore checkpoint (complete, or a rank file per rank of
    `strategy`, or of the ranks `ranks` only) and where each tensor, or its slices, goes.
    `entries`: every tensor in arrival order [(name, shape, dtype)]. With `placed`, complete
    safetensors shards are written at their planned places by several workers side by side
    (`--workers`), and hashed once all are done."""

    def __init__(self, folder: Path, fmt: str, entries, *, strategy: Strategy | None = None,
                 prefix: str | None = None, max_shard_bytes: int = 5 * 10**9, file_name: str | None = None,
                 ranks=None, placed: bool = False):
        self.folder, self.format, self.strategy = folder, fmt, strategy
        self.files: dict[str, tuple[int, str]] = {}
        self.unhashed: list[str] = []  # placed shards: the parent hashes them
        self.tensor_bytes = 0
        self._placed = None
        self._writers: list[tuple[str, object, object]] = []  # (relative path, writer, rank or None)
        suffix = ".ckpt" if self.format == "ckpt" else ".safetensors"
        if self.strategy is not None:
            prefix = prefix or DEFAULT_PREFIX
            for rank in (range(self.strategy.world_size) if ranks is None else ranks):
                (folder / f"rank_{rank}").mkdir(parents=True, exist_ok=True)
                name = f"rank_{rank}/{prefix}{rank}{suffix}"
                self._writers.append((name, self._open(folder / name, rank_tensors(entries, self.strategy, rank)), rank))
            self.shards = None
        elif self.format == "ckpt":  # MindSpore loads a complete checkpoint from one .ckpt
            name = file_name or "model.ckpt"
            self._writers.append((name, self._open(folder / name, entries), None))
        else:
            self.shards = plan_shards(entries, max_shard_bytes)
            names = [file_name or "model.safetensors"] if len(self.shards) == 1 else \
                [f"model-{k:05d}-of-{len(self.shards):05d}.safetensors" for k in range(1, len(self.shards) + 1)]
            self._shard_of = {entry[0]: i for i, shard in enumerate(self.shards) for entry in shard}
            self._names = names
            self._open_shard = {}
            if placed:
                self._placed = PlacedTensors({name: (folder / name, shard, _METADATA)
                                              for name, shard in zip(names, self.shards)})
                self.unhashed = names

    def _open(self, path: Path, entries):
        if self.format == "ckpt":
            return MsCkptWriter(path)
        return SafetensorsWriter(path, entries, metadata=_METADATA)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.strategy is not None:
            shape = tuple(tensor.shape)
            for path, writer, rank in self._writers:
                if self.strategy.holds(name, rank):
                    ranges = self.strategy.slice_of(name, shape, rank)
                    writer.add(name, tensor[tuple(slice(a, b) for a, b in ranges)])
            return
        if self.format == "ckpt":
            self._writers[0][1].add(name, tensor)
            return
        if self._placed is not None:
            self._placed.add(name, tensor)
            return
        index = self._shard_of[name]
        if index not in self._open_shard:
            self._open_shard[index] = self._open(self.folder / self._names[index], self.shards[index])
        writer = self._open_shard[index]
        writer.add(name, tensor)
        if writer.complete:
            self.files[self._names[index]] = writer.close()
            self.tensor_bytes += writer.tensor_bytes
            del self._open_shard[index]

    def close(self) -> None:
        for path, writer, _ in self._writers:
            self.files[path] = writer.close()
            self.tensor_bytes += writer.tensor_bytes
        if self._placed is not None:
            self._placed.close()
            self.tensor_bytes = self._placed.tensor_bytes
        elif self.strategy is None and self.format == "safetensors" and self._open_shard:
            raise RuntimeError("a planned safetensors shard was not completed")

    def write_index(self) -> list[str]:
        """MindSpore's unified-checkpoint index, for complete safetensors in several shards."""
        if self.strategy is None and self.format == "safetensors":
            return write_index(self.folder, self._names, self.shards, NAME_MAP)
        return []

    def abort(self) -> None:
        for _, writer, _ in self._writers:
            writer.abort()
        for writer in getattr(self, "_open_shard", {}).values():
            writer.abort()
        if self._placed is not None:
            self._placed.close()


class RowGather:
    """Makes the MindSpore tensors of a transform that only moves rows (interleaved fc1, split QKV,
    stacked experts) in one reused buffer, each Megatron row copied to its place, instead of in
    fresh memory every layer (freshly faulted-in memory costs more than the copy into it). Valid
    until the next instance: `ms_names.to_ms_items` makes one only after the last is written."""

    def __init__(self, dims):
        self.dims, self._places = dims, {}

    def __call__(self, inst: ms_names.Instance, parts: list) -> list | None:
        if inst.transform is ms_names.TRANSFORMS["rename"] or any(p.dtype != parts[0].dtype for p in parts):
            return None
        key = (inst.transform, tuple(tuple(p.shape) for p in parts))
        if key not in self._places:
            self._places[key] = ms_names.row_places(inst.transform, list(key[1]), self.dims)
        if self._places[key] is None:
            return None
        shapes, places, order = self._places[key]
        width = parts[0].shape[-1]
        rows = file_io.scratch_tensor((len(places), width), parts[0].dtype, slot="ms rows")
        if len(parts) == 1:  # a gather from one tensor (measured: 0.6x the time of the scatter below)
            torch.index_select(parts[0].reshape(-1, width), 0, order, out=rows)
        else:
            start = 0
            for part in parts:
                count = part.numel() // width
                rows.index_copy_(0, places[start:start + count], part.reshape(-1, width))
                start += count
        made, start = [], 0
        for shape in shapes:
            count = torch.Size(shape[:-1]).numel()
            made.append(rows[start:start + count].view(shape))
            start += count
        return made


def save(plan, receiver) -> dict:
    """Write the MindSpore checkpoint, or with `plan.share` (`--workers`) the rank files of the
    share's ranks into the folder the parent staged (the parent then publishes it)."""
    started = time.monotonic()
    messages = iter(receiver)
    meta = next(messages)
    share = getattr(plan, "share", None)
    dtypes = mapping.TensorDtypes.from_meta(meta, cast=plan.params_dtype)
    naming = ms_names.load_naming(plan.family, plan.target_options["naming"])
    entries = planned_tensors(plan, dtypes)
    staging = None if share else StagedDir(plan.save_dir, overwrite=plan.overwrite)
    folder = Path(share.folder) if share else staging.path
    files, gather = None, RowGather(plan.dims)
    layers = workers.written_layers(plan)
    progress = show_progress(total=layers, desc="saving layers", unit="layer", quiet=plan.quiet)
    try:
        options = plan.target_options
        files = MsFiles(folder, options["format"], entries, strategy=options.get("strategy_obj"),
                        prefix=options.get("prefix"), max_shard_bytes=plan.max_shard_bytes,
                        ranks=share.parts if share else None, placed=share is not None)
        for message in workers.owned(plan, messages):  # (to the end: the receiver acknowledges "done" after it)
            layer = message.get("layer")
            typed = {name: dtypes.apply(message.kind, layer, name, t) for name, t in message.tensors.items()}
            for name, tensor in ms_names.to_ms_items(naming, message.kind, layer, typed, plan.dims, gather):
                files.add(name, tensor)
            if message.kind == "layer":
                progress.update(1)
        progress.close()
        files.close()
        small = []  # written once (by the first worker)
        if share is None or share.index == 0:
            small = files.write_index()
            config = _hf_config(plan, meta, dtypes.default)
            (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            small.append("config.json")
            strategy_file = plan.target_options.get("strategy")
            if strategy_file:
                small += _copy_strategy(Path(strategy_file), folder / STRATEGY_DIR)
        written = {**files.files, **hash_files(folder, small)}
        manifest = dict(kind="ms", model_type_hf=plan.family.name, ms_format=files.format, ms_naming=naming.name,
                        source={"type": plan.load_type, "dir": str(Path(plan.load_dir).resolve())},
                        dtype=str(dtypes.default), world_size=files.strategy.world_size if files.strategy else None,
                        dtypes={name: str(dt) for name, _, dt in entries if dt != dtypes.default})
        if staging is not None:
            write_manifest(folder, written, **manifest)
            staging.publish()
    except BaseException:
        progress.close()
        if files is not None:
            files.abort()
        if staging is not None:
            staging.discard()
        raise
    return {"bytes": files.tensor_bytes, "seconds": time.monotonic() - started, "target": str(plan.save_dir),
            "files": len(files.files), "written": written, "unhashed": files.unhashed, "manifest": manifest}


def publish_shares(staging: StagedDir, results: list[dict]) -> dict:
    """Every worker succeeded: one manifest for all their files (the shards they filled side by
    side hashed now), then the folder goes into place."""
    written, manifest = workers.merged_outputs(results)
    written.update(hash_files(staging.path, results[0]["unhashed"]))
    write_manifest(staging.path, written, **manifest)
    staging.publish()
    return workers.combined_result(results, files=sum(r["files"] for r in results) + len(results[0]["unhashed"]))


def _copy_strategy(source: Path, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in ([source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())):
        shutil.copy2(path, folder / path.name)
        copied.append(f"{STRATEGY_DIR}/{path.name}")
    return copied


class MsTargetFormat(registry.TargetFormat):
    name = "ms"
    description = "MindSpore / MindFormers checkpoint (.ckpt or safetensors; complete or distributed by a strategy)"
    saver = "modellink_ckpt.savers.ms:save"

    def copies_in_kernel(self, plan) -> bool:
        """Safetensors tensors are plain bytes at an offset; a `.ckpt` checksums every byte it
        writes, so there nothing would stay in the kernel."""
        return plan.target_options["format"] == "safetensors"

    def computes_on(self, plan):
        """Tensors the naming reorders (QKV split per head group, interleaved or stacked MLPs)."""
        folds = super().computes_on(plan)
        naming = ms_names.load_naming(plan.family, plan.target_options["naming"])
        reordered = ms_names.reordered_names(naming, plan.dims)
        return lambda rule: folds(rule) or rule.mcore in reordered

    def why_one_process(self, plan) -> str | None:
        """Split by a strategy: shared by rank; complete safetensors: by layers."""
        options = plan.target_options
        if options.get("strategy_obj") is None and options["format"] != "safetensors":
            return ("a complete MindSpore ckpt target is written by one process (workers share the ranks of "
                    "--dst-strategy, or the layers of complete safetensors)")
        return None

    def shares(self, plan, count: int) -> tuple:
        staging = StagedDir(plan.save_dir, overwrite=plan.overwrite)
        return staging, self.share_plans(plan, count, str(staging.path))

    def share_plans(self, plan, count: int, folder: str) -> list:
        """Shares of the strategy's ranks, by the bytes and the messages each rank holds; complete
        safetensors by source stage (each worker writing its tensors at their planned places)."""
        strategy = plan.target_options.get("strategy_obj")
        if strategy is None:
            return workers.message_share_plans(plan, count, folder)
        naming = ms_names.load_naming(plan.family, plan.target_options["naming"])
        dtypes = mapping.TensorDtypes(plan.params_dtype or plan.source_dtype)
        # every rank of a pipeline stage holds the same tensors, in slices of (about) the same size:
        # counted per stage, so that thousands of ranks cost no more than one
        stage_bytes = [0] * strategy.stages
        stage_messages: list[set] = [set() for _ in range(strategy.stages)]
        for kind, layer, tensors in ms_names.model_ms_tensors(naming, plan.family, plan.dims, dtypes):
            for name, tensor in tensors.items():
                layout = strategy.layouts.get(name)
                stages = range(strategy.stages) if layout is None else [layout.stage]
                ranges = strategy.slice_of(name, tuple(tensor.shape), stages[0] * strategy.devices)
                nbytes = torch.Size(b - a for a, b in ranges).numel() * tensor.dtype.itemsize
                for stage in stages:
                    stage_bytes[stage] += nbytes
                    stage_messages[stage].add(workers.message_group(kind, layer))
        ranks = range(strategy.world_size)
        return workers.share_plans_by_parts(plan, count, folder, [stage_bytes[r // strategy.devices] for r in ranks],
                                            [stage_messages[r // strategy.devices] for r in ranks])

    def publish(self, staged, results: list[dict]) -> dict:
        return publish_shares(staged, results)

    def check(self, plan) -> None:
        options = plan.target_options
        if options.get("format") not in ("safetensors", "ckpt"):
            raise UsageError(f"--ms-format {options.get('format')}: expected safetensors or ckpt")
        if plan.dims.mtp_num_layers:
            raise UsageError("--save-model-type ms: multi-token-prediction layers are not supported")
        if options.get("strategy"):
            options["strategy_obj"] = load_strategy(options["strategy"], flag="--dst-strategy")
        if Path(plan.save_dir).resolve() == Path(plan.load_dir).resolve():
            raise UsageError("--save-dir must differ from --load-dir")
        check_target(plan.save_dir, plan.overwrite)
        entries = planned_tensors(plan, mapping.TensorDtypes(plan.params_dtype or plan.source_dtype))
        strategy = options.get("strategy_obj")
        if strategy is not None:
            names = {name for name, _, _ in entries}
            unknown = sorted(set(strategy.layouts) - names)
            if unknown:
                raise UsageError(f"--dst-strategy {strategy.source}: lays out '{unknown[0]}' ({len(unknown)} in all), "
                                 f"which this model in naming '{options['naming']}' does not have")
            for name, shape, _ in entries:
                if name in strategy.layouts:
                    strategy.layouts[name].check_shape(shape, name, strategy.source)

    def files(self, plan) -> dict[str, int]:
        options = plan.target_options
        entries = planned_tensors(plan, mapping.TensorDtypes(plan.params_dtype or plan.source_dtype))
        strategy = options.get("strategy_obj")
        suffix = ".ckpt" if options["format"] == "ckpt" else ".safetensors"
        if strategy is not None:
            prefix = options.get("prefix") or DEFAULT_PREFIX
            return {f"rank_{r}/{prefix}{r}{suffix}": sum(torch.Size(s).numel() * d.itemsize
                                                          for _, s, d in rank_tensors(entries, strategy, r))
                    for r in range(strategy.world_size)}
        total = sum(torch.Size(s).numel() * d.itemsize for _, s, d in entries)
        return {options.get("file_name") or f"model{suffix}": total}

    def where(self, plan) -> str:
        options = plan.target_options
        strategy = options.get("strategy_obj")
        layout = f"{strategy.world_size} ranks" if strategy else "complete"
        return f"{plan.save_dir} (MindSpore {options['format']}, {options['naming']} names, {layout})"


TARGET = MsTargetFormat()
