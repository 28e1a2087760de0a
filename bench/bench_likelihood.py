"""The exact likelihood of the probability-flow ODE beside the variational bound, on the shipped digits model
(bits/dim, 17-level data dequantized), and the ODE likelihood of Gaussian data against its closed form.

- digits: Hutchinson trace at 20 and 50 RK4 steps on n points, the exact trace on the first 20 of them (with
  Hutchinson on the same 20), the bound (learned Σ) on the same n points;
- Gaussian: 2-D N(μ, diag s²) with its exact ε, mean log-likelihood against the closed form.

    python bench/bench_likelihood.py [--n 200] [--out bench/results/likelihood.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import toolkit
from toolkit import evaluate
from toolkit.likelihood import ode_log_likelihood, ode_nll

RESULTS = Path(__file__).resolve().parent / "results"


def gaussian_row() -> dict:
    schedule = toolkit.create("schedule", "cosine")
    a = schedule.alphas_cumprod.double()
    lam = (torch.log(a) - torch.log1p(-a)).numpy()
    mu, s = torch.tensor([0.3, -0.2]).reshape(1, 2, 1, 1), torch.tensor([0.5, 0.2]).reshape(1, 2, 1, 1)

    def eps(x, t):
        a2 = torch.sigmoid(torch.from_numpy(np.interp(t.double().numpy(), np.arange(len(lam)), lam))).reshape(-1, 1, 1, 1)
        return (1 - a2).sqrt() * (x - a2.sqrt() * mu) / (a2 * s ** 2 + 1 - a2)

    x = (mu + s * torch.randn(1000, 2, 1, 1, generator=torch.Generator().manual_seed(0))).double()
    closed = float((-0.5 * ((x - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1).mean())
    rows = {}
    for trace in ("exact", "hutchinson"):
        ode = float(ode_log_likelihood(eps, schedule, x, steps=50, trace=trace).mean())
        rows[trace] = {"ode_log_likelihood": ode, "relative_error": abs(ode - closed) / abs(closed)}
    return {"data": "N((0.3, -0.2), diag(0.25, 0.04)), 1000 points", "closed_form_log_likelihood": closed, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "likelihood.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    gauss = gaussian_row()
    print(json.dumps(gauss), flush=True)
    rows = []
    for trace, steps, n in (("hutchinson", 20, args.n), ("hutchinson", 50, args.n), ("hutchinson", 20, 20),
                            ("exact", 20, 20)):
        t0 = time.perf_counter()
        r = ode_nll("digits", limit=n, steps=steps, trace=trace)
        rows.append({**r.to_json(), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    bounds = []
    for n in (args.n, 20):
        b = evaluate.nll("digits", limit=n)
        bounds.append({"n": n, "bits_per_dim": b.bits_per_dim, "stderr": b.stderr, "variance": b.variance,
                       "prior": b.prior, "diffusion": b.diffusion, "decoder": b.decoder})
        print(json.dumps(bounds[-1]), flush=True)
    result = {"config": {"model": "digits", "conditioning": "each point's label", "dequantization": "uniform, 17 levels"},
              "gaussian": gauss, "ode_nll": rows, "variational_bound": bounds}
    RESULTS.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
