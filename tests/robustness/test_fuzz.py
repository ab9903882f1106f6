"""Property test over corrupted inputs (hypothesis): whatever the damage, the command line either
succeeds (only where the damage is benign) or fails with exactly one 'error: ' line, no traceback,
no hang (60 s) and nothing complete-looking at the target.

Damage drawn:
  (a) HF safetensors shards: truncated; a flipped bit / garbage in the 8-byte header length; a
      garbage byte in the JSON header; a flipped bit in the tensor data (benign for hf -> mg:
      it only changes a weight, so it must succeed);
  (b) the torch zip rank files of an mg checkpoint: truncated; a flipped bit in the zip structure
      (local headers, central directory), in the pickle or in the tensor data;
  (c) model.safetensors.index.json: not JSON, no weight_map, a shard that does not exist, a key
      mapped to the wrong (existing) shard;
  (d) a tensor rewritten with another shape (same size reshaped, transposed, flattened, a row
      more or less).

Where the damage provably leaves every tensor as it was (a JSON header byte change that leaves
the parsed tensor entries equal, e.g. in the __metadata__ or the padding), a success must give
exactly the reference conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from util import (ROOT, assert_one_line_error, assert_same_tensors, cli_argv, hf_to_mg, load_hf_state, load_mg_state,
                  looks_complete, mg_to_hf, report_lines, run_argv, staging_leftovers)

from modellink_ckpt.demo.models import build_hf_checkpoint

TP2PP2 = ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
TO_HF = ("--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1")
HANG = 60
INDEX = "model.safetensors.index.json"

#: (kind, expectation, outcome) of every case run in this session: printed at the end of each test
CASES: Counter = Counter()


class Sources:
    def __init__(self, base: Path):
        self.hf = build_hf_checkpoint("llama2", base / "hf", tokenizer=False, max_shard_size="300KB")
        self.mg = hf_to_mg(self.hf, base / "mg", "llama2", *TP2PP2)
        self.ref_mg = {rank: state["model"] for rank, state in load_mg_state(self.mg).items()}
        self.ref_hf = load_hf_state(mg_to_hf(self.mg, base / "hf_out", "llama2"))
        self.index = json.loads((self.hf / INDEX).read_text())
        self.shards = sorted(set(self.index["weight_map"].values()))
        self.keys = sorted(self.index["weight_map"])
        self.rank_files = sorted(str(p.relative_to(self.mg)) for p in self.mg.rglob("model_optim_rng.pt"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return Sources(tmp_path_factory.mktemp("fuzz"))


# --- the damage ------------------------------------------------------------------------------
# Each corruption gets the copied source folder and a few free integers (reduced modulo whatever
# range applies, so hypothesis shrinks towards the first byte / bit / file) and returns the
# expectation: "fail", "ok" (must succeed) or "any"; "same" = may fail, a success must equal the
# reference.

def _flip(path: Path, pos: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))


def _header(path: Path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw, length


def _entries(header_bytes: bytes):
    """The tensor entries of a safetensors JSON header, None if it does not parse as one."""
    try:
        header = json.loads(header_bytes)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    return header


def st_truncate(src: Path, s: Sources, shard: int, cut: int, _b: int) -> str:
    path = src / s.shards[shard % len(s.shards)]
    os.truncate(path, cut % path.stat().st_size)
    return "fail"


def st_length_bit(src: Path, s: Sources, shard: int, _a: int, bit: int) -> str:
    _flip(src / s.shards[shard % len(s.shards)], (bit % 64) // 8, bit % 8)
    return "fail"


def st_length_garbage(src: Path, s: Sources, shard: int, value: int, _b: int) -> str:
    path = src / s.shards[shard % len(s.shards)]
    raw, length = _header(path)
    new = value % (1 << 64)
    if new == length:
        new ^= 1 << 40
    path.write_bytes(struct.pack("<Q", new) + raw[8:])
    return "fail"


def st_header_byte(src: Path, s: Sources, shard: int, pos: int, byte: int) -> str:
    path = src / s.shards[shard % len(s.shards)]
    raw, length = _header(path)
    pos = 8 + pos % length
    new = byte % 256
    if new == raw[pos]:
        new ^= 0x55
    damaged = raw[:pos] + bytes([new]) + raw[pos + 1:]
    path.write_bytes(damaged)
    before, after = _entries(raw[8:8 + length]), _entries(damaged[8:8 + length])
    if after is None:
        return "fail"
    if after == before:
        return "same"  # metadata or padding: nothing a reader needs changed
    return "fail"  # a name, dtype (even F32 -> I32 of the same size), shape or offset changed


def st_data_bit(src: Path, s: Sources, shard: int, pos: int, bit: int) -> str:
    path = src / s.shards[shard % len(s.shards)]
    _, length = _header(path)
    start = 8 + length
    _flip(path, start + pos % (path.stat().st_size - start), bit % 8)
    return "ok"


def _rank_file(src: Path, s: Sources, which: int) -> Path:
    return src / s.rank_files[which % len(s.rank_files)]


def _zip_regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos, start_dir = zf.infolist(), zf.start_dir
    regions: dict[str, list[tuple[int, int]]] = {"structure": [(start_dir, len(raw))], "pickle": [], "data": []}
    for info in infos:
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
        begin = info.header_offset + 30 + name_len + extra_len
        regions["structure"].append((info.header_offset, info.header_offset + 30 + name_len))
        regions["pickle" if info.filename.endswith("data.pkl") else "data"].append((begin, begin + info.compress_size))
    return regions


def _pick(ranges: list[tuple[int, int]], n: int) -> int:
    total = sum(end - begin for begin, end in ranges)
    n %= total
    for begin, end in ranges:
        if n < end - begin:
            return begin + n
        n -= end - begin
    raise AssertionError


def mg_truncate(src: Path, s: Sources, which: int, cut: int, _b: int) -> str:
    path = _rank_file(src, s, which)
    os.truncate(path, cut % path.stat().st_size)
    return "fail"


def _mg_flip(region: str):
    def corrupt(src: Path, s: Sources, which: int, pos: int, bit: int) -> str:
        path = _rank_file(src, s, which)
        _flip(path, _pick(_zip_regions(path)[region], pos), bit % 8)
        return "any"   # some zip fields are never read; a pickle or data bit may be harmless
    corrupt.__name__ = f"mg_flip_{region}"
    return corrupt


def index_not_json(src: Path, s: Sources, cut: int, _a: int, _b: int) -> str:
    path = src / INDEX
    text = path.read_text().rstrip()
    path.write_text(text[:cut % len(text)])  # a strict prefix of an object is never JSON
    return "fail"


def index_no_weight_map(src: Path, s: Sources, variant: int, _a: int, _b: int) -> str:
    index = dict(s.index)
    del index["weight_map"]
    if variant % 2:
        index["weightmap"] = s.index["weight_map"]
    (src / INDEX).write_text(json.dumps(index))
    return "fail"


def index_missing_shard(src: Path, s: Sources, key: int, number: int, _b: int) -> str:
    index = json.loads(json.dumps(s.index))
    index["weight_map"][s.keys[key % len(s.keys)]] = f"model-{9 + number % 90000:05d}-of-00004.safetensors"
    (src / INDEX).write_text(json.dumps(index))
    return "fail"


def index_wrong_shard(src: Path, s: Sources, key: int, shard: int, _b: int) -> str:
    index = json.loads(json.dumps(s.index))
    name = s.keys[key % len(s.keys)]
    others = [f for f in s.shards if f != index["weight_map"][name]]
    index["weight_map"][name] = others[shard % len(others)]
    (src / INDEX).write_text(json.dumps(index))
    return "same"


def _reshaped(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    if tensor.dim() == 2 and mode % 5 == 0 and tensor.shape[0] != tensor.shape[1]:
        return tensor.t()
    if tensor.dim() == 2 and mode % 5 == 1 and tensor.shape[0] % 2 == 0:
        return tensor.reshape(tensor.shape[0] // 2, tensor.shape[1] * 2)
    if tensor.dim() == 2 and mode % 5 == 2:
        return tensor.reshape(-1)
    if tensor.dim() == 1 and mode % 5 in (0, 1, 2) and tensor.shape[0] % 8 == 0:
        return tensor.reshape(8, -1)
    if mode % 2:
        return torch.cat([tensor, tensor[:1]])
    return tensor[:-1]


def shape_mismatch(src: Path, s: Sources, key: int, mode: int, _b: int) -> str:
    name = s.keys[key % len(s.keys)]
    path = src / s.index["weight_map"][name]
    tensors = load_file(path)
    tensors[name] = _reshaped(tensors[name], mode).contiguous()
    assert tensors[name].shape != load_file(s.hf / path.name)[name].shape
    save_file(tensors, path, metadata={"format": "pt"})
    return "fail"


GROUPS = {
    "a: safetensors bytes": [st_truncate, st_length_bit, st_length_garbage, st_header_byte, st_data_bit],
    "b: mg rank files": [mg_truncate, _mg_flip("structure"), _mg_flip("pickle"), _mg_flip("data")],
    "c: index": [index_not_json, index_no_weight_map, index_missing_shard, index_wrong_shard],
    "d: shapes": [shape_mismatch],
}
KINDS = {case.__name__: case for cases in GROUPS.values() for case in cases}
MG_CASES = GROUPS["b: mg rank files"]
HF_CASES = [case for group, cases in GROUPS.items() for case in cases if cases is not MG_CASES]


def case_strategy(kinds):
    return st.tuples(st.sampled_from(kinds), st.integers(0, 1 << 40), st.integers(0, 1 << 40),
                     st.integers(0, 1 << 40))


# --- one case --------------------------------------------------------------------------------

def run_case(s: Sources, corrupt, a: int, b: int, c: int) -> None:
    hf_input = corrupt in HF_CASES
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        tmp = Path(tmp)
        src = shutil.copytree(s.hf if hf_input else s.mg, tmp / "src")
        expect = corrupt(src, s, a, b, c)
        save = tmp / "out"
        argv = cli_argv("hf", "mg", src, save, *TP2PP2) if hf_input else cli_argv("mg", "hf", src, save, *TO_HF)
        what = f"{corrupt.__name__}({a}, {b}, {c}) expecting {expect}"
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=HANG, cwd=ROOT)
        except subprocess.TimeoutExpired:
            CASES[(corrupt.__name__, expect, "hang")] += 1
            pytest.fail(f"hang: {what} ran over {HANG} s")
        outcome = "ok" if result.returncode == 0 else "error"
        if outcome == "error" and "internal error" in result.stderr:
            outcome = "internal error"
        CASES[(corrupt.__name__, expect, outcome)] += 1
        assert "Traceback" not in result.stderr, f"{what}: {result.stderr}"
        if result.returncode != 0:
            assert expect != "ok", f"{what}: benign damage refused: {result.stderr}"
            assert_one_line_error(result.returncode, result.stderr, what)
            assert not looks_complete(save), f"{what}: failed but left a complete-looking target"
        else:
            assert expect != "fail", f"{what}: damaged input converted without an error"
            if hf_input:
                models = {rank: state["model"] for rank, state in load_mg_state(save).items()}
                assert sorted(models) == sorted(s.ref_mg)
                if expect == "same":
                    for rank, model in models.items():
                        assert_same_tensors(model, s.ref_mg[rank], f"{what}: {rank}")
            else:
                state = load_hf_state(save / "mg2hf")
                assert sorted(state) == sorted(s.ref_hf), what
        assert not staging_leftovers(tmp), f"{what}: leftovers {staging_leftovers(tmp)}"


def fuzz(s: Sources, examples: dict[str, int], request) -> int:
    """Run the property `count` times for each group of damage or single kind in `examples`
    (hypothesis' choice among many kinds is far from even: some would never be drawn)."""
    before = Counter(CASES)
    for label, count in examples.items():
        @settings(max_examples=count, deadline=None, database=None, derandomize=True,
                  phases=(Phase.explicit, Phase.generate), print_blob=False,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(case_strategy(GROUPS[label] if label in GROUPS else [KINDS[label]]))
        def prop(case):
            run_case(s, *case)

        prop()
    this_run = CASES - before
    ran = sum(this_run.values())
    lines = [f"fuzz cases run: {ran} (this session: {sum(CASES.values())})"]
    lines += [f"  {kind} [{expect}] -> {outcome}: {n}" for (kind, expect, outcome), n in sorted(this_run.items())]
    report_lines(request, lines)
    return ran


def test_fuzz_corrupted_inputs(sources, request):
    ran = fuzz(sources, {"a: safetensors bytes": 3, "b: mg rank files": 2, "c: index": 2, "d: shapes": 1}, request)
    assert ran >= 7


@pytest.mark.slow
def test_fuzz_corrupted_inputs_many(sources, request):
    examples = {kind: 7 for kind in KINDS} | {"st_header_byte": 9}  # 100 cases, every kind drawn
    assert fuzz(sources, examples, request) >= 90


# --- damage the property cannot judge, pinned down -------------------------------------------

def _damaged_hf_copy(s: Sources, tmp: Path, damage) -> Path:
    src = shutil.copytree(s.hf, tmp / "src")
    for shard in s.shards:
        raw, length = _header(src / shard)
        if damage(src / shard, raw, length):
            return src
    pytest.skip("no shard of this model has the needed header layout")


@pytest.mark.slow  # a fixed bug (a float weight stored as I32 converted silently), kept as a regression test
def test_dtype_changed_in_header_is_refused(sources, tmp_path):
    def to_int32(path, raw, length):
        head = raw[8:8 + length]
        if b'"F32"' not in head:
            return False
        i = head.index(b'"F32"') + 1
        path.write_bytes(raw[:8 + i] + b"I" + raw[8 + i + 1:])
        return True

    src = _damaged_hf_copy(sources, tmp_path, to_int32)
    result = run_argv(cli_argv("hf", "mg", src, tmp_path / "out", *TP2PP2), timeout=HANG, cwd=ROOT)
    assert_one_line_error(result.returncode, result.stderr, "F32 -> I32 in a safetensors header")
    assert not looks_complete(tmp_path / "out")


@pytest.mark.slow  # a fixed bug (offsets not required to tile the data region), kept as a regression test
def test_header_length_into_padding_is_refused(sources, tmp_path):
    def shorten(path, raw, length):
        pad = length - len(raw[8:8 + length].rstrip(b" "))
        if not pad:
            return False
        path.write_bytes(struct.pack("<Q", length - pad) + raw[8:])
        return True

    src = _damaged_hf_copy(sources, tmp_path, shorten)
    save = tmp_path / "out"
    result = run_argv(cli_argv("hf", "mg", src, save, *TP2PP2), timeout=HANG, cwd=ROOT)
    if result.returncode == 0:  # acceptable only if nothing changed, which cannot be: the data moved
        for rank, state in load_mg_state(save).items():
            assert_same_tensors(state["model"], sources.ref_mg[rank], f"converted despite a shifted header: {rank}")
    else:
        assert_one_line_error(result.returncode, result.stderr, "header length into the padding")
        assert not looks_complete(save)
