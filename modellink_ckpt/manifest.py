"""The manifest a saver writes next to its output: every file's size and sha256, plus what the
checkpoint is (kind, layout, source). `--verify` checks a checkpoint against it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from modellink_ckpt import __version__
from modellink_ckpt.file_io import sha256_of

MANIFEST = "convert_manifest.json"
FORMAT = "modellink-ckpt-manifest/1"


def write_manifest(folder: Path, files: dict[str, tuple[int, str]], **info) -> None:
    """`files`: {path relative to `folder`: (bytes, sha256)}; small extra files are hashed here."""
    manifest = {
        "format": FORMAT,
        "tool": f"modellink-ckpt {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
        "total_bytes": sum(size for size, _ in files.values()),
        "files": {name: {"bytes": size, "sha256": sha} for name, (size, sha) in sorted(files.items())},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def hash_files(folder: Path, names) -> dict[str, tuple[int, str]]:
    return {name: sha256_of(folder / name) for name in names}


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return {"format": "unreadable"}
    return manifest


def check_files(folder: Path, manifest: dict, hash_contents: bool = True) -> list[str]:
    """Problems of the files in `folder` against `manifest` (one line each)."""
    problems = []
    if manifest.get("format") != FORMAT:
        return [f"{folder / MANIFEST}: not a manifest this tool can read"]
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
        elif hash_contents and sha256_of(path)[1] != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (the file was changed or corrupted)")
    return problems
