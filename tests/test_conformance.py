"""The built-ins pass the conformance kit plugin authors use; the kit catches broken plugins."""

import pytest
import torch

import toolkit
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

    class NoisyStep:
        """Draws its own noise inside step: not deterministic."""

        name, stochastic = "noisy", True
        base = toolkit.create("sampler", "ddpm")

        def timesteps(self, schedule, steps):
            return self.base.timesteps(schedule, steps)

        def step(self, out, x_t, t, t_prev, schedule, noise):
            return self.base.step(out, x_t, t, t_prev, schedule, torch.randn_like(x_t))

        def sample(self, model_fn, schedule, x_T, *, steps, noise_fn, progress=None):
            from toolkit.sampling import sample_loop

            return sample_loop(self, model_fn, schedule, x_T, steps=steps, noise_fn=noise_fn)

    with pytest.raises(AssertionError, match="same noise"):
        check_sampler(NoisyStep())

    class Ascending(NoisyStep):
        def timesteps(self, schedule, steps):
            return self.base.timesteps(schedule, steps).flip(0)

    with pytest.raises(AssertionError, match="descend"):
        check_sampler(Ascending())
