"""A Hugging Face model folder's conventions besides its weights: where a conversion writes one
(`<save-dir>/mg2hf`, as MindSpeed-LLM does), the tokenizer files that travel with the model, and
the config.json written beside the weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modellink_ckpt.model.families import hf_config_from_dims

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "vocab.txt",
                   "chat_template.jinja", "tiktoken.model")


def remote_code_files(folder: Path) -> list[str]:
    """The Python modules a release ships for `trust_remote_code` (Kimi-K2's tokenizer and model
    code): those its config.json and tokenizer_config.json name in `auto_map`. Without them the
    output folder loads only where the original one is at hand."""
    modules = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for target in auto_map.values():
            for reference in target if isinstance(target, list) else [target]:
                if isinstance(reference, str) and "." in reference and "--" not in reference:  # not another repo's
                    module = reference.rsplit(".", 1)[0] + ".py"
                    if (folder / module).is_file() and module not in modules:
                        modules.append(module)
    return modules


HF_SUBDIR = "mg2hf"


DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def output_config(plan, meta, dtype: torch.dtype) -> dict:
    """The original config.json where there is one, else one built from the model sizes."""
    for folder in (plan.target.hf_config_dir, plan.target.path):
        if folder is not None and (Path(folder) / "config.json").is_file():
            config = json.loads((Path(folder) / "config.json").read_text())
            break
    else:
        config = meta.get("hf_config") or hf_config_from_dims(plan.family, plan.dims, DTYPE_NAMES.get(dtype, "float32"))
    config = {k: v for k, v in config.items() if k != "quantization_config"}  # the weights are never quantized
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    return config
