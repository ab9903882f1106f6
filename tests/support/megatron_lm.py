"""Megatron-LM's own training loader (`megatron.training.checkpointing.load_checkpoint`) on our
output (test helper).

The megatron-core wheel ships `megatron.core` only; the training code is vendored, unmodified, from
Megatron-LM at tag `core_v0.16.1` (commit 55ac7082517c3878ae653c07c09c534b8aed49f6) under
`tests/support/third_party/megatron_lm/megatron/training` with its LICENSE, and joins the installed
`megatron` package in the child processes. What it imports but a CPU-only loader never runs is
stubbed there (`six` for the BERT tokenizer, the triton batch-invariant kernels, `megatron.legacy`'s
fused kernels and `param_is_not_shared`, `megatron.rl`).

`load_with_megatron_lm(load_dir, argv, tokens, world)` starts `world` gloo processes that do what a
training run's start does: `parse_args` / `validate_args` on a Megatron-LM command line, the global
args, the microbatch calculator, model parallel groups, a `GPTModel` from
`core_transformer_config_from_args` wrapped in megatron-core's DDP with a real Adam optimizer
(`get_megatron_optimizer`), then `load_checkpoint(model, optimizer, None, strict=True)`. It returns
the iteration loaded, the logits of the loaded model (gathered over TP) and the loss of one more
training step (forward, backward, `optimizer.step()`), so a test sees the run can go on.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

VENDORED = Path(__file__).resolve().parent / "third_party" / "megatron_lm"

# A training command line for a local-spec GPT on CPU: no fused kernels, no Transformer Engine.
CPU_FLAGS = ("--transformer-impl", "local", "--no-rope-fusion", "--no-persist-layer-norm",
             "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
             "--no-gradient-accumulation-fusion", "--use-cpu-initialization", "--attention-dropout", "0",
             "--hidden-dropout", "0", "--micro-batch-size", "1", "--global-batch-size", "1",
             "--train-iters", "100", "--lr", "1e-4", "--tokenizer-type", "NullTokenizer",
             "--no-async-tensor-model-parallel-allreduce")


def _stub(name: str, package: bool = False, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    if package:
        module.__path__ = []
    sys.modules[name] = module
    return module


def install_megatron_training() -> None:
    """Make `megatron.training` importable next to the installed megatron-core (child only)."""
    import megatron

    if str(VENDORED / "megatron") not in megatron.__path__:
        megatron.__path__.append(str(VENDORED / "megatron"))
    _stub("six")
    _stub("megatron.core.transformer.custom_layers.batch_invariant_kernels",
          enable_batch_invariant_mode=lambda *args, **kwargs: None)
    _stub("megatron.legacy", package=True)
    _stub("megatron.legacy.fused_kernels", load=lambda *args, **kwargs: None)
    _stub("megatron.legacy.model", package=True)
    _stub("megatron.legacy.model.module", param_is_not_shared=lambda p: not getattr(p, "shared", False))
    _stub("megatron.rl", package=True)
    _stub("megatron.rl.parallel_utils", build_inference_pg_collection=None)


def _worker(rank: int, world: int, out_dir: str, payload: dict) -> None:
    import torch.distributed as dist
    from optim_fixtures import patch_for_distributed_optimizer

    patch_for_distributed_optimizer()
    install_megatron_training()
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.training import arguments
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.global_vars import set_args
    from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding

    sys.argv = ["pretrain_gpt.py", *payload["argv"]]
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("RANK", str(rank))
    arguments.get_device_arch_version = lambda: 9  # asks the GPU; only picks which advice to print
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    args = parse_args()
    args.world_size, args.rank = world, rank
    validate_args(args, {})
    args.padded_vocab_size = _vocab_size_with_padding(args.vocab_size, args, logging_enabled=False)
    set_args(args)
    init_num_microbatches_calculator(rank, None, args.global_batch_size, args.micro_batch_size, 1)
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)

    config = core_transformer_config_from_args(args)
    config.perform_initialization = True  # sets the TP attributes the optimizer relies on
    model = GPTModel(config, get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm),
                     vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, use_distributed_optimizer=False,
                                                       clip_grad=1.0), [ddp])
    iteration, _ = load_checkpoint([ddp], optimizer, None, strict=True)

    tokens = payload["tokens"]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions, None)
    shards = [torch.empty_like(logits) for _ in range(args.tensor_model_parallel_size)]
    dist.all_gather(shards, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())

    model.train()  # one more step of the resumed run
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = model(tokens, positions, None, labels=tokens.roll(-1, 1)).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    updated, _, _ = optimizer.step()
    if rank == 0:
        torch.save({"iteration": iteration, "logits": torch.cat(shards, dim=-1), "loss": loss.item(),
                    "updated": bool(updated)}, os.path.join(out_dir, "result.pt"))
    dist.barrier()


def load_with_megatron_lm(load_dir, argv, tokens: torch.Tensor, world: int = 1, timeout: float = 300) -> dict:
    """{iteration, logits [b, s, padded vocab], loss, updated} from Megatron-LM's loader on `load_dir`."""
    import shutil

    from mcore_harness import spawn_ranks

    out_dir = spawn_ranks(_worker, world, {"argv": [*map(str, argv), "--load", str(load_dir), *CPU_FLAGS],
                                           "tokens": tokens}, timeout=timeout)
    try:
        return torch.load(os.path.join(out_dir, "result.pt"))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
