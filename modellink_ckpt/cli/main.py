"""`convert_ckpt.py`'s commands: a conversion (`--load-model-type ... --save-model-type ...`),
`inspect PATH` and `verify PATH` (also MindSpeed-style `--verify PATH`), and the error contract
they share: one line on stderr and a non-zero exit, never a traceback.

Light to import: each command imports what it needs when it runs, so `--help` and `--version`
answer without loading torch.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

from modellink_ckpt import registry
from modellink_ckpt.cli.arguments import Parser, build_parser
from modellink_ckpt.cli.entry import load_torch
from modellink_ckpt.errors import ConvertError, Interrupted, missing_package


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def verify_main(argv: list[str]) -> int:
    """`convert_ckpt.py verify PATH` (or MindSpeed-style `--verify PATH`)."""
    parser = Parser(prog="convert_ckpt.py verify", description="Re-check a checkpoint against its manifest (BLAKE3 "
                     "or sha256 of every file) and its own args or config.json (every tensor, shape and dtype). A "
                     "folder this tool did not write (a training run's, transformers') has its structure checked.")
    parser.add_argument("path", type=Path, help="checkpoint folder (also as --verify PATH)")
    parser.add_argument("--no-hash", action="store_true", help="check sizes, not contents")
    parser.add_argument("--model-type-hf", default=None,
                        help="check it as this model_cfg.json entry (default: the one it records, or, for an HF "
                             "folder, the one its config.json and tensors fit)")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    # MindSpeed-style `--verify PATH` is the same command: the folder is its one positional argument
    argv = [a.partition("=")[2] if a.startswith("--verify=") else a for a in
            (argv[1:] if argv[:1] == ["verify"] else argv) if a != "--verify"]
    args = parser.parse_args(argv)
    from modellink_ckpt.verify import verify  # a command loads what it needs as it runs: --help stays light

    problems, summary, checked = verify(args.path, manifest_check=not args.no_hash, family=args.model_type_hf)
    if problems:
        for problem in problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        more = f" ({len(problems) - 20} more not shown)" if len(problems) > 20 else ""
        print(f"error: {checked}: {len(problems)} problem(s) found{more}", file=sys.stderr)
        return 1
    print(f"verified: {checked}: {summary}")
    return 0


def inspect_main(argv: list[str]) -> int:
    """`convert_ckpt.py inspect PATH [--format NAME] [--explain TENSOR ...]`: what a checkpoint is,
    or where one of its tensors goes in a conversion, without converting it."""
    parser = Parser(prog="convert_ckpt.py inspect", description="Describe a checkpoint of any registered "
                     "format: format, family, layout, layers, dtypes, parameter count, bytes per file. With "
                     "--explain TENSOR and a conversion's flags (--save-model-type, default mg, the target "
                     "layout, --model-type-hf, ...): where that tensor goes, file by file, with the rows and "
                     "columns each piece holds, traced through the conversion's own rules.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--format", choices=sorted(registry.SOURCES), default=None,
                        help="the format (default: detected)")
    parser.add_argument("--explain", metavar="TENSOR", default=None,
                        help="an HF tensor name of the model, e.g. model.layers.7.self_attn.q_proj.weight")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # as every other command takes
    args, rest = parser.parse_known_args(argv)
    if rest and args.explain is None:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (conversion flags go with --explain)")
    name = args.format or registry.detect(args.path)
    if args.explain is not None:
        from modellink_ckpt.cli.convert import explain_main

        return explain_main(args.path, name, args.explain, rest)
    facts = registry.source(name).inspect(args.path)
    width = max(map(len, facts))
    lines = []
    for key, value in facts.items():
        if isinstance(value, dict) and key in ("files", "dtypes"):
            total = sum(value.values())
            lines.append(f"{key:<{width}}  {len(value)} ({_gb(total) if key == 'files' else f'{total:,} elements'})")
            for item, amount in value.items():
                shown = _gb(amount) if key == "files" else f"{amount:,}"
                lines.append(f"{'':<{width}}    {item}: {shown}")
        else:
            lines.append(f"{key:<{width}}  {value:,}" if isinstance(value, int) and not isinstance(value, bool)
                         else f"{key:<{width}}  {value}")
    return _emit(lines)


def _emit(lines: list[str]) -> int:
    """Print a command's report; a reader that closed the pipe (`| head`) has what it wanted."""
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches it
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
    left_out = f"; left out: {', '.join(result['left_out'])}" if result.get("left_out") else ""
    return (f"{rank}done: wrote {_gb(result['bytes'])} in {result['files']} file(s) to {result['describe']} "
            f"in {seconds:.1f} s ({result['bytes'] / 1e9 / max(seconds, 1e-9):.2f} GB/s{first}), {memory}{left_out}")


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
        missing = missing_package(exc) if isinstance(exc, ModuleNotFoundError) else None
        if missing:  # a command imports its packages as it runs
            print(f"error: {missing}", file=sys.stderr)
            return 1
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


def convert_main(argv: list[str]) -> dict:
    from modellink_ckpt.cli.convert import convert

    return convert(argv, start_method="fork")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        command, args = inspect_main, argv[1:]
    elif argv[:1] == ["verify"] or any(a == "--verify" or a.startswith("--verify=") for a in argv):
        command, args = verify_main, argv  # hashing a large checkpoint takes a while: Ctrl-C is one line too
    else:
        command, args = convert_main, argv
        if {"-h", "--help", "--version"} & set(argv):  # answered before torch loads
            build_parser().parse_args(argv)
    if {"-h", "--help"} & set(args):
        return run_guarded(lambda: command(args))

    def run():
        load_torch()  # a Ctrl-C while it imports ends like one later on
        return command(args)

    return run_guarded(run)
