"""Loading `torch.save` files without ever running code from them.

`torch.load(weights_only=False)` executes whatever a pickle asks for; `weights_only=True` refuses
the `args` Namespace, dtypes and Megatron enums of real training checkpoints. This unpickler
allows the few globals a checkpoint needs, turns unknown classes (Megatron enums and configs)
into inert placeholders that are never imported or called, and refuses anything from modules
that can reach the system (os, subprocess, builtins functions, ...).
"""

from __future__ import annotations

import argparse
import collections
import pickle
import types
import zipfile
from pathlib import Path

import torch

from modellink_ckpt.errors import ConvertError, UnsafeCheckpointError

_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_TORCH_STORAGES = {name for name in dir(torch) if name.endswith("Storage")}

_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "range"): range,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "object"): object,
    ("_codecs", "encode"): lambda text, encoding="utf-8": text.encode(encoding),  # bytes in protocol 2
    ("copyreg", "_reconstructor"): None,  # filled below: only for placeholder classes
}


def _numpy_allowed() -> dict:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return {}
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(core, "_reconstruct")] = multiarray._reconstruct
        allowed[(core, "scalar")] = multiarray.scalar
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    allowed[("numpy.random._pickle", "__randomstate_ctor")] = None  # RNG states become placeholders
    return allowed


# Modules whose globals could touch the system or run code: refused outright.
_FORBIDDEN_ROOTS = {
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "code", "codeop", "pty",
    "socket", "ctypes", "marshal", "pickle", "_pickle", "io", "_io", "pathlib", "tempfile", "webbrowser",
    "multiprocessing", "threading", "signal", "asyncio", "builtins", "__builtin__", "functools", "operator",
    "inspect", "types", "copyreg", "pdb", "timeit", "platform", "glob", "urllib", "http",
    "requests", "torch", "numpy", "_codecs", "codecs", "zipimport", "pkgutil", "site", "sysconfig",
}


class Placeholder:
    """Stands for an object of a class this loader does not import (e.g. a Megatron enum)."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __reduce__(self):  # placeholders must not be re-pickled as something they are not
        raise TypeError(f"placeholder for {self._qualname} cannot be pickled")

    def __repr__(self):
        shown = ", ".join(map(repr, self.args))
        return f"<{self._qualname}({shown})>"

    def __eq__(self, other):
        return type(self) is type(other) and self.args == other.args and self.state == other.state

    def __hash__(self):
        return hash((self._qualname, repr(self.args)))


_placeholders: dict[str, type] = {}


def placeholder_class(module: str, name: str) -> type:
    qualname = f"{module}.{name}"
    if qualname not in _placeholders:
        _placeholders[qualname] = type(name, (Placeholder,), {"_qualname": qualname, "__module__": "placeholder"})
    return _placeholders[qualname]


class RestrictedUnpickler(pickle.Unpickler):
    allowed = {**_ALLOWED, **_numpy_allowed()}
    source = "checkpoint"

    def find_class(self, module: str, name: str):
        key = (module, name)
        if module == "torch" and (name in _TORCH_DTYPES or name in _TORCH_STORAGES):
            return getattr(torch, name)
        if key in self.allowed:
            found = self.allowed[key]
            return found if found is not None else placeholder_class(module, name)
        root = module.split(".")[0]
        if root in _FORBIDDEN_ROOTS:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to load: its pickle references {module}.{name}, which could run code")
        return placeholder_class(module, name)


def restricted_pickle_module(source: str) -> types.ModuleType:
    """A stand-in for the `pickle` module, as `torch.load(pickle_module=...)` takes it."""

    class Unpickler(RestrictedUnpickler):
        pass

    Unpickler.source = source
    module = types.ModuleType("restricted_pickle")
    module.Unpickler = Unpickler
    module.load = lambda f, **kw: Unpickler(f, **kw).load()
    module.__name__ = "restricted_pickle"
    return module


def load_torch(path: str | Path, *, mmap: bool = True):
    """`torch.load` through the restricted unpickler; tensors memory-mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    module = restricted_pickle_module(str(path))
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", pickle_module=module, weights_only=False, mmap=use_mmap)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # torch raises many kinds for broken files; name the file once
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvertError(f"{path}: cannot read checkpoint ({reason})") from None
