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
import time
from pathlib import Path

import torch

from modellink_ckpt import registry
from modellink_ckpt.engine import workers
from modellink_ckpt.engine.manifest import (check_manifest, hash_files, model_dtype, read_manifest,
                                            with_recorded_dtypes, write_manifest)
from modellink_ckpt.engine.progress import progress as show_progress
from modellink_ckpt.engine.staging import StagedDir, check_target
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats import file_io
from modellink_ckpt.formats.huggingface import output_config
from modellink_ckpt.formats.mindspore import checkpoint2
from modellink_ckpt.formats.mindspore import names as ms_names
from modellink_ckpt.formats.mindspore.files import DEFAULT_PREFIX, STRATEGY_DIR, MsFiles, copy_strategy, rank_tensors
from modellink_ckpt.formats.mindspore.store import MsStore
from modellink_ckpt.formats.ms_strategy import load_strategy
from modellink_ckpt.formats.safetensors_io import parse_size
from modellink_ckpt.model import mapping
from modellink_ckpt.model.accounting import account
from modellink_ckpt.model.families import dims_from_hf_config, family_to_check
from modellink_ckpt.plan import MsTarget


def planned_tensors(plan, dtypes: mapping.TensorDtypes) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every MindSpore tensor in arrival order, with shape and dtype (from the model sizes)."""
    naming = ms_names.load_naming(plan.family, plan.target.naming)
    return [(name, tuple(t.shape), t.dtype)
            for _, _, tensors in ms_names.model_ms_tensors(naming, plan.family, plan.dims, dtypes)
            for name, t in tensors.items()]


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


def complete_file(target, iteration) -> str:
    """Where a complete checkpoint's one file goes: `model.ckpt` / `model.safetensors`, or in a
    Checkpoint 2.0 folder the model file of its one rank in the iteration's folder."""
    if target.file_format == "checkpoint2":
        return f"{checkpoint2.iteration_folder_name(_iteration(iteration))}/{checkpoint2.model_file_name(0, 1)}"
    return "model.ckpt" if target.file_format == "ckpt" else "model.safetensors"


def _iteration(recorded) -> int:
    """The source's iteration where it has one (a training checkpoint's), else 1."""
    return recorded if isinstance(recorded, int) and recorded > 0 else 1


def save(plan, receiver) -> dict:
    """Write the MindSpore checkpoint, or with `plan.share` (`--workers`) the rank files of the
    share's ranks into the folder the parent staged (the parent then publishes it)."""
    started = time.monotonic()
    messages = iter(receiver)
    meta = next(messages)
    share = getattr(plan, "share", None)
    dtypes = mapping.TensorDtypes.from_meta(meta, cast=plan.target.params_dtype)
    naming = ms_names.load_naming(plan.family, plan.target.naming)
    entries = planned_tensors(plan, dtypes)
    staging = None if share else StagedDir(plan.target.path, overwrite=plan.run.overwrite)
    folder = Path(share.folder) if share else staging.path
    files, gather = None, RowGather(plan.dims)
    layers = workers.written_layers(plan)
    progress = show_progress(total=layers, desc="saving layers", unit="layer", quiet=plan.run.quiet)
    try:
        target = plan.target
        one_file = target.file_format == "checkpoint2"  # one model file per rank, however large
        files = MsFiles(folder, "ckpt" if target.file_format == "ckpt" else "safetensors", entries,
                        strategy=target.strategy, prefix=target.prefix,
                        max_shard_bytes=2**63 if one_file else target.max_shard_bytes,
                        file_name=complete_file(target, plan.source.iteration) if one_file else None,
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
            if target.file_format == "checkpoint2":
                (folder / checkpoint2.TRACKER).write_text(str(_iteration(plan.source.iteration)))
                small.append(checkpoint2.TRACKER)
            config = output_config(plan, meta, dtypes.default)
            (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            small.append("config.json")
            strategy_file = plan.target.strategy_path
            if strategy_file:
                small += copy_strategy(Path(strategy_file), folder / STRATEGY_DIR)
        written = {**files.files, **hash_files(folder, small)}
        manifest = dict(kind="ms", model_type_hf=plan.family.name, ms_format=target.file_format, ms_naming=naming.name,
                        source={"type": plan.source.format, "dir": str(Path(plan.source.path).resolve())},
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
    return {"bytes": files.tensor_bytes, "seconds": time.monotonic() - started, "target": str(plan.target.path),
            "files": len(files.files), "written": written, "unhashed": files.unhashed, "manifest": manifest}


def publish_shares(staging: StagedDir, results: list[dict]) -> dict:
    """Every worker succeeded: one manifest for all their files (the shards they filled side by
    side hashed now), then the folder goes into place."""
    written, manifest = workers.merged_outputs(results)
    written.update(hash_files(staging.path, results[0]["unhashed"]))
    write_manifest(staging.path, written, **manifest)
    staging.publish()
    return workers.combined_result(results, files=sum(r["files"] for r in results) + len(results[0]["unhashed"]))


def verify(folder: Path, hash_contents: bool = True, family_name: str | None = None) -> tuple[list[str], str]:
    """A MindSpore output against its manifest and its config.json: every tensor the naming
    expects, with its shape and dtype, in the complete file(s) or, sliced by the strategy, in
    every rank file."""
    manifest, problems, files = check_manifest(folder, hash_contents)
    family = family_to_check(family_name, manifest.get("model_type_hf"))
    config = json.loads((folder / "config.json").read_text())
    dims = dims_from_hf_config(family, config, source=str(folder / "config.json"))
    naming = ms_names.load_naming(family, manifest.get("ms_naming") or "mcore")
    expected = {name: (tuple(t.shape), t.dtype) for _, _, tensors in ms_names.model_ms_tensors(
        naming, family, dims, mapping.TensorDtypes(model_dtype(manifest, {}))) for name, t in tensors.items()}
    strategies = sorted((folder / STRATEGY_DIR).glob("*")) if (folder / STRATEGY_DIR).is_dir() else []
    try:
        strategy = load_strategy(folder / STRATEGY_DIR) if strategies else None
        store = MsStore(folder, strategy)
        found = {name: (tuple(shape), dtype) for name, (shape, dtype) in
                 ((name, store.shape_dtype(name)) for name in store.names())}
    except ConvertError as exc:
        return problems + [str(exc)], "unreadable"
    problems += account(with_recorded_dtypes(expected, manifest), found).problems(str(folder))
    layout = f"{strategy.world_size} rank files by the strategy" if strategy else "complete"
    return problems, f"{files}; {len(found)} tensors ({layout}) match MindSpore naming '{naming.name}' of config.json"


class MsTargetFormat(registry.TargetFormat):
    name = "ms"
    description = "MindSpore / MindFormers checkpoint (.ckpt or safetensors; complete or distributed by a strategy)"
    saver = "modellink_ckpt.savers.ms:save"
    selected_by = "ms"
    flags = frozenset({"ms_format", "ms_naming", "dst_strategy", "ms_prefix", "max_shard_size"})

    def spec(self, options: dict, path: Path, params_dtype, family, source) -> MsTarget:
        strategy = options["dst_strategy"]
        return MsTarget(format=self.name, path=path, params_dtype=params_dtype, file_format=options["ms_format"],
                        naming=options["ms_naming"] or "mcore", strategy_path=strategy,
                        strategy=load_strategy(strategy, flag="--dst-strategy") if strategy else None,
                        prefix=options["ms_prefix"], hf_config_dir=options.get("hf_cfg_dir"),
                        max_shard_bytes=parse_size(options["max_shard_size"], "--max-shard-size"))

    def copies_in_kernel(self, plan) -> bool:
        """Safetensors tensors are plain bytes at an offset; a `.ckpt` checksums every byte it
        writes, so there nothing would stay in the kernel."""
        return plan.target.file_format in ("safetensors", "checkpoint2")

    def computes_on(self, plan):
        """Tensors the naming reorders (QKV split per head group, interleaved or stacked MLPs)."""
        folds = super().computes_on(plan)
        naming = ms_names.load_naming(plan.family, plan.target.naming)
        reordered = ms_names.reordered_names(naming, plan.dims)
        return lambda rule: folds(rule) or rule.mcore in reordered

    def why_one_process(self, plan) -> str | None:
        """Split by a strategy: shared by rank; complete safetensors: by layers."""
        if plan.target.strategy is None and plan.target.file_format != "safetensors":
            return (f"a complete MindSpore {plan.target.file_format} target is written by one process (workers "
                    f"share the ranks of --dst-strategy, or the layers of complete safetensors)")
        return None

    def shares(self, plan, count: int) -> tuple:
        staging = StagedDir(plan.target.path, overwrite=plan.run.overwrite)
        return staging, self.share_plans(plan, count, str(staging.path))

    def share_plans(self, plan, count: int, folder: str) -> list:
        """Shares of the strategy's ranks, by the bytes and the messages each rank holds; complete
        safetensors by source stage (each worker writing its tensors at their planned places)."""
        strategy = plan.target.strategy
        if strategy is None:
            return workers.message_share_plans(plan, count, folder)
        naming = ms_names.load_naming(plan.family, plan.target.naming)
        dtypes = mapping.TensorDtypes(plan.target.params_dtype or plan.source.dtype)
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
        if plan.target.file_format not in ("safetensors", "ckpt", "checkpoint2"):
            raise UsageError(f"--ms-format {plan.target.file_format}: expected safetensors, ckpt or checkpoint2")
        if plan.target.file_format == "checkpoint2" and plan.target.strategy is not None:
            raise UsageError("--ms-format checkpoint2 writes the model as one rank, which MindFormers' load_checkpoint "
                             "reshards for any layout; drop --dst-strategy")
        if plan.dims.mtp_num_layers:
            raise UsageError("--save-model-type ms: multi-token-prediction layers are not supported")
        if Path(plan.target.path).resolve() == Path(plan.source.path).resolve():
            raise UsageError("--save-dir must differ from --load-dir")
        check_target(plan.target.path, plan.run.overwrite)
        entries = planned_tensors(plan, mapping.TensorDtypes(plan.target.params_dtype or plan.source.dtype))
        strategy = plan.target.strategy
        if strategy is not None:
            names = {name for name, _, _ in entries}
            unknown = sorted(set(strategy.layouts) - names)
            if unknown:
                raise UsageError(f"--dst-strategy {strategy.source}: lays out '{unknown[0]}' ({len(unknown)} in all), "
                                 f"which this model in naming '{plan.target.naming}' does not have")
            for name, shape, _ in entries:
                if name in strategy.layouts:
                    strategy.layouts[name].check_shape(shape, name, strategy.source)

    def files(self, plan) -> dict[str, int]:
        entries = planned_tensors(plan, mapping.TensorDtypes(plan.target.params_dtype or plan.source.dtype))
        strategy = plan.target.strategy
        suffix = ".ckpt" if plan.target.file_format == "ckpt" else ".safetensors"
        if strategy is not None:
            prefix = plan.target.prefix or DEFAULT_PREFIX
            return {f"rank_{r}/{prefix}{r}{suffix}": sum(torch.Size(s).numel() * d.itemsize
                                                          for _, s, d in rank_tensors(entries, strategy, r))
                    for r in range(strategy.world_size)}
        total = sum(torch.Size(s).numel() * d.itemsize for _, s, d in entries)
        return {complete_file(plan.target, plan.source.iteration): total}

    def where(self, plan) -> str:
        strategy = plan.target.strategy
        layout = f"{strategy.world_size} ranks" if strategy else "complete"
        return f"{plan.target.path} (MindSpore {plan.target.file_format}, {plan.target.naming} names, {layout})"

    def pieces(self, plan, kind: str, layer: int | None, tensors: dict) -> list[tuple[str, str, torch.Tensor]]:
        """The MindSpore tensors of the naming (with what a rule joins them with), complete or the
        slice of every rank of the strategy that holds one."""
        naming = ms_names.load_naming(plan.family, plan.target.naming)
        shapes = {rule.mcore: rule.shape for rule in mapping.message_rules(kind, plan.family, plan.dims, layer)}
        full = ms_names.global_message(kind, layer, {name: torch.empty(shape, device="meta")
                                                      for name, shape in shapes.items()})
        given = set(ms_names.global_message(kind, layer, tensors))
        joined = {ms_names.local_name(kind, layer, name) for inst in naming.plan(kind, layer, full, plan.dims)
                  if given & set(inst.mg) for name in inst.mg} - set(tensors)
        dtype = next(iter(tensors.values())).dtype
        tensors = {**tensors, **{name: torch.zeros((), dtype=dtype).expand(shapes[name]) for name in joined}}
        strategy, suffix = plan.target.strategy, ".ckpt" if plan.target.file_format == "ckpt" else ".safetensors"
        out = []
        for name, tensor in ms_names.to_ms(naming, kind, layer, tensors, plan.dims).items():
            if strategy is None:
                out.append((complete_file(plan.target, plan.source.iteration), name, tensor))
                continue
            for rank in range(strategy.world_size):
                if strategy.holds(name, rank):
                    ranges = strategy.slice_of(name, tuple(tensor.shape), rank)
                    out.append((f"rank_{rank}/{plan.target.prefix}{rank}{suffix}", name,
                                tensor[tuple(slice(a, b) for a, b in ranges)]))
        return out

    def recognises(self, path: Path) -> Path | None:
        return path if (read_manifest(path) or {}).get("kind") == "ms" else None

    def verify(self, folder: Path, hash_contents: bool = True, family: str | None = None) -> tuple[list[str], str]:
        return verify(folder, hash_contents, family)


TARGET = MsTargetFormat()
