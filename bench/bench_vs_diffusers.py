"""Benchmark: diffusion-toolkit against Hugging Face diffusers on the digits, same recipe on both sides.

Trains our UNet (toolkit.training.train) and a diffusers UNet2DModel of about the same size with the
same data stream, schedule, loss, optimizer, warmup, EMA and clipping; then samples both with DDIM and
DDPM and reports samples/s, Fréchet distance (bench classifier features) and class accuracy.

    python bench/bench_vs_diffusers.py            # full run
    python bench/bench_vs_diffusers.py --quick    # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import toolkit
from common import Judge
from toolkit.noise import NoiseStreams, sample_seed
from toolkit.training import TrainConfig, train

SAMPLE_BATCH = 500
SHAPE = (1, 8, 8)
RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"train_steps": 4000, "samples": 1000, "ddim_steps": "10,20,50,100", "ddpm_steps": 1000,
        "out": str(RESULTS / "vs_diffusers.json")}
QUICK = {"train_steps": 50, "samples": 50, "ddim_steps": "10", "ddpm_steps": 20,
         "out": str(RESULTS / "vs_diffusers_quick.json")}


def recipe(steps: int, seed: int) -> TrainConfig:
    """The one training recipe both sides follow."""
    return TrainConfig(dataset="digits", model="unet", schedule="cosine", num_timesteps=1000, steps=steps,
                       batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999, grad_clip=1.0, p_uncond=0.1,
                       seed=seed, checkpoint_every=steps)


def diffusers_unet(num_class_embeds: int) -> UNet2DModel:
    """A UNet2DModel shaped like ours: 32→64 channels, 1 res block per level, FiLM, attention at 4×4."""
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=16, attention_head_dim=16, resnet_time_scale_shift="scale_shift",
                       num_class_embeds=num_class_embeds)


def params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def train_ours(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """toolkit.training.train into checkpoint directory ``out``."""
    t0 = time.perf_counter()
    result = train(cfg, out, quiet=True)
    elapsed = time.perf_counter() - t0
    return {"steps_per_s": cfg.steps / elapsed, "seconds": elapsed, "final_loss": result.loss,
            "params": params(toolkit.load_checkpoint(out).model)}


def train_diffusers(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """toolkit.training.train's recipe as a plain loop over a diffusers UNet2DModel; EMA saved to ``out``."""
    t0 = time.perf_counter()
    data = toolkit.create("dataset", cfg.dataset)
    alphas_cumprod = toolkit.create("schedule", cfg.schedule, num_timesteps=cfg.num_timesteps).alphas_cumprod
    torch.manual_seed(cfg.seed)
    unet = diffusers_unet(data.num_classes + 1)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    B = cfg.batch_size
    loss_avg = math.nan
    unet.train()
    for step in range(cfg.steps):
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, step))
        idx = torch.randint(len(data), (B,), generator=g)
        t = torch.randint(cfg.num_timesteps, (B,), generator=g)
        noise = torch.randn((B, *data.sample_shape), generator=g)
        drop = torch.rand(B, generator=g) < cfg.p_uncond
        y = torch.where(drop, data.num_classes, data.y[idx])
        a = alphas_cumprod[t].float().reshape(B, 1, 1, 1)
        x_t = a.sqrt() * data.x[idx] + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, noise)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema.update_parameters(unet)
        value = float(loss.detach())
        loss_avg = value if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * value
    ema.module.save_pretrained(out)
    elapsed = time.perf_counter() - t0
    return {"steps_per_s": cfg.steps / elapsed, "seconds": elapsed, "final_loss": loss_avg, "params": params(unet)}


def sample_ours(ckpt: Path, sampler: str, steps: int, n: int, seed: int) -> tuple[Tensor, float]:
    """n samples (labels cycling 0..9) through toolkit.compose, and the seconds ``sample`` took."""
    pipe = toolkit.compose(model=ckpt, sampler=sampler, steps=steps, batch_size=SAMPLE_BATCH)
    t0 = time.perf_counter()
    x = pipe.sample(n, seed=seed, labels=list(range(10)))
    return x, time.perf_counter() - t0


@torch.no_grad()
def sample_diffusers(unet: UNet2DModel, sampler: str, steps: int, n: int, seed: int) -> tuple[Tensor, float]:
    """The same through diffusers' scheduler loop; x_T is ours (same seed), the DDPM step noise diffusers' own."""
    common = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
              "timestep_spacing": "leading"}
    if sampler == "ddim":
        scheduler = DDIMScheduler(**common, set_alpha_to_one=True)
        extra = {"eta": 0.0, "use_clipped_model_output": True}  # ε re-derived from the clipped x̂_0, as ours
    else:
        scheduler = DDPMScheduler(**common, variance_type="fixed_small")
        extra = {}
    t0 = time.perf_counter()
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, SAMPLE_BATCH):
        stop = min(n, start + SAMPLE_BATCH)
        x = NoiseStreams(seed, range(start, stop), SHAPE).draw() * scheduler.init_noise_sigma
        y = torch.arange(start, stop) % 10
        for t in scheduler.timesteps:
            eps = unet(x, t, class_labels=y).sample
            x = scheduler.step(eps, t, x, generator=g, **extra).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out), time.perf_counter() - t0


def table(result: dict[str, Any]) -> str:
    """The results as markdown: a header line, then one row per (sampler, steps)."""
    o, d = result["train"]["ours"], result["train"]["diffusers"]
    lines = [
        f"train: ours {o['steps_per_s']:.2f} steps/s, {o['params']:,} params, loss {o['final_loss']:.4f} | "
        f"diffusers {d['steps_per_s']:.2f} steps/s, {d['params']:,} params, loss {d['final_loss']:.4f} | "
        f"classifier held-out acc {result['classifier']['holdout_accuracy']:.3f}, "
        f"FD floor ({result['config']['samples']} real digits) {result['classifier']['fd_floor']:.3f}",
        "",
        "| sampler | steps | samples/s ours | samples/s diffusers | FD ours | FD diffusers | acc ours | acc diffusers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        o, d = r["ours"], r["diffusers"]
        lines.append(f"| {r['sampler']} | {r['steps']} | {o['samples_per_s']:.1f} | {d['samples_per_s']:.1f} | "
                     f"{o['fd']:.3f} | {d['fd']:.3f} | {o['accuracy']:.3f} | {d['accuracy']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse options, run both sides interleaved, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, help="optimizer steps per model (default 4000; quick 50)")
    parser.add_argument("--samples", type=int, help="samples per row (default 1000; quick 50)")
    parser.add_argument("--ddim-steps", help="comma-separated DDIM step counts (default 10,20,50,100; quick 10)")
    parser.add_argument("--ddpm-steps", type=int, help="DDPM steps (default 1000; quick 20)")
    parser.add_argument("--out", help="JSON results (default bench/results/vs_diffusers.json; "
                                      "quick vs_diffusers_quick.json)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    rows = [("ddim", int(s)) for s in args.ddim_steps.split(",")] + [("ddpm", args.ddpm_steps)]
    labels = torch.arange(args.samples) % 10
    judge = Judge(args.seed)

    def measure(x: Tensor, seconds: float) -> dict[str, float]:
        return {"samples_per_s": args.samples / seconds, "seconds": seconds, **judge.score(x, labels)}

    cfg = recipe(args.train_steps, args.seed)
    result: dict[str, Any] = {
        "config": vars(args),
        "machine": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                    "toolkit": toolkit.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "classifier": {"holdout_accuracy": judge.holdout_accuracy, "fd_floor": judge.fd_floor(args.samples)},
        "train": {},
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        ours_ckpt, theirs_dir = Path(tmp) / "ours", Path(tmp) / "diffusers"
        for side, fn, path in (("ours", train_ours, ours_ckpt), ("diffusers", train_diffusers, theirs_dir)):
            result["train"][side] = stats = fn(cfg, path)
            print(f"trained {side}: {stats['params']:,} params, {stats['steps_per_s']:.2f} steps/s", flush=True)
        unet = UNet2DModel.from_pretrained(theirs_dir, low_cpu_mem_usage=False).eval()
        sample_ours(ours_ckpt, "ddim", 2, min(args.samples, SAMPLE_BATCH), args.seed)  # warm-up, untimed
        sample_diffusers(unet, "ddim", 2, min(args.samples, SAMPLE_BATCH), args.seed)
        for sampler, steps in rows:
            row: dict[str, Any] = {"sampler": sampler, "steps": steps}
            row["ours"] = measure(*sample_ours(ours_ckpt, sampler, steps, args.samples, args.seed))
            row["diffusers"] = measure(*sample_diffusers(unet, sampler, steps, args.samples, args.seed))
            result["rows"].append(row)
            print(f"sampled {sampler} {steps}: ours {row['ours']['seconds']:.1f}s, "
                  f"diffusers {row['diffusers']['seconds']:.1f}s", flush=True)
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
