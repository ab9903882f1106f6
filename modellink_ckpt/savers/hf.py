"""Saver for Hugging Face output: safetensors shards, their index, config.json and tokenizer files.

Written to `<save-dir>/mg2hf/`, where MindSpeed-LLM users look for it. The shards are planned
before the first tensor arrives (every tensor's name and shape follow from the model sizes), so
each tensor is written into its shard as soon as it arrives and nothing is held back; the folder
is published only when complete.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch

from modellink_ckpt import registry
from modellink_ckpt.engine import workers
from modellink_ckpt.engine.manifest import (MANIFEST, check_manifest, hash_files, model_dtype, read_manifest,
                                            with_recorded_dtypes, write_manifest)
from modellink_ckpt.engine.progress import progress as show_progress
from modellink_ckpt.engine.staging import StagedDir, check_target
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.huggingface import HF_SUBDIR, TOKENIZER_FILES, output_config, remote_code_files
from modellink_ckpt.formats.safetensors_io import (PlacedShards, SafetensorsFile, ShardedOutput, parse_size,
                                                   plan_shards, shard_names, write_index)
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.accounting import account
from modellink_ckpt.model.families import check_family_fits_config, dims_from_hf_config, load_family
from modellink_ckpt.plan import HfTarget


def hf_tensors(family, dims, dtypes: mapping.TensorDtypes) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every HF tensor the saver will write, in arrival order, with the dtype it is written in
    (from the model sizes and the loader's declared dtypes alone)."""
    entries = []
    for kind, layer, tensors in mapping.model_messages(family, dims, dtypes.default):
        for rule in mapping.message_rules(kind, family, dims, layer):
            own = dtypes.of(kind, layer, rule.mcore)
            for name, part in zip(rule.hf, rule.to_hf(tensors[rule.mcore])):
                if rule.slab is None:
                    entries.append((name, tuple(part.shape), own))
                elif rule.slab[0] == rule.slab[1] - 1:  # a fused tensor is written once its last slab is in
                    entries.append((name, (rule.slab[1], *part.shape), own))
    return entries


class SlabStacks:
    """Fused HF tensors being filled one slab (one routed expert) at a time: a layer's worth at most."""

    def __init__(self):
        self._open: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, name: str, slab: tuple[int, int], part) -> torch.Tensor | None:
        """Put `part` in its place; the fused tensor once every slab is in, else None."""
        (index, count), part = slab, T.as_tensor(part)
        stack, filled = self._open.get(name) or (torch.empty((count, *part.shape), dtype=part.dtype), 0)
        stack[index].copy_(part)
        if filled + 1 < count:
            self._open[name] = (stack, filled + 1)
            return None
        self._open.pop(name, None)
        return stack


def _copy_tokenizer(plan, folder: Path) -> list[str]:
    copied = []
    candidates = [Path(d) / n for d in (plan.target.hf_config_dir, plan.target.path, plan.tokenizer_dir()) if d
                  for n in (*TOKENIZER_FILES, *remote_code_files(Path(d)))]
    for explicit in (plan.source.tokenizer, plan.target.tokenizer_model):
        if explicit:
            candidates.insert(0, Path(explicit))
    for path in candidates:
        if path.is_file() and path.name not in copied:
            shutil.copy2(path, folder / path.name)
            copied.append(path.name)
    return copied


def save(plan, receiver) -> dict:
    """Write the HF model, or with `plan.share` (`--workers`) the tensors of the share's messages
    into the folder and shards the parent staged (the parent then publishes it, `publish_shares`)."""
    started = time.monotonic()
    dims, family = plan.dims, plan.family
    messages = iter(receiver)
    meta = next(messages)
    share = getattr(plan, "share", None)
    dtypes = mapping.TensorDtypes.from_meta(meta, cast=plan.target.params_dtype)
    dtype = dtypes.default
    staging = None if share else StagedDir(plan.target.path / HF_SUBDIR, overwrite=plan.run.overwrite)
    folder = Path(share.folder) if share else staging.path
    entries = hf_tensors(plan.family, plan.dims, dtypes)
    odd_dtypes = {name: str(dt) for name, _, dt in entries if dt != dtype}
    shards = plan_shards(entries, plan.target.max_shard_bytes)
    output = PlacedShards(folder, shards) if share else ShardedOutput(folder, shards)
    stacks = SlabStacks()
    layers = workers.written_layers(plan)
    progress = show_progress(total=layers, desc="saving layers", unit="layer", quiet=plan.run.quiet)
    try:
        for message in workers.owned(plan, messages):
            for rule in mapping.message_rules(message.kind, family, dims, message.get("layer")):
                full = dtypes.apply(message.kind, message.get("layer"), rule.mcore, message.tensors[rule.mcore])
                for name, part in zip(rule.hf, rule.to_hf(full)):
                    if rule.slab is not None and (part := stacks.add(name, rule.slab, part)) is None:
                        continue
                    output.add(name, part)
            if message.kind == "layer":
                progress.update(1)
        progress.close()
        output.finish()
        small, tokenizer = [], []  # config, tokenizer and index: written once (by the first worker)
        if share is None or share.index == 0:
            index = write_index(folder, output.names, shards)
            (folder / "config.json").write_text(json.dumps(output_config(plan, meta, dtype), indent=2) + "\n")
            tokenizer = _copy_tokenizer(plan, folder)
            small = ["config.json", *tokenizer, *index]
        manifest = dict(kind="hf", model_type_hf=family.name,
                        source={"type": plan.source.format, "dir": str(Path(plan.source.path).resolve())},
                        dtype=str(dtype), vocab_size=dims.vocab_size, dtypes=odd_dtypes)
        if staging is not None:
            write_manifest(folder, {**output.files, **hash_files(folder, small)}, **manifest)
            target = staging.publish()
    except BaseException:
        progress.close()
        output.abort()
        if staging is not None:
            staging.discard()
        raise
    return {"bytes": output.total_bytes, "seconds": time.monotonic() - started,
            "target": str(plan.target.path / HF_SUBDIR if share else target), "files": len(output.names),
            "tokenizer_files": tokenizer, "shards": output.names, "small_files": small, "manifest": manifest}


def publish_shares(staging: StagedDir, results: list[dict]) -> dict:
    """Every worker succeeded: hash the shards (side by side) and the small files, write the
    manifest, and put the folder in place."""
    first = next(r for r in results if r["small_files"])
    files = hash_files(staging.path, [*first["shards"], *first["small_files"]])
    write_manifest(staging.path, files, **first["manifest"])
    staging.publish()
    return workers.combined_result(results, files=len(first["shards"]))


def verify(folder: Path, hash_contents: bool = True, family_name: str | None = None) -> tuple[list[str], str]:
    """An HF folder against its manifest and its config.json: every tensor the family's model has,
    with its shape and dtype, and nothing else. A folder this tool did not write is checked as
    the family a conversion would find for it."""
    manifest, problems, files = check_manifest(folder, hash_contents)
    config = json.loads((folder / "config.json").read_text())
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            for name, (dtype, shape, _, _) in SafetensorsFile(path).entries.items():
                found[name] = (tuple(shape), dtype)
        except ConvertError as exc:
            problems.append(str(exc))
    recorded = (manifest or {}).get("model_type_hf")
    if family_name:
        family, how = load_family(family_name), "--model-type-hf"
        check_family_fits_config(family, config, str(folder / "config.json"))
    elif isinstance(recorded, str):
        family, how = load_family(recorded), "recorded in the manifest"
    else:  # not written by this tool: the family its config.json and tensors name, as a conversion finds it
        name, how = mapping.family_of_hf(config, found)
        family = load_family(name)
    dims = dims_from_hf_config(family, config, source=str(folder / "config.json"))
    layers = {int(m.group(1)) for m in (re.search(r"\.layers\.(\d+)\.", name) for name in found) if m}
    mtp = max(layers, default=-1) + 1 - dims.num_layers  # multi-token-prediction layers follow the decoder's
    if 0 < mtp <= int(config.get("num_nextn_predict_layers") or 0):
        dims = dims_from_hf_config(family, config, source=str(folder / "config.json"), overrides={"mtp_num_layers": mtp})
    dtype = model_dtype(manifest, found)
    expected = {name: (tuple(shape), dt) for name, shape, dt in hf_tensors(family, dims, mapping.TensorDtypes(dtype))}
    problems += account(with_recorded_dtypes(expected, manifest), found).problems(str(folder))
    return problems, f"{files}; {len(found)} tensors match config.json as --model-type-hf {family.name} ({how})"


class HfTargetFormat(registry.TargetFormat):
    name = "hf"
    description = "Hugging Face safetensors shards, index, config.json and tokenizer in <save-dir>/mg2hf"
    saver = "modellink_ckpt.savers.hf:save"
    selected_by = "hf"
    flags = frozenset({"max_shard_size", "tokenizer_model", "load_hf_from_config"})

    def spec(self, options: dict, path: Path, params_dtype, family, source) -> HfTarget:
        tokenizer = options["tokenizer_model"]
        if tokenizer and not Path(tokenizer).is_file():
            raise UsageError(f"--tokenizer-model {tokenizer}: file not found")
        return HfTarget(format=self.name, path=path, params_dtype=params_dtype, tokenizer_model=tokenizer,
                        max_shard_bytes=parse_size(options["max_shard_size"], "--max-shard-size"),
                        hf_config_dir=options.get("hf_cfg_dir"))

    def copies_in_kernel(self, plan) -> bool:
        return True

    def why_one_process(self, plan) -> str | None:
        return None  # --workers: each worker writes some layers into the planned shards

    def shares(self, plan, count: int) -> tuple:
        staging = StagedDir(plan.target.path / HF_SUBDIR, overwrite=plan.run.overwrite)
        return staging, self.share_plans(plan, count, str(staging.path))

    def share_plans(self, plan, count: int, folder: str) -> list:
        return workers.message_share_plans(plan, count, folder)

    def publish(self, staged, results: list[dict]) -> dict:
        return publish_shares(staged, results)

    def check(self, plan) -> None:
        check_target(plan.target.path / HF_SUBDIR, plan.run.overwrite)
        _check_config_matches(plan.dims, plan.family, plan.target.hf_config_dir or plan.target.path)

    def files(self, plan) -> dict[str, int]:
        dtype = plan.target.params_dtype or plan.source.dtype
        shards = plan_shards(hf_tensors(plan.family, plan.dims, mapping.TensorDtypes(dtype)), plan.target.max_shard_bytes)
        return {name: sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in shard)
                for name, shard in zip(shard_names(len(shards)), shards)}

    def where(self, plan) -> str:
        return str(plan.target.path / HF_SUBDIR)

    def pieces(self, plan, kind: str, layer: int | None, tensors: dict) -> list[tuple[str, str, torch.Tensor]]:
        """The HF tensors (a fused expert tensor's slab for one expert) and the shard holding each."""
        dtype = plan.target.params_dtype or plan.source.dtype
        shards = plan_shards(hf_tensors(plan.family, plan.dims, mapping.TensorDtypes(dtype)), plan.target.max_shard_bytes)
        file_of = {entry[0]: name for name, shard in zip(shard_names(len(shards)), shards) for entry in shard}
        out = []
        for rule in mapping.message_rules(kind, plan.family, plan.dims, layer):
            if rule.mcore in tensors:
                for name, part in zip(rule.hf, rule.to_hf(tensors[rule.mcore])):
                    where = f" [expert slab {rule.slab[0]} of {rule.slab[1]}]" if rule.slab else ""
                    out.append((f"{HF_SUBDIR}/{file_of[name]}", name + where, T.as_tensor(part)))
        return out

    def recognises(self, path: Path) -> Path | None:
        if not (path / MANIFEST).is_file() and (path / HF_SUBDIR).is_dir() and \
                ((path / HF_SUBDIR / MANIFEST).is_file() or (path / HF_SUBDIR / "config.json").is_file()):
            path = path / HF_SUBDIR  # the HF folder a conversion wrote into
        return path if (path / "config.json").is_file() and (read_manifest(path) or {}).get("kind") != "ms" else None

    def verify(self, folder: Path, hash_contents: bool = True, family: str | None = None) -> tuple[list[str], str]:
        return verify(folder, hash_contents, family)


def _check_config_matches(dims, family, folder: Path | None) -> None:
    """An original config.json used for HF output must describe the model being written."""
    if folder is None or not (folder / "config.json").is_file():
        return
    try:
        config = json.loads((folder / "config.json").read_text())
        other = dims_from_hf_config(family, config, source=str(folder / "config.json"))
    except (ValueError, ConvertError):
        return  # not an HF config for this family; the saver builds one
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
        if getattr(other, field) != getattr(dims, field):
            raise UsageError(f"{folder / 'config.json'}: describes a different model ({field} "
                             f"{getattr(other, field)}, the checkpoint has {getattr(dims, field)})")


TARGET = HfTargetFormat()
