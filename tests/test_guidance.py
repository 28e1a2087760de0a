import pytest
import torch
from click.testing import CliRunner

import toolkit
from toolkit.cli import cli
from toolkit.sampling import MeanShifted


def test_cfg_w0_equals_conditional_sampling(tiny_ckpt):
    plain = toolkit.compose(model=tiny_ckpt, sampler="ddim", steps=5)
    guided = toolkit.compose(model=tiny_ckpt, sampler="ddim", steps=5, guidance="cfg",
                             guidance_options={"scale": 0.0})
    a = plain.sample(4, seed=2, labels=[3, 1])
    b = guided.sample(4, seed=2, labels=[3, 1])
    assert torch.allclose(a, b, atol=1e-5)


def test_cfg_batched_equals_two_calls(tiny_ckpt):
    model = toolkit.load_checkpoint(tiny_ckpt).model
    guided = toolkit.create("guidance", "cfg", scale=2.5).wrap(model)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([10, 500, 900])
    y = torch.tensor([1, 7, 9])
    null = torch.full_like(y, 10)
    expect = 3.5 * model(x, t, y) - 2.5 * model(x, t, null)
    assert torch.allclose(guided(x, t, y), expect, atol=1e-5)


def test_cfg_per_sample_scale(tiny_ckpt):
    pipe = toolkit.compose(model=tiny_ckpt, sampler="ddpm", steps=6, guidance="cfg")
    sweep = pipe.sample(3, seed=1, labels=[4, 4, 4], scale=[0.0, 1.0, 5.0])
    for i, w in enumerate([0.0, 1.0, 5.0]):
        one = pipe.sample(3, seed=1, labels=[4, 4, 4], scale=w)
        assert torch.allclose(sweep[i], one[i], atol=1e-5)
    assert not torch.allclose(sweep[0], sweep[2])


def test_classifier_gradient_matches_finite_differences(tiny_classifier):
    g = toolkit.create("guidance", "classifier", classifier=str(tiny_classifier))
    g.model.double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([100, 600])
    y = torch.tensor([3, 8])
    grad = g.gradient(x, t, y, 2.0)

    def log_p(z):
        return torch.log_softmax(g.model(z, t), -1)[torch.arange(2), y].sum()

    h = 1e-5
    for idx in [(0, 0, 3, 4), (1, 0, 0, 0), (1, 0, 7, 2)]:
        e = torch.zeros_like(x)
        e[idx] = h
        fd = (log_p(x + e) - log_p(x - e)) / (2 * h)
        assert grad[idx].item() == pytest.approx(2.0 * fd.item(), rel=1e-5, abs=1e-8)


def test_eps_hat_formula(tiny_ckpt, tiny_classifier):
    """ε̂ = ε_θ(x_t, ∅) − √(1−ᾱ_t)·s·∇ log p_φ(y|x_t), ᾱ from the cosine schedule written out here."""
    import math

    model = toolkit.load_checkpoint(tiny_ckpt).model
    guidance = toolkit.create("guidance", "classifier", classifier=str(tiny_classifier), scale=3.0)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([250, 700])
    y = torch.tensor([2, 5])
    got = guidance.wrap(model)(x, t, y)
    f = lambda s: math.cos((s / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    a = torch.tensor([f(250 + 1) / f(0), f(700 + 1) / f(0)]).reshape(-1, 1, 1, 1)
    expect = model(x, t, None) - (1 - a).sqrt().float() * guidance.gradient(x, t, y, 3.0)
    assert torch.allclose(got, expect, atol=1e-5)


def test_ddpm_mean_shift_is_algorithm_1(tiny_classifier):
    """x_{t-1} = μ + s·Σ·∇ log p(y|x_t) (+ σz), Σ = β̃ written out from the schedule."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    ddpm = toolkit.create("sampler", "ddpm", variance="posterior")
    grad = torch.randn(2, 1, 8, 8)
    shifted = MeanShifted(ddpm, lambda x, t: grad)
    x = torch.randn(2, 1, 8, 8)
    eps = torch.randn(2, 1, 8, 8)
    plan = ddpm.plan(sched, 1000)
    i = torch.tensor(399)
    assert int(plan.t[i]) == 600
    a, ap, beta = sched.alphas_cumprod[600], sched.alphas_cumprod[599], sched.betas[600]
    sigma2 = ((1 - ap) / (1 - a) * beta).float()
    mean, _ = ddpm.step(lambda x_, t_: eps, x, (), i, plan, None)
    got, _ = shifted.step(lambda x_, t_: eps, x, (), i, plan, None)
    assert torch.allclose(got, mean + sigma2 * grad, atol=1e-6)


def test_pipeline_uses_mean_shift_for_ddpm_only(tiny_ckpt, tiny_classifier):
    opts = {"classifier": str(tiny_classifier)}
    ddpm = toolkit.compose(model=tiny_ckpt, sampler="ddpm", steps=3, guidance="classifier", guidance_options=opts)
    ddim = toolkit.compose(model=tiny_ckpt, sampler="ddim", steps=3, guidance="classifier", guidance_options=opts)
    assert ddpm.mean_shift and not ddim.mean_shift


@pytest.mark.parametrize("sampler", toolkit.available("sampler"))
@pytest.mark.parametrize("guidance", ["cfg", "classifier"])
def test_guidance_with_every_sampler(tiny_ckpt, tiny_classifier, sampler, guidance):
    opts = {"classifier": str(tiny_classifier)} if guidance == "classifier" else {}
    pipe = toolkit.compose(model=tiny_ckpt, sampler=sampler, steps=4, guidance=guidance,
                           guidance_options={**opts, "scale": 2.0})
    x = pipe.sample(3, seed=0, labels=[0, 5, 9])
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_classifier_scale_zero_is_unconditional(tiny_ckpt, tiny_classifier):
    for sampler in ("ddim", "ddpm"):
        plain = toolkit.compose(model=tiny_ckpt, sampler=sampler, steps=4)
        guided = toolkit.compose(model=tiny_ckpt, sampler=sampler, steps=4, guidance="classifier",
                                 guidance_options={"classifier": str(tiny_classifier), "scale": 0.0})
        assert torch.allclose(plain.sample(2, seed=3), guided.sample(2, seed=3, labels=[1, 2]), atol=1e-5)


def test_guidance_errors(tiny_ckpt, tiny_classifier, tmp_path):
    with pytest.raises(toolkit.ToolkitError, match="must not be negative"):
        toolkit.create("guidance", "cfg", scale=-1)
    pipe = toolkit.compose(model=tiny_ckpt, steps=2, guidance="cfg")
    with pytest.raises(toolkit.ToolkitError, match="needs class labels"):
        pipe.sample(2)
    with pytest.raises(toolkit.ToolkitError, match="out of range"):
        pipe.sample(2, labels=10)
    from toolkit.training import TrainConfig, train

    toy = tmp_path / "toy"
    train(TrainConfig(dataset="moons", model="mlp", steps=1, batch_size=8), toy)
    with pytest.raises(toolkit.ToolkitError, match="cfg needs a class-conditional model"):
        toolkit.compose(model=toy, steps=2, guidance="cfg")
    with pytest.raises(toolkit.ToolkitError, match="data shape"):
        toolkit.compose(model=toy, steps=2, guidance="classifier",
                        guidance_options={"classifier": str(tiny_classifier)})
    short = tmp_path / "short"
    train(TrainConfig(task="classifier", model="unet-encoder", num_timesteps=500, steps=1, batch_size=8,
                      model_options={"base_channels": 8, "attention_heads": 2}), short)
    with pytest.raises(toolkit.ToolkitError, match="T=500"):
        toolkit.compose(model=tiny_ckpt, steps=2, guidance="classifier", guidance_options={"classifier": str(short)})


def test_cli_guidance(tiny_ckpt, tiny_classifier, tmp_path):
    run = CliRunner().invoke
    out = tmp_path / "g.npy"
    r = run(cli, ["compose", "--model", str(tiny_ckpt), "--guidance", "cfg", "--scale", "3", "--class", "7",
                  "--steps", "3", "-n", "2", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    r = run(cli, ["compose", "--model", str(tiny_ckpt), "--guidance", "classifier", "--classifier",
                  str(tiny_classifier), "--scale", "10", "--class", "all", "--steps", "3", "-n", "10",
                  "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    for args, msg in [(["--guidance", "cfg"], "needs --class"),
                      (["--guidance", "cfg", "--class", "12"], "out of range"),
                      (["--guidance", "cfg", "--scale", "-2", "--class", "1"], "must not be negative"),
                      (["--scale", "2"], "--scale needs --guidance")]:
        r = run(cli, ["compose", "--model", str(tiny_ckpt), "--steps", "2", "-n", "2", "--out", str(out), *args])
        assert r.exit_code == 2 and msg in r.stderr, r.stderr


def test_train_classifier_cli(tmp_path):
    r = CliRunner().invoke(cli, ["train-classifier", "--model-option", "base_channels=8", "--model-option",
                                 "attention_heads=2", "--steps", "2", "--batch-size", "8", "--out",
                                 str(tmp_path / "c")])
    assert r.exit_code == 0, r.stderr
    ckpt = toolkit.load_checkpoint(tmp_path / "c")
    assert ckpt.kind == "classifier" and ckpt.model.num_classes == 10


def test_cfg_is_one_batched_forward(tiny_ckpt):
    model = toolkit.load_checkpoint(tiny_ckpt).model
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        toolkit.create("guidance", "cfg", scale=2.0).wrap(model)(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]),
                                                                torch.tensor([0, 1, 2]))
    finally:
        handle.remove()
    assert calls == [6]  # conditional and null rows together


@pytest.mark.parametrize("guidance", ["cfg", "classifier"])
def test_guided_sample_i_does_not_depend_on_batch(tiny_ckpt, tiny_classifier, guidance):
    opts = {"classifier": str(tiny_classifier)} if guidance == "classifier" else {}
    pipe = toolkit.compose(model=tiny_ckpt, sampler="ddpm", steps=4, guidance=guidance,
                           guidance_options={**opts, "scale": 3.0})
    a = pipe.sample(5, seed=7, labels=[1, 2, 3, 4, 5])
    b = pipe.sample(5, seed=7, labels=[1, 2, 3, 4, 5], batch_size=2)
    assert torch.allclose(a, b, atol=1e-5)


def test_pipeline_ddpm_step_adds_sigma_times_gradient(tiny_ckpt, tiny_classifier):
    """The pipeline's guided ddpm step = the unguided step + Σ·s∇log p(y|x_t), at every step incl. the last."""
    pipe = toolkit.compose(model=tiny_ckpt, sampler="ddpm", steps=3, guidance="classifier",
                           guidance_options={"classifier": str(tiny_classifier), "scale": 5.0})
    y = torch.tensor([3, 6])
    sampler = pipe.sampler_for(y, None)
    x = torch.randn(2, 1, 8, 8)
    eps = torch.randn(2, 1, 8, 8)
    sched = pipe.schedule
    plan = pipe.plan
    assert plan.t.tolist() == [666, 333, 0]
    for i, (t, tp) in enumerate([(666, 333), (333, 0), (0, -1)]):
        tt = torch.full((2,), t)
        grad = pipe.guidance.gradient(x, tt, y, 5.0)
        if tp >= 0:
            a, ap = sched.alphas_cumprod[t], sched.alphas_cumprod[tp]
        else:  # clipped at the last step: β̃ of the step 1 → 0
            a, ap = sched.alphas_cumprod[1], sched.alphas_cumprod[0]
        sigma2 = ((1 - ap) / (1 - a) * (1 - a / ap)).float()
        base, _ = pipe.sampler.step(lambda x_, t_: eps, x, (), torch.tensor(i), plan, None)
        got, _ = sampler.step(lambda x_, t_: eps, x, (), torch.tensor(i), plan, None)
        assert sigma2 > 0 and torch.allclose(got, base + sigma2 * grad, atol=1e-6)


def test_third_party_sampler_with_guidance(tiny_ckpt, tiny_classifier, fresh_registry):
    """A sampler that knows nothing of guidance (no log_variance) gets both guidances in ε-space."""
    from helpers import V1DDIM

    class Plain(V1DDIM):
        """A plugin-API-1 DDIM with x̂_0 clipped, as the built-in ddim does."""

        name, clip = "plain", True

    import types

    mod = types.ModuleType("plain_plugin")
    mod.register_samplers = toolkit.hookimpl(lambda register: register("plain", Plain))
    fresh_registry.register_plugin(mod, "plain", dist="plain-dist")
    for guidance, opts in [("cfg", {}), ("classifier", {"classifier": str(tiny_classifier)})]:
        pipe = toolkit.compose(model=tiny_ckpt, sampler="plain", steps=3, guidance=guidance, guidance_options=opts)
        ddim = toolkit.compose(model=tiny_ckpt, sampler="ddim", steps=3, guidance=guidance, guidance_options=opts)
        assert not pipe.mean_shift
        assert torch.allclose(pipe.sample(2, labels=[1, 2]), ddim.sample(2, labels=[1, 2]), atol=1e-5)


def test_cfg_refuses_model_without_trained_null_label(tmp_path):
    from toolkit.training import TrainConfig, train

    out = tmp_path / "nodrop"
    train(TrainConfig(model_options={"base_channels": 8, "attention_heads": 2}, steps=1, batch_size=8,
                      p_uncond=0.0), out)
    with pytest.raises(toolkit.ToolkitError, match="p-uncond 0"):
        toolkit.compose(model=out, steps=2, guidance="cfg")


def test_classifier_with_another_schedule_is_refused(tiny_ckpt, tmp_path):
    from toolkit.training import TrainConfig, train

    lin = tmp_path / "lin"
    train(TrainConfig(task="classifier", model="unet-encoder", schedule="linear", steps=1, batch_size=8,
                      model_options={"base_channels": 8, "attention_heads": 2}), lin)
    with pytest.raises(toolkit.ToolkitError, match="linear schedule"):
        toolkit.compose(model=tiny_ckpt, steps=2, guidance="classifier", guidance_options={"classifier": str(lin)})


def test_nan_scale_refused():
    with pytest.raises(toolkit.ToolkitError, match="NaN"):
        toolkit.create("guidance", "cfg", scale=float("nan"))


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "unipc", "heun", "euler-a"])
def test_solvers_with_classifier_guidance(tiny_ckpt, tiny_classifier, sampler):
    """The fast solvers take classifier guidance in ε-space (ε̂ = ε − √(1−ᾱ)·s·∇), scale 0 = unguided."""
    opts = {"classifier": str(tiny_classifier)}
    guided = toolkit.compose(model=tiny_ckpt, sampler=sampler, steps=4, guidance="classifier",
                             guidance_options={**opts, "scale": 5.0})
    assert not guided.mean_shift
    x = guided.sample(3, labels=[1, 2, 3])
    plain = toolkit.compose(model=tiny_ckpt, sampler=sampler, steps=4)
    zero = toolkit.compose(model=tiny_ckpt, sampler=sampler, steps=4, guidance="classifier",
                           guidance_options={**opts, "scale": 0.0})
    assert torch.isfinite(x).all() and not torch.allclose(x, zero.sample(3, labels=[1, 2, 3]))
    assert torch.allclose(zero.sample(3, labels=[1, 2, 3]), plain.sample(3), atol=1e-5)


def test_classifier_guidance_uses_the_samplers_alpha_bar_between_integer_times():
    """At fractional t (the solvers' grids) the ε̂ correction uses ᾱ with log-SNR linear in t, the same ᾱ the
    sampler's step uses, not a linear interpolation of ᾱ."""
    import math

    import toolkit
    from toolkit.diffusion import alpha_bar

    g = toolkit.create("guidance", "classifier")
    sched = g._loaded.schedule
    t = torch.tensor([0.0, 10.5, 500.25, 998.9])
    lam = torch.log(sched.alphas_cumprod / (1 - sched.alphas_cumprod)).double()
    lo, frac = t.double().floor().long(), t.double() - t.double().floor()
    want = torch.sigmoid(lam[lo] + frac * (lam[(lo + 1).clamp(max=999)] - lam[lo]))
    assert torch.allclose(g.alpha_bar(t), want, rtol=1e-12)
    assert torch.allclose(g.alpha_bar(t), alpha_bar(sched, t, t, torch.float64).reshape(-1), rtol=1e-12)
    assert not math.isclose(float(g.alpha_bar(t)[3]), float(0.1 * sched.alphas_cumprod[998] + 0.9 * sched.alphas_cumprod[999]), rel_tol=1e-6)
