"""Improved DDPM on digits: bits/dim of L_simple (fixed Σ) against L_hybrid (learned Σ), the DDIM η table of
Song et al. on digits, and learned against fixed variance for respaced ddpm.

    python bench/bench_improved_ddpm.py --hybrid DIR [--simple digits] [--limit 512] [-n 1000]

DIR is a model trained like the shipped one but with `--loss hybrid --learn-variance`:
    toolkit train --loss hybrid --learn-variance --out DIR      (same recipe: 4000 steps, batch 128, EMA 0.999)
Writes bench/results/improved_ddpm.json and improved_ddpm_eta.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from toolkit.evaluate import nll, plot_quality, sample_quality

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simple", default="digits", help="L_simple model (fixed variance)")
    ap.add_argument("--hybrid", required=True, help="L_hybrid model with learned variance")
    ap.add_argument("--limit", type=int, default=512, help="data points for bits/dim")
    ap.add_argument("-n", type=int, default=1000, help="samples per quality row")
    ap.add_argument("--steps", default="10,20,50,100")
    ap.add_argument("--full", default="1000", help="step counts run for eta 0, eta 1 and sigma-hat only")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: nll,eta,learned")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    steps = [int(s) for s in args.steps.split(",")]
    full = [int(s) for s in args.full.split(",") if s]
    out: dict = {"n": args.n, "limit": args.limit, "simple": args.simple, "hybrid": args.hybrid,
                 "torch_threads": torch.get_num_threads()}
    path = RESULTS / "improved_ddpm.json"
    if path.is_file():
        out = {**json.loads(path.read_text()), **out}

    if "nll" not in skip:
        rows = []
        for label, model, variance in [("L_simple, sigma^2 = beta-tilde", args.simple, "posterior"),
                                       ("L_simple, sigma^2 = beta", args.simple, "beta"),
                                       ("L_hybrid, learned sigma", args.hybrid, "learned")]:
            t0 = time.perf_counter()
            r = nll(model, limit=args.limit, variance=variance)
            rows.append({"model": label, **{k: v for k, v in r.to_json().items() if k != "per_timestep"},
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{label:<32} {r.bits_per_dim:.4f} ± {r.stderr:.4f} bits/dim  (L_T {r.prior:.2e}, "
                  f"sum L_t-1 {r.diffusion:.4f}, L_0 {r.decoder:.4f})", flush=True)
        out["bits_per_dim"] = rows
        path.write_text(json.dumps(out, indent=2))

    if "eta" not in skip:
        grid = [("ddim", {"eta": e}) for e in (0.0, 0.2, 0.5, 1.0)] + [("ddpm", {"variance": "beta"})]
        report = sample_quality(args.simple, grid, steps, n=args.n)
        rows = list(report.rows)
        if full:
            rows += sample_quality(args.simple, [grid[0], grid[3], grid[4]], full, n=args.n).rows
        report = type(report)(rows, report.reference_fd, report.features, report.feature_holdout_accuracy,
                              report.dataset, report.n, report.seed)
        out["eta_table"] = report.to_json()
        plot_quality(report, RESULTS / "improved_ddpm_eta.png")
        print(f"\nDDIM table (FD, n={args.n}; real data {report.reference_fd:.3f})")
        cols = sorted({r.steps for r in rows})
        print(f"{'':<24}" + "".join(f"{s:>9}" for s in cols))
        for label in dict.fromkeys(r.label for r in rows):
            cells = {r.steps: r.fd for r in rows if r.label == label}
            print(f"{label:<24}" + "".join(f"{cells[s]:>9.3f}" if s in cells else f"{'':>9}" for s in cols),
                  flush=True)
        path.write_text(json.dumps(out, indent=2))

    if "learned" not in skip:
        rows = []
        for label, model, opts in [("hybrid, learned", args.hybrid, {"variance": "learned"}),
                                   ("hybrid, beta-tilde", args.hybrid, {"variance": "posterior"}),
                                   ("hybrid, beta", args.hybrid, {"variance": "beta"}),
                                   ("simple, beta-tilde", args.simple, {"variance": "posterior"}),
                                   ("simple, beta", args.simple, {"variance": "beta"})]:
            report = sample_quality(model, [("ddpm", opts)], [50, 100], n=args.n)
            for r in report.rows:
                rows.append({"model": label, "steps": r.steps, "fd": r.fd, "accuracy": r.accuracy})
                print(f"ddpm {label:<22} {r.steps:>4} steps  FD {r.fd:.3f}  acc {r.accuracy:.3f}", flush=True)
        report = sample_quality(args.hybrid, [("ddim", {})], [10, 20, 50, 100], n=args.n)
        for r in report.rows:
            rows.append({"model": "hybrid, ddim eta 0", "steps": r.steps, "fd": r.fd, "accuracy": r.accuracy})
            print(f"ddim hybrid model        {r.steps:>4} steps  FD {r.fd:.3f}  acc {r.accuracy:.3f}", flush=True)
        out["learned_variance"] = rows
        path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
