"""`make demo`: build a tiny Llama, convert HF -> Megatron-Core TP2/PP2 -> HF with the real
command line, and show that every tensor and the logits come back unchanged."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _run(argv: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT)


def main(out_dir: str = "demo_out") -> int:
    out = ROOT / out_dir
    hf_dir = build_hf_checkpoint("llama2", out / "llama2-hf", dtype=torch.bfloat16)
    mg_dir = out / "llama2-mcore-tp2pp2"
    print(f"built a tiny random Llama (bf16, sentencepiece tokenizer) in {hf_dir}")
    convert = [sys.executable, "convert_ckpt.py", "--model-type", "GPT", "--use-mcore-models",
               "--model-type-hf", "llama2", "--overwrite"]
    _run(convert + ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf_dir),
                    "--save-dir", str(mg_dir), "--target-tensor-parallel-size", "2",
                    "--target-pipeline-parallel-size", "2", "--tokenizer-model", str(hf_dir / "tokenizer.model")])
    _run(convert + ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(mg_dir),
                    "--save-dir", str(hf_dir), "--target-tensor-parallel-size", "1",
                    "--target-pipeline-parallel-size", "1"])
    back_dir = hf_dir / "mg2hf"

    original, back = load_file(hf_dir / "model.safetensors"), load_file(back_dir / "model.safetensors")
    same = [n for n in original if n in back and back[n].dtype == original[n].dtype and torch.equal(original[n], back[n])]
    tokenizer = AutoTokenizer.from_pretrained(back_dir)
    tokens = tokenizer("The converter reads the model once and writes it once.", return_tensors="pt").input_ids
    diff = (hf_logits(hf_dir, tokens) - hf_logits(back_dir, tokens)).abs().max().item()
    ok = len(same) == len(original) == len(back) and diff == 0.0
    print(f"tensors identical after HF -> mcore TP2/PP2 -> HF: {len(same)}/{len(original)} "
          f"(dtype {next(iter(back.values())).dtype}); logits max |diff| on {tokens.shape[1]} tokens: {diff:g}")
    print("demo: OK" if ok else "demo: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
