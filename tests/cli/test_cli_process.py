"""tests/support/cli_process.py: a script run in a forked process gives what a fresh interpreter
gives (exit status, stdout, stderr, working folder, environment, arguments), also when it fails."""

import subprocess
import sys

import cli_process
import pytest

SCRIPT = """
import os, sys
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("PROBE"), "main", __name__)
print("to stderr", file=sys.stderr)
what = sys.argv[1]
if what == "exit":
    sys.exit(int(sys.argv[2]))
if what == "message":
    sys.exit("error: a message")
if what == "raise":
    raise ValueError("boom")
if what == "signal":
    os.kill(os.getpid(), 15)
"""


@pytest.mark.parametrize("argv", [["ok"], ["exit", "3"], ["exit", "0"], ["message"], ["raise"], ["signal"]])
def test_a_forked_command_is_what_a_fresh_interpreter_gives(tmp_path, argv):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = {"PROBE": "yes", "PATH": "/usr/bin:/bin"}
    forked = cli_process.run_script(script, argv, cwd=tmp_path, env=env, timeout=60)
    fresh = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path, env=env)
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    if argv == ["raise"]:  # the traceback's frames differ (runpy's), its last line does not
        assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == "ValueError: boom"
        assert forked.stderr.startswith("to stderr\nTraceback")
    else:
        assert forked.stderr == fresh.stderr


def test_a_command_past_its_timeout_is_killed(tmp_path):
    script = tmp_path / "sleeps.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        cli_process.run_script(script, [], cwd=tmp_path, timeout=2)
