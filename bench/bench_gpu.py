"""Every sampling engine on one device, shipped digits UNet, DDIM: samples per second at batch 1, 16 and 256.

Contenders: ours in torch eager, ours with the network under torch.compile, ours through the exported graph in
onnxruntime (Loop and unrolled layouts; CUDA provider with IO binding on a GPU), and a diffusers
DDIMScheduler loop around the same network. Each row records the largest difference to the torch eager
samples of the same seed. Contenders that need what the device lacks are written as skipped, with the reason
(CUDA graphs of the sampling loop and an fp16 graph are not built yet: they need a GPU session to build and
verify). One prepared script for a lent GPU; with ``--device cpu`` it runs to completion on any machine (the
tests run it with ``--quick``).

    python bench/bench_gpu.py --device cuda                  # writes bench/results/gpu.json
    python bench/bench_gpu.py --device cpu --quick --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import toolkit
from toolkit.backends import select

RESULTS = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device, rounds: int) -> tuple[float, torch.Tensor]:
    """Best wall seconds of ``fn()`` over ``rounds`` (after one warm call), and its last output on the CPU."""
    out = fn()
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, out.detach().float().cpu()


def diffusers_contender(net, batch: int, shape, steps: int, device: torch.device):
    from diffusers import DDIMScheduler

    from toolkit.noise import NoiseStreams

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing="leading")
    x_T = NoiseStreams(0, range(batch), shape, device).draw()  # the x_T of our seed 0

    @torch.no_grad()
    def run() -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = x_T
        for t in scheduler.timesteps:
            eps = net(x, t.to(device).expand(batch).float(), None)[:, : shape[0]]  # ε without learned-Σ channels
            x = scheduler.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)

    return run


def contenders(pipe, device: torch.device, quick: bool, tmp: Path) -> dict[str, Callable | str]:
    """name → a function (batch → run()) or the reason it is skipped here."""
    out: dict[str, Callable | str] = {}
    eager = select(pipe, "torch")
    out["ours_torch_eager"] = lambda b: (lambda: eager.sample(b, 0))
    net = pipe.predictor
    # the quick check traces the network with dynamo only (backend "eager"): inductor's C++ build takes minutes
    compiled_net = torch.compile(net, backend="eager" if quick else "inductor", dynamic=False)

    class Compiled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            for name in ("sample_shape", "num_classes", "prediction", "learned_variance"):
                setattr(self, name, getattr(net, name))

        def forward(self, x, t, y=None):
            return compiled_net(x, t, y)

    compiled = select(toolkit.compose(model=Compiled(), schedule=pipe.schedule, steps=pipe.steps, device=device),
                      "torch")
    out["ours_torch_compiled"] = lambda b: (lambda: compiled.sample(b, 0))
    out["ours_torch_cuda_graphs"] = ("not built yet: capturing the sampling loop needs a GPU session to build and "
                                     "verify" if device.type == "cuda" else "needs CUDA")
    try:
        import onnxruntime  # noqa: F401

        for layout in ("loop", "unrolled"):
            engine = select(pipe, "onnxruntime", layout=layout)
            out[f"ours_onnxruntime_{layout}"] = (lambda e: lambda b: (lambda: e.sample(b, 0)))(engine)
    except ImportError:
        out["ours_onnxruntime_loop"] = out["ours_onnxruntime_unrolled"] = "onnxruntime is not installed"
    out["ours_onnxruntime_fp16"] = "not built yet: an fp16 graph needs a GPU session to measure its error"
    try:
        import diffusers  # noqa: F401

        out["diffusers_eager"] = lambda b: diffusers_contender(net, b, pipe.sample_shape, pipe.steps, device)
    except ImportError:
        out["diffusers_eager"] = "diffusers is not installed (pip install 'diffusion-toolkit[diffusers]')"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 2, 5 steps, one round")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu to check the script)")
    steps, rounds, batches = (5, 1, (1, 2)) if args.quick else (args.steps, args.rounds, (1, 16, 256))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TOOLKIT_CACHE_DIR"] = str(Path(tmp) / "cache")
        pipe = toolkit.compose(steps=steps, device=device)
        table = contenders(pipe, device, args.quick, Path(tmp))
        rows = []
        for batch in batches:
            reference = None
            for name, make in table.items():
                if isinstance(make, str):
                    rows.append({"contender": name, "batch": batch, "skipped": make})
                    continue
                seconds, x = timed(make(batch), device, rounds)
                reference = x if reference is None else reference
                diff = float((x - reference).abs().max())
                rows.append({"contender": name, "batch": batch, "seconds": seconds, "samples_per_s": batch / seconds,
                             "max_abs_diff_to_eager": diff})
                print(f"batch {batch:>4} {name:<26} {batch / seconds:>10.1f} samples/s  (max diff {diff:.1e})",
                      flush=True)
    result = {"config": {"device": str(device), "steps": steps, "rounds": rounds, "batches": list(batches),
                         "quick": args.quick, "model": "digits", "sampler": "ddim"},
              "machine": {"torch": torch.__version__, "platform": platform.platform(),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                          "threads": torch.get_num_threads()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
