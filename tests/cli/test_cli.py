"""The command lines a new user meets: help that answers at once and names every command and flag,
one line (not a traceback) when the Python lacks the converter's packages, progress that suits a
log, and MindFormers' drop-ins that speak their own flags."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import run_script
from util import ROOT, assert_one_line_error, cli_argv, run_cli

from modellink_ckpt.cli import arguments
from modellink_ckpt.demo.models import build_hf_checkpoint
from modellink_ckpt.engine.progress import PlainProgress
from modellink_ckpt.formats import file_io
from modellink_ckpt.formats.megatron import args as megatron_args
from modellink_ckpt.formats.megatron import names as mg_names


def _imported(*argv) -> set[str]:
    """The top-level modules a command imports (python -X importtime)."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "convert_ckpt.py"), *argv],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["verify", "--help"], ["--verify", "--help"],
                                  ["inspect", "--help"]])
def test_help_and_version_answer_without_loading_torch(argv):
    modules = _imported(*argv)
    assert "modellink_ckpt" in modules and "torch" not in modules, sorted(modules)


def test_help_names_every_command_and_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for needle in ("inspect PATH", "verify PATH", "MindSpore", "convert_weight.py", "transform_checkpoint.py",
                   "transform_ckpt_lora.py", "unified_safetensors.py"):
        assert needle in result.stdout, needle
    undocumented = [action.option_strings[0] for action in arguments.build_parser()._actions
                    if action.option_strings and not action.help]
    assert undocumented == [], undocumented
    assert run_cli("--version").stdout.startswith("convert_ckpt.py (modellink-ckpt) ")


def test_the_parsers_choices_are_the_names_the_code_acts_on():
    assert set(arguments.DTYPE_NAMES) == set(megatron_args.DTYPE_FLAGS)
    assert tuple(arguments.MLA_SPELLINGS) == tuple(mg_names.MLA_SPELLINGS)
    assert set(arguments.HASH_NAMES) == set(file_io.HASHES)


@pytest.mark.parametrize("script", ["convert_ckpt.py", "convert_weight.py", "transform_checkpoint.py",
                                    "transform_ckpt_lora.py", "unified_safetensors.py"])
def test_a_python_without_the_packages_gets_one_line_pointing_at_make_setup(tmp_path, script):
    """As with a system Python in a fresh shell: torch cannot be imported."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['torch'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / script), "--load-model-type", "hf", "--save-model-type", "mg",
                             "--load-dir", tmp_path, "--save-dir", tmp_path / "out"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    line = assert_one_line_error(result.returncode, result.stderr)
    assert "lacks the package 'torch'" in line and "make setup" in line and ".venv/bin/python" in line


def test_plain_progress_is_a_few_lines():
    lines = []
    progress = PlainProgress(total=32, desc="saving layers", unit="layer")
    original = sys.stderr
    try:
        import io

        sys.stderr = buffer = io.StringIO()
        for _ in range(32):
            progress.update(1)
        progress.close()
        lines = buffer.getvalue().splitlines()
    finally:
        sys.stderr = original
    assert len(lines) == 10 and "\r" not in "".join(lines)
    assert lines[0].startswith("saving layers: 4/32 layers (12%), ")
    assert lines[-1].startswith("saving layers: 32/32 layers (100%), ")


def test_a_conversion_logged_to_a_file_has_plain_progress_lines(tmp_path):
    hf = build_hf_checkpoint("llama2", tmp_path / "hf", num_layers=4, tokenizer=False)
    argv = cli_argv("hf", "mg", hf, tmp_path / "mg", quiet=False)
    with open(tmp_path / "log", "w") as log:
        result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / "log").read_text()
    assert result.returncode == 0, text
    assert "\r" not in text
    assert "saving layers: 4/4 layers (100%)" in text
    assert text.strip().splitlines()[-1].startswith("done: wrote ")


def _script(name, *argv):
    return run_script(ROOT / name, [*argv, "--quiet"], cwd=ROOT, timeout=300)


def test_convert_weight_speaks_its_own_flags(tmp_path):
    hf = build_hf_checkpoint("llama2", tmp_path / "hf", num_layers=2, tokenizer=False)
    ckpt = tmp_path / "ms" / "llama.ckpt"
    ckpt.parent.mkdir()
    assert _script("convert_weight.py", "--model", "llama", "--input_path", hf, "--output_path", ckpt).returncode == 0
    cases = [
        (["--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", tmp_path / "back"],
         f"--input_path {ckpt}: a MindSpore checkpoint holds no model sizes; pass --config"),
        (["--model", "qwen", "--input_path", hf, "--output_path", tmp_path / "q.ckpt"],
         f"--model qwen: {hf / 'config.json'} describes model_type 'llama'; use --model llama"),
        (["--model", "llama", "--input_path", hf, "--output_path", Path("/sys/convert-ckpt-test.ckpt")],
         "--output_path /sys/convert-ckpt-test.ckpt: cannot write there"),
        (["--model", "llama", "--input_path", tmp_path / "nowhere", "--output_path", tmp_path / "x.ckpt"],
         f"--input_path {tmp_path / 'nowhere'}: does not exist"),
    ]
    for argv, expected in cases:
        result = _script("convert_weight.py", *argv)
        line = assert_one_line_error(result.returncode, result.stderr, str(argv))
        assert expected in line, line
        for ours in ("--load-dir", "--save-dir", "--hf-cfg-dir", "--model-type-hf", ".convert-"):
            assert ours not in line, line


def test_transform_checkpoint_speaks_its_own_flags(tmp_path):
    hf = build_hf_checkpoint("llama2", tmp_path / "hf", num_layers=2, tokenizer=False)
    ckpt = tmp_path / "llama.ckpt"
    assert _script("convert_weight.py", "--model", "llama", "--input_path", hf, "--output_path", ckpt).returncode == 0
    for argv, expected in (
            (["--src_checkpoint", ckpt, "--dst_checkpoint_dir", "/sys/convert-ckpt-test"],
             "--dst_checkpoint_dir /sys/convert-ckpt-test: cannot write there"),
            (["--src_checkpoint", tmp_path, "--dst_checkpoint_dir", tmp_path / "out", "--src_strategy",
              tmp_path / "none.ckpt"], "--src_strategy")):
        result = _script("transform_checkpoint.py", *argv)
        line = assert_one_line_error(result.returncode, result.stderr, str(argv))
        assert expected in line and "--src-strategy" not in line and "--dst-strategy" not in line, line
