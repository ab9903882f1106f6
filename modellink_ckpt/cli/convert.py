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

from modellink_ckpt import registry
from modellink_ckpt.cli.arguments import build_parser
from modellink_ckpt.engine import distributed, pipeline, workers
from modellink_ckpt.engine.staging import check_writable, missing_folders, remove_empty, remove_stale_partials
from modellink_ckpt.errors import ConvertError, Interrupted, Terminated, UsageError
from modellink_ckpt.explain import explain
from modellink_ckpt.formats.file_io import DEFAULT_HASH, use_hash
from modellink_ckpt.formats.megatron.args import DTYPE_FLAGS
from modellink_ckpt.model import mapping
from modellink_ckpt.model.families import (DEFAULT_FAMILY, ModelFamily, check_family_fits_config,
                                           check_family_fits_dims, check_family_fits_recorded, families_for_config,
                                           load_family)
from modellink_ckpt.plan import Plan, RunSettings

# Options every conversion takes, whatever its formats (the rest each source and target format
# declares in its `flags`). The target layout's sizes are among them: MindSpeed-LLM's scripts pass
# them in every direction, and they mean nothing besides to a Megatron target.
COMMON_FLAGS = frozenset({
    "model_type", "load_model_type", "save_model_type", "model_type_hf", "skip_family_check", "model_cfg",
    "load_dir", "save_dir", "target_tensor_parallel_size", "target_pipeline_parallel_size",
    "target_expert_parallel_size", "use_mcore_models", "params_dtype", "add_qkv_bias", "add_dense_bias",
    "mtp_num_layers", "hf_cfg_dir", "max_queue_size", "max_queue_gb", "workers", "hash", "no_kernel_copy",
    "overwrite", "quiet", "dry_run", "spec", "load_checkpoint_loosely",
})


# common options every target's spec is given (a Megatron target's layout; where an HF config.json is)
TARGET_OPTIONS = frozenset({"target_tensor_parallel_size", "target_pipeline_parallel_size",
                            "target_expert_parallel_size", "hf_cfg_dir"})


def target_name(args) -> str:
    """The registry's target: --save-model-type, refined by --ckpt-format and --save-lora-to-hf."""
    if args.save_lora_to_hf:
        if args.moe_grouped_gemm:  # before the target is known: either flag would be the one refused
            raise UsageError("--save-lora-to-hf and --moe-grouped-gemm are exclusive (the adapter is per expert)")
        if args.save_model_type != "hf":
            raise UsageError("--save-lora-to-hf writes a PEFT adapter: use it with --save-model-type hf")
        return "peft"
    if args.save_model_type == "mg" and args.ckpt_format == "torch_dist":
        return "torch_dist"
    return args.save_model_type


def check_flags(args, source: registry.SourceFormat, target: registry.TargetFormat) -> None:
    """One rule for every flag: a flag given (not at its default) must be taken by the chosen
    source or target, or by every conversion; else it is refused, naming the formats that take it."""
    parser = build_parser()
    given = sorted(dest for dest, value in vars(args).items() if value != parser.get_default(dest))
    for dest in given:
        if dest in COMMON_FLAGS or dest in source.flags or dest in target.flags:
            continue
        option = next(a.option_strings[0] for a in parser._actions if a.dest == dest)
        takers = [f"--load-model-type {name}" for name in registry.SOURCES if dest in registry.source(name).flags]
        takers += [f"--save-model-type {registry.target(name).selected_by}" for name in registry.TARGETS
                   if dest in registry.target(name).flags]
        raise UsageError(f"{option}: not taken by --load-model-type {args.load_model_type} --save-model-type "
                         f"{target.selected_by} (it is for {', '.join(dict.fromkeys(takers))})")


def _options(args, declared: frozenset) -> dict:
    """{dest: value} of the flags a format declares (its part of the command line)."""
    return {dest: getattr(args, dest) for dest in declared}


def source_request(args, family, target: str) -> registry.SourceRequest:
    """The source's part of the command line."""
    source = registry.source(args.load_model_type)
    return registry.SourceRequest(
        path=args.load_dir, family=family, options=_options(args, source.flags),
        overrides={"add_qkv_bias": args.add_qkv_bias, "add_dense_bias": args.add_dense_bias,
                   "mtp_num_layers": args.mtp_num_layers},
        config_dirs=tuple(d for d in (args.hf_cfg_dir, args.save_dir) if d is not None),
        target=target, quiet=args.quiet)


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


def computed_tensors(plan: Plan) -> frozenset:
    """The message tensors (layer-relative names) the target transforms in memory (its
    `computes_on`), for the loader: what the saver would only copy may stay in its file."""
    computes = registry.target(plan.target.format).computes_on(plan)
    return frozenset(rule.mcore for kind, layer, _ in mapping.model_messages(plan.family, plan.dims, torch.float32)
                     for rule in mapping.message_rules(kind, plan.family, plan.dims, layer) if computes(rule))


def build_plan(args, writes: bool = True) -> Plan:
    """The plan of the conversion `args` asks for; `writes` False: one that is only looked at
    (`inspect --explain`), its target folder neither probed nor checked."""
    if args.load_model_type == "hf" and args.save_model_type == "hf":
        raise UsageError("--load-model-type hf --save-model-type hf: nothing to convert")
    source_format, name = registry.source(args.load_model_type), target_name(args)
    target_format = registry.target(name)
    check_flags(args, source_format, target_format)
    family = resolve_family(args)
    info = source_format.describe(source_request(args, family, name))
    info = dataclasses.replace(info, format=args.load_model_type, path=args.load_dir)
    check_family(args, family, info)
    if "hf" in (args.load_model_type, args.save_model_type):
        mapping.require_hf_names(family, info.dims)
    if writes:
        check_writable(args.save_dir)
    # from optim the weights are the fp32 master weights, each written in its model weight's dtype
    params_dtype = DTYPE_FLAGS[args.params_dtype] if args.params_dtype else None
    target = target_format.spec(_options(args, target_format.flags | TARGET_OPTIONS), args.save_dir, params_dtype,
                                family, info)
    run = RunSettings(max_queue_size=args.max_queue_size, max_queue_gb=args.max_queue_gb, overwrite=args.overwrite,
                      quiet=args.quiet, hash_algorithm=args.hash or DEFAULT_HASH)
    plan = Plan(family=family, source=info, target=target, run=run)
    source_format.check(plan)
    if writes:
        target_format.check(plan)
    if target_format.streams:
        plan = dataclasses.replace(
            plan, target=dataclasses.replace(target, computed=computed_tensors(plan)),
            run=dataclasses.replace(run, kernel_copy=target_format.copies_in_kernel(plan) and not args.no_kernel_copy))
    return plan


def output_files(plan: Plan) -> dict[str, int]:
    """{file relative to the target: bytes of tensor data} that the conversion will write."""
    return registry.target(plan.target.format).files(plan)


def check_free_space(plan: Plan, files: dict[str, int]) -> None:
    # optimizer state passes through a scratch file per rank (a stage's ranks at once) before its
    # distrib_optim.pt is written
    scratch = 0
    if plan.source.format == "optim" and getattr(plan.target, "layout", None) is not None:
        layout = plan.target.layout
        scratch = max(sum(files.get(f"{layout.rank_dir(*rank)}/distrib_optim.pt", 0)
                          for rank in layout.ranks() if rank[1] == pp_rank) for pp_rank in range(layout.pp))
    needed = sum(files.values()) + scratch + (64 << 20)
    folder = plan.target.path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UsageError(f"--save-dir {plan.target.path}: needs {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB free "
                         f"on that filesystem")


def describe_plan(plan: Plan, files: dict[str, int], shares: list | None = None) -> str:
    """The `--dry-run` report (`shares`: each worker's `workers.Share`, with --workers)."""
    dims, target = plan.dims, registry.target(plan.target.format)
    lines = [f"plan: {plan.source.format} {plan.source.path} -> {target.selected_by.split()[0]} {target.where(plan)}",
             f"model: --model-type-hf {plan.family.name}, {dims.num_layers} layers, hidden {dims.hidden_size}, "
             f"heads {dims.num_attention_heads}/{dims.num_query_groups}, vocab {dims.vocab_size}"
             + (f" padded to {plan.target.padded_vocab}" if plan.target.padded_vocab else "")
             + f", dtype {str(plan.target.params_dtype or plan.source.dtype).replace('torch.', '')}"
             + (" (cast)" if plan.target.params_dtype else "")]
    if getattr(plan.target, "layout", None) is not None:
        layout = plan.target.layout
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
    use_hash(plan.run.hash_algorithm)
    target = registry.target(plan.target.format)
    if not target.streams:  # written here, in one process
        if args.dry_run:
            print(f"plan: {target.description} from {plan.source.lora_dir or plan.source.path} to "
                  f"{target.where(plan)}; nothing written (--dry-run)")
            return {"dry_run": True}
        result = target.write(plan)
        result["describe"] = target.where(plan)
        return result
    files = output_files(plan)
    count, note = (1, None) if distributed.launched() else workers.check_workers(args.workers, plan, target)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    if args.dry_run:
        shares = [p.share for p in target.share_plans(plan, count, "")] if count > 1 else None
        print(describe_plan(plan, files, shares))
        return {"dry_run": True}
    check_free_space(plan, files)
    created = missing_folders(plan.target.path)  # a failed run leaves no empty folder of its own behind
    load, save = registry.source(plan.source.format).load_function(), target.save_function()
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
        remove_stale_partials(plan.target.path, quiet=True, own=True)
        remove_empty(created)
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C before the workers' target was published
            raise Interrupted() from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    result["wall_seconds"] = time.monotonic() - started
    result["describe"] = target.where(plan)
    result["left_out"] = plan.source.left_out
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


def explain_main(path: Path, source: str, name: str, argv: list[str]) -> int:
    """`inspect PATH --explain TENSOR [conversion flags]`: where TENSOR of the checkpoint goes."""
    argv = ["--load-model-type", source, "--load-dir", str(path), "--quiet", *argv]
    if "--save-model-type" not in argv:
        argv += ["--save-model-type", "mg"]
    if "--save-dir" not in argv:
        argv += ["--save-dir", "<save-dir>"]
    plan = build_plan(build_parser().parse_args(argv), writes=False)
    print("\n".join(explain(plan, name)))
    return 0
