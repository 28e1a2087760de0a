"""How much the Fréchet distance moves with the sampling seed alone (same model, sampler, n).

Reading the vs-diffusers table needs this: a difference smaller than the seed-to-seed spread is noise.

    python bench/bench_fd_spread.py --sampler ddpm --steps 1000 --seeds 1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import toolkit
from common import Judge

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped digits model)")
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--out", default=str(RESULTS / "fd_spread.json"))
    args = parser.parse_args()
    judge = Judge()
    pipe = toolkit.compose(model=args.model, sampler=args.sampler, steps=args.steps)
    labels = torch.arange(args.samples) % 10
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        score = judge.score(pipe.sample(args.samples, seed=seed, labels=labels), labels)
        rows.append({"seed": seed, **score})
        print(f"seed {seed}: FD {score['fd']:.3f}, accuracy {score['accuracy']:.3f}", flush=True)
    fds = [r["fd"] for r in rows]
    result = {"sampler": args.sampler, "steps": args.steps, "samples": args.samples, "rows": rows,
              "fd_mean": statistics.mean(fds), "fd_range": [min(fds), max(fds)]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
