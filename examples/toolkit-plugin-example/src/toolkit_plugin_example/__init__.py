"""Example toolkit plugin: the `euler` sampler, the `sigmoid` schedule, the `eps-l1` training task and the
`toolkit euler-grid` command, through the public API only."""

from __future__ import annotations

import math

import torch
from attrs import define, field
from torch import Tensor

import toolkit
from toolkit import ToolkitError, hookimpl, schedule_from_betas
from toolkit.sampling import Plan, check_steps, grid, spacing_field, split_output

# Refuse to load into a toolkit older than the plugin API this plugin was written for.
if toolkit.PLUGIN_API_VERSION < 2:
    raise ImportError(f"toolkit-plugin-example needs toolkit plugin API 2, found {toolkit.PLUGIN_API_VERSION}")


def sigmoid(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
            start: float = -6.0, end: float = 6.0) -> toolkit.Schedule:
    """β_t = β_start + (β_end − β_start)·sigmoid(linspace(start, end, T)) (the GeoDiff sigmoid schedule)."""
    if num_timesteps < 1:
        raise ToolkitError(f"num_timesteps must be positive, got {num_timesteps}")
    s = torch.sigmoid(torch.linspace(start, end, num_timesteps, dtype=torch.float64))
    return schedule_from_betas("sigmoid", beta_start + (beta_end - beta_start) * s)


@define(frozen=True)
class Euler:
    """Euler steps on the probability-flow ODE dx̃/dσ̃ = ε(x, σ̃) in the variables x̃ = x/√ᾱ,
    σ̃ = √((1-ᾱ)/ᾱ) (Karras et al. 2022, eq. 3 with the variance-preserving scaling); deterministic.

    The default grid is Karras et al.'s (ρ = 7, from σ̃ = 80): a grid that starts at t = T-1 of a cosine
    schedule (σ̃ = 2·10⁴ there) multiplies every error of ε by 2·10⁴ in the first step.
    """

    spacing: str = spacing_field("karras")  # a named spacing, or listed times (a tuned grid)
    default_steps: int = 25
    name: str = field(default="euler", init=False)

    def plan(self, schedule: toolkit.Schedule, steps: int) -> Plan:
        """Per step: the model time, and x_{k+1} = (α_{k+1}/α_k)·x + α_{k+1}(σ̃_{k+1} − σ̃_k)·ε."""
        g = grid(schedule, check_steps(schedule, steps), self.spacing)  # times, with α, σ at each (and the end)
        st = g.sigma / g.alpha
        return Plan(t=g.model_t[:-1], t_x=g.t[:-1], steps=g.steps, tables={
            "c_x": g.alpha[1:] / g.alpha[:-1], "c_e": g.alpha[1:] * (st[1:] - st[:-1])})

    def init_state(self, x_T: Tensor, plan: Plan) -> tuple[Tensor, ...]:
        return ()  # a one-step method carries nothing between steps

    def step(self, model_fn, x: Tensor, state: tuple, i: Tensor, plan: Plan, noise: Tensor | None):
        eps, _ = split_output(model_fn(x, plan.t[i]), x)  # drops a learned-variance model's extra channels
        return plan["c_x"][i] * x + plan["c_e"][i] * eps, ()


@hookimpl
def register_samplers(register):
    register("euler", Euler, aliases=("euler-ode",))


@hookimpl
def register_schedules(register):
    register("sigmoid", sigmoid)


@define(frozen=True)
class L1NoiseTask:
    """A training task: ε-prediction with the L1 loss E|ε − ε_θ(x_t, t, y)| instead of L_simple's squares
    (`toolkit train --task eps-l1`). The toolkit's loop does everything else (EMA, checkpoints, resume...);
    the checkpoint samples like any noise predictor's."""

    name: str = field(default="eps-l1", init=False)
    network_kind: str = field(default="model", init=False)  # its checkpoints are built again as a "model"
    samples: bool = field(default=True, init=False)

    def build(self, config, data):
        conditional = data.y is not None and config.conditional is not False
        return toolkit.create("model", config.model, **{**config.model_options, "sample_shape": data.sample_shape,
                                                       "num_classes": data.num_classes if conditional else None})

    def extra_noise(self, model, n, generator):
        return {}

    def loss(self, net, schedule, batch):
        shape = (-1, *[1] * (batch.x0.ndim - 1))
        a = schedule.alphas_cumprod.to(batch.x0.device)[batch.t].to(batch.x0.dtype).reshape(shape)
        x_t = a.sqrt() * batch.x0 + (1 - a).sqrt() * batch.noise  # q(x_t | x_0), Ho et al. eq. 4
        y = batch.y
        if y is not None:  # the null label ∅ with probability p_uncond, for classifier-free guidance
            y = torch.where(batch.drop, torch.full_like(y, batch.null_label), y)
        return (net(x_t, batch.t, y)[:, : batch.x0.shape[1]] - batch.noise).abs().mean()

    def model_options(self, model, config, data):
        return {**config.model_options, "sample_shape": list(data.sample_shape), "num_classes": model.num_classes}

    def scores(self, model, schedule, x, y):
        return {}

    def summary(self, model, x):
        return {}


@hookimpl
def register_tasks(register):
    register("eps-l1", L1NoiseTask)


@hookimpl
def register_commands(cli):
    """`toolkit euler-grid`: a command of this plugin, added through the same hook system as the sampler."""
    import click

    @cli.command("euler-grid")
    @click.option("--steps", default=Euler.default_steps, show_default=True, type=click.IntRange(min=1))
    @click.option("--model", default=None, help="Checkpoint or shipped name (default: digits).")
    def euler_grid(steps: int, model: str | None) -> None:
        """Print the times and noise levels σ̃ at which the euler sampler calls the model."""
        pipe = toolkit.compose(model=model, sampler="euler", steps=steps)
        plan = pipe.plan
        a = pipe.schedule.alphas_cumprod.double()
        for i, t in enumerate(plan.t.tolist()):
            lo = min(int(t), len(a) - 2)
            frac = t - lo  # log-SNR linear in t between the schedule's integer times, as the toolkit samples
            lam = (1 - frac) * torch.log(a[lo] / (1 - a[lo])) + frac * torch.log(a[lo + 1] / (1 - a[lo + 1]))
            click.echo(f"{i:>3}  t = {t:9.3f}  sigma = {math.exp(-float(lam) / 2):10.4f}")


__all__ = ["Euler", "L1NoiseTask", "sigmoid"]
