# Sourced by the example scripts: where the converter is, and the Python that runs it, so that a
# script works from any directory. PYTHON: the repository's .venv once `make setup` made it, else
# the `python` on PATH (an environment of your own with `pip install -e .`); set it to override.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "${REPO}/.venv/bin/python" ]; then PYTHON="${REPO}/.venv/bin/python"; else PYTHON=python; fi
fi
