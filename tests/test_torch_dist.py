"""Megatron torch_dist checkpoints (torch.distributed.checkpoint stores) read without megatron-core:
the real training save of tests/fixtures/megatron-lm-core_v0.16.1/torch_dist, and bad input.

Conversions of it checked by Megatron-Core are in test_training_checkpoints.py.
"""

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from modellink_ckpt.formats.torch_dist import TorchDistStore
from util import ROOT, assert_one_line_error, looks_complete, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "megatron-lm-core_v0.16.1" / "torch_dist"


@pytest.fixture
def dist(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "dist"))


def test_store_reads_what_torch_distributed_checkpoint_reads(dist):
    """Every tensor (TP/PP/layer chunks stitched) equals torch's own dcp.load of it; layer regions
    read alone equal the matching slice."""
    import torch.distributed.checkpoint as dcp

    store = TorchDistStore(dist / "iter_0000007")
    reader = dcp.FileSystemReader(str(dist / "iter_0000007"))
    assert "decoder.layers.mlp.linear_fc1.weight" in store.tensors and store.objects
    for key, entry in store.tensors.items():
        reference = torch.empty(entry.shape, dtype=entry.dtype)
        dcp.load({key: reference}, storage_reader=reader, no_dist=True)
        assert torch.equal(store.read(key), reference), key
        if key.startswith("decoder.layers."):
            assert torch.equal(store.read(key, (slice(1, 2),))[0], reference[1]), key


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _convert(dist, out):
    return run_cli("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama2",
                   "--load-dir", dist, "--save-dir", out)


def test_bad_torch_dist_input_is_one_line(dist, tmp_path):
    iteration = dist / "iter_0000007"
    cases = {}

    def case(name, damage, message):
        broken = Path(shutil.copytree(dist, tmp_path / name))
        damage(broken / "iter_0000007")
        cases[name] = (broken, message)

    case("missing-distcp", lambda d: (d / "__0_1.distcp").unlink(), "__0_1.distcp: missing")
    case("truncated-metadata", lambda d: (d / ".metadata").write_bytes((iteration / ".metadata").read_bytes()[:500]),
         ".metadata: cannot read torch_dist metadata")
    case("truncated-distcp", lambda d: (d / "__0_0.distcp").write_bytes((iteration / "__0_0.distcp").read_bytes()[:9000]),
         "__0_0.distcp")
    marker = tmp_path / "pwned"

    def hostile_common(d):
        state = torch.load(d / "common.pt", weights_only=False)
        state["hook"] = _RunsCode(marker)
        torch.save(state, d / "common.pt")

    case("hostile-common", hostile_common, "refused to load: its pickle references posix.system")

    def hostile_metadata(d):
        with open(d / ".metadata", "wb") as f:
            pickle.dump(_RunsCode(marker), f)

    case("hostile-metadata", hostile_metadata, "refused to load")

    def key_missing(d):  # the store lacks a tensor the model needs
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(str(d))
        metadata = reader.read_metadata()
        del metadata.state_dict_metadata["decoder.final_layernorm.weight"]
        with open(d / ".metadata", "wb") as f:
            pickle.dump(metadata, f)

    case("key-missing", key_missing, "missing tensor 'decoder.final_layernorm.weight'")
    case("no-metadata-json", lambda d: (d / "metadata.json").unlink(), "an incomplete torch_dist checkpoint")
    for name, (broken, message) in cases.items():
        out = tmp_path / f"out-{name}"
        result = _convert(broken, out)
        line = assert_one_line_error(result.returncode, result.stderr, name)
        assert message in line, (name, line)
        assert not looks_complete(out), name
    assert not marker.exists()
