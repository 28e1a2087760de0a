"""Latent against pixel diffusion on digits, same sampler and steps: samples/s and FD (shipped digits-features),
and the autoencoder's reconstruction error.

    python bench/bench_latent.py [-n 1000] [--steps 10,20,50,100]

Pixel model: the shipped `digits` (UNet base 32 on 1×8×8); latent model: the shipped `latent-digits` (UNet base 24
on the 2×4×4 latents of `latent-digits-ae`). Writes bench/results/latent.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import toolkit
from toolkit.evaluate import sample_quality
from toolkit.latent import load_latent

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--steps", default="10,20,50,100")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    latent = load_latent("latent-digits-ae")
    x = toolkit.create("dataset", "digits").x
    with torch.no_grad():
        err = latent.decode(latent.encode(x)) - x
    recon = {"mse": float(err.pow(2).mean()), "max_abs": float(err.abs().max()),
             "latent_shape": list(latent.sample_shape), "data_shape": list(latent.data_shape)}
    print(f"autoencoder: {latent.data_shape} → {latent.sample_shape}, reconstruction MSE {recon['mse']:.5f}, "
          f"max |err| {recon['max_abs']:.3f}")
    params = {}
    rows = []
    for name in ("digits", "latent-digits"):
        pipe = toolkit.compose(model=name)
        params[name] = sum(p.numel() for p in pipe.predictor.parameters())
        report = sample_quality(name, [("ddim", {})], steps, n=args.n)
        for r in report.rows:
            rows.append({"model": name, "steps": r.steps, "fd": r.fd, "accuracy": r.accuracy,
                         "samples_per_s": r.samples_per_s})
            print(f"{name:<14} ddim {r.steps:>4}  FD {r.fd:8.3f}  acc {r.accuracy:.3f}  {r.samples_per_s:8.1f} samples/s",
                  flush=True)
    result = {"n": args.n, "reconstruction": recon, "params": params, "rows": rows,
              "reference_fd": report.reference_fd}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latent.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'latent.json'}")


if __name__ == "__main__":
    main()
