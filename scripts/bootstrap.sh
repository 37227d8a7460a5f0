#!/usr/bin/env bash
# Install everything the project needs on a bare Debian 12 machine (as root):
# system packages (QEMU, busybox, ...) and a virtualenv in .venv with the
# package built from this tree (Cython extensions compiled) plus test tools.
# Idempotent; prints the venv's python path last.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup-system.sh >&2
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv >&2
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" Cython >&2  # also for in-place builds (setup.py build_ext)
# A regular (non-editable) install so the compiled modules are what gets tested.
.venv/bin/python -m pip install -q ".[test]" >&2
echo "$here/.venv/bin/python"
