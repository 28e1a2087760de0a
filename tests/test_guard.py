"""Guards on x̂_0 where data has no fixed range: dynamic thresholding (Saharia et al. 2022) and the clip range,
against the formulas written out here; every sampler takes them, and the exported graph computes the same."""

import numpy as np
import pytest
import torch

import toolkit
from toolkit.sampling import abs_quantile, guard_x0


def test_abs_quantile_is_torch_quantile():
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.5, 0.9, 0.995, 0.999):
        want = torch.quantile(x.abs().flatten(1), p, dim=1)
        assert torch.allclose(abs_quantile(x, p), want, atol=1e-6)


def test_dynamic_thresholding_is_imagens_rule():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 1, 8, 8, generator=g) * torch.tensor([0.3, 0.8, 1.5, 3.0, 6.0, 10.0]).reshape(-1, 1, 1, 1)
    p = 0.95
    out = guard_x0(x0, clip=False, threshold=p)
    for i in range(6):  # s = max(1, quantile_p |x̂_0|); x̂_0 ← clip(x̂_0, −s, s) / s
        s = max(1.0, float(np.quantile(x0[i].abs().numpy(), p)))
        want = np.clip(x0[i].numpy(), -s, s) / s
        assert np.allclose(out[i].numpy(), want, atol=1e-6)
    assert torch.equal(guard_x0(x0[:1], clip=False), x0[:1])  # off
    assert float(guard_x0(x0, clip=True, clip_range=2.0).abs().max()) == 2.0  # a static clip to ±r
    r = guard_x0(x0, clip=False, threshold=p, clip_range=2.5)  # thresholded into ±r
    assert float(r.abs().max()) <= 2.5 + 1e-6 and torch.allclose(r[0], x0[0])  # within range: untouched


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp-2m", "unipc", "heun", "euler-a"])
def test_every_sampler_takes_the_guard(name):
    pipe = toolkit.compose(sampler=name, steps=6, threshold=0.995)
    assert pipe.sampler.threshold == 0.995
    out = pipe.sample(4, labels=[1, 2, 3, 4])
    assert torch.isfinite(out).all()
    with pytest.raises(toolkit.ToolkitError, match="threshold must be a percentile"):
        toolkit.create("sampler", name, threshold=1.5)
    with pytest.raises(toolkit.ToolkitError, match="clip_range must be a positive number"):
        toolkit.create("sampler", name, clip_range=0)


def test_latent_pipeline_with_a_thresholded_solver_exports_the_same(tmp_path):
    pytest.importorskip("onnxruntime")
    from toolkit.exporters.onnx import export_sampler
    from toolkit.exporters.runtime import SamplerSession

    pipe = toolkit.compose(model="latent-digits", sampler="dpmpp-2m", steps=8, threshold=0.9, clip_range=2.0)
    assert pipe.sampler.clip_x0 is False and pipe.sampler.threshold == 0.9  # a latent pipeline: no static clip
    got = SamplerSession(export_sampler(pipe, tmp_path / "t.onnx")).sample(6, seed=1, labels=[0, 1, 2, 3, 4, 5])
    want = pipe.sample(6, seed=1, labels=[0, 1, 2, 3, 4, 5])
    assert np.abs(got - want.numpy()).max() <= 1e-4


def test_a_latent_pipeline_guards_to_the_real_latents_range():
    """train-autoencoder records max |scaled latent| over the data; a latent pipeline's clip and threshold use it."""
    pipe = toolkit.compose(model="latent-digits", sampler="ddim", steps=10)
    real = pipe.latent.encode(toolkit.create("dataset", "digits").x)
    assert pipe.latent.range == pytest.approx(float(real.abs().max()), rel=1e-5)
    assert pipe.sampler.clip_x0 is False and pipe.sampler.clip_range == pytest.approx(pipe.latent.range)
    clipped = toolkit.compose(model="latent-digits", sampler="ddim", steps=10, clip_x0=True)
    assert clipped.sampler.clip_x0 is True and clipped.sampler.clip_range == pytest.approx(pipe.latent.range)
    assert torch.isfinite(clipped.sample(8, labels=list(range(8)))).all()
    mine = toolkit.compose(model="latent-digits", sampler="ddim", steps=10, clip_x0=True, clip_range=1.5)
    assert mine.sampler.clip_range == 1.5


def test_train_autoencoder_records_the_range(tmp_path):
    from helpers import run

    r = run("train-autoencoder", "--steps", 2, "--batch-size", 16, "--out", tmp_path / "ae")
    assert r.exit_code == 0, r.output
    import json

    latent = json.loads((tmp_path / "ae" / "config.json").read_text())["latent"]
    assert latent["range"] > 0
