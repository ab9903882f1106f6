"""FP8 sources (DeepSeek-V3/R1 style: float8 weights with one fp32 `weight_scale_inv` per block) are
dequantized while they are read, equal to the reference dequantization; the scales never reach
the target."""

import json
import math
import shutil
import subprocess

import pytest
import torch
from mcore_harness import mcore_logits
from safetensors.torch import load_file, save_file
from util import assert_one_line_error, assert_same_tensors, cli_argv, hf_to_mg, load_hf_state, mg_to_hf

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits, sample_tokens

BLOCK = (32, 16)  # small blocks, so the tiny model has several per tensor and partial ones at the edges
FP8_MAX = 448.0


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek-V3 quantizes every linear weight but the embedding, the output layer and the routers."""
    return tensor.ndim == 2 and name.endswith("proj.weight")


def _quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    r, c = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(r * block[0], c * block[1])
    padded[:rows, :cols] = w.float()
    blocks = padded.view(r, block[0], c, block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).view(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def _reference_dequant(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """DeepSeek's weight_dequant, block by block: (fp8 -> fp32) * scale, then bf16."""
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = (q[rows, cols].float() * scale[i, j]).to(torch.bfloat16)
    return out


@pytest.fixture(scope="module")
def fp8_and_reference(tmp_path_factory):
    """A tiny DeepSeek-V3 in FP8 (with quantization_config) and the reference bf16 dequantization of it."""
    root = tmp_path_factory.mktemp("fp8")
    bf16 = build_hf_checkpoint("deepseek3", root / "bf16", dtype=torch.bfloat16, tokenizer=False)
    fp8, reference = root / "fp8", root / "reference"
    shutil.copytree(bf16, fp8)
    shutil.copytree(bf16, reference)
    state = load_file(bf16 / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, tensor in state.items():
        if _is_quantized(name, tensor):
            q, scale = _quantize(tensor, BLOCK)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            dequantized[name] = _reference_dequant(q, scale, BLOCK)
        else:
            quantized[name] = dequantized[name] = tensor
    assert sum(n.endswith("_scale_inv") for n in quantized) > 20
    save_file(quantized, fp8 / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, reference


def test_fp8_weights_are_dequantized_like_the_reference(tmp_path, fp8_and_reference):
    fp8, reference = fp8_and_reference
    mg = hf_to_mg(fp8, tmp_path / "mg", "deepseek3", "--target-tensor-parallel-size", "2",
                  "--target-expert-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    back = mg_to_hf(mg, tmp_path / "out", "deepseek3")
    assert_same_tensors(load_hf_state(reference), load_hf_state(back), "fp8 -> mg -> hf")  # no scale left
    config = json.loads((back / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def test_fp8_to_another_dtype_rounds_once(tmp_path, fp8_and_reference):
    """--params-dtype fp32 dequantizes straight to fp32 (no detour through bf16)."""
    fp8, _ = fp8_and_reference
    mg = hf_to_mg(fp8, tmp_path / "mg", "deepseek3", "--params-dtype", "fp32")
    back = load_hf_state(mg_to_hf(mg, tmp_path / "out", "deepseek3"))
    source = load_file(fp8 / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    q, scale = source[name], source[name + "_scale_inv"]
    expected = q.float() * scale.repeat_interleave(BLOCK[0], 0)[:q.shape[0]].repeat_interleave(BLOCK[1], 1)[:, :q.shape[1]]
    assert back[name].dtype == torch.float32 and torch.equal(back[name], expected)


def test_an_fp8_weight_without_its_scale_is_refused(tmp_path, fp8_and_reference):
    fp8, _ = fp8_and_reference
    broken = tmp_path / "broken"
    shutil.copytree(fp8, broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    result = subprocess.run(cli_argv("hf", "mg", broken, tmp_path / "mg", "--model-type-hf", "deepseek3"),
                            capture_output=True, text=True, timeout=120)
    line = assert_one_line_error(result.returncode, result.stderr)
    assert "model.layers.0.self_attn.o_proj.weight" in line and "without a block scale" in line


@pytest.mark.slow
def test_fp8_checkpoint_in_megatron_core_matches_the_bf16_model(tmp_path, fp8_and_reference):
    fp8, reference = fp8_and_reference
    mg = hf_to_mg(fp8, tmp_path / "mg", "deepseek3", "--mla-spelling", "mcore")
    tokens = sample_tokens(503)
    expected = hf_logits(reference, tokens, dtype=torch.float32)
    diff = (mcore_logits(mg, tokens)[..., :expected.shape[-1]] - expected).abs().max().item()
    assert diff <= 1e-4, diff
