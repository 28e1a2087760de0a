"""The built-ins pass the conformance kit plugin authors use; the kit catches broken plugins."""

import pytest
import torch

import toolkit
from helpers import HalvedV1, V1DDIM
from toolkit.testing import check_guidance, check_sampler, check_schedule


@pytest.mark.parametrize("name", toolkit.available("schedule"))
def test_builtin_schedules(name):
    check_schedule(toolkit.create("schedule", name, num_timesteps=100))


@pytest.mark.parametrize("name", toolkit.available("sampler"))
def test_builtin_samplers(name):
    check_sampler(toolkit.create("sampler", name))


def test_builtin_guidance(tiny_ckpt, tiny_classifier):
    model = toolkit.load_checkpoint(tiny_ckpt).model
    check_guidance(toolkit.create("guidance", "cfg"), model)
    check_guidance(toolkit.create("guidance", "classifier", classifier=str(tiny_classifier)), model)


def test_kit_catches_broken_plugins():
    sched = toolkit.create("schedule", "linear", num_timesteps=10)
    bad = toolkit.BetaSchedule("bad", sched.betas)
    object.__setattr__(bad, "betas", sched.betas.float())
    with pytest.raises(AssertionError, match="float64"):
        check_schedule(bad)

    ddim = toolkit.create("sampler", "ddim")

    class NoisyStep:
        """Draws its own noise inside step: not deterministic."""

        name = "noisy"

        def plan(self, schedule, steps):
            return ddim.plan(schedule, steps)

        def init_state(self, x_T, plan):
            return ()

        def step(self, model_fn, x, state, i, plan, noise):
            out, _ = ddim.step(model_fn, x, state, i, plan, None)
            return out + 0.01 * torch.randn_like(x), ()

    with pytest.raises(AssertionError, match="same noise"):
        check_sampler(NoisyStep())

    class Identity(NoisyStep):
        """Calls the model but never moves x: must fail the Gaussian convergence check."""

        def step(self, model_fn, x, state, i, plan, noise):
            model_fn(x, plan.t[i])
            return x, ()

    with pytest.raises(AssertionError, match="does not converge"):
        check_sampler(Identity(), export=False)

    class TwoCalls(NoisyStep):
        """Calls the model twice a step but declares one call."""

        def step(self, model_fn, x, state, i, plan, noise):
            model_fn(x, plan.t[i])
            return ddim.step(model_fn, x, state, i, plan, None)

    with pytest.raises(AssertionError, match="network calls"):
        check_sampler(TwoCalls())

    with pytest.raises(AssertionError, match="own sample"):
        check_sampler(HalvedV1())
    check_sampler(V1DDIM())  # plugin API 1 through the adapter, exported too


def test_a_sampler_with_two_draws_per_step_conforms():
    """noise_fn(i) gives D = 2 draws per iteration, and the exported graph reads the same slots in order."""
    import math

    from toolkit.sampling import Plan

    ddpm = toolkit.create("sampler", "ddpm", variance="posterior")

    class TwoDraws:
        """DDPM's step with z = (z₁ + z₂)/√2: still a standard normal, from two draws."""

        name = "two-draws"

        def plan(self, schedule, steps):
            p = ddpm.plan(schedule, steps)
            return Plan(t=p.t, steps=p.steps, tables=p.tables, draws_per_step=2)

        def init_state(self, x_T, plan):
            return ()

        def step(self, model_fn, x, state, i, plan, noise):
            z = (noise[0] + noise[1]) / math.sqrt(2)
            return ddpm.step(model_fn, x, state, i, plan, z[None])

    check_sampler(TwoDraws())
    sched = toolkit.create("schedule", "linear", num_timesteps=100)
    assert TwoDraws().plan(sched, 5).noise_slots == 10


@pytest.mark.parametrize("bad, message", [
    (lambda x: None, "must return (x, state)"),
    (lambda x: (x[:1], ()), "returned x of shape"),
    (lambda x: 1 / 0, "failed in step 0: ZeroDivisionError"),
])
def test_a_misbehaving_plugin_step_is_named(bad, message):
    """A plugin step that returns nothing, the wrong shape, or raises: one clear error naming it."""
    class Bad:
        name = "bad-step"

        def plan(self, schedule, steps):
            return toolkit.create("sampler", "ddim").plan(schedule, steps)

        def init_state(self, x_T, plan):
            return ()

        def step(self, model_fn, x, state, i, plan, noise):
            return bad(x)

    pipe = toolkit.Pipeline(schedule=toolkit.create("schedule", "cosine", num_timesteps=1000),
                            predictor=toolkit.load_checkpoint("digits").model, sampler=Bad(), steps=3)
    with pytest.raises(toolkit.ToolkitError, match=r"sampler 'bad-step'.*" + message.replace("(", r"\(").replace(")", r"\)")):
        pipe.sample(2)


def test_optional_members_are_named_protocols_the_kit_checks():
    """What the core reads beyond the four protocols is a named protocol (isinstance), and the kit checks it."""
    import attrs

    from toolkit import protocols
    from toolkit.testing import check_optional_members

    ddpm, ddim = toolkit.create("sampler", "ddpm"), toolkit.create("sampler", "ddim")
    assert isinstance(ddpm, protocols.HasLogVariance) and not isinstance(ddim, protocols.HasLogVariance)
    assert isinstance(ddim, protocols.HasDefaultSteps) and isinstance(ddim, protocols.ClipsX0)
    classifier = toolkit.create("guidance", "classifier")
    assert isinstance(classifier, protocols.GradientGuidance) and isinstance(classifier, protocols.LatentAware)
    assert not isinstance(toolkit.create("guidance", "cfg"), protocols.GradientGuidance)

    with pytest.raises(AssertionError, match="default_steps must be None or an integer >= 1"):
        check_optional_members(attrs.evolve(ddim, default_steps=0), "sampler")

    class WrongSigma:
        name = "wrong-sigma"

        def __init__(self):
            self.inner = toolkit.create("sampler", "ddpm")

        def plan(self, schedule, steps):
            return self.inner.plan(schedule, steps)

        def init_state(self, x_T, plan):
            return ()

        def step(self, model_fn, x, state, i, plan, noise):
            return self.inner.step(model_fn, x, state, i, plan, noise)

        def log_variance(self, out, x, i, plan):
            return torch.zeros(x.shape[0])  # one number per sample: not log Σ of x's shape

    with pytest.raises(AssertionError, match="log_variance must return finite log Σ of x's shape"):
        check_optional_members(WrongSigma(), "sampler")

    class Labelled:
        name, num_classes, latent_fingerprint = "labelled", "ten", None

    with pytest.raises(AssertionError, match="num_classes must be None or >= 1"):
        check_optional_members(Labelled(), "guidance")


@pytest.mark.parametrize("task, model, options", [
    ("noise_predictor", "unet", {"base_channels": 8, "attention_heads": 2}),
    ("classifier", "unet-encoder", {"base_channels": 8, "attention_heads": 2}),
    ("features", "cnn", {}),
    ("autoencoder", "autoencoder", {"base_channels": 8}),
])
def test_builtin_tasks(task, model, options):
    from toolkit.testing import check_task

    check_task(task, model, options)
