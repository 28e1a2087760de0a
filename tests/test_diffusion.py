import math

import pytest
import torch

import toolkit
from toolkit import diffusion


@pytest.fixture(params=["linear", "cosine"])
def sched(request):
    return toolkit.create("schedule", request.param, num_timesteps=200)


def test_closed_form_matches_iterated_forward_process(sched):
    """q(x_t|x_0) = N(√ᾱ x_0, (1-ᾱ) I) against x_t = √(1-β) x_{t-1} + √β ε iterated step by step."""
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    x = x0.clone()
    checkpoints = {0: None, 20: None, 120: None, 199: None}
    for t in range(200):
        beta = sched.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        if t in checkpoints:
            checkpoints[t] = (x.mean().item(), x.var().item())
    for t, (mean, var) in checkpoints.items():
        tt = torch.tensor([t])
        m, v = diffusion.q_mean_variance(sched, x0[:1].reshape(1, 1), tt)
        assert mean == pytest.approx(m.item(), abs=1e-2)
        assert var == pytest.approx(v.item(), abs=1e-2)
        # q_sample gives the same moments
        xs = diffusion.q_sample(sched, x0.reshape(-1, 1), tt.repeat(n), torch.randn(n, 1, generator=g, dtype=torch.float64))
        assert xs.mean().item() == pytest.approx(m.item(), abs=1e-2)
        assert xs.var().item() == pytest.approx(v.item(), abs=1e-2)


def test_posterior_mean_two_forms(sched):
    """μ̃ through x_0 (eq. 7) equals 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε) (eq. 11)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 50, 100, 150, 198, 199])
    x_t = diffusion.q_sample(sched, x0, t, eps)
    mean, var = diffusion.q_posterior(sched, x0, x_t, t)
    a = sched.alphas_cumprod[t].reshape(-1, 1)
    alpha = sched.alphas[t].reshape(-1, 1)
    beta = sched.betas[t].reshape(-1, 1)
    a_prev = sched.alphas_cumprod[t - 1].reshape(-1, 1)
    via_eps = (x_t - beta / (1 - a).sqrt() * eps) / alpha.sqrt()
    assert torch.allclose(mean, via_eps, atol=1e-9)
    via_x0 = a_prev.sqrt() * beta / (1 - a) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a) * x_t
    assert torch.allclose(mean, via_x0, atol=1e-10)
    assert torch.allclose(var.reshape(-1), ((1 - a_prev) / (1 - a) * beta).reshape(-1), rtol=1e-10)


def test_predict_x0_inverts_q_sample(sched):
    x0 = torch.randn(5, 2, dtype=torch.float64)
    eps = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([0, 3, 40, 120, 199])
    x_t = diffusion.q_sample(sched, x0, t, eps)
    assert torch.allclose(diffusion.predict_x0(sched, x_t, t, eps), x0, atol=1e-6)
    assert torch.allclose(diffusion.predict_eps(sched, x_t, t, x0), eps, atol=1e-6)
    v = diffusion.v_target(sched, x0, t, eps)
    assert torch.allclose(diffusion.eps_from_v(sched, x_t, t, v), eps, atol=1e-9)


def test_alpha_bar_after_last_step_is_one(sched):
    x = torch.zeros(2, 1)
    assert torch.all(diffusion.alpha_bar(sched, torch.tensor([-1, -1]), x) == 1)


def test_model_time_matches_log_snr():
    lin = toolkit.create("schedule", "linear", num_timesteps=1000)
    cos = toolkit.create("schedule", "cosine", num_timesteps=1000)
    # identical schedules map every t to itself
    same = diffusion.model_time(lin.log_snr, lin.log_snr)
    assert torch.allclose(same, torch.arange(1000, dtype=torch.float64), atol=1e-9)
    # cosine sampling times mapped into a linear-trained model have the same log-SNR (where in range)
    tm = diffusion.model_time(lin.log_snr, cos.log_snr)
    inside = (cos.log_snr <= lin.log_snr[0]) & (cos.log_snr >= lin.log_snr[-1])
    lo = tm.floor().long().clamp(max=998)
    frac = tm - lo
    interp = lin.log_snr[lo] * (1 - frac) + lin.log_snr[lo + 1] * frac
    assert inside.sum() > 900
    assert torch.allclose(interp[inside], cos.log_snr[inside], atol=1e-6)
    assert torch.all(tm[1:] >= tm[:-1])  # monotone
    assert tm.min() >= 0 and tm.max() <= 999


def test_normal_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(3)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    x = m1 + math.exp(lv1 / 2) * torch.randn(2_000_000, generator=g, dtype=torch.float64)

    def log_pdf(z, m, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + (z - m) ** 2 / math.exp(lv))

    mc = (log_pdf(x, m1, lv1) - log_pdf(x, m2, lv2)).mean().item()
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert diffusion.normal_kl(t(m1), t(lv1), t(m2), t(lv2)).item() == pytest.approx(mc, abs=2e-3)
    assert diffusion.normal_kl(t(m1), t(lv1), t(m1), t(lv1)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_gaussian_sums_to_one_over_all_bins(levels):
    values = torch.linspace(-1, 1, levels, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.3)), (0.93, math.log(0.05)), (-1.4, math.log(1.2))]:
        m = torch.full_like(values, mean)
        ls = torch.full_like(values, log_scale)
        logp = diffusion.discretized_gaussian_log_likelihood(values, m, ls, levels)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # a narrow Gaussian on a level puts almost all its mass in that level's bin
    lp = diffusion.discretized_gaussian_log_likelihood(torch.tensor([0.5]), torch.tensor([0.5]),
                                                       torch.tensor([math.log(1e-3)]), 17)
    assert lp.exp().item() == pytest.approx(1.0, abs=1e-9)


def test_vlb_terms_formulas():
    """L_t for t ≥ 1 is the Gaussian KL (written out here); L_0 the discretized decoder's NLL; in bits."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=100)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 17, (2, 1, 3, 3), generator=g).double() / 16 * 2 - 1
    eps = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 40])
    x_t = diffusion.q_sample(sched, x0, t, eps)
    eps_hat = eps + 0.1
    logvar = torch.full_like(x0, math.log(0.01))
    got = diffusion.vlb_terms(sched, x0, x_t, t, eps_hat, logvar, levels=17)
    a, ap, beta = sched.alphas_cumprod[40], sched.alphas_cumprod[39], sched.betas[40]
    x0_hat = (x_t[1] - (1 - a).sqrt() * eps_hat[1]) / a.sqrt()
    mu_p = ap.sqrt() * beta / (1 - a) * x0_hat + sched.alphas[40].sqrt() * (1 - ap) / (1 - a) * x_t[1]
    mu_q = ap.sqrt() * beta / (1 - a) * x0[1] + sched.alphas[40].sqrt() * (1 - ap) / (1 - a) * x_t[1]
    var_q, var_p = (1 - ap) / (1 - a) * beta, 0.01
    kl = 0.5 * (math.log(var_p / var_q) + var_q / var_p + (mu_q - mu_p) ** 2 / var_p - 1)
    assert got[1].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-6)
    mu0 = diffusion.q_posterior(sched, diffusion.predict_x0(sched, x_t[:1], t[:1], eps_hat[:1]), x_t[:1], t[:1])[0]
    nll = -diffusion.discretized_gaussian_log_likelihood(x0[:1], mu0, 0.5 * logvar[:1], 17).mean()
    assert got[0].item() == pytest.approx(nll.item() / math.log(2), rel=1e-9)
