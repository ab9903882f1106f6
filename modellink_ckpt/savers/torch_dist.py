"""Saver for Megatron `torch_dist` checkpoints (`--save-model-type mg --ckpt-format torch_dist`).

What megatron-core's `dist_checkpointing` stores for a `GPTModel`, written without megatron-core:
every tensor under its sharded key as one global tensor (layer tensors stacked on a leading
global-layer axis, routed experts on a global-expert axis, the vocabulary padded for the target
TP), written one layer chunk at a time as the messages arrive, each at the place planned for it
in the one data file from the model sizes (so with `--workers` each worker writes the chunks of
some pipeline stages into that file side by side, and the bytes are the same whatever N); one
`_extra_state` object (None)
per linear module and layer, as megatron's strict load requests them; `common.pt` with the stored
args (loadable with `weights_only=True`: the training run's args with the target's layout fields,
or args built from the model); `.metadata` (torch's own Metadata classes); `metadata.json` last.
Megatron-LM resumes from it with its usual arguments (no optimizer or RNG state is stored: the
args say so, `no_save_optim` / `no_save_rng`).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from pathlib import Path

import torch

from modellink_ckpt.engine import workers
from modellink_ckpt.engine.manifest import check_manifest, hash_files, with_recorded_dtypes, write_manifest
from modellink_ckpt.engine.progress import progress as show_progress
from modellink_ckpt.engine.staging import StagedIteration
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.file_io import HashedFile, PositionalFile
from modellink_ckpt.formats.megatron import names as mg_names
from modellink_ckpt.formats.megatron.args import (carry_over, dims_from_args, make_args, mark_weights_only,
                                                  module_contradictions, spelling_from_args)
from modellink_ckpt.formats.megatron.checkpoint import TRACKER, find_iteration, iteration_dir_name
from modellink_ckpt.formats.mindspore.checkpoint2 import is_checkpoint2
from modellink_ckpt.formats.torch_dist import (BACKEND, COMMON, DCP_METADATA, METADATA_JSON, TorchDistStore,
                                               is_torch_dist)
from modellink_ckpt.formats.torch_zip import StreamingTorchWriter
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.accounting import account
from modellink_ckpt.model.families import family_to_check
from modellink_ckpt.plan import MegatronTarget, Plan, RunSettings
from modellink_ckpt.registry import SourceInfo
from modellink_ckpt.savers.mg import MegatronTargetFormat, target_iteration

DATA_FILE = "__0_0.distcp"
LAYERS = "decoder.layers."
EXPERTS = "mlp.experts.experts."


class DistKeys:
    """Where each message tensor goes in the store: pure, also run on meta tensors (--dry-run,
    --verify). A layer tensor is (key, global shape, chunk offsets); `stacked` stores layers on a
    leading axis (megatron's default), else per-layer keys `decoder.layers.<i>.*` (mixed dense/MoE
    stacks, as megatron writes them)."""

    def __init__(self, plan):
        self.plan, self.dims = plan, plan.dims
        # The keys are those of the spec the consumer builds (megatron's gpt_layer_specs): the local
        # spec's keys map names its norms as the Transformer Engine spec fuses them, except for MLA,
        # whose local spec keeps plain names
        self.local = plan.target.spelling.transformer_impl == "local"
        impl = "local" if self.local and self.dims.multi_latent_attention else "transformer_engine"
        self.spelling = mg_names.Spelling(impl, "per_expert", "mcore")
        moe = set(self.dims.moe_layers) if self.dims.num_experts else set()
        self.stacked = not moe or moe == set(range(self.dims.num_layers))
        self.num_layers = self.dims.num_layers
        self.partial = False  # key only the tensors a message holds (inspect --explain)

    def _layer_key(self, layer: int, file: str, moe: bool, prefix: str | None = None) -> tuple[str, tuple, tuple]:
        """(key, leading global dims, leading offsets) of a layer tensor spelled `file`; with `prefix`
        a layer of its own, never stacked (an MTP layer's decoder layer)."""
        if self.local and moe and file.startswith("pre_mlp_layernorm.") and not self.dims.multi_latent_attention:
            file = "mlp.linear_fc1.layer_norm_" + file.rpartition(".")[2]  # the local spec's keys map, on MoE layers too
        stacked = self.stacked and prefix is None
        lead_shape, lead_offsets = ((self.num_layers,), (layer,)) if stacked else ((), ())
        prefix = prefix or (LAYERS if stacked else f"{LAYERS}{layer}.")
        if file.startswith("mlp.experts.local_experts."):
            expert, rest = file[len("mlp.experts.local_experts."):].split(".", 1)
            return f"{prefix}{EXPERTS}{rest}", lead_shape + (self.dims.num_experts,), lead_offsets + (int(expert),)
        return prefix + file, lead_shape, lead_offsets

    def layer(self, layer: int, tensors: dict):
        """[(key, global shape, offsets, tensor)] of one layer message, and its extra-state objects."""
        rules = mapping.layer_rules(self.plan.family, self.dims, layer)
        return self._layer_chunks(layer, mg_names.layer_file_rules(rules, self.dims, self.spelling, 1), tensors)

    def mtp_layer(self, k: int, tensors: dict):
        """Multi-token-prediction layer `k` as megatron-core keys it: `mtp.layers.<k>.{enorm, hnorm,
        eh_proj, final_layernorm}` and its decoder layer under `mtp.layers.<k>.transformer_layer.`
        (a layer of its own, not on the decoder's layer axis); HF's embedding/head copies have none."""
        rules = mapping.mtp_rules(self.plan.family, self.dims, k)
        (_, inner_files), (own, own_files) = mg_names.mtp_file_rules(rules, self.dims, self.spelling, 1, k)
        inner = {name[len(mg_names.MTP_INNER):]: t for name, t in tensors.items() if name.startswith(mg_names.MTP_INNER)}
        prefix = f"mtp.layers.{k}.{mg_names.MTP_INNER}"
        out, objects = self._layer_chunks(self.num_layers + k, [f for f, _ in inner_files], inner, prefix)
        for file_rule, _ in own_files:
            if self.partial and file_rule.parts[0] not in tensors:
                continue
            tensor = tensors[file_rule.parts[0]]
            out.append((file_rule.file, tuple(tensor.shape), (0,) * tensor.dim(), tensor))
            if file_rule.file.endswith("eh_proj.weight"):
                objects.append((file_rule.file[:-len(".weight")] + "._extra_state", (), ()))
        return out, objects

    def _layer_chunks(self, layer: int, file_rules, tensors: dict, prefix: str | None = None):
        moe = self.dims.is_moe_layer(layer)
        out, modules = [], {}  # (module, leading offsets) -> leading global dims
        for rule in file_rules:
            if self.partial and not all(part in tensors for part in rule.parts):
                continue
            tensor = rule.join([tensors[p] for p in rule.parts]) if rule.join else tensors[rule.parts[0]]
            key, lead_shape, lead_offsets = self._layer_key(layer, rule.file, moe, prefix)
            out.append((key, lead_shape + tuple(tensor.shape), lead_offsets + (0,) * tensor.dim(), tensor))
            if key.endswith(".weight") and key.split(".")[-2].startswith("linear_"):  # a linear module
                modules[key[:-len(".weight")], lead_offsets] = lead_shape
        objects = [(f"{module}._extra_state", shape, offsets) for (module, offsets), shape in modules.items()]
        return out, objects

    def message(self, kind: str, layer: int | None, tensors: dict):
        """(chunks, extra-state objects) of one message."""
        if kind == "layer":
            return self.layer(layer, tensors)
        if kind == "mtp_layer":
            return self.mtp_layer(layer, tensors)
        return self.plain(kind, tensors), []

    def plain(self, kind: str, tensors: dict):
        if kind in ("embeddings", "output_layer", "final_norm"):
            out = []
            for rule in mapping.message_rules(kind, self.plan.family, self.plan.dims):
                if self.partial and rule.mcore not in tensors:
                    continue
                tensor = tensors[rule.mcore]
                if rule.tp == "vocab":
                    tensor = T.as_tensor(T.pad_vocab(tensor, self.plan.target.padded_vocab))
                out.append((rule.mcore, tuple(tensor.shape), (0,) * tensor.dim(), tensor))
            return out
        raise UsageError(f"--ckpt-format torch_dist: {kind} messages (multi-token prediction) are not supported")


def object_key(key: str, lead_shape: tuple, offsets: tuple) -> str:
    """A ShardedObject's unique key: `<key>/shard_<offsets>_<global shape>` (megatron's format)."""
    shape, offset = lead_shape or (1,), offsets or (0,)
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


@dataclasses.dataclass(frozen=True)
class Blob:
    """One `torch.save` blob of the data file, at [start, start + length): a chunk of a sharded
    tensor (`key` and where the chunk lies in it) or, without `dtype`, a ShardedObject."""

    key: str
    start: int
    length: int
    shape: tuple = ()
    offsets: tuple = ()
    sizes: tuple = ()
    dtype: torch.dtype | None = None


class _Counter:
    """A StreamingTorchWriter sink that only counts: a blob's length without writing it (a blob's
    bytes but for the tensor data depend only on shapes and dtypes)."""

    size = 0

    def write(self, data) -> None:
        self.size += len(data)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self.size += tensor.numel() * tensor.element_size()


def _blob(sink, obj=None, tensor: torch.Tensor | None = None) -> int:
    """Write a torch.save blob of `obj` (or of `tensor`, its bytes straight from its memory or its
    source file) to `sink` at its position; returns its length."""
    start = sink.size
    writer = StreamingTorchWriter(Path(DATA_FILE), sink=sink)
    writer.close(writer.add_tensor(tensor) if tensor is not None else obj)
    return sink.size - start


class StoreLayout:
    """Every blob of the store at its place in the one data file, planned from the model sizes
    (pure): in message order, each layer's objects before its chunks, as one saver appends them.
    Several workers (`--workers`) write their messages' blobs at these places side by side."""

    def __init__(self, plan, dtypes: mapping.TensorDtypes):
        keys, lengths, size = DistKeys(plan), {}, 0
        self.blobs: list[Blob] = []
        object_length = _blob(_Counter(), [None])
        for kind, layer, tensors in mapping.model_messages(plan.family, plan.dims, dtypes.default):
            typed = {name: dtypes.apply(kind, layer, name, t) for name, t in tensors.items()}
            chunks, objects = keys.message(kind, layer, typed)
            for key, lead_shape, offsets in objects:
                self.blobs.append(Blob(object_key(key, lead_shape, offsets), size, object_length))
                size += object_length
            for key, shape, offsets, tensor in chunks:
                sizes = (1,) * (len(shape) - tensor.dim()) + tuple(tensor.shape)
                if (sizes, tensor.dtype) not in lengths:
                    lengths[sizes, tensor.dtype] = _blob(_Counter(), tensor=tensor.reshape(sizes))
                self.blobs.append(Blob(key, size, lengths[sizes, tensor.dtype], shape, offsets, sizes, tensor.dtype))
                size += lengths[sizes, tensor.dtype]
        self.size = size
        self._at = {(blob.key, blob.offsets): blob for blob in self.blobs}

    def at(self, key: str, offsets: tuple = ()) -> Blob:
        return self._at[key, tuple(offsets)]

    def dtypes(self) -> dict[str, torch.dtype]:
        return {blob.key: blob.dtype for blob in self.blobs if blob.dtype is not None}

    def write_metadata(self, folder: Path) -> None:
        """`.metadata`: torch's own Metadata of every key (tensors in order of first chunk, then
        objects), every chunk's place in the data file."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                           MetadataIndex, TensorProperties, TensorStorageMetadata)

        chunks: dict[str, list[Blob]] = {}
        for blob in self.blobs:
            if blob.dtype is not None:
                chunks.setdefault(blob.key, []).append(blob)
        state, storage = {}, {}
        for key, blobs in chunks.items():
            state[key] = TensorStorageMetadata(TensorProperties(dtype=blobs[0].dtype), torch.Size(blobs[0].shape),
                                               [ChunkStorageMetadata(torch.Size(b.offsets), torch.Size(b.sizes))
                                                for b in blobs])
            for b in blobs:
                storage[MetadataIndex(key, torch.Size(b.offsets))] = _StorageInfo(DATA_FILE, b.start, b.length)
        for blob in (b for b in self.blobs if b.dtype is None):
            state[blob.key] = BytesStorageMetadata()
            storage[MetadataIndex(blob.key)] = _StorageInfo(DATA_FILE, blob.start, blob.length)
        metadata = Metadata(state_dict_metadata=state, storage_data=storage)
        with open(folder / DCP_METADATA, "wb") as f:
            pickle.dump(metadata, f)


class _At:
    """A StreamingTorchWriter sink writing at a planned offset of a file others write too."""

    def __init__(self, file: PositionalFile, start: int):
        self._file, self.size = file, start

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._file.write_at(self.size, view)
        self.size += len(view)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self.size += self._file.write_tensor_at(self.size, tensor)


class StoreWriter:
    """The data file of the store, each blob at its planned place: appended and hashed as it goes
    (one saver, whose messages arrive in the planned order), or with `shared` written at its
    offset into a file several workers fill (hashed once all are done)."""

    def __init__(self, folder: Path, layout: StoreLayout, shared: bool = False):
        self.layout, self.tensor_bytes = layout, 0
        self._file = PositionalFile(folder / DATA_FILE, layout.size) if shared else HashedFile(folder / DATA_FILE)
        self._shared = shared

    def _write(self, blob: Blob, obj=None, tensor: torch.Tensor | None = None) -> None:
        sink = _At(self._file, blob.start) if self._shared else self._file
        if sink.size != blob.start:
            raise ConvertError(f"torch_dist store: '{blob.key}' arrived out of its planned order")
        if _blob(sink, obj, tensor) != blob.length:
            raise ConvertError(f"torch_dist store: '{blob.key}' is not the planned {blob.length} bytes")

    def add_chunk(self, key: str, shape: tuple, offsets: tuple, tensor: torch.Tensor) -> None:
        blob = self.layout.at(key, offsets)
        if (tuple(shape), tensor.dtype) != (tuple(blob.shape), blob.dtype):
            raise UsageError(f"torch_dist key '{key}': {list(shape)} {tensor.dtype} does not match its plan "
                             f"({list(blob.shape)} {blob.dtype})")
        self._write(blob, tensor=T.as_tensor(tensor).detach().reshape(blob.sizes))
        self.tensor_bytes += tensor.numel() * tensor.element_size()

    def add_object(self, unique_key: str, obj) -> None:
        self._write(self.layout.at(unique_key), [obj])

    def close(self) -> tuple[int, str] | None:
        """(bytes, digest) of the data file (None when shared: hashed once every worker is done)."""
        if self._shared:
            self._file.close()
            return None
        if self._file.size != self.layout.size:
            raise ConvertError(f"torch_dist store: {self._file.size} of the planned {self.layout.size} bytes written")
        return self._file.close()

    def abort(self) -> None:
        if self._shared:
            self._file.close()
        else:
            self._file.abort()


def stored_args(plan, model_dtype: torch.dtype, iteration):
    """common.pt's args: the source run's (a Megatron source) with the target's layout, or built."""
    args = make_args(plan.dims, plan.target.layout, padded_vocab=plan.target.padded_vocab, divisible_by=plan.target.divisible_by,
                     dtype=model_dtype, spelling=plan.target.spelling, model_type_hf=plan.family.name,
                     iteration=iteration)
    if plan.source.args is not None:  # a Megatron source: its run's args carried over
        args = carry_over(plan.source.args, args, drop_prefixes=("lora_",) if plan.source.lora is not None else (),
                          ckpt_format="torch_dist")
    else:
        args.ckpt_format, args.use_dist_ckpt = "torch_dist", True
    return mark_weights_only(args)


def save(plan, receiver) -> dict:
    """Write the store, or with `plan.share` (`--workers`) the blobs of the share's messages into the
    data file of the folder the parent staged (the parent then publishes it, `publish_shares`)."""
    started = time.monotonic()
    messages = iter(receiver)
    meta = next(messages)
    share = getattr(plan, "share", None)
    dtypes = mapping.TensorDtypes.from_meta(meta, cast=plan.target.params_dtype)
    keys, layout = DistKeys(plan), StoreLayout(plan, dtypes)
    iteration = target_iteration(plan)
    staging = None if share else StagedIteration(plan.target.path, iteration_dir_name(iteration), TRACKER, plan.run.overwrite)
    folder = Path(share.folder) if share else staging.folder
    store = StoreWriter(folder, layout, shared=share is not None)
    layers = workers.written_layers(plan)
    progress = show_progress(total=layers, desc="saving layers", unit="layer", quiet=plan.run.quiet)
    try:
        for message in workers.owned(plan, messages):
            if message.kind in ("meta", "done"):
                continue
            layer = message.get("layer")
            typed = {name: dtypes.apply(message.kind, layer, name, t) for name, t in message.tensors.items()}
            chunks, objects = keys.message(message.kind, layer, typed)
            for key, lead_shape, offsets in objects:
                store.add_object(object_key(key, lead_shape, offsets), None)
            for key, shape, offsets, tensor in chunks:
                store.add_chunk(key, shape, offsets, tensor)
            progress.update(message.kind == "layer")
        progress.close()
        data = store.close()
        written = {DATA_FILE: data} if data is not None else {}
        if share is None or share.index == 0:  # the rest of the store: written once
            layout.write_metadata(folder)
            common = {"args": stored_args(plan, dtypes.default, iteration), "checkpoint_version": 3.0,
                      "iteration": 0 if iteration == "release" else iteration,
                      "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}}
            writer = StreamingTorchWriter(folder / COMMON)  # writes Megatron's enums of a training run's args back
            writer.close(common)
            written[COMMON] = (writer.size, writer.digest)
            written.update(hash_files(folder, [DCP_METADATA]))
        manifest = dict(kind="mg-torch_dist", iteration=iteration, model_type_hf=plan.family.name,
                        source={"type": plan.source.format, "dir": str(Path(plan.source.path).resolve())},
                        layout=plan.target.layout.describe(), dtype=str(dtypes.default),
                        vocab_size=plan.dims.vocab_size, padded_vocab_size=plan.target.padded_vocab,
                        dtypes={key: str(dtype) for key, dtype in layout.dtypes().items()
                                if dtype != dtypes.default})  # kept as stored (an fp32 router)
        if staging is not None:
            written = _complete(folder, written, manifest)
            staging.publish(iteration)
    except BaseException:
        progress.close()
        store.abort()
        if staging is not None:
            staging.discard()
        raise
    return {"bytes": store.tensor_bytes, "seconds": time.monotonic() - started, "target": str(plan.target.path),
            "files": len(written), "written": written, "manifest": manifest}


def _complete(folder: Path, written: dict, manifest: dict) -> dict:
    """metadata.json, which marks the store complete, then the manifest of every file (returned)."""
    (folder / METADATA_JSON).write_text(json.dumps(BACKEND))
    files = {**written, **hash_files(folder, [METADATA_JSON])}
    write_manifest(folder, files, **manifest)
    return files


def publish_shares(staging: StagedIteration, results: list[dict]) -> dict:
    """Every worker succeeded: hash the data file they filled, complete the store and put it in place."""
    written, manifest = workers.merged_outputs(results)
    written.update(hash_files(staging.folder, [DATA_FILE]))
    files = _complete(staging.folder, written, manifest)
    staging.publish(manifest["iteration"])
    return workers.combined_result(results, files=len(files))


def verify(folder: Path, hash_contents: bool = True, family_name: str | None = None) -> tuple[list[str], str]:
    """A torch_dist checkpoint against its manifest and its own stored args: every key the model
    needs (tensors with their global shape and dtype, extra-state objects) in the store, nothing
    else, and every arg that decides whether a module exists agreeing with the tensors."""
    manifest, problems, files = check_manifest(folder, hash_contents)
    store = TorchDistStore(folder)
    margs = store.common()["args"]
    family = family_to_check(family_name, getattr(margs, "model_type_hf", None), (manifest or {}).get("model_type_hf"))
    dims = dims_from_args(margs, source=str(folder))
    dtype = getattr(margs, "params_dtype", torch.float32)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    plan = Plan(family=family, source=SourceInfo(dims=dims, dtype=dtype), run=RunSettings(),
                target=MegatronTarget(format="torch_dist", path=folder, spelling=spelling_from_args(margs),
                                      padded_vocab=int(getattr(margs, "padded_vocab_size"))))
    keys = DistKeys(plan)
    expected, objects = {}, set()
    for kind, layer, tensors in mapping.model_messages(family, dims, dtype):
        chunks, extra = keys.layer(layer, tensors) if kind == "layer" else keys.mtp_layer(layer, tensors) \
            if kind == "mtp_layer" else (keys.plain(kind, tensors), [])
        expected.update({key: (tuple(shape), t.dtype) for key, shape, _, t in chunks})
        objects |= {object_key(key, shape, offsets) for key, shape, offsets in extra}
    found = {key: (tuple(t.shape), t.dtype) for key, t in store.tensors.items()}
    problems += account(with_recorded_dtypes(expected, manifest), found).problems(str(folder))
    problems += [f"{folder}: {problem}" for problem in module_contradictions(margs, found)]
    problems += [line.replace(" tensor '", " object '") for line in account(objects, store.objects).problems(str(folder))]
    return problems, f"{files}; {len(found)} tensors and {len(store.objects)} objects match the stored args (torch_dist)"


class TorchDistTargetFormat(MegatronTargetFormat):
    """A Megatron target in the other `--ckpt-format`: the same target folder and tracker rules."""

    name = "torch_dist"
    description = "Megatron-Core torch_dist checkpoint (torch.distributed.checkpoint store, common.pt, metadata.json)"
    selected_by = "mg --ckpt-format torch_dist"

    saver = "modellink_ckpt.savers.torch_dist:save"

    def share_plans(self, plan, count: int, folder: str) -> list:
        return workers.message_share_plans(plan, count, folder)  # one data file: any layers, any layout

    def publish(self, staged, results: list[dict]) -> dict:
        return publish_shares(staged, results)

    def check(self, plan) -> None:
        if plan.source.format == "optim":
            raise UsageError("--ckpt-format torch_dist: optimizer state is written in the torch layout only")
        if plan.target.spelling.expert_layout != "per_expert":
            raise UsageError("--ckpt-format torch_dist: --moe-grouped-gemm does not apply (the store keeps every "
                             "expert on a global expert axis, whatever the model's expert layout)")
        super().check(plan)

    def files(self, plan) -> dict[str, int]:
        return {DATA_FILE: StoreLayout(plan, mapping.TensorDtypes(plan.target.params_dtype or plan.source.dtype)).size}

    def where(self, plan) -> str:
        return f"{plan.target.path} (torch_dist, vocabulary padded for {plan.target.layout.summary()})"

    def pieces(self, plan, kind: str, layer: int | None, tensors: dict) -> list[tuple[str, str, torch.Tensor]]:
        """The store's keys, each piece a chunk at its offsets of the global tensor (one data file)."""
        keys = DistKeys(plan)
        keys.partial = True
        chunks, _ = keys.message(kind, layer, tensors)
        return [(DATA_FILE, f"{key} (global {list(shape)}, at {list(offsets)})", T.as_tensor(tensor))
                for key, shape, offsets, tensor in chunks]

    def recognises(self, path: Path) -> Path | None:
        if is_torch_dist(path):
            return path
        if is_checkpoint2(path):  # MindFormers' Checkpoint 2.0 has a tracker of the same name
            return None
        if (path / TRACKER).is_file() and is_torch_dist(find_iteration(path)[1]):
            return find_iteration(path)[1]
        return None

    def verify(self, folder: Path, hash_contents: bool = True, family: str | None = None) -> tuple[list[str], str]:
        return verify(folder, hash_contents, family)


TARGET = TorchDistTargetFormat()
