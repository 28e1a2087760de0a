"""What a training run tells its user: metrics.jsonl (one row per logged step), sample previews, the held-out
loss, an optional TensorBoard log, and ``toolkit show``'s summary and loss curve.

metrics.jsonl and the previews are written into the checkpoint with every checkpoint (atomically, with the
weights), so they always describe the weights beside them and a resumed run continues them. TensorBoard
events go live to a sibling folder ``RUN.tensorboard/`` (the checkpoint folder is swapped whole).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.errors import CheckpointError, ToolkitError

METRICS = "metrics.jsonl"
PREVIEW = re.compile(r"^samples-(\d{7})\.png$")
PREVIEW_SAMPLES = 64  # a preview grid: 64 images (labels i mod K), or 512 points for 2-D data
PREVIEW_STEPS = 20  # DDIM steps of a preview
VAL_SEED = 2**31 - 1  # the held-out loss draws the same t and ε at every checkpoint: comparable numbers
LOGS = ("tensorboard",)


def preview_name(step: int) -> str:
    return f"samples-{step:07d}.png"


class RunLog:
    """The rows of metrics.jsonl and the preview PNGs of one run (carried over from the checkpoint on resume)."""

    def __init__(self, out: Path, resume_step: int | None, log: str | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}
        if log is not None and log not in LOGS:
            raise ToolkitError(f"--log must be one of {', '.join(LOGS)}, not {log!r}")
        self.writer = None
        if log == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ToolkitError("--log tensorboard needs the tensorboard package: "
                                   "pip install 'diffusion-toolkit[tensorboard]'") from None
            self.writer = SummaryWriter(str(out.parent / f"{out.name}.tensorboard"), purge_step=resume_step)
        if resume_step is None:
            return
        for name, data in read_files(out).items():
            m = PREVIEW.match(name)
            if m and int(m.group(1)) <= resume_step:
                self.files[name] = data
        self.rows = [r for r in read_metrics(out) if r["step"] <= resume_step]

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])
            self.writer.flush()

    def preview(self, step: int, image) -> None:
        from toolkit.images import png_bytes

        self.files[preview_name(step)] = png_bytes(image)
        if self.writer is not None:
            self.writer.add_image("samples", torch.from_numpy(image.copy()).permute(2, 0, 1) if image.ndim == 3
                                  else torch.from_numpy(image.copy())[None], step)
            self.writer.flush()

    def checkpoint_files(self) -> dict[str, bytes]:
        """The files written into each checkpoint: metrics.jsonl and every preview so far."""
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.rows)
        return {METRICS: text.encode(), **self.files}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_files(out: Path) -> dict[str, bytes]:
    """The preview PNGs of a checkpoint folder."""
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("samples-*.png")) if PREVIEW.match(p.name)}


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl ([] for a checkpoint written before it existed); a bad row is an error."""
    path = Path(out) / METRICS
    if not path.is_file():
        return []
    rows = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise CheckpointError(f"{str(path)!r} line {k} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            raise CheckpointError(f"{str(path)!r} line {k} has no integer step")
        rows.append(row)
    return rows


@torch.no_grad()
def heldout_loss(model: nn.Module, schedule, x0: Tensor, y: Tensor | None, batch_size: int = 500) -> float:
    """L_simple (the model's own target: ε, v or x_0) on held-out data, with t and ε drawn from a fixed seed."""
    g = torch.Generator().manual_seed(VAL_SEED)
    t = torch.randint(schedule.num_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    from toolkit.losses import loss_simple

    total = 0.0
    was = model.training
    model.eval()
    for s in range(0, len(x0), batch_size):
        xb, tb, nb = x0[s:s + batch_size], t[s:s + batch_size].to(x0.device), noise[s:s + batch_size].to(x0.device)
        yb = None if y is None else y[s:s + batch_size]
        total += float(loss_simple(model, schedule, xb, tb, nb, yb)) * xb.numel()  # the batch's sum
    model.train(was)
    return total / x0.numel()


@torch.no_grad()
def preview_image(model: nn.Module, schedule, latent: Any, num_classes: int | None):
    """A picture of what the EMA model samples now: DDIM 20 steps from seed 0 (the same noise every time)."""
    from toolkit.images import picture
    from toolkit.pipeline import compose

    was = model.training
    pipe = compose(model=model, schedule=schedule, sampler="ddim", steps=PREVIEW_STEPS, latent=latent,
                   device=next(model.parameters()).device)  # a latent model samples unclipped latents
    points = tuple(pipe.output_shape) == (2,)
    n = 512 if points else PREVIEW_SAMPLES
    labels = None if num_classes is None or points else torch.arange(n) % num_classes
    x = pipe.sample(n, seed=0, labels=labels)
    model.train(was)
    return picture(x, nrow=(n // num_classes if labels is not None and n % num_classes == 0 else None))


def summary(path: str | Path) -> dict[str, Any]:
    """What ``toolkit show`` prints: the checkpoint's record and the last metrics row."""
    from toolkit.checkpoint import read_config

    cfg = read_config(path)
    training = cfg.get("training", {})
    rows = read_metrics(path)
    return {"path": str(path), "kind": cfg.get("kind", "noise_predictor"), "model": cfg["model"].get("name"),
            "schedule": (cfg.get("schedule") or {}).get("name"), "parameters": training.get("parameters"),
            "step": training.get("step"), "steps": (training.get("config") or {}).get("steps"),
            "loss": training.get("loss"), "holdout_loss": training.get("holdout_loss"),
            "holdout_accuracy": training.get("holdout_accuracy"), "elapsed_s": training.get("elapsed_s"),
            "commands": training.get("commands") or [], "rows": len(rows), "last": rows[-1] if rows else None,
            "previews": sorted(read_files(Path(path)))}


def loss_curve(path: str | Path):
    """The training loss (running mean) and the held-out loss against the step, as an image."""
    from toolkit.images import line_plot

    rows = read_metrics(path)
    if not rows:
        raise ToolkitError(f"{str(path)!r} has no {METRICS} (written by toolkit train since this version)")
    series = {"loss (running mean)": ([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r])}
    held = [r for r in rows if r.get("holdout_loss") is not None]
    if held:
        series["held-out loss"] = ([r["step"] for r in held], [r["holdout_loss"] for r in held])
    return line_plot(series, title=f"{Path(path).name}: loss against step")
