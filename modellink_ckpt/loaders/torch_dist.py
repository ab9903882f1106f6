"""Megatron `torch_dist` checkpoints as a source (`--load-model-type mg` on a torch_dist folder).

The store holds layout-independent global tensors: every layer tensor is the TP = 1 tensor on a
leading global-layer axis (routed experts also on a global-expert axis). So a torch_dist
checkpoint reads as a TP1 PP1 EP1 Megatron checkpoint whose single "rank file" is virtual: each
of its tensors is a lazy region of a store tensor (one layer, one expert), read chunk by chunk
only when the loader takes it. Names follow megatron's sharded-state-dict keys: norms fused into
the next linear (`linear_qkv.layer_norm_weight`, as the Transformer Engine spelling), experts as
`mlp.experts.experts.*`; per-layer keys (`decoder.layers.<i>.*`, for mixed dense/MoE stacks) too.
Optimizer state, RNG state and `_extra_state` objects are not weights and are left out.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.megatron.checkpoint import MegatronSource, find_iteration
from modellink_ckpt.formats.torch_dist import TorchDistStore, is_torch_dist
from modellink_ckpt.formats.torch_zip import LazyTensor
from modellink_ckpt.model.layout import ParallelLayout

_PER_LAYER = re.compile(r"^(decoder\.layers\.\d+\.|mtp\.layers\.\d+\.transformer_layer\.)(.+)$")
_EXPERTS = "mlp.experts.experts."
NOT_WEIGHTS = ("optimizer.", "rng_state")


class DistRegion(LazyTensor):
    """One region of a store tensor (`index`: leading indices, e.g. (layer,) or (layer, expert)),
    read on demand like a tensor in a rank file."""

    __slots__ = ("store", "key", "index")

    def __init__(self, store: TorchDistStore, key: str, index: tuple[int, ...]):
        entry = store.tensors[key]
        self.store, self.key, self.index = store, key, index
        self.dtype, self.shape = entry.dtype, torch.Size(entry.shape[len(index):])
        self.file, self.record_offset, self.offset = None, 0, 0
        self.stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))

    def is_contiguous(self) -> bool:
        return True

    def read_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        region = tuple(slice(i, i + 1) for i in self.index) + ((slice(start, stop),) if self.shape else ())
        self.store.read(self.key, region, out.view((1,) * len(self.index) + tuple(out.shape)))
        return out

    def load(self) -> torch.Tensor:
        return self.read_into(torch.empty(self.shape, dtype=self.dtype))


class TorchDistSource(MegatronSource):
    """A torch_dist checkpoint read as one virtual TP1 PP1 EP1 rank file."""

    def __init__(self, directory: str | Path, *, flag: str = "--load-dir", lora=None, lora_dir=None,
                 keep_adapters: bool = False):
        if lora is not None or lora_dir is not None or keep_adapters:
            raise UsageError(f"{flag} {directory}: LoRA adapters in torch_dist checkpoints are not supported")
        self.dir = Path(directory)
        self.iteration, self.iter_dir = find_iteration(self.dir, flag)
        self.store = TorchDistStore(self.iter_dir)
        common = self.store.common()
        if "args" not in common:
            raise ConvertError(f"{self.iter_dir / 'common.pt'}: no 'args' stored; cannot tell the model's sizes")
        self.args = common["args"]
        self._lora = self._lora_source = None
        self._keep_adapters = False
        self._cache: dict[tuple[int, int, int], dict] = {}
        self._released: set[int] = set()

    def layout(self, dims) -> ParallelLayout:
        if getattr(self.args, "noop_layers", None):
            raise ConvertError(f"{self.iter_dir}: noop layers in a torch_dist checkpoint are not supported")
        return ParallelLayout.build(dims.num_layers, num_heads=dims.num_attention_heads,
                                    num_query_groups=None if dims.multi_latent_attention else dims.num_query_groups,
                                    num_experts=dims.num_experts, prefix="source ")

    def padded_vocab(self) -> int | None:
        entry = self.store.tensors.get("embedding.word_embeddings.weight")
        return entry.shape[0] if entry else getattr(self.args, "padded_vocab_size", None)

    def rank_state(self, layout: ParallelLayout, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict:
        if (tp_rank, pp_rank, ep_rank) != (0, 0, 0):
            raise ConvertError(f"{self.iter_dir}: a torch_dist checkpoint reads as one TP1 PP1 EP1 rank")
        if (0, 0, 0) not in self._cache:
            models = {"model": self._virtual_names(layout.num_layers)}
            self._cache[0, 0, 0] = {"path": self.iter_dir / ".metadata", "models": models,
                                    "unused": set() if 0 in self._released else
                                    {("model", name) for name in models["model"]}}
        return self._cache[0, 0, 0]

    def _virtual_names(self, num_layers: int) -> dict[str, DistRegion]:
        """{legacy TP1 name: lazy region} of every weight in the store."""
        names: dict[str, DistRegion] = {}
        for key, entry in self.store.tensors.items():
            if key.startswith(NOT_WEIGHTS):
                continue
            match = _PER_LAYER.match(key)
            if match:  # a layer's own keys (a mixed dense/MoE stack, or an MTP layer's decoder layer)
                self._add_layer(names, key, match.group(1), match.group(2), (), entry.shape)
            elif key.startswith("decoder.layers."):
                if not entry.shape or entry.shape[0] != num_layers:
                    raise ConvertError(f"{self.iter_dir}: '{key}' {list(entry.shape)} is not stacked over the "
                                       f"{num_layers} layers the args describe")
                for layer in range(num_layers):
                    self._add_layer(names, key, f"decoder.layers.{layer}.", key[len("decoder.layers."):], (layer,),
                                    entry.shape[1:])
            else:
                names[key] = DistRegion(self.store, key, ())
        layer_prefixes = {f"decoder.layers.{layer}." for layer in range(num_layers)} | \
            {m.group(1) for m in map(_PER_LAYER.match, names) if m and m.group(1).startswith("mtp.")}
        for prefix in layer_prefixes:  # on MoE layers the local spec spells pre_mlp_layernorm as fc1's norm
            for param in ("weight", "bias"):
                fused = prefix + "mlp.linear_fc1.layer_norm_" + param
                if fused in names and prefix + "mlp.router.weight" in names \
                        and prefix + "mlp.linear_fc1.weight" not in names:
                    names[prefix + "pre_mlp_layernorm." + param] = names.pop(fused)
        return names

    def _add_layer(self, names: dict, key: str, prefix: str, suffix: str, index: tuple, shape) -> None:
        if suffix.startswith(_EXPERTS):  # a global expert axis next
            rest = suffix[len(_EXPERTS):]
            for expert in range(shape[0]):
                names[f"{prefix}mlp.experts.local_experts.{expert}.{rest}"] = DistRegion(self.store, key, index + (expert,))
        else:
            names[prefix + suffix] = DistRegion(self.store, key, index)


def open_megatron(directory: str | Path, **kwargs) -> MegatronSource:
    """The Megatron source at `directory`: legacy rank files or a torch_dist store."""
    _, iter_dir = find_iteration(Path(directory), kwargs.get("flag", "--load-dir"))
    if not is_torch_dist(iter_dir) and ((iter_dir / ".metadata").is_file() or any(iter_dir.glob("*.distcp"))):
        raise ConvertError(f"{iter_dir}: an incomplete torch_dist checkpoint (no metadata.json, which a save writes "
                           f"last)")
    cls = TorchDistSource if is_torch_dist(iter_dir) else MegatronSource
    return cls(directory, **kwargs)
