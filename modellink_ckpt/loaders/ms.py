"""Loader for MindSpore / MindFormers checkpoints: `.ckpt` or MindSpore safetensors, complete (one
file, or shards with `param_name_map.json`) or distributed (`rank_<r>/*.{ckpt,safetensors}`, laid
out by a strategy file, `--src-strategy`).

Every MindSpore tensor a message needs is assembled whole (from the slices of the ranks that hold
it, each distinct slice read once) and turned back into Megatron tensors by the family's MindSpore
naming (`ms_names`); a tensor the naming only renames is read straight into the message's memory
(or left in its file for the saver: the kernel-copy path), and the rows of tensors it only
reorders (interleaved fc1, split QKV, stacked experts) are gathered into it from one reused read
buffer. The model's sizes come from an HF `config.json` (next to the checkpoint, as our MindSpore
output writes one, or `--hf-cfg-dir`). Before anything is sent, every tensor of the checkpoint
must be explained by the naming or be training state (optimizer moments, step counters).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from modellink_ckpt import registry
from modellink_ckpt.engine.manifest import MANIFEST, read_manifest
from modellink_ckpt.engine.pipeline import message_bytes
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats import file_io, kernel_copy
from modellink_ckpt.formats.mindspore import checkpoint2
from modellink_ckpt.formats.mindspore import names as ms_names
from modellink_ckpt.formats.mindspore.lora import MsLora, is_adapter
from modellink_ckpt.formats.mindspore.store import (NAME_MAP, SUFFIXES, LoraMergedStore, MsStore, checkpoint_files,
                                                    open_file, rank_folders, source_strategy)
from modellink_ckpt.formats.safetensors_io import SafetensorsFile
from modellink_ckpt.model import mapping
from modellink_ckpt.model.accounting import account
from modellink_ckpt.model.families import dims_from_hf_config, families_for_config
from modellink_ckpt.model.lora import LORA_FLAGS, lora_request


def _recorded_naming(path: Path) -> str | None:
    """The naming our own output recorded in its manifest: names alone cannot tell MindFormers'
    interleaved fc1 (`mcore`) from the contiguous one (`mcore-contiguous`)."""
    return (read_manifest(path if path.is_dir() else path.parent) or {}).get("ms_naming")


def _config_path(request, path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, *request.config_dirs):
        if candidate is not None and (Path(candidate) / "config.json").is_file():
            return Path(candidate) / "config.json"
    raise UsageError(f"--load-dir {path}: a MindSpore checkpoint holds no model sizes; put the model's HF "
                     f"config.json next to it or pass --hf-cfg-dir")


def expected_shapes(naming, family, dims) -> dict[str, tuple[int, ...]]:
    expected = {}
    for kind, layer, tensors in mapping.model_messages(family, dims, torch.float32):
        expected.update({name: tuple(t.shape) for name, t in ms_names.to_ms(naming, kind, layer, tensors, dims).items()})
    return expected


def check_accounted(store: MsStore, naming, family, dims) -> None:
    """Every tensor of the checkpoint is one the naming expects, with the expected shape, or is
    training state (or an adapter, merged or exported apart); nothing is missing."""
    expected = expected_shapes(naming, family, dims)
    found = {name: tuple(store.shape_dtype(name)[0]) for name in store.names()}
    result = account(expected, found, excused=lambda name: ms_names.is_training_state(name) or is_adapter(name))
    for name, shape, want in result.mismatched:
        how = f" (assembled by the strategy {store.strategy.source})" if store.strategy else ""
        raise ConvertError(f"{store.path}: '{name}' is {list(shape)}{how}; the model (config.json, naming "
                           f"'{naming.name}') has {list(want)}")
    if result.missing:
        raise ConvertError(f"{store.path}: tensor '{result.missing[0]}' ({len(result.missing)} in all) is missing for "
                           f"MindSpore naming '{naming.name}' of --model-type-hf {family.name}")
    if result.unexplained:
        raise ConvertError(f"{store.path}: tensor '{result.unexplained[0]}' ({len(result.unexplained)} in all) is not "
                           f"explained by MindSpore naming '{naming.name}' of --model-type-hf {family.name} (another "
                           f"family or naming? try --ms-naming)")


def open_store(path: Path, options: dict):
    """The checkpoint at `path`; with `options["lora"]` its weights merged with their adapters."""
    strategy, suffix = options.get("src_strategy"), options.get("file_suffix")
    store = MsStore(path, source_strategy(path, strategy), suffix, options.get("iteration"))
    lora = options.get("lora")
    if not lora or lora.get("export"):
        return store
    adapters = MsStore(lora["load"], source_strategy(lora["load"], strategy), suffix) if lora.get("load") else store
    return LoraMergedStore(store, adapters, MsLora.from_flags(lora.get("scaling"), lora.get("r"), lora.get("alpha")))


def read_message(store: MsStore, naming, kind: str, layer, shapes: dict, dims, arena=None,
                 unchanged=lambda name: False, orders: dict | None = None) -> dict[str, torch.Tensor]:
    """One message's Megatron tensors. With `arena` (the message's memory) a renamed tensor is read
    straight into it, and where `unchanged(local name)` its bytes may stay in their file for the
    saver (the kernel-copy path); the parts of a transform that only moves rows (interleaved fc1,
    split QKV, stacked experts) are gathered into it from one reused read buffer. `orders` caches
    each transform's row order."""
    if arena is None or not isinstance(store, MsStore):  # merged LoRA weights are computed
        return ms_names.from_ms(naming, kind, layer, shapes, dims, store.read)
    orders = {} if orders is None else orders

    def read_placed(name: str, mg: str) -> torch.Tensor:
        shape, dtype = store.shape_dtype(name)
        with kernel_copy.placing() if unchanged(ms_names.local_name(kind, layer, mg)) else contextlib.nullcontext():
            return store.read(name, arena.alloc(shape, dtype))

    def gather_rows(inst: ms_names.Instance, part_shapes: list) -> list | None:
        stored = [store.shape_dtype(name) for name in inst.ms]
        key = (inst.transform, tuple(shape for shape, _ in stored), tuple(map(tuple, part_shapes)))
        if key not in orders:
            orders[key] = ms_names.row_order(inst.transform, list(key[1]), list(key[2]), dims)
        dtype = stored[0][1]
        if orders[key] is None or any(d != dtype for _, d in stored):
            return None
        width, start = stored[0][0][-1], 0
        rows = file_io.scratch_tensor((sum(torch.Size(s[:-1]).numel() for s, _ in stored), width), dtype)
        for name, (shape, _) in zip(inst.ms, stored):
            count = torch.Size(shape[:-1]).numel()
            store.read(name, rows[start:start + count].view(shape))
            start += count
        return [torch.index_select(rows, 0, order, out=arena.alloc(shape, dtype).view(-1, width)).view(shape)
                for order, shape in zip(orders[key], part_shapes)]

    def place(inst: ms_names.Instance, part_shapes: list) -> list | None:
        if inst.transform is ms_names.TRANSFORMS["rename"]:
            return [read_placed(name, mg) for name, mg in zip(inst.ms, inst.mg)]
        return gather_rows(inst, part_shapes)

    return ms_names.from_ms(naming, kind, layer, shapes, dims, store.read, place)


def message_dtypes(store: MsStore, naming, family, dims) -> tuple[torch.dtype, dict]:
    """(the model's dtype, {message key: dtype} of the tensors stored in another one)."""
    def meta(name):
        shape, dtype = store.shape_dtype(name)
        return torch.empty(shape, dtype=dtype, device="meta")

    found = {}
    for kind, layer, shapes in ms_names.message_shapes(naming, family, dims):
        for name, tensor in ms_names.from_ms(naming, kind, layer, shapes, dims, meta).items():
            found[mapping.message_key(kind, layer, name)] = tensor.dtype
    model = found[mapping.message_key("embeddings", None, mapping.EMBEDDING)]
    return model, {key: dtype for key, dtype in found.items() if dtype != model}


def load(plan, sender) -> dict:
    """Stream a MindSpore checkpoint as whole Megatron tensors."""
    options = plan.source.options
    store = open_store(plan.source.path, options)
    store.verify()
    naming = ms_names.load_naming(plan.family, options["naming"])
    family, dims = plan.family, plan.dims
    dtype, dtypes = message_dtypes(store, naming, family, dims)
    messages = list(ms_names.message_shapes(naming, family, dims))
    sender.plan(max(message_bytes(torch.Size(s).numel() * 4 for s in shapes.values()) for _, _, shapes in messages))
    hf_config = json.loads(Path(options["config"]).read_text())
    sender.send("meta", dims=dims.to_dict(), source="ms", dtype=dtype, dtypes=dtypes, hf_config=hf_config)
    cast = plan.target.params_dtype is not None and plan.target.params_dtype != dtype  # every tensor computed on

    orders = {}  # each transform's row order, found once
    for kind, layer, shapes in messages:
        rules = {rule.mcore: rule for rule in mapping.message_rules(kind, family, dims, layer)}
        arena = sender.arena()
        tensors = read_message(store, naming, kind, layer, shapes, dims, arena,
                               lambda local: not cast and local in rules and local not in plan.target.computed,
                               orders)
        sender.send(kind, tensors, arena, layer=layer)
    sender.send("done")
    return {}


def _left_out(store) -> tuple[str, ...]:
    """What the source holds besides the model: training state by name (MindSpore's optimizer
    moments, step counters, loss scale in the weights' files; Checkpoint 2.0's own files)."""
    state = [name for name in store.names() if ms_names.is_training_state(name)]
    kinds = sorted({name.split(".")[0] + (".*" if "." in name else "") for name in state})
    found = [f"{len(state)} training-state tensors ({', '.join(kinds[:6])}{', ...' if len(kinds) > 6 else ''})"] \
        if state else []
    files = store.left_out
    if files:
        found.append(f"{', '.join(files)} ({checkpoint2.LEFT_OUT})")
    return tuple(found)


def _step_of(path: Path) -> tuple[int, ...]:
    """(epoch, step) of a MindSpore file name `<prefix>-<epoch>_<step>.ckpt`; () without them."""
    return tuple(int(n) for n in re.findall(r"\d+", path.stem.rsplit("-", 1)[-1])) if "-" in path.stem else ()


class MsSourceFormat(registry.SourceFormat):
    name = "ms"
    description = "MindSpore / MindFormers checkpoint (.ckpt or safetensors; complete, or distributed with a strategy)"
    loader = "modellink_ckpt.loaders.ms:load"
    flags = LORA_FLAGS | {"ms_naming", "src_strategy", "lora_scaling", "file_suffix", "iteration"}

    def describe(self, request: registry.SourceRequest) -> registry.SourceInfo:
        options = {"naming": request.options["ms_naming"], "src_strategy": request.options["src_strategy"],
                   "file_suffix": request.options["file_suffix"], "iteration": request.options["iteration"],
                   "lora": lora_request(request.options)}
        store = open_store(request.path, options)
        config_path = _config_path(request, request.path)
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise ConvertError(f"{config_path}: not valid JSON ({exc})") from None
        dims = dims_from_hf_config(request.family, config, source=str(config_path), overrides=request.overrides)
        if dims.mtp_num_layers:
            raise UsageError("--load-model-type ms: multi-token-prediction layers are not supported")
        if not options.get("lora") and any(is_adapter(name) for name in store.names()):
            raise UsageError(f"--load-dir {request.path}: holds LoRA adapters; pass --lora-scaling (or --lora-r "
                             f"and --lora-alpha) to merge them, or --save-lora-to-hf to export them")
        options["naming"] = options.get("naming") or _recorded_naming(request.path) or \
            ms_names.detect_naming(store.names())
        naming = ms_names.load_naming(request.family, options["naming"])
        check_accounted(store, naming, request.family, dims)
        dtype, _ = message_dtypes(store, naming, request.family, dims)
        options["config"] = str(config_path)
        folder = request.path if request.path.is_dir() else request.path.parent
        recorded = (read_manifest(folder) or {}).get("model_type_hf")
        return registry.SourceInfo(dims=dims, dtype=dtype, options=options, config_path=config_path,
                                   recorded_family=(recorded, f"{folder / MANIFEST}")
                                   if isinstance(recorded, str) else None, left_out=_left_out(store),
                                   iteration=store.iteration)

    def family_hint(self, path: Path, cfg_path=None) -> tuple[str, str] | None:
        folder = path if path.is_dir() else path.parent
        recorded = (read_manifest(folder) or {}).get("model_type_hf")
        if isinstance(recorded, str):
            return recorded, "recorded in its manifest"
        if (folder / "config.json").is_file():
            matching = families_for_config(json.loads((folder / "config.json").read_text()), cfg_path)
            if matching:
                return matching[0], f"from {folder / 'config.json'}"
        return None

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix in SUFFIXES
        if not path.is_dir():
            return False
        if rank_folders(path) or (path / NAME_MAP).is_file() or any(path.glob("*.ckpt")) or \
                checkpoint2.is_checkpoint2(path):
            return True
        return any(SafetensorsFile(f).metadata.get("format") == "ms" for f in sorted(path.glob("*.safetensors"))[:1])

    def inspect(self, path: Path) -> dict:
        ranks = rank_folders(path)
        per_rank = {r: checkpoint_files(ranks[r]) for r in sorted(ranks)}
        if len(ranks) > 1 or any(len(files) > 1 for files in per_rank.values()):
            first = open_file(max(per_rank[min(ranks)], key=_step_of))  # the latest step's names
            names = list(first.keys())
            found = {"format": "ms (distributed)" if len(ranks) > 1 else "ms", "ranks": len(ranks),
                     "naming": ms_names.detect_naming(names), "tensors on rank 0": len(names),
                     "files": {str(f.relative_to(path)): f.stat().st_size
                               for files in per_rank.values() for f in files}}
            if any(len(files) > 1 for files in per_rank.values()):  # a training run's steps: --file-suffix picks
                found["steps (--file-suffix)"] = sorted({f.stem.rsplit("-", 1)[-1] for f in per_rank[min(ranks)]})
            return found
        store = MsStore(path)
        dtypes, params = registry.census(store.shape_dtype(name) for name in store.names())
        layers = {n.split(".")[2] for n in store.names() if n.startswith(("decoder.layers.", "model.layers."))}
        found = {"format": "ms", "naming": ms_names.detect_naming(store.names()), "layers": len(layers),
                 "tensors": len(store.names()), "parameters": params, "dtypes": dtypes,
                 "files": {str(f.relative_to(path) if path.is_dir() else f.name): f.stat().st_size
                           for f in store.files}}
        if checkpoint2.is_checkpoint2(path):
            found["format"] = f"ms (MindFormers Checkpoint 2.0, {store.files[0].parent.name})"
            found["left out"] = "; ".join(_left_out(store))
        return found


SOURCE = MsSourceFormat()
