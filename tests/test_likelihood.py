"""The probability-flow ODE likelihood: exact against the closed form on Gaussian data, the two traces against
autograd's Jacobian, and `evaluate --metric ode-nll` beside the bound."""

import json
import math

import numpy as np
import pytest
import torch

import toolkit
from helpers import one_line_error, run
from toolkit.likelihood import _divergence, log_sigma_range, ode_log_likelihood

MU = torch.tensor([0.3, -0.2]).reshape(1, 2, 1, 1)
S = torch.tensor([0.5, 0.2]).reshape(1, 2, 1, 1)


def _gaussian_eps(schedule):
    """The exact ε of N(μ, diag s²) data: E[ε | x_t] = σ (x_t − α μ)/(α² s² + σ²), at fractional t with the
    log-SNR linear in t between the schedule's integer times."""
    a = schedule.alphas_cumprod.double()
    lam = (torch.log(a) - torch.log1p(-a)).numpy()

    def eps(x, t):
        lt = torch.from_numpy(np.interp(t.double().numpy(), np.arange(len(lam)), lam)).to(x.dtype).reshape(-1, 1, 1, 1)
        a2 = torch.sigmoid(lt)
        return (1 - a2).sqrt() * (x - a2.sqrt() * MU) / (a2 * S ** 2 + 1 - a2)

    return eps


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_gaussian_log_likelihood_matches_the_closed_form(trace):
    schedule = toolkit.create("schedule", "cosine")
    g = torch.Generator().manual_seed(1)
    x = (MU + S * torch.randn(200, 2, 1, 1, generator=g)).double()
    logp = ode_log_likelihood(_gaussian_eps(schedule), schedule, x, steps=50, trace=trace)
    closed = (-0.5 * ((x - MU) / S) ** 2 - torch.log(S) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    assert abs(float(logp.mean() - closed.mean())) <= 0.01 * abs(float(closed.mean()))  # within 1 %
    # pointwise: the ODE starts at σ̃_0 (t = 0), where the data is N(μ, s² + σ̃_0²); run to σ̃_{T-1} (2·10⁴), where
    # N(0, I) is the marginal of x_T but for 10⁻⁵ (at σ̃ = 80 it is off by μ·x̃/80², up to 10⁻² per point)
    v = S ** 2 + math.exp(2 * log_sigma_range(schedule)[0])
    at_start = (-0.5 * (x - MU) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)).flatten(1).sum(1)
    full = ode_log_likelihood(_gaussian_eps(schedule), schedule, x, steps=200, trace=trace, sigma_max=1e9)
    assert float((full - at_start).abs().max()) < 5e-4


def test_the_traces_agree_with_autograds_jacobian():
    w = torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def fn(x, t):
        flat = x.flatten(1)
        return torch.tanh(flat @ w * (1 + t.reshape(-1, 1) / 10)).reshape(x.shape)

    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    want = [torch.autograd.functional.jacobian(lambda v: fn(v[None], t[b:b + 1])[0].flatten(), x[b]).reshape(12, 12)
            .trace() for b in range(3)]
    _, tr = _divergence(fn, x, t, "exact", None)
    assert torch.allclose(tr, torch.stack(want), atol=1e-10)
    probes = (torch.randint(0, 2, (4000, 3, 3, 2, 2), generator=torch.Generator().manual_seed(1)) * 2 - 1).double()
    draws = torch.stack([_divergence(fn, x, t, "hutchinson", p)[1] for p in probes])
    stderr = draws.std(0) / math.sqrt(len(probes))
    assert bool(((draws.mean(0) - torch.stack(want)).abs() < 4 * stderr).all())  # unbiased
    assert bool((draws.std(0) > 0.05).all())  # and a real estimate (the Jacobian is not diagonal)


def test_cli_ode_nll_beside_the_bound(tmp_path):
    out = tmp_path / "ode.json"
    r = run("evaluate", "--metric", "ode-nll", "--limit", 4, "--ode-steps", 4, "--out", out)
    assert r.exit_code == 0, r.output
    assert "probability-flow ODE" in r.output and "variational bound" in r.output
    payload = json.loads(out.read_text())
    assert payload["metric"] == "ode-nll" and payload["n"] == 4 and payload["levels"] == 17
    assert payload["dequantization"] == "uniform" and payload["nfe"] == 16
    assert 0 < payload["bits_per_dim"] < math.log2(17) and payload["bound_bits_per_dim"] > 0
    one_line_error(run("evaluate", "--metric", "ode-nll", "--ode-steps", 0), "--ode-steps must be positive")
    one_line_error(run("evaluate", "--metric", "ode-nll", "--model", "latent-digits", "--limit", 2),
                   "not available for a latent model")
    one_line_error(run("evaluate", "--metric", "ode-nll", "--plot", tmp_path / "p.png"), "--plot applies")
