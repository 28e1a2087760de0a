"""Conformance checks for plugin authors: call them from your own tests (as scikit-learn's check_estimator).

    from toolkit.testing import check_sampler, check_schedule
    def test_my_sampler():
        check_sampler(MySampler())

Each check raises AssertionError naming what is wrong, and returns nothing when the plugin conforms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from toolkit.errors import ToolkitError
from toolkit.protocols import Guidance, NoisePredictor, Sampler, Schedule
from toolkit.registry import missing_attributes


def _require(obj: Any, protocol: type, what: str) -> None:
    missing = missing_attributes(obj, protocol)
    assert not missing, f"{what} does not follow the {protocol.__name__} protocol: missing {', '.join(missing)}"


def check_schedule(schedule: Schedule) -> None:
    """Attributes, float64 [T] arrays, β in (0, 1), ᾱ = Π(1-β) strictly decreasing."""
    name = getattr(schedule, "name", type(schedule).__name__)
    _require(schedule, Schedule, f"schedule {name!r}")
    T = schedule.num_timesteps
    assert isinstance(T, int) and T >= 1, f"schedule {name!r}: num_timesteps must be a positive int, got {T!r}"
    for attr in ("betas", "alphas", "alphas_cumprod"):
        arr = getattr(schedule, attr)
        assert isinstance(arr, Tensor) and arr.dtype == torch.float64, f"schedule {name!r}: {attr} must be float64"
        assert arr.shape == (T,), f"schedule {name!r}: {attr} has shape {tuple(arr.shape)}, expected ({T},)"
        assert torch.isfinite(arr).all(), f"schedule {name!r}: {attr} has NaN or inf"
    b = schedule.betas
    assert bool(((b > 0) & (b < 1)).all()), f"schedule {name!r}: betas must lie in (0, 1)"
    assert torch.allclose(schedule.alphas, 1 - b, rtol=0, atol=1e-12), f"schedule {name!r}: alphas != 1 - betas"
    assert torch.allclose(schedule.alphas_cumprod, torch.cumprod(1 - b, 0), rtol=1e-9, atol=1e-15), \
        f"schedule {name!r}: alphas_cumprod != cumprod(1 - betas)"
    assert bool((schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all()), \
        f"schedule {name!r}: alphas_cumprod must strictly decrease"


def _toy_model(x: Tensor, t: Tensor) -> Tensor:
    scale = (t.to(x.dtype) / 1000).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.5 * x + scale)


def _schedule(num_timesteps: int = 100) -> Schedule:
    from toolkit.registry import create

    return create("schedule", "linear", num_timesteps=num_timesteps)


def check_sampler(sampler: Sampler, schedule: Schedule | None = None, shape: tuple[int, ...] = (1, 4, 4),
                  traceable: bool = True) -> None:
    """Timesteps valid and descending, steps validated, shapes and dtypes kept, no NaN, seeded
    determinism, batch-size invariance, and (``traceable``) a step that torch.export can capture."""
    name = getattr(sampler, "name", type(sampler).__name__)
    _require(sampler, Sampler, f"sampler {name!r}")
    schedule = schedule or _schedule()
    T = schedule.num_timesteps
    for steps in sorted({1, min(5, T), T}):
        ts = sampler.timesteps(schedule, steps)
        assert ts.dtype == torch.long and ts.shape == (steps,), f"sampler {name!r}: timesteps({steps}) must be long [{steps}]"
        assert bool((ts[1:] < ts[:-1]).all()), f"sampler {name!r}: timesteps must strictly descend"
        assert 0 <= int(ts.min()) and int(ts.max()) < T, f"sampler {name!r}: timesteps must lie in 0..{T - 1}"
    for bad in (0, T + 1):
        try:
            sampler.timesteps(schedule, bad)
        except ToolkitError:
            pass
        else:
            raise AssertionError(f"sampler {name!r}: timesteps(steps={bad}) must raise ToolkitError")

    def run(batch: int, seed: int = 0) -> Tensor:
        gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(batch)]

        def draw() -> Tensor:
            return torch.stack([torch.randn(shape, generator=g) for g in gens])

        x_T = draw()
        return sampler.sample(_toy_model, schedule, x_T, steps=min(10, T), noise_fn=lambda i: draw())

    a, b = run(4), run(4)
    assert a.shape == (4, *shape) and a.dtype == torch.float32, f"sampler {name!r}: sample changed shape or dtype"
    assert torch.isfinite(a).all(), f"sampler {name!r}: sample produced NaN or inf"
    assert torch.equal(a, b), f"sampler {name!r}: the same noise must give the same samples"
    assert torch.allclose(run(2), a[:2], atol=1e-5), f"sampler {name!r}: sample i depends on the batch size"

    x = torch.randn(3, *shape)
    t = sampler.timesteps(schedule, min(5, T))
    tt = torch.full((3,), int(t[0]))
    tp = torch.full((3,), int(t[1]) if len(t) > 1 else -1)
    noise = torch.randn(3, *shape)
    out = sampler.step(_toy_model(x, tt), x, tt, tp, schedule, noise)
    assert out.shape == x.shape and out.dtype == x.dtype, f"sampler {name!r}: step changed shape or dtype"
    if traceable:
        check_traceable_step(sampler, schedule, x, tt, tp, noise)


def check_traceable_step(sampler: Sampler, schedule: Schedule, x: Tensor, t: Tensor, t_prev: Tensor,
                         noise: Tensor) -> None:
    """``step`` captured by torch.export (what the ONNX exporter traces) gives the eager result."""
    name = getattr(sampler, "name", type(sampler).__name__)

    class Step(torch.nn.Module):
        def forward(self, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, noise: Tensor) -> Tensor:
            return sampler.step(out, x_t, t, t_prev, schedule, noise)

    args = (_toy_model(x, t), x, t, t_prev, noise)
    try:
        program = torch.export.export(Step(), args, strict=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "not traceable"
        raise AssertionError(f"sampler {name!r}: step is not traceable by torch.export: {exc}") from exc
    assert torch.allclose(program.module()(*args), Step()(*args), atol=1e-6), \
        f"sampler {name!r}: the exported step differs from the eager one"


def check_guidance(guidance: Guidance, predictor: NoisePredictor, labels: Tensor | None = None,
                   t: Tensor | None = None) -> None:
    """wrap() returns a NoisePredictor of the same output shape; per-sample scales; no NaN; scale 0 vs >0."""
    name = getattr(guidance, "name", type(guidance).__name__)
    _require(guidance, Guidance, f"guidance {name!r}")
    B = 3
    x = torch.randn(B, *predictor.sample_shape)
    t = t if t is not None else torch.tensor([10, 400, 900])
    K = predictor.num_classes or getattr(guidance, "num_classes", None) or 2
    y = labels if labels is not None else torch.arange(B) % K
    wrapped = guidance.wrap(predictor, torch.tensor([0.0, 1.0, 4.0]))
    _require(wrapped, NoisePredictor, f"guidance {name!r}: wrap(...)")
    out = wrapped(x, t, y)
    assert torch.isfinite(out).all(), f"guidance {name!r}: guided output has NaN or inf"
    for i, s in enumerate([0.0, 1.0, 4.0]):
        single = guidance.wrap(predictor, s)(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        assert torch.allclose(single, out[i:i + 1], atol=1e-5), \
            f"guidance {name!r}: a per-sample scale must equal that scale alone"
