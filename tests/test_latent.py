"""Latent diffusion: the autoencoder, its scale factor and fingerprint, latent training and sampling through
the wrapper (with every guidance), ONNX export with the decoder inside, and the shipped latent pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import toolkit
from helpers import one_line_error, run
from toolkit.latent import encode_dataset, load_latent
from toolkit.noise import NoiseStreams
from toolkit.sampling import run_plan, stream_noise_fn

TINY = ["--model-option", "base_channels=8", "--model-option", "attention_heads=2", "-q"]
PRETRAINED = Path(toolkit.__file__).resolve().parent / "plugins" / "pretrained"


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "ae"
    r = run("train-autoencoder", "--steps", 30, "--batch-size", 32, "--model-option", "base_channels=8",
            "--ema-decay", 0, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def tiny_latent_model(tiny_ae, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "lat"
    r = run("train", "--latent", tiny_ae, *TINY, "--steps", 4, "--batch-size", 16, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_autoencoder_records_scale_and_fingerprint(tiny_ae):
    cfg = json.loads((tiny_ae / "config.json").read_text())
    assert cfg["kind"] == "autoencoder" and cfg["latent"]["latent_shape"] == [2, 4, 4]
    latent = load_latent(tiny_ae)
    data = toolkit.create("dataset", "digits")
    z = encode_dataset(latent, data, torch.device("cpu"))
    assert z.x.shape == (1797, 2, 4, 4) and torch.equal(z.y, data.y)
    assert float(z.x.double().std()) == pytest.approx(1.0, abs=1e-4)  # the scale factor gives unit variance
    assert cfg["latent"]["reconstruction_mse"] == pytest.approx(
        float((latent.autoencoder.decode(latent.autoencoder.encode(data.x)) - data.x).pow(2).mean()), rel=1e-3)


def test_shipped_autoencoder_round_trip():
    """The shipped autoencoder: 64 pixel values through 32 latent values and back; bounds measured when shipped."""
    latent = load_latent("latent-digits-ae")
    x = toolkit.create("dataset", "digits").x
    with torch.no_grad():
        err = latent.decode(latent.encode(x)) - x
    assert float(err.pow(2).mean()) < 0.003  # measured 0.0014 (RMSE 0.04; one gray level is 0.125)
    assert float(err.abs().max()) < 0.6


def test_latent_model_samples_through_the_wrapper(tiny_ae, tiny_latent_model, tmp_path):
    cfg = json.loads((tiny_latent_model / "config.json").read_text())
    assert cfg["latent"]["fingerprint"] == load_latent(tiny_ae).fingerprint
    assert cfg["model"]["options"]["sample_shape"] == [2, 4, 4] and cfg["data"]["shape"] == [1, 8, 8]
    out = tmp_path / "x.npy"
    r = run("compose", "--model", tiny_latent_model, "--steps", 5, "-n", 6, "--class", "1,2", "--out", out)
    assert r.exit_code == 0, r.output
    x = np.load(out)
    assert x.shape == (6, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    # the wrapper is decode(z / scale) of the latent run: sample the latents alone and decode them here
    pipe = toolkit.compose(model=tiny_latent_model, steps=5)
    assert pipe.sampler.clip_x0 is False  # unit-variance latents are not confined to [-1, 1]
    assert toolkit.compose(model=tiny_latent_model, clip_x0=True).sampler.clip_x0 is True
    plain = toolkit.compose(model=pipe.predictor, schedule=pipe.schedule, steps=5, clip_x0=False)
    streams = NoiseStreams(0, range(6), (2, 4, 4))  # the latent run without the final clamp to [-1, 1]
    z = run_plan(plain.sampler, plain.model_fn(torch.tensor([1, 2] * 3)), plain.plan, streams.draw(),
                 noise_fn=stream_noise_fn(streams.draw, plain.plan.draws_per_step))
    latent = load_latent(tiny_ae)
    with torch.no_grad():
        expected = latent.autoencoder.decode(z / latent.scale_factor).clamp(-1, 1)
    assert np.abs(x - expected.numpy()).max() < 1e-5
    r = run("compose", "--model", tiny_latent_model, "--latent", tiny_ae, "--steps", 3, "-n", 2, "--out", out)
    assert r.exit_code == 0, r.output


def test_guidance_through_the_wrapper(tiny_ae, tiny_latent_model, tmp_path):
    out = tmp_path / "g.npy"
    r = run("compose", "--model", tiny_latent_model, "--guidance", "cfg", "--scale", 2, "--class", 3, "--steps", 4,
            "-n", 3, "--out", out)
    assert r.exit_code == 0, r.output
    assert np.load(out).shape == (3, 1, 8, 8)
    clf = tmp_path / "clf"
    r = run("train-classifier", "--latent", tiny_ae, *TINY, "--steps", 3, "--batch-size", 16, "--out", clf)
    assert r.exit_code == 0, r.output
    assert json.loads((clf / "config.json").read_text())["model"]["options"]["sample_shape"] == [2, 4, 4]
    for sampler in ("ddpm", "ddim"):  # mean shift (Algorithm 1) and ε-space (Algorithm 2)
        r = run("compose", "--model", tiny_latent_model, "--guidance", "classifier", "--classifier", clf,
                "--scale", 5, "--class", 4, "--sampler", sampler, "--steps", 4, "-n", 3, "--out", out)
        assert r.exit_code == 0, r.output
        assert np.isfinite(np.load(out)).all()
    one_line_error(run("compose", "--model", tiny_latent_model, "--guidance", "classifier", "--scale", 5,
                       "--class", 4, "--out", tmp_path / "no.npy"), "guidance was trained on the data")
    one_line_error(run("compose", "--model", "latent-digits", "--guidance", "classifier", "--classifier", clf,
                       "--scale", 5, "--class", 4, "--out", tmp_path / "no.npy"),
                   f"trained on the latents of autoencoder {load_latent(tiny_ae).fingerprint}")


def test_latent_onnx_export_decodes_in_the_graph(tiny_latent_model, tmp_path):
    from toolkit.exporters.onnx import export_sampler
    from toolkit.exporters.runtime import SamplerSession
    from toolkit.noise import NoiseStreams

    pipe = toolkit.compose(model=tiny_latent_model, sampler="ddpm", steps=6)
    expected = pipe.sample(3, seed=0, labels=[1, 2, 3]).numpy()
    session = SamplerSession(export_sampler(pipe, tmp_path / "lat.onnx"), provider="cpu")
    assert session.sample_shape == (2, 4, 4) and session.output_shape == (1, 8, 8)
    assert np.abs(session.sample(3, seed=0, labels=[1, 2, 3]) - expected).max() < 1e-4  # latent noise in-graph
    session = SamplerSession(export_sampler(pipe, tmp_path / "lat-in.onnx", noise="inputs"), provider="cpu")
    streams = NoiseStreams(0, range(3), (2, 4, 4))
    x_T = streams.draw()
    noise = torch.stack([streams.draw() for _ in range(5)] + [torch.zeros_like(x_T)])
    got = session.run(x_T.numpy(), noise.numpy(), [1, 2, 3])
    assert np.abs(got - expected).max() < 1e-4
    # a multistep solver (state carried through the Loop) with cfg, in latent space
    pipe = toolkit.compose(model=tiny_latent_model, sampler="dpmpp-2m", steps=6, guidance="cfg",
                           guidance_options={"scale": 2.0})
    assert pipe.sampler.clip_x0 is False
    session = SamplerSession(export_sampler(pipe, tmp_path / "lat2m.onnx"), provider="cpu")
    got = session.sample(3, seed=0, labels=[1, 2, 3])
    assert np.abs(got - pipe.sample(3, seed=0, labels=[1, 2, 3]).numpy()).max() < 1e-4


def test_evaluate_latent_model(tiny_latent_model):
    one_line_error(run("evaluate", "--model", tiny_latent_model, "--metric", "nll", "--limit", 1),
                   "nll is not available for a latent model")
    r = run("evaluate", "--model", tiny_latent_model, "--metric", "fid", "--steps", 2, "-n", 20, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["rows"][0]["fd"] > 0


def test_latent_bad_input(tiny_ae, tiny_latent_model, tmp_path):
    other = tmp_path / "other-ae"
    assert run("train-autoencoder", "--steps", 2, "--batch-size", 8, "--model-option", "base_channels=8",
               "--seed", 1, "--out", other, "-q").exit_code == 0
    one_line_error(run("compose", "--model", tiny_latent_model, "--latent", other, "--out", tmp_path / "a.png"),
                   "was trained with autoencoder")
    one_line_error(run("compose", "--latent", tiny_ae, "--out", tmp_path / "b.png"),
                   "trained on data, not on latents")
    one_line_error(run("train", "--latent", tiny_ae, "--dataset", "moons", "--model", "mlp", "--steps", 2,
                       "--out", tmp_path / "c"), "takes samples of shape (1, 8, 8)")
    one_line_error(run("train-autoencoder", "--dataset", "moons", "--steps", 2, "--out", tmp_path / "d"),
                   "autoencoder needs image data")
    one_line_error(run("train-autoencoder", "--downsample", 3, "--steps", 2, "--out", tmp_path / "e"),
                   "power of two")
    one_line_error(run("train", "--latent", "digits", "--steps", 2, "--out", tmp_path / "f"), "not an autoencoder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-ae"]


def test_shipped_latent_pipeline_and_size_budget():
    """More steps never hurt the shipped latent model, and trailing spacing (from t = T-1) works. The ε-model shipped
    before gave, at n = 200: FD 11.4 at 20 DDIM steps, 26.0 at 200 (accuracy 0.915), 298 with trailing 10."""
    from toolkit.evaluate import sample_quality

    assert toolkit.compose(model="latent-digits").predictor.prediction == "v"
    report = sample_quality("latent-digits", [("ddim", {})], [20, 200], n=200, backend="torch")
    few, many = report.rows
    assert few.accuracy > 0.97 and many.accuracy > 0.97, report.rows
    assert many.fd <= few.fd + 2.0, report.rows  # v-prediction: 10.1 → 10.3 (the ε-model: 11.4 → 26.0)
    trailing = sample_quality("latent-digits", [("ddim", {"spacing": "trailing"})], [10], n=200, backend="torch")
    assert trailing.rows[0].fd <= few.fd + 3.0, trailing.rows  # 10.8 (the ε-model: 298)
    total = sum(f.stat().st_size for f in PRETRAINED.rglob("*") if f.is_file())
    assert total <= 6_000_000, total  # everything shipped: at most 6 MB


def test_autoencoder_training_resumes_exactly(tmp_path):
    common = ["train-autoencoder", "--batch-size", 8, "--model-option", "base_channels=8", "--checkpoint-every", 2,
              "-q"]
    assert run(*common, "--steps", 2, "--out", tmp_path / "a").exit_code == 0
    assert run(*common, "--steps", 4, "--out", tmp_path / "a", "--resume").exit_code == 0
    assert run(*common, "--steps", 4, "--out", tmp_path / "b").exit_code == 0
    a, b = (json.loads((tmp_path / d / "config.json").read_text())["latent"] for d in ("a", "b"))
    assert a["fingerprint"] == b["fingerprint"] and a["scale_factor"] == b["scale_factor"]


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "unipc", "heun", "euler-a"])
def test_solvers_in_latent_space(tiny_latent_model, tmp_path, sampler):
    out = tmp_path / "s.npy"
    r = run("compose", "--model", tiny_latent_model, "--sampler", sampler, "--steps", 4, "--guidance", "cfg",
            "--scale", 2, "--class", "1,2", "-n", 4, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    x = np.load(out)
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all()


def test_resume_refuses_a_retrained_autoencoder(tiny_ae, tmp_path):
    """The autoencoder at the recorded path was retrained: resuming must refuse, not re-record its fingerprint."""
    import shutil

    ae = tmp_path / "ae"
    shutil.copytree(tiny_ae, ae)
    lat = tmp_path / "lat"
    assert run("train", "--latent", ae, *TINY, "--steps", 2, "--batch-size", 16, "--out", lat).exit_code == 0
    recorded = json.loads((lat / "config.json").read_text())["latent"]["fingerprint"]
    r = run("train-autoencoder", "--steps", 2, "--batch-size", 32, "--model-option", "base_channels=8",
            "--out", ae, "--overwrite", "-q", "--seed", 7)
    assert r.exit_code == 0, r.output
    one_line_error(run("train", "--latent", ae, *TINY, "--steps", 3, "--batch-size", 16, "--out", lat, "--resume"),
                   "was trained with autoencoder")
    assert json.loads((lat / "config.json").read_text())["latent"]["fingerprint"] == recorded
