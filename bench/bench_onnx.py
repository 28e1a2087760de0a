"""End-to-end sampling throughput on CPU, 50 DDIM steps, the shipped digits model: the exported sampler graph
in onnxruntime (Loop and unrolled layouts) against our PyTorch pipeline and diffusers (a UNet2DModel of the
same size with DDIMScheduler, eager), at batch 1 and 64; plus export time, graph size and session load time.

    python bench/bench_onnx.py [--threads 2] [--rounds 5]
    python bench/bench_onnx.py --device cuda     # on a GPU machine: CUDA provider (IO binding) vs PyTorch on CUDA,
                                                 # plus parity of the two over the whole run

Rounds interleave the contenders, so the ratios come from one run on the same machine state.
Writes bench/results/onnx.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import toolkit
from toolkit.exporters.onnx import export_sampler
from toolkit.exporters.runtime import SamplerSession

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 50


def diffusers_contender(batch: int):
    """A diffusers UNet2DModel shaped like ours (random weights: speed only) and its DDIM loop."""
    from diffusers import DDIMScheduler

    from bench_vs_diffusers import diffusers_unet  # noqa: E402  (same architecture as the quality benchmark)

    unet = diffusers_unet(11).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              set_alpha_to_one=True)
    scheduler.set_timesteps(STEPS)
    x_T = torch.randn(batch, 1, 8, 8)
    y = torch.arange(batch) % 10

    @torch.no_grad()
    def run() -> None:
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=y).sample, t, x, eta=0.0,
                               use_clipped_model_output=True).prev_sample

    return run, sum(p.numel() for p in unet.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = toolkit.compose(sampler="ddim", steps=STEPS, device=args.device)
    provider = args.device
    tmp = Path(tempfile.mkdtemp())
    graphs, export = {}, {}
    for layout in ("loop", "unrolled"):
        t0 = time.perf_counter()
        graphs[layout] = export_sampler(pipe, tmp / f"{layout}.onnx", layout=layout, noise="inputs")  # fed x_T
        export[layout] = {"export_s": round(time.perf_counter() - t0, 2),
                          "size_mb": round(graphs[layout].stat().st_size / 1e6, 2)}
    sessions = {}
    for layout, path in graphs.items():
        t0 = time.perf_counter()
        sessions[layout] = SamplerSession(path, provider=provider, threads=args.threads)
        export[layout]["session_load_s"] = round(time.perf_counter() - t0, 2)
        print(f"{layout:<9} export {export[layout]['export_s']:.1f} s, {export[layout]['size_mb']:.1f} MB, "
              f"session load {export[layout]['session_load_s']:.1f} s", flush=True)

    x_check = torch.randn(8, 1, 8, 8)
    parity = float(np.abs(sessions["loop"].run(x_check.numpy(), None, np.arange(8) % 10)
                          - pipe.sample(8, labels=list(range(8)), noise=x_check).numpy()).max())
    print(f"parity with PyTorch ({args.device}): max |difference| {parity:.2e}")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        labels = list(range(10))
        x_T = torch.randn(batch, 1, 8, 8)
        contenders = {
            "torch (ours)": lambda: pipe.sample(batch, seed=0, labels=labels, noise=x_T),
            "onnxruntime loop": lambda: sessions["loop"].run(x_T.numpy(), None, np.resize(labels, batch)),
            "onnxruntime unrolled": lambda: sessions["unrolled"].run(x_T.numpy(), None, np.resize(labels, batch)),
        }
        dparams = None
        if args.device == "cpu":
            try:
                contenders["diffusers"], dparams = diffusers_contender(batch)
            except ImportError:
                pass
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for fn in contenders.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = float(np.median(times["torch (ours)"]))
        for name, ts in times.items():
            med = float(np.median(ts))
            rows.append({"batch": batch, "contender": name, "median_s": med, "samples_per_s": batch / med,
                         "speedup_vs_torch": base / med, "rounds": ts})
            print(f"batch {batch:>3}  {name:<22} {med * 1000:9.1f} ms  {batch / med:9.1f} samples/s  "
                  f"×{base / med:.2f} vs our torch", flush=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    result = {"steps": STEPS, "device": args.device, "parity_max_abs": parity, "threads": args.threads, "rounds": args.rounds, "export": export, "rows": rows,
              "params_ours": sum(p.numel() for p in pipe.predictor.parameters()), "params_diffusers": dparams,
              "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    name = "onnx.json" if args.device == "cpu" else "onnx_cuda.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
