"""Checkpoints are read through a restricted unpickler: training files load, hostile ones never run."""

import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from modellink_ckpt.errors import ConvertError, UnsafeCheckpointError
from modellink_ckpt.safe_pickle import Placeholder, load_torch
from modellink_ckpt.torch_zip import StreamingTorchWriter


class RunsCode:
    """Unpickling this would create a file, if the unpickler let it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload", [RunsCode, EvalsCode])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "hook": payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_torch(path)
    assert not marker.exists()


def test_legacy_non_zip_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump(RunsCode(marker), f, protocol=2)
    with pytest.raises(ConvertError):
        load_torch(path)
    assert not marker.exists()


def test_training_checkpoint_with_dtypes_enums_and_rng_state_loads(tmp_path):
    from megatron.core.enums import ModelType

    args = argparse.Namespace(params_dtype=torch.bfloat16, model_type=ModelType.encoder_or_decoder,
                              num_layers=2, lr=1e-4, data_path=["a", "b"], seq=None)
    state = {"args": args, "iteration": 7, "checkpoint_version": 3.0,
             "model": {"w": torch.arange(6.0).reshape(2, 3)},
             "rng_state": [{"random_rng_state": ("x", (1, 2), None), "np_rng_state": np.random.get_state(),
                            "torch_rng_state": torch.get_rng_state()}]}
    path = tmp_path / "model_optim_rng.pt"
    torch.save(state, path)
    loaded = load_torch(path)
    assert loaded["args"].params_dtype is torch.bfloat16 and loaded["args"].num_layers == 2
    assert isinstance(loaded["args"].model_type, Placeholder)  # inert: the enum module is never imported
    assert "ModelType" in repr(loaded["args"].model_type)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert isinstance(loaded["rng_state"][0]["np_rng_state"][1], np.ndarray)


def test_streamed_file_reads_back_like_torch_save(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.randn(4, 6).t(),
               "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3)}
    writer = StreamingTorchWriter(tmp_path / "x.pt")
    refs = {k: writer.add_tensor(v) for k, v in tensors.items()}
    writer.close({"args": argparse.Namespace(n=1), "model": refs})
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "x.pt", weights_only=False, mmap=mmap)
        for k, v in tensors.items():
            assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v)
    assert load_torch(tmp_path / "x.pt")["args"].n == 1
