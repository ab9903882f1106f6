"""Loader for Megatron-Core checkpoints in the legacy torch layout, at any TP/PP/VPP layout.

The layout is read from the stored `args`; rank files are memory-mapped through the restricted
unpickler and merged one layer at a time. Both the local and the Transformer Engine names are
accepted; `_extra_state` entries carry no weights and are skipped. Any other tensor the model
config does not explain is an error, so nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from modellink_ckpt import kernel_copy, mapping, mg_names, registry, workers
from modellink_ckpt import transforms as T
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.layout import ParallelLayout
from modellink_ckpt.megatron_args import dims_from_args, layout_from_args, recorded_computes, spelling_from_args
from modellink_ckpt.file_io import scratch_tensor
from modellink_ckpt.lora import merge_lora
from modellink_ckpt.optim_layout import is_parameter_name
from modellink_ckpt.formats.torch_zip import LazyTensor, load_lazy, loaded

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def find_iteration(directory: Path, flag: str = "--load-dir") -> tuple[int | str, Path]:
    """(iteration, its folder) of a Megatron checkpoint: from the tracker file, or `directory` is
    the iteration folder itself (rank files, or a torch_dist store)."""
    from modellink_ckpt.formats.torch_dist import is_torch_dist

    if not directory.is_dir():
        raise UsageError(f"{flag} {directory}: not a directory")
    tracker = directory / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise ConvertError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
        iter_dir = directory / iteration_dir_name(text)
        if not iter_dir.is_dir():
            raise ConvertError(f"{tracker}: points to {iter_dir.name}, which does not exist")
        return ("release" if text == "release" else int(text)), iter_dir
    if any(directory.glob(f"mp_rank_*/{RANK_FILE}")) or is_torch_dist(directory):
        name = directory.name
        return ("release" if name == "release" else
                int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else 1), directory
    raise UsageError(f"{flag} {directory}: no {TRACKER} (not a complete Megatron checkpoint)")


class MegatronSource:
    """A Megatron checkpoint directory: its tracker, stored args and rank files."""

    def __init__(self, directory: str | Path, *, flag: str = "--load-dir", lora=None, lora_dir: str | Path | None = None,
                 keep_adapters: bool = False):
        """`lora` (a lora.LoraSpec): merge the adapters, held in the same rank files or, with
        `lora_dir`, in the same rank files of another checkpoint, into the weights as they are read.
        `keep_adapters`: read LoRA tensors as they are (to export them)."""
        self.dir = Path(directory)
        self._lora, self._lora_source = lora, MegatronSource(lora_dir, flag="--lora-load") if lora_dir else None
        self._keep_adapters = keep_adapters
        self.iteration, self.iter_dir = find_iteration(self.dir, flag)
        rank_files = sorted(self.iter_dir.glob(f"mp_rank_*/{RANK_FILE}"))
        if not rank_files:
            raise ConvertError(f"{self.iter_dir}: no mp_rank_*/{RANK_FILE} files")
        first = load_lazy(rank_files[0])
        if not isinstance(first, dict) or "args" not in first:
            raise ConvertError(f"{rank_files[0]}: no 'args' stored; cannot tell its layout")
        self.args = first["args"]
        self._cache: dict[tuple[int, int, int], dict] = {}
        self._released: set[int] = set()
        self.checked_stages: set[int] | None = None  # whose tensors must all be used (None: every stage)

    def dims(self, vocab_size: int | None = None, overrides: dict | None = None):
        dims = dims_from_args(self.args, source=str(self.iter_dir), vocab_size=vocab_size)
        if overrides:
            dims = type(dims).from_dict({**dims.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
        return dims

    def layout(self, dims) -> ParallelLayout:
        return layout_from_args(self.args, dims, source=str(self.iter_dir))

    def padded_vocab(self) -> int | None:
        return getattr(self.args, "padded_vocab_size", None)

    def rank_state(self, layout: ParallelLayout, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict:
        key = (tp_rank, pp_rank, ep_rank)
        if key not in self._cache:
            path = self.iter_dir / layout.rank_dir(tp_rank, pp_rank, ep_rank) / RANK_FILE
            if not path.is_file():
                raise ConvertError(f"{path}: missing rank file (the stored args say TP={layout.tp}, PP={layout.pp})")
            models = _model_entries(load_lazy(path), path)
            if self._lora is not None:
                lora_path, lora_models = path, models
                if self._lora_source is not None:
                    lora_path = self._lora_source.iter_dir / layout.rank_dir(tp_rank, pp_rank, ep_rank) / RANK_FILE
                    if not lora_path.is_file():
                        raise ConvertError(f"{lora_path}: missing rank file (the base checkpoint has "
                                           f"{path.parent.name})")
                    lora_models = _model_entries(load_lazy(lora_path), lora_path)
                models = merge_lora(models, lora_models, self._lora, path, lora_path)
            elif not self._keep_adapters and any(".lora_A." in name for sd in models.values() for name in sd):
                raise ConvertError(f"{path}: holds LoRA adapters; pass --lora-r and --lora-alpha to merge them, "
                                   f"or --save-lora-to-hf to export them")
            self._cache[key] = {"path": path, "models": models,
                                "unused": set() if pp_rank in self._released else
                                {(mk, name) for mk, sd in models.items() for name in sd
                                 if not name.endswith("_extra_state")}}
        return self._cache[key]

    def release(self, layout: ParallelLayout, pp_rank: int) -> None:
        """Forget stage `pp_rank`'s files after checking every tensor in them was used (once:
        a stage read again later, for HF's MTP copies of the embedding, is not checked again)."""
        self._released.add(pp_rank)
        for key in [k for k in self._cache if k[1] == pp_rank]:
            entry = self._cache.pop(key)
            if entry["unused"] and (self.checked_stages is None or pp_rank in self.checked_stages):
                model_key, name = sorted(entry["unused"])[0]
                raise ConvertError(f"{entry['path']}: unexpected tensor '{name}' in '{model_key}' "
                                   f"({len(entry['unused'])} in all) that the model config does not explain")

    def spelling(self, layout: ParallelLayout, pp_rank: int) -> mg_names.Spelling:
        """How stage `pp_rank`'s files spell their layers (detected from TP/EP rank 0's names)."""
        models = self.rank_state(layout, 0, pp_rank)["models"]
        return mg_names.detect_spelling(name for state in models.values() for name in state)

    def shards(self, layout: ParallelLayout, pp_rank: int, vchunk: int, name: str, ep_rank: int | None = None,
               required: bool = True) -> list | None:
        """The TP shards of tensor `name` of one stage/chunk, from EP rank `ep_rank`'s files; with
        `ep_rank` None the tensor is one every EP rank holds a copy of (read from EP rank 0)."""
        model_key = layout.model_key(vchunk)
        shards = []
        for tp_rank in range(layout.tp):
            for ep in (range(layout.ep) if ep_rank is None else (ep_rank,)):
                entry = self.rank_state(layout, tp_rank, pp_rank, ep)
                state = entry["models"].get(model_key)
                if state is None:
                    raise ConvertError(f"{entry['path']}: no '{model_key}' entry (VPP chunk {vchunk})")
                if name not in state:
                    if not required:
                        return None
                    raise ConvertError(f"{entry['path']}: missing tensor '{name}' in '{model_key}'")
                entry["unused"].discard((model_key, name))
                if ep == (ep_rank or 0):
                    shards.append(state[name])
        if not shards[0].dtype.is_floating_point:
            raise ConvertError(f"{self.iter_dir}: '{name}' is {str(shards[0].dtype).replace('torch.', '')}; "
                               f"model weights must be floating point")
        return shards

    def take(self, layout: ParallelLayout, pp_rank: int, vchunk: int, name: str, tp_kind: str,
             required: bool = True, out: torch.Tensor | None = None, rows: int | None = None,
             shards: list | None = None) -> torch.Tensor | None:
        """The whole tensor `name` of one stage/chunk, its TP shards read straight into their place
        in `out`; `rows` keeps only the first rows (the unpadded vocabulary)."""
        if shards is None:
            shards = self.shards(layout, pp_rank, vchunk, name, required=required)
            if shards is None:
                return None
        kind = "column" if tp_kind == "vocab" else tp_kind
        merged = _merged_shape(shards, kind)
        if rows is not None:
            if merged[0] < rows:
                raise ConvertError(f"{self.iter_dir}: '{name}' has {merged[0]} rows, fewer than the vocabulary "
                                   f"size {rows}")
            merged = torch.Size((rows, *merged[1:]))
        if out is None:
            out = torch.empty(merged, dtype=shards[0].dtype)
        if out.shape != merged or any(s.dtype != out.dtype for s in shards):
            shapes = ", ".join(f"{list(s.shape)} {s.dtype}" for s in shards)
            raise ConvertError(f"{self.iter_dir}: '{name}' over TP ranks is {shapes}, which does not form "
                               f"{list(out.shape)} {out.dtype}")
        _merge_into(shards, kind, out)
        return out

    def dtype_of(self, layout: ParallelLayout, pp_rank: int, vchunk: int, name: str, ep_rank: int = 0) -> torch.dtype:
        """The dtype `name` is read in, from TP rank 0's file."""
        state = self.rank_state(layout, 0, pp_rank, ep_rank)["models"].get(layout.model_key(vchunk), {})
        return state[name].dtype if name in state else torch.float32  # missing: take() reports it

    def stored_dtype(self, layout: ParallelLayout, pp_rank: int, vchunk: int, name: str, ep_rank: int = 0) -> torch.dtype:
        """The dtype of model weight `name` (from optim, that of the model weight its fp32 master
        weight stands in for)."""
        state = self.rank_state(layout, 0, pp_rank, ep_rank)["models"].get(layout.model_key(vchunk), {})
        tensor = state.get(name)
        return getattr(tensor, "model_dtype", None) or self.dtype_of(layout, pp_rank, vchunk, name, ep_rank)


def _model_entries(state, path) -> dict:
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: not a Megatron checkpoint (no dict inside)")
    models = {k: v for k, v in state.items() if k == "model" or (k.startswith("model") and k[5:].isdigit())}
    if list(models) == ["model0"]:  # a single virtual chunk, as older writers stored it
        models = {"model": models["model0"]}
    if not models:
        raise ConvertError(f"{path}: no 'model' entry")
    return models


def _read_rows(shard, start: int, stop: int, out: torch.Tensor) -> None:
    if isinstance(shard, LazyTensor):
        with kernel_copy.placing():  # placed unchanged: may stay in the file for the saver
            shard.read_rows(start, stop, out)
    else:  # an old non-zip file, loaded whole
        out.copy_(shard[start:stop])


def _merge_into(shards, kind: str, out: torch.Tensor) -> None:
    """The inverse of the TP split of `kind`, reading each shard straight to its place in `out`
    (which may stop early for a vocabulary without its padding)."""
    if kind == "replicated":
        _read_rows(shards[0], 0, shards[0].shape[0] if shards[0].shape else 1, out.view(shards[0].shape))
    elif kind == "column":
        start = 0
        for shard in shards:
            count = min(shard.shape[0], out.shape[0] - start)
            if count > 0:
                _read_rows(shard, 0, count, out[start:start + count])
            start += shard.shape[0]
    elif kind == "gated_column":  # rank r holds [G_r; U_r]
        gate_out, up_out = T.split_gate_up(out)
        start = 0
        for shard in shards:
            half = shard.shape[0] // 2
            _read_rows(shard, 0, half, gate_out[start:start + half])
            _read_rows(shard, half, 2 * half, up_out[start:start + half])
            start += half
    elif kind == "row":  # dim-1 pieces are strided in `out`: read each whole, then place it
        start = 0
        for shard in shards:
            columns = shard.shape[1]
            whole = shard.read_into(scratch_tensor(shard.shape, shard.dtype)) if isinstance(shard, LazyTensor) else shard
            out[:, start:start + columns].copy_(whole)
            start += columns
    else:
        raise ValueError(kind)


def _merged_shape(shards, kind: str) -> torch.Size:
    first = shards[0].shape
    if kind in ("column", "gated_column"):
        return torch.Size((sum(s.shape[0] for s in shards), *first[1:]))
    if kind == "row":
        return torch.Size((first[0], sum(s.shape[1] for s in shards), *first[2:]))
    return first


def state_name(name: str, state: str) -> str:
    """The name of optimizer state `state` (e.g. exp_avg) of tensor `name`: in a source's rank
    dicts `name::state`, in messages `state:name`; the weights themselves keep their names."""
    return f"{name}::{state}" if state else name


def message_state_name(name: str, state: str) -> str:
    return f"{state}:{name}" if state else name


def _read_files(source, layout, dims, spelling, rules, files, pp_rank, vchunk, arena, *, where: str,
                rename=lambda part: part, state: str = "") -> dict[str, torch.Tensor]:
    """Message tensors from rank-file tensors: `files` is [(FileRule, name prefix)], `rules` the
    message rules by name; a fused file tensor (MLA linear_qkv, grouped experts) is read whole and
    split, anything else is read shard by shard straight into place. `state`: read that optimizer
    state of the tensors instead of the tensors."""
    tensors = {}
    for file_rule, prefix in files:
        if state and not is_parameter_name(prefix + file_rule.file):
            continue  # a buffer (a router's expert_bias): no optimizer state
        name = state_name(prefix + file_rule.file, state)
        try:
            shards = source.shards(layout, pp_rank, vchunk, name, ep_rank=file_rule.ep_rank)
            kinds = [mg_names.part_tp_kind(rules[p], spelling.mla, dims, layout.etp, layout.tp) for p in file_rule.parts]
            if file_rule.split is None:
                part_shards = [shards]
            else:
                if all(kind == "replicated" for kind in kinds):
                    shards = shards[:1]
                pieces = [file_rule.split(loaded(shard)) for shard in shards]
                if any(len(p) != len(file_rule.parts) for p in pieces):
                    raise ConvertError(f"'{name}' does not hold {len(file_rule.parts)} parts")
                part_shards = [[p[i] for p in pieces] for i in range(len(file_rule.parts))]
            for part, kind, pshards in zip(file_rule.parts, kinds, part_shards):
                out = arena.alloc(rules[part].shape, pshards[0].dtype)
                tensors[message_state_name(rename(part), state)] = source.take(layout, pp_rank, vchunk, name, kind,
                                                                               out=out, shards=pshards)
        except (ConvertError, RuntimeError) as exc:
            raise ConvertError(f"{where}: {str(exc).splitlines()[0]}") from None
    return tensors


def _same(part: str) -> str:
    return part


def _layer_sources(source, layout, family, dims, hf_layer, slot) -> list[tuple[dict, list, Callable]]:
    """[(message rules by name, [(FileRule, name prefix)], message name of a part)] that make the
    message of HF layer `hf_layer`, in whatever spelling its stage's files use."""
    spelling = source.spelling(layout, slot.pp_rank)
    rules = mapping.layer_rules(family, dims, hf_layer)
    prefix = f"decoder.layers.{slot.local_layer}."
    return [({r.mcore: r for r in rules}, [(f, prefix) for f in mg_names.layer_file_rules(rules, dims, spelling, layout.ep)],
             _same)]


def _mtp_sources(source, layout, family, dims, k) -> list[tuple[dict, list, Callable]]:
    """Like `_layer_sources`, for MTP layer `k` (last stage): its decoder layer and its own tensors."""
    spelling = source.spelling(layout, layout.last_stage[0])
    rules = mapping.mtp_rules(family, dims, k)
    (inner, inner_files), (own, own_files) = mg_names.mtp_file_rules(rules, dims, spelling, layout.ep, k)
    return [({r.mcore: r for r in inner}, inner_files, lambda part: mg_names.MTP_INNER + part),
            ({r.mcore: r for r in own}, own_files, _same)]


def _layer_tensors(source, layout, family, dims, hf_layer, slot, arena, states=("",)) -> dict[str, torch.Tensor]:
    """One layer's message tensors (and optimizer `states` of them)."""
    tensors = {}
    for state in states:
        for rules, files, rename in _layer_sources(source, layout, family, dims, hf_layer, slot):
            tensors.update(_read_files(source, layout, dims, source.spelling(layout, slot.pp_rank), rules, files,
                                       slot.pp_rank, slot.vchunk, arena, where=f"layer {slot.mg_layer}",
                                       rename=rename, state=state))
    return tensors


def _mtp_tensors(source, layout, family, dims, k, arena) -> dict[str, torch.Tensor]:
    """MTP layer `k` from the last stage, with the embedding and output layer copies HF keeps."""
    last_pp, last_chunk = layout.last_stage
    tensors = {}
    for rules, files, rename in _mtp_sources(source, layout, family, dims, k):
        tensors.update(_read_files(source, layout, dims, source.spelling(layout, last_pp), rules, files, last_pp,
                                   last_chunk, arena, where=f"MTP layer {k}", rename=rename))
    for copy, (pp_rank, vchunk, name) in zip(mapping.MTP_COPIES, _vocab_tensors(layout, dims)):
        out = arena.alloc((dims.vocab_size, dims.hidden_size), source.dtype_of(layout, pp_rank, vchunk, name))
        tensors[copy] = source.take(layout, pp_rank, vchunk, name, "vocab", out=out, rows=dims.vocab_size)
    return tensors


def _vocab_tensors(layout, dims) -> list[tuple[int, int, str]]:
    """(stage, chunk, name) of the embedding and of the output layer (the embedding when tied)."""
    first_pp, first_chunk = layout.first_stage
    last_pp, last_chunk = layout.last_stage
    output = (first_pp, first_chunk, mapping.EMBEDDING) if dims.tie_word_embeddings else \
        (last_pp, last_chunk, mapping.OUTPUT_LAYER)
    return [(first_pp, first_chunk, mapping.EMBEDDING), output]


def _stored_dtypes(source: MegatronSource, plan) -> tuple[torch.dtype, dict]:
    """(the model's dtype, {message key: dtype} of every message tensor stored in another one),
    from the rank files' headers: Megatron keeps e.g. a router's expert bias in fp32 in a bf16
    model, and transformers 5.24 writes DeepSeek-V3's routers in fp32."""
    family, dims, layout = plan.family, plan.dims, plan.source_layout
    (embedding, output), (last_pp, last_chunk) = _vocab_tensors(layout, dims), layout.last_stage
    model_dtype = source.stored_dtype(layout, *embedding)
    stored = {}
    for kind, (pp_rank, vchunk) in (("embeddings", layout.first_stage), ("final_norm", (last_pp, last_chunk)),
                                    ("output_layer", (last_pp, last_chunk))):
        spelling = source.spelling(layout, pp_rank)
        for rule in mapping.message_rules(kind, family, dims):
            stored[mapping.message_key(kind, None, rule.mcore)] = source.stored_dtype(
                layout, pp_rank, vchunk, mg_names.plain_file_name(rule.mcore, dims, spelling))

    def scan(kind, layer, pp_rank, vchunk, sources):
        for rules, files, rename in sources:
            for file_rule, prefix in files:
                dtype = source.stored_dtype(layout, pp_rank, vchunk, prefix + file_rule.file, file_rule.ep_rank or 0)
                stored.update({mapping.message_key(kind, layer, rename(part)): dtype
                               for part in file_rule.parts if part in rules})

    for slot in layout.slots():
        if slot.hf_layer is not None:
            scan("layer", slot.hf_layer, slot.pp_rank, slot.vchunk,
                 _layer_sources(source, layout, family, dims, slot.hf_layer, slot))
    for k in range(dims.mtp_num_layers):
        scan("mtp_layer", k, last_pp, last_chunk, _mtp_sources(source, layout, family, dims, k))
        for copy, where in zip(mapping.MTP_COPIES, (embedding, output)):
            stored[mapping.message_key("mtp_layer", k, copy)] = source.stored_dtype(layout, *where)
    return model_dtype, {key: dtype for key, dtype in stored.items() if dtype != model_dtype}


def load(plan, sender) -> dict:
    """Stream a Megatron checkpoint as whole (TP-merged, unpadded) Megatron tensors."""
    return stream(plan, sender, SOURCE.open(plan.load_dir, lora=plan.lora, lora_dir=plan.lora_dir))


def stream(plan, sender, source: MegatronSource, states: tuple[str, ...] = (), **meta) -> dict:
    """Send `source` message by message; `states`: optimizer states sent next to each tensor
    (`exp_avg:<name>`, ...), for a source that has them (loaders.optim)."""
    from modellink_ckpt.pipeline import message_bytes

    family, dims, layout = plan.family, plan.dims, plan.source_layout
    first_pp, first_chunk = layout.first_stage
    last_pp, last_chunk = layout.last_stage
    every = ("",) + tuple(states)
    carried = source.dtype_of(layout, first_pp, first_chunk, mapping.EMBEDDING)  # fp32 from optim
    state_bytes = 4 * len(states)  # fp32 per element
    sender.plan(max(message_bytes(n for t in tensors.values()
                                  for n in (t.nbytes, *[t.numel() * state_bytes] * bool(states)))
                    for _, _, tensors in mapping.model_messages(family, dims, carried)))
    dtype, dtypes = _stored_dtypes(source, plan)
    sender.send("meta", dims=dims.to_dict(), source="mg", dtype=dtype, dtypes=dtypes, **meta)
    if getattr(plan, "share", None) is not None:  # --workers: this worker reads (and checks) its part
        source.checked_stages = set(plan.share.source_stages)

    def take_all(pp_rank, vchunk, name, kind, shape, arena, rows=None, required=True, file=None):
        """Message tensor `name` (and its optimizer states), stored as `file` (default: `name`)."""
        tensors = {}
        for state in every:
            stored = state_name(file or name, state)
            out = arena.alloc(shape, source.dtype_of(layout, pp_rank, vchunk, stored))
            tensor = source.take(layout, pp_rank, vchunk, stored, kind, out=out, rows=rows, required=required)
            if tensor is None:
                return None
            tensors[message_state_name(name, state)] = tensor
        return tensors

    # Padding rows are dropped (messages carry the true vocabulary), except into a Megatron target
    # padded alike: there they are kept as they are (trained rows of the output layer and their
    # optimizer state take part in the softmax).
    rows = dims.vocab_size
    if plan.save_type == "mg" and plan.padded_vocab == source.padded_vocab():
        rows = plan.padded_vocab

    def send_plain(kind, pp_rank, vchunk):
        """A message of the tensors outside the layers (a vocabulary table, a norm and its bias)."""
        arena, tensors = sender.arena(), {}
        spelling = source.spelling(layout, pp_rank)
        for rule in mapping.message_rules(kind, family, dims):
            shape = (rows, *rule.shape[1:]) if rule.tp == "vocab" else rule.shape
            tensors.update(take_all(pp_rank, vchunk, rule.mcore, rule.tp, shape, arena,
                                    rows=rows if rule.tp == "vocab" else None,
                                    file=mg_names.plain_file_name(rule.mcore, dims, spelling)))
        sender.send(kind, tensors, arena)

    if workers.wanted(plan, "embeddings", None):
        send_plain("embeddings", first_pp, first_chunk)
    for slot in layout.slots():
        if slot.hf_layer is None or not workers.wanted(plan, "layer", slot.hf_layer):
            continue
        arena = sender.arena()
        tensors = _layer_tensors(source, layout, family, dims, slot.hf_layer, slot, arena, every)
        sender.send("layer", tensors, arena, layer=slot.hf_layer)
        if layout.vpp_layers is None and slot.hf_layer == layout.last_hf_layer_of_stage(slot.pp_rank) \
                and slot.pp_rank != last_pp:
            source.release(layout, slot.pp_rank)

    if workers.wanted(plan, "final_norm", None):
        send_plain("final_norm", last_pp, last_chunk)
        # the copies of the embedding the last chunk keeps (as its output layer when tied, for its
        # MTP layers) are only checked off, never sent: the first chunk's embedding is the model's
        copies = [mapping.OUTPUT_LAYER] * dims.tie_word_embeddings + [mapping.EMBEDDING] * bool(
            dims.mtp_num_layers and (last_pp, last_chunk) != (first_pp, first_chunk))
        for copy in copies:
            for state in every:
                source.take(layout, last_pp, last_chunk, state_name(copy, state), "vocab", rows=rows, required=False)
        if not dims.tie_word_embeddings:
            send_plain("output_layer", last_pp, last_chunk)
        for k in range(dims.mtp_num_layers):
            arena = sender.arena()
            sender.send("mtp_layer", _mtp_tensors(source, layout, family, dims, k, arena), arena, layer=k)
    for pp_rank in range(layout.pp):
        source.release(layout, pp_rank)
    sender.send("done")
    return {}


class MegatronSourceFormat(registry.SourceFormat):
    name = "mg"
    description = "Megatron-Core checkpoint, legacy torch layout (latest_checkpointed_iteration.txt, mp_rank_*)"
    loader = "modellink_ckpt.loaders.mg:load"

    def open(self, directory, **kwargs) -> MegatronSource:
        """Legacy rank files or a torch_dist store."""
        from modellink_ckpt.loaders.torch_dist import open_megatron

        return open_megatron(directory, **kwargs)

    def describe(self, request: registry.SourceRequest) -> registry.SourceInfo:
        lora_request = request.lora or {}
        source = self.open(request.load_dir, keep_adapters=bool(lora_request.get("export")))
        lora, lora_dir = _lora_plan(request, source)
        if lora is not None and not lora_request.get("export"):  # merged as the weights are read
            source = self.open(request.load_dir, lora=lora, lora_dir=lora_dir)
        vocab = None
        if getattr(source.args, "vocab_size", None) is None:
            for folder in request.config_dirs:  # the true vocabulary is the HF one
                if folder is not None and (folder / "config.json").is_file():
                    vocab = json.loads((folder / "config.json").read_text()).get("vocab_size")
                    break
        if request.noop_layers and not getattr(source.args, "noop_layers", None):
            source.args.noop_layers = request.noop_layers  # a checkpoint whose args do not record them
        stored_mtp = int(getattr(source.args, "mtp_num_layers", None) or 0)
        asked_mtp = request.overrides.get("mtp_num_layers")
        if asked_mtp is not None and asked_mtp != stored_mtp:
            raise UsageError(f"--mtp-num-layers {asked_mtp}: {request.load_dir} holds {stored_mtp} "
                             f"multi-token-prediction layer(s) (its stored args)")
        dims = source.dims(vocab, {**request.overrides, "mtp_num_layers": None})
        layout = source.layout(dims)
        recorded = getattr(source.args, "tokenizer_model", None)
        return registry.SourceInfo(
            dims=dims, layout=layout,
            dtype=source.dtype_of(layout, *layout.first_stage, mapping.EMBEDDING),
            tokenizer=Path(recorded) if isinstance(recorded, str) and Path(recorded).is_file() else None,
            padded_vocab=source.padded_vocab(),
            divisible_by=int(getattr(source.args, "make_vocab_size_divisible_by", None) or 1),
            lora=lora, lora_dir=lora_dir, recorded_computes=recorded_computes(source.args),
            recorded_family=(source.args.model_type_hf, f"{source.iter_dir} (its stored args)")
            if isinstance(getattr(source.args, "model_type_hf", None), str) else None)

    def family_hint(self, path: Path, cfg_path=None) -> tuple[str, str] | None:
        recorded = getattr(self.open(path).args, "model_type_hf", None)
        return (recorded, "recorded in its args") if isinstance(recorded, str) else None

    def detect(self, path: Path) -> bool:
        from modellink_ckpt.formats.torch_dist import is_torch_dist

        return (path / TRACKER).is_file() or any(path.glob(f"mp_rank_*/{RANK_FILE}")) or is_torch_dist(path)

    def inspect(self, path: Path) -> dict:
        source = self.open(path)
        dims = source.dims()
        layout = source.layout(dims)
        files, tensors = {}, []
        for rank in layout.ranks():
            entry = source.rank_state(layout, *rank)
            files[str(entry["path"].relative_to(source.iter_dir))] = entry["path"].stat().st_size
            tensors += [(t.shape, t.dtype) for state in entry["models"].values() for name, t in state.items()
                        if hasattr(t, "dtype") and not name.endswith("_extra_state")]
        dtypes, params = registry.census(tensors)
        if hasattr(source, "store"):  # torch_dist: the store's files, not rank files
            files = {p.name: p.stat().st_size for p in sorted(source.iter_dir.iterdir()) if p.is_file()}
        # a torch_dist store spells every norm fused into its linear whatever spec wrote it: the
        # stored args say which one did
        spelling = spelling_from_args(source.args) if hasattr(source, "store") else source.spelling(layout, 0)
        return {"format": "mg (torch_dist)" if hasattr(source, "store") else self.name, "iteration": source.iteration,
                "family": getattr(source.args, "model_type_hf", None) or "not recorded", "layout": layout.summary(),
                "spelling": ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(spelling).items()),
                "layers": dims.num_layers, "hidden": dims.hidden_size,
                "experts": dims.num_experts or None, "parameters (stored, TP/EP shards summed)": params,
                "dtypes": dtypes, "files": files}


def _lora_plan(request: registry.SourceRequest, source: MegatronSource) -> tuple:
    """(LoraSpec, --lora-load folder) when adapters are to be merged or exported, else (None, None)."""
    lora = request.lora
    if not lora:
        return None, None
    from modellink_ckpt.lora import check_same_layout, spec_from_args

    adapters = source
    if lora.get("load"):
        adapters = MegatronSource(lora["load"], flag="--lora-load")
        check_same_layout(source.args, adapters.args, request.load_dir, lora["load"])
    spec = spec_from_args(adapters.args, r=lora.get("r"), alpha=lora.get("alpha"),
                          target_modules=lora.get("target_modules"), source=str(lora.get("load") or request.load_dir))
    return spec, lora.get("load")


SOURCE = MegatronSourceFormat()
