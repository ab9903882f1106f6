import multiprocessing
import os
from multiprocessing import forkserver
from pathlib import Path

import pytest

from modellink_ckpt.engine.pipeline import FORKSERVER_PRELOAD


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (multi-process megatron-core runs); run with --run-slow or -m slow")
    if not _xdist_controller(config):
        _start_fork_server()


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: use --run-slow (or -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _xdist_controller(config) -> bool:
    """The process that hands tests to pytest-xdist's workers and runs none itself."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def _start_fork_server() -> None:
    """One fork server per test process, for both kinds of children the tests start: the
    converter's loader and saver (run in-process, `--workers` too) and the Megatron-Core ranks of
    tests/support/mcore_harness.py. It imports torch, the converter and megatron-core once, in the
    background while the tests are collected; a Megatron-Core rank spawned on its own paid ~5 s to
    import megatron-core, each of the 2-4 ranks of each check."""
    multiprocessing.set_forkserver_preload([*FORKSERVER_PRELOAD, "modellink_ckpt.cli.main", "megatron_preload"])
    # Python 3.11's server ignores the sys.path it is given (it skips a preload it cannot import):
    # it gets this checkout's package (not another one an editable install points to) and the
    # test support code by PYTHONPATH
    tests = Path(__file__).resolve().parent
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tests.parent), str(tests / "support"), before]))
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
