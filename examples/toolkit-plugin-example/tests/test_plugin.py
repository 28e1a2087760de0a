"""The example plugin's own tests: the toolkit's conformance kit, plus the math of each piece."""

import math

import pytest
import torch

import toolkit
from toolkit.testing import check_sampler, check_schedule
from toolkit_plugin_example import Euler, sigmoid


def test_conformance():
    check_schedule(sigmoid(num_timesteps=200))
    check_sampler(Euler())
    check_sampler(Euler(), schedule=sigmoid(num_timesteps=100))


def test_sigmoid_betas():
    s = sigmoid(num_timesteps=1000)
    for i in (0, 500, 999):
        z = -6 + 12 * i / 999
        expect = 1e-4 + (0.02 - 1e-4) / (1 + math.exp(-z))
        assert abs(s.betas[i].item() - expect) < 1e-12


def test_euler_on_the_pf_ode_is_ddim_eta0():
    """Song et al. note DDIM (η = 0) is Euler on this ODE: whole runs on the same grid must agree."""
    from toolkit.sampling import run_plan

    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    ddim = toolkit.create("sampler", "ddim", eta=0.0, clip_x0=False, spacing="karras")
    euler = Euler()

    def model(x, t):
        return torch.tanh(0.5 * x + t.to(x.dtype) / 1000)

    x_T = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    a = run_plan(euler, model, euler.plan(sched, 12), x_T)
    b = run_plan(ddim, model, ddim.plan(sched, 12), x_T)
    assert torch.allclose(a, b, atol=1e-9)


def test_default_grid_avoids_the_cosine_end():
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    t0 = float(Euler().plan(sched, 25).t[0])
    a = float(toolkit.diffusion.alpha_bar(sched, torch.tensor([t0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)))
    assert t0 < 999 and ((1 - a) / a) ** 0.5 == pytest.approx(80.0, rel=1e-6)


def test_registered_through_the_entry_point():
    assert "euler" in toolkit.available("sampler") and "sigmoid" in toolkit.available("schedule")
    entry = toolkit.registry.get_registry().lookup("sampler", "euler")
    assert entry.dist == "toolkit-plugin-example"


def test_the_task_conforms():
    """The toolkit's loop trains it, resumes it exactly, and its checkpoint loads again."""
    from toolkit.testing import check_task

    check_task("eps-l1", "unet", {"base_channels": 8, "attention_heads": 2})
