import math

import pytest
import torch

import toolkit


def test_linear_constants():
    s = toolkit.create("schedule", "linear", num_timesteps=1000)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # ᾱ_t = Π (1 - β_s), written out as a loop
    prod, expect = 1.0, []
    for b in s.betas.tolist():
        prod *= 1 - b
        expect.append(prod)
    assert torch.allclose(s.alphas_cumprod, torch.tensor(expect, dtype=torch.float64), rtol=1e-12)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)  # Ho et al.: ᾱ_T ≈ 4e-5


def test_cosine_matches_nichol_dhariwal():
    T, s_ = 1000, 0.008
    sched = toolkit.create("schedule", "cosine", num_timesteps=T)

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    for t in [0, 1, 10, 500, 900, 990]:  # 0-based index t is the paper's t+1
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert sched.betas.max().item() <= 0.999 + 1e-12
    assert sched.betas[-1].item() == pytest.approx(0.999)  # clipped at the end
    assert sched.betas.dtype == torch.float64


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [10, 250, 4000])
def test_configurable_T(name, T):
    s = toolkit.create("schedule", name, num_timesteps=T)
    assert s.num_timesteps == T and s.alphas_cumprod.shape == (T,)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])
    assert torch.all(s.log_snr[1:] < s.log_snr[:-1])


def test_posterior_variance_formula():
    s = toolkit.create("schedule", "linear", num_timesteps=100)
    a = s.alphas_cumprod
    for t in [1, 5, 50, 99]:
        expect = (1 - a[t - 1]) / (1 - a[t]) * s.betas[t]
        assert s.posterior_variance[t].item() == pytest.approx(expect.item(), rel=1e-12)
    assert s.posterior_variance[0].item() == 0.0


def test_bad_T():
    with pytest.raises(toolkit.ToolkitError):
        toolkit.create("schedule", "cosine", num_timesteps=0)
