"""The example plugin's own tests: the toolkit's conformance kit, plus the math of each piece."""

import math

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
    """Song et al. note DDIM (η = 0) is Euler on this ODE: both must agree."""
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    ddim = toolkit.create("sampler", "ddim", eta=0.0, clip_x0=False, spacing="trailing")
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t, tp = torch.tensor([800, 800]), torch.tensor([600, 600])
    assert torch.allclose(Euler().step(eps, x, t, tp, sched, None), ddim.step(eps, x, t, tp, sched, None), atol=1e-9)


def test_registered_through_the_entry_point():
    assert "euler" in toolkit.available("sampler") and "sigmoid" in toolkit.available("schedule")
    entry = toolkit.registry.get_registry().lookup("sampler", "euler")
    assert entry.dist == "toolkit-plugin-example"
