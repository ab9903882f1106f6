"""Checkpoints are read through a restricted unpickler: training files load, hostile ones never run."""

import argparse
import os
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from modellink_ckpt.errors import ConvertError, UnsafeCheckpointError
from modellink_ckpt.formats.safe_pickle import Placeholder, load_torch
from modellink_ckpt.formats.torch_zip import StreamingTorchWriter


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


# --- what training runs pickle (Megatron-LM args), and callables smuggled next to it ------------


def _call_pickle(module: str, name: str, *args) -> bytes:
    """A protocol-2 pickle that calls module.name(*args) when loaded (GLOBAL, args tuple, REDUCE)."""
    arguments = pickle.dumps(tuple(args), protocol=2)[2:-1]  # without PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + arguments + b"R."


def _restricted_load(data: bytes):
    import io

    from modellink_ckpt.formats.safe_pickle import RestrictedUnpickler

    return RestrictedUnpickler(io.BytesIO(data)).load()


def test_signal_enum_members_load_by_lookup():
    import signal

    assert _restricted_load(pickle.dumps(signal.SIGTERM, protocol=2)) is signal.SIGTERM
    assert _restricted_load(pickle.dumps({"exit_signal": signal.SIGINT}, protocol=2))["exit_signal"] is signal.SIGINT


def test_enum_members_are_written_by_value_on_every_python(tmp_path):
    """Our writer pickles an enum member as `Signals(15)` whatever the running Python's default
    (Debian's 3.11.2 writes the bare global `signal.SIGTERM`, which torch's weights_only loader,
    megatron's common.pt reader, refuses); torch loads it with only the enum class allowed."""
    import signal
    import zipfile

    path = tmp_path / "args.pt"
    writer = StreamingTorchWriter(path)
    writer.close({"args": argparse.Namespace(exit_signal=signal.SIGTERM)})
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"signal\nSIGTERM" not in pickled
    registered = torch.serialization.get_safe_globals()  # torch's safe_globals() drops its classes on exit
    try:
        with torch.serialization.safe_globals([argparse.Namespace, signal.Signals]):
            assert torch.load(path, weights_only=True)["args"].exit_signal is signal.SIGTERM
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(registered)


@pytest.mark.parametrize("module, name, args", [
    ("signal", "signal", (10, 1)),                       # installs a handler
    ("signal", "raise_signal", (10,)),
    ("signal", "pthread_kill", (0, 0)),
    ("signal", "setitimer", (0, 100.0)),
    ("signal", "Signals", ("Evil", "A B")),              # the enum's functional API makes classes
    ("signal", "Signals", (12345,)),                     # not a member
    ("os", "system", ("true",)),
    ("builtins", "eval", ("1",)),
    ("builtins", "getattr", (0, "real")),
    ("numpy", "load", ("x.npy",)),
    ("numpy.lib.npyio", "load", ("x.npy",)),
    ("torch", "load", ("x.pt",)),
    ("_codecs", "decode", (b"x", "utf-8")),
])
def test_callables_next_to_the_allowed_ones_are_refused(module, name, args):
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        _restricted_load(_call_pickle(module, name, *args))
    assert signal.getsignal(signal.SIGUSR1) == before


def test_unknown_classes_stay_inert_and_are_not_written_back(tmp_path):
    """A class the loader does not know (a Megatron enum, or anything else outside the refused
    modules) becomes a placeholder that runs nothing; only Megatron's and MindSpeed's are written
    back under their own names."""
    marker = tmp_path / "pwned"
    obj = _restricted_load(_call_pickle("megatron.training.utils", "system", f"touch {marker}"))
    assert isinstance(obj, Placeholder) and not marker.exists()
    evil = _restricted_load(_call_pickle("evilpkg", "Backdoor", f"touch {marker}"))
    assert isinstance(evil, Placeholder) and not marker.exists()

    writer = StreamingTorchWriter(tmp_path / "ok.pt")
    writer.close({"args": argparse.Namespace(model_type=obj)})
    from megatron.core.enums import ModelType  # noqa: F401 - megatron is the reader of what we write back

    with pytest.raises(ConvertError, match="evilpkg.Backdoor"):
        StreamingTorchWriter(tmp_path / "evil.pt").close({"args": argparse.Namespace(x=evil)})


def test_training_args_written_back_under_their_own_names(tmp_path):
    """Megatron enums read as placeholders are written back as the same globals: megatron-core
    itself reads them as its real classes."""
    import signal

    from megatron.core.enums import ModelType

    args = argparse.Namespace(model_type=ModelType.encoder_or_decoder, exit_signal=signal.SIGTERM,
                              params_dtype=torch.bfloat16, rng=np.random.get_state())
    torch.save({"args": args}, tmp_path / "training.pt")
    loaded = load_torch(tmp_path / "training.pt")["args"]
    assert isinstance(loaded.model_type, Placeholder) and loaded.exit_signal is signal.SIGTERM
    writer = StreamingTorchWriter(tmp_path / "written.pt")
    writer.close({"args": loaded})
    back = torch.load(tmp_path / "written.pt", weights_only=False)["args"]
    assert back.model_type is ModelType.encoder_or_decoder and back.exit_signal is signal.SIGTERM
    assert back.params_dtype is torch.bfloat16 and np.array_equal(back.rng[1], args.rng[1])


def test_training_args_reach_a_child_process_intact(tmp_path):
    """The plan carries a training run's args to the saver process: its placeholders (known and
    unknown classes, enum members by name) arrive as the same placeholders, and the saver writes
    them back as the training run's own globals."""
    from megatron.core.enums import ModelType

    args = argparse.Namespace(model_type=ModelType.encoder_or_decoder)
    torch.save({"args": args}, tmp_path / "training.pt")
    loaded = load_torch(tmp_path / "training.pt")["args"]
    loaded.other = _restricted_load(_call_pickle("evilpkg", "Backdoor", "x"))
    loaded.member = type(loaded.model_type).member("encoder_or_decoder")
    copied = ForkingPickler.loads(bytes(ForkingPickler.dumps(loaded)))
    assert vars(copied) == vars(loaded) and type(copied.other) is type(loaded.other)
    assert [type(v).__name__ for v in vars(copied).values()] == ["ModelType", "Backdoor", "ModelType"]
    del copied.other  # an unknown class is never written back
    StreamingTorchWriter(tmp_path / "written.pt").close({"args": copied})
    back = torch.load(tmp_path / "written.pt", weights_only=False)["args"]
    assert back.model_type is ModelType.encoder_or_decoder and back.member is ModelType.encoder_or_decoder


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _getattr_pickle(builtins_name: str, owner: bytes, name: str) -> bytes:
    """getattr(<owner global>, name) as protocol 2 writes it (Python versions that pickle enum
    members by name)."""
    return b"\x80\x02" + _global(builtins_name, "getattr") + owner + pickle.dumps(name, protocol=2)[2:-1] + b"\x86R."


@pytest.mark.parametrize("data", [
    pytest.param(b"\x80\x02" + _global("signal", "Signals") + b"K\x0f\x85R.", id="by-value"),
    pytest.param(b"\x80\x02" + _global("signal", "SIGTERM") + b".", id="global-member"),
    pytest.param(_getattr_pickle("__builtin__", _global("signal", "Signals"), "SIGTERM"), id="getattr-py2-name"),
    pytest.param(_getattr_pickle("builtins", _global("signal", "Signals"), "SIGTERM"), id="getattr"),
])
def test_every_pickled_form_of_an_enum_member_loads(data):
    """Python versions pickle enum members as Signals(15), as the global signal.SIGTERM, or as
    getattr(Signals, "SIGTERM"): each is rebuilt by a member lookup."""
    import signal

    assert _restricted_load(data) is signal.SIGTERM


def test_megatron_enum_member_by_name_round_trips(tmp_path):
    from megatron.core.enums import ModelType

    data = _getattr_pickle("__builtin__", _global("megatron.core.enums", "ModelType"), "encoder_or_decoder")
    member = _restricted_load(data)
    assert isinstance(member, Placeholder) and "encoder_or_decoder" in repr(member)
    writer = StreamingTorchWriter(tmp_path / "x.pt")
    writer.close({"args": argparse.Namespace(model_type=member)})
    assert torch.load(tmp_path / "x.pt", weights_only=False)["args"].model_type is ModelType.encoder_or_decoder


@pytest.mark.parametrize("data", [
    pytest.param(_getattr_pickle("builtins", _global("signal", "Signals"), "__class__"), id="dunder-of-enum"),
    pytest.param(_getattr_pickle("builtins", _global("megatron.core.enums", "ModelType"), "_missing_"),
                 id="private-of-placeholder"),
    pytest.param(_getattr_pickle("builtins", _global("collections", "OrderedDict"), "fromkeys"), id="method"),
    pytest.param(b"\x80\x02" + _global("builtins", "getattr") + _global("signal", "Signals")
                 + pickle.dumps("SIGTERM", protocol=2)[2:-1] + b"K\x00\x87R.", id="three-arguments"),
    pytest.param(b"\x80\x02" + _global("signal", "SIGTERM") + b"K\x01\x85R.", id="calling-a-member"),
])
def test_getattr_serves_member_lookups_only(data):
    with pytest.raises((UnsafeCheckpointError, TypeError)):
        _restricted_load(data)
