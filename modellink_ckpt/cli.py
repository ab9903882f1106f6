"""`convert_ckpt.py`: the command line MindSpeed-LLM users already know, and the conversion plan.

Everything that can be checked before a byte is written (flags, the source's config or stored
args, the target layout, the target folder) is checked here, in the parent process; errors are
one line and exit with code 2. The loader and saver then run as two processes (`pipeline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from modellink_ckpt import distributed, pipeline, registry, workers
from modellink_ckpt.errors import ConvertError, Interrupted, Terminated, UsageError
from modellink_ckpt.file_io import DEFAULT_HASH, HASHES, use_hash
from modellink_ckpt.layout import ParallelLayout
from modellink_ckpt.megatron_args import DTYPE_FLAGS
from modellink_ckpt.mg_names import MLA_SPELLINGS, Spelling
from modellink_ckpt.model_cfg import DEFAULT_FAMILY, ModelDims, ModelFamily, families_for_config, load_family
from modellink_ckpt.staging import remove_stale_partials


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not a usage dump
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="convert_ckpt.py",
        description="Convert checkpoints between Hugging Face and Megatron-Core layouts (TP/PP/VPP/noop).")
    p.add_argument("--model-type", default="GPT", choices=["GPT"], help="only decoder-only GPT models")
    p.add_argument("--load-model-type", required=True, choices=sorted(registry.SOURCES))
    p.add_argument("--save-model-type", required=True, choices=sorted(set(registry.TARGETS) - {"torch_dist"}))
    p.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                   help="Megatron output: the legacy torch layout (rank files; default) or torch_dist (megatron-core's "
                        "dist_checkpointing store, Megatron-LM's default --ckpt-format); inputs are detected")
    p.add_argument("--model-type-hf", default=None,
                   help="entry of configs/checkpoint/model_cfg.json (default: the one the source's config.json or "
                        "stored args name, printed)")
    p.add_argument("--model-cfg", dest="model_cfg", default=None,
                   help="another model_cfg.json (default: configs/checkpoint/model_cfg.json)")
    p.add_argument("--load-dir", required=True, type=Path)
    p.add_argument("--save-dir", required=True, type=Path,
                   help="target folder; for --save-model-type hf the original HF folder, output goes to <save-dir>/mg2hf")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-expert-parallel-size", "--target-expert-model-parallel-size",
                   dest="target_expert_parallel_size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    p.add_argument("--target-data-parallel-size", type=int, default=None,
                   help="with --load-model-type optim: lay the optimizer state out for this DP size "
                        "(default: the source's)")
    p.add_argument("--target-overlap-grad-reduce", choices=["on", "off"], default=None,
                   help="with --load-model-type optim: whether the resumed run uses --overlap-grad-reduce "
                        "(it decides the buffer buckets; default: as the source run)")
    p.add_argument("--target-ddp-bucket-size", type=int, default=None,
                   help="with --load-model-type optim: the resumed run's --ddp-bucket-size (default: as the source run)")
    p.add_argument("--num-layer-list", default=None, help="layers per pipeline stage, e.g. 8,8,8,8")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--noop-layers", default=None, help="comma list of empty Megatron layer slots")
    p.add_argument("--use-mcore-models", action="store_true", help="accepted; mcore is the only format")
    p.add_argument("--params-dtype", choices=sorted(DTYPE_FLAGS), default=None,
                   help="cast floating weights (default: keep the source dtype)")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer file carried over to HF output")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this x TP (default: from hf 1, from a Megatron source its own)")
    p.add_argument("--add-qkv-bias", action="store_true", default=None)
    p.add_argument("--add-dense-bias", action="store_true", default=None)
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    p.add_argument("--moe-grouped-gemm", action="store_true",
                   help="write routed experts in the grouped layout (weight1/weight2; with transformer_engine: "
                        "linear_fc1.weight<j>)")
    p.add_argument("--mla-spelling", choices=list(MLA_SPELLINGS), default="mindspeed",
                   help="MLA tensor names: MindSpeed-LLM's fused linear_qkv (default) or upstream Megatron-Core's "
                        "linear_q_down_proj/linear_kv_down_proj")
    p.add_argument("--max-queue-size", type=int, default=50, help="loader->saver queue capacity in messages")
    p.add_argument("--max-queue-gb", type=float, default=1.0, help="at most this many GB in flight")
    p.add_argument("--max-shard-size", default="5GB", help="largest HF output shard (e.g. 5GB, 500MB)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel loader/saver pairs, each writing some pipeline stages (or rank files) of a "
                        "Megatron target, some ranks of a MindSpore target split by --dst-strategy, or the tensors "
                        "of some layers of an HF, torch_dist or complete MindSpore safetensors target (default: "
                        "one per two cores, as memory allows; same output bytes for any N)")
    p.add_argument("--hash", choices=list(HASHES), default=DEFAULT_HASH,
                   help="digest of every output file in the manifest (default: %(default)s; --verify reads both)")
    p.add_argument("--no-kernel-copy", action="store_true",
                   help="move every byte through memory, also those a Megatron, HF or MindSpore safetensors target "
                        "takes unchanged from the source (by default copied file to file inside the kernel; the "
                        "output is the same bytes)")
    p.add_argument("--hf-cfg-dir", type=Path, default=None, help="folder with the HF config.json for HF output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing target")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print the plan (files, layers per stage, bytes) and write nothing")
    p.add_argument("--mtp-num-layers", type=int, default=None,
                   help="convert this many multi-token-prediction layers (DeepSeek-V3, GLM-4.5); 0 leaves the ones a "
                        "checkpoint holds out on purpose (without the flag such a checkpoint is refused)")
    ms = p.add_argument_group("MindSpore / MindFormers (--load-model-type ms, --save-model-type ms)")
    ms.add_argument("--ms-format", choices=["safetensors", "ckpt"], default="safetensors",
                    help="MindSpore output file format (default safetensors, as MindFormers recommends)")
    ms.add_argument("--ms-naming", default=None,
                    help="MindFormers tensor names: mcore (default for output; detected for input), mcore-contiguous "
                         "(fc1 not interleaved), legacy (convert_weight.py models: attention.wq, feed_forward.w1, ...) "
                         "or legacy-concat (w_qkv, w_gate_hidden); any naming model_cfg.json defines")
    ms.add_argument("--src-strategy", type=Path, default=None,
                    help="strategy of a distributed MindSpore source: a strategy file, a merged one, or a folder "
                         "of ckpt_strategy_rank_*.ckpt")
    ms.add_argument("--dst-strategy", type=Path, default=None,
                    help="write a distributed MindSpore checkpoint laid out by this strategy (file or folder); "
                         "without it the checkpoint is complete")
    ms.add_argument("--ms-prefix", default="checkpoint_",
                    help="file name prefix of distributed output: rank_<r>/<prefix><r>.<format>")
    lora = p.add_argument_group("LoRA (with --load-model-type mg or ms)")
    lora.add_argument("--lora-load", type=Path, default=None,
                      help="LoRA checkpoint (full or adapters only) to merge into the --load-dir base")
    lora.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the one the checkpoint records)")
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the recorded one)")
    lora.add_argument("--lora-target-modules", nargs="*", default=None,
                      help="linear_qkv linear_proj linear_fc1 linear_fc2 (default: the recorded ones, else all four)")
    lora.add_argument("--lora-scaling", type=float, default=None,
                      help="MindSpore sources: merge MindFormers LoRA adapters with W + scaling * B @ A "
                           "(MindFormers' convention; or give --lora-r and --lora-alpha)")
    lora.add_argument("--save-lora-to-hf", action="store_true",
                      help="export only the adapters, as a PEFT adapter folder in <save-dir>/mg2hf")
    lora.add_argument("--load-checkpoint-loosely", action="store_true",
                      help="accepted (MindSpeed-LLM needs it for adapter-only checkpoints)")
    # accepted for compatibility with existing scripts; they change nothing here
    for flag in ("--spec", "--load-hf-from-config"):
        kwargs = {"nargs": "*"} if flag == "--spec" else {"action": "store_true"}
        p.add_argument(flag, help=argparse.SUPPRESS, **kwargs)
    return p


def parse_size(text: str, flag: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise UsageError(f"{flag} {text!r}: expected a size like 5GB or 500MB")
    unit = match[2].upper().replace("I", "").rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    return int(float(match[1]) * scale)


@dataclasses.dataclass
class Plan:
    """What will be read and written, fully validated before anything is written."""

    load_type: str
    save_type: str
    load_dir: Path
    save_dir: Path
    family: ModelFamily
    dims: ModelDims
    source_layout: ParallelLayout | None
    target_layout: ParallelLayout | None
    padded_vocab: int | None
    divisible_by: int
    params_dtype: torch.dtype | None
    target_spelling: Spelling
    tokenizer_model: str | None
    hf_config_dir: Path | None
    max_queue_size: int
    max_queue_gb: float
    max_shard_bytes: int
    overwrite: bool
    quiet: bool
    hash_algorithm: str

    source_tokenizer: Path | None = None
    source_dtype: torch.dtype = torch.float32
    lora: "LoraSpec | None" = None        # merge (or, with save_lora_to_hf, export) these adapters
    lora_dir: Path | None = None          # --lora-load: adapters kept apart from the base
    save_lora_to_hf: bool = False
    target_ddp: dict = dataclasses.field(default_factory=dict)  # optim -> mg: the resumed run's DDP settings
    target_format: str = ""  # the registry's target (save_type, or torch_dist for mg --ckpt-format torch_dist)
    source_options: dict = dataclasses.field(default_factory=dict)  # format-specific facts of the source
    target_options: dict = dataclasses.field(default_factory=dict)  # format-specific choices for the target
    share: "workers.Share | None" = None  # --workers: the part of the target one worker writes
    kernel_copy: bool = False  # bytes the target takes unchanged are copied file to file (kernel_copy.py)

    def tokenizer_dir(self) -> Path | None:
        """Where the source's tokenizer files are: the HF folder, or the one the mg args recorded."""
        if self.load_type == "hf":
            return self.load_dir
        return self.source_tokenizer.parent if self.source_tokenizer else None


def _unsupported(args) -> None:
    if args.save_lora_to_hf and args.moe_grouped_gemm:
        raise UsageError("--save-lora-to-hf and --moe-grouped-gemm are exclusive (the adapter is per expert)")
    for flag, value in (("--target-data-parallel-size", args.target_data_parallel_size),
                        ("--target-overlap-grad-reduce", args.target_overlap_grad_reduce),
                        ("--target-ddp-bucket-size", args.target_ddp_bucket_size)):
        if value is not None and not (args.load_model_type == "optim" and args.save_model_type == "mg"):
            raise UsageError(f"{flag}: only for --load-model-type optim --save-model-type mg (it shapes the "
                             f"optimizer state, not the weights)")
    lora_flags = args.lora_load or args.save_lora_to_hf or args.lora_r is not None or args.lora_scaling is not None
    if lora_flags and args.load_model_type not in ("mg", "ms"):
        raise UsageError("--lora-load / --lora-r / --lora-scaling / --save-lora-to-hf need --load-model-type mg or ms")
    if args.lora_scaling is not None and args.load_model_type != "ms":
        raise UsageError("--lora-scaling: MindFormers' LoRA scaling, for --load-model-type ms (Megatron: --lora-alpha)")
    if args.save_lora_to_hf and args.save_model_type != "hf":
        raise UsageError("--save-lora-to-hf writes a PEFT adapter: use it with --save-model-type hf")
    if args.save_lora_to_hf and args.load_hf_from_config:
        raise UsageError("--save-lora-to-hf and --load-hf-from-config are exclusive")
    if args.load_model_type == "hf" and args.save_model_type == "hf":
        raise UsageError("--load-model-type hf --save-model-type hf: nothing to convert")
    if args.src_strategy and args.load_model_type != "ms":
        raise UsageError("--src-strategy: only for --load-model-type ms")
    if args.ckpt_format == "torch_dist" and args.save_model_type != "mg":
        raise UsageError("--ckpt-format torch_dist: only for --save-model-type mg")
    if args.ckpt_format == "torch_dist" and args.load_model_type == "optim":
        raise UsageError("--ckpt-format torch_dist: optimizer state is written in the torch layout only")
    if args.dst_strategy and args.save_model_type != "ms":
        raise UsageError("--dst-strategy: only for --save-model-type ms")


def _expert_layout(args) -> str:
    if not args.moe_grouped_gemm:
        return "per_expert"
    return "te_grouped" if args.transformer_impl == "transformer_engine" else "grouped_gemm"


def source_request(args, family) -> registry.SourceRequest:
    """The source's part of the command line."""
    lora = None
    if args.lora_load or args.save_lora_to_hf or args.lora_r is not None or args.lora_scaling is not None:
        lora = {"load": args.lora_load, "r": args.lora_r, "alpha": args.lora_alpha, "scaling": args.lora_scaling,
                "target_modules": args.lora_target_modules, "export": args.save_lora_to_hf}
    return registry.SourceRequest(
        load_dir=args.load_dir, family=family, save_type=args.save_model_type, quiet=args.quiet,
        overrides={"add_qkv_bias": args.add_qkv_bias, "add_dense_bias": args.add_dense_bias,
                   "mtp_num_layers": args.mtp_num_layers},
        config_dirs=tuple(d for d in (args.hf_cfg_dir, args.save_dir) if d is not None),
        noop_layers=args.noop_layers if args.save_model_type == "hf" else None, lora=lora,
        options={"naming": args.ms_naming, "src_strategy": args.src_strategy, "lora": lora}
        if args.load_model_type == "ms" else {})


def _target_layout(args, dims, info) -> tuple:
    """(ParallelLayout, padded vocabulary, divisor) of a Megatron target."""
    layout = ParallelLayout.build(
        dims.num_layers, tp=args.target_tensor_parallel_size, pp=args.target_pipeline_parallel_size,
        ep=args.target_expert_parallel_size, vpp_layers=args.num_layers_per_virtual_pipeline_stage,
        num_layer_list=args.num_layer_list, noop_layers=args.noop_layers,
        num_heads=dims.num_attention_heads,
        num_query_groups=None if dims.multi_latent_attention else dims.num_query_groups,
        num_experts=dims.num_experts, expert_tp=args.expert_tensor_parallel_size)
    if args.moe_grouped_gemm and not dims.num_experts:
        raise UsageError("--moe-grouped-gemm: the model has no experts")
    if dims.num_experts and dims.add_dense_bias and layout.etp > 1:  # megatron-core asserts the same at start-up
        raise UsageError(f"expert tensor parallel size {layout.etp}: Megatron-Core holds biased experts only at "
                         f"expert TP 1; pass --expert-tensor-parallel-size 1")
    divisor = args.make_vocab_size_divisible_by
    if divisor is None:  # a Megatron source keeps its padding rule (a resumed run, and its state)
        divisor = info.divisible_by or 1
    if divisor < 1:
        raise UsageError("--make-vocab-size-divisible-by must be at least 1")
    return layout, layout.padded_vocab(dims.vocab_size, divisor), divisor


def resolve_family(args) -> ModelFamily:
    """--model-type-hf, or the family the source says it is (HF config.json, a Megatron run's
    args), or the one an HF config.json for the output names; said when not given."""
    if args.model_type_hf:
        return load_family(args.model_type_hf, args.model_cfg)
    found = registry.source(args.load_model_type).family_hint(args.load_dir, args.model_cfg)
    if found is None:
        for folder in (args.hf_cfg_dir, args.save_dir if args.save_model_type == "hf" else None):
            if folder is not None and (folder / "config.json").is_file():
                matching = families_for_config(_read_json(folder / "config.json"), args.model_cfg)
                if matching:
                    found = matching[0], f"from {folder / 'config.json'}"
                    break
    name, how = found or (DEFAULT_FAMILY, "the default; pass --model-type-hf to choose")
    if not args.quiet:
        print(f"family: --model-type-hf {name} ({how})", flush=True)
    return load_family(name, args.model_cfg)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from None


def build_plan(args) -> Plan:
    _unsupported(args)
    family = resolve_family(args)
    info = registry.source(args.load_model_type).describe(source_request(args, family))
    dims = info.dims
    if "hf" in (args.load_model_type, args.save_model_type):
        from modellink_ckpt.mapping import require_hf_names

        require_hf_names(family, dims)
    target_layout = padded = divisor = None
    if args.save_model_type == "mg":
        target_layout, padded, divisor = _target_layout(args, dims, info)
    if args.tokenizer_model and not Path(args.tokenizer_model).is_file():
        raise UsageError(f"--tokenizer-model {args.tokenizer_model}: file not found")
    if args.load_model_type == "optim" and args.target_data_parallel_size is not None \
            and args.target_data_parallel_size < 1:
        raise UsageError(f"--target-data-parallel-size {args.target_data_parallel_size}: must be at least 1")

    plan = Plan(
        load_type=args.load_model_type, save_type=args.save_model_type, load_dir=args.load_dir,
        save_dir=args.save_dir, family=family, dims=dims, source_layout=info.layout,
        target_layout=target_layout, padded_vocab=padded, divisible_by=divisor or 1,
        # from optim the weights are the fp32 master weights, each written in its model weight's dtype
        params_dtype=DTYPE_FLAGS[args.params_dtype] if args.params_dtype else None,
        target_spelling=Spelling(args.transformer_impl, _expert_layout(args), args.mla_spelling),
        tokenizer_model=args.tokenizer_model,
        hf_config_dir=args.hf_cfg_dir, max_queue_size=args.max_queue_size, max_queue_gb=args.max_queue_gb,
        max_shard_bytes=parse_size(args.max_shard_size, "--max-shard-size"), overwrite=args.overwrite,
        quiet=args.quiet, hash_algorithm=args.hash, source_tokenizer=info.tokenizer, source_dtype=info.dtype,
        lora=info.lora, lora_dir=info.lora_dir, save_lora_to_hf=args.save_lora_to_hf,
        target_ddp={"data_parallel_size": args.target_data_parallel_size,
                    "overlap_grad_reduce": None if args.target_overlap_grad_reduce is None
                    else args.target_overlap_grad_reduce == "on",
                    "bucket_size": args.target_ddp_bucket_size},
        target_format="torch_dist" if args.save_model_type == "mg" and args.ckpt_format == "torch_dist"
        else args.save_model_type,
        source_options=info.options,
        target_options={"format": args.ms_format, "naming": args.ms_naming or "mcore", "strategy": args.dst_strategy,
                        "prefix": args.ms_prefix} if args.save_model_type == "ms" else {})
    if not plan.save_lora_to_hf:
        target = registry.target(plan.target_format)
        target.check(plan)
        plan.kernel_copy = target.copies_in_kernel(plan) and not args.no_kernel_copy
    return plan


def output_files(plan: Plan) -> dict[str, int]:
    """{file relative to the target: bytes of tensor data} that the conversion will write."""
    return registry.target(plan.target_format).files(plan)


def check_free_space(plan: Plan, files: dict[str, int]) -> None:
    # optimizer state passes through a scratch file per rank (a stage's ranks at once) before its
    # distrib_optim.pt is written
    scratch = 0
    if plan.load_type == "optim" and plan.target_layout is not None:
        layout = plan.target_layout
        scratch = max(sum(files.get(f"{layout.rank_dir(*rank)}/distrib_optim.pt", 0)
                          for rank in layout.ranks() if rank[1] == pp_rank) for pp_rank in range(layout.pp))
    needed = sum(files.values()) + scratch + (64 << 20)
    folder = plan.save_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UsageError(f"--save-dir {plan.save_dir}: needs {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB free "
                         f"on that filesystem")


def describe_plan(plan: Plan, files: dict[str, int], shares: list | None = None) -> str:
    """The `--dry-run` report (`shares`: each worker's `workers.Share`, with --workers)."""
    dims = plan.dims
    lines = [f"plan: {plan.load_type} {plan.load_dir} -> {plan.save_type} {registry.target(plan.target_format).where(plan)}",
             f"model: --model-type-hf {plan.family.name}, {dims.num_layers} layers, hidden {dims.hidden_size}, "
             f"heads {dims.num_attention_heads}/{dims.num_query_groups}, vocab {dims.vocab_size}"
             + (f" padded to {plan.padded_vocab}" if plan.padded_vocab else "")
             + f", dtype {str(plan.params_dtype or plan.source_dtype).replace('torch.', '')}"
             + (" (cast)" if plan.params_dtype else "")]
    if plan.target_layout is not None:
        layout = plan.target_layout
        for pp_rank in range(layout.pp):
            chunks = []
            for vchunk in range(layout.vpp):
                slots = [s for s in layout.stage_slots(pp_rank) if s.vchunk == vchunk]
                shown = ",".join(f"{s.mg_layer}" + ("(noop)" if s.hf_layer is None else "") for s in slots)
                chunks.append(f"{layout.model_key(vchunk)}: layers {shown or '-'}")
            lines.append(f"  stage {pp_rank}: " + "; ".join(chunks))
    if shares and len(shares) > 1:
        first = shares[0]
        what = "writing stages" if first.parts is None else "writing" if first.by_message else \
            "writing rank files (tp.pp.ep)" if isinstance(first.parts[0], tuple) else "writing ranks"
        lines.append(f"workers: {len(shares)}, {what} " + " | ".join(share.describe() for share in shares))
    for name, nbytes in files.items():
        lines.append(f"  {name}: {nbytes / 1e6:.1f} MB")
    lines.append(f"total {sum(files.values()) / 1e9:.2f} GB in {len(files)} file(s); nothing written (--dry-run)")
    return "\n".join(lines)


def convert(argv: list[str] | None = None, start_method: str = "forkserver") -> dict:
    """Run one conversion; raises ConvertError/UsageError. Returns the saver's summary."""
    args = build_parser().parse_args(argv)
    plan = build_plan(args)
    use_hash(plan.hash_algorithm)
    if plan.save_lora_to_hf:
        from modellink_ckpt.savers import lora_hf

        if args.dry_run:
            print(f"plan: export the LoRA adapters of {plan.lora_dir or plan.load_dir} as a PEFT adapter to "
                  f"{plan.save_dir / 'mg2hf'}; nothing written (--dry-run)")
            return {"dry_run": True}
        result = lora_hf.save(plan)
        result["describe"] = str(plan.save_dir / "mg2hf")
        return result
    files = output_files(plan)
    target = registry.target(plan.target_format)
    count = 1 if distributed.launched() else workers.check_workers(args.workers, plan, target)
    if args.dry_run:
        shares = [p.share for p in target.share_plans(plan, count, "")] if count > 1 else None
        print(describe_plan(plan, files, shares))
        return {"dry_run": True}
    check_free_space(plan, files)
    load, save = registry.source(plan.load_type).load_function(), target.save_function()
    started = time.monotonic()
    # a scheduler's time limit or `kill` from here on: one line, and no target (the loaders' and
    # savers' own handler takes over while they run, stops them and raises the same)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        if distributed.launched():  # one share per torchrun rank
            result = distributed.run(plan, target, load, save)
        elif count == 1:
            result = pipeline.run(plan, load, save, start_method)
        else:
            staged, plans = target.shares(plan, count)
            try:
                result = target.publish(staged, pipeline.run_pairs(plans, load, save, start_method))
            except BaseException:
                staged.discard()
                raise
    except (ConvertError, KeyboardInterrupt) as exc:
        # what a killed saver could not remove, and what this process staged (a signal can land
        # between creating the workers' staging folder and taking charge of it)
        remove_stale_partials(plan.save_dir, quiet=True, own=True)
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C before the workers' target was published
            raise Interrupted() from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    result["wall_seconds"] = time.monotonic() - started
    result["describe"] = target.where(plan)
    if result.get("first_read"):
        result["first_byte_seconds"] = result["first_read"] - process_start_time()
    return result


def process_start_time() -> float:
    """This process's start, wall clock (Linux /proc, to ~10 ms): start-up is measured from here."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED  # no /proc: from when the converter was imported


_IMPORTED = time.time()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def verify_main(argv: list[str]) -> int:
    from modellink_ckpt.verify import verify

    parser = _Parser(prog="convert_ckpt.py --verify", description="Re-check a checkpoint against its "
                     "manifest (BLAKE3 or sha256 of every file) and its own args or config (every tensor and shape).")
    parser.add_argument("--verify", dest="path", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--no-hash", action="store_true", help="check sizes, not contents")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(["--verify" if a == "verify" else a for a in argv])
    problems, summary = verify(args.path, manifest_check=not args.no_hash)
    if problems:
        for problem in problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        more = f" ({len(problems) - 20} more not shown)" if len(problems) > 20 else ""
        print(f"error: {args.path}: {len(problems)} problem(s) found{more}", file=sys.stderr)
        return 1
    print(f"verified: {args.path}: {summary}")
    return 0


def inspect_main(argv: list[str]) -> int:
    """`convert_ckpt.py inspect PATH [--format NAME]`: what a checkpoint is, without converting it."""
    parser = _Parser(prog="convert_ckpt.py inspect", description="Describe a checkpoint of any registered "
                     "format: format, family, layout, layers, dtypes, parameter count, bytes per file.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--format", choices=sorted(registry.SOURCES), default=None,
                        help="the format (default: detected)")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # as every other command takes
    args = parser.parse_args(argv)
    name = args.format or registry.detect(args.path)
    facts = registry.source(name).inspect(args.path)
    width = max(map(len, facts))
    for key, value in facts.items():
        if isinstance(value, dict) and key in ("files", "dtypes"):
            total = sum(value.values())
            print(f"{key:<{width}}  {len(value)} ({_gb(total) if key == 'files' else f'{total:,} elements'})")
            for item, amount in value.items():
                shown = _gb(amount) if key == "files" else f"{amount:,}"
                print(f"{'':<{width}}    {item}: {shown}")
        else:
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) and not isinstance(value, bool)
                  else f"{key:<{width}}  {value}")
    return 0


def summary_line(result: dict) -> str:
    """The one line a finished conversion ends with."""
    seconds = result["wall_seconds"]
    if "workers" in result:  # several loader / saver pairs
        peaks = (result["peak_rss_loader"], result["peak_rss_saver"])
        memory = (f"{result['workers']} workers, peak memory per loader {_gb(peaks[0])} / saver {_gb(peaks[1])} "
                  f"(all processes {_gb(result['peak_rss_total'])})")
    elif "peak_rss_loader" in result:  # the loader and saver processes
        peaks = (result["peak_rss_loader"], result.get("peak_rss_saver", 0))
        memory = f"peak memory loader {_gb(peaks[0])} / saver {_gb(peaks[1])} (max {_gb(max(peaks))})"
    else:  # done in this process
        memory = f"peak memory {_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}"
    rank = f"rank {result['rank']}: " if "rank" in result else ""  # one line per torchrun rank
    first = f", first byte read {result['first_byte_seconds']:.2f} s after start" if "first_byte_seconds" in result else ""
    if result.get("kernel_copied"):
        first = f", {_gb(result['kernel_copied'])} copied in the kernel" + first
    return (f"{rank}done: wrote {_gb(result['bytes'])} in {result['files']} file(s) to {result['describe']} "
            f"in {seconds:.1f} s ({result['bytes'] / 1e9 / max(seconds, 1e-9):.2f} GB/s{first}), {memory}")


def _terminated(*_) -> None:
    raise Terminated()


def run_guarded(action) -> int:
    """Run `action()` (a result dict to summarise, or an exit code) with the error contract: one
    line on stderr and a non-zero exit, a traceback only with CONVERT_CKPT_DEBUG=1."""
    try:
        result = action()
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # outside a conversion's own handling: what it left is not known here
        print("error: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except Exception as exc:  # a bug of ours: still one line unless asked for the traceback
        if os.environ.get("CONVERT_CKPT_DEBUG"):
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc} (set CONVERT_CKPT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    if isinstance(result, int):
        return result
    if not result.get("dry_run"):
        print(summary_line(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        return run_guarded(lambda: inspect_main(argv[1:]))
    if argv[:1] == ["verify"] or "--verify" in argv:
        return run_guarded(lambda: verify_main(argv))  # hashing a large checkpoint takes a while: Ctrl-C
    return run_guarded(lambda: convert(argv, start_method="fork"))
