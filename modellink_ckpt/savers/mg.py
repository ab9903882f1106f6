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
from tqdm import tqdm

from modellink_ckpt import mapping
from modellink_ckpt import transforms as T
from modellink_ckpt.loaders.mg import RANK_FILE, TRACKER, iteration_dir_name
from modellink_ckpt.megatron_args import make_args
from modellink_ckpt.staging import StagedDir, write_text_atomic
from modellink_ckpt.torch_zip import StreamingTorchWriter

ITERATION = 1


class RankFiles:
    """The open rank files of the target layout and the tensor references each will hold."""

    def __init__(self, staging: StagedDir, layout, make_rank_args):
        self._staging, self._layout, self._make_args = staging, layout, make_rank_args
        self._writers: dict[tuple[int, int, int], StreamingTorchWriter] = {}
        self._models: dict[tuple[int, int, int], dict[str, dict]] = {}
        self._closed: set[tuple[int, int, int]] = set()
        self.bytes_written = 0

    def put(self, rank: tuple[int, int, int], vchunk: int, name: str, tensor: torch.Tensor) -> None:
        assert rank not in self._closed, f"rank file {rank} already closed"
        self._models[rank][self._layout.model_key(vchunk)][name] = self._writer(rank).add_tensor(tensor)

    def _writer(self, rank) -> StreamingTorchWriter:
        if rank not in self._writers:
            folder = self._staging.path / self._layout.rank_dir(*rank)
            folder.mkdir(parents=True, exist_ok=True)
            self._writers[rank] = StreamingTorchWriter(folder / RANK_FILE)
            self._models[rank] = {self._layout.model_key(v): {} for v in range(self._layout.vpp)}
        return self._writers[rank]

    def close_stage(self, pp_rank: int) -> None:
        for rank in [r for r in self._writers if r[1] == pp_rank and r not in self._closed]:
            self._close(rank)

    def close_all(self) -> None:
        for rank in self._layout.ranks():  # a stage holding only noop layers still gets its file
            if rank not in self._closed:
                self._writer(rank)
                self._close(rank)

    def _close(self, rank) -> None:
        writer = self._writers[rank]
        state = {"args": self._make_args(rank), "checkpoint_version": 3.0, "iteration": ITERATION}
        state.update(self._models[rank])
        writer.close(state)
        self.bytes_written += writer.bytes_written
        self._closed.add(rank)
        del self._models[rank]


def save(plan, receiver) -> dict:
    started = time.monotonic()
    layout, dims = plan.target_layout, plan.dims
    messages = iter(receiver)
    meta = next(messages)
    assert meta.kind == "meta", meta.kind

    dtype_holder: dict[str, torch.dtype] = {}

    def rank_args(rank):
        return make_args(dims, layout, padded_vocab=plan.padded_vocab, divisible_by=plan.divisible_by,
                         dtype=dtype_holder.get("dtype", torch.float32), transformer_impl=plan.transformer_impl,
                         model_type_hf=plan.family.name, iteration=ITERATION,
                         tokenizer_model=str(Path(plan.tokenizer_model).resolve()) if plan.tokenizer_model else None)

    staging = StagedDir(plan.save_dir / iteration_dir_name(ITERATION), overwrite=plan.overwrite)
    files = RankFiles(staging, layout, rank_args)
    slot_of = layout.slot_of_hf_layer()
    tp_kinds = mapping.tp_kind(mapping.layer_rules(plan.family, dims, 0)) if dims.num_layers else {}
    first_pp, first_chunk = layout.first_stage
    last_pp, last_chunk = layout.last_stage

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            if plan.params_dtype is not None:
                tensor = tensor.to(plan.params_dtype)
            dtype_holder.setdefault("dtype", tensor.dtype)
        return tensor

    def put_split(pp_rank: int, vchunk: int, name: str, tensor: torch.Tensor, kind: str) -> None:
        if kind == "vocab":
            tensor, kind = T.pad_vocab(tensor, plan.padded_vocab), "column"
        for tp_rank, shard in enumerate(T.TP_SPLIT[kind][0](cast(tensor), layout.tp)):
            for ep_rank in range(layout.ep):
                files.put((tp_rank, pp_rank, ep_rank), vchunk, name, shard)

    progress = tqdm(total=dims.num_layers, desc="saving layers", unit="layer", disable=plan.quiet)
    try:
        for message in messages:
            if message.kind == "embeddings":
                embedding = message.tensors[mapping.EMBEDDING]
                put_split(first_pp, first_chunk, mapping.EMBEDDING, embedding, "vocab")
                if dims.tie_word_embeddings and layout.pp > 1:  # the last stage keeps its own copy
                    put_split(last_pp, last_chunk, mapping.OUTPUT_LAYER, embedding, "vocab")
            elif message.kind == "layer":
                slot = slot_of[message["layer"]]
                for name, tensor in message.tensors.items():
                    full_name = f"decoder.layers.{slot.local_layer}.{mapping.to_impl_name(name, plan.transformer_impl)}"
                    put_split(slot.pp_rank, slot.vchunk, full_name, tensor, tp_kinds[name])
                if message["layer"] == layout.last_hf_layer_of_stage(slot.pp_rank) and slot.pp_rank != last_pp:
                    files.close_stage(slot.pp_rank)
                progress.update(1)
            elif message.kind == "final_norm":
                put_split(last_pp, last_chunk, mapping.FINAL_NORM, message.tensors[mapping.FINAL_NORM], "replicated")
            elif message.kind == "output_layer":
                put_split(last_pp, last_chunk, mapping.OUTPUT_LAYER, message.tensors[mapping.OUTPUT_LAYER], "vocab")
            elif message.kind == "done":
                files.close_all()
        progress.close()
        target = staging.publish()
        write_text_atomic(plan.save_dir / TRACKER, str(ITERATION))
    except BaseException:
        progress.close()
        staging.discard()
        raise
    return {"bytes": files.bytes_written, "seconds": time.monotonic() - started, "target": str(target),
            "files": layout.tp * layout.pp * layout.ep}
