"""`--save-lora-to-hf`: the LoRA adapters of a Megatron or MindSpore checkpoint as a PEFT adapter folder.

Only the adapters are read (they are small: r rows or columns per target), so this runs in one
process, without the loader/saver pipeline. Every TP shard is merged with the adapter's own TP rule
and fused QKV / gate-up adapters are split into the HF modules by the same mapping rules the
weights use (`lora.peft_layer_tensors`); peft writes the adapter config. The folder is published
in `<save-dir>/mg2hf/` only when complete.
"""

from __future__ import annotations

import time
from pathlib import Path


from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.loaders.mg import MegatronSource
from modellink_ckpt.lora import ADAPTER_CONFIG, LoraSpec, ADAPTER_WEIGHTS, load_layer_adapters, peft_layer_tensors, \
    write_peft_adapter
from modellink_ckpt.manifest import hash_files, write_manifest
from modellink_ckpt.savers.hf import HF_SUBDIR
from modellink_ckpt.progress import progress
from modellink_ckpt.staging import StagedDir


def _megatron_adapters(plan):
    """(PEFT tensors, LoraSpec) of a Megatron LoRA checkpoint."""
    source = MegatronSource(plan.lora_dir or plan.load_dir, keep_adapters=True)
    layers = load_layer_adapters(source, plan.source_layout, plan.family, plan.dims, plan.lora)
    tensors = {}
    for layer, adapters in progress(layers, total=plan.dims.num_layers, desc="exporting adapters", unit="layer",
                                    quiet=plan.quiet):
        tensors.update(peft_layer_tensors(plan.family, plan.dims, layer, adapters))
    _check_all_exported(source, plan.source_layout, plan.lora)
    return tensors, plan.lora


def _mindspore_adapters(plan):
    """(PEFT tensors, LoraSpec) of MindFormers LoRA adapters (in the checkpoint or --lora-load)."""
    from modellink_ckpt import ms_names
    from modellink_ckpt.formats.ms_strategy import load_strategy
    from modellink_ckpt.loaders.ms import MsStore, message_shapes
    from modellink_ckpt.ms_lora import find_adapters, peft_tensors

    options = plan.source_options
    strategy = load_strategy(options["src_strategy"]) if options.get("src_strategy") else None
    store = MsStore(plan.load_dir, strategy)
    adapter_store = MsStore(options["lora"]["load"], strategy) if options["lora"].get("load") else store
    adapters = find_adapters(adapter_store.names(), set(store.names()), str(adapter_store.path))
    if not adapters:
        raise ConvertError(f"{adapter_store.path}: no LoRA adapters to export")
    naming = ms_names.load_naming(plan.family, options["naming"])
    tensors = {}
    for kind, layer, shapes in message_shapes(naming, plan.family, plan.dims):
        tensors.update(peft_tensors(naming, plan.family, plan.dims, kind, layer, shapes, adapters,
                                    adapter_store.read, lambda name: store.shape_dtype(name)[0]))
    r = adapter_store.shape_dtype(next(iter(adapters.values()))[0])[0][0]
    lora = options["lora"]
    alpha = lora["scaling"] * r if lora.get("scaling") is not None else lora.get("alpha")
    if alpha is None:
        raise UsageError("--save-lora-to-hf from MindSpore: pass --lora-scaling (or --lora-alpha) for the adapter config")
    return tensors, LoraSpec(r=r, alpha=alpha)


def save(plan) -> dict:
    started = time.monotonic()
    staging = StagedDir(plan.save_dir / HF_SUBDIR, overwrite=plan.overwrite)
    tensors = {}
    try:
        tensors, spec = (_mindspore_adapters if plan.load_type == "ms" else _megatron_adapters)(plan)
        base = Path(plan.save_dir).resolve()  # MindSpeed-LLM users pass the original HF folder here
        write_peft_adapter(staging.path, tensors, spec,
                           base_model_name_or_path=str(base) if (base / "config.json").is_file() else None)
        write_manifest(staging.path, hash_files(staging.path, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]), kind="peft",
                       model_type_hf=plan.family.name,
                       source={"type": f"{plan.load_type}-lora", "dir": str(Path(plan.lora_dir or plan.load_dir).resolve())},
                       lora_r=spec.r, lora_alpha=spec.alpha)
        target = staging.publish()
    except BaseException:
        staging.discard()
        raise
    nbytes = sum(t.nbytes for t in tensors.values())
    return {"bytes": nbytes, "seconds": time.monotonic() - started, "wall_seconds": time.monotonic() - started,
            "target": str(target), "files": 2}


def _check_all_exported(source: MegatronSource, layout, spec) -> None:
    """Every adapter in the checkpoint went into the export: one left over (a module outside
    --lora-target-modules) is an error, as it is for a merge, not a silently smaller adapter."""
    for rank in layout.ranks():
        entry = source.rank_state(layout, *rank)
        left = sorted(name for _, name in entry["unused"] if ".lora_" in name and not name.endswith("_extra_state"))
        if left:
            module = left[0].split(".lora_")[0]
            raise ConvertError(f"{entry['path']}: adapter of '{module}' ({len(left)} LoRA tensor(s) in all) is not "
                               f"in --lora-target-modules ({' '.join(spec.target_modules)}); nothing would export it")
