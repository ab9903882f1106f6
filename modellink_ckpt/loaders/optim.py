"""Loader for distributed-optimizer checkpoints (`--load-model-type optim`).

Each rank folder holds `model_optim_rng.pt` (the model in its training dtype, the optimizer's
param groups and step, the scheduler) and `distrib_optim.pt` (fp32 master weights and Adam
moments as flat per-buffer vectors). The buffer layout is replayed from the stored args
(`optim_layout`), and every parameter of a rank's model dict is replaced by a lazy view of its fp32
master weights, with its moments next to it as `<name>::exp_avg` / `<name>::exp_avg_sq`. From
there the Megatron loader reads it like any checkpoint (TP merge, EP, VPP, expert layouts), so the
messages carry the master weights and, per tensor, `exp_avg:<name>` / `exp_avg_sq:<name>`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.megatron import optim_layout as O
from modellink_ckpt.formats.megatron.checkpoint import MegatronSource, state_name
from modellink_ckpt.formats.torch_zip import LazyTensor, load_lazy, loaded
from modellink_ckpt.loaders.mg import MegatronSourceFormat, stream

MOMENTS = ("exp_avg", "exp_avg_sq")
CARRIED = ("optimizer", "opt_param_scheduler", "rng_state", "num_floating_point_operations_so_far", "iteration")


class FlatSlice(LazyTensor):
    """A parameter-shaped piece `[start, start + numel)` of a flat fp32 state vector, read on demand."""

    __slots__ = ("vector", "model_dtype")

    def __init__(self, vector, start: int, shape, model_dtype: torch.dtype | None = None):
        """`model_dtype`: the dtype of the model weight this master weight stands in for."""
        self.vector, self.offset, self.record_offset = vector, int(start), 0
        self.model_dtype = model_dtype
        self.dtype, self.shape = torch.float32, torch.Size(shape)
        self.file = getattr(vector, "file", None)
        self.stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))

    def is_contiguous(self) -> bool:
        return True

    def read_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        row = self.shape[1:].numel()
        lo, hi = self.offset + start * row, self.offset + stop * row
        flat = out.view(-1)
        if isinstance(self.vector, LazyTensor):
            self.vector.read_rows(lo, hi, flat)
        else:
            flat.copy_(self.vector[lo:hi])
        return out

    def load(self) -> torch.Tensor:
        return self.read_into(torch.empty(self.shape, dtype=self.dtype))


def _materialize(obj):
    """Containers with their lazy tensors read (to travel between processes and be re-saved)."""
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return loaded(obj)


class OptimSource(MegatronSource):
    """A Megatron checkpoint whose weights are the fp32 master weights of its distributed optimizer."""

    def __init__(self, directory):
        super().__init__(directory)
        O.check_iteration_dir(self.iter_dir)
        self.settings = O.DdpSettings.from_args(self.args, source=str(self.iter_dir))

    def rank_state(self, layout, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict:
        entry = super().rank_state(layout, tp_rank, pp_rank, ep_rank)
        if "optimizer" not in entry:
            entry["optimizer"] = self._overlay(entry, layout, pp_rank, ep_rank)
        return entry

    def _overlay(self, entry, layout, pp_rank: int, ep_rank: int) -> dict:
        """Replace the parameters of one rank's model dicts by their master weights, add the moments."""
        path = entry["path"].parent / O.OPTIM_FILE
        models = entry["models"]
        keys = [layout.model_key(v) for v in range(layout.vpp)]
        experts = bool(getattr(self.args, "num_experts", None)) and layout.ep > 1
        chunks = [O.chunk_params(models[key], tied=not getattr(self.args, "untie_embeddings_and_output_weights", False),
                                 pp_size=layout.pp, pp_rank=pp_rank, chunk=v, num_chunks=layout.vpp,
                                 expert_parallel=experts) for v, key in enumerate(keys)]
        entries = O.optimizer_entries(O.load_optim_file(path), source=str(path), expected=2 if experts else 1)
        optim = O.match_layout(entries, chunks, self.settings, pp_rank=pp_rank, source=str(path))
        for index, buffers in enumerate(optim.optimizers):
            for gbuf, buffer in enumerate(buffers):
                state = models[keys[buffer.chunk]]
                for slot in buffer.slots:
                    if entries[index] is None:  # dense state of EP rank > 0: EP rank 0 holds it
                        for moment in MOMENTS:
                            state[state_name(slot.name, moment)] = state[slot.name]
                        continue
                    vectors = entries[index][gbuf][buffer.dtype_key]
                    state[slot.name] = FlatSlice(vectors["param"], slot.start, slot.shape, state[slot.name].dtype)
                    for moment in MOMENTS:
                        state[state_name(slot.name, moment)] = FlatSlice(vectors[moment], slot.start, slot.shape)
                        entry["unused"].add((keys[buffer.chunk], state_name(slot.name, moment)))
        return optim

    def carried(self) -> dict:
        """What a target `model_optim_rng.pt` carries over: the optimizer's param groups and step,
        the scheduler, the RNG state, the iteration (from TP/PP/EP rank 0's file)."""
        first = sorted(self.iter_dir.glob(f"mp_rank_*/{O.MODEL_FILE}"))[0]
        state = load_lazy(first)
        missing = [k for k in ("optimizer", "opt_param_scheduler") if k not in state]
        if missing:
            raise ConvertError(f"{first}: no '{missing[0]}' entry (not saved by a distributed-optimizer run)")
        O.optimizer_step(state["optimizer"], source=str(first))
        return {key: _materialize(state[key]) for key in CARRIED if key in state}

    def param_order(self, layout) -> list[str]:
        """The parameter names of every stage's first rank file, in registration order."""
        return [name for pp_rank in range(layout.pp)
                for model in self.rank_state(layout, 0, pp_rank)["models"].values()
                for name in model if "::" not in name]


def load(plan, sender) -> dict:
    source = OptimSource(plan.source.path)
    optim = {**source.carried(), "settings": source.settings, "param_order": source.param_order(plan.source.layout)}
    return stream(plan, sender, source, MOMENTS, optim=optim)


class OptimSourceFormat(MegatronSourceFormat):
    name = "optim"
    description = "Megatron-Core checkpoint with distributed-optimizer state (distrib_optim.pt per rank)"
    loader = "modellink_ckpt.loaders.optim:load"

    def open(self, directory, **kwargs) -> MegatronSource:
        return MegatronSource(directory, **kwargs)  # distrib_optim.pt sits beside legacy rank files

    # the resumed run's data-parallel settings, which lay the optimizer state out (a Megatron target)
    flags = MegatronSourceFormat.flags | {"target_data_parallel_size", "target_overlap_grad_reduce",
                                          "target_ddp_bucket_size"}

    def describe(self, request):
        info = super().describe(request)
        source = MegatronSource(request.path)
        O.check_iteration_dir(source.iter_dir)
        O.DdpSettings.from_args(source.args, source=str(source.iter_dir))
        if info.dims.mtp_num_layers:
            raise UsageError("--load-model-type optim: multi-token-prediction layers are not supported")
        options = request.options
        size = options.get("target_data_parallel_size")
        if size is not None and size < 1:
            raise UsageError(f"--target-data-parallel-size {size}: must be at least 1")
        overlap = options.get("target_overlap_grad_reduce")
        ddp = {"data_parallel_size": size, "overlap_grad_reduce": None if overlap is None else overlap == "on",
               "bucket_size": options.get("target_ddp_bucket_size")}
        return dataclasses.replace(info, options={**info.options, "ddp": ddp})

    def check(self, plan) -> None:
        asked = [flag for flag, value in zip(("--target-data-parallel-size", "--target-overlap-grad-reduce",
                                              "--target-ddp-bucket-size"), plan.source.options["ddp"].values())
                 if value is not None]
        if asked and plan.target.format != "mg":
            raise UsageError(f"{asked[0]}: only for --load-model-type optim --save-model-type mg (it shapes the "
                             f"optimizer state, not the weights)")

    def detect(self, path: Path) -> bool:
        return super().detect(path) and any(path.glob(f"**/mp_rank_*/{O.OPTIM_FILE}"))


SOURCE = OptimSourceFormat()
