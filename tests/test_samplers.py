import math

import pytest
import torch

import toolkit
from toolkit.sampling import spaced_timesteps


def toy_model(x, t):
    """A fixed, non-trivial ε-model: depends on x and t, so a wrong coefficient shows."""
    return torch.tanh(0.7 * x + 0.001 * t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))))


def run(sampler, schedule, steps, seed=0, shape=(6, 1, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g)
    calls = []

    def noise_fn(i):
        calls.append(i)
        return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i))

    out = sampler.sample(toy_model, schedule, x_T, steps=steps, noise_fn=noise_fn)
    return out, calls


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_full_equals_ddpm_posterior_variance(clip):
    sched = toolkit.create("schedule", "cosine", num_timesteps=100)
    ddim = toolkit.create("sampler", "ddim", eta=1.0, clip_x0=clip)
    ddpm = toolkit.create("sampler", "ddpm", variance="posterior", clip_x0=clip)
    a, _ = run(ddim, sched, 100)
    b, _ = run(ddpm, sched, 100)
    assert torch.allclose(a, b, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    sched = toolkit.create("schedule", "linear", num_timesteps=1000)
    ddim = toolkit.create("sampler", "ddim", eta=0.0)
    a, calls = run(ddim, sched, 20)
    b, _ = run(ddim, sched, 20)
    assert calls == [] and not ddim.stochastic
    assert torch.equal(a, b)


def test_ddpm_step_is_algorithm_2():
    """x_{t-1} = 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε) + σ_t z, σ² = β_t; no noise at the last step."""
    sched = toolkit.create("schedule", "linear", num_timesteps=1000)
    ddpm = toolkit.create("sampler", "ddpm", variance="beta", clip_x0=False)
    x = torch.randn(3, 2, dtype=torch.float64)
    z = torch.randn(3, 2, dtype=torch.float64)
    eps = torch.randn(3, 2, dtype=torch.float64)
    for t in [999, 500, 1]:
        tt = torch.full((3,), t)
        got = ddpm.step(eps, x, tt, tt - 1, sched, z)
        alpha, beta, a = sched.alphas[t], sched.betas[t], sched.alphas_cumprod[t]
        expect = (x - beta / (1 - a).sqrt() * eps) / alpha.sqrt() + beta.sqrt() * z
        assert torch.allclose(got, expect, atol=1e-10)
    last = ddpm.step(eps, x, torch.zeros(3, dtype=torch.long), torch.full((3,), -1), sched, z)
    alpha, beta, a = sched.alphas[0], sched.betas[0], sched.alphas_cumprod[0]
    assert torch.allclose(last, (x - beta / (1 - a).sqrt() * eps) / alpha.sqrt(), atol=1e-10)


def test_ddim_step_formula_with_eta():
    """Song et al. eq. 12 with σ_τ(η), written out over a skipped pair (τ_i, τ_{i-1})."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    eta = 0.5
    ddim = toolkit.create("sampler", "ddim", eta=eta, clip_x0=False)
    x = torch.randn(2, 3, dtype=torch.float64)
    eps = torch.randn(2, 3, dtype=torch.float64)
    z = torch.randn(2, 3, dtype=torch.float64)
    t, tp = 700, 650
    got = ddim.step(eps, x, torch.full((2,), t), torch.full((2,), tp), sched, z)
    a, ap = sched.alphas_cumprod[t], sched.alphas_cumprod[tp]
    sigma = eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    expect = ap.sqrt() * x0 + (1 - ap - sigma**2).sqrt() * eps + sigma * z
    assert torch.allclose(got, expect, atol=1e-10)


def test_spacings_follow_ddim_paper():
    assert spaced_timesteps(1000, 10, "uniform").tolist() == list(range(900, -1, -100))
    # DDIM's quadratic: ⌊(i·√800/9)²⌋ = ⌊800·i²/81⌋ for i = 0..9
    assert spaced_timesteps(1000, 10, "quadratic").tolist() == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert spaced_timesteps(1000, 1000, "uniform").tolist() == list(range(999, -1, -1))
    assert spaced_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_timesteps_descending_and_in_range(name):
    s = toolkit.create("schedule", "cosine", num_timesteps=50)
    sampler = toolkit.create("sampler", name)
    for steps in [1, 7, 50]:
        ts = sampler.timesteps(s, steps)
        assert ts.dtype == torch.long and len(ts) == steps
        assert torch.all(ts[1:] < ts[:-1]) and ts.min() >= 0 and ts.max() < 50


@pytest.mark.parametrize("steps", [0, -1, 51])
def test_steps_out_of_range(steps):
    s = toolkit.create("schedule", "cosine", num_timesteps=50)
    with pytest.raises(toolkit.ToolkitError, match="steps"):
        toolkit.create("sampler", "ddim").timesteps(s, steps)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_eta_out_of_range(eta):
    with pytest.raises(toolkit.ToolkitError, match="eta"):
        toolkit.create("sampler", "ddim", eta=eta)


def test_respaced_ddpm_uses_beta_of_visited_steps():
    """With fewer steps than T, σ² = β̃ over the visited pair: (1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)."""
    sched = toolkit.create("schedule", "linear", num_timesteps=1000)
    ddpm = toolkit.create("sampler", "ddpm", variance="posterior")
    x = torch.zeros(1, 1)
    lv = ddpm.log_variance(torch.zeros(1, 1), x, torch.tensor([800]), torch.tensor([600]), sched)
    a, ap = sched.alphas_cumprod[800], sched.alphas_cumprod[600]
    assert lv.exp().item() == pytest.approx(((1 - ap) / (1 - a) * (1 - a / ap)).item(), rel=1e-6)


def test_learned_range_variance_lies_between_posterior_and_beta():
    """Improved DDPM: Σ = exp(v log β + (1-v) log β̃), v = (out+1)/2; β̃ ≤ Σ ≤ β, with the ends reached."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    ddpm = toolkit.create("sampler", "ddpm", variance="learned")
    x = torch.zeros(5, 1, 2, 2, dtype=torch.float64)
    raw = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64).reshape(5, 1, 1, 1).expand(5, 1, 2, 2)
    out = torch.cat([torch.zeros_like(x), raw], dim=1)
    for t in [1, 100, 700]:
        tt, tp = torch.full((5,), t), torch.full((5,), t - 1)
        var = ddpm.log_variance(out, x, tt, tp, sched).exp()[:, 0, 0, 0]
        beta, tilde = sched.betas[t].item(), sched.posterior_variance[t].item()
        assert var[0].item() == pytest.approx(tilde, rel=1e-9) and var[-1].item() == pytest.approx(beta, rel=1e-9)
        assert torch.all(var[1:] >= var[:-1]) and tilde * (1 - 1e-12) <= var.min() and var.max() <= beta * (1 + 1e-12)
        assert var[2].item() == pytest.approx(math.sqrt(beta * tilde), rel=1e-9)  # v = 1/2: geometric mean
