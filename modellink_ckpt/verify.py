"""`convert_ckpt.py --verify DIR`: re-check a finished checkpoint without loading it into memory.

Two independent checks: every file against the manifest (size, digest; read in chunks), and the
structure against the checkpoint's own description (the stored `args` for Megatron, config.json
for HF): every expected tensor present, nothing unexpected, right shape and dtype, in every rank
file. The expected structure comes from the same layout plan and placement the saver uses,
applied to meta tensors.
"""

from __future__ import annotations

import collections
import json
import re
import types
from pathlib import Path

import torch

from modellink_ckpt import mapping
from modellink_ckpt.mapping import TensorDtypes
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.loaders.mg import RANK_FILE, TRACKER, MegatronSource
from modellink_ckpt.manifest import MANIFEST, check_files, files_summary, read_manifest
from modellink_ckpt.megatron_args import module_contradictions, spelling_from_args
from modellink_ckpt.model_cfg import DEFAULT_FAMILY, check_family_fits_config, dims_from_hf_config, load_family
from modellink_ckpt.formats.torch_zip import LazyTensor, load_lazy
from modellink_ckpt.formats.safetensors_io import SafetensorsFile


def expected_mg_files(plan, dtype: torch.dtype) -> dict[str, dict[str, dict[str, tuple]]]:
    """{rank folder: {model key: {name: (shape, dtype)}}} that a conversion with `plan` writes."""
    from modellink_ckpt.savers.mg import ShardPlacer

    placer = ShardPlacer(plan, TensorDtypes(dtype, cast=plan.params_dtype))
    layout = plan.target_layout
    expected = {layout.rank_dir(*rank): {layout.model_key(v): {} for v in range(layout.vpp)}
                for rank in layout.ranks()}
    for kind, layer, tensors in mapping.model_messages(plan.family, plan.dims, dtype):
        for rank, vchunk, name, shard in placer.place(kind, tensors, layer):
            expected[layout.rank_dir(*rank)][layout.model_key(vchunk)][name] = (tuple(shard.shape), shard.dtype)
    return expected


def _describe(shape, dtype) -> str:
    return f"{list(shape)} {str(dtype).replace('torch.', '')}"


def _with_odd_dtypes(expected: dict, manifest: dict | None) -> dict:
    """Expected (shape, dtype) with the manifest's per-tensor dtypes (tensors the writer kept in
    another dtype than the rest, e.g. an fp32 router bias in a bf16 model)."""
    odd = {name: getattr(torch, value.replace("torch.", "")) for name, value in ((manifest or {}).get("dtypes") or {}).items()}
    return {name: (shape, odd.get(name, dtype)) for name, (shape, dtype) in expected.items()}


def _compare(where: str, found: dict, expected: dict) -> list[str]:
    problems = []
    for name in sorted(set(expected) - set(found)):
        problems.append(f"{where}: missing tensor '{name}'")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"{where}: unexpected tensor '{name}'")
    for name in sorted(set(found) & set(expected)):
        if found[name] != expected[name]:
            problems.append(f"{where}: '{name}' is {_describe(*found[name])}, expected {_describe(*expected[name])}")
    return problems


def _check_manifest(folder: Path, hash_contents: bool) -> tuple[dict | None, list[str], str]:
    """(the manifest, problems of the files against it, what the summary says of the files). A
    folder without one (a training run's, transformers') has its structure checked only."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None, [], f"no {MANIFEST} (not written by this tool): file contents not checked"
    summary = files_summary(manifest)
    if not hash_contents:
        summary = summary.split(", ")[0] + f", {manifest.get('total_bytes', 0) / 1e9:.2f} GB, sizes as in the manifest"
    return manifest, check_files(folder, manifest, hash_contents), summary


def _family(explicit: str | None, *recorded: str | None, cfg_path=None):
    """The family a checkpoint is checked as: --model-type-hf, else the one it records."""
    return load_family(explicit or next((r for r in recorded if isinstance(r, str)), None) or DEFAULT_FAMILY,
                       cfg_path)


def _verify_mg(root: Path, manifest_check: bool, family_name: str | None = None) -> tuple[list[str], str]:
    source = MegatronSource(root)
    folder, margs = source.iter_dir, source.args
    manifest, problems, files = _check_manifest(folder, manifest_check)
    family = _family(family_name, getattr(margs, "model_type_hf", None), (manifest or {}).get("model_type_hf"))
    dims = source.dims()
    layout = source.layout(dims)
    dtype = getattr(margs, "params_dtype", torch.float32)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    plan = types.SimpleNamespace(family=family, dims=dims, target_layout=layout, params_dtype=None,
                                 padded_vocab=int(getattr(margs, "padded_vocab_size", dims.vocab_size)),
                                 target_spelling=spelling_from_args(margs),
                                 tokenizer_model=None)
    expected = expected_mg_files(plan, dtype)
    on_disk = {p.parent.name for p in folder.glob(f"mp_rank_*/{RANK_FILE}")}
    for extra in sorted(on_disk - set(expected)):
        problems.append(f"{folder / extra / RANK_FILE}: not part of the layout in the stored args")
    tensors, present = 0, set()
    for rank_dir, models in expected.items():
        path = folder / rank_dir / RANK_FILE
        if not path.is_file():
            problems.append(f"{path}: missing rank file")
            continue
        try:
            state = load_lazy(path)  # only the pickle is read here
        except ConvertError as exc:
            problems.append(str(exc))
            continue
        for model_key, names in models.items():
            stored = state.get(model_key)
            if not isinstance(stored, dict):
                problems.append(f"{path}: no '{model_key}' entry")
                continue
            found = {n: (tuple(t.shape), t.dtype) for n, t in stored.items()
                     if isinstance(t, (torch.Tensor, LazyTensor)) and not n.endswith("_extra_state")}
            problems += _compare(f"{path} [{model_key}]", found, _with_odd_dtypes(names, manifest))
            tensors += len(found)
            present |= set(found)
    problems += [f"{folder}: {problem}" for problem in module_contradictions(margs, present)]
    lay = layout.describe()
    summary = (f"{files}; {tensors} tensors in "
               f"{len(expected)} rank files match the stored args (TP{lay['tensor_parallel']} "
               f"PP{lay['pipeline_parallel']}{' EP' + str(layout.ep) if layout.ep > 1 else ''}"
               f"{' VPP' + str(layout.vpp) if layout.vpp_layers else ''})")
    return problems, summary


def _model_dtype(manifest: dict | None, found: dict) -> torch.dtype:
    """The model's dtype as the manifest records it, else the one most tensors have."""
    recorded = (manifest or {}).get("dtype")
    if isinstance(recorded, str) and isinstance(getattr(torch, recorded.replace("torch.", ""), None), torch.dtype):
        return getattr(torch, recorded.replace("torch.", ""))
    counts = collections.Counter(dt for _, dt in found.values())
    return counts.most_common(1)[0][0] if counts else torch.float32


def _verify_hf(folder: Path, manifest_check: bool, family_name: str | None = None) -> tuple[list[str], str]:
    from modellink_ckpt.loaders.hf import SOURCE as HF_SOURCE
    from modellink_ckpt.savers.hf import hf_tensors

    manifest, problems, files = _check_manifest(folder, manifest_check)
    config = json.loads((folder / "config.json").read_text())
    recorded = (manifest or {}).get("model_type_hf")
    if family_name:
        family = load_family(family_name)
        check_family_fits_config(family, config, str(folder / "config.json"))
        how = "--model-type-hf"
    elif isinstance(recorded, str):
        family, how = load_family(recorded), "recorded in the manifest"
    else:  # a folder the tool did not write: the family its config.json and tensors name, as a conversion finds it
        name, how = HF_SOURCE.family_hint(folder)
        family = load_family(name)
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            for name, (dtype, shape, _, _) in SafetensorsFile(path).entries.items():
                found[name] = (tuple(shape), dtype)
        except ConvertError as exc:
            problems.append(str(exc))
    dims = dims_from_hf_config(family, config, source=str(folder / "config.json"))
    layers = {int(m.group(1)) for m in (re.search(r"\.layers\.(\d+)\.", name) for name in found) if m}
    mtp = max(layers, default=-1) + 1 - dims.num_layers  # multi-token-prediction layers follow the decoder's
    if 0 < mtp <= int(config.get("num_nextn_predict_layers") or 0):
        dims = dims_from_hf_config(family, config, source=str(folder / "config.json"), overrides={"mtp_num_layers": mtp})
    dtype = _model_dtype(manifest, found)
    plan = types.SimpleNamespace(family=family, dims=dims)
    expected = {name: (tuple(shape), dt) for name, shape, dt in hf_tensors(plan, TensorDtypes(dtype))}
    problems += _compare(str(folder), found, _with_odd_dtypes(expected, manifest))
    summary = f"{files}; {len(found)} tensors match config.json as --model-type-hf {family.name} ({how})"
    return problems, summary


def verify(path: str | Path, manifest_check: bool = True, family: str | None = None) -> tuple[list[str], str, Path]:
    """(problems, summary, the folder checked) for the checkpoint at `path` (Megatron folder, its
    iteration folder, an HF output folder, or the HF folder holding `mg2hf/`); `family`: the
    --model-type-hf to check it as (default: the one it records, or, for an HF folder, detected)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--verify {path}: does not exist")
    if not path.is_dir():
        raise UsageError(f"--verify {path}: not a directory")
    from modellink_ckpt.formats.torch_dist import is_torch_dist
    from modellink_ckpt.loaders.mg import find_iteration

    if (path / TRACKER).is_file() and is_torch_dist(find_iteration(path)[1]) or is_torch_dist(path):
        folder = find_iteration(path)[1]
        return (*_verify_dist(folder, manifest_check, family), folder)
    if (path / TRACKER).is_file() or any(path.glob(f"mp_rank_*/{RANK_FILE}")):
        return (*_verify_mg(path, manifest_check, family), path)
    if not (path / MANIFEST).is_file() and (path / "mg2hf").is_dir() \
            and ((path / "mg2hf" / MANIFEST).is_file() or (path / "mg2hf" / "config.json").is_file()):
        path = path / "mg2hf"  # the HF folder a conversion wrote into
    if (read_manifest(path) or {}).get("kind") == "ms":
        return (*_verify_ms(path, manifest_check, family), path)
    if (path / "config.json").is_file():
        return (*_verify_hf(path, manifest_check, family), path)
    raise UsageError(f"--verify {path}: neither a Megatron checkpoint (no {TRACKER}) nor an HF folder")


def _verify_ms(folder: Path, manifest_check: bool, family_name: str | None = None) -> tuple[list[str], str]:
    """A MindSpore output: files against the manifest; every tensor the naming expects, with its
    shape and dtype, in the complete file(s) or, sliced by the strategy, in every rank file."""
    from modellink_ckpt import ms_names
    from modellink_ckpt.formats.ms_strategy import load_strategy
    from modellink_ckpt.loaders.ms import MsStore

    manifest, problems, files = _check_manifest(folder, manifest_check)
    family = _family(family_name, manifest.get("model_type_hf"))
    config = json.loads((folder / "config.json").read_text())
    dims = dims_from_hf_config(family, config, source=str(folder / "config.json"))
    naming = ms_names.load_naming(family, manifest.get("ms_naming") or "mcore")
    expected = {name: (tuple(t.shape), t.dtype) for _, _, tensors in ms_names.model_ms_tensors(
        naming, family, dims, TensorDtypes(_model_dtype(manifest, {}))) for name, t in tensors.items()}
    expected = _with_odd_dtypes(expected, manifest)
    strategies = sorted((folder / "strategy").glob("*")) if (folder / "strategy").is_dir() else []
    try:
        strategy = load_strategy(folder / "strategy") if strategies else None
        store = MsStore(folder, strategy)
        found = {name: store.shape_dtype(name) for name in store.names()}
    except ConvertError as exc:
        return problems + [str(exc)], "unreadable"
    problems += _compare(str(folder), {n: (tuple(s), d) for n, (s, d) in found.items()}, expected)
    layout = f"{strategy.world_size} rank files by the strategy" if strategy else "complete"
    summary = (f"{files}; {len(found)} tensors ({layout}) match MindSpore naming '{naming.name}' of config.json")
    return problems, summary


def _verify_dist(folder: Path, manifest_check: bool, family_name: str | None = None) -> tuple[list[str], str]:
    """A torch_dist output: files against the manifest; every key the model needs (tensors with
    their global shape and dtype, extra-state objects) in the store, nothing else."""
    from modellink_ckpt.formats.torch_dist import TorchDistStore
    from modellink_ckpt.megatron_args import dims_from_args
    from modellink_ckpt.savers.torch_dist import DistKeys, object_key

    manifest, problems, files = _check_manifest(folder, manifest_check)
    store = TorchDistStore(folder)
    margs = store.common()["args"]
    family = _family(family_name, getattr(margs, "model_type_hf", None), (manifest or {}).get("model_type_hf"))
    dims = dims_from_args(margs, source=str(folder))
    dtype = getattr(margs, "params_dtype", torch.float32)
    plan = types.SimpleNamespace(family=family, dims=dims, padded_vocab=int(getattr(margs, "padded_vocab_size")),
                                 target_spelling=spelling_from_args(margs))
    keys = DistKeys(plan)
    expected, objects = {}, set()
    for kind, layer, tensors in mapping.model_messages(family, dims, dtype if isinstance(dtype, torch.dtype)
                                                       else torch.float32):
        chunks, extra = keys.layer(layer, tensors) if kind == "layer" else keys.mtp_layer(layer, tensors) \
            if kind == "mtp_layer" else (keys.plain(kind, tensors), [])
        expected.update({key: (tuple(shape), t.dtype) for key, shape, _, t in chunks})
        objects |= {object_key(key, shape, offsets) for key, shape, offsets in extra}
    found = {key: (tuple(t.shape), t.dtype) for key, t in store.tensors.items()}
    problems += _compare(str(folder), found, _with_odd_dtypes(expected, manifest))
    problems += [f"{folder}: {problem}" for problem in module_contradictions(margs, found)]
    problems += [f"{folder}: missing object '{k}'" for k in sorted(objects - set(store.objects))]
    problems += [f"{folder}: unexpected object '{k}'" for k in sorted(set(store.objects) - objects)]
    summary = (f"{files}; {len(found)} tensors and {len(store.objects)} objects match the stored args (torch_dist)")
    return problems, summary
