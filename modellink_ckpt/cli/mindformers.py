"""MindFormers users' own command lines, running this converter:

    python convert_weight.py --model llama|qwen|mixtral|glm-n|deepseek|qwen3|qwen3_moe [--reversed] --input_path IN
                             --output_path OUT
                             [--dtype fp16|bf16|fp32] [--config HF_CONFIG]
    python transform_checkpoint.py --src_checkpoint SRC [--src_strategy S] --dst_checkpoint_dir DST
                                   [--dst_strategy D] [--prefix checkpoint_] [--world_size N]

`convert_weight.py` converts between an HF folder and one complete MindSpore checkpoint file in the
names MindFormers' own `convert_weight.py` uses for that model (legacy for llama, qwen, mixtral and
glm-n -- GLM-4-9B in the ChatGLM format, with MindFormers' default qkv_concat / mlp_concat --; mcore
for deepseek, as MindFormers 2.x has it). `--reversed` writes HF again: an HF folder, or, for
an output path ending in `.bin` / `.pt` / `.pth`, one torch state-dict file as MindFormers writes.
A MindSpore checkpoint records no model sizes: the reversed direction reads the HF `config.json`
next to the checkpoint (our output writes one) or `--config`.

    python transform_ckpt_lora.py --src_ckpt_path_or_dir SRC --dst_ckpt_dir DST [--src_ckpt_strategy S]
                                  [--dst_ckpt_strategy D] [--prefix checkpoint_] [--lora_scaling 1]
                                  [--save_format ckpt|safetensors]

`transform_checkpoint.py` re-shards between strategies tensor by tensor (`engine/reshard.py`);
`transform_ckpt_lora.py` does the same with each weight's LoRA adapters merged into it.

    python unified_safetensors.py --mindspore_ckpt_dir DIR --src_strategy_dirs S --output_dir OUT
                                  [--file_suffix 1_1] [--has_redundancy True|False] [--filter_out_param_prefix adam_]

`unified_safetensors.py` merges a distributed safetensors checkpoint into `mindspore.unified_safetensors`'s parts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from modellink_ckpt.cli.arguments import Parser
from modellink_ckpt.cli.convert import convert
from modellink_ckpt.cli.main import run_guarded
from modellink_ckpt.engine.reshard import reshard, unify
from modellink_ckpt.engine.staging import check_writable
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.mindspore.lora import MsLora
from modellink_ckpt.formats.safetensors_io import SafetensorsFile
from modellink_ckpt.formats.torch_zip import StreamingTorchWriter
from modellink_ckpt.model.families import load_family

# MindFormers' --model value -> (model_cfg.json family, MindSpore naming); qwen3 / qwen3_moe in the
# mcore names MindFormers 2.x's Qwen3 models load (its training model checks them in the slow tier)
MODELS = {"llama": ("llama2", "legacy"), "qwen": ("qwen25", "legacy"), "mixtral": ("mixtral", "legacy"),
          "glm-n": ("chatglm3", "legacy"), "deepseek": ("deepseek3", "mcore"), "qwen3": ("qwen3", "mcore"),
          "qwen3_moe": ("qwen3-moe", "mcore")}
# --model values MindFormers' convert_weight.py has whose layout no consumer here pins down
NOT_CONVERTED = {"telechat": "TeleChat's weight layout (its fused query/key_value, per-version --telechat_type) is "
                             "not pinned down by a MindFormers model that runs here"}
DTYPES = {"fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def _staging(path: Path) -> Path:
    return path.parent / f".{path.name}.convert-{os.getpid()}"


@contextlib.contextmanager
def their_words(flags: dict[str, str], paths: dict[Path, Path]):
    """Errors in the words of the command line the user typed: its flag names for ours
    (`--load-dir` is `--input_path` there) and the user's paths for the staging ones we write to."""
    try:
        yield
    except ConvertError as exc:
        message = str(exc)
        for ours, theirs in sorted(paths.items(), key=lambda item: -len(str(item[0]))):
            message = message.replace(str(ours), str(theirs))
        for ours, theirs in flags.items():
            message = re.sub(rf"(?<![\w-]){re.escape(ours)}(?![\w-])", theirs, message)
        exc.args = (message,)
        raise


# convert_weight.py's flag for each of ours that an error may name
CONVERT_WEIGHT_FLAGS = {"--load-dir": "--input_path", "--save-dir": "--output_path", "--hf-cfg-dir": "--config",
                        "--params-dtype": "--dtype"}
# transform_checkpoint.py's
TRANSFORM_CHECKPOINT_FLAGS = {"--load-dir": "--src_checkpoint", "--save-dir": "--dst_checkpoint_dir",
                              "--src-strategy": "--src_strategy", "--dst-strategy": "--dst_strategy",
                              "--ms-prefix": "--prefix", "--file-suffix": "--file_suffix"}


def _config_of(args) -> tuple[dict, Path] | None:
    """The HF config.json describing the model: the input folder's, or for --reversed --config's or
    the one beside the checkpoint."""
    if not args.reversed:
        candidates = [args.input_path / "config.json"]
    else:
        given = args.config
        candidates = [given if given and given.is_file() else given / "config.json" if given else None,
                      (args.input_path if args.input_path.is_dir() else args.input_path.parent) / "config.json"]
    for path in candidates:
        if path is not None and path.is_file():
            try:
                return json.loads(path.read_text()), path
            except ValueError as exc:
                raise ConvertError(f"{path}: not valid JSON ({exc})") from None
    return None


def _check_model(args) -> None:
    """--model must name the model the config.json describes (a MindSpore file records no sizes)."""
    found = _config_of(args)
    if found is None:
        if args.reversed:
            raise UsageError(f"--input_path {args.input_path}: a MindSpore checkpoint holds no model sizes; pass "
                             f"--config with the model's HF config.json (or put it next to the checkpoint)")
        return  # the input folder's own error follows
    config, path = found
    if not load_family(MODELS[args.model][0]).fits_config(config):
        fitting = [model for model, (family, _) in MODELS.items() if load_family(family).fits_config(config)]
        raise UsageError(f"--model {args.model}: {path} describes model_type {config.get('model_type')!r}; "
                         + (f"use --model {' or '.join(fitting)}" if fitting else
                            f"no --model of this command converts it ({', '.join(MODELS)})"))


def convert_weight(argv: list[str] | None = None) -> dict:
    p = Parser(prog="convert_weight.py", description="MindFormers' convert_weight.py command line: HF <-> "
                "MindSpore Transformers weights, run by this converter")
    p.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}")
    p.add_argument("--reversed", action="store_true", help="MindSpore -> HF")
    p.add_argument("--input_path", required=True, type=Path)
    p.add_argument("--output_path", required=True, type=Path)
    p.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: keep the source's)")
    p.add_argument("--config", type=Path, default=None, help="the HF config.json (or its folder), for --reversed")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    for ignored in ("--n_head", "--hidden_size", "--layers", "--is_pretrain", "--telechat_type"):
        p.add_argument(ignored, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model in NOT_CONVERTED:
        raise UsageError(f"--model {args.model}: not converted: {NOT_CONVERTED[args.model]} "
                         f"(supported here: {', '.join(MODELS)})")
    if args.model not in MODELS:
        raise UsageError(f"--model {args.model}: supported here: {', '.join(MODELS)}")
    if args.dtype is not None and args.dtype.lower() not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: expected fp16, bf16 or fp32")
    family, naming = MODELS[args.model]
    out = args.output_path
    if out.exists() and not args.overwrite:
        raise UsageError(f"--output_path {out}: already exists; pass --overwrite to replace it")
    _check_model(args)
    common = ["--model-type-hf", family, "--ms-naming", naming, "--load-dir", str(args.input_path)]
    common += ["--params-dtype", DTYPES[args.dtype.lower()]] if args.dtype else []
    common += ["--quiet"] if args.quiet else []
    stage = _staging(out)
    shutil.rmtree(stage, ignore_errors=True)
    staged_paths = {stage / "mg2hf": out, stage / "model.ckpt": out, stage / "model.safetensors": out, stage: out}
    try:
        with their_words({f"--model-type-hf {family}": f"--model {args.model}", **CONVERT_WEIGHT_FLAGS}, staged_paths):
            if not args.reversed:  # HF folder -> one MindSpore file
                fmt = "safetensors" if out.suffix == ".safetensors" else "ckpt"
                result = convert(["--load-model-type", "hf", "--save-model-type", "ms", "--ms-format", fmt,
                                  "--save-dir", str(stage), *common], start_method="fork")
                (stage / f"model.{fmt}").replace(out)
            else:
                config = args.config.parent if args.config and args.config.is_file() else args.config
                extra = ["--hf-cfg-dir", str(config)] if config else []
                result = convert(["--load-model-type", "ms", "--save-model-type", "hf", "--save-dir", str(stage),
                                  *extra, *common], start_method="fork")
                folder = stage / "mg2hf"
                if out.suffix in TORCH_SUFFIXES:
                    _safetensors_to_torch(folder, out)
                else:
                    if out.exists():
                        shutil.rmtree(out)
                    folder.replace(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    result["describe"] = str(out)
    return result


def _safetensors_to_torch(folder: Path, out: Path) -> None:
    """The HF output as one `torch.save` state dict (what MindFormers' reversed conversion writes),
    tensor by tensor; written beside `out` and renamed into place."""
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    writer = StreamingTorchWriter(partial)
    try:
        refs = {}
        for path in sorted(folder.glob("*.safetensors")):
            opened = SafetensorsFile(path)
            for name in opened.keys():
                shape, dtype = opened.shape_dtype(name)
                tensor = torch.empty(shape, dtype=dtype)
                opened.read_rows(name, 0, shape[0] if shape else 1, tensor.view(shape) if shape else tensor)
                refs[name] = writer.add_tensor(tensor)
        writer.close(refs)
        partial.replace(out)
    except BaseException:
        writer.abort()
        raise


def transform_checkpoint(argv: list[str] | None = None) -> dict:
    p = Parser(prog="transform_checkpoint.py", description="MindFormers' transform_checkpoint.py command line: "
                "split, merge or re-shard MindSpore checkpoints between strategies, run by this converter")
    p.add_argument("--src_checkpoint", required=True, type=Path,
                   help="a complete checkpoint file, or a folder of rank_<r>/ folders")
    p.add_argument("--dst_checkpoint_dir", "--dst_checkpoint", dest="dst", required=True, type=Path)
    p.add_argument("--src_strategy", type=Path, default=None)
    p.add_argument("--dst_strategy", type=Path, default=None)
    p.add_argument("--prefix", default="checkpoint_")
    p.add_argument("--world_size", type=int, default=None)
    p.add_argument("--rank_id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--transform_process_num", "--process_num", dest="process_num", type=int, default=1,
                   help="accepted; all ranks are written in one pass")
    p.add_argument("--transform_by_rank", default=None, help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--file_suffix", default=None,
                   help="the step to read where a rank folder holds one file per saved step (e.g. 2_2)")
    args = p.parse_args(argv)
    if args.src_strategy is not None and str(args.src_strategy) == "None":  # transform_checkpoint.sh passes None
        args.src_strategy = None
    if args.dst_strategy is not None and str(args.dst_strategy) == "None":
        args.dst_strategy = None
    with their_words(TRANSFORM_CHECKPOINT_FLAGS, {}):
        check_writable(args.dst, "--dst_checkpoint_dir")
        return reshard(args.src_checkpoint, args.dst, src_strategy=args.src_strategy,
                       dst_strategy=args.dst_strategy, prefix=args.prefix, world_size=args.world_size,
                       overwrite=args.overwrite, quiet=args.quiet, file_suffix=args.file_suffix)


# transform_ckpt_lora.py's
TRANSFORM_CKPT_LORA_FLAGS = {"--load-dir": "--src_ckpt_path_or_dir", "--save-dir": "--dst_ckpt_dir",
                             "--src-strategy": "--src_ckpt_strategy", "--dst-strategy": "--dst_ckpt_strategy",
                             "--dst_strategy": "--dst_ckpt_strategy", "--ms-prefix": "--prefix",
                             "--lora-scaling": "--lora_scaling", "--file-suffix": "--file_suffix"}
MERGED_LORA = "merged_lora"  # the complete output's file name, as MindFormers' tool writes it


def transform_ckpt_lora(argv: list[str] | None = None) -> dict:
    """MindFormers' `tools/transform_ckpt_lora.py`: LoRA adapters merged into their weights
    (W + B·A·scaling; here in fp32, cast back), from one checkpoint file or a distributed folder
    (`--src_ckpt_strategy`); complete as `<dst>/merged_lora.<format>`, or with
    `--dst_ckpt_strategy` one merged file per rank (`rank_<r>/<prefix><r>.<format>`), where
    MindFormers' own tool re-shards first and then merges rank 0's file only."""
    p = Parser(prog="transform_ckpt_lora.py", description="MindFormers' transform_ckpt_lora.py command line: "
                "merge LoRA adapters into a MindSpore checkpoint, run by this converter")
    p.add_argument("--src_ckpt_strategy", default="", help="strategy of a distributed source (file or folder)")
    p.add_argument("--dst_ckpt_strategy", default="", help="write one merged file per rank of this strategy")
    p.add_argument("--src_ckpt_path_or_dir", required=True, type=Path,
                   help="a checkpoint file, or a folder of rank_<r>/ folders")
    p.add_argument("--dst_ckpt_dir", required=True, type=Path, help="where the merged checkpoint goes")
    p.add_argument("--prefix", default="checkpoint_", help="file name prefix of distributed output")
    p.add_argument("--lora_scaling", default=1.0, type=float, help="lora_alpha / lora_rank (default 1)")
    p.add_argument("--save_format", default="ckpt", choices=["ckpt", "safetensors"])
    p.add_argument("--file_suffix", default=None,
                   help="the step to read where a rank folder holds one file per saved step (e.g. 2_2)")
    p.add_argument("--overwrite", action="store_true", help="replace a --dst_ckpt_dir that holds files")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    src_strategy = Path(args.src_ckpt_strategy) if args.src_ckpt_strategy not in ("", "None") else None
    dst_strategy = Path(args.dst_ckpt_strategy) if args.dst_ckpt_strategy not in ("", "None") else None
    with their_words(TRANSFORM_CKPT_LORA_FLAGS, {}):
        check_writable(args.dst_ckpt_dir, "--dst_ckpt_dir")
        return reshard(args.src_ckpt_path_or_dir, args.dst_ckpt_dir, src_strategy=src_strategy,
                       dst_strategy=dst_strategy, prefix=args.prefix, fmt=args.save_format,
                       overwrite=args.overwrite or _empty_folder(args.dst_ckpt_dir), quiet=args.quiet,
                       file_suffix=args.file_suffix, lora=MsLora.from_flags(args.lora_scaling, None, None),
                       file_name=None if dst_strategy else f"{MERGED_LORA}.{args.save_format}")


UNIFIED_SAFETENSORS_FLAGS = {"--load-dir": "--mindspore_ckpt_dir", "--src-strategy": "--src_strategy_dirs",
                             "--file-suffix": "--file_suffix"}


def unified_safetensors(argv: list[str] | None = None) -> dict:
    """MindFormers' `toolkit/safetensors/unified_safetensors.py`: the rank files of a distributed
    safetensors checkpoint (`rank_<r>/*<file_suffix>.safetensors`) merged into complete parts in
    `<output_dir>/<file_suffix>_ckpt_convert/unified_safe/`, as its script leaves them."""
    p = Parser(prog="unified_safetensors.py", description="MindFormers' unified_safetensors.py command line: merge "
                "a distributed MindSpore safetensors checkpoint into complete parts, run by this converter")
    p.add_argument("--mindspore_ckpt_dir", required=True, type=Path, help="the folder of rank_<r>/ folders")
    p.add_argument("--src_strategy_dirs", required=True, type=Path,
                   help="the strategy: a file, or the folder of ckpt_strategy_rank_*.ckpt (merged for pipelines)")
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--file_suffix", default="1_1", help="the step's file name ending (default 1_1)")
    p.add_argument("--format", default="safetensors", choices=["safetensors"])
    p.add_argument("--has_redundancy", default="True", choices=["True", "False", "true", "false"],
                   help="False for a redundancy-free source; each slice is read from the rank that kept it either way")
    p.add_argument("--filter_out_param_prefix", default=None, help="leave out tensors whose names start so (adam_)")
    p.add_argument("--max_process_num", default=64, type=int, help="accepted; the parts are written in one process")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    with their_words(UNIFIED_SAFETENSORS_FLAGS, {}):
        return unify(args.mindspore_ckpt_dir, args.output_dir / f"{args.file_suffix}_ckpt_convert",
                     strategy=args.src_strategy_dirs, file_suffix=args.file_suffix,
                     drop_prefix=args.filter_out_param_prefix, quiet=args.quiet)


def unified_safetensors_main() -> int:
    return run_guarded(lambda: unified_safetensors(sys.argv[1:]))


def _empty_folder(path: Path) -> bool:
    """MindFormers' tools write into a folder the user made first: an empty one is theirs to fill."""
    return path.is_dir() and not any(path.iterdir())


def transform_ckpt_lora_main() -> int:
    return run_guarded(lambda: transform_ckpt_lora(sys.argv[1:]))


def convert_weight_main() -> int:
    return run_guarded(lambda: convert_weight(sys.argv[1:]))


def transform_checkpoint_main() -> int:
    return run_guarded(lambda: transform_checkpoint(sys.argv[1:]))
