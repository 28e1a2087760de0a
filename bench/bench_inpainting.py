"""Inpainting on the shipped digits model: the lower half of n real digits filled in (RePaint), judged by the
shipped feature network (is the completion still the original class?), against RePaint's resampling
(resample = 1 is plain known-region replacement), unconditionally and with the true class as the label; and the
exported inpainting graph (onnxruntime) against torch on the same seed.

    python bench/bench_inpainting.py [--n 200] [--out bench/results/inpainting.json]
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
from toolkit import inpainting
from toolkit.evaluate import feature_space
from toolkit.images import save_samples

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "inpainting.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = toolkit.create("dataset", "digits")
    x0, y = data.x[: args.n], data.y[: args.n]
    space = feature_space(None, "digits", data.sample_shape)
    mask = inpainting.named_mask("lower-half", data.sample_shape)
    fill = mask.expand_as(x0).bool()
    pipe = toolkit.compose(sampler="ddim", steps=args.steps)
    rate = lambda out: float((space.probs(out).argmax(1) == y).float().mean())  # noqa: E731
    rows = []
    for conditional in (False, True):
        for resample, jump in ((1, 5), (5, 5), (10, 10)):
            plan = inpainting.Inpaint(pipe.sampler, resample=resample, jump=jump).plan(pipe.schedule, pipe.steps)
            t0 = time.perf_counter()
            out = pipe.inpaint(x0, mask, seed=0, labels=y if conditional else None, resample=resample, jump=jump)
            seconds = time.perf_counter() - t0
            rows.append({"labels": "true class" if conditional else "none (unconditional)", "resample": resample,
                         "jump": jump, "nfe": plan.nfe, "class_rate": rate(out),
                         "fill_mean_abs_error": float((out - x0)[fill].abs().mean()), "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
            if conditional is False and resample == 5:
                grid_out = out
    with tempfile.TemporaryDirectory() as tmp:
        from toolkit.exporters.onnx import export_sampler
        from toolkit.exporters.runtime import SamplerSession

        path = export_sampler(pipe, Path(tmp) / "inpaint.onnx", task="inpaint")
        session = SamplerSession(path)
        t0 = time.perf_counter()
        got = session.sample(len(x0), seed=0, image=x0.numpy(), mask=mask.numpy(),
                             labels=np.full(len(x0), pipe.num_classes))
        seconds = time.perf_counter() - t0
    onnx_row = {"resample": inpainting.DEFAULT_RESAMPLE, "jump": inpainting.DEFAULT_JUMP,
                "class_rate": rate(torch.from_numpy(got)),
                "max_abs_difference_to_torch": float(np.abs(got - grid_out.numpy()).max()), "seconds": round(seconds, 1)}
    print("onnx", json.dumps(onnx_row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    k = 16
    masked = x0[:k].clone()
    masked[fill[:k]] = -1
    save_samples(torch.cat([x0[:k], masked, grid_out[:k]]), RESULTS / "inpainting.png", nrow=k)
    result = {"config": {"n": args.n, "model": "digits", "sampler": "ddim", "steps": args.steps, "mask": "lower-half",
                         "judge": "shipped feature network: completion classified as the original digit's class"},
              "real_class_rate": rate(x0), "rows": rows, "onnx_unconditional_default": onnx_row,
              "picture": "inpainting.png (rows: real, masked, inpainted unconditionally with resample 5, jump 5)"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
