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

from modellink_ckpt import registry
from modellink_ckpt.engine import workers
from modellink_ckpt.engine.pipeline import message_bytes
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.megatron import names as mg_names
from modellink_ckpt.formats.megatron.args import recorded_computes, spelling_from_args
from modellink_ckpt.formats.megatron.checkpoint import (RANK_FILE, TRACKER, MegatronSource, message_state_name,
                                                        state_name)
from modellink_ckpt.formats.megatron.lora import check_same_layout, spec_from_args
from modellink_ckpt.formats.megatron.optim_layout import is_parameter_name
from modellink_ckpt.formats.mindspore.checkpoint2 import is_checkpoint2
from modellink_ckpt.formats.torch_dist import is_torch_dist
from modellink_ckpt.formats.torch_zip import loaded
from modellink_ckpt.loaders.torch_dist import open_megatron
from modellink_ckpt.model import mapping
from modellink_ckpt.model.lora import LORA_FLAGS, lora_request


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
    family, dims, layout = plan.family, plan.dims, plan.source.layout
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
    return stream(plan, sender, SOURCE.open(plan.source.path, lora=plan.source.lora, lora_dir=plan.source.lora_dir))


def stream(plan, sender, source: MegatronSource, states: tuple[str, ...] = (), **meta) -> dict:
    """Send `source` message by message; `states`: optimizer states sent next to each tensor
    (`exp_avg:<name>`, ...), for a source that has them (loaders.optim)."""
    family, dims, layout = plan.family, plan.dims, plan.source.layout
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
    if plan.target.padded_vocab is not None and plan.target.padded_vocab == source.padded_vocab():
        rows = plan.target.padded_vocab

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
    # --noop-layers: a checkpoint's noop slots its args do not record (for a target other than Megatron)
    flags = LORA_FLAGS | {"noop_layers"}

    def open(self, directory, **kwargs) -> MegatronSource:
        """Legacy rank files or a torch_dist store."""
        return open_megatron(directory, **kwargs)

    def describe(self, request: registry.SourceRequest) -> registry.SourceInfo:
        lora_asked = lora_request(request.options) or {}
        source = self.open(request.path, keep_adapters=bool(lora_asked.get("export")))
        lora, lora_dir = _lora_plan(request, source, lora_asked)
        if lora is not None and not lora_asked.get("export"):  # merged as the weights are read
            source = self.open(request.path, lora=lora, lora_dir=lora_dir)
        vocab = None
        if getattr(source.args, "vocab_size", None) is None:
            for folder in request.config_dirs:  # the true vocabulary is the HF one
                if folder is not None and (folder / "config.json").is_file():
                    vocab = json.loads((folder / "config.json").read_text()).get("vocab_size")
                    break
        noop = request.options.get("noop_layers")
        if noop and request.target not in ("mg", "torch_dist") and not getattr(source.args, "noop_layers", None):
            source.args.noop_layers = noop  # a checkpoint whose args do not record them
        stored_mtp = int(getattr(source.args, "mtp_num_layers", None) or 0)
        asked_mtp = request.overrides.get("mtp_num_layers")
        if asked_mtp is not None and asked_mtp != stored_mtp:
            raise UsageError(f"--mtp-num-layers {asked_mtp}: {request.path} holds {stored_mtp} "
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
            lora=lora, lora_dir=lora_dir, args=source.args, iteration=source.iteration,
            recorded_computes=recorded_computes(source.args),
            recorded_family=(source.args.model_type_hf, f"{source.iter_dir} (its stored args)")
            if isinstance(getattr(source.args, "model_type_hf", None), str) else None)

    def family_hint(self, path: Path, cfg_path=None) -> tuple[str, str] | None:
        recorded = getattr(self.open(path).args, "model_type_hf", None)
        return (recorded, "recorded in its args") if isinstance(recorded, str) else None

    def detect(self, path: Path) -> bool:
        if is_checkpoint2(path):  # MindFormers' Checkpoint 2.0 names its tracker as Megatron does
            return False
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


def _lora_plan(request: registry.SourceRequest, source: MegatronSource, lora: dict) -> tuple:
    """(LoraSpec, --lora-load folder) when adapters are to be merged or exported, else (None, None)."""
    if not lora:
        return None, None
    adapters = source
    if lora.get("load"):
        adapters = MegatronSource(lora["load"], flag="--lora-load")
        check_same_layout(source.args, adapters.args, request.path, lora["load"])
    spec = spec_from_args(adapters.args, r=lora.get("r"), alpha=lora.get("alpha"),
                          target_modules=lora.get("target_modules"), source=str(lora.get("load") or request.path))
    return spec, lora.get("load")


SOURCE = MegatronSourceFormat()
