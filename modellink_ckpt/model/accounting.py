"""Nothing left behind: the tensors a model needs against the tensors a checkpoint holds.

One function for every place that asks it: a source before its conversion (HF, MindSpore), a
Megatron stage once read, an adapter export, and `--verify` on every output. The caller says
what is expected (names, or names with their (shape, dtype)), what was found, and which found
names are excused (derivable copies, training state, layers left out on request).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping


def natural(name: str) -> list:
    """Sort key: `layers.10` after `layers.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclasses.dataclass(frozen=True)
class Accounting:
    missing: list[str]                          # expected, not found
    unexplained: list[str]                      # found, neither expected nor excused
    mismatched: list[tuple[str, Any, Any]]      # (name, found, expected) that differ in shape or dtype

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexplained or self.mismatched)

    def problems(self, where: str) -> list[str]:
        """One line per problem, as `--verify` lists them."""
        return ([f"{where}: missing tensor '{name}'" for name in self.missing]
                + [f"{where}: unexpected tensor '{name}'" for name in self.unexplained]
                + [f"{where}: '{name}' is {describe(*found)}, expected {describe(*expected)}"
                   for name, found, expected in self.mismatched])


def account(expected: Mapping[str, Any] | Iterable[str], found: Mapping[str, Any] | Iterable[str],
            excused: Callable[[str], bool] = lambda name: False) -> Accounting:
    """What `found` lacks of `expected`, what it holds that is neither expected nor `excused`,
    and (both given as {name: (shape, dtype)}) what it holds in another shape or dtype."""
    compare = isinstance(expected, Mapping) and isinstance(found, Mapping)
    expected_names = set(expected)
    found_names = set(found)
    mismatched = [(name, found[name], expected[name]) for name in sorted(expected_names & found_names, key=natural)
                  if compare and found[name] != expected[name]]
    return Accounting(
        missing=sorted(expected_names - found_names, key=natural),
        unexplained=sorted((name for name in found_names - expected_names if not excused(name)), key=natural),
        mismatched=mismatched)


def describe(shape, dtype) -> str:
    """`[64, 80] float32`."""
    return f"{list(shape)} {str(dtype).replace('torch.', '')}"
