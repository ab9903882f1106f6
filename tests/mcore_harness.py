"""Run a Megatron checkpoint (legacy torch layout) through REAL megatron-core GPTModels on CPU.

This is a test helper: it is the strongest available check of a converted checkpoint, because
the consumer is megatron-core itself, with genuine multi-process tensor / pipeline / virtual
pipeline parallelism (gloo, one process per rank) and ``load_state_dict(strict=True)`` on every
rank's shard.

Public API::

    mcore_logits(load_dir, tokens, timeout=300) -> logits [b, s, padded_vocab], fp32

Every size is taken from the ``args`` Namespace stored in the checkpoint. What the harness
honours (see the shared checkpoint-format notes):

- ``latest_checkpointed_iteration.txt`` -> ``iter_{it:07d}`` or ``release``; rank folders
  ``mp_rank_{tp:02d}`` (PP == 1) or ``mp_rank_{tp:02d}_{pp:03d}`` (PP > 1); ``model`` or
  ``model0``, ``model1``, ... (VPP chunks).
- Layer placement: uniform PP, ``num_layer_list`` (uneven PP) and VPP are expressed to
  megatron-core as a ``pipeline_model_parallel_layout``, so each stage / chunk is built with
  exactly the number of decoder slots it holds and megatron-core computes the global layer
  numbers itself.
- ``noop_layers``: those global slots are built as normal layers and then replaced by a
  parameter-free identity module (as MindSpeed-LLM's NoopTransformerLayer) BEFORE
  ``load_state_dict(strict=True)``; so the checkpoint must hold no key for them.
- ``transformer_impl == 'transformer_engine'``: megatron-core is installed without Transformer
  Engine, so the model is always built with the local spec. The ONLY renames applied are the two
  fused-norm spellings of the te spec (``self_attention.linear_qkv.layer_norm_weight`` ->
  ``input_layernorm.weight`` and ``mlp.linear_fc1.layer_norm_weight`` ->
  ``pre_mlp_layernorm.weight``); ``*._extra_state`` entries (te fp8 blobs, no weights) are
  dropped for such checkpoints only.
- Weights are cast to fp32 (the model is built with fp32 params) so the result can be compared
  with an fp32 Hugging Face model.

Run-time patches of megatron-core needed on a CPU-only machine (applied in the child processes
only, see ``_patch_megatron_for_cpu``):

- ``torch.cuda.current_device`` returns ``"cpu"`` (used as an allocation device by the rotary
  embedding and by the tensor-parallel gather / all-gather buffers);
- megatron's inference RNG tracker (no CUDA RNG state);
- ``LanguageModule._is_in_embd_group`` returns False: with tied embeddings and PP > 1 megatron
  would copy the first stage's embedding into the last stage's ``output_layer`` with an
  all-reduce on ``weight.data.cuda()``; the checkpoint already stores that copy, and it is
  loaded with the rest of the state dict.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as mp

CHECKPOINT_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
LOGITS_FILE = "logits.pt"

# te spelling -> local spelling (the only renames this harness applies).
TE_NORM_RENAMES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
)


# ----------------------------------------------------------------------------- checkpoint reading


def iteration_dir(load_dir: str) -> str:
    """Folder of the iteration named by the tracker file."""
    with open(os.path.join(load_dir, TRACKER_FILE)) as f:
        marker = f.read().strip()
    if marker == "release":
        return os.path.join(load_dir, "release")
    return os.path.join(load_dir, f"iter_{int(marker):07d}")


def rank_file(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(iter_dir, name, CHECKPOINT_FILE)


def load_rank_checkpoint(path: str, mmap: bool = False) -> Dict[str, Any]:
    """torch.load with only the Namespace class allowed besides tensors / plain data."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_args(load_dir: str) -> argparse.Namespace:
    """The args Namespace of the first rank file (PP == 1 or PP > 1 spelling)."""
    it_dir = iteration_dir(load_dir)
    for folder in ("mp_rank_00", "mp_rank_00_000"):
        path = os.path.join(it_dir, folder, CHECKPOINT_FILE)
        if os.path.exists(path):
            return load_rank_checkpoint(path, mmap=True)["args"]
    raise FileNotFoundError(f"no mp_rank_00 / mp_rank_00_000 checkpoint under {it_dir}")


def parse_int_list(text: Optional[str]) -> List[int]:
    if text is None or text == "":
        return []
    if isinstance(text, (list, tuple, set)):
        return sorted(int(x) for x in text) if isinstance(text, set) else [int(x) for x in text]
    return [int(x) for x in str(text).split(",") if x.strip() != ""]


def layer_slots(args: argparse.Namespace) -> List[List[List[int]]]:
    """slots[pp_rank][chunk] = global Megatron layer indices (noop slots included), local order."""
    num_layers = args.num_layers
    pp = args.pipeline_model_parallel_size
    per_virtual = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    layer_list = parse_int_list(getattr(args, "num_layer_list", None))
    if per_virtual:
        if layer_list:
            raise ValueError("num_layer_list cannot be combined with VPP")
        if num_layers % (pp * per_virtual):
            raise ValueError(f"num_layers {num_layers} not divisible by PP*Lv = {pp * per_virtual}")
        chunks = num_layers // (pp * per_virtual)
        return [
            [list(range((v * pp + p) * per_virtual, (v * pp + p + 1) * per_virtual)) for v in range(chunks)]
            for p in range(pp)
        ]
    if layer_list:
        if len(layer_list) != pp or sum(layer_list) != num_layers:
            raise ValueError(f"num_layer_list {layer_list} does not fit PP={pp}, num_layers={num_layers}")
        starts = [sum(layer_list[:p]) for p in range(pp)]
        return [[list(range(starts[p], starts[p] + layer_list[p]))] for p in range(pp)]
    if num_layers % pp:
        raise ValueError(f"num_layers {num_layers} not divisible by PP={pp}")
    per_stage = num_layers // pp
    return [[list(range(p * per_stage, (p + 1) * per_stage))] for p in range(pp)]


def to_local_names(state: Dict[str, torch.Tensor], transformer_impl: str) -> Dict[str, torch.Tensor]:
    """fp32 copy of a rank's state dict, te norm names renamed to local names (te only)."""
    out = {}
    for name, tensor in state.items():
        if transformer_impl == "transformer_engine":
            if name.endswith("._extra_state"):
                continue
            for te_name, local_name in TE_NORM_RENAMES:
                if name.endswith(te_name):
                    name = name[: -len(te_name)] + local_name
                    break
        if name in out:
            raise KeyError(f"duplicate key after te -> local rename: {name}")
        out[name] = tensor.float() if tensor.is_floating_point() else tensor
    return out


# ----------------------------------------------------------------------------- process spawning


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _patch_megatron_for_cpu() -> None:
    """The run-time patches megatron-core 0.16.1 needs on a CPU-only torch (child process only)."""
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    LanguageModule._is_in_embd_group = lambda self: False


def _child_entry(rank: int, fn: Callable, world: int, port: int, timeout: float, out_dir: str, payload: Any):
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        _patch_megatron_for_cpu()
        fn(rank, world, out_dir, payload)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, world: int, payload: Any, timeout: float = 300) -> str:
    """Run ``fn(rank, world, out_dir, payload)`` in ``world`` spawned gloo processes.

    ``fn`` must be a module-level function. Returns ``out_dir`` (a fresh temporary folder that the
    children may write results into; the caller owns it). A failing child raises here with the
    child's traceback (the other ranks are terminated); past ``timeout`` seconds all children are
    killed and TimeoutError is raised.
    """
    out_dir = tempfile.mkdtemp(prefix="mcore_harness_")
    try:
        ctx = mp.start_processes(
            _child_entry,
            args=(fn, world, _free_port(), timeout, out_dir, payload),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            # join() raises (with the child's traceback) as soon as one rank fails, and
            # terminates the others.
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"megatron-core ranks did not finish within {timeout} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()
            for error_file in ctx.error_files:  # torch leaves a failed child's traceback here
                if os.path.exists(error_file):
                    os.remove(error_file)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- the rank worker


class NoopTransformerLayer(torch.nn.Module):
    """Parameter-free identity layer (MindSpeed-LLM's noop layer): same call contract as
    megatron-core 0.16.1 TransformerLayer.forward, which returns ``(hidden_states, context)``."""

    def __init__(self, layer_number: int):
        super().__init__()
        self.layer_number = layer_number

    def forward(self, hidden_states, attention_mask=None, context=None, **kwargs):
        return hidden_states.clone(), context


def transformer_config_from_args(args: argparse.Namespace, slots: List[List[List[int]]]):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    pp = args.pipeline_model_parallel_size
    chunks = len(slots[0])
    # Virtual stage order: chunk v of stage p is virtual stage v*PP + p.
    layout = []
    for v in range(chunks):
        for p in range(pp):
            stage = ["decoder"] * len(slots[p][v])
            if v == 0 and p == 0:
                stage = ["embedding"] + stage
            if v == chunks - 1 and p == pp - 1:
                stage = stage + ["loss"]
            layout.append(stage)
    if getattr(args, "normalization", "RMSNorm") != "RMSNorm":
        raise NotImplementedError(f"normalization {args.normalization!r}")
    if not getattr(args, "swiglu", True):
        raise NotImplementedError("only swiglu MLPs")
    if getattr(args, "use_rope_scaling", False) or getattr(args, "rope_scaling_type", None):
        raise NotImplementedError("rope scaling is not mapped by this harness")
    gqa = getattr(args, "group_query_attention", False)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if gqa else None,
        kv_channels=getattr(args, "kv_channels", None),
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=bool(getattr(args, "add_bias_linear", False)),
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
        pipeline_model_parallel_layout=layout,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def _logits_worker(rank: int, world: int, out_dir: str, payload: Dict[str, Any]) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    args: argparse.Namespace = payload["args"]
    tokens: torch.Tensor = payload["tokens"]
    slots = layer_slots(args)
    noop = set(parse_int_list(getattr(args, "noop_layers", None)))
    tp_size, pp_size = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    chunks = len(slots[0])
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    config = transformer_config_from_args(args, slots)

    checkpoint = load_rank_checkpoint(rank_file(payload["iter_dir"], tp_rank, pp_rank, pp_size))
    impl = getattr(args, "transformer_impl", "local")
    tied = not args.untie_embeddings_and_output_weights

    models = []
    for v in range(chunks):
        vp_stage = v if chunks > 1 else None
        if chunks > 1:
            parallel_state.set_virtual_pipeline_model_parallel_rank(v)
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
        )
        model = GPTModel(
            config,
            spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=(pp_rank == 0 and v == 0),
            post_process=(pp_rank == pp_size - 1 and v == chunks - 1),
            share_embeddings_and_output_weights=tied,
            position_embedding_type=getattr(args, "position_embedding_type", "rope"),
            rotary_percent=float(getattr(args, "rotary_percent", 1.0) or 1.0),
            rotary_base=int(getattr(args, "rotary_base", 10000)),
            vp_stage=vp_stage,
        )
        layers = model.decoder.layers
        global_ids = slots[pp_rank][v]
        if len(layers) != len(global_ids):
            raise RuntimeError(f"stage {pp_rank} chunk {v}: built {len(layers)} layers, expected {len(global_ids)}")
        for local, global_id in enumerate(global_ids):
            if layers[local].layer_number != global_id + 1:
                raise RuntimeError(f"layer numbering: local {local} has layer_number {layers[local].layer_number}, expected {global_id + 1}")
            if global_id in noop:
                layers[local] = NoopTransformerLayer(layers[local].layer_number)
        state = to_local_names(checkpoint["model" if chunks == 1 else f"model{v}"], impl)
        model.load_state_dict(state, strict=True)
        model.eval()
        models.append(model)
    del checkpoint

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
    prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
    last_virtual = chunks * pp_size - 1
    with torch.no_grad():
        for virtual_stage in range(chunks * pp_size):
            v, p = divmod(virtual_stage, pp_size)
            if p != pp_rank:
                continue
            if chunks > 1:
                parallel_state.set_virtual_pipeline_model_parallel_rank(v)
            model = models[v]
            if virtual_stage > 0:
                hidden = torch.empty(s, b, args.hidden_size, dtype=torch.float32)
                dist.recv(hidden, src=prev_rank)
                model.set_input_tensor(hidden)
            out = model(tokens, position_ids, mask, runtime_gather_output=True)
            if virtual_stage < last_virtual:
                dist.send(out.contiguous(), dst=next_rank)
            elif tp_rank == 0:
                torch.save(out.float().contiguous(), os.path.join(out_dir, LOGITS_FILE))


# ----------------------------------------------------------------------------- public API


def mcore_logits(load_dir, tokens: torch.LongTensor, timeout: float = 300) -> torch.Tensor:
    """tokens [b, s] -> logits [b, s, padded_vocab] (fp32, gathered over TP), from the checkpoint at load_dir."""
    load_dir = os.fspath(load_dir)
    args = read_args(load_dir)
    if getattr(args, "expert_model_parallel_size", 1) not in (None, 1):
        raise NotImplementedError("expert parallel checkpoints are not supported by this harness")
    layer_slots(args)  # validate the layout before spawning
    it_dir = iteration_dir(load_dir)
    tp_size, pp_size = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for tp in range(tp_size):
        for pp in range(pp_size):
            path = rank_file(it_dir, tp, pp, pp_size)
            if not os.path.exists(path):
                raise FileNotFoundError(path)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [b, s], got {tuple(tokens.shape)}")
    payload = {"args": args, "tokens": tokens.clone(), "iter_dir": it_dir}
    out_dir = spawn_ranks(_logits_worker, tp_size * pp_size, payload, timeout=timeout)
    try:
        return torch.load(os.path.join(out_dir, LOGITS_FILE), weights_only=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
