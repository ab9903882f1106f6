"""`--save-lora-to-hf`: the LoRA adapters of a Megatron checkpoint as a PEFT adapter folder.

Only the adapters are read (they are small: r rows or columns per target), so this runs in one
process, without the loader/saver pipeline. Every TP shard is merged with the adapter's own TP rule
and fused QKV / gate-up adapters are split into the HF modules by the same mapping rules the
weights use (`lora.peft_layer_tensors`); peft writes the adapter config. The folder is published
in `<save-dir>/mg2hf/` only when complete.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from modellink_ckpt.errors import ConvertError
from modellink_ckpt.loaders.mg import MegatronSource
from modellink_ckpt.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_layer_adapters, peft_layer_tensors, \
    write_peft_adapter
from modellink_ckpt.manifest import hash_files, write_manifest
from modellink_ckpt.savers.hf import HF_SUBDIR
from modellink_ckpt.staging import StagedDir


def save(plan) -> dict:
    started = time.monotonic()
    source = MegatronSource(plan.lora_dir or plan.load_dir, keep_adapters=True)
    staging = StagedDir(plan.save_dir / HF_SUBDIR, overwrite=plan.overwrite)
    layers = load_layer_adapters(source, plan.source_layout, plan.family, plan.dims, plan.lora)
    tensors = {}
    try:
        for layer, adapters in tqdm(layers, total=plan.dims.num_layers, desc="exporting adapters", unit="layer",
                                    disable=plan.quiet):
            tensors.update(peft_layer_tensors(plan.family, plan.dims, layer, adapters))
        _check_all_exported(source, plan.source_layout, plan.lora)
        base = Path(plan.save_dir).resolve()  # MindSpeed-LLM users pass the original HF folder here
        write_peft_adapter(staging.path, tensors, plan.lora,
                           base_model_name_or_path=str(base) if (base / "config.json").is_file() else None)
        write_manifest(staging.path, hash_files(staging.path, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]), kind="peft",
                       model_type_hf=plan.family.name,
                       source={"type": "mg-lora", "dir": str(Path(plan.lora_dir or plan.load_dir).resolve())},
                       lora_r=plan.lora.r, lora_alpha=plan.lora.alpha)
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
