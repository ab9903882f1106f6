"""Crash-safe output: write into a hidden folder beside the target, move it into place when complete.

A target that exists is therefore complete; an interrupted run leaves only a `.<name>.partial-<pid>`
folder, which the next run removes (when its process is gone) and mentions.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from modellink_ckpt.errors import ConvertError, UsageError

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(partial|old)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def remove_stale_partials(target: Path, quiet: bool = False, own: bool = False) -> None:
    """Remove leftovers of killed runs (their pid is gone) for `target` and for what is staged inside it;
    `own`: also this process's (its run failed, whatever it staged is abandoned)."""
    for parent, name in ((target.parent, target.name), (target, None)):
        if parent.is_dir():
            _remove_partials_in(parent, name, quiet, os.getpid() if own else None)


def _remove_partials_in(parent: Path, name: str | None, quiet: bool, own_pid: int | None) -> None:
    for entry in parent.iterdir():
        match = _PARTIAL.match(entry.name)
        if match and (name is None or match["name"] == name) and \
                (int(match["pid"]) == own_pid or not pid_alive(int(match["pid"]))):
            target = parent / match["name"]
            if entry.name.endswith(f".old-{match['pid']}") and not target.exists():
                # killed between the two renames of a replace: the previous target comes back
                os.replace(entry, target)
                if not quiet:
                    print(f"note: restored {target}, which an interrupted conversion was replacing", file=sys.stderr)
                continue
            if not quiet:
                print(f"note: removing {entry}, left by an interrupted conversion", file=sys.stderr)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def occupied(target: Path) -> bool:
    """An existing file or a non-empty folder (an empty folder is free to be replaced)."""
    return target.exists() and (not target.is_dir() or any(target.iterdir()))


def check_writable(folder: Path, flag: str = "--save-dir") -> None:
    """Refuse, before anything is written, a target folder that cannot be created or written in:
    a path through a file, a read-only filesystem, a folder without write permission. Probed by
    creating (and removing) a folder where the conversion will first write."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"lies under {existing}, which is a file"
        raise UsageError(f"{flag} {folder}: {what}, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".convert-probe-", dir=existing))
    except OSError as exc:
        where = "" if existing == folder else f" (in {existing}, where it would be created)"
        raise UsageError(f"{flag} {folder}: cannot write there{where}: {exc.strerror}") from None


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first (what a run creates)."""
    missing, folder = [], Path(folder)
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders of `missing_folders` a failed run created and left empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else was put there), or already gone
            pass


def check_target(target: Path, overwrite: bool, flag: str = "--save-dir") -> None:
    """Refuse to clobber an existing target unless asked (before anything is written)."""
    if occupied(target) and not overwrite:
        raise UsageError(f"{flag}: {target} already exists; pass --overwrite to replace it")


class StagedDir:
    """A folder written under a temporary name and published by an atomic rename."""

    def __init__(self, target: str | Path, overwrite: bool = False):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.target)
        check_target(self.target, overwrite)
        self.overwrite = overwrite
        self.path = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        if self.path.exists():
            shutil.rmtree(self.path)
        try:
            self.path.mkdir()
        except OSError as exc:
            raise ConvertError(f"{self.path}: cannot create ({exc.strerror})") from None

    @property
    def folder(self) -> Path:  # as StagedIteration names it (--workers, torchrun)
        return self.path

    def publish(self) -> Path:
        """Move the finished folder into place, replacing the old one (only when overwriting) in
        one atomic exchange: at every moment the target is the old folder or the new one."""
        if occupied(self.target):
            check_target(self.target, self.overwrite)
            if _exchange(self.path, self.target):
                shutil.rmtree(self.path, ignore_errors=True)  # now the old folder
                return self.target
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"  # no exchange: two renames
            os.replace(self.target, old)
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)
            return self.target
        os.replace(self.path, self.target)  # rename(2) also replaces an empty folder atomically
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)


class StagedIteration:
    """A Megatron checkpoint's iteration folder, staged. A new target is staged whole (iteration
    folder and tracker) and appears with one rename; into an existing checkpoint folder the
    iteration folder is published first and the tracker written last, as training does."""

    def __init__(self, save_dir: Path, iteration_dir_name: str, tracker: str, overwrite: bool):
        self.save_dir, self.tracker = Path(save_dir), tracker
        self.whole = not occupied(self.save_dir)
        self._staged = StagedDir(self.save_dir if self.whole else self.save_dir / iteration_dir_name,
                                 overwrite=overwrite)
        self.folder = self._staged.path / iteration_dir_name if self.whole else self._staged.path
        self.folder.mkdir(parents=True, exist_ok=True)

    def publish(self, iteration) -> None:
        if self.whole:
            (self._staged.path / self.tracker).write_text(str(iteration))
            self._staged.publish()
        else:
            self._staged.publish()
            write_text_atomic(self.save_dir / self.tracker, str(iteration))

    def discard(self) -> None:
        self._staged.discard()
