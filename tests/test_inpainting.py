"""Inpainting (RePaint): the schedule of resampling jumps, one run against the paper's update written out here,
the wrapped solver's state restored at each jump, the exported graph against torch, the CLI and bad input."""

import numpy as np
import pytest
import torch

import toolkit
from helpers import one_line_error, run
from toolkit import inpainting
from toolkit.noise import NoiseStreams
from toolkit.sampling import Plan, run_plan, stream_noise_fn


@pytest.fixture(scope="module")
def digits():
    data = toolkit.create("dataset", "digits")
    return data.x[:12], data.y[:12]


def test_repaint_schedule_runs_each_block_r_times_and_the_last_step_once():
    rows = inpainting.repaint_rows(7, resample=2, jump=3)
    order = [k for k, *_ in rows]
    assert order == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5, 6]
    assert [k for k, _, jump, _ in rows if jump] == [2, 5]  # jump back after each block's first run
    assert {back for k, _, jump, back in rows if jump} == {0, 3}
    assert inpainting.repaint_rows(7, resample=1, jump=3) == [(k, k in (0, 3), False, 3 * (k // 3) if k < 6 else 6)
                                                              for k in range(7)]


def _ddim_repaint_by_hand(model, a, x_T, image, keep, streams, resample, jump):
    """RePaint over a DDIM (η = 0, no clipping) run written out from the paper: after every step the kept region
    is √ᾱ' x_0 + √(1-ᾱ') z; at the end of each block's runs but the last, x ← √(ᾱ_b/ᾱ') x + √(1-ᾱ_b/ᾱ') z."""
    ts = [i * len(a) // 6 for i in range(6)][::-1]  # DDIM's uniform τ: 6 steps on T
    a_of = lambda t: 1.0 if t < 0 else float(a[t])  # noqa: E731
    nxt = ts[1:] + [-1]
    x = x_T
    body = len(ts) - 1
    for start in range(0, body, jump):
        block = list(range(start, min(start + jump, body)))
        for rep in range(resample):
            for k in block:
                t, tp = ts[k], nxt[k]
                eps = model(x, torch.full((x.shape[0],), float(t)))
                x0 = (x - (1 - a_of(t)) ** 0.5 * eps) / a_of(t) ** 0.5
                x = a_of(tp) ** 0.5 * x0 + (1 - a_of(tp)) ** 0.5 * eps
                z_known, z_back = streams.draw(), streams.draw()
                x = keep * (a_of(tp) ** 0.5 * image + (1 - a_of(tp)) ** 0.5 * z_known) + (1 - keep) * x
                if k == block[-1] and rep < resample - 1:
                    r = a_of(ts[block[0]]) / a_of(tp)
                    x = r ** 0.5 * x + (1 - r) ** 0.5 * z_back
    t = ts[-1]
    eps = model(x, torch.full((x.shape[0],), float(t)))
    x0 = (x - (1 - a_of(t)) ** 0.5 * eps) / a_of(t) ** 0.5
    streams.draw(), streams.draw()
    return keep * image + (1 - keep) * x0


def test_one_run_equals_the_repaint_update_written_out():
    schedule = toolkit.create("schedule", "linear", num_timesteps=60)
    a = schedule.alphas_cumprod.double()
    shape = (1, 4, 4)

    def model(x, t):
        return torch.tanh(0.3 * x + t.to(x.dtype).reshape(-1, 1, 1, 1) / 60)

    image = torch.rand(3, *shape, dtype=torch.float64) * 2 - 1
    fill = torch.zeros(3, *shape, dtype=torch.float64)
    fill[..., 2:, :] = 1
    wrapper = inpainting.Inpaint(toolkit.create("sampler", "ddim", clip_x0=False), resample=3, jump=2)
    plan = wrapper.plan(schedule, 6)
    streams = NoiseStreams(5, range(3), shape, dtype=torch.float64)
    x_T = streams.draw()
    ours = run_plan(wrapper.bind(image, fill), model, plan, x_T, noise_fn=stream_noise_fn(streams.draw, 2))
    streams = NoiseStreams(5, range(3), shape, dtype=torch.float64)
    want = _ddim_repaint_by_hand(model, a, streams.draw(), image, 1 - fill, streams, 3, 2)
    assert len(plan) == 3 * 5 + 1 and plan.nfe == 16
    assert torch.allclose(ours, want, atol=1e-10), (ours - want).abs().max()
    assert torch.equal(ours * (1 - fill), image * (1 - fill))  # the kept region is the image, exactly


class Counter:
    """A v2 sampler whose x after a step is the number of steps on the path taken (its state): after a jump back
    the wrapper must restore the state, so the final x counts each of the base plan's iterations once."""

    name = "counter"

    def plan(self, schedule, steps):
        n = steps
        return Plan(t=np.zeros(n), steps=n, tables={"t_next": np.zeros(n)})  # one noise level: the jumps keep x

    def init_state(self, x_T, plan):
        return (torch.zeros_like(x_T),)

    def step(self, model_fn, x, state, i, plan, noise):
        return state[0] + 1, (state[0] + 1,)


def test_the_wrapped_solver_state_is_restored_at_each_jump():
    schedule = toolkit.create("schedule", "linear", num_timesteps=50)
    wrapper = inpainting.Inpaint(Counter(), resample=4, jump=3)
    plan = wrapper.plan(schedule, 10)
    assert len(plan) == 4 * 9 + 1
    x_T = torch.zeros(2, 1, 2, 2)
    out = run_plan(wrapper.bind(torch.zeros_like(x_T), torch.ones_like(x_T)), lambda x, t: x, plan, x_T,
                   noise_fn=lambda i: torch.randn(2, *x_T.shape))
    assert torch.equal(out, torch.full_like(x_T, 10.0))  # not 37: the repeated runs start from the saved state


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "heun"])
def test_filling_everything_without_resampling_is_the_plain_sampler(name):
    """mask = 1 everywhere and resample = 1: the wrapper changes nothing (multistep and staged states pass through)."""
    pipe = toolkit.compose(sampler=name, steps=8)
    x_T = NoiseStreams(0, range(4), pipe.sample_shape).draw()
    plain = pipe.sample(4, noise=x_T)
    ones = torch.ones(4, *pipe.sample_shape)
    filled = pipe.inpaint(torch.zeros(4, *pipe.sample_shape), ones, resample=1)
    assert torch.allclose(filled, plain, atol=1e-5), (filled - plain).abs().max()


def test_resampling_makes_completions_of_the_right_class(digits):
    """The lower half filled from the upper half (unconditional): RePaint's resampling harmonizes better than
    plain replacement, judged by the shipped feature network (the benchmark reports it on 200 digits)."""
    from toolkit.evaluate import feature_space

    x0, y = digits
    space = feature_space(None, "digits", x0.shape[1:])
    pipe = toolkit.compose(sampler="ddim", steps=20)
    mask = inpainting.named_mask("lower-half", tuple(x0.shape[1:]))
    out = pipe.inpaint(x0, mask, resample=5, jump=5)
    assert torch.equal(out[..., :4, :], x0[..., :4, :]) and (out[..., 4:, :] - x0[..., 4:, :]).abs().mean() > 0.05
    labelled = pipe.inpaint(x0, mask, labels=y, resample=2, jump=5)
    assert float((space.probs(labelled).argmax(1) == y).float().mean()) >= 0.9


def test_masks_by_name_and_checks():
    shape = (1, 8, 8)
    lower = inpainting.named_mask("lower-half", shape)
    assert lower[0, 4:].eq(1).all() and lower[0, :4].eq(0).all()
    assert inpainting.named_mask("center", shape)[0].sum() == 16
    assert inpainting.check_mask(lower[0], shape, 3).shape == (3, 1, 8, 8)
    with pytest.raises(toolkit.ToolkitError, match="binary"):
        inpainting.check_mask(torch.full((8, 8), 0.5), shape, 1)
    with pytest.raises(toolkit.ToolkitError, match="mask must have shape"):
        inpainting.check_mask(torch.ones(7, 8), shape, 1)
    with pytest.raises(toolkit.ToolkitError, match="unknown mask"):
        inpainting.named_mask("middle", shape)
    pipe = toolkit.compose(sampler="ddim", steps=5)
    with pytest.raises(toolkit.ToolkitError, match=r"\[-1, 1\]"):
        pipe.inpaint(torch.full((1, 1, 8, 8), 3.0), lower)
    with pytest.raises(toolkit.ToolkitError, match="resample must be a positive integer"):
        pipe.inpaint(torch.zeros(1, 1, 8, 8), lower, resample=0)


def test_a_solver_that_rebuilds_x_from_its_history_is_refused():
    pipe = toolkit.compose(sampler="unipc", steps=5)
    with pytest.raises(toolkit.ToolkitError, match="rebuilds x from its own history"):
        pipe.inpaint(torch.zeros(1, 1, 8, 8), torch.ones(8, 8))


def test_heun_needs_an_even_jump_so_every_block_starts_at_a_step():
    """Heun's plan has two iterations per step (Euler stage, correction): a block of 3 would start at a
    correction, pairing the saved Euler stage with a re-noised x. Resample 1 never jumps, so any jump is fine."""
    pipe = toolkit.compose(sampler="heun", steps=5)
    with pytest.raises(toolkit.ToolkitError, match="--jump must be a multiple of 2"):
        pipe.inpaint(torch.zeros(1, 1, 8, 8), torch.ones(8, 8), resample=2, jump=3)
    assert pipe.inpaint(torch.zeros(1, 1, 8, 8), torch.ones(8, 8), resample=1, jump=3).shape == (1, 1, 8, 8)
    assert pipe.inpaint(torch.zeros(1, 1, 8, 8), torch.ones(8, 8), resample=2, jump=4).isfinite().all()


def test_plugin_api_1_is_refused():
    from helpers import V1DDIM

    pipe = toolkit.compose(sampler=V1DDIM(), steps=5)
    with pytest.raises(toolkit.ToolkitError, match="plugin API 1"):
        pipe.inpaint(torch.zeros(1, 1, 8, 8), torch.ones(8, 8))


def test_latent_pipeline_inpaints_and_keeps_the_known_pixels(digits):
    x0, _ = digits
    pipe = toolkit.compose(model="latent-digits", sampler="ddim", steps=10)
    mask = inpainting.named_mask("right-half", tuple(x0.shape[1:]))
    out = pipe.inpaint(x0[:4], mask, resample=2, jump=3)
    assert out.shape == x0[:4].shape and torch.equal(out[..., :4], x0[:4, ..., :4])


def test_exported_inpainting_graph_equals_torch(tmp_path, digits):
    pytest.importorskip("onnxruntime")
    from toolkit.exporters.onnx import export_sampler
    from toolkit.exporters.runtime import GraphError, SamplerSession

    x0, y = digits
    pipe = toolkit.compose(sampler="dpmpp-2m", steps=6)
    mask = inpainting.named_mask("lower-half", tuple(x0.shape[1:]))
    path = export_sampler(pipe, tmp_path / "inpaint.onnx", task="inpaint", resample=2, jump=2)
    session = SamplerSession(path)
    assert session.inpaints and session.metadata["task"] == "inpaint"
    assert session.metadata["inpaint"]["resample"] == 2 and session.metadata["iterations"] == 2 * 5 + 1
    got = session.sample(len(x0), seed=4, labels=y.numpy(), image=x0.numpy(), mask=mask.numpy())
    want = pipe.inpaint(x0, mask, seed=4, labels=y, resample=2, jump=2)
    assert np.abs(got - want.numpy()).max() <= 1e-4
    with pytest.raises(GraphError, match="binary"):
        session.sample(2, image=x0[:2].numpy(), mask=np.full((8, 8), 0.5, np.float32), labels=y[:2].numpy())
    with pytest.raises(GraphError, match="give image"):
        session.sample(2, labels=y[:2].numpy())
    raw = {"seed": np.array(0), "index": np.arange(2), "labels": y[:2].numpy(), "image": x0[:2].numpy(),
           "mask": np.full((2, 1, 8, 8), 0.5, np.float32)}
    with pytest.raises(Exception, match="mask must be binary"):  # the graph checks its inputs itself
        session.session.run(["x0"], raw)


def test_cli_inpaint_export_and_onnx_agree(tmp_path, digits):
    x0, _ = digits
    np.save(tmp_path / "d.npy", x0[:6].numpy())
    r = run("compose", "--init", tmp_path / "d.npy", "--mask", "lower-half", "--steps", 8, "--resample", 2,
            "--jump", 3, "--out", tmp_path / "torch.npy", "-q")
    assert r.exit_code == 0, r.output
    assert "resample 2 × jump 3" in r.output
    r = run("export", "onnx", "--task", "inpaint", "--steps", 8, "--resample", 2, "--jump", 3,
            "--out", tmp_path / "i.onnx")
    assert r.exit_code == 0, r.output
    r = run("compose", "--onnx", tmp_path / "i.onnx", "--init", tmp_path / "d.npy", "--mask", "lower-half",
            "--out", tmp_path / "onnx.npy")
    assert r.exit_code == 0, r.output
    a, b = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "onnx.npy")
    assert a.shape == (6, 1, 8, 8) and np.abs(a - b).max() <= 1e-4
    assert np.array_equal(a[..., :4, :], x0[:6, ..., :4, :].numpy())


def test_cli_bad_inpainting_input(tmp_path, digits):
    x0, _ = digits
    np.save(tmp_path / "d.npy", x0[:2].numpy())
    np.save(tmp_path / "half.npy", np.full((8, 8), 0.5, np.float32))
    np.save(tmp_path / "wide.npy", np.ones((8, 9), np.float32))
    out = tmp_path / "o.npy"
    cases = [
        (("--mask", tmp_path / "half.npy"), "binary"),
        (("--mask", tmp_path / "wide.npy"), "mask must have shape"),
        (("--mask", "middle"), "--mask must be one of"),
        (("--mask", "lower-half", "--strength", "0.5"), "drop --strength"),
        (("--mask", "lower-half", "--resample", "0"), "resample must be a positive integer"),
        (("--mask", "lower-half", "--sampler", "heun", "--jump", "3"), "--jump must be a multiple of 2"),
    ]
    for extra, pattern in cases:
        one_line_error(run("compose", "--init", tmp_path / "d.npy", *extra, "--steps", 4, "--out", out), pattern)
        assert not out.exists()
    one_line_error(run("compose", "--mask", "lower-half", "--out", out), "--mask needs --init")
    one_line_error(run("compose", "--resample", 3, "--out", out), "options of inpainting")
    one_line_error(run("export", "onnx", "--resample", 2, "--out", tmp_path / "x.onnx"), "options of task 'inpaint'")
    one_line_error(run("export", "onnx", "--task", "inpaint", "--model", "latent-digits", "--out", tmp_path / "x.onnx"),
                   "pixel-space models only")
    assert not (tmp_path / "x.onnx").exists()
