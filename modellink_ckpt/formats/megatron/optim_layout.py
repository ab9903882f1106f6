"""Megatron's distributed-optimizer state file (`distrib_optim.pt`): layout replay, reader, writer.

`DistributedOptimizer.save_parameter_state` (megatron-core 0.16.1, "dp_zero" legacy torch format)
writes, next to each TP/PP/EP rank's `model_optim_rng.pt`:

    {"buckets_coalesced": True,
     <gbuf index>: {(param_dtype, grad_dtype): {"param": fp32 [n], "exp_avg": fp32 [n],
                                                "exp_avg_sq": fp32 [n], "numel_unpadded": n}},
     ...}

one grad buffer per model chunk (VPP) and (param, grad) dtype pair, in chunk order. A model with
experts has a chained optimizer and stores a list `[dense, expert]` of two such dicts; an entry is
None where that optimizer's DP rank 0 is another rank (the dense entry of every EP rank > 0).

Each flat vector is the concatenation of the buffer's buckets with their end padding removed. To
find a parameter in it, Megatron's grad-buffer construction is replayed here exactly
(`_ParamAndGradBuffer.__init__`):

- parameters in REVERSE registration (`named_parameters()`) order of the model chunk; with EP > 1
  the routed experts' (`.mlp.experts.`) parameters go to separate buffers of a second optimizer
  (with EP = 1 they are ordinary dense parameters); each (param, grad) dtype pair in its own buffer;
- each parameter's start rounded up to a multiple of 64 elements (megatron-core >= mid-2024;
  older files have no alignment: detected from `numel_unpadded`);
- a bucket closes as soon as it holds at least `bucket_size` elements (its end is the end of the
  parameter that filled it); `bucket_size` is `--ddp-bucket-size` or max(4e7, 1e6 * DP) with
  `--overlap-grad-reduce`, and None (a single bucket) without it, on PP ranks > 0 and for VPP chunks
  after the first (Megatron-LM's `disable_bucketing`);
- a shared (tied, PP > 1) embedding / output weight sits in a bucket of its own;
- bucket ends are padded to lcm(DP, 128) in memory; the file strips that padding, keeping the
  64-alignment gaps inside a bucket (zeros in the file).

The file content therefore does not depend on the DP size (except through the default bucket
size): resharding to another DP size or layout is a re-layout of per-parameter state.

Public API: layout -- `ParamSpec`, `chunk_params`, `is_expert_name`, `is_parameter_name`,
`DdpSettings`, `replay_buffer`, `rank_layout` (-> `RankOptimLayout` of `BufferLayout`s of
`ParamSlot`s), `ParamOrder` (Megatron's registration order for a target chunk); reading --
`check_iteration_dir`, `load_optim_file`, `optimizer_entries`, `match_layout`, `read_param_states`;
writing -- `write_distrib_optim`, `megatron_presence`; `model_optim_rng.pt` -- `optimizer_step`,
`target_optimizer_entry`. Pure torch + this package (no megatron import).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.formats.torch_zip import LazyTensor, StreamingTorchWriter, load_lazy
from modellink_ckpt.model.transforms import Rows

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
OPTIM_FILE = "distrib_optim.pt"
MODEL_FILE = "model_optim_rng.pt"
PARAM_ALIGN = 64                    # megatron-core >= 0.8: params start on 128-byte boundaries
LEGACY_ALIGNMENTS = (PARAM_ALIGN, 1)  # tried in this order against the file's numel_unpadded
DEFAULT_BUCKET_MIN = 40_000_000

# state-dict entries of a Megatron model that are not parameters (buffers, TE metadata)
_NOT_PARAMS = ("._extra_state", ".expert_bias", ".local_tokens_per_expert")


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One trainable parameter of a model chunk, in registration order."""

    name: str                       # chunk-level Megatron name, e.g. decoder.layers.0.mlp.linear_fc1.weight
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32   # the model (not main) parameter's dtype
    is_expert: bool = False         # expert-parallel parameter (separate buffer and optimizer)
    shared_embedding: bool = False  # tied embedding / output weight with PP > 1: a bucket of its own

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_parameter_name(name: str) -> bool:
    return not name.endswith(_NOT_PARAMS)


def is_expert_name(name: str) -> bool:
    """A routed expert's parameter, in any spelling (`local_experts.{j}`, grouped `weight1` /
    `weight2`, TE `linear_fc1.weight{j}`); shared experts and the router are not. Megatron treats
    these as expert-parallel (`allreduce = False`: own buffers, own optimizer) only with EP > 1."""
    return ".mlp.experts." in name


def chunk_params(model_dict: Mapping[str, Any], *, tied: bool, pp_size: int, pp_rank: int, chunk: int,
                 num_chunks: int, expert_parallel: bool, dtype: torch.dtype | None = None) -> list[ParamSpec]:
    """The parameters of one model chunk from its `model` / `model{v}` dict, whose order (a
    training checkpoint's state-dict order) is the registration order. Non-tensor entries,
    `_extra_state` and buffers (`expert_bias`) are skipped. `expert_parallel`: EP > 1 (else the
    experts are ordinary dense parameters). `dtype` overrides the tensors' dtype."""
    pre = pp_rank == 0 and chunk == 0
    post = pp_rank == pp_size - 1 and chunk == num_chunks - 1
    params = []
    for name, value in model_dict.items():
        if not is_parameter_name(name) or not hasattr(value, "shape") or not hasattr(value, "dtype"):
            continue
        shared = tied and pp_size > 1 and (
            (name == "embedding.word_embeddings.weight" and pre and not post)
            or (name == "output_layer.weight" and post and not pre))
        params.append(ParamSpec(name, tuple(value.shape), dtype or value.dtype,
                                expert_parallel and is_expert_name(name), shared))
    return params


# ----------------------------------------------------------------------------- layout replay


@dataclasses.dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    start: int          # offset in the file's flat vectors
    stop: int
    bucket: int
    buffer_start: int   # offset in Megatron's in-memory (bucket-padded) buffer

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """One grad buffer: where each parameter lies in the file's flat vectors."""

    chunk: int
    dtype_key: tuple[torch.dtype, torch.dtype]   # (param dtype, grad dtype): the key in the file
    is_expert: bool
    slots: tuple[ParamSlot, ...]                 # buffer order (reverse registration order)
    bucket_numel_unpadded: tuple[int, ...]

    @property
    def numel_unpadded(self) -> int:
        return sum(self.bucket_numel_unpadded)

    def padded_numel(self, dp_size: int, high_nccl_busbw: bool = False) -> int:
        """Megatron's in-memory buffer size for `dp_size` (bucket ends padded)."""
        divisor = math.lcm(dp_size, 128, 2 ** 16) if high_nccl_busbw else math.lcm(dp_size, 128)
        return sum(-(-n // divisor) * divisor for n in self.bucket_numel_unpadded)


def replay_buffer(params: Sequence[ParamSpec], bucket_size: int | None, *, align: int = PARAM_ALIGN
                  ) -> tuple[tuple[ParamSlot, ...], tuple[int, ...]]:
    """Megatron's `_ParamAndGradBuffer` index computation for `params` (registration order).

    Bucket-end padding only moves the next bucket's start in memory, and the file drops it, so
    file offsets are computed with bucket starts packed; in-memory offsets are kept for reference
    with DP = 1 (padding to 128).
    """
    def pad(n: int, divisor: int) -> int:
        return -(-n // divisor) * divisor

    slots: list[ParamSlot] = []
    buckets: list[int] = []
    bucket_start = 0        # in-memory index (DP-1 padding) of the open bucket
    file_bucket_start = 0   # file offset of the open bucket
    param_start = 0
    bucket_has_params = False
    param_end = 0

    def close(end_index: int) -> int:
        nonlocal bucket_start, file_bucket_start, bucket_has_params
        unpadded = end_index - bucket_start
        buckets.append(unpadded)
        file_bucket_start += unpadded
        bucket_start = pad(end_index, 128)
        bucket_has_params = False
        return bucket_start

    for param in reversed(params):
        param_start = pad(param_start, align)
        if param.shared_embedding and bucket_has_params:
            param_start = close(param_start)
        param_end = param_start + param.numel
        file_start = file_bucket_start + (param_start - bucket_start)
        slots.append(ParamSlot(param.name, param.shape, file_start, file_start + param.numel, len(buckets),
                               param_start))
        bucket_has_params = True
        if (bucket_size is not None and param_end - bucket_start >= bucket_size) or param.shared_embedding:
            param_start = close(param_end)
        else:
            param_start = param_end
    if bucket_has_params:
        close(param_end)
    return tuple(slots), tuple(buckets)


@dataclasses.dataclass(frozen=True)
class DdpSettings:
    """The run's DDP settings that shape the buffers (from the stored training args)."""

    data_parallel_size: int = 1
    overlap_grad_reduce: bool = False
    bucket_size: int | None = None       # --ddp-bucket-size (None: Megatron's default)
    grad_reduce_in_fp32: bool = True     # --accumulate-allreduce-grads-in-fp32
    align: int = PARAM_ALIGN

    @classmethod
    def from_args(cls, args, *, source: str = "checkpoint") -> "DdpSettings":
        def get(name, default=None):
            value = getattr(args, name, default)
            return default if value is None else value

        if not get("use_distributed_optimizer", False):
            raise ConvertError(f"{source}: its args say it was not trained with --use-distributed-optimizer")
        for flag, bad in (("use_custom_fsdp", True), ("use_megatron_fsdp", True), ("use_torch_fsdp2", True),
                          ("overlap_param_gather_with_optimizer_step", True)):
            if get(flag, False) == bad:
                raise ConvertError(f"{source}: trained with --{flag.replace('_', '-')}; its optimizer "
                                   f"state layout is not supported")
        instances = int(get("num_distributed_optimizer_instances", 1))
        if instances != 1:
            raise ConvertError(f"{source}: trained with --num-distributed-optimizer-instances {instances}; "
                               f"only 1 is supported")
        dp = get("data_parallel_size")
        if dp is None:
            world = get("world_size")
            mp = (int(get("tensor_model_parallel_size", 1)) * int(get("pipeline_model_parallel_size", 1))
                  * int(get("context_parallel_size", 1)))
            if world is None:
                raise ConvertError(f"{source}: its args hold neither data_parallel_size nor world_size")
            dp = int(world) // mp
        bucket = get("ddp_bucket_size")
        return cls(data_parallel_size=int(dp), overlap_grad_reduce=bool(get("overlap_grad_reduce", False)),
                   bucket_size=int(bucket) if bucket is not None else None,
                   grad_reduce_in_fp32=bool(get("accumulate_allreduce_grads_in_fp32", False)))

    def chunk_bucket_size(self, pp_rank: int, chunk: int) -> int | None:
        """The bucket size Megatron uses for this chunk's buffers (None: one bucket)."""
        if not self.overlap_grad_reduce or pp_rank > 0 or chunk > 0:
            return None
        if self.bucket_size is not None:
            return self.bucket_size
        return max(DEFAULT_BUCKET_MIN, 1_000_000 * self.data_parallel_size)

    def grad_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.grad_reduce_in_fp32 else param_dtype


@dataclasses.dataclass(frozen=True)
class RankOptimLayout:
    """Every buffer of one TP/PP/EP rank: `optimizers[i]` are the buffers of chained optimizer i
    (0: dense, 1: expert), in gbuf-index order."""

    optimizers: tuple[tuple[BufferLayout, ...], ...]

    def slots(self) -> Iterator[tuple[int, BufferLayout, ParamSlot]]:
        for index, buffers in enumerate(self.optimizers):
            for buffer in buffers:
                for slot in buffer.slots:
                    yield index, buffer, slot

    def describe(self) -> list:
        return [[(b.chunk, str(b.dtype_key), len(b.slots), list(b.bucket_numel_unpadded)) for b in buffers]
                for buffers in self.optimizers]


def rank_layout(chunks: Sequence[Sequence[ParamSpec]], settings: DdpSettings, *, pp_rank: int,
                expert_optimizer: bool, dtype_keys: Mapping[tuple[int, bool, torch.dtype], tuple] | None = None,
                align: int | None = None) -> RankOptimLayout:
    """The buffers of one rank holding `chunks` (each in registration order).

    `expert_optimizer`: the model has routed experts anywhere and EP > 1 (Megatron then chains a
    second, expert optimizer on every rank, even one without expert parameters). `dtype_keys` may force
    the (param, grad) dtype key of a buffer, keyed by (chunk, is_expert, param dtype).
    """
    align = settings.align if align is None else align
    optimizers = []
    for is_expert in ((False, True) if expert_optimizer else (False,)):
        buffers = []
        for chunk, params in enumerate(chunks):
            by_dtype: dict[torch.dtype, list[ParamSpec]] = {}
            for param in params:
                if param.is_expert == is_expert:
                    by_dtype.setdefault(param.dtype, []).append(param)
            bucket_size = settings.chunk_bucket_size(pp_rank, chunk)
            for dtype, group in by_dtype.items():
                key = (dtype_keys or {}).get((chunk, is_expert, dtype), (dtype, settings.grad_dtype(dtype)))
                slots, buckets = replay_buffer(group, bucket_size, align=align)
                buffers.append(BufferLayout(chunk, key, is_expert, slots, buckets))
        optimizers.append(tuple(buffers))
    if not expert_optimizer and any(p.is_expert for params in chunks for p in params):
        raise ConvertError("expert parameters found but the layout has no expert optimizer")
    return RankOptimLayout(tuple(optimizers))


# ----------------------------------------------------------------------------- registration order

# megatron-core's registration order inside one transformer layer, local and Transformer Engine
# spellings (a module's own parameters come before its children's): used for names a source
# checkpoint does not show (e.g. a change of spelling).
_BUILTIN_LAYER_ORDER = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.linear_q_proj.weight", "self_attention.linear_q_down_proj.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.linear_q_up_proj.weight",
    "self_attention.linear_kv_down_proj.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight", "self_attention.linear_kv_up_proj.weight",
    "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
    "self_attention.kv_layernorm.weight",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
    "mlp.router.weight",
    "mlp.experts.weight1", "mlp.experts.weight2",
    "mlp.experts.linear_fc1.weight#", "mlp.experts.linear_fc2.weight#",
    "mlp.experts.local_experts.#.linear_fc1.weight", "mlp.experts.local_experts.#.linear_fc1.bias",
    "mlp.experts.local_experts.#.linear_fc2.weight", "mlp.experts.local_experts.#.linear_fc2.bias",
    "mlp.shared_experts.gate_weight",
    "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight",
)
_LAYER_RE = re.compile(r"^(.*?decoder\.layers\.)(\d+)\.(.*)$")
_EXPERT_MODULE_RE = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")
_EXPERT_SUFFIX_RE = re.compile(r"^(.*\.weight|.*\.bias)(\d+)$")
_TOP_LEVEL = ("embedding.", None, "decoder.final_layernorm.", "output_layer.")  # None: the layers


class ParamOrder:
    """Megatron's registration order for the parameter names of a target chunk.

    Learned from a training checkpoint's model dicts (whose order is the registration order) and
    completed by the built-in local / Transformer Engine order. Layer and local expert indices
    are free: `sort` orders a chunk with other layer / expert numbering the way Megatron would.
    """

    def __init__(self, names_in_order: Iterable[str] = ()):
        self._layer_patterns: list[str] = []
        for name in names_in_order:
            match = _LAYER_RE.match(name)
            if match:
                pattern = self._pattern(match.group(3))[0]
                if pattern not in self._layer_patterns:
                    self._layer_patterns.append(pattern)
        for pattern in _BUILTIN_LAYER_ORDER:  # unknown ones after everything learned, in builtin order
            if pattern not in self._layer_patterns:
                self._layer_patterns.append(pattern)

    @classmethod
    def from_model_dicts(cls, dicts: Iterable[Mapping[str, Any]]) -> "ParamOrder":
        return cls(name for d in dicts for name in d if is_parameter_name(name))

    @staticmethod
    def _pattern(relative: str) -> tuple[str, int, bool]:
        """(pattern with '#' for the expert index, expert index, index is a module path part)."""
        match = _EXPERT_MODULE_RE.match(relative)
        if match:
            return f"{match.group(1)}#{match.group(3)}", int(match.group(2)), True
        match = _EXPERT_SUFFIX_RE.match(relative)
        if match and ".experts." in relative:
            return f"{match.group(1)}#", int(match.group(2)), False
        return relative, 0, False

    def key(self, name: str) -> tuple:
        match = _LAYER_RE.match(name)
        if match is None:
            for rank, prefix in enumerate(_TOP_LEVEL):
                if prefix is not None and name.startswith(prefix):
                    return (rank, 0, 0, 0, 0, name)
            return (len(_TOP_LEVEL), 0, 0, 0, 0, name)  # e.g. mtp.*: after the output layer
        layer = int(match.group(2))
        pattern, expert, module_index = self._pattern(match.group(3))
        try:
            position = self._layer_patterns.index(pattern)
        except ValueError:
            raise ConvertError(f"{name}: no known Megatron registration order for '{pattern}'") from None
        if module_index:  # local_experts.{j}.*: expert j's whole module before expert j+1's
            block = min(i for i, p in enumerate(self._layer_patterns)
                        if p.startswith(pattern.split("#")[0] + "#"))
            return (1, layer, block, expert, position, "")
        return (1, layer, position, expert, 0, "")

    def sort(self, names: Iterable[str]) -> list[str]:
        return sorted(names, key=self.key)


# ----------------------------------------------------------------------------- the file


def load_optim_file(path: str | Path):
    """The object in a `distrib_optim.pt` (restricted unpickler; tensors lazy for the zip format)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: not found (a distributed-optimizer checkpoint has a {OPTIM_FILE} "
                           f"next to every {MODEL_FILE}; trained without --use-distributed-optimizer "
                           f"or saved with --no-save-optim?)")
    return load_lazy(path)


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        return f"a dict with keys {keys}{', ...' if len(obj) > 6 else ''}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__name__}"


def optimizer_entries(obj, *, source: str, expected: int | None = None) -> list[dict | None]:
    """The per-optimizer state dicts of a loaded file (one for a dense model, [dense, expert] for a
    chained MoE optimizer), validated; unsupported formats raise a ConvertError naming them."""
    entries = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    if expected is not None and len(entries) != expected:
        raise ConvertError(f"{source}: holds {len(entries)} optimizer state(s), expected {expected} "
                           f"({'dense + expert' if expected == 2 else 'dense'})")
    for index, entry in enumerate(entries):
        if entry is None:
            continue
        where = f"{source}" + (f" (optimizer {index})" if len(entries) > 1 else "")
        if not isinstance(entry, dict):
            raise ConvertError(f"{where}: not a distributed-optimizer state: found {_describe(entry)}")
        if "param_state_sharding_type" in entry or "param_state" in entry:
            kind = entry.get("param_state_sharding_type", "?")
            raise ConvertError(f"{where}: sharded optimizer state (sharding type {kind!r}, a torch_dist / "
                               f"dist-ckpt format) is not supported; only the legacy "
                               f"'buckets_coalesced' format of save_parameter_state is")
        if "per_bucket_numel" in entry or "per_bucket_numel_unpadded" in entry:
            raise ConvertError(f"{where}: 'dp_reshardable' optimizer state (per-bucket shards) is not "
                               f"supported; only the legacy 'buckets_coalesced' format is")
        if "buckets_coalesced" not in entry:
            legacy = any(isinstance(v, dict) and any(isinstance(x, list) for x in v.values())
                         for k, v in entry.items() if isinstance(k, int))
            what = ("the per-bucket list format of Megatron before February 2024" if legacy
                    else _describe(entry))
            raise ConvertError(f"{where}: no 'buckets_coalesced' key: found {what}; only the coalesced "
                               f"format of megatron-core >= 0.6 (save_parameter_state) is supported")
        if entry["buckets_coalesced"] is not True:
            raise ConvertError(f"{where}: 'buckets_coalesced' is {entry['buckets_coalesced']!r}; not supported")
        for key, value in entry.items():
            if key == "buckets_coalesced":
                continue
            if not isinstance(key, int) or not isinstance(value, dict) or len(value) != 1:
                raise ConvertError(f"{where}: unexpected entry {key!r}: {_describe(value)}")
            (dtype_key, tensors), = value.items()
            if not (isinstance(dtype_key, tuple) and len(dtype_key) == 2
                    and all(isinstance(d, torch.dtype) for d in dtype_key)):
                raise ConvertError(f"{where}: buffer {key}: unexpected key {dtype_key!r}")
            if dtype_key[0] == torch.uint8:
                raise ConvertError(f"{where}: buffer {key}: fp8 parameter buffers are not supported")
            if not isinstance(tensors, dict) or set(tensors) != {*STATE_KEYS, "numel_unpadded"}:
                raise ConvertError(f"{where}: buffer {key}: expected {list(STATE_KEYS)} and 'numel_unpadded', "
                                   f"found {_describe(tensors)}")
            for name in STATE_KEYS:
                t = tensors[name]
                if not hasattr(t, "shape") or len(t.shape) != 1 or t.shape[0] != tensors["numel_unpadded"]:
                    raise ConvertError(f"{where}: buffer {key}: '{name}' is not a vector of numel_unpadded "
                                       f"= {tensors['numel_unpadded']} elements")
                if t.dtype != torch.float32:
                    raise ConvertError(f"{where}: buffer {key}: '{name}' is {t.dtype}, expected float32")
        if sorted(k for k in entry if k != "buckets_coalesced") != list(range(len(entry) - 1)):
            raise ConvertError(f"{where}: buffer indices are not 0..n-1")
    return entries


def match_layout(entries: Sequence[dict | None], chunks: Sequence[Sequence[ParamSpec]], settings: DdpSettings,
                 *, pp_rank: int, source: str) -> RankOptimLayout:
    """The replayed layout that fits the file: buffer count, dtype keys and every buffer's
    `numel_unpadded`; the parameter alignment is detected (64, or none for older Megatron)."""
    expert_optimizer = len(entries) == 2
    if len(entries) > 2:
        raise ConvertError(f"{source}: {len(entries)} chained optimizers; only [dense] or [dense, expert] "
                           f"are supported")
    # the file's dtype keys (param dtype from the model dict must match; grad dtype from the file)
    base = rank_layout(chunks, settings, pp_rank=pp_rank, expert_optimizer=expert_optimizer)
    keys = {}
    for index, buffers in enumerate(base.optimizers):
        entry = entries[index]
        if entry is None:
            continue
        count = len(entry) - 1
        if count != len(buffers):
            raise ConvertError(f"{source}: optimizer {index} has {count} buffer(s) in the file, the model "
                               f"chunks give {len(buffers)} ({[b.dtype_key for b in buffers]}); "
                               f"the stored args do not describe this checkpoint")
        for gbuf, buffer in enumerate(buffers):
            (file_key,) = entry[gbuf].keys()
            if file_key[0] != buffer.dtype_key[0]:
                raise ConvertError(f"{source}: buffer {gbuf} holds {file_key[0]} parameters, the model dict "
                                   f"{buffer.dtype_key[0]}")
            keys[(buffer.chunk, buffer.is_expert, buffer.dtype_key[0])] = file_key
    first_mismatch = None
    for align in ((settings.align,) + tuple(a for a in LEGACY_ALIGNMENTS if a != settings.align)):
        layout = rank_layout(chunks, settings, pp_rank=pp_rank, expert_optimizer=expert_optimizer,
                             dtype_keys=keys, align=align)
        mismatch = None
        for index, buffers in enumerate(layout.optimizers):
            entry = entries[index]
            if entry is None:
                continue
            for gbuf, buffer in enumerate(buffers):
                found = entry[gbuf][buffer.dtype_key]["numel_unpadded"]
                if found != buffer.numel_unpadded:
                    mismatch = (index, gbuf, found, buffer.numel_unpadded)
                    break
            if mismatch:
                break
        if mismatch is None:
            return layout
        first_mismatch = first_mismatch or mismatch
    index, gbuf, found, expected_numel = first_mismatch  # as replayed with the primary alignment
    raise ConvertError(
        f"{source}: optimizer {index} buffer {gbuf} holds {found} elements, but replaying Megatron's "
        f"buffer layout gives {expected_numel} (bucket size "
        f"{settings.chunk_bucket_size(pp_rank, 0)}, overlap_grad_reduce {settings.overlap_grad_reduce}, "
        f"DP {settings.data_parallel_size}, {settings.align}-element alignment; no alignment fits either); "
        f"the stored args or model dict do not describe this file")


def read_param_states(path: str | Path, layout: RankOptimLayout, entries: Sequence[dict | None] | None = None,
                      *, optimizers: Iterable[int] | None = None
                      ) -> Iterator[tuple[int, int, str, dict[str, torch.Tensor]]]:
    """(optimizer index, chunk, name, {"param", "exp_avg", "exp_avg_sq"}) for every parameter of the
    present optimizers (or those in `optimizers`), each fp32 and shaped like the parameter, read
    from the file slice by slice."""
    if entries is None:
        entries = optimizer_entries(load_optim_file(path), source=str(path), expected=len(layout.optimizers))
    wanted = set(range(len(layout.optimizers)) if optimizers is None else optimizers)
    for index, buffers in enumerate(layout.optimizers):
        if index not in wanted:
            continue
        entry = entries[index]
        if entry is None:
            raise ConvertError(f"{path}: holds no state for optimizer {index} (saved by another rank)")
        for gbuf, buffer in enumerate(buffers):
            vectors = entry[gbuf][buffer.dtype_key]
            for slot in buffer.slots:
                state = {}
                for key in STATE_KEYS:
                    out = torch.empty(slot.numel, dtype=torch.float32)
                    vector = vectors[key]
                    if isinstance(vector, LazyTensor):
                        vector.read_rows(slot.start, slot.stop, out)
                    else:
                        out.copy_(vector[slot.start:slot.stop])
                    state[key] = out.view(slot.shape)
                yield index, buffer.chunk, slot.name, state


# ----------------------------------------------------------------------------- writing


class _FlatVector(Rows):
    """A 1-D fp32 vector written piece by piece (pieces produced on demand)."""

    def __init__(self, numel: int, produce: Callable[[], Iterator[torch.Tensor]], what: str):
        self.shape = torch.Size((numel,))
        self.dtype = torch.float32
        self._produce, self._what = produce, what

    @property
    def pieces(self):
        written = 0
        for piece in self._produce():
            written += piece.numel()
            if written > self.shape[0]:
                break
            yield piece
        if written != self.shape[0]:
            raise ConvertError(f"{self._what}: produced {written} elements, expected {self.shape[0]}")


def megatron_presence(ep_rank: int, num_optimizers: int) -> tuple[bool, ...]:
    """Which optimizer states Megatron stores in a rank's file: the expert state always, the dense
    state only where the dense DP group's rank 0 lives (EP rank 0)."""
    if num_optimizers == 1:
        return (True,)
    return (ep_rank == 0, True)


def write_distrib_optim(path: str | Path, layout: RankOptimLayout,
                        state_of: Callable[[int, int, str, str], torch.Tensor],
                        *, present: Sequence[bool] | None = None) -> StreamingTorchWriter:
    """Write a `distrib_optim.pt` for `layout` exactly as `save_parameter_state` lays it out.

    `state_of(optimizer index, chunk, name, key)` gives a parameter's fp32 state for key in
    ("param", "exp_avg", "exp_avg_sq"), any shape with the parameter's numel. Gaps between
    parameters are zeros. `present[i]` False stores None for optimizer i (see `megatron_presence`).
    Returns the closed writer (size, digest).
    """
    present = tuple(present) if present is not None else (True,) * len(layout.optimizers)
    writer = StreamingTorchWriter(path)
    zeros = torch.zeros(PARAM_ALIGN * 2, dtype=torch.float32)
    try:
        entries: list = []
        for index, buffers in enumerate(layout.optimizers):
            if not present[index]:
                entries.append(None)
                continue
            entry: dict = {"buckets_coalesced": True}
            for gbuf, buffer in enumerate(buffers):
                tensors: dict = {}
                for key in STATE_KEYS:
                    def produce(buffer=buffer, key=key, index=index):
                        at = 0
                        for slot in buffer.slots:
                            gap = slot.start - at
                            while gap > 0:
                                step = min(gap, zeros.numel())
                                yield zeros[:step]
                                gap -= step
                            value = state_of(index, buffer.chunk, slot.name, key)
                            if value.numel() != slot.numel:
                                raise ConvertError(f"{path}: {slot.name} '{key}' has {value.numel()} elements, "
                                                   f"the parameter {slot.numel}")
                            yield value.detach().to(torch.float32).reshape(-1)
                            at = slot.stop
                        if at != buffer.numel_unpadded:
                            raise ConvertError(f"{path}: buffer {gbuf} ends at {at}, expected {buffer.numel_unpadded}")
                    tensors[key] = writer.add_tensor(_FlatVector(buffer.numel_unpadded, produce,
                                                                 f"{path}: buffer {gbuf} '{key}'"))
                tensors["numel_unpadded"] = buffer.numel_unpadded
                entry[gbuf] = {buffer.dtype_key: tensors}
            entries.append(entry)
        writer.close(entries[0] if len(entries) == 1 else entries)
    except BaseException:
        writer.abort()
        raise
    return writer


# ----------------------------------------------------------------------------- model_optim_rng.pt


def optimizer_step(entry, *, source: str = "checkpoint") -> int:
    """The Adam step count in a rank file's 'optimizer' entry (a DistributedOptimizer state dict,
    or a list of them for a chained dense + expert optimizer)."""
    states = entry if isinstance(entry, (list, tuple)) else [entry]
    steps = set()
    for state in states:
        try:
            groups = state["optimizer"]["param_groups"]
        except (TypeError, KeyError):
            raise ConvertError(f"{source}: 'optimizer' entry is not a distributed-optimizer state dict "
                               f"(found {_describe(state)})") from None
        steps.update(int(g["step"]) for g in groups if g.get("step") is not None)
    if len(steps) != 1:
        raise ConvertError(f"{source}: 'optimizer' param groups hold step counts {sorted(steps)}, expected one")
    return steps.pop()


# Megatron matches saved and live param groups by these (optimizer.param_group_identifier_keys)
GROUP_IDENTIFIER_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _group_id(group: Mapping) -> tuple:
    return tuple(group.get(key, group.get(f"pre_{key}")) for key in GROUP_IDENTIFIER_KEYS)


def target_optimizer_entry(entry, *, expert_optimizer: bool, source: str = "checkpoint"):
    """The 'optimizer' entry for a target rank file. Param groups, their hyper-parameters and the
    step count do not depend on the layout, but the number of chained optimizers does: with EP > 1
    a MoE model has [dense, expert], with EP = 1 one optimizer holding the experts too. Groups
    are matched on load by GROUP_IDENTIFIER_KEYS; a state dict may hold groups a rank lacks."""
    optimizer_step(entry, source=source)
    states = [copy.deepcopy(s) for s in (entry if isinstance(entry, (list, tuple)) else [entry])]
    if len(states) > 2:
        raise ConvertError(f"{source}: 'optimizer' holds {len(states)} chained optimizer states; only "
                           f"[dense] or [dense, expert] are supported")
    dense = states[0]
    if not expert_optimizer:  # experts join the dense optimizer's groups
        groups = dense["optimizer"]["param_groups"]
        for state in states[1:]:
            for group in state["optimizer"]["param_groups"]:
                group = {**group, "is_expert_parallel": False}
                if all(_group_id(group) != _group_id(g) for g in groups):
                    groups.append(group)
        return dense
    if len(states) == 2:
        return states
    expert = copy.deepcopy(dense)  # EP 1 -> EP > 1: the expert optimizer gets every group
    for group in expert["optimizer"]["param_groups"]:
        group["is_expert_parallel"] = True
    return [dense, expert]


def check_iteration_dir(iter_dir: str | Path) -> None:
    """Refuse checkpoint formats other than the legacy torch one, naming what was found."""
    iter_dir = Path(iter_dir)
    if (iter_dir / ".metadata").is_file() or any(iter_dir.glob("*.distcp")):
        raise ConvertError(f"{iter_dir}: a torch_dist (distributed checkpointing) checkpoint "
                           f"(.metadata / *.distcp files); only the legacy torch format "
                           f"(mp_rank_*/{MODEL_FILE} + {OPTIM_FILE}) is supported for --load-model-type optim")
    if not any(iter_dir.glob(f"mp_rank_*/{MODEL_FILE}")):
        raise ConvertError(f"{iter_dir}: no mp_rank_*/{MODEL_FILE} files")
    missing = [p.parent.name for p in sorted(iter_dir.glob(f"mp_rank_*/{MODEL_FILE}"))
               if not (p.parent / OPTIM_FILE).is_file()]
    if missing:
        raise ConvertError(f"{iter_dir}: no {OPTIM_FILE} in {', '.join(missing[:4])}"
                           f"{', ...' if len(missing) > 4 else ''} (trained without --use-distributed-optimizer, "
                           f"or saved with --no-save-optim / a torch_dist optimizer format)")
