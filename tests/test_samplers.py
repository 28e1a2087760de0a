"""Samplers (plugin API 2): each step checked against the papers' formulas written out here, whole runs
against independent transcriptions, convergence orders on Gaussian data where ε is exact."""

import math

import numpy as np
import pytest
import torch

import toolkit
from helpers import one_line_error, run as cli
from toolkit.sampling import as_v2, run_plan, spaced_timesteps, time_grid
from toolkit.testing import gaussian_eps


def toy_model(x, t):
    """A fixed, non-trivial ε-model: depends on x and t, so a wrong coefficient shows."""
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    return torch.tanh(0.7 * x + 0.001 * t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))))


def sample(sampler, schedule, steps, seed=0, shape=(6, 1, 4, 4), model=toy_model, dtype=torch.float32):
    """x_T and every noise draw from seeded generators; returns the output and the iterations that drew noise."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v2 = as_v2(sampler)
    plan = v2.plan(schedule, steps)
    calls = []

    def noise_fn(i):
        calls.append(i)
        gi = torch.Generator().manual_seed(1000 + i)
        return torch.randn((plan.draws_per_step, *shape), generator=gi, dtype=torch.float64).to(dtype)

    return run_plan(v2, model, plan, x_T, noise_fn=noise_fn), calls, x_T


def one_step(sampler, schedule, steps, i, x, eps, z=None):
    """Iteration i of a run with a model that returns ``eps`` (float64 end to end)."""
    plan = sampler.plan(schedule, steps)
    state = sampler.init_state(x, plan)
    return sampler.step(lambda x_, t_: eps, x, state, torch.tensor(i), plan, z)[0], plan


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_full_equals_ddpm_posterior_variance(clip):
    sched = toolkit.create("schedule", "cosine", num_timesteps=100)
    a, _, _ = sample(toolkit.create("sampler", "ddim", eta=1.0, clip_x0=clip), sched, 100)
    b, _, _ = sample(toolkit.create("sampler", "ddpm", variance="posterior", clip_x0=clip), sched, 100)
    assert torch.allclose(a, b, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    sched = toolkit.create("schedule", "linear", num_timesteps=1000)
    ddim = toolkit.create("sampler", "ddim", eta=0.0)
    a, calls, _ = sample(ddim, sched, 20)
    b, _, _ = sample(ddim, sched, 20)
    assert calls == [] and ddim.plan(sched, 20).draws_per_step == 0
    assert torch.equal(a, b)


def test_ddpm_step_is_algorithm_2():
    """x_{t-1} = 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε) + σ_t z, σ² = β_t; no noise at the last step."""
    sched = toolkit.create("schedule", "linear", num_timesteps=1000)
    ddpm = toolkit.create("sampler", "ddpm", variance="beta", clip_x0=False)
    x, z, eps = (torch.randn(3, 2, dtype=torch.float64) for _ in range(3))
    for t in [999, 500, 1, 0]:
        got, plan = one_step(ddpm, sched, 1000, 999 - t, x, eps, z[None])
        assert int(plan.t[999 - t]) == t
        alpha, beta, a = sched.alphas[t], sched.betas[t], sched.alphas_cumprod[t]
        expect = (x - beta / (1 - a).sqrt() * eps) / alpha.sqrt() + (beta.sqrt() * z if t > 0 else 0)
        assert torch.allclose(got, expect, atol=1e-10)


def test_ddim_step_formula_with_eta():
    """Song et al. eq. 12 with σ_τ(η), written out over a skipped pair (τ_i, τ_{i-1})."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    eta = 0.5
    ddim = toolkit.create("sampler", "ddim", eta=eta, clip_x0=False)
    x, eps, z = (torch.randn(2, 3, dtype=torch.float64) for _ in range(3))
    got, plan = one_step(ddim, sched, 20, 6, x, eps, z[None])  # uniform, 20 steps: τ_6 = 650 → 600
    t, tp = int(plan.t[6]), int(plan.t[7])
    assert (t, tp) == (650, 600)
    a, ap = sched.alphas_cumprod[t], sched.alphas_cumprod[tp]
    sigma = eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    expect = ap.sqrt() * x0 + (1 - ap - sigma**2).sqrt() * eps + sigma * z
    assert torch.allclose(got, expect, atol=1e-10)


def test_ddim_sigma_hat_is_the_larger_variance_row():
    """σ̂_τi = √(1 − ᾱ_τi/ᾱ_τi−1) with the posterior mean μ̃(x_t, x̂_0) (the DDIM paper's σ̂ row)."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    ddim = toolkit.create("sampler", "ddim", sigma="hat", clip_x0=False)
    x, eps, z = (torch.randn(2, 3, dtype=torch.float64) for _ in range(3))
    got, plan = one_step(ddim, sched, 10, 3, x, eps, z[None])
    t, tp = int(plan.t[3]), int(plan.t[4])
    a, ap = sched.alphas_cumprod[t], sched.alphas_cumprod[tp]
    beta = 1 - a / ap
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    mean = ap.sqrt() * beta / (1 - a) * x0 + (1 - ap) * (a / ap).sqrt() / (1 - a) * x  # eq. 7 over the pair
    assert torch.allclose(got, mean + beta.sqrt() * z, atol=1e-10)
    assert ddim.plan(sched, 10).draws_per_step == 1


def test_spacings_follow_ddim_paper():
    assert spaced_timesteps(1000, 10, "uniform").tolist() == list(range(900, -1, -100))
    # DDIM's quadratic: ⌊(i·√800/9)²⌋ = ⌊800·i²/81⌋ for i = 0..9
    assert spaced_timesteps(1000, 10, "quadratic").tolist() == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert spaced_timesteps(1000, 1000, "uniform").tolist() == list(range(999, -1, -1))
    assert spaced_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]


def test_logsnr_and_karras_grids():
    """logsnr: λ(t_i) evenly spaced; karras: σ̃_i = (σ̃max^(1/7) + i/S·(σ̃min^(1/7) − σ̃max^(1/7)))^7 with
    σ̃max = min(80, σ̃_{T−1}), σ̃min = σ̃_0, i = 0..S−1 (the point i = S, t = 0, is not visited: the last step
    goes to the clean data); fractional t mapped through λ linear in t."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    a = sched.alphas_cumprod.numpy()
    lam_tab = np.log(a / (1 - a))

    def lam_at(t):  # λ linear between integer times
        return np.interp(t, np.arange(1000), lam_tab)

    t = time_grid(sched, 8, "logsnr")
    lam = lam_at(t)
    assert len(t) == 8 and np.allclose(np.diff(lam), (lam_tab[0] - lam[0]) / 8, rtol=1e-9)
    assert lam[0] == pytest.approx(-2 * math.log(80.0), rel=1e-9)  # σ̃ = 80 where λ = −2 log 80
    t = time_grid(sched, 8, "karras")
    sig = np.exp(-lam_at(t) / 2)
    s_max, s_min = 80.0, math.sqrt((1 - a[0]) / a[0])
    ramp = np.arange(8) / 8
    expect = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    assert np.allclose(sig, expect, rtol=1e-9)
    lin = toolkit.create("schedule", "linear", num_timesteps=1000)  # σ̃_{T−1} = 157 > 80 here too
    a = lin.alphas_cumprod.numpy()
    t0 = time_grid(lin, 3, "karras")[0]
    assert 900 < t0 < 999 and np.exp(-np.interp(t0, np.arange(1000), np.log(a / (1 - a))) / 2) == pytest.approx(80.0)
    short = toolkit.schedule_from_betas("flat", [0.01] * 20)  # σ̃_{T−1} = 0.47 < 80: starts at T − 1
    assert time_grid(short, 3, "logsnr")[0] == 19


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp-2m", "unipc", "heun", "euler-a"])
def test_plan_times_descend_and_lie_in_range(name):
    s = toolkit.create("schedule", "cosine", num_timesteps=50)
    sampler = toolkit.create("sampler", name)
    for steps in [3, 7, 50]:
        t = sampler.plan(s, steps).t
        assert t.dtype == torch.float64 and t.min() >= 0 and t.max() <= 49
        if name != "heun":  # heun's iterations alternate Euler and correction stages
            assert len(t) == steps and torch.all(t[1:] < t[:-1])


@pytest.mark.parametrize("steps", [0, -1, 51])
def test_steps_out_of_range(steps):
    s = toolkit.create("schedule", "cosine", num_timesteps=50)
    with pytest.raises(toolkit.ToolkitError, match="steps"):
        toolkit.create("sampler", "ddim").plan(s, steps)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_eta_out_of_range(eta):
    with pytest.raises(toolkit.ToolkitError, match="eta"):
        toolkit.create("sampler", "ddim", eta=eta)


def test_respaced_ddpm_uses_beta_of_visited_steps():
    """With fewer steps than T, σ² = β̃ over the visited pair: (1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)."""
    sched = toolkit.create("schedule", "linear", num_timesteps=1000)
    ddpm = toolkit.create("sampler", "ddpm", variance="posterior")
    plan = ddpm.plan(sched, 5)  # uniform: 800, 600, ...
    lv = ddpm.log_variance(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor(0), plan)
    a, ap = sched.alphas_cumprod[800], sched.alphas_cumprod[600]
    assert lv.exp().item() == pytest.approx(((1 - ap) / (1 - a) * (1 - a / ap)).item(), rel=1e-6)


def test_learned_range_variance_lies_between_posterior_and_beta():
    """Improved DDPM: Σ = exp(v log β + (1-v) log β̃), v = (out+1)/2; β̃ ≤ Σ ≤ β, with the ends reached."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    ddpm = toolkit.create("sampler", "ddpm", variance="learned")
    plan = ddpm.plan(sched, 1000)
    x = torch.zeros(5, 1, 2, 2, dtype=torch.float64)
    raw = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64).reshape(5, 1, 1, 1).expand(5, 1, 2, 2)
    out = torch.cat([torch.zeros_like(x), raw], dim=1)
    for t in [1, 100, 700]:
        var = ddpm.log_variance(out, x, torch.tensor(999 - t), plan).exp()[:, 0, 0, 0]
        beta, tilde = sched.betas[t].item(), sched.posterior_variance[t].item()
        assert var[0].item() == pytest.approx(tilde, rel=1e-9) and var[-1].item() == pytest.approx(beta, rel=1e-9)
        assert torch.all(var[1:] >= var[:-1]) and tilde * (1 - 1e-12) <= var.min() and var.max() <= beta * (1 + 1e-12)
        assert var[2].item() == pytest.approx(math.sqrt(beta * tilde), rel=1e-9)  # v = 1/2: geometric mean


# ---------------------------------------------------------------- the solvers, written out independently


def _ve(sched, t):
    """α and σ̃ = √((1−ᾱ)/ᾱ) at (fractional) t, λ linear in t; t < 0 is the clean end."""
    if t < 0:
        return 1.0, 0.0
    a = sched.alphas_cumprod.numpy()
    lam = np.interp(t, np.arange(len(a)), np.log(a / (1 - a)))
    return math.sqrt(1 / (1 + math.exp(-lam))), math.exp(-lam / 2)


def _eps64(x, t):
    return toy_model(x.float(), torch.tensor(float(t))).double()


def test_dpmpp_2m_is_k_diffusions_sample_dpmpp_2m():
    """k-diffusion's loop in VE coordinates x̃ = x/α, t = −log σ̃, denoised = x̃ − σ̃ε."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    solver = toolkit.create("sampler", "dpmpp-2m", clip_x0=False, spacing="karras")
    got, _, x_T = sample(solver, sched, 6)
    ts = list(solver.plan(sched, 6).t.numpy()) + [-1.0]
    x = x_T.double() / _ve(sched, ts[0])[0]
    old = None
    for i in range(6):
        s, s_next = _ve(sched, ts[i])[1], _ve(sched, ts[i + 1])[1]
        den = x - s * _eps64(x * _ve(sched, ts[i])[0], ts[i])
        if old is None or s_next == 0:
            x = den if s_next == 0 else (s_next / s) * x - math.expm1(-(math.log(s) - math.log(s_next))) * den
        else:
            h = math.log(s) - math.log(s_next)
            h_last = math.log(_ve(sched, ts[i - 1])[1]) - math.log(s)
            r = h_last / h
            d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (s_next / s) * x - math.expm1(-h) * d
        old = den
    assert torch.allclose(got.double(), x, atol=2e-5)


def test_heun_is_karras_algorithm_1():
    """Algorithm 1 of Karras et al. (deterministic): Euler, then the trapezoid correction unless σ̃_{i+1} = 0;
    2S − 1 network calls."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    heun = toolkit.create("sampler", "heun", clip_x0=False)
    calls = []

    def counted(x, t):
        calls.append(float(t))
        return toy_model(x, t)

    got, _, x_T = sample(heun, sched, 5, model=counted)
    assert len(calls) == 9 and heun.plan(sched, 5).nfe == 9
    ts = list(time_grid(sched, 5, "karras")) + [-1.0]
    x = x_T.double() / _ve(sched, ts[0])[0]
    for i in range(5):
        (a, s), (a_n, s_n) = _ve(sched, ts[i]), _ve(sched, ts[i + 1])
        d = _eps64(x * a, ts[i])  # dx̃/dσ̃ = (x̃ − D)/σ̃ = ε
        x_e = x + (s_n - s) * d
        if s_n > 0:
            x = x + (s_n - s) * 0.5 * (d + _eps64(x_e * a_n, ts[i + 1]))
        else:
            x = x_e
    assert torch.allclose(got.double(), x, atol=2e-5)


def test_euler_ancestral_is_k_diffusions():
    """σ̃_up = min(σ̃', √(σ̃'²(σ̃² − σ̃'²)/σ̃²)), σ̃_down = √(σ̃'² − σ̃_up²); x̃ ← x̃ + (σ̃_down − σ̃)ε + σ̃_up z."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    ea = toolkit.create("sampler", "euler-a", clip_x0=False)
    got, calls, x_T = sample(ea, sched, 6)
    assert calls == list(range(6))
    ts = list(time_grid(sched, 6, "karras")) + [-1.0]
    x = x_T.double() / _ve(sched, ts[0])[0]
    for i in range(6):
        (a, s), (_, s_n) = _ve(sched, ts[i]), _ve(sched, ts[i + 1])
        up = min(s_n, math.sqrt(s_n**2 * (s**2 - s_n**2) / s**2))
        down = math.sqrt(s_n**2 - up**2)
        z = torch.randn((1, 6, 1, 4, 4), generator=torch.Generator().manual_seed(1000 + i), dtype=torch.float64)[0]
        x = x + (down - s) * _eps64(x * a, ts[i]) + up * z
    assert torch.allclose(got.double(), x, atol=2e-5)


@pytest.mark.parametrize("variant", ["bh2", "bh1"])
def test_unipc_is_the_predictor_corrector(variant):
    """UniPC-2 (x̂_0 form; B(h) = e^{−h} − 1 for bh2, −h for bh1) written out as in Zhao et al. / diffusers:
    corrector with the new call, then the predictor; first order at the first and the last step."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    solver = toolkit.create("sampler", "unipc", clip_x0=False, spacing="uniform", variant=variant)
    S = 6
    got, _, x_T = sample(solver, sched, S)
    ts = list(solver.plan(sched, S).t.numpy()) + [-1.0]
    al = [_ve(sched, t)[0] for t in ts]
    sg = [a * _ve(sched, t)[1] for a, t in zip(al, ts)]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(al, sg)]
    x, ms, last, orders = x_T.double(), [], None, []
    for k in range(S):
        m = (x - sg[k] * _eps64(x, ts[k])) / al[k]
        if k > 0:  # UniC with the order of the previous predictor
            h = lam[k] - lam[k - 1]
            hh, B = -h, (math.expm1(-h) if variant == "bh2" else -h)
            base = sg[k] / sg[k - 1] * last - al[k] * math.expm1(hh) * ms[-1]
            if orders[-1] == 1:
                x = base - al[k] * B * 0.5 * (m - ms[-1])
            else:
                rk = (lam[k - 2] - lam[k - 1]) / h
                phi1 = math.expm1(hh)
                phi2 = phi1 / hh - 1
                phi3 = phi2 / hh - 0.5
                rho = np.linalg.solve(np.array([[1, 1], [rk, 1]]), np.array([phi2 / B, 2 * phi3 / B]))
                D1 = (ms[-2] - ms[-1]) / rk
                x = base - al[k] * B * (rho[0] * D1 + rho[1] * (m - ms[-1]))
        ms.append(m)
        last = x
        order = 1 if k == 0 or k == S - 1 else 2
        orders.append(order)
        if ts[k + 1] < 0:
            x = m
            continue
        h = lam[k + 1] - lam[k]
        x_new = sg[k + 1] / sg[k] * x - al[k + 1] * math.expm1(-h) * m
        if order == 2:
            rk = (lam[k - 1] - lam[k]) / h
            B = math.expm1(-h) if variant == "bh2" else -h
            x_new = x_new - al[k + 1] * B * 0.5 * (ms[-2] - m) / rk
        x = x_new
    assert torch.allclose(got.double(), x, atol=2e-5)


def _order(name, **opts):
    """Empirical convergence order on N(0.3, 0.2²) data with the exact ε: log4 of the error ratio S = 20 → 80
    (above the floor of the first-order last step from σ̃_min to 0, which is the same at every S)."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    solver = toolkit.create("sampler", name, clip_x0=False, **opts)
    model = gaussian_eps(0.3, 0.2, sched)
    errs = []
    for S in (20, 80):
        x, _, x_T = sample(solver, sched, S, model=model, dtype=torch.float64)
        t0 = solver.plan(sched, S).t[0].reshape(1)
        a = toolkit.diffusion.alpha_bar(sched, t0, x_T, torch.float64)
        exact = 0.3 + 0.2 * (x_T - a.sqrt() * 0.3) / (a * 0.04 + 1 - a).sqrt()
        errs.append(float((x - exact).abs().max()))
    return math.log2(errs[0] / errs[1]) / 2


@pytest.mark.parametrize("name,low,high", [("ddim", 0.8, 1.4), ("dpmpp-2m", 1.7, 3.5), ("unipc", 1.7, 4.0),
                                           ("heun", 1.7, 3.5)])
def test_convergence_order_on_gaussian_data(name, low, high):
    opts = {"spacing": "logsnr"} if name == "ddim" else {}
    assert low < _order(name, **opts) < high


def test_fractional_times_on_another_schedule():
    """A cosine-trained model sampled under a linear schedule on a karras grid: fractional t mapped by log-SNR."""
    pipe = toolkit.compose(schedule="linear", sampler="dpmpp-2m", steps=5)
    t = pipe.timesteps
    assert not torch.equal(t, t.round())
    x = pipe.sample(4, seed=0, labels=[1, 2, 3, 4])
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("args,pattern", [
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--sampler", "ddim", "--spacing", "cubic"], "spacing must be one of"),
    (["--sampler", "dpmpp-2m", "--steps", "2"], "needs at least 3 steps"),
    (["--sampler", "dpmpp-2m", "--sampler-option", "eta=0.5"], "takes no option 'eta'"),
    (["--sampler", "unipc", "--sampler-option", "order=5"], "order must be one of 1, 2"),
    (["--sampler", "unipc", "--sampler-option", "clip_x0=maybe"], "clip_x0 must be true or false"),
])
def test_bad_solver_input_is_one_line(tmp_path, args, pattern):
    one_line_error(cli("compose", *args, "-n", 2, "--out", tmp_path / "x.png"), pattern)


def test_boolean_options_parse_as_booleans():
    for text, value in (("False", False), ("false", False), ("0", False), ("True", True), (True, True)):
        assert toolkit.create("sampler", "unipc", clip_x0=text).clip_x0 is value
        assert toolkit.create("sampler", "ddim", clip_x0=text).clip_x0 is value


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc", "heun", "euler-a"])
def test_solvers_from_the_cli(tmp_path, name):
    out = tmp_path / "x.npy"
    result = cli("compose", "--sampler", name, "--steps", 5, "-n", 4, "--class", "3", "--guidance", "cfg",
                 "--out", out, "-q")
    assert result.exit_code == 0, result.output
    x = np.load(out)
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all()
    nfe = 9 if name == "heun" else 5
    assert f"= {nfe} network calls" in result.output
