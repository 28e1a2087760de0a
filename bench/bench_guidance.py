"""Benchmark: classifier-free guidance against classifier guidance on the class-conditional digits model.

For each guidance method (cfg at weights w, classifier guidance at scales s) and each sampler (DDIM,
DDPM) it draws ``per_class`` digits of every class and reports, per scale: class consistency (the
fraction an independent judge CNN, trained on clean real digits and never used for guidance, assigns
to the requested class; overall and the worst class), diversity (mean pairwise L2 distance between
samples of the same class, averaged over classes; real digits give the reference), Fréchet distance
of the judge's features to the real digits, an Inception-Score-like score exp E KL(p(y|x) ‖ p(y)) from the
judge, improved precision and recall (Kynkäänniemi et al. 2019, k = 3) in the judge's feature space, and
samples/s. The same figures for the same number of real digits are reported as a reference (not a floor).
A plot of IS-like score, FD, precision and recall against the scale goes to bench/results/guidance_tradeoff.png.

All scales of one method run in one pipeline call with a per-sample ``scale`` and the same x_T for
every scale, so rows differ only by scale (with --sweep batch the DDPM step noise is drawn per sample
index and so differs between scales; --sweep loop runs one call per scale with the same seed instead,
which pairs the step noise too and times each scale on its own).

    python bench/bench_guidance.py                # full run
    python bench/bench_guidance.py --quick        # smoke run
    python bench/bench_guidance.py --quick --classifier DIR   # with a classifier from train-classifier
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

import toolkit
from common import Judge
from toolkit.errors import ToolkitError
from toolkit.images import check_output, save_samples
from toolkit.noise import NoiseStreams

NUM_CLASSES = 10
SAMPLE_BATCH = 1000  # samples per sampler batch: a whole sweep of the default sizes in one batch
GRID_COLUMNS = 10
RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"per_class": 20, "ddpm_steps": 1000, "ddim_steps": 50,
        "out": str(RESULTS / "guidance.json"), "grid": str(RESULTS / "guidance_rows.png")}
QUICK = {"per_class": 2, "ddpm_steps": 20, "ddim_steps": 5,
         "out": str(RESULTS / "guidance_quick.json"), "grid": str(RESULTS / "guidance_quick_rows.png")}


def parse_scales(text: str) -> list[float]:
    """'0,1,3,5' → [0.0, 1.0, 3.0, 5.0]: distinct, non-negative."""
    scales = [float(s) for s in text.split(",") if s.strip()]
    if not scales or any(s < 0 or not math.isfinite(s) for s in scales) or len(set(scales)) != len(scales):
        raise SystemExit(f"scales must be distinct non-negative numbers, got {text!r}")
    return scales


def class_labels(per_class: int) -> Tensor:
    """[0]*per_class + [1]*per_class + ... + [9]*per_class."""
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def diversity(x: Tensor, labels: Tensor) -> tuple[float, list[float]]:
    """Mean pairwise L2 distance between same-class samples, averaged over classes, and per class."""
    flat = x.flatten(1).double()
    per_class = []
    for c in range(NUM_CLASSES):
        xc = flat[labels == c]
        if len(xc) < 2:
            per_class.append(math.nan)
            continue
        i, j = torch.triu_indices(len(xc), len(xc), offset=1)
        per_class.append(float((xc[i] - xc[j]).norm(dim=1).mean()))
    valid = [d for d in per_class if not math.isnan(d)]
    return (sum(valid) / len(valid) if valid else math.nan), per_class


def sweep(method: str, scales: Sequence[float], sampler: str, steps: int, args: argparse.Namespace
          ) -> tuple[list[Tensor], list[float]]:
    """Samples for every scale ([per_class*10] each, class-major) and the seconds each took.

    sweep "batch": one call with a per-sample scale and x_T shared across scales (the seconds are the
    call's, split evenly); sweep "loop": one call per scale with the same seed.
    """
    options = {"classifier": args.classifier} if method == "classifier" else {}
    pipe = toolkit.compose(model=args.model, sampler=sampler, steps=steps, guidance=method,
                           guidance_options=options, batch_size=SAMPLE_BATCH)
    labels = class_labels(args.per_class)
    n, m = len(labels), len(scales)
    if args.sweep == "loop":
        xs, seconds = [], []
        for s in scales:
            t0 = time.perf_counter()
            xs.append(pipe.sample(n, seed=args.seed, labels=labels, scale=s))
            seconds.append(time.perf_counter() - t0)
        return xs, seconds
    x_T = NoiseStreams(args.seed, range(n), pipe.sample_shape).draw()
    t0 = time.perf_counter()
    x = pipe.sample(n * m, seed=args.seed, labels=labels.repeat(m), noise=x_T.repeat(m, *([1] * (x_T.ndim - 1))),
                    scale=torch.tensor(scales).repeat_interleave(n))
    elapsed = time.perf_counter() - t0
    return list(x.split(n)), [elapsed / m] * m


def warm_up(method: str, args: argparse.Namespace) -> None:
    """An untimed two-step call, so loading and first-call costs stay out of the timings."""
    options = {"classifier": args.classifier} if method == "classifier" else {}
    pipe = toolkit.compose(model=args.model, sampler="ddim", steps=2, guidance=method, guidance_options=options)
    pipe.sample(NUM_CLASSES, seed=args.seed, labels=list(range(NUM_CLASSES)), scale=1.0)


def measure(judge: Judge, x: Tensor, labels: Tensor, seconds: float) -> dict[str, Any]:
    """Class consistency (overall, worst class), diversity, FD, IS-like score, precision/recall and speed."""
    from toolkit.metrics import inception_score, precision_recall

    precision, recall = precision_recall(judge.real_features, judge.features(x))
    pred = judge.predict(x)
    hit = (pred == labels).float()
    per_class = [float(hit[labels == c].mean()) for c in range(NUM_CLASSES)]
    worst = min(range(NUM_CLASSES), key=lambda c: per_class[c])
    div, div_per_class = diversity(x, labels)
    return {"consistency": float(hit.mean()), "consistency_min": per_class[worst], "consistency_min_class": worst,
            "consistency_per_class": per_class, "diversity": div, "diversity_per_class": div_per_class,
            "fd": judge.score(x, labels)["fd"], "is_like": inception_score(judge.probs(x)), "precision": precision,
            "recall": recall, "samples_per_s": len(x) / seconds, "seconds": seconds}


def save_rows(x: Tensor, per_class: int, path: Path) -> None:
    """One row per class, up to GRID_COLUMNS samples each."""
    k = min(per_class, GRID_COLUMNS)
    rows = x.reshape(NUM_CLASSES, per_class, *x.shape[1:])[:, :k].reshape(NUM_CLASSES * k, *x.shape[1:])
    save_samples(rows, path, nrow=k)
    print(f"wrote {path}", flush=True)


def table(result: dict[str, Any]) -> str:
    """The results as markdown: a reference line, then one row per (method, scale, sampler)."""
    ref = result["reference"]
    real = ref["real_digits"]
    lines = [
        f"judge held-out acc {ref['judge_holdout_accuracy']:.3f} | {real['n']} real digits (a reference, not a floor): "
        f"FD {real['fd']:.3f}, IS-like {real['is_like']:.2f}, precision {real['precision']:.2f}, recall "
        f"{real['recall']:.2f} | real-digit diversity {ref['real_diversity']:.3f} | sweep {result['config']['sweep']}",
        "",
        "| method | scale | sampler | steps | consistency | worst class (acc) | diversity | FD | IS-like | precision "
        "| recall | samples/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['scale']:g} | {r['sampler']} | {r['steps']} | {r['consistency']:.3f} | "
                     f"{r['consistency_min_class']} ({r['consistency_min']:.2f}) | {r['diversity']:.3f} | "
                     f"{r['fd']:.3f} | {r['is_like']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "
                     f"{r['samples_per_s']:.1f} |")
    return "\n".join(lines)


def plot_tradeoff(result: dict[str, Any], path: Path) -> None:
    """IS-like score, FD, precision and recall against the scale: one column per method, DDIM and DDPM lines,
    the real digits' figures dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("is_like", "IS-like score ↑"), ("fd", "FD ↓"), ("precision", "precision ↑"), ("recall", "recall ↑"))
    methods = sorted({r["method"] for r in result["rows"]})
    fig, axes = plt.subplots(len(metrics), len(methods), figsize=(4.2 * len(methods), 2.6 * len(metrics)),
                             squeeze=False)
    real = result["reference"]["real_digits"]
    for j, method in enumerate(methods):
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for sampler in ("ddim", "ddpm"):
                rows = [r for r in result["rows"] if r["method"] == method and r["sampler"] == sampler]
                if rows:
                    ax.plot([r["scale"] for r in rows], [r[key] for r in rows], "o-", label=sampler)
            ax.axhline(real[key], color="gray", ls="--", lw=1, label=f"{real['n']} real digits")
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title("cfg weight w" if method == "cfg" else "classifier scale s")
            if i == len(metrics) - 1:
                ax.set_xlabel("scale")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def main() -> None:
    """Parse options, sweep every (method, sampler), print the table, write the JSON and the two grids."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, help="samples per class and scale (default 20; quick 2)")
    parser.add_argument("--ddpm-steps", type=int, help="DDPM steps (default 1000; quick 20)")
    parser.add_argument("--ddim-steps", type=int, help="DDIM steps (default 50; quick 5)")
    parser.add_argument("--cfg-scales", default="0,1,3,5", help="comma-separated cfg weights w")
    parser.add_argument("--clf-scales", default="0,1,3,10", help="comma-separated classifier-guidance scales s")
    parser.add_argument("--classifier", help="noise-aware classifier checkpoint (default: the shipped "
                                             "digits-classifier)")
    parser.add_argument("--model", help="class-conditional model checkpoint (default: the shipped digits model)")
    parser.add_argument("--sweep", choices=("batch", "loop"), default="batch",
                        help="batch: all scales of a method in one call (default); loop: one call per scale")
    parser.add_argument("--grid-cfg-scale", type=float, default=3.0, help="cfg weight shown in --grid")
    parser.add_argument("--grid-clf-scale", type=float, default=10.0,
                        help="classifier scale shown in the *_classifier grid")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and the judge's)")
    parser.add_argument("--out", help="JSON results (default bench/results/guidance.json; quick guidance_quick.json)")
    parser.add_argument("--grid", help="PNG, one row per class, cfg with DDIM at --grid-cfg-scale (default "
                                       "bench/results/guidance_rows.png; quick guidance_quick_rows.png); "
                                       "the classifier grid gets a _classifier suffix")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.per_class < 2:
        raise SystemExit("--per-class must be at least 2 (diversity needs pairs)")
    methods = {"cfg": parse_scales(args.cfg_scales), "classifier": parse_scales(args.clf_scales)}
    out = Path(args.out)
    grids = {"cfg": (Path(args.grid), args.grid_cfg_scale)}
    grids["classifier"] = (grids["cfg"][0].with_name(f"{grids['cfg'][0].stem}_classifier{grids['cfg'][0].suffix}"),
                           args.grid_clf_scale)
    for path in (out, *(g for g, _ in grids.values())):
        path.parent.mkdir(parents=True, exist_ok=True)
    for path, _ in grids.values():
        check_output(path, (".png",))

    judge = Judge(args.seed)
    labels = class_labels(args.per_class)
    real = toolkit.create("dataset", "digits")
    real_div, real_div_per_class = diversity(real.x, real.y)
    result: dict[str, Any] = {
        "config": vars(args),
        "machine": {"torch": torch.__version__, "toolkit": toolkit.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "reference": {"judge_holdout_accuracy": judge.holdout_accuracy, "samples_per_scale": len(labels),
                      "real_digits": judge.real_reference(len(labels), args.seed), "real_diversity": real_div,
                      "real_diversity_per_class": real_div_per_class},
        "rows": [],
    }
    for method in methods:  # loads every model up front: a missing classifier fails before any timed run
        try:
            warm_up(method, args)
        except ToolkitError as e:
            raise SystemExit(f"{method} guidance: {e}") from e
    for method, scales in methods.items():
        for sampler, steps in (("ddim", args.ddim_steps), ("ddpm", args.ddpm_steps)):
            xs, seconds = sweep(method, scales, sampler, steps, args)
            for s, x, sec in zip(scales, xs, seconds):
                result["rows"].append({"method": method, "scale": s, "sampler": sampler, "steps": steps,
                                       **measure(judge, x, labels, sec)})
            grid_path, grid_scale = grids[method]
            if sampler == "ddim":
                match = [x for s, x in zip(scales, xs) if math.isclose(s, grid_scale)]
                if match:
                    save_rows(match[0], args.per_class, grid_path)
                else:
                    print(f"no {method} scale {grid_scale:g} in the sweep: {grid_path} not written", flush=True)
            print(f"sampled {method} {sampler} {steps} steps, scales {','.join(f'{s:g}' for s in scales)}: "
                  f"{sum(seconds):.1f}s", flush=True)
    print(table(result))
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot_tradeoff(result, out.with_name(out.stem + "_tradeoff.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
