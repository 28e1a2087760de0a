"""The three losses of Improved DDPM on digits with the same budget (Nichol & Dhariwal's Table, in direction):
L_simple (fixed Σ = β̃), L_hybrid (learned Σ), L_vlb with uniform t and L_vlb with importance-sampled t (learned Σ),
each trained here with the same recipe (steps, batch, lr, EMA, seed; the shipped digits model's), then the
variational bound in bits/dim on the same data points. Adds "loss_table" (4000 steps) or "loss_table_STEPS" to
bench/results/improved_ddpm.json.

    python bench/bench_losses.py [--steps 4000] [--limit 512] [--resume-from 4000] [--runs hybrid,vlb-is]

--resume-from S continues each run's cached S-step checkpoint to --steps (exact resume: the same weights as one run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from toolkit.evaluate import nll
from toolkit.training import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"
RUNS = {"simple": ("L_simple, sigma^2 = beta-tilde", {"loss": "simple"}, "posterior"),
        "hybrid": ("L_hybrid, learned sigma", {"loss": "hybrid", "learned_variance": True}, "learned"),
        "vlb": ("L_vlb, uniform t, learned sigma", {"loss": "vlb", "learned_variance": True}, "learned"),
        "vlb-is": ("L_vlb, importance-sampled t, learned sigma",
                   {"loss": "vlb", "learned_variance": True, "importance_sampling": True}, "learned")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--limit", type=int, default=512, help="data points for bits/dim")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume-from", type=int, default=None, help="continue the cached runs of this many steps")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip of every run (0: none)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of every run")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"which objectives, in this order (of {', '.join(RUNS)})")
    args = ap.parse_args()
    names = [r for r in args.runs.split(",") if r]
    if not names or any(r not in RUNS for r in names):
        ap.error(f"--runs takes names from {', '.join(RUNS)}, got {args.runs!r}")
    torch.set_num_threads(2)
    CACHE.mkdir(exist_ok=True)
    rows = []
    for label, options, variance in (RUNS[r] for r in names):
        options = {**options, **({"grad_clip": args.grad_clip} if args.grad_clip != 1.0 else {}),
                   **({"lr": args.lr} if args.lr != 1e-3 else {})}
        tag = "-".join(f"{k}={v}" for k, v in sorted(options.items()))
        out = CACHE / f"losses-{tag}-{args.steps}-seed{args.seed}"
        t0 = time.perf_counter()
        if not (out / "model.safetensors").is_file():
            start = CACHE / f"losses-{tag}-{args.resume_from}-seed{args.seed}"
            resume = args.resume_from is not None and (start / "training_state.safetensors").is_file()
            partial = out.with_name(out.name + ".partial")  # renamed to out when complete: a killed run is redone
            shutil.rmtree(partial, ignore_errors=True)
            if resume:
                shutil.copytree(start, partial)
            train(TrainConfig(steps=args.steps, seed=args.seed, checkpoint_every=args.steps, **options), partial,
                  overwrite=not resume, resume=resume, quiet=True)
            shutil.rmtree(out, ignore_errors=True)
            partial.rename(out)
        trained = time.perf_counter() - t0
        r = nll(out, limit=args.limit, variance=variance)
        rows.append({"objective": label, "train_options": options, "steps": args.steps, "variance": variance,
                     "bits_per_dim": r.bits_per_dim, "stderr": r.stderr, "prior": r.prior, "diffusion": r.diffusion,
                     "decoder": r.decoder, "n": r.n, "train_seconds": round(trained, 1)})
        print(f"{label:<45} {r.bits_per_dim:.4f} ± {r.stderr:.4f} bits/dim  (L_0 {r.decoder:.4f}; "
              f"trained in {trained:.0f} s)", flush=True)
    path = RESULTS / "improved_ddpm.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    key = "loss_table" if args.steps == 4000 else f"loss_table_{args.steps}"  # one table per budget and recipe
    key += "" if args.grad_clip == 1.0 else f"_clip{args.grad_clip:g}"
    key += "" if args.lr == 1e-3 else f"_lr{args.lr:g}"
    old = {row["objective"]: row for row in result.get(key, {}).get("rows", [])}
    old.update({row["objective"]: row for row in rows})  # a partial --runs keeps the other rows of this budget
    rows = [old[label] for label, _, _ in RUNS.values() if label in old]
    recipe = {"steps": args.steps, "batch_size": 128, "lr": args.lr, "ema_decay": 0.999, "schedule": "cosine",
              "seed": args.seed, "grad_clip": args.grad_clip}
    result[key] = {"recipe": recipe, "limit": args.limit, "rows": rows}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
