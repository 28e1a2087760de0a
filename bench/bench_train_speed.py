"""Training throughput only, ours against diffusers, interleaved so both see the same machine.

The full comparison (bench_vs_diffusers.py) trains each side once, 4000 steps; on a shared 2-core
machine one side can be slowed by other work. This runs short, alternating rounds and reports the
median steps/s of each side and their ratio.

    python bench/bench_train_speed.py --steps 300 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench_vs_diffusers import RESULTS, recipe, train_diffusers, train_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "train_speed.json"))
    args = parser.parse_args()
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            cfg = recipe(args.steps, seed=r)
            ours.append(train_ours(cfg, Path(tmp) / f"ours{r}")["steps_per_s"])
            theirs.append(train_diffusers(cfg, Path(tmp) / f"theirs{r}")["steps_per_s"])
            print(f"round {r}: ours {ours[-1]:.2f} steps/s, diffusers {theirs[-1]:.2f} steps/s", flush=True)
    result = {"steps": args.steps, "rounds": args.rounds, "ours": ours, "diffusers": theirs,
              "ours_median": statistics.median(ours), "diffusers_median": statistics.median(theirs)}
    result["ratio_ours_over_diffusers"] = result["ours_median"] / result["diffusers_median"]
    print(f"| train steps/s (median of {args.rounds}) | ours {result['ours_median']:.2f} | "
          f"diffusers {result['diffusers_median']:.2f} | ratio {result['ratio_ours_over_diffusers']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
