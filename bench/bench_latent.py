"""The shipped latent pipeline against more sampling steps: the old ε-prediction model and the shipped v-prediction
model side by side, and latent against pixel diffusion (samples/s, FD) with the autoencoder's reconstruction error.

    python bench/bench_latent.py [-n 1000] [--seeds 0,1] [--steps 10,20,50,100,200] [--trailing 10,50,200]

Latent models (UNet base 24 on the 2×4×4 latents of `latent-digits-ae`, 4000 steps each, same recipe otherwise):
`bench/models/latent-digits-eps` (the model shipped before, ε-prediction) and the shipped `latent-digits`
(v-prediction, Salimans & Ho 2022). Each: DDIM at every --steps (uniform spacing), DDIM with trailing spacing
(Lin et al. 2024: starts at t = T-1), DDPM at its default 1000 steps, for every seed; Fréchet distance in the shipped
digits feature space and class accuracy. A model's "seed noise" is the median, over its DDIM/DDPM ladder rows, of
|FD(seed a) − FD(seed b)|; it never degrades with more steps when no mean FD along the ladder (DDIM 10 … 200, then
DDPM-1000) rises by more than that from one step count to the next.
Pixel model: the shipped `digits` (UNet base 32 on 1×8×8), DDIM, first seed. Writes bench/results/latent.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import toolkit
from toolkit.evaluate import sample_quality
from toolkit.latent import load_latent

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OLD = HERE / "models" / "latent-digits-eps"


def ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def latent_rows(model: str, label: str, n: int, seeds: list[int], steps: list[int], trailing: list[int]) -> list[dict]:
    rows = []
    runs = [("ddim", {}, steps), ("ddim", {"spacing": "trailing"}, trailing), ("ddpm", {}, [1000])]
    for seed in seeds:
        for sampler, options, counts in runs:
            t0 = time.perf_counter()
            report = sample_quality(model, [(sampler, options)], counts, n=n, seed=seed)
            for r in report.rows:
                row = {"model": label, "sampler": sampler, "spacing": options.get("spacing", "uniform"),
                       "steps": r.steps, "seed": seed, "fd": r.fd, "accuracy": r.accuracy}
                rows.append(row)
                print(f"{label:<22} {sampler} {row['spacing']:<9} {r.steps:>5}  seed {seed}  FD {r.fd:7.3f}  "
                      f"acc {r.accuracy:.3f}", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def summary(rows: list[dict], label: str) -> dict:
    """Mean FD per (sampler, spacing, steps) over seeds, the seed noise, and whether more steps ever hurt."""
    mine = [r for r in rows if r["model"] == label]
    keys = sorted({(r["sampler"], r["spacing"], r["steps"]) for r in mine}, key=lambda k: (k[0] != "ddim", k[1], k[2]))
    table = []
    for key in keys:
        fds = [r["fd"] for r in mine if (r["sampler"], r["spacing"], r["steps"]) == key]
        accs = [r["accuracy"] for r in mine if (r["sampler"], r["spacing"], r["steps"]) == key]
        table.append({"sampler": key[0], "spacing": key[1], "steps": key[2], "fd_mean": sum(fds) / len(fds),
                      "fd": fds, "seed_range": max(fds) - min(fds), "accuracy_mean": sum(accs) / len(accs)})
    ladder = [r for r in table if r["sampler"] == "ddim" and r["spacing"] == "uniform"]
    ladder += [r for r in table if r["sampler"] == "ddpm"]  # DDPM-1000 after DDIM-200: the most steps of all
    rises = [b["fd_mean"] - a["fd_mean"] for a, b in zip(ladder, ladder[1:])]
    noise = statistics.median(r["seed_range"] for r in ladder)
    return {"model": label, "seed_noise": noise, "table": table,
            "ladder": [f"{r['sampler']}-{r['steps']}" for r in ladder], "largest_rise": max(rises) if rises else 0.0,
            "never_degrades": all(d <= noise for d in rises)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", default="10,20,50,100,200")
    ap.add_argument("--trailing", default="10,50,200")
    ap.add_argument("--pixel-steps", default="10,20,50,100")
    args = ap.parse_args()
    seeds, steps, trailing = ints(args.seeds), ints(args.steps), ints(args.trailing)
    latent = load_latent("latent-digits-ae")
    x = toolkit.create("dataset", "digits").x
    with torch.no_grad():
        err = latent.decode(latent.encode(x)) - x
    recon = {"mse": float(err.pow(2).mean()), "max_abs": float(err.abs().max()),
             "latent_shape": list(latent.sample_shape), "data_shape": list(latent.data_shape)}
    print(f"autoencoder: {latent.data_shape} → {latent.sample_shape}, reconstruction MSE {recon['mse']:.5f}, "
          f"max |err| {recon['max_abs']:.3f}")
    models = {"latent-digits (v, shipped)": "latent-digits", "latent-digits-eps (ε, old)": str(OLD)}
    rows: list[dict] = []
    for label, model in models.items():
        rows += latent_rows(model, label, args.n, seeds, steps, trailing)
    summaries = [summary(rows, label) for label in models]
    for s in summaries:
        print(f"{s['model']}: seed noise {s['seed_noise']:.2f}, largest rise along {' → '.join(s['ladder'])}: "
              f"{s['largest_rise']:+.2f} → never degrades: {s['never_degrades']}")
    params, pixel = {}, []
    for name in ("digits", "latent-digits"):
        params[name] = sum(p.numel() for p in toolkit.compose(model=name).predictor.parameters())
    report = sample_quality("digits", [("ddim", {})], ints(args.pixel_steps), n=args.n, seed=seeds[0])
    for r in report.rows:
        pixel.append({"model": "digits", "steps": r.steps, "fd": r.fd, "accuracy": r.accuracy,
                      "samples_per_s": r.samples_per_s})
        print(f"digits (pixel)  ddim {r.steps:>4}  FD {r.fd:8.3f}  acc {r.accuracy:.3f}  {r.samples_per_s:8.1f} samples/s",
              flush=True)
    result = {"n": args.n, "seeds": seeds, "reconstruction": recon, "params": params, "summaries": summaries,
              "rows": rows, "pixel_rows": pixel, "reference_fd": report.reference_fd}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latent.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'latent.json'}")


if __name__ == "__main__":
    main()
