# Two commands for a new user: `make demo` (set up + run the built-in example) and `make test`.
# The first Python 3.10+ that can make a virtual environment (Debian's python3 cannot without python3-venv).
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11 python3.10; do \
	$$p -c 'import sys, ensurepip, venv; assert sys.version_info >= (3, 10)' >/dev/null 2>&1 && { command -v $$p; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
# megatron-core is a test-time consumer, installed without its (GPU) extras
MCORE_RANGE := megatron-core>=0.16.1,<0.17
# `make test-latest`: the newest versions the ranges allow, in a venv of their own
LATEST := .venv-latest

# torch at the lock's version, whichever build pip's configuration offers (a local CPU wheel, or
# PyPI's CUDA build). `make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` takes the
# CPU build from PyTorch's own index instead (~200 MB rather than ~3.5 GB), on a machine that
# reaches it; everything else still comes from the usual index.
TORCH_INDEX_URL ?=
TORCH_FROM := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))

# the MindSpore test venv: MindSpore and MindFormers (CPU) check our MindSpore output
MS_VENV := .venv-ms
MS_LOCK := requirements-ms.lock

.PHONY: setup setup-ms compile demo test test-slow test-all test-latest lock bench clean

setup: $(VENV)/.installed

# Every package at the exact version of requirements.lock (-c): the same environment on any day.
$(VENV)/.installed: requirements.txt requirements-dev.txt $(LOCK) pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python 3.10+ with the venv module found (on Debian: apt-get install python3-venv)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip setuptools
	$(BIN)/pip install -q -c $(LOCK) $(TORCH_FROM) torch
	$(BIN)/pip install -q -c $(LOCK) -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q -c $(LOCK) --no-deps "$(MCORE_RANGE)"
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python tools/lockcheck.py $(LOCK)
	touch $@

setup-ms: $(MS_VENV)/.installed

# Exactly the locked set, without dependency resolution: MindFormers 2.1.0's metadata asks for a
# MindSpore that is not released; MindSpore 2.10 needs numpy < 2 and safetensors < 0.8.
$(MS_VENV)/.installed: $(MS_LOCK)
	@test -n "$(PYTHON)" || { echo "error: no Python 3.10+ with the venv module found"; exit 1; }
	test -x $(MS_VENV)/bin/python || $(PYTHON) -m venv $(MS_VENV)
	$(MS_VENV)/bin/pip install -q --no-deps -r $(MS_LOCK)
	$(MS_VENV)/bin/python tools/lockcheck.py $(MS_LOCK)
	touch $@

# Byte-code for the package, kept current before every run: an editable install leaves compiling
# it to the first run, and where PYTHONDONTWRITEBYTECODE is set (as in many containers) Python never
# writes it, so every conversion compiled ~25 modules again: 0.13-0.21 s of each start-up, against
# 0.04-0.06 s with the byte-code (measured here). Up to date, this takes a few milliseconds.
compile: setup
	$(BIN)/python -m compileall -q modellink_ckpt

demo: compile
	$(BIN)/python -m modellink_ckpt.demo

# The tests run on every core (pytest-xdist; `make test TEST_WORKERS=1` runs them in one process).
# worksteal: a worker that runs out takes queued tests from the busy one, so the long tests at the
# end of one folder do not leave a core idle.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test: compile
	$(PYTEST)

test-slow: compile setup-ms
	REQUIRE_MINDSPORE=1 $(PYTEST) -m slow

test-all: compile setup-ms
	REQUIRE_MINDSPORE=1 $(PYTEST) --run-slow

# The default suite against the newest versions requirements*.txt allow (torch stays pinned: any
# other spec pulls CUDA wheels). It reports what changed upstream; CI does not fail on it.
test-latest:
	@test -n "$(PYTHON)" || { echo "error: no Python 3.10+ with the venv module found"; exit 1; }
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	grep '^torch==' $(LOCK) > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt \
		-r requirements.txt -r requirements-dev.txt
	$(LATEST)/bin/pip install -q --upgrade --no-deps "$(MCORE_RANGE)"
	$(LATEST)/bin/python tools/lockcheck.py --report $(LOCK)
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal

# Re-pin requirements.lock from the current venv (after changing requirements*.txt).
lock: setup
	$(BIN)/python tools/lockcheck.py --write $(LOCK)

bench: compile
	$(BIN)/python bench/bench_convert.py

clean:
	rm -rf $(VENV) $(LATEST) $(MS_VENV) demo_out bench_out .pytest_cache
