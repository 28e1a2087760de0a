import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_line_error, run

TINY = ["--model-option", "base_channels=8", "--model-option", "attention_heads=2"]


def test_plugins_json():
    r = run("plugins", "--json")
    assert r.exit_code == 0
    data = json.loads(r.output)
    names = {e["name"]: e for e in data["plugins"]["sampler"] if e["dist"] == "diffusion-toolkit"}
    assert set(names) == {"ddim", "ddpm", "dpmpp-2m", "unipc", "heun", "euler-a"} and names["ddim"]["version"] == "0.1.0"
    assert {"cfg", "classifier"} <= {e["name"] for e in data["plugins"]["guidance"]}
    assert {"digits", "digits-classifier"} <= {e["name"] for e in data["plugins"]["pretrained"]}
    assert "cosine" in run("plugins").output


def test_train_compose_resume(tmp_path):
    out = tmp_path / "ck"
    r = run("train", "--dataset", "digits", *TINY, "--steps", 3, "--batch-size", 8, "--out", out,
            "--checkpoint-every", 2)
    assert r.exit_code == 0, r.output + r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["step"] == 3 and cfg["data"]["num_classes"] == 10 and cfg["data"]["levels"] == 17
    assert cfg["training"]["command"].startswith("toolkit train --dataset digits")
    # resume continues to the new total
    r = run("train", "--dataset", "digits", *TINY, "--steps", 5, "--batch-size", 8, "--out", out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["training"]["step"] == 5
    # an existing checkpoint is not overwritten by accident
    one_line_error(run("train", *TINY, "--steps", 2, "--out", out), "already exists")
    # resuming with another model is refused
    one_line_error(run("train", "--model-option", "base_channels=16", "--steps", 9, "--out", out, "--resume"),
                   "cannot resume")

    png = tmp_path / "s.png"
    r = run("compose", "--model", out, "--sampler", "ddim", "--steps", 5, "-n", 6, "--out", png, "--class", "1,2")
    assert r.exit_code == 0, r.stderr
    img = Image.open(png)
    assert img.size[0] >= 8 * 3 * 8  # scaled up so 8×8 digits are visible
    umask = os.umask(0)
    os.umask(umask)
    assert png.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    npy = tmp_path / "s.npy"
    r = run("compose", "--model", out, "--sampler", "ddpm", "--schedule", "linear", "--steps", 7, "-n", 4,
            "--out", npy)
    assert r.exit_code == 0, r.stderr
    arr = np.load(npy)
    assert arr.shape == (4, 1, 8, 8) and arr.dtype == np.float32 and arr.min() >= -1 and arr.max() <= 1
    r = run("compose", "--model", out, "--steps", 2, "--class", "all", "-n", 20, "--out", tmp_path / "all.npy")
    assert r.exit_code == 0 and np.load(tmp_path / "all.npy").shape[0] == 20


def test_same_seed_same_file(tmp_path, tiny_ckpt):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    for f in (a, b):
        assert run("compose", "--model", tiny_ckpt, "--sampler", "ddim", "--eta", "1", "--steps", 4, "-n", 3,
                   "--seed", 5, "--out", f).exit_code == 0
    assert np.array_equal(np.load(a), np.load(b))


@pytest.mark.parametrize("args,message", [
    (["--sampler", "nope"], "unknown sampler 'nope'; available: "),
    (["--schedule", "nope"], "unknown schedule 'nope'; available: "),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--spacing", "bogus"], "spacing"),
    (["--sampler-option", "variance=bogus"], "variance"),
    (["-T", "0"], "num_timesteps must be a positive integer"),
    (["--steps", "0"], "steps must be an integer in 1..1000"),
    (["--steps", "1001"], "steps must be an integer in 1..1000"),
    (["--eta", "1.5"], "eta must lie in [0, 1]"),
    (["--class", "10"], "--class 10 is out of range: this model has classes 0..9"),
    (["--class", "x"], "--class must be a label"),
    (["--sampler", "ddpm", "--eta", "0.5"], "takes no option 'eta'"),
    (["--steps", "abc"], "'abc' is not a valid integer"),
])
def test_compose_bad_input(tmp_path, tiny_ckpt, args, message):
    out = tmp_path / "x.png"
    one_line_error(run("compose", "--model", tiny_ckpt, "-n", 2, "--out", out, *args), message)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_ckpt):
    out = tmp_path / "x.png"
    one_line_error(run("compose", "--model", tmp_path / "missing", "--out", out), "does not exist")
    bad = tmp_path / "bad"
    bad.mkdir()
    one_line_error(run("compose", "--model", bad, "--out", out), "has no config.json")
    (bad / "config.json").write_text("{not json")
    one_line_error(run("compose", "--model", bad, "--out", out), "config.json is corrupt")
    (bad / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    one_line_error(run("compose", "--model", bad, "--out", out), "model.safetensors is corrupt")
    assert not out.exists()


def test_output_folder_must_exist(tmp_path, tiny_ckpt):
    one_line_error(run("compose", "--model", tiny_ckpt, "--out", tmp_path / "no" / "x.png"), "does not exist")
    one_line_error(run("compose", "--model", tiny_ckpt, "--out", tmp_path / "x.jpg"), "must end in .png or .npy")
    one_line_error(run("train", "--steps", 1, "--out", tmp_path / "no" / "ck"), "does not exist")


def test_train_bad_input(tmp_path):
    one_line_error(run("train", "--model-option", "channel_mult=abc", "--steps", 1, "--out", tmp_path / "m"), "unet")
    one_line_error(run("train", "--device", "gpu", "--steps", 1, "--out", tmp_path / "m"), "unknown device")
    one_line_error(run("train", "--steps", 1, "--out", tmp_path / "m", "--resume"), "cannot resume")
    assert not (tmp_path / "m").exists()


def test_resume_gives_the_same_weights_as_one_run(tmp_path):
    from safetensors.torch import load_file

    common = [*TINY, "--batch-size", 8, "--checkpoint-every", 2]
    assert run("train", *common, "--steps", 4, "--out", tmp_path / "one").exit_code == 0
    assert run("train", *common, "--steps", 2, "--out", tmp_path / "two").exit_code == 0
    assert run("train", *common, "--steps", 4, "--out", tmp_path / "two", "--resume").exit_code == 0
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert len(cfg["training"]["commands"]) == 2 and "--resume" not in cfg["training"]["command"]
    one_line_error(run("train", *common, "--lr", "0.5", "--steps", 6, "--out", tmp_path / "two", "--resume"),
                   "cannot resume")


def test_model_shape_must_fit_data(tmp_path):
    one_line_error(run("train", "--dataset", "moons", "--model", "unet", "--steps", 1, "--out", tmp_path / "m"),
                   "unet needs image data")
    one_line_error(run("train", "--dataset", "digits", "--model", "mlp", "--steps", 1, "--out", tmp_path / "m"),
                   "mlp needs vector data")
    one_line_error(run("train", "--dataset", "digits", "--model-option", "channel_mult=[1,2,2,2,2]", "--steps", 1,
                       "--out", tmp_path / "m"), "divisible by 16")
    assert not (tmp_path / "m").exists()


def test_mlp_on_toy_data(tmp_path):
    out = tmp_path / "toy"
    assert run("train", "--dataset", "gaussians8", "--model", "mlp", "--steps", 3, "--out", out).exit_code == 0
    r = run("compose", "--model", out, "--steps", 3, "-n", 5, "--class", 2, "--out", tmp_path / "p.npy")
    assert r.exit_code == 0 and np.load(tmp_path / "p.npy").shape == (5, 2)
    r = run("compose", "--model", out, "--steps", 3, "-n", 200, "--seed", 1, "--out", tmp_path / "p.png")
    assert r.exit_code == 0, r.output  # 2-D samples: a scatter plot, each point where its coordinates say
    r = run("compose", "--model", out, "--steps", 3, "-n", 200, "--seed", 1, "--out", tmp_path / "q.npy")
    points = np.load(tmp_path / "q.npy")
    img = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).astype(int)
    assert img.shape == (512, 512, 3)
    size, span = 512, max(1.1, 1.05 * float(np.abs(points).max()))  # the plot fits the points (gaussians8 passes ±1)
    for x, y in points[:20]:
        px, py = round((x + span) / (2 * span) * (size - 1)), round(size - 1 - (y + span) / (2 * span) * (size - 1))
        assert tuple(img[py, px]) == (31, 90, 170), (x, y)
    assert (img == (31, 90, 170)).all(-1).sum() < 200 * 25  # dots, not a filled picture


def test_console_script_exit_status(tmp_path):
    """The installed `toolkit` command: one line on stderr, exit status 2, no traceback."""
    script = Path(sys.executable).with_name("toolkit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "toolkit"]
    r = subprocess.run([*command, "compose", "--sampler", "nope", "--out", str(tmp_path / "a.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown sampler 'nope'; available: ")
    assert not (tmp_path / "a.png").exists()


def test_hybrid_loss_with_learned_variance(tmp_path):
    out = tmp_path / "hy"
    r = run("train", *TINY, "--loss", "hybrid", "--learn-variance", "--steps", 3, "--batch-size", 8, "--out", out)
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["options"]["learned_variance"] is True and cfg["training"]["config"]["loss"] == "hybrid"
    r = run("compose", "--model", out, "--sampler", "ddpm", "--steps", 5, "-n", 2, "--out", tmp_path / "h.npy")
    assert r.exit_code == 0, r.stderr
    one_line_error(run("train", *TINY, "--loss", "hybrid", "--steps", 1, "--out", tmp_path / "x"), "--learn-variance")


def test_overwrite_replaces_only_a_checkpoint(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    (data / "mine.txt").write_text("a user's file")
    one_line_error(run("train", "--steps", 1, "--batch-size", 8, "--out", data, "--overwrite"),
                   "is not a toolkit checkpoint")
    assert (data / "mine.txt").read_text() == "a user's file"


def test_export_dataset_png_folder_reads_back(tmp_path):
    out = tmp_path / "digits-png"
    r = run("export-dataset", "digits", "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [str(k) for k in range(10)]
    import toolkit

    back = toolkit.create("dataset", "folder", path=str(out), size=8, channels=1)
    digits = toolkit.create("dataset", "digits")
    assert len(back) == len(digits) and back.num_classes == 10
    order = torch.argsort(torch.tensor([int(p.stem) for p in sorted(out.rglob("*.png"))]))
    # 17 gray levels written as 8-bit values: every pixel within half an 8-bit step of the original
    assert (back.x[order] - digits.x).abs().max() <= 1 / 255 + 1e-6
    one_line_error(run("export-dataset", "digits", "--out", out), "already exists")
    one_line_error(run("export-dataset", "moons", "--out", tmp_path / "m"), "use --format npz")
    r = run("export-dataset", "moons", "--format", "npz", "--out", tmp_path / "m.npz")
    assert r.exit_code == 0 and np.load(tmp_path / "m.npz")["x"].shape == (8000, 2)


def test_small_budget_trains_one_step_per_thousand(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_BUDGET", "small")
    r = run("train", "--steps", 3000, "--batch-size", 8, "--model-option", "base_channels=8",
            "--model-option", "attention_heads=2", "--out", tmp_path / "b", "-q")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["training"]["config"]["steps"] == 3


def test_a_diverged_run_never_saves_over_a_good_checkpoint(tmp_path, monkeypatch):
    """The optimizer makes a weight NaN (an injected fault: a finite --lr cannot be relied on to): the run
    stops with one line and the good checkpoint it would have replaced is left byte for byte."""
    out = tmp_path / "ck"
    tiny = ["--model-option", "base_channels=8", "--model-option", "attention_heads=2", "--batch-size", 8]
    assert run("train", *tiny, "--steps", 2, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    step = torch.optim.AdamW.step

    def diverging(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging)
    one_line_error(run("train", *tiny, "--steps", 3, "--checkpoint-every", 1, "--out", out, "--overwrite"),
                   "training diverged")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _refuses_new_files(folder: str) -> bool:
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


@pytest.mark.skipif(not _refuses_new_files("/sys"), reason="needs a folder this process cannot write to")
def test_a_write_failure_is_one_line():
    """An OSError while writing (here /sys, which refuses new files even to root) is one line and exit 2."""
    r = run("compose", "-n", 2, "--steps", 2, "--out", "/sys/x.npy")
    one_line_error(r, "cannot write /sys/")


def test_an_internal_error_is_one_line_unless_debugging(monkeypatch):
    """A bug (here a predictor that raises) is one line and exit 1; TOOLKIT_DEBUG=1 lets the traceback through."""
    import toolkit.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(toolkit.pipeline, "compose", broken)
    monkeypatch.setattr(toolkit, "compose", broken, raising=False)
    r = run("compose", "-n", 2, "--out", "x.npy")
    assert r.exit_code == 1
    assert r.stderr.strip() == "error: internal error: RuntimeError: something inside broke (TOOLKIT_DEBUG=1 shows the traceback)"
    monkeypatch.setenv("TOOLKIT_DEBUG", "1")
    r = run("compose", "-n", 2, "--out", "x.npy")
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "lr must be a positive finite number"),
    (["--lr", "inf"], "lr must be a positive finite number"),
    (["--weight-decay", "-1"], "weight-decay must be a finite number ≥ 0"),
    (["--grad-clip", "nan"], "grad-clip must be a finite number ≥ 0"),
    (["--seed", str(10**23)], "'--seed': 100000000000000000000000 is not in the range 0<=x<=9223372036854775807"),
])
def test_training_numbers_are_validated(tmp_path, args, message):
    one_line_error(run("train", "--steps", 1, *args, "--out", tmp_path / "x"), message)
    assert not (tmp_path / "x").exists()
