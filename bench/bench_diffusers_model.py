"""A diffusers-trained digits model, sampled by the toolkit: the UNet2DModel is trained here with diffusers' own
training loop (DDPMScheduler.add_noise, MSE on ε, diffusers' EMAModel) and saved as a DDPMPipeline folder; then
`--model FOLDER` samples it. Our 10-NFE solvers (torch, and the exported ONNX graph in onnxruntime) against
diffusers' DPM-Solver++ (its scheduler config as saved, and with thresholding) and DDIM on the same model, from the
same x_T: Fréchet distance in the shipped digits feature space (n samples, 2 seeds) and seconds.

    python bench/bench_diffusers_model.py [--train-steps 4000] [--n 1000] [--out bench/results/diffusers_model.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import toolkit
from toolkit.evaluate import feature_space
from toolkit.metrics import frechet_distance
from toolkit.noise import NoiseStreams

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"


def train(folder: Path, steps: int, batch: int = 128, lr: float = 1e-3, seed: int = 0) -> float:
    """diffusers' recipe (as its train_unconditional example): ε-MSE at uniform t, AdamW, EMA 0.999."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    data = toolkit.create("dataset", "digits").x
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=False)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        x0 = data[torch.randint(0, len(data), (batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        if step % 500 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    final = copy.deepcopy(unet)
    ema.copy_to(final.parameters())
    DDPMPipeline(unet=final.eval(), scheduler=sched).save_pretrained(folder, safe_serialization=True)
    return time.perf_counter() - t0


@torch.no_grad()
def diffusers_loop(sched, unet, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=4000)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=RESULTS / "diffusers_model.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = CACHE / f"diffusers-digits-{args.train_steps}"
    train_seconds = None
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(exist_ok=True)
        train_seconds = train(folder, args.train_steps)
    from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler

    hf = DDPMPipeline.from_pretrained(folder, local_files_only=True)
    unet = hf.unet.eval()
    data = toolkit.create("dataset", "digits")
    space = feature_space(None, "digits", data.sample_shape)
    real = space.features(data.x)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []

    def record(side: str, name: str, nfe: int, make) -> None:
        fds, seconds = [], 0.0
        for seed in seeds:
            x_T = NoiseStreams(seed, range(args.n), (1, 8, 8)).draw()
            t0 = time.perf_counter()
            x = make(seed, x_T)
            seconds += time.perf_counter() - t0
            fds.append(frechet_distance(real, space.features(torch.as_tensor(x))))
        rows.append({"side": side, "sampler": name, "nfe": nfe, "fd": fds, "fd_mean": float(np.mean(fds)),
                     "seconds_per_seed": round(seconds / len(seeds), 2)})
        print(json.dumps(rows[-1]), flush=True)

    for name, sched in (
            ("dpm-solver++ 2M (the saved scheduler config)", DPMSolverMultistepScheduler.from_config(hf.scheduler.config)),
            ("dpm-solver++ 2M, thresholding at 1", DPMSolverMultistepScheduler.from_config(
                hf.scheduler.config, thresholding=True, sample_max_value=1.0)),
            ("ddim", DDIMScheduler.from_config(hf.scheduler.config, set_alpha_to_one=True))):
        record("diffusers", name, 10, lambda seed, x_T, s=sched: diffusers_loop(s, unet, x_T, 10))
    for name in ("dpmpp-2m", "unipc", "ddim"):
        pipe = toolkit.compose(model=folder, sampler=name, steps=10)
        record("toolkit (torch)", name, pipe.nfe, lambda seed, x_T, p=pipe: p.sample(args.n, seed=seed, noise=x_T,
                                                                                      batch_size=args.n))
    from toolkit.exporters.onnx import export_sampler
    from toolkit.exporters.runtime import SamplerSession

    with tempfile.TemporaryDirectory() as tmp:
        pipe = toolkit.compose(model=folder, sampler="unipc", steps=10)
        session = SamplerSession(export_sampler(pipe, Path(tmp) / "unipc.onnx"))
        record("toolkit (exported graph, onnxruntime)", "unipc", pipe.nfe,
               lambda seed, x_T: session.sample(args.n, seed=seed, batch_size=args.n))
        same = float(np.abs(session.sample(64, seed=0) - pipe.sample(64, seed=0).numpy()).max())
    pick = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(0))[: args.n]
    real_fd = frechet_distance(real, space.features(data.x[pick]))  # n real points against all: what a perfect model scores
    result = {"config": {"model": "UNet2DModel (32, 64), attention at 4×4, trained by diffusers' loop",
                         "train_steps": args.train_steps, "train_seconds": train_seconds, "n": args.n, "seeds": seeds,
                         "schedule": "squaredcos_cap_v2, 1000 steps", "x_T": "the toolkit's noise streams, shared"},
              "rows": rows, "onnx_vs_torch_max_abs_difference": same,
              "real_subset_fd": real_fd}
    RESULTS.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
