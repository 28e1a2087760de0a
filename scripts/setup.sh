#!/usr/bin/env bash
# Create .venv (if missing) and install the toolkit into it. Sourced by quickstart.sh and test.sh.
# TORCH overrides the torch requirement (default: the CPU build these machines ship on local disk).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# torch first and explicitly: a bare "torch" requirement can pull a multi-GB CUDA build.
python -m pip install --disable-pip-version-check -q "${TORCH:-torch==2.13.0}"
python -m pip install --disable-pip-version-check -q -e ".${EXTRAS:-}"
