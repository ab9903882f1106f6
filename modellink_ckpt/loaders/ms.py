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
from pathlib import Path

import torch

from modellink_ckpt import file_io, kernel_copy, mapping, ms_names, registry
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.ms_ckpt import MsCkptFile
from modellink_ckpt.formats.ms_strategy import Strategy, load_strategy
from modellink_ckpt.formats.safetensors_io import SafetensorsFile
from modellink_ckpt.manifest import MANIFEST, read_manifest
from modellink_ckpt.model_cfg import dims_from_hf_config
from modellink_ckpt.ms_lora import MsLora, find_adapters, is_adapter, merged

SUFFIXES = (".safetensors", ".ckpt")
NAME_MAP = "param_name_map.json"


def _open(path: Path):
    return MsCkptFile(path) if path.suffix == ".ckpt" else SafetensorsFile(path)


def _rank_folders(folder: Path) -> dict[int, Path]:
    found = {}
    for sub in folder.glob("rank_*"):
        if sub.is_dir() and sub.name[5:].isdigit():
            found[int(sub.name[5:])] = sub
    return found


def _checkpoint_files(folder: Path, error=ConvertError) -> list[Path]:
    """The .ckpt or the .safetensors files of a folder, sorted; both side by side are ambiguous."""
    kinds = {suffix: sorted(folder.glob(f"*{suffix}")) for suffix in SUFFIXES}
    if kinds[".ckpt"] and kinds[".safetensors"]:
        raise ConvertError(f"{folder}: holds both .ckpt and .safetensors files; keep one format per folder")
    files = kinds[".ckpt"] or kinds[".safetensors"]
    if not files:
        raise error(f"{folder}: no MindSpore .ckpt or .safetensors file")
    return files


def _rank_file(folder: Path) -> Path:
    """The checkpoint of one rank folder: MindSpore takes the last in sorted order."""
    return _checkpoint_files(folder)[-1]


class MsStore:
    """Every tensor of a MindSpore checkpoint by name, whole: `shape_dtype(name)`, `read(name)`."""

    def __init__(self, path: str | Path, strategy: Strategy | None = None):
        self.path = Path(path)
        self.strategy = strategy
        self.files: list[Path] = []
        self._where: dict[str, object] = {}       # complete: name -> open file
        self._ranks: dict[int, object] = {}       # distributed: rank -> open file
        self._shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if self.path.is_file():
            self._complete([self.path])
        elif not self.path.is_dir():
            raise UsageError(f"--load-dir {self.path}: no such file or folder")
        elif _rank_folders(self.path) and len(_rank_folders(self.path)) > 1 or strategy is not None:
            self._distributed()
        else:
            self._complete(self._complete_files())

    # ---- complete checkpoints ----------------------------------------------------------------

    def _complete_files(self) -> list[Path]:
        folder = self.path
        ranks = _rank_folders(folder)
        if ranks:  # a complete checkpoint as MindSpore's tools take one: rank_0/x.ckpt
            return [_rank_file(ranks[0])]
        for index in (NAME_MAP, "model.safetensors.index.json"):
            if (folder / index).is_file():
                try:
                    weight_map = json.loads((folder / index).read_text())["weight_map"]
                except (ValueError, KeyError, TypeError):
                    raise ConvertError(f"{folder / index}: not a valid index (needs a 'weight_map' object)") from None
                files = sorted({folder / name for name in weight_map.values()})
                missing = [f for f in files if not f.is_file()]
                if missing:
                    raise ConvertError(f"{folder / index}: lists {missing[0].name}, which is missing")
                return files
        files = _checkpoint_files(folder, UsageError)
        if len(files) > 1 and files[0].suffix == ".ckpt":
            raise UsageError(f"--load-dir {folder}: {len(files)} .ckpt files; point --load-dir at one of them")
        return files

    def _complete(self, files: list[Path]) -> None:
        self.files = files
        for path in files:
            opened = _open(path)
            for name in opened.keys():
                if name in self._where:
                    raise ConvertError(f"{path}: '{name}' is also in {self._where[name].path}")
                self._where[name] = opened
                self._shapes[name] = opened.shape_dtype(name)

    # ---- distributed checkpoints -------------------------------------------------------------

    def _distributed(self) -> None:
        if self.strategy is None:
            raise UsageError(f"--load-dir {self.path}: a distributed checkpoint (rank_* folders) needs --src-strategy")
        ranks = _rank_folders(self.path)
        world = self.strategy.world_size
        for rank in range(world):
            if rank not in ranks:
                raise ConvertError(f"{self.path}: rank_{rank} is missing (the strategy {self.strategy.source} "
                                   f"has {world} ranks)")
        extra = sorted(r for r in ranks if r >= world)
        if extra:
            raise ConvertError(f"{self.path / f'rank_{extra[0]}'}: not part of the strategy ({world} ranks)")
        self.files = [_rank_file(ranks[r]) for r in range(world)]
        self._ranks = {rank: _open(path) for rank, path in enumerate(self.files)}
        names: dict[str, tuple] = {}
        for rank, opened in self._ranks.items():
            for name in opened.keys():
                if not self.strategy.holds(name, rank):
                    raise ConvertError(f"{opened.path}: holds '{name}', which the strategy puts on another stage")
                names.setdefault(name, opened.shape_dtype(name))
        for name, (stored, dtype) in names.items():
            layout = self.strategy.layouts.get(name)
            if layout is None:  # not in the strategy (e.g. step counters): every rank holds it whole
                self._shapes[name] = (tuple(stored), dtype)
                continue
            splits = list(layout.splits())
            if layout.opt_shard_size and splits:
                splits[0] *= layout.opt_shards()
            if len(splits) != len(stored):
                raise ConvertError(f"{self.strategy.source}: '{name}' has a {len(splits)}-dimensional layout, the "
                                   f"checkpoint a {len(stored)}-dimensional slice")
            full = tuple(n * s for n, s in zip(stored, splits))
            self._shapes[name] = (full, dtype)
            for rank, opened in self._ranks.items():
                if self.strategy.holds(name, rank):
                    if name not in opened:
                        raise ConvertError(f"{opened.path}: '{name}' is missing (the strategy puts a slice of it here)")
                    want = tuple(b - a for a, b in self.strategy.slice_of(name, full, rank))
                    got, got_dtype = opened.shape_dtype(name)
                    if tuple(got) != want or got_dtype != dtype:
                        raise ConvertError(f"{opened.path}: '{name}' is {list(got)} {got_dtype}; the strategy "
                                           f"{self.strategy.source} gives this rank {list(want)} {dtype}")

    # ---- reading -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._shapes:
            raise ConvertError(f"{self.path}: tensor '{name}' not found in the checkpoint")
        return self._shapes[name]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        shape, dtype = self.shape_dtype(name)
        out = torch.empty(shape, dtype=dtype) if out is None else out
        if not self._ranks:
            self._where[name].read_rows(name, 0, shape[0] if shape else 1, out.view(shape) if shape else out)
            return out
        layout_rank = self.strategy.sources(name, shape) if name in self.strategy.layouts else {
            tuple((0, n) for n in shape): 0}
        for ranges, rank in layout_rank.items():
            piece_shape = tuple(b - a for a, b in ranges)
            view = out[tuple(slice(a, b) for a, b in ranges)]
            if view.is_contiguous():
                target = view
            else:
                target = torch.empty(piece_shape, dtype=dtype)
            self._ranks[rank].read_rows(name, 0, piece_shape[0] if piece_shape else 1,
                                        target.view(piece_shape) if piece_shape else target)
            if target is not view:
                view.copy_(target)
        return out

    def verify(self) -> None:
        """Integrity checks that read whole files (a ckpt's CRC trailer)."""
        for opened in list(self._where.values()) + list(self._ranks.values()):
            if isinstance(opened, MsCkptFile):
                opened.verify_crc()


class LoraMergedStore:
    """A store whose weights come with their MindFormers LoRA adapters merged in (`ms_lora`); the
    adapters sit in the same checkpoint or in another (`--lora-load`)."""

    def __init__(self, base: MsStore, adapters: MsStore, lora: MsLora):
        self.base, self._adapter_store, self.lora = base, adapters, lora
        self.path, self.strategy, self.files = base.path, base.strategy, base.files
        self.adapters = find_adapters(adapters.names(), set(base.names()), str(adapters.path))
        if not self.adapters:
            raise UsageError(f"{adapters.path}: no LoRA adapters to merge (lora_A/lora_B, mindpet_delta_lora_a/b, "
                             f"tk_delta_lora_a/b)")

    def names(self) -> list[str]:
        return [name for name in self.base.names() if not is_adapter(name)]

    def __contains__(self, name: str) -> bool:
        return name in self.base and not is_adapter(name)

    def shape_dtype(self, name: str):
        return self.base.shape_dtype(name)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.base.read(name)
        if name in self.adapters:
            a_name, b_name = self.adapters[name]
            weight = merged(weight, self._adapter_store.read(a_name), self._adapter_store.read(b_name), self.lora, name)
        return weight if out is None else out.copy_(weight)

    def verify(self) -> None:
        self.base.verify()
        if self._adapter_store is not self.base:
            self._adapter_store.verify()


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


def message_shapes(naming, family, dims):
    """(kind, layer, {global Megatron name: shape}) of every message."""
    for kind, layer, tensors in mapping.model_messages(family, dims, torch.float32):
        yield kind, layer, {name: tuple(t.shape) for name, t in ms_names.global_message(kind, layer, tensors).items()}


def expected_shapes(naming, family, dims) -> dict[str, tuple[int, ...]]:
    expected = {}
    for kind, layer, tensors in mapping.model_messages(family, dims, torch.float32):
        expected.update({name: tuple(t.shape) for name, t in ms_names.to_ms(naming, kind, layer, tensors, dims).items()})
    return expected


def check_accounted(store: MsStore, naming, family, dims) -> None:
    """Every tensor of the checkpoint is one the naming expects, with the expected shape, or is
    training state; nothing is missing."""
    expected = expected_shapes(naming, family, dims)
    present = set(store.names())
    for name in sorted(present & set(expected)):
        shape = tuple(store.shape_dtype(name)[0])
        if shape != expected[name]:
            how = f" (assembled by the strategy {store.strategy.source})" if store.strategy else ""
            raise ConvertError(f"{store.path}: '{name}' is {list(shape)}{how}; the model (config.json, naming "
                               f"'{naming.name}') has {list(expected[name])}")
    missing = sorted(set(expected) - present)
    if missing:
        raise ConvertError(f"{store.path}: tensor '{missing[0]}' ({len(missing)} in all) is missing for MindSpore "
                           f"naming '{naming.name}' of --model-type-hf {family.name}")
    unexplained = sorted(name for name in present - set(expected) if not ms_names.is_training_state(name)
                         and not is_adapter(name))
    if unexplained:
        raise ConvertError(f"{store.path}: tensor '{unexplained[0]}' ({len(unexplained)} in all) is not explained by "
                           f"MindSpore naming '{naming.name}' of --model-type-hf {family.name} (another family or "
                           f"naming? try --ms-naming)")


def open_store(path: Path, options: dict):
    """The checkpoint at `path`; with `options["lora"]` its weights merged with their adapters."""
    strategy = options.get("src_strategy")
    store = MsStore(path, load_strategy(strategy) if strategy else None)
    lora = options.get("lora")
    if not lora or lora.get("export"):
        return store
    adapters = MsStore(lora["load"], load_strategy(strategy) if strategy else None) if lora.get("load") else store
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
    for kind, layer, shapes in message_shapes(naming, family, dims):
        for name, tensor in ms_names.from_ms(naming, kind, layer, shapes, dims, meta).items():
            found[mapping.message_key(kind, layer, name)] = tensor.dtype
    model = found[mapping.message_key("embeddings", None, mapping.EMBEDDING)]
    return model, {key: dtype for key, dtype in found.items() if dtype != model}


def load(plan, sender) -> dict:
    """Stream a MindSpore checkpoint as whole Megatron tensors."""
    from modellink_ckpt.pipeline import message_bytes

    options = plan.source_options
    store = open_store(plan.load_dir, options)
    store.verify()
    naming = ms_names.load_naming(plan.family, options["naming"])
    family, dims = plan.family, plan.dims
    dtype, dtypes = message_dtypes(store, naming, family, dims)
    messages = list(message_shapes(naming, family, dims))
    sender.plan(max(message_bytes(torch.Size(s).numel() * 4 for s in shapes.values()) for _, _, shapes in messages))
    hf_config = json.loads(Path(options["config"]).read_text())
    sender.send("meta", dims=dims.to_dict(), source="ms", dtype=dtype, dtypes=dtypes, hf_config=hf_config)
    target_computes = registry.target(plan.target_format).computes_on(plan)
    cast = plan.params_dtype is not None and plan.params_dtype != dtype  # every tensor computed on

    orders = {}  # each transform's row order, found once
    for kind, layer, shapes in messages:
        rules = {rule.mcore: rule for rule in mapping.message_rules(kind, family, dims, layer)}
        arena = sender.arena()
        tensors = read_message(store, naming, kind, layer, shapes, dims, arena,
                               lambda local: not cast and local in rules and not target_computes(rules[local]),
                               orders)
        sender.send(kind, tensors, arena, layer=layer)
    sender.send("done")
    return {}


class MsSourceFormat(registry.SourceFormat):
    name = "ms"
    description = "MindSpore / MindFormers checkpoint (.ckpt or safetensors; complete, or distributed with a strategy)"
    loader = "modellink_ckpt.loaders.ms:load"

    def describe(self, request: registry.SourceRequest) -> registry.SourceInfo:
        options = dict(request.options)
        store = open_store(request.load_dir, options)
        config_path = _config_path(request, request.load_dir)
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise ConvertError(f"{config_path}: not valid JSON ({exc})") from None
        dims = dims_from_hf_config(request.family, config, source=str(config_path), overrides=request.overrides)
        if dims.mtp_num_layers:
            raise UsageError("--load-model-type ms: multi-token-prediction layers are not supported")
        if not options.get("lora") and any(is_adapter(name) for name in store.names()):
            raise UsageError(f"--load-dir {request.load_dir}: holds LoRA adapters; pass --lora-scaling (or --lora-r "
                             f"and --lora-alpha) to merge them, or --save-lora-to-hf to export them")
        options["naming"] = options.get("naming") or _recorded_naming(request.load_dir) or \
            ms_names.detect_naming(store.names())
        naming = ms_names.load_naming(request.family, options["naming"])
        check_accounted(store, naming, request.family, dims)
        dtype, _ = message_dtypes(store, naming, request.family, dims)
        options["config"] = str(config_path)
        folder = request.load_dir if request.load_dir.is_dir() else request.load_dir.parent
        recorded = (read_manifest(folder) or {}).get("model_type_hf")
        return registry.SourceInfo(dims=dims, dtype=dtype, options=options, config_path=config_path,
                                   recorded_family=(recorded, f"{folder / MANIFEST}")
                                   if isinstance(recorded, str) else None)

    def family_hint(self, path: Path, cfg_path=None) -> tuple[str, str] | None:
        from modellink_ckpt.model_cfg import families_for_config

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
        if _rank_folders(path) or (path / NAME_MAP).is_file() or any(path.glob("*.ckpt")):
            return True
        return any(SafetensorsFile(f).metadata.get("format") == "ms" for f in sorted(path.glob("*.safetensors"))[:1])

    def inspect(self, path: Path) -> dict:
        store = MsStore(path) if not _rank_folders(path) or len(_rank_folders(path)) == 1 else None
        if store is None:
            ranks = _rank_folders(path)
            files = {str(_rank_file(ranks[r]).relative_to(path)): _rank_file(ranks[r]).stat().st_size
                     for r in sorted(ranks)}
            first = _open(_rank_file(ranks[min(ranks)]))
            names = list(first.keys())
            return {"format": "ms (distributed)", "ranks": len(ranks), "naming": ms_names.detect_naming(names),
                    "tensors on rank 0": len(names), "files": files}
        dtypes, params = registry.census(store.shape_dtype(name) for name in store.names())
        layers = {n.split(".")[2] for n in store.names() if n.startswith(("decoder.layers.", "model.layers."))}
        return {"format": "ms", "naming": ms_names.detect_naming(store.names()), "layers": len(layers),
                "tensors": len(store.names()), "parameters": params, "dtypes": dtypes,
                "files": {str(f.name): f.stat().st_size for f in store.files}}


SOURCE = MsSourceFormat()
