"""Sampling from t = T-1 (trailing / linspace grids): the shipped ε-prediction digits model against a digits model
trained with zero terminal SNR and v-prediction (Lin et al. 2024), driven by our samplers and by diffusers'
DPM-Solver++, UniPC and Euler configured as each model needs and otherwise left at their defaults (timestep_spacing
"linspace", which starts at t = T-1; no thresholding).

    python bench/bench_zero_snr.py [--n 1000] [--seeds 0,1] [--train]

The zero-terminal-SNR model is `bench/models/digits-zsnr-v`, made by `toolkit train --out digits-zsnr-v --quiet
--schedule-option zero_terminal_snr=true` (the shipped model's network and budget, 4000 steps; L_simple, v-prediction
by default); --train makes it again. Fréchet distance in the shipped digits feature space and class accuracy, with
balanced labels i mod 10, n samples per seed, every contender from the same x_T. Writes
bench/results/zero_snr.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import toolkit
from toolkit.evaluate import feature_space
from toolkit.metrics import frechet_distance
from toolkit.noise import NoiseStreams
from toolkit.sampling import run_plan, stream_noise_fn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ZSNR = HERE / "models" / "digits-zsnr-v"


def diffusers_scheduler(kind: str, model_config: dict[str, Any]):
    """diffusers' scheduler at its defaults, told only what the model is: its β schedule, what it predicts and
    whether its schedule has zero terminal SNR."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    options = model_config["schedule"].get("options", {})
    kw: dict[str, Any] = {"num_train_timesteps": options.get("num_timesteps", 1000), "beta_schedule": "squaredcos_cap_v2",
                          "prediction_type": {"epsilon": "epsilon", "v": "v_prediction"}[
                              model_config["model"]["options"]["prediction"]]}
    if options.get("zero_terminal_snr"):
        kw["rescale_betas_zero_snr"] = True
    return {"dpm-solver++ 2M": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
            "euler": EulerDiscreteScheduler}[kind](**kw)


@torch.no_grad()
def run_diffusers(sched, net, labels, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' loop with our network's own output (ε or v), from our x_T."""
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    C = x.shape[1]
    for t in sched.timesteps:
        out = net(sched.scale_model_input(x, t), torch.full((len(x),), int(t)), labels)[:, :C]
        x = sched.step(out, t, x).prev_sample
    return x


def contenders() -> list[tuple[str, str, dict[str, Any], int]]:
    rows = [("ours", "ddim", {}, 50), ("ours", "ddim", {"spacing": "trailing"}, 10),
            ("ours", "ddim", {"spacing": "trailing"}, 50), ("ours", "ddim", {"spacing": "trailing", "clip_x0": False}, 50),
            ("ours", "dpmpp-2m", {"spacing": "trailing"}, 10), ("ours", "unipc", {"spacing": "trailing"}, 10)]
    rows += [("diffusers", kind, {}, 10) for kind in ("dpm-solver++ 2M", "unipc", "euler")]
    return rows


def evaluate(model: str, n: int, seeds: list[int], space, real) -> list[dict[str, Any]]:
    base = toolkit.compose(model=model)
    rows = []
    for side, name, options, steps in contenders():
        fds, accs, t0 = [], [], time.perf_counter()
        for seed in seeds:
            labels = torch.arange(n) % 10
            streams = NoiseStreams(seed, range(n), base.sample_shape)
            x_T = streams.draw()
            if side == "ours":
                pipe = toolkit.compose(model=model, sampler=name, steps=steps, **options)
                x = run_plan(pipe.sampler, pipe.model_fn(labels), pipe.plan, x_T,
                             noise_fn=stream_noise_fn(streams.draw, pipe.plan.draws_per_step))
            else:
                x = run_diffusers(diffusers_scheduler(name, base.config), base.predictor, labels, x_T, steps)
            x = x.clamp(-1, 1)
            fds.append(frechet_distance(real, space.features(x)))
            accs.append(float((space.probs(x).argmax(1) == labels.numpy()).mean()))
        row = {"side": side, "sampler": name, "options": options, "steps": steps, "fd": fds,
               "fd_mean": float(np.mean(fds)), "accuracy": float(np.mean(accs)),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"  {side:<9} {name:<16} {json.dumps(options):<45} {steps:>3} steps  FD {row['fd_mean']:8.2f}  "
              f"acc {row['accuracy']:.3f}", flush=True)
    return rows


def train(out: Path) -> None:
    """The recipe, run in bench/models so that the recorded command names no machine path; weights and config kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "toolkit", "train", "--schedule-option", "zero_terminal_snr=true", "--out",
                    out.name, "--quiet", "--overwrite"], check=True, cwd=out.parent)
    for extra in out.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--train", action="store_true", help="train bench/models/digits-zsnr-v again first")
    args = ap.parse_args()
    if args.train or not (ZSNR / "model.safetensors").exists():
        train(ZSNR)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = toolkit.create("dataset", "digits")
    space = feature_space(None, "digits", data.sample_shape)
    real = space.features(data.x)
    import diffusers

    result: dict[str, Any] = {"n": args.n, "seeds": seeds, "diffusers": diffusers.__version__, "models": {}}
    for label, model in (("digits (shipped: cosine, ε, L_hybrid)", "digits"),
                         ("digits-zsnr-v (cosine rescaled to zero terminal SNR, v, L_simple)", str(ZSNR))):
        print(label, flush=True)
        result["models"][label] = evaluate(model, args.n, seeds, space, real)
    result["real_vs_real_fd"] = [frechet_distance(real, real[np.random.default_rng(s).choice(len(real), args.n)])
                                 for s in seeds]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zero_snr.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'zero_snr.json'}")


if __name__ == "__main__":
    main()
