"""A Megatron checkpoint folder in the legacy torch layout, opened for reading: the tracker file,
the iteration folder, the stored args and the rank files of every (TP, PP, EP) rank.

Rank files are memory-mapped through the restricted unpickler; a tensor is read by merging its TP
shards straight into the caller's buffer (`take`), optionally with LoRA adapters merged in as it
is read. What was read is checked off: a tensor nothing explains stops the conversion when its
stage is released. The loaders stream messages from here; the Megatron saver re-reads its own
output here to verify it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats import kernel_copy
from modellink_ckpt.formats.file_io import scratch_tensor
from modellink_ckpt.formats.megatron import names as mg_names
from modellink_ckpt.formats.megatron.args import dims_from_args, layout_from_args
from modellink_ckpt.formats.megatron.lora import merge_lora
from modellink_ckpt.formats.torch_dist import is_torch_dist
from modellink_ckpt.formats.torch_zip import LazyTensor, load_lazy
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.accounting import account
from modellink_ckpt.model.layout import ParallelLayout

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def find_iteration(directory: Path, flag: str = "--load-dir") -> tuple[int | str, Path]:
    """(iteration, its folder) of a Megatron checkpoint: from the tracker file, or `directory` is
    the iteration folder itself (rank files, or a torch_dist store)."""
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

    def __init__(self, directory: str | Path, *, flag: str = "--load-dir", lora=None,
                 lora_dir: str | Path | None = None, keep_adapters: bool = False):
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
            left = account((), (f"{model_key}:{name}" for model_key, name in entry["unused"])).unexplained
            if left and (self.checked_stages is None or pp_rank in self.checked_stages):
                model_key, name = left[0].split(":", 1)
                raise ConvertError(f"{entry['path']}: unexpected tensor '{name}' in '{model_key}' "
                                   f"({len(left)} in all) that the model config does not explain")

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

    def stored_dtype(self, layout: ParallelLayout, pp_rank: int, vchunk: int, name: str,
                     ep_rank: int = 0) -> torch.dtype:
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
            whole = (shard.read_into(scratch_tensor(shard.shape, shard.dtype)) if isinstance(shard, LazyTensor)
                     else shard)
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
