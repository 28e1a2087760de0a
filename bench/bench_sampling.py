"""Where sampling time goes on the CPU, shipped digits UNet, DDIM 50 steps, one thread, process CPU time.

1. engines: each engine's time for a whole run against the limit (steps × one onnxruntime forward of the
   network, the least any engine can spend), at batch 1, 16 and 256: ours through onnxruntime (the exported
   graph), ours in torch, and a diffusers DDIMScheduler loop around the same network.
2. overhead: the loop's own cost per step (network replaced by a free function), ours against diffusers'.
3. page faults: n samples in a fresh process, torch with and without the allocator tuning of
   ``toolkit.allocator``, and onnxruntime.
4. compose: `toolkit compose -n 256 --steps 50` with no backend flag against `--backend torch` (CPU time of
   the whole command, default threads; the cached graph exported beforehand) and the largest difference.

Contenders are interleaved round by round, so the ratios come from one run on the same machine state.

    python bench/bench_sampling.py [--rounds 3] [--faults-n 10000] [--quick] [--out bench/results/sampling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import toolkit
from toolkit.backends import select
from toolkit.exporters.runtime import available_cores

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 50


def cpu_time(fn, repeat: int = 1) -> float:
    """Mean process CPU seconds of ``fn()`` over ``repeat`` calls."""
    t0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - t0) / repeat


def ort_forward(path: Path, batch: int, shape, conditional: bool):
    """One forward of the exported network in onnxruntime (1 thread, no spinning): the limit's unit."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32),
            "t": np.full((batch,), 500.0, np.float32)}
    if conditional:
        feed["y"] = np.full((batch,), 10, np.int64)
    return lambda: session.run(None, feed)


def diffusers_loop(net, batch: int, shape, steps: int = STEPS):
    """diffusers' DDIMScheduler (the same grid, clipping and final ᾱ = 1 as ours) around ``net``."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing="leading")
    x_T = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run() -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = x_T
        for t in scheduler.timesteps:
            eps = net(x, t.expand(batch).float(), None)[:, : shape[0]]  # ε (a learned-variance model adds Σ channels)
            x = scheduler.step(eps, t, x).prev_sample
        return x

    return run


class FreeNetwork(nn.Module):
    """A stand-in network that costs almost nothing: what remains is the sampling loop's own overhead."""

    def __init__(self, like) -> None:
        super().__init__()
        self.sample_shape, self.num_classes, self.prediction = tuple(like.sample_shape), like.num_classes, "epsilon"
        self.learned_variance = False

    def forward(self, x, t, y=None):
        return x * 0.1


def engines(pipe, graph_dir: Path, rounds: int, batches) -> list[dict]:
    from toolkit.exporters.onnx import export_predictor

    predictor = export_predictor(pipe, graph_dir / "eps.onnx")
    shape, conditional = pipe.sample_shape, pipe.num_classes is not None
    ort_engine, torch_engine = select(pipe, "onnxruntime", threads=1), select(pipe, "torch")
    rows = []
    for batch in batches:
        fwd = ort_forward(predictor, batch, shape, conditional)
        x, t = torch.randn(batch, *shape), torch.full((batch,), 500.0)

        def torch_forward(x=x, t=t):
            with torch.no_grad():
                pipe.predictor(x, t, None)

        contenders = {
            "onnxruntime_forward": lambda: fwd(),
            "torch_forward": torch_forward,
            "ours_onnxruntime": lambda: ort_engine.sample(batch, 0),
            "ours_torch": lambda: torch_engine.sample(batch, 0),
        }
        try:
            contenders["diffusers"] = diffusers_loop(pipe.predictor, batch, shape)
        except ImportError:
            pass
        repeat = {"onnxruntime_forward": max(1, 200 // batch), "torch_forward": max(1, 200 // batch)}
        for fn in contenders.values():
            fn()  # warm
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                times[name].append(cpu_time(fn, repeat.get(name, 1)))
        best = {k: min(v) for k, v in times.items()}
        limit = STEPS * best["onnxruntime_forward"]
        row = {"batch": batch, "limit_s": limit, "seconds": best,
               "fraction_of_limit": {k: limit / best[k] for k in best if not k.endswith("forward")}}
        rows.append(row)
        print(f"batch {batch:>4}: limit {limit:.3f} s; " + ", ".join(
            f"{k} {best[k]:.3f} s ({v:.2f})" for k, v in row["fraction_of_limit"].items()), flush=True)
    return rows


def overhead(pipe, rounds: int, batches) -> list[dict]:
    """Seconds per step of the loop alone: ours (plan, step, noise streams) and diffusers' scheduler."""
    free = FreeNetwork(pipe.predictor)
    ours = toolkit.compose(model=free, schedule=pipe.schedule, steps=STEPS)
    engine = select(ours, "torch")
    rows = []
    for batch in batches:
        contenders = {"ours_torch": lambda: engine.sample(batch, 0)}
        try:
            contenders["diffusers"] = diffusers_loop(free, batch, pipe.sample_shape)
        except ImportError:
            pass
        for fn in contenders.values():
            fn()
        per: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    fn()
                per[name].append((time.perf_counter() - t0) / 10 / STEPS)
        row = {"batch": batch, "us_per_step": {k: 1e6 * min(v) for k, v in per.items()}}
        rows.append(row)
        print(f"overhead batch {batch:>4}: " + ", ".join(f"{k} {v:.0f} µs/step" for k, v in row["us_per_step"].items()),
              flush=True)
    return rows


FAULTS = """
import json, resource, sys, time, torch, toolkit
from toolkit.allocator import tune_allocator
from toolkit.backends import select
from toolkit.exporters.runtime import available_cores
torch.set_num_threads(1)
tuned = tune_allocator()
engine = select(toolkit.compose(steps={steps}), sys.argv[1], threads=1)
next(engine.batches(16, batch_size=16))
r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in engine.batches({n}, batch_size=500):
    pass
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"tuned": tuned, "minor_faults": r1.ru_minflt - r0.ru_minflt, "user_s": r1.ru_utime - r0.ru_utime,
                  "sys_s": r1.ru_stime - r0.ru_stime, "wall_s": time.perf_counter() - w0}}))
"""


def faults(n: int, steps: int, env: dict[str, str]) -> dict[str, dict]:
    out = {}
    for name, backend, tuning in (("torch_untuned", "torch", "0"), ("torch_tuned", "torch", "1"),
                                  ("onnxruntime", "onnxruntime", "1")):
        proc = subprocess.run([sys.executable, "-c", FAULTS.format(n=n, steps=steps), backend], capture_output=True,
                              text=True, env={**env, "TOOLKIT_MALLOC_TUNING": tuning, "OMP_NUM_THREADS": "1"},
                              check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = out[name]
        print(f"faults {name:<14} n={n}: {r['minor_faults']:>9} minor faults, user {r['user_s']:.2f} s, "
              f"sys {r['sys_s']:.2f} s, wall {r['wall_s']:.2f} s", flush=True)
    return out


def compose(rounds: int, env: dict[str, str], tmp: Path) -> dict:
    toolkit_cmd = [sys.executable, "-m", "toolkit", "compose", "-n", "256", "--steps", str(STEPS), "-q"]
    env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "TOOLKIT_BACKEND")}

    def one(extra: list[str], out: Path) -> float:
        out.unlink(missing_ok=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([*toolkit_cmd, *extra, "--out", str(out)], env=env, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    auto, torch_ = tmp / "auto.npy", tmp / "torch.npy"
    one([], auto)  # exports and checks the graph into the cache: the runs below find it there
    cpu: dict[str, list[float]] = {"default": [], "torch": []}
    for _ in range(rounds):
        cpu["default"].append(one([], auto))
        cpu["torch"].append(one(["--backend", "torch"], torch_))
    best = {k: min(v) for k, v in cpu.items()}
    diff = float(np.abs(np.load(auto) - np.load(torch_)).max())
    row = {"cpu_s": best, "ratio_default_to_torch": best["default"] / best["torch"], "max_abs_diff": diff,
           "threads": available_cores()}
    print(f"compose -n 256 --steps {STEPS}: default {best['default']:.2f} s CPU, --backend torch {best['torch']:.2f} s "
          f"({row['ratio_default_to_torch']:.2f}), max difference {diff:.1e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--faults-n", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 16, small n: a check that it runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = (1, 16) if args.quick else (1, 16, 256)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "TOOLKIT_CACHE_DIR": str(tmp / "cache")}
        os.environ["TOOLKIT_CACHE_DIR"] = env["TOOLKIT_CACHE_DIR"]
        pipe = toolkit.compose(steps=STEPS)
        result = {
            "config": {"steps": STEPS, "sampler": "ddim", "model": "digits", "threads": 1, "rounds": args.rounds,
                       "quick": args.quick, "allocator_tuned_in_engines": False},  # as an API user's process
            "machine": {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                        "cores": os.cpu_count()},
            "engines": engines(pipe, tmp, args.rounds, batches),
            "overhead": overhead(pipe, args.rounds, batches if args.quick else (1, 256)),
            "faults": faults(200 if args.quick else args.faults_n, 10, env),
            "compose": None if args.quick else compose(args.rounds, env, tmp),
        }
    try:
        import diffusers

        result["machine"]["diffusers"] = diffusers.__version__
    except ImportError:
        result["machine"]["diffusers"] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
