"""`convert_ckpt.py inspect PATH`: every registered source format describes itself, detected."""

import shutil

import torch
from util import MEGATRON_LM_FIXTURES, assert_one_line_error, hf_to_mg, run_cli, run_convert

from modellink_ckpt.demo.models import build_hf_checkpoint


def _facts(path) -> dict[str, str]:
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    return {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip()
            for line in result.stdout.splitlines() if line.strip() and not line.startswith(" ")}


def test_inspect_every_format(tmp_path):
    hf = build_hf_checkpoint("qwen3", tmp_path / "hf", tokenizer=False, dtype=torch.bfloat16)
    mg = hf_to_mg(hf, tmp_path / "mg", "qwen3", "--target-tensor-parallel-size", "2")
    run_convert("--load-model-type", "hf", "--save-model-type", "ms", "--model-type-hf", "qwen3", "--load-dir", hf,
                "--save-dir", tmp_path / "ms")
    dist = shutil.copytree(MEGATRON_LM_FIXTURES / "torch_dist", tmp_path / "dist")
    facts = {name: _facts(path) for name, path in
             (("hf", hf), ("mg", mg), ("ms", tmp_path / "ms"), ("dist", dist))}
    assert facts["hf"]["format"] == "hf" and facts["hf"]["family (--model-type-hf)"].startswith("qwen3 (from config.json")
    assert facts["mg"]["format"] == "mg" and facts["mg"]["layout"] == "TP2 PP1"
    assert facts["ms"]["format"] == "ms" and facts["ms"]["naming"] == "mcore"
    assert facts["dist"]["format"] == "mg (torch_dist)" and facts["dist"]["iteration"] == "7"
    assert facts["hf"]["parameters"] == facts["ms"]["parameters"]  # the same model, its bytes counted alike
    assert facts["hf"]["dtypes"].startswith("1 ")
    (tmp_path / "nothing-here").mkdir()
    result = run_cli("inspect", tmp_path / "nothing-here")
    assert "not a checkpoint this tool recognises" in assert_one_line_error(result.returncode, result.stderr)
    result = run_cli("inspect", tmp_path / "nowhere")
    assert f"{tmp_path / 'nowhere'}: does not exist" in assert_one_line_error(result.returncode, result.stderr)


def test_inspect_of_torch_dist_names_the_spec_that_wrote_it(tmp_path):
    """A torch_dist store spells every norm fused into its linear whichever spec wrote it: the
    spelling shown is the stored args' (Megatron-LM's fixture used the local spec)."""
    hf = build_hf_checkpoint("llama2", tmp_path / "hf", num_layers=2, tokenizer=False)
    spellings = {}
    for impl in ("local", "transformer_engine"):
        run_convert("--load-model-type", "hf", "--save-model-type", "mg", "--ckpt-format", "torch_dist",
                           "--transformer-impl", impl, "--load-dir", hf, "--save-dir", tmp_path / impl)
        spellings[impl] = _facts(tmp_path / impl)["spelling"]
    fixture = MEGATRON_LM_FIXTURES / "torch_dist"
    spellings["fixture"] = _facts(fixture)["spelling"]
    assert spellings["local"].startswith("transformer_impl local,"), spellings
    assert spellings["transformer_engine"].startswith("transformer_impl transformer_engine,"), spellings
    assert spellings["fixture"].startswith("transformer_impl local,"), spellings
