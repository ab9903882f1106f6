"""`convert_ckpt.py verify DIR` (also `--verify DIR`): re-check a finished checkpoint without
loading it into memory.

Two independent checks, done by the saver of the checkpoint's format (`TargetFormat.verify`):
every file against the manifest (size, digest; read in chunks), and the structure against the
checkpoint's own description (the stored `args` for Megatron, config.json for HF and MindSpore):
every expected tensor present, nothing unexpected, right shape and dtype. The expected structure
comes from the same layout plan and placement the saver uses, applied to meta tensors. Here: which
saver's output a folder is.
"""

from __future__ import annotations

from pathlib import Path

from modellink_ckpt import registry
from modellink_ckpt.errors import UsageError
from modellink_ckpt.formats.mindspore.checkpoint2 import is_checkpoint2

# the first target that recognises a folder checks it: torch_dist before the legacy layout (both
# have the tracker file), MindSpore before HF (both have a config.json)
VERIFY_ORDER = ("torch_dist", "mg", "ms", "hf")


def verify(path: str | Path, manifest_check: bool = True, family: str | None = None) -> tuple[list[str], str, Path]:
    """(problems, summary, the folder checked) for the checkpoint at `path` (Megatron folder, its
    iteration folder, an HF output folder, or the HF folder holding `mg2hf/`); `family`: the
    --model-type-hf to check it as (default: the one it records, or, for an HF folder, detected)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--verify {path}: does not exist")
    if not path.is_dir():
        raise UsageError(f"--verify {path}: not a directory")
    for name in VERIFY_ORDER:
        target = registry.target(name)
        folder = target.recognises(path)
        if folder is not None:
            return (*target.verify(folder, manifest_check, family), folder)
    if is_checkpoint2(path):  # MindFormers' own: no manifest, no config.json to check the names against
        raise UsageError(f"--verify {path}: a MindFormers Checkpoint 2.0 folder this converter did not write; "
                         f"'inspect' lists it, and converting it (--load-model-type ms) checks every tensor")
    raise UsageError(f"--verify {path}: neither a Megatron checkpoint (no latest_checkpointed_iteration.txt), "
                     f"an HF folder nor a MindSpore output of this converter")
