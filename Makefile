# Two commands for a new user: `make demo` (set up + run the built-in example) and `make test`.
# The first Python 3.10+ that can make a virtual environment (Debian's python3 cannot without python3-venv).
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11 python3.10; do \
	$$p -c 'import sys, ensurepip, venv; assert sys.version_info >= (3, 10)' >/dev/null 2>&1 && { command -v $$p; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
MCORE  := megatron-core==0.16.1

.PHONY: setup demo test test-slow test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python 3.10+ with the venv module found (on Debian: apt-get install python3-venv)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps $(MCORE)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(BIN)/python -m modellink_ckpt.demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: setup
	$(BIN)/python -m pytest -q --run-slow

bench: setup
	$(BIN)/python bench/bench_convert.py

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
