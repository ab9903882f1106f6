"""Shared helpers for the tests: run conversions, read checkpoints back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from cli_process import run_script
from safetensors.torch import load_file

from modellink_ckpt.cli.convert import convert

ROOT = Path(__file__).resolve().parents[2]
# checkpoints written by Megatron-LM's own training code (see its README)
MEGATRON_LM_FIXTURES = ROOT / "tests" / "fixtures" / "megatron-lm-core_v0.16.1"


def run_convert(*argv) -> dict:
    """One conversion in-process (loader and saver still run as their own processes)."""
    return convert([str(a) for a in argv] + ["--quiet"])


def run_cli(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python convert_ckpt.py ... --quiet` in a process of its own, as a user runs it (see
    cli_process for how the process starts)."""
    return run_script(ROOT / "convert_ckpt.py", [*argv, "--quiet"], cwd=ROOT, timeout=timeout)


def run_argv(argv: list, *, timeout: float = 300, cwd=None, env=None) -> subprocess.CompletedProcess:
    """A `cli_argv` command line (`python SCRIPT ...`) in a process of its own."""
    assert argv[0] == sys.executable, argv[0]
    return run_script(Path(argv[1]), argv[2:], cwd=cwd or os.getcwd(), env=env, timeout=timeout)


def hf_to_mg(hf_dir, mg_dir, family="llama2", *layout_flags) -> Path:
    run_convert("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg",
                "--model-type-hf", family, "--use-mcore-models", "--load-dir", hf_dir, "--save-dir", mg_dir,
                *layout_flags)
    return Path(mg_dir)


def mg_to_hf(mg_dir, save_dir, family="llama2", *flags) -> Path:
    run_convert("--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", "hf",
                "--model-type-hf", family, "--use-mcore-models", "--load-dir", mg_dir, "--save-dir", save_dir,
                "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1", *flags)
    return Path(save_dir) / "mg2hf"


def load_hf_state(folder) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    if not state:
        for path in sorted(folder.glob("pytorch_model*.bin")):
            state.update(torch.load(path, weights_only=True))
    return state


def load_mg_state(folder) -> dict[str, dict]:
    """{rank folder: whole rank file dict} of a Megatron checkpoint written by us."""
    folder = Path(folder)
    iteration = (folder / "latest_checkpointed_iteration.txt").read_text().strip()
    iter_dir = folder / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    return {p.parent.name: torch.load(p, weights_only=False) for p in sorted(iter_dir.glob("mp_rank_*/model_optim_rng.pt"))}


def assert_same_tensors(a: dict, b: dict, what: str = "") -> None:
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{what}: {name} dtype {a[name].dtype} vs {b[name].dtype}"
        assert a[name].shape == b[name].shape, f"{what}: {name} shape {a[name].shape} vs {b[name].shape}"
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# --- helpers for the crash, fuzz and disk-full tests -------------------------------------------

CLI_BASE = ("--model-type", "GPT", "--model-type-hf", "llama2", "--use-mcore-models")


def cli_argv(load_type, save_type, load_dir, save_dir, *flags, quiet: bool = True) -> list[str]:
    """The full `python convert_ckpt.py ...` command line (for Popen / subprocess.run)."""
    argv = [sys.executable, str(ROOT / "convert_ckpt.py"), *CLI_BASE, "--load-model-type", load_type,
            "--save-model-type", save_type, "--load-dir", str(load_dir), "--save-dir", str(save_dir),
            *map(str, flags)]
    return argv + ["--quiet"] if quiet else argv


def assert_one_line_error(returncode: int, stderr: str, what: str = "") -> str:
    """A failure as the contract wants it: non-zero exit, exactly one non-empty stderr line
    starting with 'error: ', no traceback. Returns that line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode != 0, f"{what}: expected a failure, got exit 0"
    assert "Traceback" not in stderr, f"{what}: traceback on stderr:\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: not one 'error: ' line:\n{stderr}"
    return lines[0]


def staging_leftovers(folder) -> list[Path]:
    """Hidden `.<name>.partial-<pid>` / `.<name>.old-<pid>` entries anywhere under `folder`."""
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name)


def looks_complete(save_dir) -> bool:
    """Whether anything under `save_dir` looks like a finished checkpoint: a tracker file, a visible
    iteration folder or an `mg2hf` folder (hidden staging entries do not count)."""
    save_dir = Path(save_dir)
    if not save_dir.exists():
        return False
    visible = [p for p in save_dir.rglob("*")
               if not any(part.startswith(".") for part in p.relative_to(save_dir).parts)]
    return any(p.name == "latest_checkpointed_iteration.txt" or p.name.startswith("iter_") or p.name == "mg2hf"
               for p in visible)


def report_lines(request, lines) -> None:
    """Print summary lines to the terminal even while pytest captures output (shown with -q too)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for line in lines:
            print(line, flush=True)


def mg_to_mg(src, dst, family, *flags):
    run_convert("--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", "mg", "--model-type-hf", family,
                "--use-mcore-models", "--load-dir", src, "--save-dir", dst, *flags)
    return dst


def assert_same_checkpoint(a, b):
    ranks_a, ranks_b = load_mg_state(a), load_mg_state(b)
    assert sorted(ranks_a) == sorted(ranks_b)
    for rank in ranks_a:
        ra, rb = ranks_a[rank], ranks_b[rank]
        assert sorted(k for k in ra if k.startswith("model")) == sorted(k for k in rb if k.startswith("model"))
        for key in ra:
            if key.startswith("model"):
                assert_same_tensors(ra[key], rb[key], f"{rank}/{key}")
        assert vars(ra["args"]) == {**vars(rb["args"]), "tokenizer_model": ra["args"].tokenizer_model}
