"""Real distributed-optimizer checkpoints, written by megatron-core 0.16.1 itself (test helper).

A tiny GPTModel (llama-like or Mixtral-like MoE) is built in spawned gloo processes (one per rank,
``mcore_harness.spawn_ranks``), wrapped in megatron-core's ``DistributedDataParallel`` and its
``DistributedOptimizer`` (``get_megatron_optimizer``), trained for a few real Adam steps, and saved
in the legacy layout exactly as Megatron-LM's ``save_checkpoint`` does it:

- ``iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt``: ``args``,
  ``checkpoint_version`` 3.0, ``iteration``, ``model`` (``model0``, ``model1``, ... with VPP),
  ``optimizer`` (``optimizer.state_dict()``), ``opt_param_scheduler``, ``rng_state``,
  ``num_floating_point_operations_so_far``; written by the ranks whose expert-data-parallel rank is
  0 (Megatron-LM's rule). The ``model`` tensors are saved as they are in a DDP-wrapped model: views
  into megatron's contiguous parameter buffer.
- ``distrib_optim.pt`` next to it, from the optimizer's own ``save_parameter_state(path)`` called on
  every rank (DP rank 0 of each optimizer writes).

Besides the checkpoint, every rank dumps (test-only, ``torch.save``) what is live in its optimizer:
per parameter the owned shard range and the fp32 main param / ``exp_avg`` / ``exp_avg_sq`` slices,
and the grad-buffer layout megatron built (``param_index_map``, bucket offsets and sizes). Then one
more training step runs on a fixed batch and its losses are recorded (the resume check).

``resume(...)`` builds the same model at another layout, loads a checkpoint through megatron's own
``load_state_dict`` / ``optimizer.load_state_dict`` / ``optimizer.load_parameter_state``, dumps the
same live state and takes that step too.

Run-time patches needed for DDP + DistributedOptimizer on a CPU-only torch (child processes only,
on top of ``mcore_harness._patch_megatron_for_cpu``), see ``patch_for_distributed_optimizer``:

- ``torch.Tensor.type()`` without arguments reports CPU tensors as ``torch.cuda.*Tensor``: the
  distributed / mixed-precision optimizers sort parameters by these exact strings and raise a
  TypeError for anything else;
- the tensor factories (``torch.tensor``, ``zeros``, ``ones``, ``empty``, ``full``) turn
  ``device='cuda'`` into CPU: the optimizer allocates ``found_inf``, ``_scale_one`` and the
  grad-norm buffers with a literal ``device='cuda'``;
- ``torch.Tensor.cuda()`` is the identity;
- ``DistributedOptimizer._set_main_param_and_optimizer_states`` skips the ``step`` entry of the
  inner optimizer's state: with native torch Adam (no Apex / TE FusedAdam) megatron-core 0.16.1's
  ``load_parameter_state`` raises ``KeyError: 'step'`` (the step comes from
  ``optimizer.load_state_dict``); and ``load_parameter_state`` runs under ``torch.no_grad()``: with
  fp32 params the main params are views of the model params and are written in place;
- after ``optimizer.load_state_dict`` each parameter's Adam ``step`` tensor is cloned: on the native
  torch Adam path megatron-core 0.16.1 shares ONE step tensor between all parameters, which torch
  Adam then increments once per parameter (wrong bias correction for all but the first);
- MoE: ``moe_utils.te_general_gemm = None`` (undefined without Transformer Engine) and
  ``multi_latent_attention.HAVE_TE = False``.

Not a patch but needed: ``perform_initialization=True`` (then our own deterministic values). With
``use_cpu_initialization`` and ``perform_initialization=False`` megatron never sets the
``tensor_model_parallel`` attributes, so at TP > 1 the grad norm (clipping) counts every TP-split
parameter on TP rank 0 only.

There is no megatron pipeline schedule on CPU (it allocates on CUDA): ``_train_step`` runs one
micro-batch per DP rank through the virtual stages with ``dist.send`` / ``dist.recv`` (forward) and
``torch.autograd.backward`` (backward), then megatron's ``finalize_model_grads`` (the DP
reduce-scatter of every DDP chunk, the tied-embedding all-reduce) and ``optimizer.step()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from mcore_harness import spawn_ranks

ITERATION = 2
CHECKPOINT_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
SEQ = 8
GRAD_NORMS: List[float] = []  # per step, this process
LR = 1e-2


@dataclasses.dataclass(frozen=True)
class Spec:
    """A model and a parallel layout; world = tp * pp * dp (EP is carved out of DP)."""

    tp: int = 1
    pp: int = 1
    dp: int = 2
    ep: int = 1
    vpp_layers: Optional[int] = None          # layers per virtual pipeline stage (VPP)
    moe: bool = False
    expert_bias: bool = False                 # MoE: sigmoid router with an fp32 expert_bias buffer (not a parameter)
    dtype: str = "fp32"                       # "fp32" or "bf16" (bf16 params, fp32 main params)
    grad_reduce_in_fp32: bool = True
    overlap_grad_reduce: bool = True
    bucket_size: Optional[int] = 20000        # small: several buckets per buffer
    tied: bool = False
    num_layers: int = 4
    hidden: int = 72                          # not a multiple of 64: the norms leave alignment gaps
    heads: int = 4
    groups: int = 2
    ffn: int = 88
    vocab: int = 250                          # padded to 256 (divisible by 128, TP <= 2)
    divisible_by: int = 128
    experts: int = 4
    moe_ffn: int = 40
    topk: int = 2
    global_batch: int = 4
    clip_grad: float = 1.0
    save_dist: bool = False                   # also save the trained weights with megatron-core's dist_checkpointing

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def padded_vocab(self) -> int:
        multiple = self.divisible_by * self.tp
        return -(-self.vocab // multiple) * multiple

    @property
    def chunks(self) -> int:
        return self.num_layers // self.pp // self.vpp_layers if self.vpp_layers else 1

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    @property
    def label(self) -> str:
        vpp = f"xVPP{self.chunks}" if self.chunks > 1 else ""
        kind = ("moe" if self.moe else "dense") + ("-tied" if self.tied else "") + ("-bias" if self.expert_bias else "")
        return f"{kind} {self.dtype} TP{self.tp}PP{self.pp}{vpp}EP{self.ep}DP{self.dp}"

    def replace(self, **changes) -> "Spec":
        return dataclasses.replace(self, **changes)


def rank_dir_name(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    name = f"mp_rank_{tp:02d}"
    if pp_size > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


def make_args(spec: Spec) -> argparse.Namespace:
    """The stored args: the model / layout fields Megatron reads back (megatron-format notes
    section 2) plus what a distributed-optimizer training run stores."""
    args = argparse.Namespace(
        num_layers=spec.num_layers, hidden_size=spec.hidden, ffn_hidden_size=spec.ffn,
        num_attention_heads=spec.heads, num_query_groups=spec.groups,
        group_query_attention=spec.groups != spec.heads, kv_channels=spec.hidden // spec.heads,
        max_position_embeddings=64, position_embedding_type="rope", rotary_base=10000,
        normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True, add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=False, untie_embeddings_and_output_weights=not spec.tied, vocab_size=spec.vocab,
        padded_vocab_size=spec.padded_vocab, make_vocab_size_divisible_by=spec.divisible_by,
        tensor_model_parallel_size=spec.tp, pipeline_model_parallel_size=spec.pp,
        expert_model_parallel_size=spec.ep, num_layers_per_virtual_pipeline_stage=spec.vpp_layers,
        virtual_pipeline_model_parallel_size=spec.chunks if spec.vpp_layers else None,
        num_layer_list=None, noop_layers=None, params_dtype=spec.params_dtype,
        bf16=spec.dtype == "bf16", fp16=False, transformer_impl="local", use_mcore_models=True,
        model_type_hf="mixtral" if spec.moe else "llama2", iteration=ITERATION,
        num_experts=None, moe_router_topk=None, moe_ffn_hidden_size=None, moe_grouped_gemm=False,
        multi_latent_attention=False,
    )
    extra = dict(
        world_size=spec.world,
        data_parallel_size=spec.dp,
        context_parallel_size=1,
        expert_tensor_parallel_size=spec.tp,
        use_distributed_optimizer=True,
        overlap_grad_reduce=spec.overlap_grad_reduce,
        overlap_param_gather=False,
        overlap_param_gather_with_optimizer_step=False,
        ddp_bucket_size=spec.bucket_size,
        ddp_average_in_collective=False,
        ddp_pad_buckets_for_high_nccl_busbw=False,
        num_distributed_optimizer_instances=1,
        accumulate_allreduce_grads_in_fp32=spec.grad_reduce_in_fp32,
        optimizer="adam",
        lr=LR, min_lr=0.0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=spec.clip_grad,
        micro_batch_size=spec.global_batch // spec.dp, global_batch_size=spec.global_batch, seq_length=SEQ,
        train_iters=10, consumed_train_samples=ITERATION * spec.global_batch,
    )
    if spec.moe:
        extra.update(num_experts=spec.experts, moe_router_topk=spec.topk, moe_ffn_hidden_size=spec.moe_ffn,
                     moe_grouped_gemm=False, moe_token_dispatcher_type="allgather",
                     moe_router_load_balancing_type="none", moe_layer_freq=1)
        if spec.expert_bias:
            extra.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    for key, value in extra.items():
        setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------- CPU patches


def patch_for_distributed_optimizer() -> None:
    """The patches DDP + DistributedOptimizer need on CPU (see the module docstring)."""
    if getattr(torch, "_optim_fixture_patched", False):
        return
    torch._optim_fixture_patched = True
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    def on_cpu(factory):
        def wrapped(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and str(device).startswith("cuda"):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)
        return wrapped

    for name in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(torch, name, on_cpu(getattr(torch, name)))

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    original_set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        # megatron-core 0.16.1 copies every key of the inner optimizer's state, but native torch
        # Adam (no Apex / TE FusedAdam) also keeps 'step' there, which the file does not hold:
        # KeyError in load_parameter_state. 'step' comes from optimizer.load_state_dict.
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        for key, target in {"param": main_param, **state}.items():
            if key != "step":
                target.copy_(tensors[key])

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    moe_utils.te_general_gemm = None
    multi_latent_attention.HAVE_TE = False


# ----------------------------------------------------------------------------- model


def _config(spec: Spec):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = {}
    if spec.moe:
        moe = dict(num_moe_experts=spec.experts, moe_router_topk=spec.topk, moe_ffn_hidden_size=spec.moe_ffn,
                   moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, moe_router_dtype="fp32",
                   moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                   expert_model_parallel_size=spec.ep)
        if spec.expert_bias:
            moe.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden, ffn_hidden_size=spec.ffn,
        num_attention_heads=spec.heads, num_query_groups=spec.groups, kv_channels=spec.hidden // spec.heads,
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False,
        tensor_model_parallel_size=spec.tp, pipeline_model_parallel_size=spec.pp,
        virtual_pipeline_model_parallel_size=spec.chunks if spec.chunks > 1 else None,
        params_dtype=spec.params_dtype, pipeline_dtype=spec.params_dtype,
        bf16=spec.dtype == "bf16", fp16=False,
        use_cpu_initialization=True, perform_initialization=True,  # sets the TP attributes grad norms need
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        sequence_parallel=False, **moe,
    )


def _ranks() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return dict(
        tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
        ep=ps.get_expert_model_parallel_rank(), dp=ps.get_data_parallel_rank(),
        edp=ps.get_expert_data_parallel_rank(),
    )


def _randomize(model, ranks: Dict[str, int], chunk: int, tied: bool) -> None:
    """Deterministic weights: a TP-split tensor depends on its TP rank, a replicated one (norms,
    router) does not; dense tensors are identical on every EP and DP rank, experts depend on the
    EP rank; a tied output layer (PP > 1) starts as the embedding. So the model is one consistent
    model at any layout."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            split = param.dim() == 2 and "router" not in name
            expert = ".mlp.experts." in name
            key = f"{name}|tp{ranks['tp'] if split else '-'}|pp{ranks['pp']}|v{chunk}|ep{ranks['ep'] if expert else '-'}"
            if tied and name == "output_layer.weight":
                key = f"embedding.word_embeddings.weight|tp{ranks['tp']}|pp0|v0|ep-"
            gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * noise)
            elif "word_embeddings" in name or (tied and name == "output_layer.weight"):
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("router.expert_bias"):  # fp32, the same on every rank (replicated)
                gen = torch.Generator().manual_seed(zlib.crc32(f"{name}|pp{ranks['pp']}|v{chunk}".encode()))
                buffer.copy_(0.01 * torch.randn(buffer.shape, generator=gen, dtype=torch.float32))


def _build(spec: Spec, randomize: bool):
    """DDP-wrapped model chunks and their unwrapped GPTModels."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    config = _config(spec)
    layer_spec = get_gpt_layer_local_spec(num_experts=spec.experts if spec.moe else None, moe_grouped_gemm=False,
                                          normalization="RMSNorm")
    ranks = _ranks()
    chunks, inner = [], []
    for v in range(spec.chunks):
        vp_stage = v if spec.chunks > 1 else None
        if spec.chunks > 1:
            ps.set_virtual_pipeline_model_parallel_rank(v)
        pre = ranks["pp"] == 0 and v == 0
        post = ranks["pp"] == spec.pp - 1 and v == spec.chunks - 1
        model = GPTModel(config, layer_spec, vocab_size=spec.padded_vocab, max_sequence_length=64,
                         pre_process=pre, post_process=post, share_embeddings_and_output_weights=spec.tied,
                         position_embedding_type="rope", rotary_base=10000, vp_stage=vp_stage)
        if randomize:
            _randomize(model, ranks, v, spec.tied)
        inner.append(model)
        wrapped = Float16Module(config, model) if spec.dtype == "bf16" else model
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=spec.grad_reduce_in_fp32, overlap_grad_reduce=spec.overlap_grad_reduce,
            overlap_param_gather=False, use_distributed_optimizer=True, bucket_size=spec.bucket_size,
            average_in_collective=False)
        # Megatron-LM's get_model: bucketing only for the first model chunk.
        chunks.append(DistributedDataParallel(config, ddp_config, wrapped, disable_bucketing=v > 0))
    return config, chunks, inner


def _optimizer(spec: Spec, chunks):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(optimizer="adam", lr=LR, min_lr=0.0, weight_decay=0.1, adam_beta1=0.9,
                             adam_beta2=0.95, adam_eps=1e-8, clip_grad=spec.clip_grad, bf16=spec.dtype == "bf16",
                             params_dtype=spec.params_dtype, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(config, chunks)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=LR, max_lr=LR, min_lr=0.0, lr_warmup_steps=0,
                                        lr_decay_steps=1000, lr_decay_style="constant", start_wd=0.1, end_wd=0.1,
                                        wd_incr_steps=1000, wd_incr_style="constant")
    return optimizer, scheduler


def batch(spec: Spec, step: int):
    """This DP rank's micro-batch of the global batch of `step` (same for any layout)."""
    from megatron.core import parallel_state as ps

    gen = torch.Generator().manual_seed(7000 + step)
    tokens = torch.randint(0, spec.vocab, (spec.global_batch, SEQ + 1), generator=gen)
    per_rank = spec.global_batch // spec.dp
    dp_rank = ps.get_data_parallel_rank()
    rows = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _run(spec: Spec, chunks, inner, tokens, labels, backward: bool) -> Optional[torch.Tensor]:
    """One micro-batch through every virtual stage; returns the mean loss (on the last stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    nxt, prev = ps.get_pipeline_model_parallel_next_rank(), ps.get_pipeline_model_parallel_prev_rank()
    stages = spec.chunks * spec.pp
    inputs, outputs, loss = {}, {}, None
    act_dtype = spec.params_dtype
    for stage in range(stages):
        v, p = divmod(stage, spec.pp)
        if p != pp_rank:
            continue
        if spec.chunks > 1:
            ps.set_virtual_pipeline_model_parallel_rank(v)
        if stage > 0:
            hidden = torch.empty(s, b, spec.hidden, dtype=act_dtype)
            dist.recv(hidden, src=prev)
            hidden.requires_grad_(backward)
            inputs[stage] = hidden
            inner[v].set_input_tensor(hidden)
        with torch.set_grad_enabled(backward):
            out = chunks[v](tokens, position_ids, mask, labels=labels if stage == stages - 1 else None)
        if stage < stages - 1:
            dist.send(out.detach().to(act_dtype).contiguous(), dst=nxt)
            outputs[stage] = out
        else:
            loss = out.float().mean()
    if backward:
        for stage in reversed(range(stages)):
            v, p = divmod(stage, spec.pp)
            if p != pp_rank:
                continue
            if stage == stages - 1:
                loss.backward()
            else:
                grad = torch.empty(s, b, spec.hidden, dtype=act_dtype)
                dist.recv(grad, src=nxt)
                torch.autograd.backward(outputs[stage], grad_tensors=grad.to(outputs[stage].dtype))
            if stage > 0:
                dist.send(inputs[stage].grad.to(act_dtype).contiguous(), dst=prev)
    return loss


def _dp_mean_loss(spec: Spec, loss) -> Optional[float]:
    """The global-batch loss (mean over DP), known on the last stage; None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if loss is None:
        return None
    value = loss.detach().float().reshape(1).clone()
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    return float(value.item() / spec.dp)


def _train_step(spec: Spec, chunks, inner, optimizer, scheduler, step: int) -> Optional[float]:
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    tokens, labels = batch(spec, step)
    loss = _run(spec, chunks, inner, tokens, labels, backward=True)
    # megatron's own: DP reduce-scatter per chunk, then the tied-embedding all-reduce (PP > 1)
    finalize_model_grads(chunks)
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step skipped"
    GRAD_NORMS.append(grad_norm)
    scheduler.step(increment=spec.global_batch)
    return _dp_mean_loss(spec, loss)


def _eval_loss(spec: Spec, chunks, inner, step: int) -> Optional[float]:
    tokens, labels = batch(spec, step)
    with torch.no_grad():
        loss = _run(spec, chunks, inner, tokens, labels, backward=False)
    return _dp_mean_loss(spec, loss)


# ----------------------------------------------------------------------------- live state


def _param_names(inner) -> Dict[int, tuple]:
    return {id(param): (v, name) for v, model in enumerate(inner) for name, param in model.named_parameters()}


def live_state(optimizer, inner) -> Dict[str, Any]:
    """What this rank's optimizer holds, keyed by (chunk, name): the owned shard's range in the
    flattened parameter and its fp32 param / exp_avg / exp_avg_sq; plus the buffer layouts."""
    names = _param_names(inner)
    shards, layouts = {}, []
    for opt_index, opt in enumerate(optimizer.chained_optimizers):
        for model_param in opt.model_param_gbuf_map:
            key = names[id(model_param)]
            shard = opt._get_model_param_range_map(model_param)["param"]
            tensors = opt._get_main_param_and_optimizer_states(model_param)
            shards[key] = dict(optimizer=opt_index, shape=tuple(model_param.shape), start=shard.start,
                               stop=shard.end, model_dtype=model_param.dtype,
                               **{k: tensors[k].detach().float().clone() for k in ("param", "exp_avg", "exp_avg_sq")})
        buffers = []
        for gbuf_index, buffer in enumerate(opt.buffers):
            buffers.append(dict(
                chunk=opt.gbuf_idx_to_model_idx_map[gbuf_index],
                key=(buffer.param_dtype, buffer.grad_dtype),
                params=[(names[id(p)][1], start, end, bucket) for p, (start, end, bucket) in
                        sorted(buffer.param_index_map.items(), key=lambda item: item[1][0])],
                buckets=[(bucket.offset, bucket.grad_data.numel(), bucket.numel_unpadded) for bucket in buffer.buckets],
                numel=buffer.numel, numel_unpadded=buffer.numel_unpadded,
            ))
        layouts.append(buffers)
    return {"shards": shards, "layouts": layouts}


def _dump_live(out_dir: str, tag: str, optimizer, inner, extra=None) -> None:
    import torch.distributed as dist

    ranks = _ranks()
    state = {"ranks": ranks, **live_state(optimizer, inner), **(extra or {})}
    folder = Path(out_dir) / tag
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"rank{dist.get_rank()}.pt")


# ----------------------------------------------------------------------------- saving / loading


def _save_checkpoint(spec: Spec, save_dir: Path, optimizer, scheduler, inner) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ranks = _ranks()
    folder = save_dir / f"iter_{ITERATION:07d}" / rank_dir_name(ranks["tp"], ranks["pp"], ranks["ep"], spec.pp, spec.ep)
    folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if ps.get_expert_data_parallel_rank() == 0:
        state = {
            "args": make_args(spec),
            "checkpoint_version": 3.0,
            "iteration": ITERATION,
            "optimizer": optimizer.state_dict(),
            "opt_param_scheduler": scheduler.state_dict(),
            # Megatron-LM's rng_state: python and numpy states too (the restricted unpickler's case)
            "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}],
            "num_floating_point_operations_so_far": 0,
        }
        # The DDP-wrapped parameters are views into megatron's parameter buffer: saved as they are.
        if spec.chunks == 1:
            state["model"] = inner[0].state_dict_for_save_checkpoint()
        else:
            for v, model in enumerate(inner):
                state[f"model{v}"] = model.state_dict_for_save_checkpoint()
        torch.save(state, folder / CHECKPOINT_FILE)
    optimizer.save_parameter_state(str(folder / OPTIM_FILE))
    dist.barrier()
    if dist.get_rank() == 0:
        (save_dir / TRACKER_FILE).write_text(str(ITERATION))


def _save_dist(spec: Spec, save_dir: Path, inner) -> None:
    """The trained weights as Megatron-LM's default --ckpt-format writes them: megatron-core's
    dist_checkpointing.save of the model's sharded state dict, with the run's args in common.pt."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    torch.cuda.synchronize = lambda *a, **k: None  # called by the save; there is no GPU here
    folder = save_dir / f"iter_{ITERATION:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {"model" if spec.chunks == 1 else f"model{v}": model.sharded_state_dict() for v, model in enumerate(inner)}
    state.update(args=make_args(spec), checkpoint_version=3.0, iteration=ITERATION)
    dist_checkpointing.save(state, str(folder))
    dist.barrier()
    if dist.get_rank() == 0:
        (save_dir / TRACKER_FILE).write_text(str(ITERATION))


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.load_state_dict (native torch Adam path, no Apex /
    TE) gives every parameter's state THE SAME 'step' tensor; torch Adam then increments it once per
    parameter in a step, so all but the first parameter get a wrong bias correction. Give each its own."""
    for opt in optimizer.chained_optimizers:
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def _fixture_worker(rank, world, out_dir, payload):
    import torch.distributed as dist

    spec: Spec = payload["spec"]
    patch_for_distributed_optimizer()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(spec.tp, spec.pp, virtual_pipeline_model_parallel_size=spec.chunks if spec.chunks > 1 else None,
                                 expert_model_parallel_size=spec.ep)
    _, chunks, inner = _build(spec, randomize=True)
    optimizer, scheduler = _optimizer(spec, chunks)
    losses = [_train_step(spec, chunks, inner, optimizer, scheduler, step) for step in range(1, ITERATION + 1)]
    _save_checkpoint(spec, Path(out_dir) / "ckpt", optimizer, scheduler, inner)
    if spec.save_dist:
        _save_dist(spec, Path(out_dir) / "dist", inner)
    model_params = {(v, n): p.detach().float().clone() for v, m in enumerate(inner) for n, p in m.named_parameters()}
    _dump_live(out_dir, "live", optimizer, inner, {"model_params": model_params})
    # the resume check: one more step on a fixed batch, and the loss after it
    loss_next = _train_step(spec, chunks, inner, optimizer, scheduler, ITERATION + 1)
    _dump_live(out_dir, "after", optimizer, inner)
    loss_after = _eval_loss(spec, chunks, inner, ITERATION + 1)
    if loss_next is not None and _ranks()["tp"] == 0 and _ranks()["dp"] == 0:
        torch.save({"losses": losses, "loss_next": loss_next, "loss_after": loss_after, "grad_norms": GRAD_NORMS},
                   Path(out_dir) / "losses.pt")
    dist.barrier()


def _resume_worker(rank, world, out_dir, payload):
    import torch.distributed as dist

    spec: Spec = payload["spec"]
    patch_for_distributed_optimizer()
    from megatron.core import parallel_state as ps

    from modellink_ckpt.formats.safe_pickle import load_torch

    ps.initialize_model_parallel(spec.tp, spec.pp, virtual_pipeline_model_parallel_size=spec.chunks if spec.chunks > 1 else None,
                                 expert_model_parallel_size=spec.ep)
    _, chunks, inner = _build(spec, randomize=False)
    optimizer, scheduler = _optimizer(spec, chunks)
    ranks = _ranks()
    folder = Path(payload["iter_dir"]) / rank_dir_name(ranks["tp"], ranks["pp"], ranks["ep"], spec.pp, spec.ep)
    state = load_torch(folder / CHECKPOINT_FILE, mmap=False)
    for v, model in enumerate(inner):
        model.load_state_dict(state["model" if spec.chunks == 1 else f"model{v}"], strict=True)
    # Megatron-LM's load_checkpoint order: model, optimizer.load_state_dict, load_parameter_state
    optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(optimizer)
    # no_grad: with fp32 params the main params are views of the (requires_grad) model params and
    # megatron-core 0.16.1's load_parameter_state_from_dp_zero copies into them in place
    with torch.no_grad():
        optimizer.load_parameter_state(str(folder / OPTIM_FILE))
    scheduler.load_state_dict(state["opt_param_scheduler"])
    model_params = {(v, n): p.detach().float().clone() for v, m in enumerate(inner) for n, p in m.named_parameters()}
    _dump_live(out_dir, "live", optimizer, inner, {"model_params": model_params,
                                                   "step": optimizer.state_dict()})
    loss_next = _train_step(spec, chunks, inner, optimizer, scheduler, ITERATION + 1)
    _dump_live(out_dir, "after", optimizer, inner)
    loss_after = _eval_loss(spec, chunks, inner, ITERATION + 1)
    if loss_next is not None and ranks["tp"] == 0 and ranks["dp"] == 0:
        torch.save({"loss_next": loss_next, "loss_after": loss_after, "grad_norms": GRAD_NORMS},
                   Path(out_dir) / "losses.pt")
    dist.barrier()


# ----------------------------------------------------------------------------- public API


def load_live(out_dir, tag: str = "live") -> List[Dict[str, Any]]:
    """The live dumps of every rank (test-only files written by this module): "live" when the
    checkpoint was saved / loaded, "after" after the next step."""
    folder = Path(out_dir) / tag
    return [torch.load(path, weights_only=True) for path in sorted(folder.glob("rank*.pt"))]


def full_live_state(dumps) -> Dict[tuple, Dict[tuple, Dict[str, torch.Tensor]]]:
    """Per (tp, pp, ep) rank, per (chunk, name): the whole fp32 param / exp_avg / exp_avg_sq,
    assembled from the DP shards (every element owned by exactly one rank of the parameter's DP
    group: the dense DP group spans the EP ranks, the expert DP group does not)."""
    groups: Dict[tuple, Dict[tuple, Dict[str, Any]]] = {}
    for dump in dumps:
        r = dump["ranks"]
        for key, shard in dump["shards"].items():
            expert = shard["optimizer"] == 1
            group = groups.setdefault((r["tp"], r["pp"], r["ep"] if expert else None), {})
            numel = torch.Size(shard["shape"]).numel()
            entry = group.setdefault(key, {"shape": shard["shape"], "covered": torch.zeros(numel, dtype=torch.int32),
                                           **{k: torch.zeros(numel) for k in ("param", "exp_avg", "exp_avg_sq")}})
            for k in ("param", "exp_avg", "exp_avg_sq"):
                entry[k][shard["start"]:shard["stop"]] = shard[k]
            entry["covered"][shard["start"]:shard["stop"]] += 1
    for group in groups.values():
        for key, entry in group.items():
            if not bool((entry.pop("covered") == 1).all()):
                raise AssertionError(f"{key}: DP shards do not cover the parameter exactly once")
            for k in ("param", "exp_avg", "exp_avg_sq"):
                entry[k] = entry[k].view(entry["shape"])
    result: Dict[tuple, Dict[tuple, Dict[str, Any]]] = {}
    for dump in dumps:
        r = dump["ranks"]
        rank = (r["tp"], r["pp"], r["ep"])
        if rank not in result:
            result[rank] = {**groups.get((r["tp"], r["pp"], None), {}), **groups.get(rank, {})}
    return result


def make_fixture(spec: Spec, timeout: float = 600) -> Path:
    """Train `spec` for ITERATION steps and save it. Returns a folder holding ``ckpt/`` (the
    checkpoint), ``live/`` (per-rank dumps) and ``losses.pt``; the caller removes it."""
    return Path(spawn_ranks(_fixture_worker, spec.world, {"spec": spec}, timeout=timeout))


def resume(spec: Spec, load_dir, timeout: float = 600) -> Path:
    """Load the checkpoint at `load_dir` into megatron-core at `spec`'s layout, dump the live
    state and take one more step. Returns a folder with ``live/`` and ``losses.pt``."""
    load_dir = Path(load_dir)
    marker = (load_dir / TRACKER_FILE).read_text().strip()
    iter_dir = load_dir / f"iter_{int(marker):07d}"
    return Path(spawn_ranks(_resume_worker, spec.world, {"spec": spec, "iter_dir": str(iter_dir)}, timeout=timeout))


def describe(obj, indent: int = 0) -> str:
    """The nested structure of a loaded checkpoint object: keys, tensor shapes / dtypes, values."""
    pad = " " * indent
    if isinstance(obj, dict):
        lines = []
        for key, value in obj.items():
            if isinstance(value, (dict, list, tuple)) and value and not isinstance(value, torch.Size):
                lines.append(f"{pad}{key!r}:")
                lines.append(describe(value, indent + 2))
            else:
                lines.append(f"{pad}{key!r}: {describe(value, 0).strip()}")
        return "\n".join(lines)
    if isinstance(obj, list) and obj and all(isinstance(v, (dict, list, type(None))) for v in obj):
        return "\n".join(f"{pad}[{i}]\n{describe(v, indent + 2)}" for i, v in enumerate(obj))
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return f"{pad}{type(obj).__name__} {list(obj.shape)} {obj.dtype}"
    text = repr(obj).replace("\n", " ")
    return f"{pad}{text[:100]}{' ...' if len(text) > 100 else ''}"


if __name__ == "__main__":  # print what megatron-core writes: python optim_fixtures.py [moe] [bf16] [ep2]
    import sys

    from modellink_ckpt.formats.torch_zip import load_lazy

    flags = sys.argv[1:]
    spec = Spec(moe="moe" in flags, ep=2 if "ep2" in flags else 1, dtype="bf16" if "bf16" in flags else "fp32")
    out = make_fixture(spec)
    try:
        for folder in sorted((out / "ckpt" / f"iter_{ITERATION:07d}").iterdir()):
            for name in (OPTIM_FILE, CHECKPOINT_FILE):
                obj = load_lazy(folder / name)
                if name == CHECKPOINT_FILE:
                    obj = {k: v for k, v in obj.items() if k not in ("args", "model")}
                print(f"== {folder.name}/{name}\n{describe(obj)}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
