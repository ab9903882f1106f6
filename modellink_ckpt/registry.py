"""One table of checkpoint formats, each a source (read) and/or a target (write) behind one small
interface; `--load-model-type` / `--save-model-type` pick them by name, `inspect` by detection.

A source describes itself before anything is converted (`describe`: the model's sizes, dtype,
layout; in the parent process, so every error is found before a byte is written) and streams its
messages in the loader process (`load(plan, sender)`). A target checks and plans its files
(`check`, `files`) and writes them in the saver process (`save(plan, receiver)`). Adding a format
is one module with a source and/or target and one line here. Modules are imported only when their
format is used.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from modellink_ckpt.errors import UsageError

if TYPE_CHECKING:  # annotations only: the registry stays light (no torch) for --help
    import torch

SOURCES = {
    "hf": "modellink_ckpt.loaders.hf:SOURCE",
    "mg": "modellink_ckpt.loaders.mg:SOURCE",
    "optim": "modellink_ckpt.loaders.optim:SOURCE",
    "ms": "modellink_ckpt.loaders.ms:SOURCE",
}
TARGETS = {
    "hf": "modellink_ckpt.savers.hf:TARGET",
    "mg": "modellink_ckpt.savers.mg:TARGET",
    "torch_dist": "modellink_ckpt.savers.torch_dist:TARGET",  # --save-model-type mg --ckpt-format torch_dist
    "ms": "modellink_ckpt.savers.ms:TARGET",
    "peft": "modellink_ckpt.savers.peft:TARGET",  # --save-model-type hf --save-lora-to-hf
}
SAVE_MODEL_TYPES = ("hf", "mg", "ms")  # --save-model-type; torch_dist and peft are chosen by a flag besides
DETECTION_ORDER = ("optim", "mg", "ms", "hf")  # the first source whose `detect` accepts a path


@dataclasses.dataclass(frozen=True)
class SourceRequest:
    """What the command line asks of a source (the argparse namespace stops in the CLI)."""

    path: Path                                      # --load-dir
    family: object                                  # families.ModelFamily
    options: dict                                   # the flags the source declares: {argparse dest: value}
    overrides: dict                                 # model settings from flags (qkv bias, MTP layers, ...)
    config_dirs: tuple[Path, ...] = ()              # where an HF config.json may be found (vocabulary, sizes)
    target: str = ""                                # the target's registry name
    quiet: bool = False


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What a source says about itself (the source half of the plan)."""

    dims: object                                    # families.ModelDims
    dtype: torch.dtype
    format: str = ""                                # its registry name (set by the caller of describe)
    path: Path | None = None                        # --load-dir
    layout: object | None = None                    # layout.ParallelLayout of a Megatron source
    tokenizer: Path | None = None                   # a tokenizer file the source records
    padded_vocab: int | None = None
    divisible_by: int | None = None                 # its vocabulary padding rule
    lora: object | None = None                      # lora.LoraSpec to merge or export
    lora_dir: Path | None = None
    args: object | None = None                      # a Megatron source's stored args (its saver carries them over)
    iteration: int | str | None = None              # a Megatron source's iteration
    options: dict = dataclasses.field(default_factory=dict)  # format-specific facts for the loader
    # what the source says of the model it holds, to hold an explicit --model-type-hf against
    config_path: Path | None = None                 # the HF config.json it is described by
    recorded_family: tuple[str, str] | None = None  # (model_cfg.json entry, where) a converted checkpoint records
    recorded_computes: frozenset = frozenset()      # COMPUTE_ARGS its stored args hold a value for
    left_out: tuple[str, ...] = ()                  # what it holds that is deliberately not converted (summary)


class SourceFormat:
    name = ""
    description = ""
    loader = ""  # "module:function" of load(plan, sender), run in the loader process
    flags: frozenset = frozenset()  # the command-line options (argparse dests) it takes besides the common ones

    def describe(self, request: SourceRequest) -> SourceInfo:
        raise NotImplementedError

    def check(self, plan) -> None:
        """What this source refuses of the whole plan (a target it cannot feed), before writing."""

    def detect(self, path: Path) -> bool:
        return False

    def family_hint(self, path: Path, cfg_path=None) -> tuple[str, str] | None:
        """(model_cfg.json entry, how it was found) when the checkpoint says which family it is."""
        return None

    def inspect(self, path: Path) -> dict:
        """{field: value} for `convert_ckpt.py inspect` (format, family guess, layout, ...)."""
        raise NotImplementedError

    def load_function(self) -> Callable:
        return _resolve(self.loader)


class TargetFormat:
    name = ""
    description = ""
    saver = ""  # "module:function" of save(plan, receiver), run in the saver process
    flags: frozenset = frozenset()  # the command-line options (argparse dests) it takes besides the common ones
    selected_by = ""  # the --save-model-type (and flag) that chooses it
    streams = True  # written by a saver process from the loader's messages; else by `write(plan)`

    def write(self, plan) -> dict:
        """A target that does not stream (`streams` False) writes itself here; its summary."""
        raise NotImplementedError

    def spec(self, options: dict, path: Path, params_dtype, family, source: SourceInfo):
        """The target half of the plan (plan.TargetSpec) from its flags (`options`: {dest: value}),
        the model and the source; refuses what cannot be written (before anything is)."""
        raise NotImplementedError

    def check(self, plan) -> None:
        """Everything about the target that can be refused before writing (existing output, flags)."""

    def files(self, plan) -> dict[str, int]:
        """{file relative to the target: bytes} the conversion writes (--dry-run, free space)."""
        raise NotImplementedError

    def where(self, plan) -> str:
        """The target, as the summary line names it."""
        return str(plan.target.path)

    def save_function(self) -> Callable:
        return _resolve(self.saver)

    def pieces(self, plan, kind: str, layer: int | None, tensors: dict) -> list:
        """[(file, tensor name, piece)] the message tensors `tensors` become in this target, by the
        saver's own placement (`inspect --explain`): pieces of the given tensors, which may carry
        anything (the explanation traces row and column ids through them)."""
        raise NotImplementedError

    def recognises(self, path: Path) -> Path | None:
        """The folder of this target's output at `path` (`--verify`), or None."""
        return None

    def verify(self, folder: Path, hash_contents: bool = True, family: str | None = None) -> tuple[list[str], str]:
        """(problems, summary) of this target's output in `folder`: its files against the manifest
        and its tensors against its own description (`--verify`)."""
        raise NotImplementedError

    def copies_in_kernel(self, plan) -> bool:
        """The kernel-copy path: a saver that writes through `HashedFile.write_tensor` (or
        `PositionalFile.write_tensor_at`) and runs under kernel_copy.FillOnTouch may receive bytes
        still in their source files (kernel_copy.py)."""
        return False

    def computes_on(self, plan) -> Callable:
        """A hint for the kernel-copy path: predicate over message rules (mapping.TensorRule) that
        says which tensors this target transforms in memory instead of writing their bytes
        unchanged; the parent turns it into the plan's `target.computed`, and the loader reads
        those at once, beside the saver, rather than leaving them in the file for the saver to
        read. A wrong answer costs time, never bytes."""
        return lambda rule: rule.fold is not None

    # --workers: a target whose files several savers can write side by side says so and stages
    # them (one plan per worker), then publishes what they wrote once all of them succeeded
    def why_one_process(self, plan) -> str | None:
        """Why this target is written by one process (None: `--workers` may share it)."""
        return f"a {plan.target.format} target is written by one process"

    def shares(self, plan, workers: int) -> tuple:
        """(staged output, [plan of each worker])."""
        raise NotImplementedError

    def share_plans(self, plan, workers: int, folder: str) -> list:
        """[plan of each worker] writing into the already staged `folder` (torchrun's other ranks);
        pure: with folder "" it also counts and describes the shares (--dry-run)."""
        raise NotImplementedError

    def publish(self, staged, results: list[dict]) -> dict:
        """Publish what the workers wrote; the summary of all of them."""
        raise NotImplementedError


def census(shapes_and_dtypes) -> tuple[dict[str, int], int]:
    """({dtype name: elements}, total elements) of (shape, dtype) pairs, for `inspect`."""
    dtypes, total = {}, 0
    for shape, dtype in shapes_and_dtypes:
        count, key = math.prod(shape), str(dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + count
        total += count
    return dtypes, total


def _resolve(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def source(name: str) -> SourceFormat:
    if name not in SOURCES:
        raise UsageError(f"--load-model-type {name}: unknown (known: {', '.join(SOURCES)})")
    return _resolve(SOURCES[name])


def target(name: str) -> TargetFormat:
    if name not in TARGETS:
        raise UsageError(f"--save-model-type {name}: unknown (known: {', '.join(TARGETS)})")
    return _resolve(TARGETS[name])


def detect(path: Path) -> str:
    """The name of the source format `path` holds."""
    if not path.exists():
        raise UsageError(f"{path}: does not exist")
    for name in DETECTION_ORDER:
        if source(name).detect(path):
            return name
    raise UsageError(f"{path}: not a checkpoint this tool recognises ({', '.join(SOURCES)})")
