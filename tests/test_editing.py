"""Editing: DDIM inversion and its round trip, spherical interpolation, img2img (SDEdit), their CLI and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

import toolkit
from helpers import one_line_error, run
from toolkit import editing


@pytest.fixture(scope="module")
def digits():
    data = toolkit.create("dataset", "digits")
    return data.x[:20], data.y[:20]


def test_inversion_round_trip_error_falls_with_steps(digits):
    """x_T = invert(x_0); sample(noise=x_T) ≈ x_0, closer with more steps (the ODE solved more finely)."""
    x0, y = digits
    errors = {}
    for steps in (10, 50):
        pipe = toolkit.compose(sampler="ddim", steps=steps)
        x_T = pipe.invert(x0, labels=y)
        assert x_T.shape == x0.shape and torch.isfinite(x_T).all()
        errors[steps] = float((pipe.sample(len(x0), labels=y, noise=x_T) - x0).abs().mean())
    assert errors[50] < 0.03 and errors[10] > 1.5 * errors[50], errors


def test_inversion_on_gaussian_data_with_the_exact_eps():
    from toolkit.testing import _schedule, check_inversion

    check_inversion(toolkit.create("sampler", "ddim"), _schedule())
    with pytest.raises(toolkit.ToolkitError, match="cannot be inverted"):
        toolkit.create("sampler", "ddim", eta=0.5).inverse_plan(_schedule(), 5)


def test_slerp_keeps_the_norm_and_hits_the_ends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    assert torch.allclose(editing.slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(editing.slerp(a, b, 1.0), b, atol=1e-6)
    mid = editing.slerp(a, b, 0.5)
    theta = torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))
    want = (a + b) / (2 * torch.cos(theta / 2)).unsqueeze(1)  # sin(θ/2)/sin θ = 1/(2 cos(θ/2))
    assert torch.allclose(mid, want, atol=1e-5)


def test_img2img_moves_further_with_strength_and_towards_the_label(digits):
    x0, _ = digits
    pipe = toolkit.compose(sampler="ddim", steps=50, guidance="cfg", guidance_options={"scale": 3.0})
    change = [float((pipe.edit(x0, s, labels=8) - x0).abs().mean()) for s in (0.05, 0.5, 1.0)]
    assert change[0] < 0.1 < change[1] < change[2], change
    short = editing.truncated(pipe, 0.5)
    assert short.schedule.num_timesteps == 500 and short.steps == 25 and float(short.plan.t[0]) <= 499


def test_cli_invert_decode_interpolate_and_edit(tmp_path, digits):
    x0, y = digits
    np.save(tmp_path / "ten.npy", x0[:10].numpy())
    labels = ",".join(str(int(v)) for v in y[:10])
    r = run("invert", "--input", tmp_path / "ten.npy", "--class", labels, "--steps", 50, "--out", tmp_path / "xT.npy")
    assert r.exit_code == 0, r.output
    r = run("compose", "--noise", tmp_path / "xT.npy", "--class", labels, "--steps", 50, "--out", tmp_path / "r.npy")
    assert r.exit_code == 0, r.output
    assert np.abs(np.load(tmp_path / "r.npy") - x0[:10].numpy()).mean() < 0.03
    np.save(tmp_path / "a.npy", x0[0].numpy())
    Image.fromarray(((x0[1, 0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(tmp_path / "b.png")
    r = run("interpolate", tmp_path / "a.npy", tmp_path / "b.png", "--frames", 6, "--class", int(y[0]),
            "--out", tmp_path / "strip.npy")
    assert r.exit_code == 0, r.output
    strip = np.load(tmp_path / "strip.npy")
    assert strip.shape == (6, 1, 8, 8)
    assert np.abs(strip[0] - x0[0].numpy()).mean() < 0.1  # the ends are the two images
    assert np.abs(strip[-1] - x0[1].numpy()).mean() < 0.15
    r = run("interpolate", tmp_path / "a.npy", tmp_path / "b.png", "--frames", 6, "--out", tmp_path / "strip.png")
    img = Image.open(tmp_path / "strip.png")
    assert r.exit_code == 0 and img.size[0] > 5 * img.size[1]  # one row of six
    r = run("compose", "--init", tmp_path / "ten.npy", "--strength", 0.5, "--guidance", "cfg", "--class", 8,
            "--out", tmp_path / "eights.npy")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "eights.npy").shape == (10, 1, 8, 8)


@pytest.mark.parametrize("args, message", [
    (["invert", "--input", "{ten}", "--sampler", "ddpm", "--out", "x.npy"], "is stochastic"),
    (["invert", "--input", "{ten}", "--sampler", "unipc", "--out", "x.npy"], "cannot run backwards"),
    (["invert", "--input", "{wide}", "--out", "x.npy"], "must have shape [1, 8, 8]"),
    (["invert", "--input", "{loud}", "--out", "x.npy"], "must lie in [-1, 1]"),
    (["invert", "--input", "{ten}", "--out", "x.png"], "must end in .npy"),
    (["compose", "--init", "{ten}", "--strength", 0, "--out", "x.npy"], "strength must lie in (0, 1]"),
    (["compose", "--init", "{ten}", "--strength", 1.5, "--out", "x.npy"], "strength must lie in (0, 1]"),
    (["compose", "--strength", 0.5, "--out", "x.npy"], "--strength needs --init"),
    (["compose", "--noise", "{ten}", "--init", "{ten}", "--out", "x.npy"], "use one of them"),
    (["compose", "--noise", "{wide}", "--out", "x.npy"], "must have shape [N, 1, 8, 8]"),
    (["compose", "--noise", "{ten}", "-n", 3, "--out", "x.npy"], "-n 3 but the file holds 10 samples"),
    (["compose", "--init", "{ten}", "--backend", "onnxruntime", "--out", "x.npy"], "torch backend"),
    (["interpolate", "{ten}", "{ten}", "--frames", 1, "--out", "x.png"], "'--frames'"),
])
def test_bad_editing_input(tmp_path, monkeypatch, args, message):
    np.save(tmp_path / "ten.npy", np.zeros((10, 1, 8, 8), np.float32))
    np.save(tmp_path / "wide.npy", np.zeros((2, 1, 8, 9), np.float32))
    np.save(tmp_path / "loud.npy", np.full((2, 1, 8, 8), 3.0, np.float32))
    monkeypatch.chdir(tmp_path)
    files = {k: str(tmp_path / f"{k}.npy") for k in ("ten", "wide", "loud")}
    one_line_error(run(*[a.format(**files) if isinstance(a, str) else a for a in args]), message)
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.png").exists()
