#!/usr/bin/env bash
# One command: set up .venv and sample 100 digits (a row of ten per class) from the shipped model into samples.png.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="" . scripts/setup.sh
toolkit compose --schedule cosine --sampler ddim --steps 50 -n 100 --class all --out samples.png "$@"
