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

from toolkit import optional
from toolkit.errors import ToolkitError
from toolkit.noise import NoiseStreams
from toolkit.protocols import Guidance, NoisePredictor, Sampler, Schedule
from toolkit.registry import missing_attributes


def _require(obj: Any, protocol: type, what: str) -> None:
    missing = missing_attributes(obj, protocol)
    assert not missing, f"{what} does not follow the {protocol.__name__} protocol: missing {', '.join(missing)}"


def check_schedule(schedule: Schedule) -> None:
    """Attributes, float64 [T] arrays, β in (0, 1), ᾱ = Π(1-β) strictly decreasing."""
    name = optional.name(schedule)
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
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    scale = (t.to(x.dtype) / 1000).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.5 * x + scale)


def _schedule(num_timesteps: int = 100) -> Schedule:
    from toolkit.registry import create

    return create("schedule", "linear", num_timesteps=num_timesteps)


def valid_steps(sampler: Sampler, schedule: Schedule, wanted: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 40)) -> list[int]:
    """The step counts among ``wanted`` (and T) that the sampler accepts on ``schedule``, whatever its spacing
    or multistep order; a count it refuses must raise ToolkitError."""
    from toolkit.sampling import sampler_plan

    T = schedule.num_timesteps
    ok = []
    for steps in sorted({min(s, T) for s in wanted} | {T}):
        try:
            sampler_plan(sampler, schedule, steps)
        except ToolkitError:
            continue
        ok.append(steps)
    return ok


class _Counted:
    """A model function that counts its calls and checks the times it is called at."""

    def __init__(self, fn, T: int, channels: int | None = None):
        self.fn, self.T, self.calls, self.channels = fn, T, 0, channels

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        tt = t.double()
        assert bool(((tt >= 0) & (tt <= self.T - 1)).all()), f"model called at t={tt.tolist()}, outside 0..{self.T - 1}"
        out = self.fn(x, t)
        if self.channels:  # a learned-variance model: 2C channels, the second half the raw v in [-1, 1]
            out = torch.cat([out, torch.tanh(x[:, : self.channels])], dim=1)
        return out


def _run(sampler, schedule, steps: int, x_T: Tensor, draw, model=_toy_model, channels: int | None = None):
    """The toolkit's loop on ``sampler`` with noise from ``draw`` (per-sample streams), counting network
    calls and the iterations that drew noise."""
    from toolkit.sampling import as_v2, run_plan, stream_noise_fn

    v2 = as_v2(sampler)
    plan = v2.plan(schedule, steps)
    counted = _Counted(model, schedule.num_timesteps, channels)
    draws = []
    stream = stream_noise_fn(draw, plan.draws_per_step)

    def noise_fn(i: int) -> Tensor:
        draws.append(i)
        return stream(i)

    x = run_plan(v2, counted, plan, x_T, noise_fn=noise_fn)
    return x, plan, counted.calls, draws


def check_sampler(sampler: Sampler, schedule: Schedule | None = None, shape: tuple[int, ...] = (1, 4, 4),
                  traceable: bool = True, export: bool = True) -> None:
    """A sampler conforms when: its plan is valid for every step count it accepts (and it refuses 0 and
    T+1); the network calls and noise draws of a run equal what its plan declares; shapes, dtypes and
    seeded determinism hold, sample i does not depend on the batch; a learned-variance (2C-channel)
    model works; a version-1 ``sample`` equals the toolkit's loop; it converges on Gaussian data where ε
    is exact (an identity step fails); and (``export``) its exported ONNX graph, with a dynamic batch,
    equals the torch loop within 1e-4."""
    from toolkit.protocols import SamplerV1
    from toolkit.sampling import as_v2, check_standard_loop, is_v2

    name = optional.name(sampler)
    if not is_v2(sampler):
        _require(sampler, SamplerV1, f"sampler {name!r} (plugin API 1)")
    schedule = schedule or _schedule()
    T = schedule.num_timesteps
    for bad in (0, T + 1):
        try:
            as_v2(sampler).plan(schedule, bad)
        except ToolkitError:
            pass
        else:
            raise AssertionError(f"sampler {name!r}: plan(steps={bad}) must raise ToolkitError")
    steps_ok = valid_steps(sampler, schedule)
    assert steps_ok, f"sampler {name!r}: accepts no number of steps on a {T}-step schedule"
    for steps in steps_ok:
        plan = as_v2(sampler).plan(schedule, steps)
        t = plan.t
        assert t.ndim == 1 and len(plan) >= 1, f"sampler {name!r}: plan({steps}).t must be a non-empty 1-D tensor"
        assert bool(((t >= 0) & (t <= T - 1)).all()), f"sampler {name!r}: plan({steps}) times must lie in 0..{T - 1}"
        assert plan.nfe_per_step >= 1 and plan.draws_per_step >= 0, f"sampler {name!r}: bad plan counts"

    steps = max(s for s in steps_ok if s <= 10) if any(s <= 10 for s in steps_ok) else steps_ok[0]

    def run(batch: int, seed: int = 0, channels: int | None = None):
        streams = NoiseStreams(seed, range(batch), shape)  # sample i's stream depends on (seed, i) alone
        return _run(sampler, schedule, steps, streams.draw(), streams.draw, channels=channels)

    a, plan, calls, draws = run(4)
    assert calls == plan.nfe, f"sampler {name!r}: {calls} network calls, but its plan declares {plan.nfe}"
    want_draws = list(range(len(plan))) if plan.draws_per_step else []
    assert draws == want_draws, f"sampler {name!r}: noise drawn at iterations {draws}, plan declares {want_draws}"
    assert a.shape == (4, *shape) and a.dtype == torch.float32, f"sampler {name!r}: sample changed shape or dtype"
    assert torch.isfinite(a).all(), f"sampler {name!r}: sample produced NaN or inf"
    assert torch.equal(a, run(4)[0]), f"sampler {name!r}: the same noise must give the same samples"
    assert torch.allclose(run(2)[0], a[:2], atol=1e-5), f"sampler {name!r}: sample i depends on the batch size"
    lv = run(4, channels=shape[0])[0]
    assert lv.shape == a.shape and torch.isfinite(lv).all(), \
        f"sampler {name!r}: fails on a learned-variance model (2C output channels)"
    if not is_v2(sampler):
        try:
            check_standard_loop(sampler, schedule, steps, shape)
        except ToolkitError as exc:
            raise AssertionError(f"sampler {name!r}: {exc}") from exc
    check_optional_members(sampler, "sampler", schedule=schedule, steps=steps, shape=shape)
    check_convergence(sampler, shape=shape)
    if export:
        check_exported(sampler, schedule, steps, shape)
    elif traceable:
        check_traceable_step(sampler, schedule, steps, shape)


def gaussian_eps(mu: float, s: float, schedule: Schedule):
    """The exact ε(x_t, t) = σ_t (x_t − α_t μ)/(α_t² s² + σ_t²) for data N(μ, s²) (per element)."""
    from toolkit.diffusion import alpha_bar

    def fn(x: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        a = alpha_bar(schedule, t.double() if t.is_floating_point() else t, x, torch.float64)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        return (sigma * (x.double() - alpha * mu) / (a * s * s + 1 - a)).to(x.dtype)

    return fn


def check_convergence(sampler: Sampler, shape: tuple[int, ...] = (1, 4, 4), mu: float = 0.3, s: float = 0.2) -> None:
    """On data N(μ, s²) with the exact ε: a deterministic sampler's distance to the exact probability-flow
    solution (the standardized value (x − αμ)/√(α²s² + σ²) is constant along it) must fall as steps grow,
    and end small; a stochastic one's samples must have mean μ and std s."""
    from toolkit.diffusion import alpha_bar
    from toolkit.sampling import as_v2

    name = optional.name(sampler)
    schedule = _schedule(1000)
    model = gaussian_eps(mu, s, schedule)
    ok = valid_steps(sampler, schedule, (5, 10, 20, 40, 80))
    assert len(ok) >= 2, f"sampler {name!r}: accepts too few step counts on a 1000-step schedule to test convergence"
    B = 256
    streams = NoiseStreams(90_000, range(B), shape)
    x_T = streams.draw()
    plan = as_v2(sampler).plan(schedule, ok[-1])
    if plan.draws_per_step == 0:
        errors = []
        for steps in (ok[0], ok[-1]):
            x, plan, _, _ = _run(sampler, schedule, steps, x_T, streams.draw, model)
            t0 = plan.t_x[0].reshape(1)
            a = alpha_bar(schedule, t0 if t0.is_floating_point() else t0.long(), x_T, torch.float64)
            exact = mu + s * (x_T.double() - a.sqrt() * mu) / (a * s * s + 1 - a).sqrt()
            errors.append(float((x.double() - exact).abs().mean()))
        assert errors[1] < 0.5 * errors[0] and errors[1] < 0.05 * s, (
            f"sampler {name!r}: does not converge to the probability-flow solution on Gaussian data "
            f"(mean error {errors[0]:.3g} at {ok[0]} steps, {errors[1]:.3g} at {ok[-1]})")
    else:
        x, _, _, _ = _run(sampler, schedule, ok[-1], x_T, streams.draw, model)
        m, sd = float(x.mean()), float(x.std())
        assert abs(m - mu) < 0.05 and abs(sd - s) < 0.25 * s, (
            f"sampler {name!r}: on data N({mu}, {s}²) with the exact ε its samples have mean {m:.3f} and std {sd:.3f}")


class _ToyNet(torch.nn.Module):
    """A tiny exportable predictor (conv + time scale) for the export check."""

    prediction = "epsilon"
    learned_variance = False
    num_classes = None

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.sample_shape = tuple(shape)
        C = shape[0]
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1) if len(shape) == 3 else torch.nn.Linear(C, C)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.tanh(self.conv(x) + t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000)


def check_exported(sampler: Sampler, schedule: Schedule | None = None, steps: int = 5,
                   shape: tuple[int, ...] = (1, 4, 4)) -> None:
    """The sampler's whole run exported to ONNX (dynamic batch, Loop layout) equals the torch loop within
    1e-4: the seed-only graph for the same seed, and the noise-input graph at two batch sizes fed the same
    x_T and noise; the export is refused only with a ToolkitError."""
    import os
    import tempfile

    import numpy as np

    from toolkit.exporters.onnx import export_sampler
    from toolkit.exporters.runtime import SamplerSession
    from toolkit.pipeline import Pipeline
    from toolkit.sampling import as_v2, run_plan

    name = optional.name(sampler)
    schedule = schedule or _schedule()
    net = _ToyNet(shape).eval()
    pipe = Pipeline(schedule=schedule, predictor=net, sampler=sampler, steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        path, seeded = os.path.join(tmp, "sampler.onnx"), os.path.join(tmp, "seeded.onnx")
        try:
            export_sampler(pipe, path, noise="inputs")
            export_sampler(pipe, seeded)
        except ToolkitError as exc:
            raise AssertionError(f"sampler {name!r}: cannot be exported: {exc}") from exc
        got = SamplerSession(seeded, provider="cpu").sample(3, seed=5)  # the graph makes the noise itself
        diff = float(np.abs(got - pipe.sample(3, seed=5).numpy()).max())
        assert diff <= 1e-4, f"sampler {name!r}: the seed-only graph differs from torch by {diff:.3g}"
        session = SamplerSession(path, provider="cpu")
        plan = as_v2(sampler).plan(schedule, steps)
        for batch in (3, 1):
            g = torch.Generator().manual_seed(batch)
            x_T = torch.randn(batch, *shape, generator=g)
            noise = torch.randn(plan.noise_slots, batch, *shape, generator=g)
            D = plan.draws_per_step
            with torch.no_grad():
                want = run_plan(as_v2(sampler), pipe.model_fn(None), plan, x_T,
                                noise_fn=lambda i: noise[i * D:(i + 1) * D]).clamp(-1, 1)
            got = session.run(x_T.numpy(), noise.numpy() if D else None)
            diff = float(np.abs(got - want.numpy()).max())
            assert diff <= 1e-4, f"sampler {name!r}: the exported graph differs from the torch loop by {diff:.3g}"


def check_traceable_step(sampler: Sampler, schedule: Schedule, steps: int = 5, shape: tuple[int, ...] = (1, 4, 4)) -> None:
    """One ``step`` captured by torch.export (what the ONNX exporter traces) gives the eager result."""
    from toolkit.sampling import as_v2

    name = optional.name(sampler)
    v2 = as_v2(sampler)
    plan = v2.plan(schedule, steps).cast(torch.float32)
    x = torch.randn(3, *shape)
    state = [s_ + 0.1 for s_ in v2.init_state(x, plan)]
    noise = torch.randn(max(plan.draws_per_step, 1), 3, *shape) if plan.draws_per_step else None

    class Step(torch.nn.Module):
        def forward(self, x: Tensor, i: Tensor, noise: Tensor | None, state: list[Tensor]):
            out, new = v2.step(_toy_model, x, tuple(state), i, plan, noise)
            return (out, *new)

    args = (x, torch.tensor(min(1, len(plan) - 1)), noise, state)
    try:
        program = torch.export.export(Step(), args, strict=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "not traceable"
        raise AssertionError(f"sampler {name!r}: step is not traceable by torch.export: {exc}") from exc
    for got, want in zip(program.module()(*args), Step()(*args)):
        assert torch.allclose(got, want, atol=1e-6), f"sampler {name!r}: the exported step differs from the eager one"


def check_optional_members(obj: Any, kind: str, *, schedule: Schedule | None = None, steps: int = 5,
                           shape: tuple[int, ...] = (1, 4, 4), predictor: NoisePredictor | None = None) -> None:
    """Each optional protocol (toolkit/protocols.py) that ``obj`` has, it must honour: the types of its
    members, and for methods the shapes of what they return (the core reads them without further checks)."""
    from toolkit import protocols
    from toolkit.sampling import as_v2

    name = optional.name(obj)
    for proto in protocols.OPTIONAL_PROTOCOLS[kind]:
        if not isinstance(obj, proto):
            continue
        where = f"{kind} {name!r} ({proto.__name__})"
        if proto is protocols.HasDefaultSteps:
            v = obj.default_steps
            assert v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), \
                f"{where}: default_steps must be None or an integer >= 1, got {v!r}"
        elif proto in (protocols.ClipsX0, protocols.Stochastic):
            member = "clip_x0" if proto is protocols.ClipsX0 else "stochastic"
            assert isinstance(getattr(obj, member), bool), f"{where}: {member} must be a bool"
        elif proto is protocols.HasLogVariance:
            schedule = schedule or _schedule()
            plan = as_v2(obj).plan(schedule, steps)
            x = torch.randn(2, *shape)
            for out in (torch.randn(2, *shape), torch.randn(2, 2 * shape[0], *shape[1:])):
                try:
                    lv = obj.log_variance(out, x, torch.tensor(0), plan.cast(x.dtype))
                except ToolkitError:
                    continue  # e.g. a learned Σ asked of a model without one: a clear refusal is fine
                assert isinstance(lv, Tensor) and lv.shape == x.shape and bool(torch.isfinite(lv).all()), \
                    f"{where}: log_variance must return finite log Σ of x's shape"
        elif proto is protocols.LabelledGuidance:
            K = obj.num_classes
            assert K is None or (isinstance(K, int) and K >= 1), f"{where}: num_classes must be None or >= 1"
        elif proto is protocols.LatentAware:
            assert obj.latent_fingerprint is None or isinstance(obj.latent_fingerprint, str), \
                f"{where}: latent_fingerprint must be None or a string"
        elif proto is protocols.Invertible:
            check_inversion(obj, schedule or _schedule(), shape)
        elif proto is protocols.FeatureNetwork:
            x = torch.randn(2, *shape)
            f = obj.features(x)
            assert isinstance(f, Tensor) and f.ndim == 2 and f.shape[0] == 2 and bool(torch.isfinite(f).all()), \
                f"{where}: features(x) must return finite [B, D] features"
        elif proto is protocols.GradientGuidance and predictor is not None:
            x = torch.randn(2, *predictor.sample_shape)
            K = optional.guidance_classes(obj) or predictor.num_classes or 2
            g = obj.gradient(x, torch.tensor([10, 500]), torch.arange(2) % K, torch.tensor([1.0, 2.0]))
            assert isinstance(g, Tensor) and g.shape == x.shape and bool(torch.isfinite(g).all()), \
                f"{where}: gradient must return a finite tensor of x_t's shape"


def check_inversion(sampler: Sampler, schedule: Schedule, shape: tuple[int, ...] = (1, 4, 4), steps: int = 50,
                    mu: float = 0.3, s: float = 0.2) -> None:
    """An Invertible sampler run backwards then forwards with the exact ε of data N(μ, s²) gives the data back
    (the ODE's map is a bijection; the error is the solver's), and fewer steps do no better than more."""
    import attrs

    from toolkit.protocols import ClipsX0
    from toolkit.sampling import run_plan

    name = optional.name(sampler)
    if isinstance(sampler, ClipsX0) and attrs.has(type(sampler)):
        sampler = attrs.evolve(sampler, clip_x0=False)
    x0 = mu + s * torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    eps = gaussian_eps(mu, s, schedule)
    errors = []
    for n in (max(2, steps // 5), steps):
        x_T = run_plan(sampler, eps, sampler.inverse_plan(schedule, n), x0)
        back = run_plan(sampler, eps, sampler.plan(schedule, n), x_T)
        errors.append(float((back - x0).abs().mean()))
    assert errors[1] < 0.2 * s, f"sampler {name!r}: inversion then sampling misses the data by {errors[1]:.3g}"
    assert errors[1] < errors[0], f"sampler {name!r}: inversion error does not fall with more steps ({errors})"


def check_guidance(guidance: Guidance, predictor: NoisePredictor, labels: Tensor | None = None,
                   t: Tensor | None = None) -> None:
    """wrap() returns a NoisePredictor of the same output shape; per-sample scales; no NaN; scale 0 vs >0."""
    name = optional.name(guidance)
    _require(guidance, Guidance, f"guidance {name!r}")
    check_optional_members(guidance, "guidance", predictor=predictor)
    B = 3
    x = torch.randn(B, *predictor.sample_shape)
    t = t if t is not None else torch.tensor([10, 400, 900])
    K = predictor.num_classes or optional.guidance_classes(guidance) or 2
    y = labels if labels is not None else torch.arange(B) % K
    wrapped = guidance.wrap(predictor, torch.tensor([0.0, 1.0, 4.0]))
    _require(wrapped, NoisePredictor, f"guidance {name!r}: wrap(...)")
    out = wrapped(x, t, y)
    assert torch.isfinite(out).all(), f"guidance {name!r}: guided output has NaN or inf"
    for i, s in enumerate([0.0, 1.0, 4.0]):
        single = guidance.wrap(predictor, s)(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        assert torch.allclose(single, out[i:i + 1], atol=1e-5), \
            f"guidance {name!r}: a per-sample scale must equal that scale alone"


def check_task(task_name: str, model: str, model_options: dict[str, Any] | None = None, dataset: str = "digits",
               **config: Any) -> None:
    """A training task conforms when the toolkit's loop trains it for a few steps, resumes it to the same
    weights as one run, and its checkpoint loads again through its ``network_kind`` (the recorded options
    build the network and the weights fit it)."""
    import tempfile
    from pathlib import Path

    from toolkit.checkpoint import load_checkpoint, read_tensors
    from toolkit.protocols import Task
    from toolkit.registry import create
    from toolkit.training import TrainConfig, train

    task = create("task", task_name)
    _require(task, Task, f"task {task_name!r}")
    base = dict(task=task_name, dataset=dataset, model=model, model_options=model_options or {}, batch_size=8,
                checkpoint_every=2, **config)
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        train(TrainConfig(**base, steps=4), one)
        train(TrainConfig(**base, steps=2), two)
        train(TrainConfig(**base, steps=4), two, resume=True)
        a, b = read_tensors(one, "model.safetensors"), read_tensors(two, "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
            f"task {task_name!r}: a run resumed at step 2 must end with the weights of one run"
        ckpt = load_checkpoint(one)
        assert ckpt.kind == task_name, f"task {task_name!r}: the checkpoint records kind {ckpt.kind!r}"
        rows = (one / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 2, f"task {task_name!r}: expected a metrics row per checkpoint, got {len(rows)}"
