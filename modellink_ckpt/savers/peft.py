"""`--save-lora-to-hf`: the LoRA adapters of a Megatron or MindSpore checkpoint as a PEFT adapter
folder (`adapter_config.json` written by peft itself, `adapter_model.safetensors`).

Only the adapters are read (they are small: r rows or columns per target), so this target writes
itself in one process, without the loader/saver pipeline (`streams` False). Every TP shard is
merged with the adapter's own TP rule and fused QKV / gate-up adapters are split into the HF
modules by the same mapping rules the weights use (`model.lora.peft_layer_tensors`). The folder is
published in `<save-dir>/mg2hf/` only when complete, with a manifest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from modellink_ckpt import registry
from modellink_ckpt.engine.manifest import hash_files, write_manifest
from modellink_ckpt.engine.progress import progress
from modellink_ckpt.engine.staging import StagedDir, check_target
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.huggingface import HF_SUBDIR
from modellink_ckpt.formats.megatron.checkpoint import MegatronSource
from modellink_ckpt.formats.megatron.lora import load_layer_adapters
from modellink_ckpt.formats.mindspore import names as ms_names
from modellink_ckpt.formats.mindspore.lora import find_adapters, peft_tensors
from modellink_ckpt.formats.mindspore.store import MsStore, source_strategy
from modellink_ckpt.model.accounting import account
from modellink_ckpt.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSpec, peft_layer_tensors
from modellink_ckpt.plan import PeftTarget


def _megatron_adapters(plan):
    """(PEFT tensors, LoraSpec) of a Megatron LoRA checkpoint."""
    source = MegatronSource(plan.source.lora_dir or plan.source.path, keep_adapters=True)
    layers = load_layer_adapters(source, plan.source.layout, plan.family, plan.dims, plan.source.lora)
    tensors = {}
    for layer, adapters in progress(layers, total=plan.dims.num_layers, desc="exporting adapters", unit="layer",
                                    quiet=plan.run.quiet):
        tensors.update(peft_layer_tensors(plan.family, plan.dims, layer, adapters))
    _check_all_exported(source, plan.source.layout, plan.source.lora)
    return tensors, plan.source.lora


def _mindspore_adapters(plan):
    """(PEFT tensors, LoraSpec) of MindFormers LoRA adapters (in the checkpoint or --lora-load)."""
    options = plan.source.options
    strategy = source_strategy(plan.source.path, options.get("src_strategy"))
    store = MsStore(plan.source.path, strategy, options.get("file_suffix"), options.get("iteration"))
    adapter_store = MsStore(options["lora"]["load"], strategy, options.get("file_suffix")) \
        if options["lora"].get("load") else store
    adapters = find_adapters(adapter_store.names(), set(store.names()), str(adapter_store.path))
    if not adapters:
        raise ConvertError(f"{adapter_store.path}: no LoRA adapters to export")
    naming = ms_names.load_naming(plan.family, options["naming"])
    tensors = {}
    for kind, layer, shapes in ms_names.message_shapes(naming, plan.family, plan.dims):
        tensors.update(peft_tensors(naming, plan.family, plan.dims, kind, layer, shapes, adapters,
                                    adapter_store.read, lambda name: store.shape_dtype(name)[0]))
    r = adapter_store.shape_dtype(next(iter(adapters.values()))[0])[0][0]
    lora = options["lora"]
    alpha = lora["scaling"] * r if lora.get("scaling") is not None else lora.get("alpha")
    if alpha is None:
        raise UsageError("--save-lora-to-hf from MindSpore: pass --lora-scaling (or --lora-alpha) for the adapter config")
    return tensors, LoraSpec(r=r, alpha=alpha)


def write(plan) -> dict:
    """Export the adapters into `<save-dir>/mg2hf`, staged and published when complete."""
    started = time.monotonic()
    staging = StagedDir(plan.target.path / HF_SUBDIR, overwrite=plan.run.overwrite)
    tensors = {}
    try:
        tensors, spec = (_mindspore_adapters if plan.source.format == "ms" else _megatron_adapters)(plan)
        base = Path(plan.target.path).resolve()  # MindSpeed-LLM users pass the original HF folder here
        write_peft_adapter(staging.path, tensors, spec,
                           base_model_name_or_path=str(base) if (base / "config.json").is_file() else None)
        write_manifest(staging.path, hash_files(staging.path, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]), kind="peft",
                       model_type_hf=plan.family.name,
                       source={"type": f"{plan.source.format}-lora",
                               "dir": str(Path(plan.source.lora_dir or plan.source.path).resolve())},
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
        left = account((), (name for _, name in entry["unused"]),
                       excused=lambda name: ".lora_" not in name or name.endswith("_extra_state")).unexplained
        if left:
            module = left[0].split(".lora_")[0]
            raise ConvertError(f"{entry['path']}: adapter of '{module}' ({len(left)} LoRA tensor(s) in all) is not "
                               f"in --lora-target-modules ({' '.join(spec.target_modules)}); nothing would export it")


def hf_target_modules(tensors: Iterable[str]) -> list[str]:
    """The HF leaf module names (`q_proj`, ...) of PEFT tensor names."""
    return sorted({name.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for name in tensors})


def peft_config(spec: LoraSpec, target_modules: Sequence[str], base_model_name_or_path: str | None = None):
    """peft's own `LoraConfig` for an exported adapter."""
    from peft import LoraConfig

    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return LoraConfig(r=spec.r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                      target_modules=sorted(target_modules), task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model_name_or_path)


def write_peft_adapter(out_dir, tensors: dict[str, torch.Tensor], spec: LoraSpec,
                       base_model_name_or_path: str | None = None) -> Path:
    """A PEFT adapter folder: `adapter_config.json` (written by peft's `LoraConfig.save_pretrained`)
    and `adapter_model.safetensors`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not tensors:
        raise ConvertError(f"{out_dir}: no LoRA tensors to export")
    bad = [name for name in tensors if not name.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise ValueError(f"not PEFT LoRA tensor names: {bad[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_config(spec, hf_target_modules(tensors), base_model_name_or_path).save_pretrained(str(out_dir))
    config_path = out_dir / ADAPTER_CONFIG  # peft keeps target_modules as a set: sort it, for identical output
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))  # as peft writes it
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    return out_dir


class PeftTargetFormat(registry.TargetFormat):
    name = "peft"
    description = "the LoRA adapters as a PEFT adapter folder"
    selected_by = "hf --save-lora-to-hf"
    streams = False
    flags = frozenset({"save_lora_to_hf"})

    def spec(self, options: dict, path: Path, params_dtype, family, source) -> PeftTarget:
        return PeftTarget(format=self.name, path=path, params_dtype=params_dtype)

    def check(self, plan) -> None:
        check_target(plan.target.path / HF_SUBDIR, plan.run.overwrite)

    def where(self, plan) -> str:
        return str(plan.target.path / HF_SUBDIR)

    def write(self, plan) -> dict:
        return write(plan)


TARGET = PeftTargetFormat()
