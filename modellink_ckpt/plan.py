"""The plan of one conversion: what the source holds, what the target will be, how the run goes.

The parent process builds it from the command line (the argparse namespace stays in `cli/`) and
checks everything it can before a byte is written. The loader and saver processes receive it and
need nothing else: what a loader must know of the target (the tensors the saver computes on, the
vocabulary rows it keeps) and what a saver must know of the source (the run's stored args, its
iteration) is computed here, once; no child asks the registry, the other format or the command
line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only
    from modellink_ckpt.engine.workers import Share
    from modellink_ckpt.formats.megatron.names import Spelling
    from modellink_ckpt.formats.ms_strategy import Strategy
    from modellink_ckpt.model.families import ModelDims, ModelFamily
    from modellink_ckpt.model.layout import ParallelLayout
    from modellink_ckpt.registry import SourceInfo


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What every target is: its registry name, its folder, the dtype asked for."""

    format: str                                  # the registry's target (mg, torch_dist, hf, ms, peft)
    path: Path                                   # --save-dir
    params_dtype: torch.dtype | None = None      # --params-dtype; None: every tensor keeps its dtype
    # message tensors (layer-relative names) the saver transforms in memory rather than writing their
    # bytes unchanged: the loader reads those at once instead of leaving them to the kernel-copy path
    computed: frozenset = frozenset()
    padded_vocab: int | None = None              # a Megatron target's padded vocabulary; None elsewhere


@dataclasses.dataclass(frozen=True)
class MegatronTarget(TargetSpec):
    """A Megatron-Core checkpoint (torch rank files or torch_dist) at a parallel layout."""

    layout: ParallelLayout | None = None
    divisible_by: int = 1                        # the vocabulary padding rule (x TP)
    spelling: Spelling | None = None             # local / TE names, expert layout, MLA & MTP spelling
    ddp: dict = dataclasses.field(default_factory=dict)  # from optim: the resumed run's DDP settings
    tokenizer_model: str | None = None           # recorded in the stored args


@dataclasses.dataclass(frozen=True)
class HfTarget(TargetSpec):
    """A Hugging Face folder (`<save-dir>/mg2hf`)."""

    max_shard_bytes: int = 5 * 10**9
    hf_config_dir: Path | None = None            # where the original config.json (and tokenizer) is
    tokenizer_model: str | None = None


@dataclasses.dataclass(frozen=True)
class MsTarget(TargetSpec):
    """A MindSpore / MindFormers checkpoint, complete or split by a strategy."""

    file_format: str = "safetensors"             # --ms-format: safetensors or ckpt
    naming: str = "mcore"                        # --ms-naming
    strategy_path: Path | None = None            # --dst-strategy
    strategy: Strategy | None = None             # that strategy, read
    prefix: str = "checkpoint_"                  # --ms-prefix
    max_shard_bytes: int = 5 * 10**9
    hf_config_dir: Path | None = None


@dataclasses.dataclass(frozen=True)
class PeftTarget(TargetSpec):
    """The LoRA adapters alone, as a PEFT adapter folder (`--save-lora-to-hf`)."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How the conversion runs, whatever the formats."""

    max_queue_size: int = 50                     # messages in flight between loader and saver
    max_queue_gb: float = 1.0                    # bytes in flight
    overwrite: bool = False
    quiet: bool = False
    hash_algorithm: str = "blake3"               # of the manifest's digests
    kernel_copy: bool = False                    # unchanged bytes copied file to file (formats/kernel_copy.py)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One conversion, fully validated before anything is written."""

    family: ModelFamily
    source: SourceInfo
    target: TargetSpec
    run: RunSettings
    share: Share | None = None                   # --workers: the part of the target one worker writes

    @property
    def dims(self) -> ModelDims:
        return self.source.dims

    def tokenizer_dir(self) -> Path | None:
        """Where the source's tokenizer files are: the HF folder, or the one the mg args recorded."""
        if self.source.format == "hf":
            return self.source.path
        return self.source.tokenizer.parent if self.source.tokenizer else None
