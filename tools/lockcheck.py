"""Compare the packages of the running Python environment with requirements.lock.

    python tools/lockcheck.py requirements.lock           fail unless the venv holds exactly the lock
    python tools/lockcheck.py --report requirements.lock  say what differs (make test-latest), exit 0
    python tools/lockcheck.py --write requirements.lock   re-pin the lock from the venv (make lock)

A package installed but not in the lock fails the check too: a new dependency must be pinned, or a
fresh clone would get whatever version is newest that day. One exception: torch's own platform
dependencies. The lock pins torch's version; which build of it pip installs depends on the
machine's pip configuration (a CPU build where one is offered, else PyPI's CUDA build with its
nvidia-*, cuda-* and triton wheels). What that torch requires and the lock does not pin is accepted
and named, never a failure; every package the lock pins must still match it exactly.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "modellink-ckpt"
HEADER = """\
# Exact versions of every package the test venv holds (direct, test and transitive), for 'make setup':
# pip install -c requirements.lock ... installs exactly these, on any machine, on any day.
# Regenerate with 'make lock' after changing requirements*.txt (then run 'make test').
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{canonical name: version without a local label (torch 2.13.0+cpu is 2.13.0)}."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) != PROJECT:
            found[canonical(name)] = dist.version.split("+")[0]
    return found


def _requirements(dist_name: str, extras: frozenset) -> list:
    """[(name, extras)] that the installed `dist_name` requires with `extras`, markers evaluated here."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # a venv without packaging: no platform dependencies are recognised
        return []
    found = []
    for line in metadata.requires(dist_name) or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            found.append((canonical(requirement.name), frozenset(requirement.extras)))
    return found


def platform_dependencies(pins: dict[str, str], root: str = "torch") -> set[str]:
    """The packages installed because `root`'s build requires them (transitively) that the lock does
    not pin: the CUDA build's nvidia-*, cuda-* and triton, nothing for the CPU build."""
    seen, todo = set(), [(canonical(root), frozenset())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            todo += _requirements(name, extras)
        except metadata.PackageNotFoundError:
            continue
    return {name for name, _ in seen} - set(pins) - {canonical(root)}


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def differences(pins: dict[str, str], have: dict[str, str], allowed: set[str] = frozenset()) -> list[str]:
    """What differs between the lock and the environment; `allowed`: unpinned packages accepted."""
    lines = []
    for name in sorted(set(pins) | set(have) - set(allowed)):
        if name not in have:
            lines.append(f"{name}: locked {pins[name]}, not installed")
        elif name not in pins:
            lines.append(f"{name}: {have[name]} installed, not in the lock")
        elif pins[name] != have[name]:
            lines.append(f"{name}: {have[name]} installed, locked {pins[name]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lock", type=Path)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report", action="store_true", help="print the differences, never fail")
    mode.add_argument("--write", action="store_true", help="write the lock from this environment")
    args = parser.parse_args(argv)
    have = installed()
    if args.write:  # torch's platform dependencies stay out of the lock: they differ by build
        platform = platform_dependencies(read_lock(args.lock) if args.lock.is_file() else {})
        kept = {name: version for name, version in have.items() if name not in platform}
        args.lock.write_text(HEADER + "".join(f"{name}=={kept[name]}\n" for name in sorted(kept)))
        print(f"{args.lock}: {len(kept)} packages pinned" + (f" ({len(platform)} of torch's platform dependencies "
                                                             f"left out)" if platform else ""))
        return 0
    pins = read_lock(args.lock)
    platform = platform_dependencies(pins)
    diff = differences(pins, have, platform)
    if platform and not args.report:
        print(f"torch's platform dependencies (this build of torch {have.get('torch', '?')}; not pinned): "
              + ", ".join(f"{name} {have[name]}" for name in sorted(platform) if name in have))
    if args.report:
        print(f"versions that differ from {args.lock}: " + ("none" if not diff else ""))
        for line in diff:
            print(f"  {line}")
        return 0
    if diff:
        print(f"error: this environment does not match {args.lock}:", file=sys.stderr)
        for line in diff:
            print(f"  {line}", file=sys.stderr)
        print("(after changing requirements*.txt run 'make lock' and commit requirements.lock)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
