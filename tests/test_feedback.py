"""Training feedback: metrics.jsonl, the held-out loss, previews, `toolkit show` and its loss curve."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import toolkit
from conftest import TINY_UNET
from helpers import one_line_error, run
from toolkit.training import TrainConfig, train

TINY = [arg for k, v in TINY_UNET.items() for arg in ("--model-option", f"{k}={v}")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("feedback") / "run"
    r = run("train", *TINY, "--steps", 40, "--batch-size", 16, "--checkpoint-every", 20, "--sample-every", 20,
            "--val-fraction", 0.1, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_metrics_rows_say_what_the_step_did(tiny_run):
    got = rows(tiny_run)
    assert [r["step"] for r in got] == [10, 20, 30, 40]
    lr, warmup = 1e-3, 100
    for r in got:
        assert r["lr"] == pytest.approx(lr * min(1.0, r["step"] / warmup))  # the warm-up of step index step-1
        assert r["grad_norm"] > 0 and r["steps_per_s"] > 0 and r["loss"] > 0 and r["loss_step"] > 0
    assert [("holdout_loss" in r) for r in got] == [False, True, False, True]  # at checkpoints
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["training"]["holdout_loss"] == got[-1]["holdout_loss"]
    assert config["training"]["loss"] == pytest.approx(got[-1]["loss"])


def test_the_holdout_loss_is_l_simple_on_the_data_kept_out(tiny_run):
    """Recomputed here: the seeded 10% split, t and ε from the fixed seed, ‖ε − ε_θ(x_t, t, y)‖² averaged."""
    data = toolkit.create("dataset", "digits")
    N = len(data)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    held = perm[: max(1, int(round(0.1 * N)))]
    x0, y = data.x[held], data.y[held]
    g = torch.Generator().manual_seed(2**31 - 1)
    t = torch.randint(1000, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ckpt = toolkit.load_checkpoint(tiny_run)
    a = ckpt.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        pred = ckpt.model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y)[:, :1]
    want = float((pred - eps).pow(2).mean())
    assert rows(tiny_run)[-1]["holdout_loss"] == pytest.approx(want, rel=1e-4)


def test_previews_are_pictures_of_the_model_in_the_checkpoint(tiny_run):
    names = sorted(p.name for p in tiny_run.glob("samples-*.png"))
    assert names == ["samples-0000020.png", "samples-0000040.png"]
    img = np.asarray(Image.open(tiny_run / names[-1]))
    assert img.ndim == 2 and img.shape[0] > 64 and img.shape == img.shape[::-1]  # a square grid of 64 digits
    # the same preview again from the saved (EMA) weights: DDIM 20 steps, seed 0, labels i mod 10
    pipe = toolkit.compose(model=tiny_run, sampler="ddim", steps=20)
    x = pipe.sample(64, seed=0, labels=torch.arange(64) % 10)
    from toolkit.images import grid

    assert np.array_equal(grid(x)[..., 0], img)


def test_resume_continues_metrics_and_previews(tmp_path, tiny_run):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    r = run("train", *TINY, "--steps", 60, "--batch-size", 16, "--checkpoint-every", 20, "--sample-every", 20,
            "--val-fraction", 0.1, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert [r["step"] for r in rows(out)] == [10, 20, 30, 40, 50, 60]
    assert rows(out)[:4] == rows(tiny_run)
    assert len(list(out.glob("samples-*.png"))) == 3


def test_show_prints_the_run_and_draws_its_loss_curve(tmp_path, tiny_run):
    r = run("show", tiny_run, "--plot", tmp_path / "curve.png")
    assert r.exit_code == 0, r.output
    assert "step 40 of 40" in r.output and "held out: loss" in r.output and "samples-0000040.png" in r.output
    img = np.asarray(Image.open(tmp_path / "curve.png").convert("RGB"))
    assert img.shape == (400, 720, 3)
    blue, orange = (img == (31, 90, 170)).all(-1), (img == (214, 96, 30)).all(-1)
    assert blue.sum() > 200 and orange.sum() > 50  # the loss and the held-out loss are drawn
    info = json.loads(run("show", tiny_run, "--json").output)
    assert info["rows"] == 4 and info["last"]["step"] == 40
    assert run("show", "digits").exit_code == 0  # a checkpoint from before metrics.jsonl: a summary
    one_line_error(run("show", "digits", "--plot", tmp_path / "d.png"), "has no metrics.jsonl")
    one_line_error(run("show", tmp_path / "missing"), "does not exist")


def test_two_dimensional_data_gets_a_scatter_preview(tmp_path):
    out = tmp_path / "toy"
    r = run("train", "--dataset", "moons", "--model", "mlp", "--steps", 10, "--sample-every", 10, "--out", out)
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out / "samples-0000010.png").convert("RGB"))
    assert img.shape == (512, 512, 3) and (img == (31, 90, 170)).all(-1).any()


def test_feedback_options_refused_where_they_mean_nothing(tmp_path):
    with pytest.raises(toolkit.ToolkitError, match="samples nothing"):
        train(TrainConfig(task="classifier", model="unet-encoder", model_options=TINY_UNET, steps=2, batch_size=8,
                          sample_every=1), tmp_path / "c")
    one_line_error(run("train", "--steps", 2, "--sample-every", -1, "--out", tmp_path / "a"), "'--sample-every'")
    one_line_error(run("train", "--steps", 2, "--val-fraction", 1, "--out", tmp_path / "a"), "'--val-fraction'")


def test_tensorboard_events_beside_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    r = run("train", *TINY, "--steps", 20, "--batch-size", 8, "--log", "tensorboard", "--out", out)
    assert r.exit_code == 0, r.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb.tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [10, 20]
    assert losses[-1].value == pytest.approx(rows(out)[-1]["loss"], rel=1e-6)
