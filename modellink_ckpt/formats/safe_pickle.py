"""Loading `torch.save` files without ever running code from them.

`torch.load(weights_only=False)` executes whatever a pickle asks for; `weights_only=True` refuses
the `args` Namespace, dtypes and Megatron enums of real training checkpoints. This unpickler
allows the few globals a checkpoint needs, turns unknown classes (Megatron enums and configs)
into inert placeholders that are never imported or called, and refuses anything from modules
that can reach the system (os, subprocess, signal functions, builtins functions, ...).

What a Megatron-LM / MindSpeed-LLM training run pickles, and how it is rebuilt:
- `argparse.Namespace`, containers, numbers, strings: as themselves;
- torch dtypes, storages, tensors and parameters: through torch's own rebuild functions;
- numpy arrays and dtypes (the numpy RNG state, pickled through `_codecs.encode`): as numpy objects;
- members of the standard library's plain-value enums (`args.exit_signal = signal.SIGTERM` is a
  `signal.Signals`), in each way Python versions pickle them (`Signals(15)`, the global
  `signal.SIGTERM`, `getattr(Signals, "SIGTERM")`): by a member lookup by value or name, never the
  enum's functional API and never anything else from its module (`signal.signal`,
  `signal.raise_signal` are refused; `getattr` serves member lookups only);
- Megatron's and MindSpeed's own enums and classes (`ModelType`, `AttnBackend`, configs): inert
  placeholders holding their value; written back under the same name when a conversion stores
  the training run's args again (`repicklable`).
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import enum
import pickle
import signal
import types
import zipfile
from multiprocessing.reduction import ForkingPickler
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


class _MemberLookup:
    """Stands for an allowed enum class in a pickle: calling it (`REDUCE(EnumClass, (value,))`) looks
    a member up by value, one positional value and nothing else (more arguments would be the
    functional API, which makes new classes); `getattr` on it looks a member up by name."""

    def __init__(self, enum_class: type[enum.Enum], source: str):
        self.enum_class, self.source = enum_class, source

    def _refuse(self, why: str) -> UnsafeCheckpointError:
        qualname = f"{self.enum_class.__module__}.{self.enum_class.__qualname__}"
        return UnsafeCheckpointError(f"{self.source}: refused to load: {qualname} {why}")

    def __call__(self, *args, **kwargs):
        if len(args) != 1 or kwargs:
            raise self._refuse(f"called with {len(args)} argument(s), not as a member lookup")
        try:
            return self.enum_class(args[0])
        except ValueError:
            raise self._refuse(f"has no member {args[0]!r}") from None

    def by_name(self, name: str):
        if name not in self.enum_class.__members__:
            raise self._refuse(f"has no member named {name!r}")
        return self.enum_class.__members__[name]


# Plain-value enums of the standard library that training args hold (members only).
_ENUMS = {("signal", cls.__name__): cls
          for cls in (signal.Signals, signal.Handlers, getattr(signal, "Sigmasks", None)) if cls is not None}

# Their members by name (`signal.SIGTERM`: newer Pythons pickle global enum members that way).
_ENUM_MEMBERS = {("signal", member.name): member for cls in _ENUMS.values() for member in cls}


def _member_by_name(source: str):
    """`getattr(EnumClass, "NAME")`, as some Python versions pickle enum members, rebuilt as a
    member lookup by name: of an allowed enum (the member) or of a placeholder class (an inert
    placeholder member); any other use of getattr is refused."""

    def lookup(owner, name, *default):
        if default or not isinstance(name, str):
            raise UnsafeCheckpointError(f"{source}: refused to load: getattr used other than for an enum member")
        if isinstance(owner, _MemberLookup):
            return owner.by_name(name)
        if is_placeholder_class(owner) and name.isidentifier() and not name.startswith("_"):
            return owner.member(name)
        raise UnsafeCheckpointError(f"{source}: refused to load: getattr({getattr(owner, '__name__', owner)!r}, "
                                    f"{name!r}) is no enum member lookup")

    return lookup


# Modules whose globals could touch the system or run code: refused outright.
_FORBIDDEN_ROOTS = {
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "code", "codeop", "pty",
    "socket", "ctypes", "marshal", "pickle", "_pickle", "io", "_io", "pathlib", "tempfile", "webbrowser",
    "multiprocessing", "threading", "signal", "asyncio", "builtins", "__builtin__", "functools", "operator",
    "inspect", "types", "copyreg", "pdb", "timeit", "platform", "glob", "urllib", "http",
    "requests", "torch", "numpy", "_codecs", "codecs", "zipimport", "pkgutil", "site", "sysconfig",
}


# Placeholders from these packages are written back under their own names (`repicklable`):
# Megatron's and MindSpeed's enums and configs, which the training run that reads the output
# imports anyway. Anything else met in a checkpoint stays behind: no conversion passes an unknown
# global on to the next reader.
REPICKLABLE_ROOTS = {"megatron", "mindspeed", "mindspeed_llm", "modellink", "copyreg"}


class Placeholder:
    """Stands for an object of a class this loader does not import (e.g. a Megatron enum).

    Made either by calling the class (`REDUCE`: `args` are the call's) or by `cls.__new__`
    (`NEWOBJ`: `args` are __new__'s); `state` is what `BUILD` gave it."""

    _qualname = "?"
    _module, _name = "?", "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj._called, obj._member = args, kwargs, None, False, None
        return obj

    @classmethod
    def member(cls, name: str) -> "Placeholder":
        """The enum member `name` of the class this stands for (pickled as `getattr(cls, name)`)."""
        obj = cls.__new__(cls)
        obj._member = name
        return obj

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self._called = args, kwargs, True

    def __setstate__(self, state):
        self.state = state

    def written_back(self):
        """The reduce value of the same global and arguments it was read from, for a checkpoint
        written again (only for `repicklable` classes)."""
        cls = type(self)
        if not repicklable(cls) or self.kwargs:
            raise ConvertError(f"{self._qualname}: an object of an unknown class cannot be written back")
        if self._member is not None:
            return getattr, (cls, self._member)
        if self._called:
            return (cls, self.args) if self.state is None else (cls, self.args, self.state)
        return (copyreg.__newobj__, (cls, *self.args)) + (() if self.state is None else (self.state,))

    def __reduce__(self):
        """An exact copy for another process (the plan carries a training run's args to the saver);
        a checkpoint writer asks for `written_back` instead."""
        return _placeholder, (self._module, self._name, self.args, self.kwargs, self.state, self._called, self._member)

    def __repr__(self):
        if self._member is not None:
            return f"<{self._qualname}.{self._member}>"
        shown = ", ".join(map(repr, self.args))
        return f"<{self._qualname}({shown})>"

    def __eq__(self, other):
        return type(self) is type(other) and (self.args, self.state, self._member) == \
            (other.args, other.state, other._member)

    def __hash__(self):
        return hash((self._qualname, repr(self.args), self._member))


_placeholders: dict[str, type] = {}


def repicklable(cls) -> bool:
    """Whether `cls` is a placeholder class that may be written back under its own name."""
    return is_placeholder_class(cls) and cls._module.split(".")[0] in REPICKLABLE_ROOTS


def is_placeholder_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, Placeholder)


class _PlaceholderType(type):
    """The type of each placeholder class (made on the fly, so no module holds it by name)."""


def placeholder_class(module: str, name: str) -> type:
    qualname = f"{module}.{name}"
    if qualname not in _placeholders:
        _placeholders[qualname] = _PlaceholderType(name, (Placeholder,), {
            "_qualname": qualname, "_module": module, "_name": name, "__module__": "placeholder"})
    return _placeholders[qualname]


def _placeholder(module: str, name: str, args, kwargs, state, called: bool, member):
    """A placeholder object again, in another process (the inverse of Placeholder.__reduce__)."""
    obj = placeholder_class(module, name).__new__(placeholder_class(module, name), *args, **kwargs)
    obj.state, obj._called, obj._member = state, called, member
    return obj


# a placeholder class travels to a child process as the call that makes it again
ForkingPickler.register(_PlaceholderType, lambda cls: (placeholder_class, (cls._module, cls._name)))


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
        if key in _ENUMS:
            return _MemberLookup(_ENUMS[key], self.source)
        if key in _ENUM_MEMBERS:
            return _ENUM_MEMBERS[key]
        if key in (("builtins", "getattr"), ("__builtin__", "getattr")):
            return _member_by_name(self.source)
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
