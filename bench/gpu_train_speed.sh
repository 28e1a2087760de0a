#!/usr/bin/env bash
# One prepared GPU check (for a machine with CUDA): single-GPU training throughput of the shipped recipe
# with fp32, bf16 and torch.compile, and 2-process sharded sampling; prints steps/s from each checkpoint.
set -euo pipefail
OUT="${OUT:-/tmp/gpu-bench}"
mkdir -p "$OUT"
for args in "--precision fp32" "--precision bf16" "--precision fp32 --compile" "--precision bf16 --compile"; do
    name=$(echo "$args" | tr -d ' -')
    python -m toolkit train --device cuda --steps 1000 --batch-size 128 $args --out "$OUT/$name" --overwrite -q
    python -c "import json,sys; c=json.load(open('$OUT/$name/config.json'))['training']; print('$args', round(c['step']/c['elapsed_s'],1), 'steps/s')"
done
