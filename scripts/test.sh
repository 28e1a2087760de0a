#!/usr/bin/env bash
# One command: set up .venv with the test extras and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="[test]" . scripts/setup.sh
python -m pytest -q "$@"
