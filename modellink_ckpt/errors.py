"""Errors the converter reports as one line, without a traceback.

`UsageError` is a problem with the command line or the requested layout (exit code 2, raised
before anything is written); `ConvertError` is a problem found in the input or while writing
(exit code 1). Both carry a message that names the file, tensor or flag involved. `Interrupted`
is Ctrl-C, at any moment of a run (exit code 130, as shells report SIGINT); `Terminated` is
SIGTERM while the loaders and savers run (exit code 143).
"""

import sys


class ConvertError(Exception):
    """A conversion failed for a reason the user can act on."""

    exit_code = 1


class UsageError(ConvertError):
    """The command line asks for something impossible; nothing has been written."""

    exit_code = 2


class _Stopped(ConvertError):
    """A signal stopped the run: every process stopped, and no target was published."""

    message = ""

    def __init__(self):
        super().__init__(self.message)


class Interrupted(_Stopped):
    """Ctrl-C (SIGINT)."""

    exit_code = 130  # 128 + SIGINT, as shells report it
    message = "interrupted; nothing was completed"


class Terminated(_Stopped):
    """SIGTERM to the command (a scheduler's time limit, `kill`)."""

    exit_code = 143  # 128 + SIGTERM
    message = "terminated (SIGTERM); nothing was completed"


class UnsafeCheckpointError(ConvertError):
    """A pickle inside a checkpoint tried to reach code that loading must never run."""


def missing_package(exc: ModuleNotFoundError) -> str | None:
    """The one line for a Python that lacks a package the converter needs (a fresh shell's system
    Python rather than the repository's .venv), or None when the module missing is our own."""
    package = (exc.name or "").split(".")[0]
    if not package or package == "modellink_ckpt":
        return None
    return (f"this Python ({sys.executable}) lacks the package '{package}' the converter needs: run 'make setup' "
            f"in the repository, then use .venv/bin/python (or activate .venv)")
