"""The parallel layout plan: where every layer and tensor of a Megatron checkpoint lives.

Pure and shared by every loader and saver: which Megatron layer slot holds which HF layer
(noop slots hold none), which pipeline stage, virtual chunk and local index a slot has, the rank
folder names and the padded vocabulary. See megatron-format.md §1 and §4.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from modellink_ckpt.errors import UsageError
from modellink_ckpt.model.transforms import padded_vocab_size


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one Megatron layer slot lives."""

    mg_layer: int      # global Megatron index, noop slots included
    pp_rank: int
    vchunk: int        # virtual pipeline chunk (0 without VPP)
    local_layer: int   # index inside the stage/chunk: decoder.layers.{local_layer}
    hf_layer: int | None  # None for a noop slot


def parse_int_list(text: str | None, flag: str) -> tuple[int, ...]:
    if text is None or text == "" or text == ():
        return ()
    if isinstance(text, (list, tuple, set, frozenset)):
        return tuple(sorted(int(x) for x in text)) if isinstance(text, (set, frozenset)) else tuple(int(x) for x in text)
    try:
        return tuple(int(x) for x in str(text).replace(" ", "").split(",") if x != "")
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers, e.g. 8,8,8,8") from None


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """A validated target or source layout for a model with `hf_layers` real layers."""

    hf_layers: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp_layers: int | None = None          # --num-layers-per-virtual-pipeline-stage
    num_layer_list: tuple[int, ...] = ()   # --num-layer-list (uneven PP)
    noop_layers: tuple[int, ...] = ()      # --noop-layers (global Megatron slots)
    expert_tp: int | None = None           # --expert-tensor-parallel-size (None: TP)

    @classmethod
    def build(cls, hf_layers: int, *, tp: int = 1, pp: int = 1, ep: int = 1, vpp_layers: int | None = None,
              num_layer_list=None, noop_layers=None, num_heads: int | None = None,
              num_query_groups: int | None = None, num_experts: int = 0, expert_tp: int | None = None,
              prefix: str = "--target-") -> "ParallelLayout":
        layout = cls(hf_layers, int(tp), int(pp), int(ep), int(vpp_layers) if vpp_layers else None,
                     parse_int_list(num_layer_list, "--num-layer-list"),
                     tuple(sorted(set(parse_int_list(noop_layers, "--noop-layers")))),
                     int(expert_tp) if expert_tp and int(expert_tp) != int(tp) else None)
        layout.validate(num_heads, num_query_groups, prefix)
        layout.validate_experts(num_experts, prefix)
        return layout

    @property
    def etp(self) -> int:
        """Expert tensor-parallel size: TP, or 1 for whole experts on every TP rank."""
        return self.expert_tp or self.tp

    def validate_experts(self, num_experts: int, prefix: str) -> None:
        ep_flag = f"{prefix}expert-parallel-size"
        if self.ep > 1 and not num_experts:
            raise UsageError(f"{ep_flag} {self.ep}: the model has no experts")
        if num_experts and num_experts % self.ep:
            raise UsageError(f"{ep_flag} {self.ep} does not divide the {num_experts} experts of the model")
        if self.etp not in (1, self.tp):
            raise UsageError(f"--expert-tensor-parallel-size {self.etp}: must be 1 or the tensor-parallel size "
                             f"{self.tp}")

    @property
    def num_layers(self) -> int:
        """Megatron layer slots, noop slots included."""
        return self.hf_layers + len(self.noop_layers)

    @property
    def vpp(self) -> int:
        return self.num_layers // self.pp // self.vpp_layers if self.vpp_layers else 1

    def validate(self, num_heads: int | None, num_query_groups: int | None, prefix: str) -> None:
        tp_flag, pp_flag = f"{prefix}tensor-parallel-size", f"{prefix}pipeline-parallel-size"
        for name, value in ((tp_flag, self.tp), (pp_flag, self.pp), (f"{prefix}expert-parallel-size", self.ep)):
            if value < 1:
                raise UsageError(f"{name} {value}: must be at least 1")
        if num_query_groups and num_query_groups % self.tp:
            raise UsageError(f"{tp_flag} {self.tp} does not divide the {num_query_groups} query groups "
                             f"(num_key_value_heads) of the model")
        if num_heads and num_heads % self.tp:
            raise UsageError(f"{tp_flag} {self.tp} does not divide the {num_heads} attention heads of the model")
        bad_noop = [i for i in self.noop_layers if not 0 <= i < self.num_layers]
        if bad_noop:
            raise UsageError(f"--noop-layers {','.join(map(str, bad_noop))}: outside the {self.num_layers} "
                             f"Megatron layers ({self.hf_layers} model layers + {len(self.noop_layers)} noop)")
        if self.num_layer_list:
            if self.vpp_layers:
                raise UsageError("--num-layer-list and --num-layers-per-virtual-pipeline-stage are exclusive")
            if len(self.num_layer_list) != self.pp:
                raise UsageError(f"--num-layer-list {','.join(map(str, self.num_layer_list))}: needs {self.pp} "
                                 f"entries ({pp_flag} {self.pp}), got {len(self.num_layer_list)}")
            if sum(self.num_layer_list) != self.num_layers or min(self.num_layer_list) < 1:
                raise UsageError(f"--num-layer-list {','.join(map(str, self.num_layer_list))}: entries must be "
                                 f"positive and sum to {self.num_layers} layers, got {sum(self.num_layer_list)}")
        elif self.num_layers % self.pp:
            raise UsageError(f"{pp_flag} {self.pp} does not divide the {self.num_layers} layers; "
                             f"use --num-layer-list or --noop-layers to make them fit")
        if self.vpp_layers:
            per_stage = self.num_layers // self.pp
            if per_stage % self.vpp_layers:
                raise UsageError(f"--num-layers-per-virtual-pipeline-stage {self.vpp_layers} does not divide "
                                 f"the {per_stage} layers per pipeline stage")

    def describe(self) -> dict:
        return {"tensor_parallel": self.tp, "pipeline_parallel": self.pp, "expert_parallel": self.ep,
                "expert_tensor_parallel": self.etp,
                "virtual_pipeline_layers": self.vpp_layers, "num_layer_list": list(self.num_layer_list) or None,
                "noop_layers": list(self.noop_layers) or None, "num_layers": self.num_layers}

    # ---- layer placement -------------------------------------------------------------------

    def stage_layer_counts(self) -> tuple[int, ...]:
        if self.num_layer_list:
            return self.num_layer_list
        return (self.num_layers // self.pp,) * self.pp

    def slots(self) -> list[Slot]:
        """Every Megatron layer slot in global order."""
        hf_of_slot: list[int | None] = []
        next_hf = 0
        noop = set(self.noop_layers)
        for mg_layer in range(self.num_layers):
            if mg_layer in noop:
                hf_of_slot.append(None)
            else:
                hf_of_slot.append(next_hf)
                next_hf += 1
        result = []
        if self.vpp_layers:
            lv = self.vpp_layers
            for mg_layer in range(self.num_layers):
                virtual_stage, local = divmod(mg_layer, lv)
                vchunk, pp_rank = divmod(virtual_stage, self.pp)
                result.append(Slot(mg_layer, pp_rank, vchunk, local, hf_of_slot[mg_layer]))
            return result
        start = 0
        for pp_rank, count in enumerate(self.stage_layer_counts()):
            for local in range(count):
                result.append(Slot(start + local, pp_rank, 0, local, hf_of_slot[start + local]))
            start += count
        return result

    def slot_of_hf_layer(self) -> dict[int, Slot]:
        return {s.hf_layer: s for s in self.slots() if s.hf_layer is not None}

    def stage_slots(self, pp_rank: int) -> list[Slot]:
        return [s for s in self.slots() if s.pp_rank == pp_rank]

    def last_hf_layer_of_stage(self, pp_rank: int) -> int | None:
        """The last HF layer written to stage `pp_rank` (its files are complete after it)."""
        layers = [s.hf_layer for s in self.stage_slots(pp_rank) if s.hf_layer is not None]
        return max(layers) if layers else None

    @property
    def first_stage(self) -> tuple[int, int]:
        """(pp_rank, vchunk) holding the embedding."""
        return 0, 0

    @property
    def last_stage(self) -> tuple[int, int]:
        """(pp_rank, vchunk) holding the final norm and output layer."""
        return self.pp - 1, self.vpp - 1

    # ---- files -----------------------------------------------------------------------------

    def rank_dir(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        name = f"mp_rank_{tp_rank:02d}"
        if self.pp > 1:
            name += f"_{pp_rank:03d}"
        if self.ep > 1:
            name += f"_{ep_rank:03d}"
        return name

    def summary(self) -> str:
        """One line: `TP2 PP2 EP2 VPP2 layers 3,1 noop 4`."""
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        parts += [f"EP{self.ep}"] if self.ep > 1 else []
        parts += [f"ETP{self.etp}"] if self.etp != self.tp else []
        parts += [f"VPP{self.vpp}"] if self.vpp_layers else []
        parts += [f"layers {','.join(map(str, self.num_layer_list))}"] if self.num_layer_list else []
        parts += [f"noop {','.join(map(str, self.noop_layers))}"] if self.noop_layers else []
        return " ".join(parts)

    def model_key(self, vchunk: int) -> str:
        # one chunk per stage is no virtual pipeline: Megatron then stores `model`, as without VPP
        return f"model{vchunk}" if self.vpp > 1 else "model"

    def ranks(self) -> Iterator[tuple[int, int, int]]:
        """(tp_rank, pp_rank, ep_rank) of every rank file, in folder order."""
        for tp_rank in range(self.tp):
            for pp_rank in range(self.pp):
                for ep_rank in range(self.ep):
                    yield tp_rank, pp_rank, ep_rank

    def padded_vocab(self, vocab_size: int, divisible_by: int) -> int:
        return padded_vocab_size(vocab_size, divisible_by, self.tp)
