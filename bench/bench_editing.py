"""Editing on the shipped digits model: DDIM inversion round-trip error against steps, img2img (SDEdit)
towards another class against strength, and an interpolation strip.

- inversion: n real digits → x_T (DDIM backwards) → samples again; mean |error| per pixel and RMS per digit.
- img2img: digits of class A edited towards class B with cfg (scale 3): the fraction the shipped
  feature network classifies as B, and the mean change, per strength.
- interpolation: strips between pairs of real digits (`bench/results/editing_interpolation.png`).

    python bench/bench_editing.py [--n 100] [--out bench/results/editing.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import toolkit
from toolkit.evaluate import feature_space
from toolkit.images import save_samples

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--source", type=int, default=3)
    parser.add_argument("--target", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "editing.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = toolkit.create("dataset", "digits")
    x0, y = data.x[: args.n], data.y[: args.n]
    rows = []
    for steps in (10, 20, 50, 100):
        pipe = toolkit.compose(sampler="ddim", steps=steps)
        back = pipe.sample(len(x0), labels=y, noise=pipe.invert(x0, labels=y))
        d = back - x0
        rows.append({"steps": steps, "mean_abs_error": float(d.abs().mean()),
                     "rms_per_digit": float(d.pow(2).flatten(1).mean(1).sqrt().mean())})
        print(f"inversion, ddim {steps:>3} steps: mean |error| {rows[-1]['mean_abs_error']:.4f}, "
              f"RMS per digit {rows[-1]['rms_per_digit']:.4f}", flush=True)
    space = feature_space(None, "digits", data.sample_shape)
    source = data.x[data.y == args.source][: args.n]
    cfg = toolkit.compose(sampler="ddim", steps=50, guidance="cfg", guidance_options={"scale": 3.0})
    base = float((space.probs(source).argmax(1) == args.target).mean())
    edits = [{"strength": 0.0, "target_rate": base, "mean_change": 0.0}]
    for strength in (0.2, 0.4, 0.5, 0.6, 0.8, 1.0):
        out = cfg.edit(source, strength, labels=args.target)
        edits.append({"strength": strength, "target_rate": float((space.probs(out).argmax(1) == args.target).mean()),
                      "source_rate": float((space.probs(out).argmax(1) == args.source).mean()),
                      "mean_change": float((out - source).abs().mean())})
        print(f"img2img {args.source}→{args.target}, strength {strength}: classified {args.target} "
              f"{edits[-1]['target_rate']:.2f}, still {args.source} {edits[-1]['source_rate']:.2f}", flush=True)
    pipe = toolkit.compose(sampler="ddim", steps=50)
    strips = [pipe.interpolate(data.x[i], data.x[j], 8) for i, j in ((0, 1), (3, 8), (5, 7), (2, 6))]
    RESULTS.mkdir(exist_ok=True)
    save_samples(torch.cat(strips), RESULTS / "editing_interpolation.png", nrow=8)
    result = {"config": {"n": args.n, "model": "digits", "sampler": "ddim", "img2img": {
        "source": args.source, "target": args.target, "guidance": "cfg", "scale": 3.0, "steps": 50}},
        "inversion": rows, "img2img": edits, "interpolation_png": "editing_interpolation.png"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
