"""Saver for Megatron `torch_dist` checkpoints (`--save-model-type mg --ckpt-format torch_dist`).

What megatron-core's `dist_checkpointing` stores for a `GPTModel`, written without megatron-core:
every tensor under its sharded key as one global tensor (layer tensors stacked on a leading
global-layer axis, routed experts on a global-expert axis, the vocabulary padded for the target
TP), written one layer chunk at a time as the messages arrive; one `_extra_state` object (None)
per linear module and layer, as megatron's strict load requests them; `common.pt` with the stored
args (loadable with `weights_only=True`: the training run's args with the target's layout fields,
or args built from the model); `.metadata` (torch's own Metadata classes); `metadata.json` last.
Megatron-LM resumes from it with its usual arguments (no optimizer or RNG state is stored: the
args say so, `no_save_optim` / `no_save_rng`).
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import torch
from tqdm import tqdm

from modellink_ckpt import mapping, mg_names, registry
from modellink_ckpt import transforms as T
from modellink_ckpt.errors import UsageError
from modellink_ckpt.file_io import HashedFile
from modellink_ckpt.formats.torch_dist import BACKEND, COMMON, DCP_METADATA, METADATA_JSON
from modellink_ckpt.formats.torch_zip import StreamingTorchWriter
from modellink_ckpt.loaders.mg import TRACKER, iteration_dir_name
from modellink_ckpt.manifest import hash_files, write_manifest
from modellink_ckpt.megatron_args import carry_over, make_args, mark_weights_only
from modellink_ckpt.savers.mg import MegatronTargetFormat
from modellink_ckpt.staging import StagedIteration

DATA_FILE = "__0_0.distcp"
LAYERS = "decoder.layers."
EXPERTS = "mlp.experts.experts."
ITERATION = 1


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
        self.local = plan.target_spelling.transformer_impl == "local"
        impl = "local" if self.local and self.dims.multi_latent_attention else "transformer_engine"
        self.spelling = mg_names.Spelling(impl, "per_expert", "mcore")
        moe = set(self.dims.moe_layers) if self.dims.num_experts else set()
        self.stacked = not moe or moe == set(range(self.dims.num_layers))
        self.num_layers = self.dims.num_layers

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
            tensor = tensors[file_rule.parts[0]]
            out.append((file_rule.file, tuple(tensor.shape), (0,) * tensor.dim(), tensor))
            if file_rule.file.endswith("eh_proj.weight"):
                objects.append((file_rule.file[:-len(".weight")] + "._extra_state", (), ()))
        return out, objects

    def _layer_chunks(self, layer: int, file_rules, tensors: dict, prefix: str | None = None):
        moe = self.dims.is_moe_layer(layer)
        out, modules = [], {}  # (module, leading offsets) -> leading global dims
        for rule in file_rules:
            tensor = rule.join([tensors[p] for p in rule.parts]) if rule.join else tensors[rule.parts[0]]
            key, lead_shape, lead_offsets = self._layer_key(layer, rule.file, moe, prefix)
            out.append((key, lead_shape + tuple(tensor.shape), lead_offsets + (0,) * tensor.dim(), tensor))
            if key.endswith(".weight") and key.split(".")[-2].startswith("linear_"):  # a linear module
                modules[key[:-len(".weight")], lead_offsets] = lead_shape
        objects = [(f"{module}._extra_state", shape, offsets) for (module, offsets), shape in modules.items()]
        return out, objects

    def plain(self, kind: str, tensors: dict):
        if kind in ("embeddings", "output_layer", "final_norm"):
            out = []
            for rule in mapping.message_rules(kind, self.plan.family, self.plan.dims):
                tensor = tensors[rule.mcore]
                if rule.tp == "vocab":
                    tensor = T.as_tensor(T.pad_vocab(tensor, self.plan.padded_vocab))
                out.append((rule.mcore, tuple(tensor.shape), (0,) * tensor.dim(), tensor))
            return out
        raise UsageError(f"--ckpt-format torch_dist: {kind} messages (multi-token prediction) are not supported")


def object_key(key: str, lead_shape: tuple, offsets: tuple) -> str:
    """A ShardedObject's unique key: `<key>/shard_<offsets>_<global shape>` (megatron's format)."""
    shape, offset = lead_shape or (1,), offsets or (0,)
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


class StoreWriter:
    """The DCP store: chunks and objects appended to one data file as torch.save blobs (what DCP's
    FileSystemWriter writes), then `.metadata`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._file = HashedFile(folder / DATA_FILE)
        self.tensors: dict[str, dict] = {}   # key -> {shape, dtype, chunks: [(offsets, sizes, offset, length)]}
        self.objects: dict[str, tuple[int, int]] = {}
        self.tensor_bytes = 0

    def _blob(self, obj, tensor: torch.Tensor | None = None) -> tuple[int, int]:
        """A torch.save blob of `obj` (or of `tensor`, its bytes written straight from its memory)
        appended to the data file: (offset, length)."""
        start = self._file.size
        writer = StreamingTorchWriter(self.folder / DATA_FILE, sink=self._file)
        writer.close(writer.add_tensor(tensor) if tensor is not None else obj)
        return start, self._file.size - start

    def add_chunk(self, key: str, shape: tuple, offsets: tuple, tensor: torch.Tensor) -> None:
        lead = len(shape) - tensor.dim()
        sizes = (1,) * lead + tuple(tensor.shape)
        entry = self.tensors.setdefault(key, {"shape": shape, "dtype": tensor.dtype, "chunks": []})
        if entry["shape"] != shape or entry["dtype"] != tensor.dtype:
            raise UsageError(f"torch_dist key '{key}': {list(shape)} {tensor.dtype} does not match its other chunks "
                             f"({list(entry['shape'])} {entry['dtype']})")
        where = self._blob(None, T.as_tensor(tensor).detach().reshape(sizes))
        entry["chunks"].append((offsets, sizes) + where)
        self.tensor_bytes += tensor.numel() * tensor.element_size()

    def add_object(self, unique_key: str, obj) -> None:
        self.objects[unique_key] = self._blob([obj])

    def close(self) -> tuple[int, str]:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                           MetadataIndex, TensorProperties, TensorStorageMetadata)

        state, storage = {}, {}
        for key, entry in self.tensors.items():
            chunks = []
            for offsets, sizes, start, length in entry["chunks"]:
                chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
                storage[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(DATA_FILE, start, length)
            state[key] = TensorStorageMetadata(TensorProperties(dtype=entry["dtype"]), torch.Size(entry["shape"]), chunks)
        for key, (start, length) in self.objects.items():
            state[key] = BytesStorageMetadata()
            storage[MetadataIndex(key)] = _StorageInfo(DATA_FILE, start, length)
        metadata = Metadata(state_dict_metadata=state, storage_data=storage)
        with open(self.folder / DCP_METADATA, "wb") as f:
            pickle.dump(metadata, f)
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()


def stored_args(plan, model_dtype: torch.dtype, iteration):
    """common.pt's args: the source run's (a Megatron source) with the target's layout, or built."""
    args = make_args(plan.dims, plan.target_layout, padded_vocab=plan.padded_vocab, divisible_by=plan.divisible_by,
                     dtype=model_dtype, spelling=plan.target_spelling, model_type_hf=plan.family.name,
                     iteration=iteration)
    if plan.load_type in ("mg", "optim"):
        source = registry.source(plan.load_type).open(plan.load_dir)
        args = carry_over(source.args, args, drop_prefixes=("lora_",) if plan.lora is not None else (),
                          ckpt_format="torch_dist")
    else:
        args.ckpt_format, args.use_dist_ckpt = "torch_dist", True
    return mark_weights_only(args)


def save(plan, receiver) -> dict:
    started = time.monotonic()
    messages = iter(receiver)
    meta = next(messages)
    dtypes = mapping.TensorDtypes.from_meta(meta, cast=plan.params_dtype)
    keys = DistKeys(plan)
    iteration = registry.source(plan.load_type).open(plan.load_dir).iteration \
        if plan.load_type in ("mg", "optim") else ITERATION
    staging = StagedIteration(plan.save_dir, iteration_dir_name(iteration), TRACKER, plan.overwrite)
    folder = staging.folder
    store = StoreWriter(folder)
    progress = tqdm(total=plan.dims.num_layers, desc="saving layers", unit="layer", disable=plan.quiet)
    try:
        for message in messages:
            if message.kind in ("meta", "done"):
                continue
            layer = message.get("layer")
            typed = {name: dtypes.apply(message.kind, layer, name, t) for name, t in message.tensors.items()}
            if message.kind in ("layer", "mtp_layer"):
                chunks, objects = (keys.layer if message.kind == "layer" else keys.mtp_layer)(layer, typed)
                for key, lead_shape, offsets in objects:
                    store.add_object(object_key(key, lead_shape, offsets), None)
                progress.update(message.kind == "layer")
            else:
                chunks = keys.plain(message.kind, typed)
            for key, shape, offsets, tensor in chunks:
                store.add_chunk(key, shape, offsets, tensor)
        progress.close()
        files = {DATA_FILE: store.close()}
        common = {"args": stored_args(plan, dtypes.default, iteration), "checkpoint_version": 3.0,
                  "iteration": 0 if iteration == "release" else iteration,
                  "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}}
        writer = StreamingTorchWriter(folder / COMMON)  # writes Megatron's enums of a training run's args back
        writer.close(common)
        files[COMMON] = (writer.size, writer.digest)
        files.update(hash_files(folder, [DCP_METADATA]))
        (folder / METADATA_JSON).write_text(json.dumps(BACKEND))  # last: marks the store complete
        files.update(hash_files(folder, [METADATA_JSON]))
        write_manifest(folder, files, kind="mg-torch_dist", iteration=iteration, model_type_hf=plan.family.name,
                       source={"type": plan.load_type, "dir": str(Path(plan.load_dir).resolve())},
                       layout=plan.target_layout.describe(), dtype=str(dtypes.default),
                       vocab_size=plan.dims.vocab_size, padded_vocab_size=plan.padded_vocab,
                       dtypes={key: str(entry["dtype"]) for key, entry in store.tensors.items()
                               if entry["dtype"] != dtypes.default})  # kept as stored (an fp32 router)
        staging.publish(iteration)
    except BaseException:
        progress.close()
        store.abort()
        staging.discard()
        raise
    return {"bytes": store.tensor_bytes, "seconds": time.monotonic() - started, "target": str(plan.save_dir),
            "files": len(files)}


class TorchDistTargetFormat(MegatronTargetFormat):
    """A Megatron target in the other `--ckpt-format`: the same target folder and tracker rules."""

    name = "torch_dist"
    description = "Megatron-Core torch_dist checkpoint (torch.distributed.checkpoint store, common.pt, metadata.json)"

    def why_one_process(self, plan) -> str | None:
        return f"a torch_dist target from {plan.load_type} is written by one process"
    saver = "modellink_ckpt.savers.torch_dist:save"

    def check(self, plan) -> None:
        if plan.target_spelling.expert_layout != "per_expert":
            raise UsageError("--ckpt-format torch_dist: --moe-grouped-gemm does not apply (the store keeps every "
                             "expert on a global expert axis, whatever the model's expert layout)")
        super().check(plan)

    def files(self, plan) -> dict[str, int]:
        keys = DistKeys(plan)
        total = 0
        dtype = plan.params_dtype or plan.source_dtype
        for kind, layer, tensors in mapping.model_messages(plan.family, plan.dims, dtype):
            chunks = keys.layer(layer, tensors)[0] if kind == "layer" else \
                keys.mtp_layer(layer, tensors)[0] if kind == "mtp_layer" else keys.plain(kind, tensors)
            total += sum(t.numel() * t.element_size() for _, _, _, t in chunks)
        return {DATA_FILE: total}

    def where(self, plan) -> str:
        return f"{plan.save_dir} (torch_dist, vocabulary padded for {plan.target_layout.summary()})"


TARGET = TorchDistTargetFormat()
