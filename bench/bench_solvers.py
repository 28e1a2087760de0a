"""Fast solvers on the shipped digits model, side by side with diffusers' schedulers from the same x_T.

(a) ODE error: each deterministic solver's RMS distance (per sample, mean over n) to a 1000-NFE
    DPM-Solver++(2M) solution of the probability-flow ODE from the same x_T and start time
    (toolkit.evaluate.ode_reference), at 5/10/20 network calls. Ours and diffusers' run on the same
    grid (timestep_spacing "trailing", starting at t = T-1, diffusers' choice) with the same x̂_0
    clipping (diffusers: thresholding with sample_max_value 1, or DDIM's clip_sample); ours also on
    their default grids (logsnr / karras from σ̃ = 80), and unipc on a grid tuned to the model
    (toolkit.tuned_grid, tuned on other draws of x_T: seed 1000).
(b) FD in the shipped feature space, n samples, 3 seeds: our solvers at 5/10 NFE (unipc also on the
    tuned grid) against ddim-20 and ddim-50, and diffusers' DPM-Solver++, UniPC and Euler with their
    default settings.

    python bench/bench_solvers.py            # ~30 min on 2 CPU cores; writes bench/results/solvers.json and .png
    python bench/bench_solvers.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import numpy as np
import torch
from torch import Tensor

import toolkit
from toolkit.evaluate import feature_space, ode_reference, rms_distance as rms
from toolkit.metrics import frechet_distance
from toolkit.noise import NoiseStreams
from toolkit.tuned_grid import tune_grid
from toolkit.sampling import as_v2, listed_times, run_plan, stream_noise_fn

RESULTS = Path(__file__).resolve().parent / "results"
NFES = (5, 10, 20)


def steps_for(name: str, nfe: int) -> int:
    """Steps that spend at most ``nfe`` network calls (heun: 2S − 1)."""
    return (nfe + 1) // 2 if name == "heun" else nfe


def diffusers_scheduler(kind: str, clip: bool, spacing: str | None):
    """A diffusers scheduler for the shipped cosine schedule; spacing None keeps diffusers' default."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    common: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
    if spacing is not None:
        common["timestep_spacing"] = spacing
    thresh = {"thresholding": True, "sample_max_value": 1.0} if clip else {}
    if kind == "dpmpp-2m":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, **thresh)
    if kind == "unipc":
        return UniPCMultistepScheduler(**common, solver_order=2, solver_type="bh2", **thresh)
    if kind == "ddim":
        return DDIMScheduler(**common, clip_sample=clip, set_alpha_to_one=True)
    if kind == "euler":
        if clip:
            raise ValueError("diffusers' EulerDiscreteScheduler has no x̂_0 clipping")
        return EulerDiscreteScheduler(**common)
    raise ValueError(kind)


@torch.no_grad()
def run_diffusers(sched, fn: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, steps: int) -> Tensor:
    """diffusers' loop with our network (ε channels only), from our x_T."""
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    B = x.shape[0]
    extra = {"eta": 0.0, "use_clipped_model_output": True} if type(sched).__name__ == "DDIMScheduler" else {}
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        eps = fn(inp, torch.full((B,), int(t)))[:, : x.shape[1]]
        x = sched.step(eps, t, x, **extra).prev_sample
    return x


def ours_sampler(name: str, clip: bool, spacing: str | None):
    opts: dict[str, Any] = {"clip_x0": clip}
    if spacing is not None:
        opts["spacing"] = spacing
    return toolkit.create("sampler", name, **opts)


def ode_section(pipe, fn, x_T: Tensor, labels: Tensor, nfes, reference_nfe: int,
                tuned: dict[int, str]) -> list[dict[str, Any]]:
    """(a): ODE error of each method at each NFE, ours and diffusers' on the trailing grid, ours on defaults."""
    methods = [  # (ours, diffusers, clip)
        ("dpmpp-2m", "dpmpp-2m", True), ("unipc", "unipc", True), ("ddim", "ddim", True),
        ("ddim", "euler", False), ("dpmpp-2m", "dpmpp-2m", False), ("unipc", "unipc", False),
        ("heun", None, True),
    ]
    refs: dict[tuple[float, bool], Tensor] = {}

    def reference(t0: float, clip: bool) -> Tensor:
        if (t0, clip) not in refs:
            refs[(t0, clip)] = ode_reference(pipe, x_T, labels, t0, clip, reference_nfe)
        return refs[(t0, clip)]

    rows = []
    for ours, theirs, clip in methods:
        for nfe in nfes:
            steps = steps_for(ours, nfe)
            row: dict[str, Any] = {"method": ours, "diffusers": theirs, "clip_x0": clip, "nfe_budget": nfe}
            for grid in ("trailing", None):
                sampler = ours_sampler(ours, clip, grid)
                plan = as_v2(sampler).plan(pipe.schedule, steps)
                x = run_plan(as_v2(sampler), fn, plan, x_T)
                key = "ours_trailing" if grid else "ours_default"
                row[key] = rms(x, reference(float(plan.t[0]), clip))
                row[key + "_nfe"] = plan.nfe
                row[key + "_spacing"] = grid or sampler.spacing
            if theirs is not None:
                x = run_diffusers(diffusers_scheduler(theirs, clip, "trailing"), fn, x_T, steps)
                row["diffusers_trailing"] = rms(x, reference(999.0, clip))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for nfe, spacing in tuned.items():  # the grid tuned to the model (on other draws of x_T than these)
        sampler = ours_sampler("unipc", True, spacing)
        plan = as_v2(sampler).plan(pipe.schedule, nfe)
        x = run_plan(as_v2(sampler), fn, plan, x_T)
        start = float(listed_times(spacing)[0])  # the first step time (plan.t holds the network's times)
        row = {"method": "unipc", "diffusers": None, "clip_x0": True, "nfe_budget": nfe,
               "ours_tuned": rms(x, reference(start, True)), "ours_tuned_nfe": plan.nfe, "ours_tuned_spacing": spacing}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def fd_section(pipe, fn_for, space, real, n: int, seeds, nfes, tuned: dict[int, str]) -> list[dict[str, Any]]:
    """(b): FD over seeds for our solvers (default grids, clipped; unipc also on the grid tuned to the model),
    ddim-20/50, and diffusers' defaults."""
    configs: list[tuple[str, str, int]] = [("ours", "ddim", 20), ("ours", "ddim", 50)]
    for nfe in nfes:
        configs += [("ours", "ddim", nfe), ("ours", "dpmpp-2m", nfe), ("ours", "unipc", nfe),
                    ("ours", "unipc:spacing=trailing", nfe)]
        if nfe in tuned:
            configs += [("ours", f"unipc:spacing={tuned[nfe]}", nfe)]
        configs += [
                    ("ours", "heun", steps_for("heun", nfe)), ("ours", "euler-a", nfe),
                    ("diffusers", "dpmpp-2m", nfe), ("diffusers", "unipc", nfe), ("diffusers", "euler", nfe)]
    rows = []
    for side, name, steps in configs:
        fds, accs, nfe_used, seconds = [], [], None, 0.0
        for seed in seeds:
            labels = torch.arange(n) % 10
            fn = fn_for(labels)
            streams = NoiseStreams(seed, range(n), pipe.sample_shape)
            x_T = streams.draw()
            t0 = time.perf_counter()
            if side == "ours":
                base, *opt = name.split(":")  # a listed spacing's commas stay inside its option
                sampler = as_v2(toolkit.create("sampler", base, **dict(o.split("=") for o in opt)))
                plan = sampler.plan(pipe.schedule, steps)
                x = run_plan(sampler, fn, plan, x_T, noise_fn=stream_noise_fn(streams.draw, plan.draws_per_step))
                nfe_used = plan.nfe
            else:  # diffusers' defaults: linspace spacing; DPM-Solver++/UniPC with thresholding at 1 (= clipping)
                x = run_diffusers(diffusers_scheduler(name, name != "euler", None), fn, x_T, steps)
                nfe_used = steps
            seconds += time.perf_counter() - t0
            x = x.clamp(-1, 1)
            fds.append(frechet_distance(real, space.features(x)))
            probs = space.probs(x)
            accs.append(float((probs.argmax(1) == labels.numpy()).mean()))
        spacing = name.split("spacing=")[1] if "spacing=" in name else None
        label = "unipc (tuned grid)" if listed_times(spacing) is not None else name
        row = {"side": side, "sampler": label, "spacing": spacing,
               "steps": steps, "nfe": nfe_used, "fd": fds,
               "fd_mean": float(np.mean(fds)), "fd_std": float(np.std(fds, ddof=1)) if len(fds) > 1 else 0.0,
               "accuracy": float(np.mean(accs)), "seconds": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    lines: dict[str, list] = {}
    for r in result["fd"]:
        if r["side"] == "ours" and r["sampler"] == "ddim" and r["steps"] in (20, 50):
            ax1.axhline(r["fd_mean"], linestyle=":", color="grey" if r["steps"] == 50 else "silver",
                        label=f"ours ddim-{r['steps']}")
            continue
        lines.setdefault(f"{r['side']} {r['sampler']}", []).append(r)
    for label, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        style = "-" if label.startswith("ours") else "--"
        ax1.errorbar([r["nfe"] for r in rows], [r["fd_mean"] for r in rows], yerr=[r["fd_std"] for r in rows],
                     marker="o", linestyle=style, label=label, capsize=2)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xticks([5, 10], ["5", "10"])
    ax1.minorticks_off()
    ax1.set_xlabel("network calls per sample (NFE)")
    ax1.set_ylabel(f"FD (mean ± sd over {len(result['config']['seeds'])} seeds)")
    ax1.set_title(f"sample quality, n={result['config']['samples']}")
    ax1.legend(fontsize=7)
    ode: dict[str, list] = {}
    for r in result["ode"]:
        if not r["clip_x0"]:
            continue
        if "ours_tuned" in r:
            ode.setdefault("ours unipc (tuned grid)", []).append((r["ours_tuned_nfe"], r["ours_tuned"]))
            continue
        ode.setdefault(f"ours {r['method']} ({r['ours_default_spacing']})", []).append(
            (r["ours_default_nfe"], r["ours_default"]))
        if r.get("diffusers_trailing") is not None:
            ode.setdefault(f"diffusers {r['diffusers']} (trailing)", []).append((r["nfe_budget"], r["diffusers_trailing"]))
    for label, pts in ode.items():
        pts.sort()
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                 linestyle="-" if label.startswith("ours") else "--", label=label)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xticks([5, 10, 20], ["5", "10", "20"])
    ax2.minorticks_off()
    ax2.set_xlabel("network calls per sample (NFE)")
    ax2.set_ylabel("RMS distance to the 1000-NFE ODE solution")
    ax2.set_title("ODE error (x̂_0 clipped)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="FD samples per seed")
    parser.add_argument("--ode-samples", type=int, default=200, help="samples for the ODE error")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--reference-nfe", type=int, default=1000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--reuse-ode", default=None, help="take section (a) from this results JSON")
    parser.add_argument("--plot-only", default=None, help="redraw the figure of this results JSON")
    parser.add_argument("--tune-samples", type=int, default=256, help="draws of x_T (seed 1000) to tune unipc's grid on")
    parser.add_argument("--tune-nfe", default="5,10", help="NFEs to tune unipc's grid for (empty: none)")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.plot_only).with_suffix(".png"))
        return
    if args.quick:
        args.samples, args.ode_samples, args.seeds, args.reference_nfe = 100, 16, "0,1", 100
        args.tune_samples, args.tune_nfe = 8, "5"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = [int(s) for s in args.seeds.split(",")]
    pipe = toolkit.compose()  # the shipped digits model
    ode_labels = torch.arange(args.ode_samples) % 10
    fn = pipe.model_fn(ode_labels)
    x_T = NoiseStreams(0, range(args.ode_samples), pipe.sample_shape).draw()
    import diffusers

    result: dict[str, Any] = {
        "config": {"samples": args.samples, "ode_samples": args.ode_samples, "seeds": seeds,
                   "reference_nfe": args.reference_nfe, "model": "digits (shipped)", "nfes": list(NFES)},
        "machine": {"torch": torch.__version__, "diffusers": diffusers.__version__, "toolkit": toolkit.__version__,
                    "threads": torch.get_num_threads(), "platform": platform.platform()},
    }
    t0 = time.perf_counter()
    tuned: dict[int, str] = {}  # `toolkit tune-grid --sampler unipc --spacing logsnr --steps N`, on seed 1000
    result["tuned"] = []
    for nfe in [int(v) for v in args.tune_nfe.split(",") if v.strip()]:
        g = tune_grid(None, "unipc", nfe, spacing="logsnr", n=args.tune_samples, seed=1000,
                      reference_nfe=min(500, args.reference_nfe), sweeps=2 if args.quick else 8)
        tuned[nfe] = g.spacing
        result["tuned"].append(attrs.asdict(g))
        print(json.dumps(result["tuned"][-1]), flush=True)
    if args.reuse_ode:
        result["ode"] = json.loads(Path(args.reuse_ode).read_text())["ode"]
        result["config"]["ode_samples"] = json.loads(Path(args.reuse_ode).read_text())["config"]["ode_samples"]
    else:
        result["ode"] = ode_section(pipe, fn, x_T, ode_labels, NFES, args.reference_nfe, tuned)
    data = toolkit.create("dataset", "digits")
    space = feature_space(None, "digits", data.sample_shape)
    real = space.features(data.x)
    result["fd_floor"] = [frechet_distance(real, real[np.random.default_rng(s).choice(len(real), args.samples)])
                          for s in seeds]
    result["fd"] = fd_section(pipe, pipe.model_fn, space, real, args.samples, seeds, NFES[:2], tuned)
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else RESULTS / ("solvers_quick.json" if args.quick else "solvers.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
