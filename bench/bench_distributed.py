"""Training throughput with torchrun on CPU: 1 process against 2 (gloo, DDP), the shipped recipe (UNet, batch 128
global), interleaved rounds. On a 2-core machine expect little or nothing: both processes share the cores that
one process already uses, and DDP adds an all-reduce per step.

    python bench/bench_distributed.py [--steps 200] [--rounds 2]

Writes bench/results/distributed.json. On a GPU machine, `bench/gpu_train_speed.sh` measures fp32, bf16 and
torch.compile on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def run(nproc: int, steps: int, threads: int, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "toolkit", "train", "--steps", str(steps), "--batch-size", "128", "--checkpoint-every",
           str(steps), "--out", str(out), "--overwrite", "-q"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    cfg = json.loads((out / "config.json").read_text())
    return steps / cfg["training"]["elapsed_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp())
    setups = {"1 process": (1, cores), "2 processes": (2, max(1, cores // 2))}
    rates: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(args.rounds):
        for name, (nproc, threads) in setups.items():
            rates[name].append(run(nproc, args.steps, threads, tmp / name.replace(" ", "-")))
            print(f"{name:<12} ({threads} threads each) {rates[name][-1]:.2f} steps/s", flush=True)
    result = {"steps": args.steps, "batch_size_global": 128, "cores": cores,
              "rows": [{"setup": k, "threads_per_process": setups[k][1], "steps_per_s": v,
                        "median": float(np.median(v))} for k, v in rates.items()]}
    result["speedup_2_vs_1"] = result["rows"][1]["median"] / result["rows"][0]["median"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2))
    print(f"2 processes / 1 process: ×{result['speedup_2_vs_1']:.2f}; wrote {RESULTS / 'distributed.json'}")


if __name__ == "__main__":
    main()
