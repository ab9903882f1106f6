"""SIGKILL at a random moment: the parent, the loader or the saver.

Whatever dies, the target must afterwards be either free of anything complete-looking (a new
target) or the previous complete checkpoint, byte for byte (with --overwrite); no child may outlive
a killed parent; and the same command run again must succeed, produce exactly the reference
conversion and leave no `.partial-` / `.old-` leftovers.

The loader and saver are the two children of the command-line process, in the order they are
forked (loader first): read from /proc/<pid>/task/*/children. The saver's pid is also the one in
the staging folder's name, which the trials check whenever the staging folder exists at the kill.

This test process makes itself a child subreaper for the trials (and reaps what is reparented to
it), as any real init does: the machine this was written on has a PID 1 that never reaps orphans,
whose zombies would otherwise look alive forever (see test_partial_of_a_zombie_is_removed).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from util import (ROOT, assert_one_line_error, assert_same_tensors, cli_argv, hf_to_mg, load_hf_state, load_mg_state,
                  looks_complete, mg_to_hf, report_lines, staging_leftovers)

from modellink_ckpt.demo.models import build_hf_checkpoint

MODEL = dict(num_layers=16, hidden_size=256, intermediate_size=704)  # ~48 MB fp32: ~0.15-0.2 s in the children
# one loader and one saver whatever the machine's cores (--workers has its own tests)
TP2PP2 = ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--workers", "1")
TO_HF = ("--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1")
TRACKER = "latest_checkpointed_iteration.txt"
ROLES = ("parent", "loader", "saver")
SCENARIOS = ("hf2mg", "mg2hf", "hf2mg-overwrite", "mg2hf-overwrite")
HANG = 60            # seconds: anything slower counts as a hang
CHILD_GRACE = 10     # seconds for the children of a killed parent to be gone
KILL_WINDOW = 0.25   # seconds after the fork in which a kill is drawn (the children's work takes ~0.2 s)
PR_SET_CHILD_SUBREAPER = 36
_STAGED = re.compile(r"^\.(?P<name>.+)\.(partial|old)-(?P<pid>\d+)$")


# --- processes -------------------------------------------------------------------------------

def _stat(pid: int):
    """(state, starttime) of a process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def children_of(pid: int) -> list[int]:
    """Child pids in the order the kernel keeps them (creation order), main thread's first."""
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=lambda t: (int(t) != pid, int(t)))
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            found += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return found


class Proc:
    def __init__(self, pid: int):
        self.pid = pid
        stat = _stat(pid)
        self.start = stat[1] if stat else None

    def alive(self) -> bool:
        """Running (not a zombie) and still the same process (pid not reused)."""
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start and stat[0] not in "ZXx"

    def reap(self, seconds: float = 0.0) -> None:
        """Collect it if it has become our child (we are a subreaper) and exited (waiting up to `seconds`)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                    return
            except ChildProcessError:  # not (or no longer) our child
                return
            time.sleep(0.01)


@pytest.fixture(scope="module")
def subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) not available")
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def wait_gone(procs, seconds: float) -> list[Proc]:
    """Wait until none of `procs` is alive; returns the survivors (killed and reaped here)."""
    deadline = time.monotonic() + seconds
    while True:
        for proc in procs:
            proc.reap()
        survivors = [p for p in procs if p.alive()]
        if not survivors or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for proc in survivors:  # clean up after a failure (these are the converter's children, by pid)
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:  # no zombie may stay behind: its pid would look alive to the next run
        proc.reap(seconds=5.0)
    return survivors


# --- checkpoints -----------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every visible file (hidden staging entries excluded)."""
    result = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            result[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


class World:
    """The model, the reference conversions and the 'previous' targets the overwrite trials replace."""

    def __init__(self, base: Path):
        self.hf = build_hf_checkpoint("llama2", base / "hf", tokenizer=False, max_shard_size="10MB", **MODEL)
        self.ref_mg = hf_to_mg(self.hf, base / "ref_mg", "llama2", *TP2PP2)
        self.ref_hf = mg_to_hf(self.ref_mg, base / "ref_hf", "llama2")
        # previous targets with other files than the references, so "old" and "new" never look alike
        self.old_mg = hf_to_mg(self.hf, base / "old_mg", "llama2")  # TP1 PP1
        self.old_hf = mg_to_hf(self.ref_mg, base / "old_hf", "llama2", "--max-shard-size", "20MB").parent
        self.ref_mg_models = {rank: state["model"] for rank, state in load_mg_state(self.ref_mg).items()}
        self.ref_hf_state = load_hf_state(self.ref_hf)
        self.ref_hf_files = sorted(p.name for p in self.ref_hf.glob("*.safetensors"))

    def setup(self, scenario: str, work: Path):
        """(save dir, the checkpoint folder inside it, argv without --overwrite, snapshot of the old one)."""
        work.mkdir(parents=True)
        if scenario.startswith("hf2mg"):
            save = work / "mg"
            argv = ["hf", "mg", self.hf, save, *TP2PP2]
            if scenario.endswith("overwrite"):
                shutil.copytree(self.old_mg, save)
            return save, save, argv, snapshot(save) if save.exists() else None
        save = work / "out"
        argv = ["mg", "hf", self.ref_mg, save, *TO_HF]
        if scenario.endswith("overwrite"):
            shutil.copytree(self.old_hf, save)
        return save, save / "mg2hf", argv, snapshot(save / "mg2hf") if save.exists() else None

    def is_new(self, kind: str, ckpt: Path) -> bool:
        """The checkpoint is exactly the reference conversion (and complete)."""
        if kind == "mg":
            if not (ckpt / TRACKER).exists():
                return False
            models = {rank: state["model"] for rank, state in load_mg_state(ckpt).items()}
            assert sorted(models) == sorted(self.ref_mg_models), f"{ckpt}: rank folders {sorted(models)}"
            for rank, model in models.items():
                assert_same_tensors(model, self.ref_mg_models[rank], f"{ckpt} {rank}")
            return True
        if not ckpt.is_dir():
            return False
        assert sorted(p.name for p in ckpt.glob("*.safetensors")) == self.ref_hf_files, sorted(ckpt.iterdir())
        assert (ckpt / "config.json").is_file()
        assert_same_tensors(load_hf_state(ckpt), self.ref_hf_state, str(ckpt))
        return True


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("kill"))


def classify_after_kill(world: World, kind: str, save: Path, ckpt: Path, old: dict | None) -> str:
    """'nothing' (no complete-looking target), 'old' (the previous one intact) or 'new' (the
    reference conversion, complete); anything else fails."""
    if old is not None:
        if ckpt.exists() and snapshot(ckpt) == old:
            return "old"
        assert world.is_new(kind, ckpt), (
            f"{ckpt}: neither the previous checkpoint intact nor the new one complete; "
            f"visible files: {sorted(snapshot(ckpt)) if ckpt.exists() else 'target gone'}")
        return "new"
    if not looks_complete(save):
        return "nothing"
    assert world.is_new(kind, ckpt), f"{save}: a complete-looking target that is not the finished conversion"
    return "new"


# --- one trial -------------------------------------------------------------------------------

def kill_trial(world: World, work: Path, scenario: str, victim: str, rng: random.Random) -> dict:
    save, ckpt, argv, old = world.setup(scenario, work)
    kind = argv[1]
    flags = ["--overwrite"] if old is not None else []
    mine_before = set(children_of(os.getpid()))
    stderr_path = work / "stderr.txt"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cli_argv(*argv, *flags), stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    parent = Proc(proc.pid)
    record = {"scenario": scenario, "victim": victim, "notes": []}
    kids: list[Proc] = []
    early = victim == "parent" and rng.random() < 0.25
    try:
        if early:  # mostly during the imports, before the fork; watch for children meanwhile
            seen: dict[int, Proc] = {}
            until = time.monotonic() + rng.uniform(0.0, 2.0)
            while True:
                for pid in children_of(proc.pid):
                    seen.setdefault(pid, Proc(pid))
                if time.monotonic() >= until or proc.poll() is not None:
                    break
                time.sleep(0.002)
            kids = list(seen.values())
        else:
            deadline = time.monotonic() + HANG
            while proc.poll() is None and time.monotonic() < deadline:
                pids = children_of(proc.pid)
                if len(pids) >= 2:
                    kids = [Proc(pid) for pid in pids]
                    break
                time.sleep(0.002)
            assert proc.poll() is not None or kids, "no children within the hang limit"
            assert proc.poll() is not None or len(kids) == 2, f"expected loader and saver, got {len(kids)} children"
            record["delay"] = delay = rng.uniform(0.0, KILL_WINDOW)
            time.sleep(delay)
        target = {"parent": parent, "loader": kids[0] if kids else None,
                  "saver": kids[1] if len(kids) > 1 else None}[victim]
        staged = [int(m["pid"]) for p in staging_leftovers(work) if (m := _STAGED.match(p.name))]
        if len(kids) == 2 and staged:  # the ordering assumption: the saver owns the staging folder
            assert kids[1].pid in staged, f"saver {kids[1].pid} does not own the staging folders {staged}"
        if proc.poll() is not None:
            record["landed"] = "after exit"
        elif target is None or not target.alive():
            record["landed"] = "victim not started" if target is None else "victim already done"
        else:
            if not kids:
                record["landed"] = "before fork"
            elif not any(kid.alive() for kid in kids):
                record["landed"] = "after the children finished"
            else:
                record["landed"] = "during conversion"
            os.kill(target.pid, signal.SIGKILL)
            record["delivered"] = True
        try:
            returncode = proc.wait(timeout=HANG)
        except subprocess.TimeoutExpired:
            pytest.fail(f"hang: the command did not exit within {HANG} s after the {victim} was killed")
        # children of a dead parent come to us (subreaper): count them too
        orphans = [Proc(pid) for pid in set(children_of(os.getpid())) - mine_before - {proc.pid}]
        survivors = wait_gone(kids + orphans, CHILD_GRACE)
        assert not survivors, f"children survived the {victim}'s death: {[p.pid for p in survivors]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = stderr_path.read_text()
    record["returncode"] = returncode

    if victim == "parent" and record.get("delivered") and returncode == 0:
        # SIGKILL cannot be caught: exit 0 means the parent had exited (a zombie not yet reaped
        # takes the signal without effect) between the liveness check and the kill
        record["landed"], record["delivered"] = "after exit", False
    killed_parent = victim == "parent" and record.get("delivered", False)
    if killed_parent:
        assert returncode == -signal.SIGKILL, returncode
        if record["landed"] == "before fork":  # no child was ever seen: none may have published anything
            assert not looks_complete(save) or (old is not None and snapshot(ckpt) == old), \
                "a target was published although the parent was killed before it forked"
    elif returncode != 0:
        line = assert_one_line_error(returncode, stderr, f"{scenario}, {victim} killed")
        if record["landed"] == "during conversion":  # the cause, not the survivor's follow-up error
            assert f"the {victim} process was killed by signal 9" in line, line
    record["state"] = state = classify_after_kill(world, kind, save, ckpt, old)
    if returncode == 0:
        assert state == "new", f"exit 0 but the target is {state}"
    if returncode > 0 and state == "new":
        record["notes"].append("error reported although the new target was published")
    leftovers = staging_leftovers(work)
    if not killed_parent:  # a living parent removes what its killed child left behind
        assert not leftovers, f"leftovers after the {victim} was killed: {leftovers}"

    # the same command again: it must succeed, clean up and give exactly the reference
    # (--overwrite only where a complete target exists: what a kill leaves must not block a rerun)
    again = ["--overwrite"] if old is not None or state == "new" else []
    rerun = subprocess.run(cli_argv(*argv, *again, quiet=False), capture_output=True, text=True, timeout=HANG,
                           cwd=ROOT)
    assert rerun.returncode == 0, f"rerun failed: {rerun.stderr[-2000:]}"
    assert "Traceback" not in rerun.stderr
    if leftovers:
        assert "note: removing" in rerun.stderr, f"no note about {leftovers}: {rerun.stderr[-2000:]}"
    assert world.is_new(kind, ckpt), "the rerun did not produce the reference conversion"
    assert not staging_leftovers(work), staging_leftovers(work)
    if kind == "mg":  # only the new layout's rank folders remain
        ranks = sorted(p.name for p in (ckpt / "iter_0000001").glob("mp_rank_*"))
        assert ranks == sorted(world.ref_mg_models), ranks
    shutil.rmtree(work)
    return record


def run_trials(world: World, base: Path, trials: int, seed: int, request) -> list[dict]:
    rng = random.Random(seed)
    victims = [ROLES[i % 3] for i in range(trials)]
    scenarios = [SCENARIOS[i % 4] for i in range(trials)]
    rng.shuffle(victims)
    rng.shuffle(scenarios)
    records = []
    for index, (scenario, victim) in enumerate(zip(scenarios, victims)):
        try:
            records.append(kill_trial(world, base / f"trial{index:03d}", scenario, victim, rng))
        except BaseException as exc:
            raise AssertionError(f"trial {index} (seed {seed}): {scenario}, killing the {victim}: {exc}") from exc
    def tally(field):
        return ", ".join(f"{k} {v}" for k, v in sorted(Counter(r[field] for r in records).items()))

    summary = [f"kill trials: {len(records)} (seed {seed})", f"  killed: {tally('victim')}",
               f"  scenarios: {tally('scenario')}", f"  kill landed: {tally('landed')}",
               f"  target after the kill: {tally('state')}"]
    summary += [f"  note: trial {i}: {note}" for i, r in enumerate(records) for note in r["notes"]]
    report_lines(request, summary)
    return records


def test_kill_at_random_moments(world, subreaper, tmp_path, request):
    records = run_trials(world, tmp_path, trials=4, seed=1234, request=request)
    assert len(records) == 4 and {r["victim"] for r in records} == set(ROLES)


@pytest.mark.slow
def test_kill_at_random_moments_many(world, subreaper, tmp_path, request):
    records = run_trials(world, tmp_path, trials=24, seed=20240601, request=request)
    assert len(records) == 24 and all(Counter(r["victim"] for r in records)[role] == 8 for role in ROLES)


# --- the narrow windows, made deterministic ------------------------------------------------
# Each runs the command line with one moment forced (a wrapper around the CLI's main); the wrapper
# writes the file named by $INJECTED when its injection fires, so a test cannot pass vacuously
# after the code it hooks has changed.

_PRELUDE = """
import os, signal, sys, time
from pathlib import Path
def fired():
    Path(os.environ["INJECTED"]).write_text("fired")
"""
_MAIN = """
from modellink_ckpt.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

# The saver SIGKILLs itself at the most dangerous moment of publishing over an existing target:
# right after the atomic exchange, or, where the filesystem has none (NO_EXCHANGE), right after
# the first of the two fallback renames (old target moved aside, new one not yet in place).
_KILL_WHILE_PUBLISHING = _PRELUDE + """
from modellink_ckpt.engine import staging
def die():
    fired()
    os.kill(os.getpid(), signal.SIGKILL)
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if ".old-" in os.fspath(dst):
        die()
os.replace = replace
real_exchange = staging._exchange
def exchange(a, b):
    if os.environ.get("NO_EXCHANGE"):
        return False
    done = real_exchange(a, b)
    if done:
        die()
    return done
staging._exchange = exchange
""" + _MAIN

# The loader SIGKILLs itself right after passing on its first tensor message; the saver takes each
# message half a second late, so it unpickles that one (and asks the dead loader for its shared
# memory) after the loader died.
_LOADER_DIES_MID_MESSAGE = _PRELUDE + """
from modellink_ckpt.engine import pipeline
real_send = pipeline.Sender.send
def send(self, kind, *args, **kwargs):
    real_send(self, kind, *args, **kwargs)
    if kind == "embeddings":
        time.sleep(0.2)
        fired()
        os.kill(os.getpid(), signal.SIGKILL)
pipeline.Sender.send = send
real_iter = pipeline.Receiver.__iter__
def slow_iter(self):
    queue = self._queue
    class Late:
        def get(self_):
            time.sleep(0.5)
            return queue.get()
    self._queue = Late()
    yield from real_iter(self)
pipeline.Receiver.__iter__ = slow_iter
""" + _MAIN

# The saver SIGKILLs itself while connecting to the loader for its first shared-memory descriptor
# (multiprocessing's resource_sharer): the loader's serving thread then fails on the dead connection.
_SAVER_DIES_FETCHING_MEMORY = _PRELUDE + """
import multiprocessing.connection as connection
def answer_challenge(*args, **kwargs):
    fired()
    os.kill(os.getpid(), signal.SIGKILL)
connection.answer_challenge = answer_challenge
""" + _MAIN

# The children sleep before they arm PR_SET_PDEATHSIG: a parent that dies in between (a window
# that is otherwise microseconds to milliseconds wide) must still take them with it.
_SLOW_PDEATHSIG = _PRELUDE + """
from modellink_ckpt.engine import pipeline
real = pipeline._die_with_parent
def slow(*args, **kwargs):
    fired()
    time.sleep(1.0)
    return real(*args, **kwargs)
pipeline._die_with_parent = slow
""" + _MAIN


def run_injected(script: str, argv, marker: Path, **env) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", script, *argv[2:]], capture_output=True, text=True,
                            timeout=HANG, cwd=ROOT, env={**os.environ, "INJECTED": str(marker), **env})
    assert marker.exists(), f"the injection never fired (has the hooked code changed?): {result.stderr[-2000:]}"
    return result


@pytest.mark.slow  # ~4 s each
@pytest.mark.parametrize("publish", ["exchange", "two renames"])  # the second: a filesystem without RENAME_EXCHANGE
@pytest.mark.parametrize("kind", ["mg", "hf"])
def test_kill_while_publishing_keeps_a_checkpoint(world, subreaper, tmp_path, kind, publish):
    save, ckpt, argv, old = world.setup("hf2mg-overwrite" if kind == "mg" else "mg2hf-overwrite", tmp_path / "w")
    env = {"NO_EXCHANGE": "1"} if publish == "two renames" else {}
    result = run_injected(_KILL_WHILE_PUBLISHING, cli_argv(*argv, "--overwrite"), tmp_path / "fired", **env)
    line = assert_one_line_error(result.returncode, result.stderr, "saver killed while publishing")
    assert "the saver process was killed by signal 9" in line, line
    # the previous checkpoint intact, or the new one complete: never neither
    assert (ckpt.exists() and snapshot(ckpt) == old) or world.is_new(kind, ckpt), (
        f"after the kill: {sorted(str(p.relative_to(save)) for p in save.rglob('*'))}")
    assert not staging_leftovers(save.parent), staging_leftovers(save.parent)


def test_parent_killed_before_children_arm_pdeathsig(world, subreaper, tmp_path):
    save, ckpt, argv, _ = world.setup("hf2mg", tmp_path / "w")
    marker = tmp_path / "fired"
    mine_before = set(children_of(os.getpid()))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PDEATHSIG, *cli_argv(*argv)[2:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "INJECTED": str(marker)})
    kids: list[Proc] = []
    deadline = time.monotonic() + HANG
    while len(kids) < 2 and proc.poll() is None and time.monotonic() < deadline:
        kids = [Proc(pid) for pid in children_of(proc.pid)]
        time.sleep(0.002)
    assert len(kids) == 2, "the children did not start"
    proc.kill()
    proc.wait(timeout=HANG)
    orphans = [Proc(pid) for pid in set(children_of(os.getpid())) - mine_before - {proc.pid}]
    # they sleep 1 s before arming; give them 3 s to notice the parent is gone, then judge
    survivors = wait_gone(kids + orphans, 3.0)
    assert marker.exists(), "the injection never fired (has pipeline._die_with_parent changed?)"
    assert not survivors, f"children outlived the killed parent: {[p.pid for p in survivors]}"
    assert not looks_complete(save), "a target was published after the command was killed"


def test_partial_of_a_zombie_is_removed(world, tmp_path):
    """A dead saver that nobody reaped (a zombie: what a non-reaping init leaves) counts as dead."""
    save, ckpt, argv, _ = world.setup("hf2mg", tmp_path / "w")
    zombie = subprocess.Popen(["true"])  # exits at once; not waited for: a zombie child of this process
    try:
        deadline = time.monotonic() + HANG
        while (_stat(zombie.pid) or ("?",))[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (_stat(zombie.pid) or ("?",))[0] == "Z"
        partial = save.parent / f".{save.name}.partial-{zombie.pid}"
        (partial / "iter_0000001").mkdir(parents=True)
        (partial / "iter_0000001" / "junk").write_bytes(b"x" * 1000)
        result = subprocess.run(cli_argv(*argv, quiet=False), capture_output=True, text=True, timeout=HANG, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        assert world.is_new("mg", ckpt)
        assert not partial.exists(), "the leftover of a dead (zombie) saver was kept"
        assert "note: removing" in result.stderr
    finally:
        zombie.wait()


@pytest.mark.slow  # ~3 s each
@pytest.mark.parametrize("direction", ["hf2mg", "mg2hf"])
def test_loader_death_is_named_in_the_error(world, tmp_path, direction):
    """Not the saver's follow-up error ('Connection refused', 'EOFError', ...): the cause."""
    save, ckpt, argv, _ = world.setup(direction, tmp_path / "w")
    result = run_injected(_LOADER_DIES_MID_MESSAGE, cli_argv(*argv), tmp_path / "fired")
    line = assert_one_line_error(result.returncode, result.stderr, "loader killed mid-message")
    assert "the loader process was killed by signal 9" in line, line
    assert not looks_complete(save) and not staging_leftovers(save.parent)


@pytest.mark.slow  # ~4 s each
@pytest.mark.parametrize("direction", ["hf2mg", "mg2hf"])
def test_saver_killed_while_fetching_shared_memory_gives_one_line(world, tmp_path, direction):
    """No traceback from the loader's descriptor-serving thread, just the one line."""
    save, ckpt, argv, _ = world.setup(direction, tmp_path / "w")
    result = run_injected(_SAVER_DIES_FETCHING_MEMORY, cli_argv(*argv), tmp_path / "fired")
    line = assert_one_line_error(result.returncode, result.stderr, "saver killed fetching shared memory")
    assert "the saver process was killed by signal 9" in line, line
    assert not looks_complete(save) and not staging_leftovers(save.parent)
