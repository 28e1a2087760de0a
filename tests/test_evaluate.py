"""`toolkit evaluate`: the variational bound (checked where the true likelihood is known) and the
sample-quality sweep, from the Python API and the CLI."""

import json
import math

import pytest
import torch

import toolkit
from toolkit import diffusion
from helpers import one_line_error, run
from toolkit.evaluate import bound_terms, nll, sample_quality, sampler_grid

MU, S = 0.3, 0.2  # the 1-D data distribution N(MU, S²)


def _gaussian_bound_gap(variance: str, n: int) -> tuple[float, float]:
    """Mean and standard error of (bound − true NLL) in bits, for 1-D Gaussian data and the optimal ε-predictor.

    For x_0 ~ N(μ, s²): x_t ~ N(√ᾱ μ, ᾱ s² + 1 − ᾱ), E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ), and
    the true reverse step q(x_{t−1} | x_t) is Gaussian with variance β̃_t + c_0² Var(x_0 | x_t),
    c_0 = √ᾱ_{t−1} β_t / (1 − ᾱ_t), Var(x_0 | x_t) = s²(1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t).
    """
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    ab = torch.cat([torch.ones(1, dtype=torch.float64), sched.alphas_cumprod.double()])

    def a(t):
        return ab[t + 1].reshape(-1, 1)

    def eps_opt(x_t, t):
        at = a(t)
        return ((1 - at).sqrt() * (x_t.double() - at.sqrt() * MU) / (at * S**2 + 1 - at)).float()

    def log_var(out, x_t, t):
        at, ap = a(t), a(t - 1)
        beta = 1 - at / ap
        tilde = (1 - ap) / (1 - at) * beta
        if variance == "posterior":  # fixed β̃, with β̃_1 at t = 0
            tilde1 = (1 - ab[1]) / (1 - ab[2]) * (1 - ab[2] / ab[1])
            return torch.log(torch.where(t.reshape(-1, 1) == 0, tilde1, tilde)).float().expand_as(x_t)
        c0 = ap.sqrt() * beta / (1 - at)
        return torch.log(tilde + c0**2 * S**2 * (1 - at) / (at * S**2 + 1 - at)).float().expand_as(x_t)

    x0 = MU + S * torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    prior, terms = bound_terms(eps_opt, sched, x0, levels=None, log_variance_fn=log_var, clip_x0=False)
    true_nll = (0.5 * math.log(2 * math.pi * S**2) + (x0.double() - MU) ** 2 / (2 * S**2)).squeeze(1) / math.log(2)
    gap = prior + terms.sum(1) - true_nll
    return float(gap.mean()), float(gap.std() / math.sqrt(n))


def test_bound_on_gaussian_data_is_tight_with_the_true_reverse_process():
    gap, se = _gaussian_bound_gap("true", 8000)
    assert gap > -3 * se  # a bound: never below the true NLL (up to Monte Carlo error)
    assert abs(gap) < 0.05 and se < 0.03, (gap, se)  # and tight at T = 1000 with the true Σ


def test_bound_with_fixed_small_variance_is_looser():
    gap, se = _gaussian_bound_gap("posterior", 2000)
    assert gap > 0.3 and gap > 5 * se, (gap, se)


def test_prior_term_and_fixed_variances():
    sched = toolkit.create("schedule", "linear", num_timesteps=50)
    x0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    a = sched.alphas_cumprod[-1].item()
    kl = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x0**2)  # KL(N(√ā x, 1−ā) ‖ N(0, 1)) per element
    assert diffusion.prior_kl(sched, x0).item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-9)
    t = torch.tensor([0, 1, 30])
    like = torch.zeros(3, 1)
    b = sched.betas.double()
    ab = sched.alphas_cumprod.double()
    tilde1 = (1 - ab[0]) / (1 - ab[1]) * b[1]
    beta_mode = diffusion.fixed_log_variance(sched, t, like, "beta").flatten().exp()
    assert torch.allclose(beta_mode, torch.stack([tilde1, b[1], b[30]]), rtol=1e-12)
    post = diffusion.fixed_log_variance(sched, t, like, "posterior").flatten().exp()
    assert torch.allclose(post, torch.stack([tilde1, tilde1, (1 - ab[29]) / (1 - ab[30]) * b[30]]), rtol=1e-12)


def test_nll_api_breakdown_adds_up(tiny_ckpt):
    r = nll(tiny_ckpt, limit=3, batch_size=2)
    assert r.n == 3 and r.levels == 17 and r.variance == "posterior" and r.conditioning == "labels"
    assert len(r.per_timestep) == 1000
    assert r.bits_per_dim == pytest.approx(r.prior + r.diffusion + r.decoder, rel=1e-9)
    assert r.decoder == pytest.approx(r.per_timestep[0]) and r.diffusion == pytest.approx(sum(r.per_timestep[1:]))
    # batch size does not change the result: every point has its own noise stream
    assert nll(tiny_ckpt, limit=3, batch_size=3).bits_per_dim == pytest.approx(r.bits_per_dim, rel=1e-6)
    assert math.isfinite(r.bits_per_dim) and r.bits_per_dim > 0


def test_nll_learned_variance_needs_the_model(tiny_ckpt):
    with pytest.raises(toolkit.ToolkitError, match="learn-variance"):
        nll(tiny_ckpt, limit=1, variance="learned")
    assert nll("digits", limit=2).variance == "learned"  # the shipped model learns Σ (Improved DDPM)


def test_evaluate_cli_nll_json(tiny_ckpt, tmp_path):
    out = tmp_path / "nll.json"
    r = run("evaluate", "--model", tiny_ckpt, "--metric", "nll", "--limit", 2, "--json", "--out", out,
            "--variance", "beta")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data == json.loads(out.read_text())
    assert data["variance"] == "beta" and data["n"] == 2
    assert data["bits_per_dim"] == pytest.approx(data["prior"] + data["diffusion"] + data["decoder"])
    table = run("evaluate", "--model", tiny_ckpt, "--metric", "nll", "--limit", 1)
    assert table.exit_code == 0 and "L_T (prior)" in table.output and "L_0 (decoder)" in table.output


def test_evaluate_cli_fid_sweep_and_plot(tiny_ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    plot, out = tmp_path / "q.png", tmp_path / "q.json"
    r = run("evaluate", "--model", tiny_ckpt, "--metric", "fid", "--sampler", "ddim,ddpm", "--eta", "0,1",
            "--steps", "2,3", "-n", 20, "--plot", plot, "--out", out)
    assert r.exit_code == 0, r.output
    assert "FD is biased upward at small n: 20 real samples of the data set itself score" in r.output.splitlines()[0]
    data = json.loads(out.read_text())
    labels = [(row["label"], row["steps"]) for row in data["rows"]]
    assert labels == [("ddim(eta=0.0)", 2), ("ddim(eta=0.0)", 3), ("ddim(eta=1.0)", 2), ("ddim(eta=1.0)", 3),
                      ("ddpm", 2), ("ddpm", 3)]
    assert all(row["fd"] >= 0 and 0 <= row["accuracy"] <= 1 for row in data["rows"])
    assert data["features"] == "digits-features" and data["feature_holdout_accuracy"] > 0.97
    # DDIM with η = 1 is DDPM with σ² = β̃ (Song et al.): the same samples, so the same scores
    assert data["rows"][2]["fd"] == pytest.approx(data["rows"][4]["fd"], rel=1e-4)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ddim(eta=1.0)" in run("evaluate", "--model", tiny_ckpt, "--metric", "fid", "--eta", "1",
                                  "--steps", "2", "-n", 10).output
    assert [row["nfe"] for row in data["rows"]] == [2, 3, 2, 3, 2, 3]


def test_evaluate_per_sampler_options_and_nfe(tiny_ckpt, tmp_path):
    out = tmp_path / "q.json"
    r = run("evaluate", "--model", tiny_ckpt, "--metric", "fid", "--sampler", "heun,dpmpp-2m:order=1:spacing=karras",
            "--steps", "3", "-n", 10, "--out", out, "--sampler-option", "clip_x0=false")
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert [(row["label"], row["nfe"]) for row in rows] == [
        ("heun(clip_x0=False)", 5), ("dpmpp-2m(clip_x0=False,order=1,spacing=karras)", 3)]
    assert "NFE" in r.output.splitlines()[1]


def test_ode_error_metric(tiny_ckpt, tmp_path):
    """Deterministic samplers get their distance to the 1000-NFE reference, which shrinks with steps;
    dpmpp-2m with order=1 is DDIM on the same grid, so both rows agree; stochastic rows have none."""
    out = tmp_path / "o.json"
    r = run("evaluate", "--model", tiny_ckpt, "--metric", "ode", "--sampler",
            "ddim:spacing=logsnr,dpmpp-2m:order=1,unipc,euler-a", "--steps", "4,16", "-n", 6, "--out", out)
    assert r.exit_code == 0, r.output
    rows = {(row["label"], row["steps"]): row for row in json.loads(out.read_text())["rows"]}
    ddim4, ddim16 = rows[("ddim(spacing=logsnr)", 4)], rows[("ddim(spacing=logsnr)", 16)]
    assert 0 < ddim16["ode_error"] < ddim4["ode_error"]
    assert ddim4["ode_error"] == pytest.approx(rows[("dpmpp-2m(order=1)", 4)]["ode_error"], rel=1e-4)
    assert rows[("unipc", 16)]["ode_error"] < ddim16["ode_error"]
    assert rows[("euler-a", 4)]["ode_error"] is None and "stochastic" in r.output


def test_shipped_model_quality_against_features():
    """The shipped model, the shipped feature network: samples score near real data and are classified right."""
    report = sample_quality("digits", sampler_grid(["ddim"], None), [20], n=300)
    row = report.rows[0]
    assert row.accuracy > 0.95
    assert row.fd < 4 * report.reference_fd + 1.0, (row.fd, report.reference_fd)
    noise = sample_quality("digits", sampler_grid(["ddim"], None), [1], n=300).rows[0]
    assert noise.fd > 3 * row.fd  # one step is visibly worse: the metric separates quality


def test_unconditional_quality_reports_class_entropy(tiny_ckpt):
    report = sample_quality(tiny_ckpt, [("ddim", {})], [2], n=30, conditional=False)
    row = report.rows[0]
    assert row.accuracy is None and 0 <= row.class_entropy <= math.log(10) + 1e-9


def test_train_features_and_use_them(tmp_path, tiny_ckpt):
    feats = tmp_path / "feats"
    r = run("train-features", "--out", feats, "--steps", 60, "--batch-size", 32, "--holdout", 0.2,
            "--ema-decay", 0, "--lr", 0.005, "-q")
    assert r.exit_code == 0, r.output
    cfg = json.loads((feats / "config.json").read_text())
    assert cfg["kind"] == "features" and cfg["training"]["holdout_size"] == round(0.2 * 1797)
    assert 0.5 < cfg["training"]["holdout_accuracy"] <= 1  # 60 steps already beat chance (0.1) by far
    report = sample_quality(tiny_ckpt, [("ddim", {})], [2], n=20, features=feats)
    assert report.features == str(feats) and report.rows[0].fd >= 0


def test_raw_features_for_vector_data(tmp_path):
    out = tmp_path / "moons"
    r = run("train", "--dataset", "moons", "--model", "mlp", "--steps", 3, "--batch-size", 16, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    r = run("evaluate", "--model", out, "--metric", "fid", "--steps", 2, "-n", 50, "--features", "raw", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    assert row["accuracy"] is None and row["class_entropy"] is None and row["fd"] > 0
    one_line_error(run("evaluate", "--model", out, "--metric", "fid", "--steps", 2, "-n", 50),
                   "no shipped feature network for dataset 'moons'")


@pytest.mark.parametrize("args, message", [
    (["--metric", "fid", "--features", "digits"], "not a feature network"),
    (["--metric", "nll", "--dataset", "moons"], "has samples of shape (2,)"),
    (["--metric", "nll", "--plot", "x.png"], "--plot applies to --metric fid and ode"),
    (["--metric", "fid", "--sampler", "dpmpp-2m:order=3"], "order must be one of 1, 2"),
    (["--metric", "fid", "--sampler", "dpmpp-2m:eta=1"], "takes no option 'eta'"),
    (["--metric", "ode", "--sampler", "ddim:spacing"], "must be KEY=VALUE"),
    (["--metric", "fid", "--sampler", "ddim,unipc", "--sampler-option", "variance=beta"],
     "no sampler of ddim, unipc takes the option 'variance'"),
    (["--metric", "fid", "--steps", "a,b"], "--steps must be a comma list"),
    (["--metric", "fid", "--steps", "2.7"], "--steps must be whole numbers"),
    (["--metric", "fid", "--batch-size", "0"], "--batch-size must be positive"),
    (["--metric", "fid", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["--metric", "fid", "-n", "1"], "at least 2"),
    (["--metric", "nll", "--limit", "0"], "--limit must be positive"),
    (["--metric", "nll", "--variance", "huge"], "variance must be one of"),
    (["--metric", "nll", "--out", "missing/x.json"], "--out must be a .json file"),
])
def test_evaluate_bad_input(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(run("evaluate", *args), message)
    assert list(tmp_path.iterdir()) == []
