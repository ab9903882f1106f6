"""Optimizer state for Megatron output from a distributed-optimizer source (`--load-model-type optim`).

The placer hands every target rank its shards of each parameter's fp32 master weight and Adam
moments as they arrive, layer by layer, in our order; Megatron's `distrib_optim.pt` wants them as
flat vectors in its buffer order (reverse registration order, aligned, bucketed). The shards are
therefore spilled to a scratch file beside the rank file (memory stays at one message) and, when
the rank file is complete, written in buffer order by `optim_layout.write_distrib_optim`. The
rank's `model_optim_rng.pt` gets the optimizer's param groups and step, the scheduler, the RNG
state and the iteration of the source, and args for the target layout and data-parallel size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from modellink_ckpt.formats.megatron import optim_layout as O
from modellink_ckpt.model import transforms as T

STATES = ("param", "exp_avg", "exp_avg_sq")


class Spill:
    """fp32 tensors appended to a scratch file and read back by key."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "w+b")
        self._index: dict[tuple, tuple[int, tuple[int, ...]]] = {}
        self._end = 0

    def add(self, key: tuple, tensor: torch.Tensor) -> None:
        data = tensor.detach().to(torch.float32).contiguous()
        self._file.seek(self._end)
        self._file.write(data.reshape(-1).numpy().tobytes() if data.numel() else b"")
        self._index[key] = (self._end, tuple(data.shape))
        self._end += data.numel() * 4

    def get(self, key: tuple) -> torch.Tensor:
        offset, shape = self._index[key]
        out = torch.empty(shape, dtype=torch.float32)
        if out.numel():
            self._file.flush()
            got = os.preadv(self._file.fileno(), [out.numpy().reshape(-1).view("u1")], offset)
            assert got == out.numel() * 4, (self.path, key)
        return out

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class OptimStateWriter:
    """The optimizer half of a target rank: `distrib_optim.pt` and the `model_optim_rng.pt` entries."""

    def __init__(self, plan, layout, info: dict):
        self.layout, self.dims = layout, plan.dims
        asked = {key: value for key, value in plan.target.ddp.items() if value is not None}
        if asked.get("bucket_size") == 0:  # --target-ddp-bucket-size 0: Megatron's default size
            asked["bucket_size"] = None
        self.settings = dataclasses.replace(info["settings"], **asked)  # the source run's, unless asked
        self.order = O.ParamOrder(info["param_order"])
        self.info = info
        self.expert_optimizer = bool(plan.dims.num_experts) and layout.ep > 1
        self.iteration = int(info.get("iteration") or 1)
        self._spills: dict[tuple[int, int, int], Spill] = {}

    def add(self, folder: Path, rank, vchunk: int, name: str, state: str, shard: torch.Tensor) -> None:
        if rank not in self._spills:
            folder.mkdir(parents=True, exist_ok=True)
            self._spills[rank] = Spill(folder / ".optimizer-state.spill")
        self._spills[rank].add((vchunk, name, state), T.as_tensor(shard))

    def finish_rank(self, folder: Path, rank, models: dict[str, dict]) -> tuple[dict, tuple[int, str]]:
        """Write the rank's `distrib_optim.pt`; return the entries for its model file and the
        optimizer file's (size, digest)."""
        tp_rank, pp_rank, ep_rank = rank
        chunks = []
        for vchunk in range(self.layout.vpp):
            refs = models[self.layout.model_key(vchunk)]
            ordered = {name: refs[name] for name in self.order.sort(n for n in refs if O.is_parameter_name(n))}
            chunks.append(O.chunk_params(ordered, tied=self.dims.tie_word_embeddings, pp_size=self.layout.pp,
                                         pp_rank=pp_rank, chunk=vchunk, num_chunks=self.layout.vpp,
                                         expert_parallel=self.layout.ep > 1))
        layout = O.rank_layout(chunks, self.settings, pp_rank=pp_rank, expert_optimizer=self.expert_optimizer)
        spill = self._spills.pop(rank, None)

        def state_of(index, chunk, name, key):
            return spill.get((chunk, name, key))

        try:
            writer = O.write_distrib_optim(folder / O.OPTIM_FILE, layout, state_of,
                                           present=O.megatron_presence(ep_rank, len(layout.optimizers)))
        finally:
            if spill is not None:
                spill.close()
        entries = {"optimizer": O.target_optimizer_entry(self.info["optimizer"], expert_optimizer=self.expert_optimizer),
                   "opt_param_scheduler": self.info["opt_param_scheduler"], "iteration": self.iteration}
        for key in ("rng_state", "num_floating_point_operations_so_far"):
            if key in self.info:
                entries[key] = self.info[key]
        return entries, (writer.size, writer.digest)

    def args_update(self) -> dict:
        """Stored-args fields of a distributed-optimizer run at the target layout."""
        s, lay = self.settings, self.layout
        return {"use_distributed_optimizer": True, "data_parallel_size": s.data_parallel_size,
                "world_size": lay.tp * lay.pp * s.data_parallel_size, "overlap_grad_reduce": s.overlap_grad_reduce,
                "ddp_bucket_size": s.bucket_size, "accumulate_allreduce_grads_in_fp32": s.grad_reduce_in_fp32,
                "iteration": self.iteration}

    def abort(self) -> None:
        for spill in self._spills.values():
            spill.close()
        self._spills.clear()
