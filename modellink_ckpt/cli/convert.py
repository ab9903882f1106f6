"""The conversion command (`convert_ckpt.py --load-model-type ... --save-model-type ...`) and
its plan.

Everything that can be checked before a byte is written (flags, the source's config or stored
args, the target layout, the target folder) is checked here, in the parent process; errors are
one line and exit with code 2. The loader and saver then run as two processes (`pipeline`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from modellink_ckpt import distributed, pipeline, registry, workers
from modellink_ckpt.cli.arguments import build_parser, parse_size
from modellink_ckpt.errors import ConvertError, Interrupted, Terminated, UsageError
from modellink_ckpt.file_io import DEFAULT_HASH, use_hash
from modellink_ckpt.layout import ParallelLayout
from modellink_ckpt.megatron_args import DTYPE_FLAGS
from modellink_ckpt.mg_names import Spelling
from modellink_ckpt.model_cfg import (DEFAULT_FAMILY, ModelDims, ModelFamily, check_family_fits_config,
                                      check_family_fits_dims, check_family_fits_recorded, families_for_config,
                                      load_family)
from modellink_ckpt.staging import check_writable, missing_folders, remove_empty, remove_stale_partials


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


def check_family(args, family: ModelFamily, info: registry.SourceInfo) -> None:
    """An explicit --model-type-hf must convert the model the source describes (its config.json,
    the family a converted checkpoint records, a training run's args) and the HF config.json the
    output is written with: otherwise a different model is written, tensor for tensor."""
    if not args.model_type_hf or args.skip_family_check:
        return
    configs = [info.config_path] + [folder / "config.json" for folder in (
        args.hf_cfg_dir, args.save_dir if args.save_model_type == "hf" else None) if folder is not None]
    for path in dict.fromkeys(p for p in configs if p is not None and p.is_file()):
        check_family_fits_config(family, _read_json(path), str(path))
    if info.recorded_family is not None:
        check_family_fits_recorded(family, *info.recorded_family)
    check_family_fits_dims(family, info.dims, str(args.load_dir), info.recorded_computes)


def build_plan(args) -> Plan:
    _unsupported(args)
    family = resolve_family(args)
    info = registry.source(args.load_model_type).describe(source_request(args, family))
    check_family(args, family, info)
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
        quiet=args.quiet, hash_algorithm=args.hash or DEFAULT_HASH, source_tokenizer=info.tokenizer, source_dtype=info.dtype,
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
    check_writable(plan.save_dir)
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
    count, note = (1, None) if distributed.launched() else workers.check_workers(args.workers, plan, target)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    if args.dry_run:
        shares = [p.share for p in target.share_plans(plan, count, "")] if count > 1 else None
        print(describe_plan(plan, files, shares))
        return {"dry_run": True}
    check_free_space(plan, files)
    created = missing_folders(plan.save_dir)  # a failed run leaves no empty folder of its own behind
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
        remove_empty(created)
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


def _terminated(*_) -> None:
    raise Terminated()


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


