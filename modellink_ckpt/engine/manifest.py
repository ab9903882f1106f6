"""The manifest a saver writes next to its output: every file's size and digest (BLAKE3 or sha256,
named in each entry), plus what the checkpoint is (kind, layout, source). `--verify` checks a
checkpoint against it, with whichever algorithm each entry names."""

from __future__ import annotations

import collections
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from modellink_ckpt import __version__
from modellink_ckpt.formats.file_io import HASHES, file_digest, split_digest

MANIFEST = "convert_manifest.json"
FORMAT = "modellink-ckpt-manifest/1"


def write_manifest(folder: Path, files: dict[str, tuple[int, str]], **info) -> None:
    """`files`: {path relative to `folder`: (bytes, digest)}; small extra files are hashed here."""
    manifest = {
        "format": FORMAT,
        "tool": f"modellink-ckpt {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
        "total_bytes": sum(size for size, _ in files.values()),
        "files": {name: {"bytes": size, **dict([split_digest(digest)])} for name, (size, digest) in sorted(files.items())},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def hash_files(folder: Path, names) -> dict[str, tuple[int, str]]:
    """{name: (bytes, digest)} of files in `folder`, several at a time (hashing releases the GIL)."""
    names = list(names)
    if len(names) < 2:
        return {name: file_digest(folder / name) for name in names}
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda name: file_digest(folder / name), names)))


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
        elif hash_contents:
            algorithm = next((a for a in HASHES if a in entry), None)
            if algorithm is None:
                problems.append(f"{path}: the manifest names no digest this tool knows ({', '.join(HASHES)})")
            elif split_digest(file_digest(path, algorithm)[1])[1] != entry[algorithm]:
                problems.append(f"{path}: {algorithm} differs from the manifest (the file was changed or corrupted)")
    return problems


def files_summary(manifest: dict | None) -> str:
    """"12 files, 2.20 GB, blake3 as in the manifest" (for --verify's closing line)."""
    entries = (manifest or {}).get("files", {})
    algorithms = sorted({a for entry in entries.values() for a in HASHES if a in entry}) or ["digests"]
    return (f"{len(entries)} files, {(manifest or {}).get('total_bytes', 0) / 1e9:.2f} GB, "
            f"{' and '.join(algorithms)} as in the manifest")


def check_manifest(folder: Path, hash_contents: bool = True) -> tuple[dict | None, list[str], str]:
    """(the manifest, problems of the files against it, what `--verify`'s summary says of the
    files). A folder without one (a training run's, transformers') has its structure checked only."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None, [], f"no {MANIFEST} (not written by this tool): file contents not checked"
    entries = manifest.get("files", {})
    if hash_contents:
        summary = files_summary(manifest)
    else:
        summary = f"{len(entries)} files, {manifest.get('total_bytes', 0) / 1e9:.2f} GB, sizes as in the manifest"
    return manifest, check_files(folder, manifest, hash_contents), summary


def recorded_dtype(manifest: dict | None, name: str = "dtype"):
    """A torch dtype the manifest records (`dtype`: the model's), or None."""
    value = (manifest or {}).get(name)
    dtype = getattr(torch, value.replace("torch.", ""), None) if isinstance(value, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def model_dtype(manifest: dict | None, found: dict) -> torch.dtype:
    """The model's dtype as the manifest records it, else the one most `found` tensors
    ({name: (shape, dtype)}) have, else float32."""
    counts = collections.Counter(dtype for _, dtype in found.values())
    return recorded_dtype(manifest) or (counts.most_common(1)[0][0] if counts else torch.float32)


def with_recorded_dtypes(expected: dict, manifest: dict | None) -> dict:
    """Expected {name: (shape, dtype)} with the manifest's per-tensor dtypes (tensors the writer
    kept in another dtype than the rest, e.g. an fp32 router bias in a bf16 model)."""
    odd = {name: getattr(torch, value.replace("torch.", ""))
           for name, value in ((manifest or {}).get("dtypes") or {}).items()}
    return {name: (shape, odd.get(name, dtype)) for name, (shape, dtype) in expected.items()}
