"""Saver for Megatron-Core checkpoints (legacy torch layout) at any TP/PP/VPP/noop layout.

Every tensor is split for the target layout and written to its rank file as soon as it arrives
(`StreamingTorchWriter`), so memory holds one layer, not a pipeline stage. A stage's files are
finished when its last layer has arrived; the iteration folder is published, and the tracker
file written, only when every file is complete.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from modellink_ckpt import registry
from modellink_ckpt.engine import workers
from modellink_ckpt.engine.manifest import check_manifest, with_recorded_dtypes, write_manifest
from modellink_ckpt.engine.progress import progress as show_progress
from modellink_ckpt.engine.staging import StagedIteration, check_target
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.megatron import names as mg_names
from modellink_ckpt.formats.megatron.args import (carry_over, make_args, mark_weights_only, module_contradictions,
                                                  spelling_from_args)
from modellink_ckpt.formats.megatron.checkpoint import (RANK_FILE, TRACKER, MegatronSource, find_iteration,
                                                        iteration_dir_name)
from modellink_ckpt.formats.megatron.names import Spelling
from modellink_ckpt.formats.megatron.optim_layout import OPTIM_FILE
from modellink_ckpt.formats.mindspore.checkpoint2 import is_checkpoint2
from modellink_ckpt.formats.torch_dist import is_torch_dist
from modellink_ckpt.formats.torch_zip import LazyTensor, StreamingTorchWriter, load_lazy
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.accounting import account
from modellink_ckpt.model.families import family_to_check
from modellink_ckpt.model.layout import ParallelLayout
from modellink_ckpt.plan import MegatronTarget, Plan, RunSettings
from modellink_ckpt.registry import SourceInfo
from modellink_ckpt.savers.optim_state import STATES, OptimStateWriter

ITERATION = 1


class RankFiles:
    """The open rank files of the target layout and the tensor references each will hold."""

    def __init__(self, folder: Path, layout, args, iteration: int | str = ITERATION, optim=None):
        """`args`: the stored args of every rank file; `optim` (an OptimStateWriter): also write
        each rank's distributed-optimizer state."""
        self._folder, self._layout, self._args = folder, layout, args
        self._iteration, self._optim = iteration, optim
        self._writers: dict[tuple[int, int, int], StreamingTorchWriter] = {}
        self._models: dict[tuple[int, int, int], dict[str, dict]] = {}
        self._closed: set[tuple[int, int, int]] = set()
        self.bytes_written = 0
        self.files: dict[str, tuple[int, str]] = {}  # for the manifest: {relative path: (bytes, digest)}

    def put(self, rank: tuple[int, int, int], vchunk: int, name: str, tensor: torch.Tensor) -> None:
        assert rank not in self._closed, f"rank file {rank} already closed"
        if "::" in name:  # an optimizer state (`<name>::exp_avg`): the optimizer file's
            self._writer(rank)
            name, state = name.split("::")
            self._optim.add(self._folder / self._layout.rank_dir(*rank), rank, vchunk, name, state, tensor)
            return
        self._models[rank][self._layout.model_key(vchunk)][name] = self._writer(rank).add_tensor(tensor)

    def _writer(self, rank) -> StreamingTorchWriter:
        if rank not in self._writers:
            folder = self._folder / self._layout.rank_dir(*rank)
            folder.mkdir(parents=True, exist_ok=True)
            self._writers[rank] = StreamingTorchWriter(folder / RANK_FILE)
            self._models[rank] = {self._layout.model_key(v): {} for v in range(self._layout.vpp)}
        return self._writers[rank]

    def close_stage(self, pp_rank: int) -> None:
        for rank in [r for r in self._writers if r[1] == pp_rank and r not in self._closed]:
            self._close(rank)

    def close_all(self, share=None) -> None:
        """Close every rank file (of the share); a stage holding only noop layers still gets its
        file."""
        for rank in self._layout.ranks():
            if share is not None and not share.holds_rank(rank):
                continue
            if rank not in self._closed:
                self._writer(rank)
                self._close(rank)

    def _close(self, rank) -> None:
        writer = self._writers[rank]
        state = {"args": self._args, "checkpoint_version": 3.0,
                 "iteration": 0 if self._iteration == "release" else self._iteration}
        state.update(self._models[rank])
        if self._optim is not None:
            folder = self._folder / self._layout.rank_dir(*rank)
            entries, optim_file = self._optim.finish_rank(folder, rank, self._models[rank])
            state.update(_stored(entries, writer))
            self.files[f"{self._layout.rank_dir(*rank)}/{OPTIM_FILE}"] = optim_file
            self.bytes_written += optim_file[0]
        writer.close(state)
        self.bytes_written += writer.bytes_written
        self.files[f"{self._layout.rank_dir(*rank)}/{RANK_FILE}"] = (writer.size, writer.digest)
        self._closed.add(rank)
        del self._models[rank]


def _stored(obj, writer: StreamingTorchWriter):
    """`obj` with its tensors (RNG states, step counters) written as records of `writer`, as
    torch.save stores them (a plain pickled tensor would need torch's own unpickler)."""
    if isinstance(obj, torch.Tensor):
        return writer.add_tensor(obj.contiguous())
    if isinstance(obj, dict):
        return type(obj)((k, _stored(v, writer)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_stored(v, writer) for v in obj)
    return obj


class ShardPlacer:
    """Where each piece of a message goes in the target layout: pure, also used on meta tensors
    (for `--dry-run` and `--verify`) to know every rank file's keys and shapes without data."""

    def __init__(self, plan, dtypes: mapping.TensorDtypes):
        self.plan, self.layout, self.dims = plan, plan.target.layout, plan.dims
        self.spelling = plan.target.spelling
        self.states: tuple[str, ...] = ()  # optimizer states placed next to each tensor (from optim)
        self.dtypes = dtypes  # the dtype each tensor is written in
        self._slot_of = self.layout.slot_of_hf_layer()
        self._layer_files: dict[bool, tuple[dict, list]] = {}
        self.partial = False  # place only the file tensors whose parts a message holds (inspect --explain)

    def _written(self, kind: str, layer: int | None, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The message's weights in their written dtypes; next to them, from optim, the fp32
        master weight as it came (`param:<name>`) and the moments (`exp_avg:<name>`, ...)."""
        written = {}
        for name, tensor in tensors.items():
            if ":" in name:  # an optimizer moment
                written[name] = tensor
                continue
            written[name] = self.dtypes.apply(kind, layer, name, tensor)
            if self.states and f"{self.states[-1]}:{name}" in tensors:  # buffers (expert_bias) have none
                written[f"param:{name}"] = tensor
        return written

    @staticmethod
    def _states_of(tensors: dict, name: str, states: tuple[str, ...]) -> tuple[str, ...]:
        """"" (the tensor itself) and those optimizer `states` that message tensor `name` has."""
        return ("",) + tuple(state for state in states if f"{state}:{name}" in tensors)

    @staticmethod
    def _state_of(tensors: dict, name: str, state: str) -> torch.Tensor:
        """Message tensor `name` itself, or its optimizer `state` (of `_written`)."""
        return tensors[f"{state}:{name}" if state else name]

    def _split(self, pp_rank, vchunk, name, tensors, kind, source_name=None):
        if self.partial and (source_name or name) not in tensors:
            return
        for state in self._states_of(tensors, source_name or name, self.states):
            tensor, split_kind = self._state_of(tensors, source_name or name, state), kind
            if kind == "vocab":
                tensor, split_kind = T.pad_vocab(tensor, self.plan.target.padded_vocab), "column"
            for tp_rank, shard in enumerate(T.TP_SPLIT[split_kind][0](tensor, self.layout.tp)):
                for ep_rank in range(self.layout.ep):
                    yield (tp_rank, pp_rank, ep_rank), vchunk, f"{name}::{state}" if state else name, shard

    def layer_files(self, layer: int) -> tuple[dict, list]:
        """({message name: rule}, [FileRule]) of HF layer `layer` (dense and MoE layers differ)."""
        moe = self.dims.is_moe_layer(layer)
        if moe not in self._layer_files:
            rules = mapping.layer_rules(self.plan.family, self.dims, layer)
            self._layer_files[moe] = ({rule.mcore: rule for rule in rules},
                                      mg_names.layer_file_rules(rules, self.dims, self.spelling, self.layout.ep))
        return self._layer_files[moe]

    def _place_layer(self, layer: int, tensors: dict[str, torch.Tensor]):
        slot = self._slot_of[layer]
        rules, file_rules = self.layer_files(layer)
        files = [(rule, f"decoder.layers.{slot.local_layer}.") for rule in file_rules]
        yield from self._place_files(files, rules, tensors, slot.pp_rank, slot.vchunk)

    def _place_files(self, files, rules: dict, tensors: dict[str, torch.Tensor], pp_rank: int, vchunk: int):
        """Split each file tensor's parts across TP, join them per TP rank, and send the shard to
        its EP rank(s)."""
        tp, ep = self.layout.tp, self.layout.ep
        for file_rule, prefix in files:
            if self.partial and not all(part in tensors for part in file_rule.parts):
                continue
            for state in self._states_of(tensors, file_rule.parts[0], self.states):
                per_part = []
                for part in file_rule.parts:
                    kind = mg_names.part_tp_kind(rules[part], self.spelling.mla, self.dims, self.layout.etp, tp)
                    per_part.append(T.TP_SPLIT[kind][0](self._state_of(tensors, part, state), tp))
                name = prefix + file_rule.file + (f"::{state}" if state else "")
                ep_ranks = range(ep) if file_rule.ep_rank is None else (file_rule.ep_rank,)
                for tp_rank in range(tp):
                    pieces = [shards[tp_rank] for shards in per_part]
                    shard = file_rule.join([T.as_tensor(p) for p in pieces]) if file_rule.join else pieces[0]
                    for ep_rank in ep_ranks:
                        yield (tp_rank, pp_rank, ep_rank), vchunk, name, shard

    def place(self, kind: str, tensors: dict[str, torch.Tensor], layer: int | None = None):
        """Yield (rank, vchunk, name in the rank file, shard) for one message."""
        tensors = self._written(kind, layer, tensors)
        first_pp, first_chunk = self.layout.first_stage
        last_pp, last_chunk = self.layout.last_stage
        if kind == "embeddings":
            for rule in mapping.embedding_rules(self.plan.family, self.dims):  # the table, BLOOM's norm after it
                yield from self._split(first_pp, first_chunk, rule.mcore, tensors, rule.tp)
            if self.dims.tie_word_embeddings and self.layout.pp > 1:  # the last stage keeps its own copy
                yield from self._split(last_pp, last_chunk, mapping.OUTPUT_LAYER, tensors, "vocab", mapping.EMBEDDING)
            if self.dims.mtp_num_layers and (last_pp, last_chunk) != (first_pp, first_chunk):
                # the MTP layers embed their input tokens: their chunk builds an embedding of its own
                # (both GPT models, `pre_process or mtp_process`), tied to the first one
                yield from self._split(last_pp, last_chunk, mapping.EMBEDDING, tensors, "vocab")
        elif kind == "layer":
            yield from self._place_layer(layer, tensors)
        elif kind == "final_norm":
            for rule in mapping.final_norm_rules(self.plan.family, self.dims):
                yield from self._split(last_pp, last_chunk, mg_names.plain_file_name(rule.mcore, self.dims, self.spelling),
                                       tensors, rule.tp, rule.mcore)
        elif kind == "output_layer":
            yield from self._split(last_pp, last_chunk, mapping.OUTPUT_LAYER, tensors, "vocab")
        elif kind == "mtp_layer":
            yield from self._place_mtp_layer(layer, tensors)

    def _place_mtp_layer(self, k: int, tensors: dict[str, torch.Tensor]):
        last_pp, last_chunk = self.layout.last_stage
        rules = mapping.mtp_rules(self.plan.family, self.dims, k)
        (inner, inner_files), (own, own_files) = mg_names.mtp_file_rules(rules, self.dims, self.spelling,
                                                                         self.layout.ep, k)
        prefix = mg_names.MTP_INNER
        inner_tensors = {}
        for name, tensor in tensors.items():
            state, _, part = name.rpartition(":")
            if part.startswith(prefix):
                inner_tensors[f"{state}:{part[len(prefix):]}" if state else part[len(prefix):]] = tensor
        yield from self._place_files(inner_files + own_files, {r.mcore: r for r in inner + own},
                                     {**tensors, **inner_tensors}, last_pp, last_chunk)

    def joined_with(self, kind: str, layer: int | None, name: str) -> set[str]:
        """The message tensors a file tensor joins with message tensor `name` (MindSpeed-LLM's fused
        MLA linear_qkv, grouped experts): what placing `name` alone needs beside it."""
        if kind == "layer":
            files = [f.parts for f in self.layer_files(layer)[1]]
        elif kind == "mtp_layer":
            rules = mapping.mtp_rules(self.plan.family, self.dims, layer)
            (_, inner), (_, own) = mg_names.mtp_file_rules(rules, self.dims, self.spelling, self.layout.ep, layer)
            files = [tuple(mg_names.MTP_INNER + p for p in f.parts) for f, _ in inner] + [f.parts for f, _ in own]
        else:
            files = []
        return {part for parts in files if name in parts for part in parts} - {name}

    def stage_done(self, layer: int) -> int | None:
        """The stage whose files are complete once HF layer `layer` is placed (None if none)."""
        slot = self._slot_of[layer]
        if layer == self.layout.last_hf_layer_of_stage(slot.pp_rank) and slot.pp_rank != self.layout.last_stage[0]:
            return slot.pp_rank
        return None

    def rank_args(self, dtype: torch.dtype, iteration, source_args=None):
        """The stored args: built from the model and the layout, or, from a Megatron source, the
        source run's own args with the target's layout fields (`megatron_args.carry_over`)."""
        plan = self.plan
        args = make_args(self.dims, self.layout, padded_vocab=plan.target.padded_vocab, divisible_by=plan.target.divisible_by,
                         dtype=dtype, spelling=self.spelling, model_type_hf=plan.family.name,
                         iteration=iteration,
                         tokenizer_model=str(Path(plan.target.tokenizer_model).resolve()) if plan.target.tokenizer_model else None)
        if source_args is None:
            return args
        # merged adapters leave a plain model: the run's LoRA settings no longer describe it
        return carry_over(source_args, args, drop_prefixes=("lora_",) if plan.source.lora is not None else ())


def target_iteration(plan, optim=None):
    """The iteration the target is stored as: the optimizer's or the Megatron source's, else 1."""
    if optim is not None:
        return optim.iteration
    return plan.source.iteration if plan.source.iteration is not None else ITERATION


def save(plan, receiver) -> dict:
    """Write the target, or with `plan.share` (`--workers`) the rank files of the share's stages
    into the folder the parent staged (the parent then publishes it, `publish_shares`)."""
    started = time.monotonic()
    messages = iter(receiver)
    meta = next(messages)
    assert meta.kind == "meta", meta.kind
    share = getattr(plan, "share", None)
    placer = ShardPlacer(plan, mapping.TensorDtypes.from_meta(meta, cast=plan.target.params_dtype))
    model_dtype = placer.dtypes.default
    odd_dtypes: dict[str, str] = {}
    optim = OptimStateWriter(plan, placer.layout, meta["optim"]) if meta.get("optim") else None
    iteration = target_iteration(plan, optim)
    if optim:
        placer.states = STATES
    stored_args = placer.rank_args(model_dtype, iteration, plan.source.args)
    if optim:
        vars(stored_args).update(optim.args_update())
    else:
        mark_weights_only(stored_args)

    staging = None if share else StagedIteration(plan.target.path, iteration_dir_name(iteration), TRACKER, plan.run.overwrite)
    iteration_dir = Path(share.folder) if share else staging.folder
    files = RankFiles(iteration_dir, placer.layout, stored_args, iteration, optim)
    layers = workers.written_layers(plan)
    progress = show_progress(total=layers, desc="saving layers", unit="layer", quiet=plan.run.quiet)
    try:
        for message in messages:
            for rank, vchunk, name, shard in placer.place(message.kind, message.tensors, message.get("layer")):
                if share and not share.holds_rank(rank):
                    continue  # another worker's file (another rank of the stage, the tied output layer's copy)
                if "::" not in name and shard.dtype != model_dtype:
                    odd_dtypes[name] = str(shard.dtype)  # kept as stored (e.g. an fp32 router bias)
                files.put(rank, vchunk, name, shard)
            if message.kind == "layer":
                finished_stage = placer.stage_done(message["layer"])
                if finished_stage is not None:
                    files.close_stage(finished_stage)  # (the files of it this worker writes)
                progress.update(1)
            elif message.kind == "done":
                files.close_all(share)
        progress.close()
        manifest = dict(kind="mg", iteration=iteration, model_type_hf=plan.family.name,
                        source={"type": plan.source.format, "dir": str(Path(plan.source.path).resolve())},
                        layout=placer.layout.describe(), dtype=str(model_dtype),
                        vocab_size=plan.dims.vocab_size, padded_vocab_size=plan.target.padded_vocab, dtypes=odd_dtypes)
        if staging is not None:
            write_manifest(iteration_dir, files.files, **manifest)
            staging.publish(iteration)
    except BaseException:
        progress.close()
        if optim:
            optim.abort()
        if staging is not None:
            staging.discard()
        raise
    return {"bytes": files.bytes_written, "seconds": time.monotonic() - started, "target": str(plan.target.path),
            "files": len(files.files), "written": files.files, "manifest": manifest}


def publish_shares(staging: StagedIteration, results: list[dict]) -> dict:
    """Every worker succeeded: one manifest for all their files, then the folder goes into place."""
    written, manifest = workers.merged_outputs(results)
    write_manifest(staging.folder, written, **manifest)
    staging.publish(manifest["iteration"])
    return workers.combined_result(results, files=len(written))


def expected_mg_files(plan, dtype: torch.dtype) -> dict[str, dict[str, dict[str, tuple]]]:
    """{rank folder: {model key: {name: (shape, dtype)}}} that a conversion with `plan` writes:
    the placement of every message, on meta tensors."""
    placer = ShardPlacer(plan, mapping.TensorDtypes(dtype, cast=plan.target.params_dtype))
    layout = plan.target.layout
    expected = {layout.rank_dir(*rank): {layout.model_key(v): {} for v in range(layout.vpp)}
                for rank in layout.ranks()}
    for kind, layer, tensors in mapping.model_messages(plan.family, plan.dims, dtype):
        for rank, vchunk, name, shard in placer.place(kind, tensors, layer):
            expected[layout.rank_dir(*rank)][layout.model_key(vchunk)][name] = (tuple(shard.shape), shard.dtype)
    return expected


def verify(root: Path, hash_contents: bool = True, family_name: str | None = None) -> tuple[list[str], str]:
    """A Megatron checkpoint in the torch layout against its manifest and its own stored args:
    every rank file the layout has, every tensor of every rank file with its shape and dtype,
    and every arg that decides whether a module exists agreeing with the tensors."""
    source = MegatronSource(root)
    folder, margs = source.iter_dir, source.args
    manifest, problems, files = check_manifest(folder, hash_contents)
    family = family_to_check(family_name, getattr(margs, "model_type_hf", None), (manifest or {}).get("model_type_hf"))
    dims = source.dims()
    layout = source.layout(dims)
    dtype = getattr(margs, "params_dtype", torch.float32)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    plan = Plan(family=family, source=SourceInfo(dims=dims, dtype=dtype), run=RunSettings(),
                target=MegatronTarget(format="mg", path=root, layout=layout, spelling=spelling_from_args(margs),
                                      padded_vocab=int(getattr(margs, "padded_vocab_size", dims.vocab_size))))
    expected = expected_mg_files(plan, dtype)
    on_disk = {p.parent.name for p in folder.glob(f"mp_rank_*/{RANK_FILE}")}
    for extra in sorted(on_disk - set(expected)):
        problems.append(f"{folder / extra / RANK_FILE}: not part of the layout in the stored args")
    tensors, present = 0, set()
    for rank_dir, models in expected.items():
        path = folder / rank_dir / RANK_FILE
        if not path.is_file():
            problems.append(f"{path}: missing rank file")
            continue
        try:
            state = load_lazy(path)  # only the pickle is read here
        except ConvertError as exc:
            problems.append(str(exc))
            continue
        for model_key, names in models.items():
            stored = state.get(model_key)
            if not isinstance(stored, dict):
                problems.append(f"{path}: no '{model_key}' entry")
                continue
            found = {n: (tuple(t.shape), t.dtype) for n, t in stored.items()
                     if isinstance(t, (torch.Tensor, LazyTensor)) and not n.endswith("_extra_state")}
            problems += account(with_recorded_dtypes(names, manifest), found).problems(f"{path} [{model_key}]")
            tensors += len(found)
            present |= set(found)
    problems += [f"{folder}: {problem}" for problem in module_contradictions(margs, present)]
    return problems, (f"{files}; {tensors} tensors in {len(expected)} rank files match the stored args "
                      f"({layout.summary()})")


class MegatronTargetFormat(registry.TargetFormat):
    name = "mg"
    description = "Megatron-Core checkpoint, legacy torch layout, at the target TP/PP/EP/VPP layout"
    saver = "modellink_ckpt.savers.mg:save"
    selected_by = "mg"
    flags = frozenset({"ckpt_format", "expert_tensor_parallel_size", "num_layer_list",
                       "num_layers_per_virtual_pipeline_stage", "noop_layers", "make_vocab_size_divisible_by",
                       "transformer_impl", "moe_grouped_gemm", "mla_spelling", "tokenizer_model"})

    def spec(self, options: dict, path: Path, params_dtype, family, source) -> MegatronTarget:
        """The layout (validated as Megatron-Core would at start-up), the padded vocabulary and
        the tensor spelling; the DDP settings a resumed optimizer state is laid out for."""
        dims = source.dims
        layout = ParallelLayout.build(
            dims.num_layers, tp=options["target_tensor_parallel_size"], pp=options["target_pipeline_parallel_size"],
            ep=options["target_expert_parallel_size"], vpp_layers=options["num_layers_per_virtual_pipeline_stage"],
            num_layer_list=options["num_layer_list"], noop_layers=options["noop_layers"],
            num_heads=dims.num_attention_heads,
            num_query_groups=None if dims.multi_latent_attention else dims.num_query_groups,
            num_experts=dims.num_experts, expert_tp=options["expert_tensor_parallel_size"])
        if options["moe_grouped_gemm"] and not dims.num_experts:
            raise UsageError("--moe-grouped-gemm: the model has no experts")
        if dims.num_experts and dims.add_dense_bias and layout.etp > 1:  # megatron-core asserts it at start-up
            raise UsageError(f"expert tensor parallel size {layout.etp}: Megatron-Core holds biased experts only at "
                             f"expert TP 1; pass --expert-tensor-parallel-size 1")
        divisor = options["make_vocab_size_divisible_by"]
        if divisor is None:  # a Megatron source keeps its padding rule (a resumed run, and its state)
            divisor = source.divisible_by or 1
        if divisor < 1:
            raise UsageError("--make-vocab-size-divisible-by must be at least 1")
        tokenizer = options["tokenizer_model"]
        if tokenizer and not Path(tokenizer).is_file():
            raise UsageError(f"--tokenizer-model {tokenizer}: file not found")
        grouped = "te_grouped" if options["transformer_impl"] == "transformer_engine" else "grouped_gemm"
        return MegatronTarget(
            format=self.name, path=path, params_dtype=params_dtype, layout=layout,
            padded_vocab=layout.padded_vocab(dims.vocab_size, divisor), divisible_by=divisor,
            spelling=Spelling(options["transformer_impl"], grouped if options["moe_grouped_gemm"] else "per_expert",
                              options["mla_spelling"]),
            ddp=source.options.get("ddp", {}), tokenizer_model=tokenizer)

    def copies_in_kernel(self, plan) -> bool:
        return True

    def why_one_process(self, plan) -> str | None:
        return None  # --workers: each worker writes the rank files of some pipeline stages

    def shares(self, plan, count: int) -> tuple:
        """The staged iteration folder and one plan per worker."""
        staging = StagedIteration(plan.target.path, iteration_dir_name(target_iteration(plan)), TRACKER, plan.run.overwrite)
        return staging, self.share_plans(plan, count, str(staging.folder))

    def share_plans(self, plan, count: int, folder: str) -> list:
        """By pipeline stage; with more workers than (source-aligned) stage groups, by rank file:
        runs of (pp, ep, tp) ranks with about the same bytes, each worker reading the layers of its
        ranks' stages (a PP1 target's workers each read every layer and write some TP / EP ranks)."""
        by_stage = workers.share_plans(plan, count, folder)
        if len(by_stage) >= count:
            return by_stage
        layout = plan.target.layout
        ranks = sorted(layout.ranks(), key=lambda rank: (rank[1], rank[2], rank[0]))
        sizes = self.files(plan)
        held = workers.stage_messages(layout, tied_copy=plan.dims.tie_word_embeddings)
        return workers.share_plans_by_parts(plan, count, folder, [sizes[f"{layout.rank_dir(*r)}/{RANK_FILE}"]
                                                                  for r in ranks], [held[r[1]] for r in ranks], ranks)

    def publish(self, staged, results: list[dict]) -> dict:
        return publish_shares(staged, results)

    def computes_on(self, plan):
        """Row-parallel tensors are split into column slices (strided, gathered in memory)."""
        layout, folds = plan.target.layout, super().computes_on(plan)
        if layout.tp == 1:
            return folds
        return lambda rule: folds(rule) or mg_names.part_tp_kind(
            rule, plan.target.spelling.mla, plan.dims, layout.etp, layout.tp) == "row"

    def check(self, plan) -> None:
        if Path(plan.target.path).resolve() == Path(plan.source.path).resolve():
            raise UsageError("--save-dir must differ from --load-dir")
        if (plan.target.path / TRACKER).exists():
            check_target(plan.target.path / TRACKER, plan.run.overwrite)

    def files(self, plan) -> dict[str, int]:
        files = {}
        for rank_dir, models in expected_mg_files(plan, plan.target.params_dtype or plan.source.dtype).items():
            shapes = [shape for names in models.values() for shape, _ in names.values()]
            files[f"{rank_dir}/{RANK_FILE}"] = sum(torch.Size(shape).numel() * dt.itemsize
                                                   for names in models.values() for shape, dt in names.values())
            if plan.source.format == "optim":  # fp32 master weight + two moments per element (alignment gaps aside)
                files[f"{rank_dir}/{OPTIM_FILE}"] = 12 * sum(torch.Size(shape).numel() for shape in shapes)
        return files

    def where(self, plan) -> str:
        return f"{plan.target.path} ({plan.target.layout.summary()})"

    def pieces(self, plan, kind: str, layer: int | None, tensors: dict) -> list[tuple[str, str, torch.Tensor]]:
        """[(file, tensor name, piece)] that the message tensors `tensors` become (inspect --explain):
        the saver's own placement, of those tensors alone."""
        placer = ShardPlacer(plan, mapping.TensorDtypes(torch.float32))
        placer.partial = True
        shapes = {rule.mcore: rule.shape for rule in mapping.message_rules(kind, plan.family, plan.dims, layer)}
        joined = {part for name in tensors for part in placer.joined_with(kind, layer, name)} - set(tensors)
        tensors = {**tensors, **{part: torch.zeros(shapes[part], dtype=next(iter(tensors.values())).dtype)
                                 for part in joined}}
        layout = plan.target.layout
        return [(f"{layout.rank_dir(*rank)}/{RANK_FILE} [{layout.model_key(vchunk)}]", name, T.as_tensor(shard))
                for rank, vchunk, name, shard in placer.place(kind, tensors, layer)]

    def recognises(self, path: Path) -> Path | None:
        if is_checkpoint2(path):  # MindFormers' Checkpoint 2.0 has a tracker of the same name
            return None
        if (path / TRACKER).is_file() and not is_torch_dist(find_iteration(path)[1]) \
                or any(path.glob(f"mp_rank_*/{RANK_FILE}")):
            return path
        return None

    def verify(self, folder: Path, hash_contents: bool = True, family: str | None = None) -> tuple[list[str], str]:
        return verify(folder, hash_contents, family)


TARGET = MegatronTargetFormat()
