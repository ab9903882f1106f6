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
  ``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]`` (the ``_PPP`` part only when PP > 1, the ``_EEE``
  part only when EP > 1); ``model`` or ``model0``, ``model1``, ... (VPP chunks). One process per
  rank: world = TP * PP * EP (so the data-parallel size is EP; every replica runs the same tokens).
- Layer placement: uniform PP, ``num_layer_list`` (uneven PP) and VPP are expressed to
  megatron-core as a ``pipeline_model_parallel_layout``, so each stage / chunk is built with
  exactly the number of decoder slots it holds and megatron-core computes the global layer
  numbers itself.
- ``noop_layers``: those global slots are built as normal layers and then replaced by a
  parameter-free identity module (as MindSpeed-LLM's NoopTransformerLayer) BEFORE
  ``load_state_dict(strict=True)``; so the checkpoint must hold no key for them.
- ``transformer_impl == 'transformer_engine'``: megatron-core is installed without Transformer
  Engine, so the model is always built with the local spec. The ONLY te renames applied are the
  fused-norm spellings of the te spec (``self_attention.linear_qkv.layer_norm_weight`` ->
  ``input_layernorm.weight``, ``mlp.linear_fc1.layer_norm_weight`` -> ``pre_mlp_layernorm.weight``
  on dense layers, and for MLA the two below); ``*._extra_state`` entries (te fp8 blobs, no
  weights) are dropped for such checkpoints only.
- Weights are cast to fp32 (the model is built with fp32 params) so the result can be compared
  with an fp32 Hugging Face model.
- Mixture of experts (``num_experts`` set), built as megatron-core's SequentialMLP with the
  allgather dispatcher and an fp32 router, whatever the checkpoint was trained with. Args read
  (see ``transformer_config_from_args``): ``num_experts, moe_router_topk, moe_ffn_hidden_size,
  moe_shared_expert_intermediate_size, moe_shared_expert_gate, moe_layer_freq`` (list of 0/1 per
  Megatron slot; or an int, combined with ``first_k_dense_replace``), ``moe_router_score_function,
  moe_router_pre_softmax, moe_router_enable_expert_bias, moe_router_topk_scaling_factor,
  moe_router_num_groups, moe_router_group_topk, expert_model_parallel_size,
  expert_tensor_parallel_size, moe_grouped_gemm``; ``norm_topk_prob`` is only cross-checked
  against ``moe_router_pre_softmax`` / the score function (a contradiction raises ValueError).
  Expert tensors may be stored per expert (``mlp.experts.local_experts.{j}.linear_fc{1,2}.weight``),
  in the legacy grouped-GEMM form (``mlp.experts.weight1`` / ``weight2``, needs
  ``moe_grouped_gemm``) or the TE grouped form (``mlp.experts.linear_fc{1,2}.weight{j}``, needs
  ``moe_grouped_gemm`` and the te implementation); the grouped forms are converted to the
  per-expert names before ``load_state_dict(strict=True)``.
- Multi-latent attention (``multi_latent_attention``; TP == 1 only: without Transformer Engine
  megatron-core splits the MLA down-projections over TP, which real checkpoints do not):
  ``MLATransformerConfig`` from ``q_lora_rank, kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim,
  v_head_dim``, plain rope (``rope_type="rope"``, ``rotary_base``, no yarn); megatron's MLA
  de-interleaves the rope dims itself (``rotary_interleaved=False``), which matches HF DeepSeek's
  interleaved rope (V3 ``rope_interleave=True``, V2's complex rotary). The core attention is a
  parameter-free causal softmax attention (``CausalSoftmaxAttention``), because the local kernel
  cannot take a q/k head dim different from the v head dim. Accepted spellings: upstream
  megatron-core (``linear_q_down_proj`` / ``linear_q_proj``, ``linear_kv_down_proj``,
  ``q_layernorm``, ``kv_layernorm``, ``linear_q_up_proj``, ``linear_kv_up_proj``), its te form
  (``linear_q_up_proj.layer_norm_weight`` / ``linear_kv_up_proj.layer_norm_weight``, te only) and
  MindSpeed-LLM's fused ``linear_qkv`` = cat([q_down or q_proj, kv_down], 0), split back here.

Run-time patches of megatron-core needed on a CPU-only machine (applied in the child processes
only, see ``_patch_megatron_for_cpu``):

- ``torch.cuda.current_device`` returns ``"cpu"`` (used as an allocation device by the rotary
  embedding, the MoE router / dispatcher and by the tensor-parallel gather / all-gather buffers);
- ``moe_utils.te_general_gemm = None`` (undefined without Transformer Engine: every router would
  raise NameError) and ``multi_latent_attention.HAVE_TE = False`` (wrongly True without it);
- megatron's inference RNG tracker (no CUDA RNG state);
- ``LanguageModule._is_in_embd_group`` returns False: with tied embeddings and PP > 1 megatron
  would copy the first stage's embedding into the last stage's ``output_layer`` with an
  all-reduce on ``weight.data.cuda()``; the checkpoint already stores that copy, and it is
  loaded with the rest of the state dict.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import math
import os
import re
import shutil
import socket
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as mp

CHECKPOINT_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
LOGITS_FILE = "logits.pt"

# te spelling -> local spelling (applied to te checkpoints only).
TE_NORM_RENAMES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    # MLA (te spec fuses the q / kv latent norms into the up projections)
    ("self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.q_layernorm.weight"),
    ("self_attention.linear_kv_up_proj.layer_norm_weight", "self_attention.kv_layernorm.weight"),
)

# MindSpeed-LLM's GPT model with MTP layers (its gpt_model.py, transformer_block.py and
# multi_token_prediction.py) is Megatron-Core's module tree but for the final norms: the main one at
# the top level (the decoder has none), each MTP layer's in a list of the MTP block.
_MINDSPEED_MTP_NORMS = ((re.compile(r"^final_layernorm\."), "decoder.final_layernorm."),
                        (re.compile(r"^mtp\.final_layernorms\.(\d+)\."), r"mtp.layers.\1.final_layernorm."))

_LEGACY_GROUPED = re.compile(r"^(.*\.mlp\.experts\.)weight([12])$")
_TE_GROUPED = re.compile(r"^(.*\.mlp\.experts\.)linear_fc([12])\.weight(\d+)$")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.\d+\.")


# ----------------------------------------------------------------------------- checkpoint reading


def iteration_dir(load_dir: str) -> str:
    """Folder of the iteration named by the tracker file."""
    with open(os.path.join(load_dir, TRACKER_FILE)) as f:
        marker = f.read().strip()
    if marker == "release":
        return os.path.join(load_dir, "release")
    return os.path.join(load_dir, f"iter_{int(marker):07d}")


def rank_file(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt`` (PP part only when PP > 1,
    EP part only when EP > 1)."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return os.path.join(iter_dir, name, CHECKPOINT_FILE)


def load_rank_checkpoint(path: str, mmap: bool = False) -> Dict[str, Any]:
    """torch.load as Megatron-LM's training loader does it: the args of a training run hold
    Megatron enums, a signal.Signals and numpy RNG state (weights_only=False; test inputs only)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def read_args(load_dir: str) -> argparse.Namespace:
    """The args Namespace of the first rank file (any of the PP / EP spellings)."""
    it_dir = iteration_dir(load_dir)
    for folder in ("mp_rank_00", "mp_rank_00_000", "mp_rank_00_000_000"):
        path = os.path.join(it_dir, folder, CHECKPOINT_FILE)
        if os.path.exists(path):
            return load_rank_checkpoint(path, mmap=True)["args"]
    raise FileNotFoundError(f"no mp_rank_00 / mp_rank_00_000 / mp_rank_00_000_000 checkpoint under {it_dir}")


def _size(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, name, None)
    return 1 if value in (None, 0) else int(value)


def expert_sizes(args: argparse.Namespace):
    """(EP, ETP) of a checkpoint; ETP defaults to TP (megatron's default)."""
    ep = _size(args, "expert_model_parallel_size")
    etp = getattr(args, "expert_tensor_parallel_size", None)
    etp = args.tensor_model_parallel_size if etp in (None, 0) else int(etp)
    return ep, etp


def num_experts(args: argparse.Namespace) -> Optional[int]:
    value = getattr(args, "num_experts", None)
    return int(value) if value else None


def moe_layer_pattern(args: argparse.Namespace) -> Optional[List[int]]:
    """One 0/1 entry per Megatron layer slot (noop slots included); None for dense models.

    ``moe_layer_freq`` may be a list / tuple (or its string form, e.g. ``"[0,1,1]"`` or
    ``"0,1,1"``), or an int N (megatron: slot i is MoE iff i % N == 0), in which case the first
    ``first_k_dense_replace`` slots are dense as well (MindSpeed-LLM's DeepSeek setting). Missing:
    every slot is MoE, minus ``first_k_dense_replace``.
    """
    if num_experts(args) is None:
        return None
    n = args.num_layers
    freq = getattr(args, "moe_layer_freq", None)
    first_k = int(getattr(args, "first_k_dense_replace", None) or 0)
    if isinstance(freq, str):
        text = freq.strip()
        if "," in text and not text.startswith(("[", "(")):
            text = f"[{text}]"
        try:
            freq = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"cannot parse moe_layer_freq {freq!r} (give a list of 0/1 or an int)") from None
    if freq is None:
        freq = 1
    if isinstance(freq, int):
        pattern = [1 if (i % freq == 0 and i >= first_k) else 0 for i in range(n)]
    else:
        pattern = [int(x) for x in freq]
        if len(pattern) != n or any(x not in (0, 1) for x in pattern):
            raise ValueError(f"moe_layer_freq {pattern} must hold num_layers={n} entries of 0/1")
    return pattern


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


def _put(out: Dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    if name in out:
        raise KeyError(f"duplicate key after renaming to the local spelling: {name}")
    out[name] = tensor


def _split_mindspeed_mla_qkv(name: str, tensor: torch.Tensor, args: argparse.Namespace, out) -> None:
    """MindSpeed-LLM's MLA ``linear_qkv`` = cat([q_down (q_proj without q LoRA), kv_down], 0)."""
    prefix = name[: -len("linear_qkv.weight")]
    kv_rows = int(args.kv_lora_rank) + int(args.qk_pos_emb_head_dim)
    if getattr(args, "q_lora_rank", None):
        q_name, q_rows = "linear_q_down_proj.weight", int(args.q_lora_rank)
    else:
        q_name = "linear_q_proj.weight"
        q_rows = int(args.num_attention_heads) * (int(args.qk_head_dim) + int(args.qk_pos_emb_head_dim))
    if tensor.shape[0] != q_rows + kv_rows:
        raise ValueError(f"{name}: {tuple(tensor.shape)} has {tensor.shape[0]} rows, expected "
                         f"{q_rows} (q) + {kv_rows} (kv down) = {q_rows + kv_rows}")
    _put(out, prefix + q_name, tensor[:q_rows].clone())
    _put(out, prefix + "linear_kv_down_proj.weight", tensor[q_rows:].clone())


def to_local_names(state: Dict[str, torch.Tensor], transformer_impl: str,
                   args: Optional[argparse.Namespace] = None) -> Dict[str, torch.Tensor]:
    """fp32 copy of a rank's state dict in the names of the model this harness builds.

    - te checkpoints: fused-norm names renamed (``TE_NORM_RENAMES``), ``._extra_state`` dropped;
    - MoE (``args`` given): grouped expert tensors (legacy ``weight1/weight2`` or te
      ``linear_fc{1,2}.weight{j}``) become ``local_experts.{j}.linear_fc{1,2}.weight``; the
      spelling must agree with ``moe_grouped_gemm`` / ``transformer_impl``;
    - MLA (``args.multi_latent_attention``): MindSpeed's fused ``linear_qkv`` is split.
    """
    te = transformer_impl == "transformer_engine"
    mla = bool(args is not None and getattr(args, "multi_latent_attention", False))
    grouped = bool(args is not None and getattr(args, "moe_grouped_gemm", False))
    if args is not None and num_experts(args):
        ep, etp = expert_sizes(args)
        local_experts = num_experts(args) // ep
    else:
        local_experts = None
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for pattern, replacement in _MINDSPEED_MTP_NORMS:
            name = pattern.sub(replacement, name)
        if te:
            if name.endswith("._extra_state"):
                continue
            for te_name, local_name in TE_NORM_RENAMES:
                if name.endswith(te_name):
                    name = name[: -len(te_name)] + local_name
                    break
        if not isinstance(tensor, torch.Tensor):  # a local layer's `_extra_state` (None), as training saves it
            out[name] = tensor
            continue
        if tensor.is_floating_point():
            tensor = tensor.float()
        m_legacy, m_te = _LEGACY_GROUPED.match(name), _TE_GROUPED.match(name)
        if (m_legacy or m_te) and local_experts is not None:
            if not grouped:
                raise ValueError(f"{name}: grouped-GEMM expert tensor, but args.moe_grouped_gemm is not set")
            if m_te:
                if not te:
                    raise ValueError(f"{name}: Transformer Engine grouped expert name in a "
                                     f"transformer_impl={transformer_impl!r} checkpoint")
                prefix, which, j = m_te.group(1), m_te.group(2), int(m_te.group(3))
                if j >= local_experts:
                    raise ValueError(f"{name}: expert {j} >= {local_experts} local experts")
                _put(out, f"{prefix}local_experts.{j}.linear_fc{which}.weight", tensor)
            else:
                prefix, which = m_legacy.group(1), m_legacy.group(2)
                hidden = int(args.hidden_size)
                if which == "1":  # [H, E_local * 2F/TP]: row-major stack of fc1_j^T blocks
                    if tensor.dim() != 2 or tensor.shape[0] != hidden or tensor.shape[1] % local_experts:
                        raise ValueError(f"{name}: shape {tuple(tensor.shape)} is not [H={hidden}, E_local={local_experts} * 2F/TP]")
                    blocks = tensor.reshape(local_experts, hidden, -1)
                    for j in range(local_experts):
                        _put(out, f"{prefix}local_experts.{j}.linear_fc1.weight", blocks[j].t().contiguous())
                else:  # [E_local * F/TP, H]: stack of fc2_j^T blocks
                    if tensor.dim() != 2 or tensor.shape[1] != hidden or tensor.shape[0] % local_experts:
                        raise ValueError(f"{name}: shape {tuple(tensor.shape)} is not [E_local={local_experts} * F/TP, H={hidden}]")
                    blocks = tensor.reshape(local_experts, -1, hidden)
                    for j in range(local_experts):
                        _put(out, f"{prefix}local_experts.{j}.linear_fc2.weight", blocks[j].t().contiguous())
            continue
        if grouped and _LOCAL_EXPERT.search(name):
            raise ValueError(f"{name}: per-expert (SequentialMLP) name, but args.moe_grouped_gemm is set "
                             "(megatron would build grouped experts)")
        if mla and name.endswith("self_attention.linear_qkv.weight"):
            _split_mindspeed_mla_qkv(name, tensor, args, out)
            continue
        _put(out, name, tensor)
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
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None
    multi_latent_attention.HAVE_TE = False
    from megatron.core.fusions import fused_softmax

    def sliding_window_causal_mask(sq, skv, window_size):  # megatron's, on the CPU (it asks for "cuda")
        ones = torch.ones(sq, skv, dtype=torch.bool)
        return ~torch.tril(torch.triu(ones, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])

    fused_softmax.get_sliding_window_causal_mask = sliding_window_causal_mask

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
    except BaseException:
        # every failing rank leaves its traceback: the first to be joined may only be the one
        # whose peer died (a gloo "connection closed"), not the cause
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as error:
            error.write(traceback.format_exc())
        raise
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, world: int, payload: Any, timeout: float = 300) -> str:
    """Run ``fn(rank, world, out_dir, payload)`` in ``world`` new gloo processes.

    ``fn`` must be a module-level function. Returns ``out_dir`` (a fresh temporary folder that the
    children may write results into; the caller owns it). A failing child raises here with the
    child's traceback (the other ranks are terminated); past ``timeout`` seconds all children are
    killed and TimeoutError is raised.
    """
    out_dir = tempfile.mkdtemp(prefix="mcore_harness_")
    # each rank is a fresh process forked from a server, not a fork of this process with its state;
    # under pytest the server has imported megatron-core once (conftest.py, megatron_preload.py)
    try:
        ctx = mp.start_processes(
            _child_entry,
            args=(fn, world, _free_port(), timeout, out_dir, payload),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        try:
            # join() raises (with the child's traceback) as soon as one rank fails, and
            # terminates the others.
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"megatron-core ranks did not finish within {timeout} s")
        except mp.ProcessRaisedException as exc:
            causes = [path.read_text() for path in sorted(Path(out_dir).glob("rank*.error"))]
            details = "".join(f"\n-- a failed rank's traceback --\n{cause}" for cause in causes)
            raise RuntimeError(f"{exc}{details}") from None
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


class CausalSoftmaxAttention(torch.nn.Module):
    """Parameter-free causal softmax attention: the core-attention stand-in for MLA.

    Same construction / call contract as megatron-core's ``DotProductAttention`` (plus the
    ``k_channels`` / ``v_channels`` MLA passes); q, k ``[s, b, n, dk]``, v ``[s, b, n, dv]`` ->
    ``[s, b, n * dv]``. ``softmax_scale`` is MLA's (1/sqrt(qk_head_dim + qk_pos_emb_head_dim)
    without yarn). The mask is always causal (no padding in these checks)."""

    def __init__(self, config=None, layer_number=None, attn_mask_type=None, attention_type=None,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences")
        sq, b, n, dk = query.shape
        sk = key.shape[0]
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(dk)
        q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))  # [b, n, s, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        causal = torch.triu(torch.ones(sq, sk, dtype=torch.bool), diagonal=1 + sk - sq)
        scores = scores.masked_fill(causal, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [b, n, sq, dv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1).to(query.dtype)


def _opt_int(value) -> Optional[int]:
    return None if value in (None, 0, "") else int(value)


def moe_config_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """TransformerConfig MoE keywords from the checkpoint args ({} for dense models).

    Routing semantics are megatron-core's (``topk_routing_with_score_function``):
    softmax + ``moe_router_pre_softmax`` False: top-k of the logits, softmax over those k
    (= softmax, top-k, renormalise: Mixtral, Qwen3-MoE norm_topk_prob=True); softmax + pre_softmax
    True: softmax over all experts, top-k, no renormalisation (Qwen2-MoE norm_topk_prob=False,
    DeepSeek-V2 greedy); sigmoid: sigmoid scores (+ ``expert_bias`` for the choice only), optional
    group-limited choice (groups ranked by the sum of their top ``topk / group_topk`` scores),
    always renormalised over the top-k when topk > 1 (DeepSeek-V3 norm_topk_prob=True); then
    times ``moe_router_topk_scaling_factor``.
    """
    experts = num_experts(args)
    if experts is None:
        return {}
    ep, etp = expert_sizes(args)
    if experts % ep:
        raise ValueError(f"num_experts {experts} not divisible by expert_model_parallel_size {ep}")
    topk = int(getattr(args, "moe_router_topk", None) or 2)
    score = getattr(args, "moe_router_score_function", None) or "softmax"
    pre_softmax = bool(getattr(args, "moe_router_pre_softmax", False))
    norm = getattr(args, "norm_topk_prob", None)
    if norm is not None and topk > 1:
        # norm_topk_prob is informational (HF's flag); it must not contradict the megatron settings.
        if score == "softmax" and pre_softmax == bool(norm):
            raise ValueError(
                f"norm_topk_prob={norm} contradicts moe_router_pre_softmax={pre_softmax}: megatron's softmax "
                "router renormalises over the top-k exactly when moe_router_pre_softmax is False")
        if score == "sigmoid" and not norm:
            raise NotImplementedError(
                "norm_topk_prob=False with a sigmoid router: megatron-core always renormalises sigmoid top-k scores")
    scaling = getattr(args, "moe_router_topk_scaling_factor", None)
    shared = _opt_int(getattr(args, "moe_shared_expert_intermediate_size", None))
    return dict(
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=_opt_int(getattr(args, "moe_ffn_hidden_size", None)) or args.ffn_hidden_size,
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=bool(getattr(args, "moe_shared_expert_gate", False)) and shared is not None,
        # an all-MoE stack as a training run configures it (an int): megatron then stacks its layers
        # in dist checkpoints; a mixed stack needs the list (and gets per-layer keys)
        moe_layer_freq=1 if all(moe_layer_pattern(args)) else moe_layer_pattern(args),
        moe_router_score_function=score,
        moe_router_pre_softmax=pre_softmax,
        moe_router_enable_expert_bias=bool(getattr(args, "moe_router_enable_expert_bias", False)),
        moe_router_topk_scaling_factor=None if scaling in (None, "") else float(scaling),
        moe_router_num_groups=_opt_int(getattr(args, "moe_router_num_groups", None)),
        moe_router_group_topk=_opt_int(getattr(args, "moe_router_group_topk", None)),
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def mla_config_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """MLATransformerConfig keywords ({} without MLA)."""
    if not getattr(args, "multi_latent_attention", False):
        return {}
    return dict(
        multi_latent_attention=True,
        q_lora_rank=_opt_int(getattr(args, "q_lora_rank", None)),
        kv_lora_rank=int(args.kv_lora_rank),
        qk_head_dim=int(args.qk_head_dim),
        qk_pos_emb_head_dim=int(args.qk_pos_emb_head_dim),
        v_head_dim=int(args.v_head_dim),
        rope_type="rope",
        rotary_base=float(getattr(args, "rotary_base", 10000) or 10000),
        rotary_percent=float(getattr(args, "rotary_percent", 1.0) or 1.0),
        rotary_scaling_factor=1.0,
        mscale=1.0,
        mscale_all_dim=0.0,
        rotary_interleaved=False,
    )


def rope_scaling_model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """GPTModel keywords for rope scaling: llama3 as megatron-core fixes it (low / high frequency
    factors 1 / 4, original context 8192: `rope_scaling`, `rope_scaling_factor`), linear as
    `seq_len_interpolation_factor`; anything else is not expressible."""
    kind = getattr(args, "rope_scaling_type", None) or ("llama3" if getattr(args, "use_rope_scaling", False) else None)
    if kind in (None, "default"):
        return {}
    factor = float(getattr(args, "rope_scaling_factor", None) or getattr(args, "rotary_scaling_factor", None) or 8.0)
    if kind == "linear":
        return {"seq_len_interpolation_factor": factor}
    fixed = (float(getattr(args, "low_freq_factor", None) or 1.0), float(getattr(args, "high_freq_factor", None) or 4.0),
             int(getattr(args, "rope_scaling_original_max_position_embeddings", None) or 8192))
    if kind == "llama3" and fixed == (1.0, 4.0, 8192):
        return {"rope_scaling": True, "rope_scaling_factor": factor}
    raise NotImplementedError(f"rope scaling {kind} {fixed}: a stock GPTModel does not express it")


def transformer_config_from_args(args: argparse.Namespace, slots: List[List[List[int]]]):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

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
                stage = stage + ["mtp"] * int(getattr(args, "mtp_num_layers", None) or 0) + ["loss"]
            layout.append(stage)
    normalization = getattr(args, "normalization", "RMSNorm")
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise NotImplementedError(f"normalization {normalization!r}")
    act = getattr(args, "hidden_act", None) or ("silu" if getattr(args, "swiglu", True) else "gelu")
    activations = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}
    if act not in activations:
        raise NotImplementedError(f"hidden_act {act!r}")
    gated = bool(getattr(args, "gated_linear_unit", getattr(args, "swiglu", True)))
    rope_scaling_model_kwargs(args)  # refuses what GPTModel cannot express before any process starts
    for unsupported in ("post_norm", "layernorm_zero_centered_gamma", "input_embeds_norm", "attn_logit_softcapping",
                        "output_logit_softcapping"):
        if getattr(args, unsupported, None):
            raise NotImplementedError(f"{unsupported}: a stock GPTModel does not express it")
    window = getattr(args, "sliding_window", None)
    layer_types = getattr(args, "attention_layer_types", None)
    if window and window < args.max_position_embeddings and not layer_types:
        raise NotImplementedError("sliding_window without attention_layer_types: not mapped by this harness")
    alpha = getattr(args, "swiglu_alpha", None)
    if alpha:  # gpt-oss: gate * sigmoid(alpha * gate), megatron's quick_gelu at alpha 1.702
        activations[act] = partial(_sigmoid_gated, alpha=float(alpha))
    gqa = getattr(args, "group_query_attention", False)
    moe = moe_config_kwargs(args)
    mla = mla_config_kwargs(args)
    cls = MLATransformerConfig if mla else TransformerConfig
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if gqa else None,
        kv_channels=getattr(args, "kv_channels", None),
        normalization=normalization,
        layernorm_epsilon=getattr(args, "norm_epsilon", None) or args.layernorm_epsilon,  # Megatron-LM: the latter
        gated_linear_unit=gated,
        activation_func=activations[act],
        add_bias_linear=bool(getattr(args, "add_bias_linear", False)),
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        rotary_interleaved=bool(getattr(args, "rotary_interleaved", False)),  # MLA: overridden below
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
    if window and layer_types:  # HF: a query sees its last W keys -> megatron's (W - 1, 0)
        kwargs.update(window_size=(int(window) - 1, 0),
                      window_attn_skip_freq=[int(t == "sliding_attention") for t in layer_types])
    kwargs.update(softmax_type=getattr(args, "softmax_type", None) or "vanilla",
                  glu_linear_offset=float(getattr(args, "glu_linear_offset", None) or 0.0),
                  activation_func_clamp_value=getattr(args, "activation_func_clamp_value", None))
    kwargs.update(moe)
    kwargs.update(mla)
    if getattr(args, "mtp_num_layers", None):  # the last chunk builds the MTP block: its keys must load too
        kwargs["mtp_num_layers"] = int(args.mtp_num_layers)
    return cls(**kwargs)


def _sigmoid_gated(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return x * torch.sigmoid(alpha * x)


def _use_causal_attention_stand_in(block_spec) -> None:
    """MLA: swap the local core attention (q/k dim must equal v dim) for CausalSoftmaxAttention."""
    for layer_spec in block_spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = CausalSoftmaxAttention


def _main_head_only(model) -> None:
    """A loaded model with MTP layers: its forward wants labels for them; the logits compared are
    the main head's."""
    if getattr(model, "mtp_process", False):
        model.mtp_process, model.config.mtp_num_layers = False, None


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
    ep_size, etp_size = expert_sizes(args)
    chunks = len(slots[0])
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
        expert_model_parallel_size=ep_size,
        expert_tensor_parallel_size=etp_size,
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep_size > 1 else 0
    dp_rank = parallel_state.get_data_parallel_rank()
    config = transformer_config_from_args(args, slots)
    mla = bool(getattr(config, "multi_latent_attention", False))

    from_store = payload.get("dist", False)  # a torch_dist checkpoint
    checkpoint = None if from_store else load_rank_checkpoint(rank_file(payload["iter_dir"], tp_rank, pp_rank, pp_size,
                                                                   ep_rank, ep_size))
    impl = getattr(args, "transformer_impl", "local")
    tied = not args.untie_embeddings_and_output_weights

    models = []
    for v in range(chunks):
        vp_stage = v if chunks > 1 else None
        if chunks > 1:
            parallel_state.set_virtual_pipeline_model_parallel_rank(v)
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=config.normalization, vp_stage=vp_stage,
            pp_rank=pp_rank
        )
        if mla:
            _use_causal_attention_stand_in(spec)
        mtp_spec = None
        if getattr(config, "mtp_num_layers", None):  # built to load them; the logits are the main head's
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

            mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage,
                                              pp_rank=pp_rank)
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
            **rope_scaling_model_kwargs(args),
            vp_stage=vp_stage,
            mtp_block_spec=mtp_spec,
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
        if not from_store:
            state = to_local_names(checkpoint["model" if chunks == 1 else f"model{v}"], impl, args)
            model.load_state_dict(state, strict=True)
            _main_head_only(model)
        model.eval()
        models.append(model)
    del checkpoint
    if payload.get("save_dist"):  # megatron-core itself saves the loaded model as torch_dist
        from megatron.core import dist_checkpointing

        torch.cuda.synchronize = lambda *a, **k: None
        state = {f"model{v}": model.sharded_state_dict() for v, model in enumerate(models)}
        state.update(args=payload["args"], iteration=1, checkpoint_version=3.0)
        dist_checkpointing.save(state, payload["save_dist"])
    if from_store:  # megatron-core's own dist_checkpointing, strict: every key requested and every key used
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.validation import StrictHandling

        sharded = {f"model{v}": model.sharded_state_dict() for v, model in enumerate(models)}
        loaded = dist_checkpointing.load(sharded, payload["iter_dir"], strict=StrictHandling.RAISE_ALL)
        for v, model in enumerate(models):
            model.load_state_dict(loaded[f"model{v}"], strict=True)
            _main_head_only(model)

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
            elif tp_rank == 0 and dp_rank == 0:
                torch.save(out.float().contiguous(), os.path.join(out_dir, LOGITS_FILE))


# ----------------------------------------------------------------------------- public API


def mcore_save_dist(load_dir, save_dir, timeout: float = 300) -> None:
    """Load a legacy checkpoint into megatron-core's GPTModel (at its own layout) and save it with
    megatron-core's `dist_checkpointing.save`: a torch_dist checkpoint as megatron itself writes it."""
    save_dir = os.fspath(save_dir)
    iter_dir = os.path.join(save_dir, "iter_0000001")
    os.makedirs(iter_dir, exist_ok=True)
    mcore_logits(load_dir, torch.zeros(1, 4, dtype=torch.long), timeout=timeout, save_dist=iter_dir)
    with open(os.path.join(save_dir, TRACKER_FILE), "w") as f:
        f.write("1")


def read_dist_args(load_dir: str) -> argparse.Namespace:
    """The args in common.pt of a torch_dist checkpoint (as megatron's training loader reads them)."""
    return torch.load(os.path.join(iteration_dir(load_dir), "common.pt"), map_location="cpu",
                      weights_only=False)["args"]


def mcore_logits(load_dir, tokens: torch.LongTensor, timeout: float = 300, layout: Optional[Dict[str, Any]] = None,
                 save_dist: Optional[str] = None) -> torch.Tensor:
    """tokens [b, s] -> logits [b, s, padded_vocab] (fp32, gathered over TP), from the checkpoint at load_dir.

    A torch_dist checkpoint is layout-independent: `layout` ({tp, pp, vpp_layers, ep}) says at which
    layout megatron-core builds the model and loads it with `dist_checkpointing.load`."""
    load_dir = os.fspath(load_dir)
    dist = os.path.exists(os.path.join(iteration_dir(load_dir), "metadata.json"))
    args = read_dist_args(load_dir) if dist else read_args(load_dir)
    if dist:
        layout = layout or {}
        args = argparse.Namespace(**vars(args))
        args.tensor_model_parallel_size = layout.get("tp", 1)
        args.pipeline_model_parallel_size = layout.get("pp", 1)
        args.num_layers_per_virtual_pipeline_stage = layout.get("vpp_layers")
        args.expert_model_parallel_size = layout.get("ep", 1)
        args.expert_tensor_parallel_size = layout.get("etp")
        args.num_layer_list = None
    layer_slots(args)  # validate the layout before spawning
    it_dir = iteration_dir(load_dir)
    tp_size, pp_size = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep_size, etp_size = expert_sizes(args)
    if ep_size > 1 and num_experts(args) is None:
        raise ValueError(f"expert_model_parallel_size {ep_size} without num_experts")
    if num_experts(args) is not None and tp_size % etp_size:
        raise ValueError(f"expert_tensor_parallel_size {etp_size} does not divide TP {tp_size}")
    if getattr(args, "multi_latent_attention", False) and tp_size > 1:
        raise NotImplementedError(
            "MLA is checked at TP = 1 only: without Transformer Engine megatron-core splits the MLA "
            "down-projections across TP, unlike real checkpoints (check TP > 1 by round trip)")
    moe_layer_pattern(args)  # validate before spawning
    for tp in range(tp_size if not dist else 0):
        for pp in range(pp_size):
            for ep in range(ep_size):
                path = rank_file(it_dir, tp, pp, pp_size, ep, ep_size)
                if not os.path.exists(path):
                    raise FileNotFoundError(path)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [b, s], got {tuple(tokens.shape)}")
    payload = {"args": args, "tokens": tokens.clone(), "iter_dir": it_dir, "dist": dist, "save_dist": save_dist}
    out_dir = spawn_ranks(_logits_worker, tp_size * pp_size * ep_size, payload, timeout=timeout)
    try:
        return torch.load(os.path.join(out_dir, LOGITS_FILE), weights_only=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
