"""A full disk: a 3 MB tmpfs as the target of a conversion that needs ~6 MB.

Whichever way the space runs out -- seen up front by the free-space check, during the writes
(the check skipped, as when another writer fills the disk meanwhile) or out of inodes -- the command
must fail with one line about the space, publish nothing and leave nothing behind: no
complete-looking target, no `.partial-` folder, the filesystem empty again.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from util import ROOT, assert_one_line_error, cli_argv, hf_to_mg, looks_complete, staging_leftovers

from modellink_ckpt.demo.models import build_hf_checkpoint

TP2PP2 = ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
TO_HF = ("--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1")
HANG = 60

# The command line with the up-front free-space check disabled, so the writes themselves hit ENOSPC.
_NO_PRECHECK = """
import sys
from modellink_ckpt.cli import convert, main
convert.check_free_space = lambda *args, **kwargs: None
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("diskfull")
    # ~6.4 MB of fp32 weights (4 shards), twice what the small tmpfs holds
    hf = build_hf_checkpoint("llama2", base / "hf", tokenizer=False, num_layers=8, hidden_size=128,
                             intermediate_size=352, max_shard_size="2MB")
    return hf, hf_to_mg(hf, base / "mg", "llama2")


def mount_tmpfs(mount_point: Path, options: str) -> None:
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")


def unmount(mount_point: Path) -> None:
    if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small"
    mount_tmpfs(mount_point, "size=3m")
    try:
        yield mount_point
    finally:
        unmount(mount_point)


@pytest.fixture
def few_inodes(tmp_path):
    mount_point = tmp_path / "few_inodes"
    mount_tmpfs(mount_point, "size=256m,nr_inodes=8")  # room for the bytes, not for the files
    try:
        yield mount_point
    finally:
        unmount(mount_point)


def run(argv, precheck: bool = True) -> subprocess.CompletedProcess:
    if not precheck:
        argv = [sys.executable, "-c", _NO_PRECHECK, *argv[2:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=HANG, cwd=ROOT)


def command(sources, direction: str, save: Path) -> list[str]:
    hf, mg = sources
    return (cli_argv("hf", "mg", hf, save, *TP2PP2) if direction == "hf2mg"
            else cli_argv("mg", "hf", mg, save, *TO_HF))


def assert_nothing_left(disk: Path, save: Path) -> None:
    assert not looks_complete(save), sorted(str(p) for p in disk.rglob("*"))
    assert not staging_leftovers(disk), staging_leftovers(disk)
    files = sorted(str(p) for p in disk.rglob("*") if p.is_file())
    assert not files, files
    assert shutil.disk_usage(disk).used < 64 << 10, "the partial output still takes space"


def test_too_small_disk_is_refused_up_front(sources, small_disk):
    save = small_disk / "out"
    result = run(command(sources, "hf2mg", save))
    line = assert_one_line_error(result.returncode, result.stderr, "hf2mg onto a 3 MB disk")
    assert re.search(r"no space left|only [\d.]+ [GM]B free", line, re.IGNORECASE), line
    assert_nothing_left(small_disk, save)


@pytest.mark.parametrize("direction", ["hf2mg", "mg2hf"])
def test_disk_full_during_the_writes(sources, small_disk, direction):
    save = small_disk / "out"
    result = run(command(sources, direction, save), precheck=False)
    line = assert_one_line_error(result.returncode, result.stderr, f"{direction} filling a 3 MB disk")
    assert "no space left" in line.lower(), line
    assert_nothing_left(small_disk, save)


@pytest.mark.slow  # another way to the same error path; lean default run
def test_out_of_inodes(sources, few_inodes):
    save = few_inodes / "out"
    result = run(command(sources, "hf2mg", save))
    line = assert_one_line_error(result.returncode, result.stderr, "hf2mg onto a filesystem without free inodes")
    assert "no space left" in line.lower(), line
    assert_nothing_left(few_inodes, save)
