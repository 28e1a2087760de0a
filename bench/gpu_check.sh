#!/usr/bin/env bash
# One prepared check for a lent CUDA machine: the GPU tests (tests/test_cuda.py: same seed on CPU, CUDA and
# onnxruntime's CUDA provider; the loop as a CUDA graph) and bench/bench_gpu.py --device cuda. Wheels the machine
# lacks can travel in .whl/ (installed with pip --no-index) and onnxruntime-gpu in .ortgpu/ (its install.sh).
# Writes the test log, the bench log and gpu.json to $OUT (default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -f .ortgpu/install.sh ]; then
    # shellcheck disable=SC1091
    . .ortgpu/install.sh
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || "$PY" -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
nvidia-smi -L
if [ -f .ortgpu/smoke.py ]; then timeout 60 "$PY" .ortgpu/smoke.py 2>&1 | tail -5; fi
"$PY" -c "import torch, onnxruntime as o; print('torch', torch.__version__, torch.cuda.get_device_name(0)); print('onnxruntime', o.__version__, o.get_available_providers())"
timeout 170 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-300}" "$PY" bench/bench_gpu.py --device cuda --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
