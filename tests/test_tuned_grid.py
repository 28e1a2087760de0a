"""Listed spacings (a sampler's times given one by one, "t@s" telling the network time s) and the grid
tuned to a model (toolkit.tuned_grid, `toolkit tune-grid`)."""

import json

import numpy as np
import pytest
import torch

import toolkit
from helpers import one_line_error, run as cli
from toolkit.errors import ToolkitError
from toolkit.evaluate import ode_reference, split_samplers
from toolkit.noise import NoiseStreams
from toolkit.sampling import as_v2, grid, listed_grid, run_plan, time_grid
from toolkit.tuned_grid import tune_grid

COSINE = toolkit.create("schedule", "cosine")


def toy_model(x, t):
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    return torch.tanh(0.7 * x + 0.001 * t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))))


def run(sampler, model=toy_model, steps=None, seed=0):
    s = as_v2(sampler)
    plan = s.plan(COSINE, steps)
    x_T = torch.randn((4, 1, 4, 4), generator=torch.Generator().manual_seed(seed))
    return run_plan(s, model, plan, x_T)


@pytest.mark.parametrize("name,spacing,steps", [("ddim", "trailing", 5), ("unipc", "trailing", 5),
                                                ("dpmpp-2m", "logsnr", 6), ("heun", "karras", 4)])
def test_a_listed_spacing_runs_exactly_its_named_twin(name, spacing, steps):
    """The times of a named spacing, listed, give the same run (to float32 rounding of the printed times)."""
    times = time_grid(COSINE, steps, spacing)
    listed = ",".join(repr(float(t)) for t in times)
    a = run(toolkit.create("sampler", name, spacing=spacing), steps=steps)
    b = run(toolkit.create("sampler", name, spacing=listed), steps=steps)
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_shifted_network_times_change_only_what_the_network_is_told():
    """"t@s": the network is called at s, every coefficient still comes from the step time t (Ho et al. eq. 4
    with ᾱ_t: x̂_0 = (x - √(1-ᾱ_t) ε)/√ᾱ_t, then DDIM eq. 12 to the next step time)."""
    a = COSINE.alphas_cumprod.double()
    told = []

    def model(x, t):
        told.append(float(t))
        return torch.full_like(x, 0.3)

    sampler = toolkit.create("sampler", "ddim", spacing="800@780.5,400,100@120", clip_x0=False)
    plan = as_v2(sampler).plan(COSINE, 3)
    assert plan.t.tolist() == [780.5, 400.0, 120.0]
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    out = run_plan(as_v2(sampler), model, plan, x)
    assert told == [780.5, 400.0, 120.0]
    expect = 0.5
    for t, t_prev in ((800, 400), (400, 100), (100, None)):
        x0 = (expect - (1 - a[t]).sqrt() * 0.3) / a[t].sqrt()
        a_prev = a[t_prev] if t_prev is not None else torch.tensor(1.0, dtype=torch.float64)
        expect = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * 0.3
    assert torch.allclose(out, torch.full_like(out, float(expect)), atol=1e-10)
    g = grid(COSINE, 3, "800@780.5,400,100@120")
    assert g.t.tolist() == [800, 400, 100, -1] and g.model_t.tolist() == [780.5, 400, 120, -1]


def test_listed_spacing_options_and_steps():
    assert toolkit.create("sampler", "unipc", spacing=[999, 500.5, 20]).spacing == "999,500.5,20"
    assert toolkit.create("sampler", "ddim", spacing=500).spacing == "500"  # one number from KEY=VALUE parsing
    times, told = listed_grid("999@990,500.5,20@25")
    assert times.tolist() == [999, 500.5, 20] and told.tolist() == [990, 500.5, 25]
    assert listed_grid("trailing") is None
    pipe = toolkit.compose(sampler="unipc", spacing="999,600,300,100")  # no --steps: the list's length
    assert pipe.steps == 4 and pipe.nfe == 4


@pytest.mark.parametrize("spacing,steps,pattern", [
    ("999,999,3", 3, "strictly"), ("5,-1", 2, ">= 0"), ("abc", 3, "spacing must be one of"),
    ("1000,3,1", 3, "within [0, 999]"), ("999,3@1200,1", 3, "within [0, 999]"), ("999,500", 3, "lists 2 times but 3 steps"),
    ("999,nan,1", 3, ">= 0"),
])
def test_bad_listed_spacing_is_refused(spacing, steps, pattern):
    with pytest.raises(ToolkitError, match=pattern.replace("[", r"\[")):
        toolkit.create("sampler", "unipc", spacing=spacing, order=1).plan(COSINE, steps)


def test_bad_listed_spacing_from_the_cli_is_one_line(tmp_path):
    one_line_error(cli("compose", "--sampler", "unipc", "--spacing", "999,500", "--steps", 3, "-n", 2,
                       "--out", tmp_path / "x.png"), "lists 2 times but 3 steps")
    assert not (tmp_path / "x.png").exists()
    one_line_error(cli("tune-grid", "--sampler", "ddim", "--eta", 1, "--steps", 3, "-n", 2), "deterministic")
    one_line_error(cli("tune-grid", "--sampler", "ddpm", "--steps", 3, "-n", 2), "deterministic")
    one_line_error(cli("tune-grid", "--steps", 3, "-n", 2, "--out", tmp_path / "g.txt"), "--out must be a .json")


def test_evaluate_keeps_listed_times_with_their_sampler():
    assert split_samplers("ddim, unipc:spacing=999,600.5@590,100,dpmpp-2m:order=1") == [
        "ddim", "unipc:spacing=999,600.5@590,100", "dpmpp-2m:order=1"]


@pytest.fixture(scope="module")
def tuned():
    return tune_grid(None, "unipc", 4, spacing="trailing", n=24, seed=1000, sweeps=2, reference_nfe=60)


def test_tuning_brings_the_sampler_closer_to_the_ode_solution(tuned):
    """The tuned grid's reported error is what its spacing gives, and it beats the grid it started from,
    also on draws of x_T it was not tuned on."""
    pipe = toolkit.compose(sampler="unipc", spacing=tuned.spacing)
    assert pipe.steps == 4 and tuned.start_spacing == "999,749,499,249"
    assert tuned.error < 0.8 * tuned.start_error

    def error(spacing, seed, n):
        p = toolkit.compose(sampler="unipc", spacing=spacing)
        labels = torch.arange(n) % 10
        x_T = NoiseStreams(seed, range(n), p.sample_shape).draw()
        s = as_v2(p.sampler)
        x = run_plan(s, p.model_fn(labels), s.plan(p.schedule, 4), x_T)
        ref = ode_reference(p, x_T, labels, 999.0, True, 60)
        return float((x - ref).reshape(n, -1).pow(2).mean(1).sqrt().mean())

    assert error(tuned.spacing, 1000, 24) == pytest.approx(tuned.error, rel=1e-5)
    assert error(tuned.spacing, 7, 24) < 0.9 * error(tuned.start_spacing, 7, 24)
    times, told = listed_grid(tuned.spacing)
    assert times[0] == 999 and np.all(np.diff(times) < 0)


def test_tune_grid_from_the_cli(tmp_path):
    out = tmp_path / "grid.json"
    result = cli("tune-grid", "--sampler", "dpmpp-2m", "--steps", 3, "-n", 8, "--sweeps", 1, "--reference-nfe", 30,
                 "--no-shift", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    spacing = result.output.strip().splitlines()[-1].removeprefix("--spacing ")
    assert "@" not in spacing and json.loads(out.read_text())["spacing"] == spacing
    sample = cli("compose", "--sampler", "dpmpp-2m", "--spacing", spacing, "-n", 2, "--out", tmp_path / "x.npy",
                 "--backend", "torch", "-q")
    assert sample.exit_code == 0, sample.output
    assert "3 steps = 3 network calls" in sample.output


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp-2m", "unipc", "heun", "euler-a"])
def test_plans_keep_the_step_times_apart_from_the_told_times(name):
    """plan.t: what the network is told; plan.t_x: the time x stands at (what img2img, inpainting, the ODE
    reference and classifier guidance read); the coefficients are those of the unshifted grid."""
    shifted = as_v2(toolkit.create("sampler", name, spacing="900@880,500@520,100@90")).plan(COSINE, 3)
    plain = as_v2(toolkit.create("sampler", name, spacing="900,500,100")).plan(COSINE, 3)
    told = {900.0: 880.0, 500.0: 520.0, 100.0: 90.0}
    assert torch.equal(shifted.t_x, plain.t) and torch.equal(plain.t_x, plain.t)
    assert shifted.t.tolist() == [told[v] for v in plain.t.tolist()]
    assert shifted.tables.keys() == plain.tables.keys()
    assert all(torch.equal(shifted.tables[k], plain.tables[k]) for k in plain.tables)


def test_inpainting_reads_the_step_times():
    from toolkit.inpainting import Inpaint

    shifted = Inpaint(toolkit.create("sampler", "ddim", spacing="900@880,500@520,100@90"), resample=2, jump=1)
    plain = Inpaint(toolkit.create("sampler", "ddim", spacing="900,500,100"), resample=2, jump=1)
    a, b = shifted.plan(COSINE, 3), plain.plan(COSINE, 3)
    assert all(torch.equal(a.tables[k], b.tables[k]) for k in b.tables) and torch.equal(a.t_x, b.t)


def test_img2img_keeps_the_listed_times_below_its_start():
    """strength s starts at t = ⌈sT⌉ − 1: the listed entries below it are the run, and the image is noised to the
    first one's step time (√ᾱ_t x_0 + √(1−ᾱ_t) ε, ε the stream's draw 0), not to the time the network is told."""
    from toolkit.diffusion import alpha_bar
    from toolkit.editing import edit_batches, truncated

    pipe = toolkit.compose(sampler="ddim", spacing="900@880,500@520,300.5@280,100@90")
    short = truncated(pipe, 0.5)
    assert short.sampler.spacing == "300.5@280,100@90" and short.steps == 2
    assert short.plan.t_x.tolist() == [300.5, 100.0] and short.plan.t.tolist() == [280.0, 90.0]
    x0 = torch.zeros((2, 1, 8, 8))
    out = torch.cat(list(edit_batches(pipe, x0, 0.5, seed=3)))
    a = alpha_bar(short.schedule, torch.tensor([300.5], dtype=torch.float64), torch.zeros(1), torch.float64)
    x_start = ((1 - a).sqrt() * NoiseStreams(3, range(2), (1, 8, 8)).at(0).double()).float()  # x_0 = 0
    assert torch.allclose(out, short.sample(2, seed=3, noise=x_start), atol=1e-6)
    with pytest.raises(ToolkitError, match="below every time"):
        truncated(toolkit.compose(sampler="ddim", spacing="900,800"), 0.5)


def test_evaluate_takes_a_json_list_spacing(tmp_path):
    result = cli("evaluate", "--metric", "ode", "--sampler", "ddim:spacing=[900,400,100]", "--steps", 3, "-n", 4,
                 "--json")
    assert result.exit_code == 0, result.output
    one_line_error(cli("evaluate", "--metric", "ode", "--sampler", "ddim:spacing=900,400,100", "-n", 4),
                   "ask for 3 steps")


def test_tuning_from_a_fractional_start_reports_what_its_spacing_gives():
    g = tune_grid(None, "dpmpp-2m", 3, spacing="logsnr", n=8, seed=5, sweeps=1, reference_nfe=40)
    start = float(listed_grid(g.spacing)[0][0])
    assert start == round(start, 1) and g.start_spacing.split(",")[0] == g.spacing.split(",")[0].split("@")[0]
    p = toolkit.compose(sampler="dpmpp-2m", spacing=g.spacing)
    labels = torch.arange(8) % 10
    x_T = NoiseStreams(5, range(8), p.sample_shape).draw()
    s = as_v2(p.sampler)
    x = run_plan(s, p.model_fn(labels), s.plan(p.schedule, 3), x_T)
    ref = ode_reference(p, x_T, labels, start, True, 40)
    assert float((x - ref).reshape(8, -1).pow(2).mean(1).sqrt().mean()) == pytest.approx(g.error, rel=1e-5)
    assert g.error <= g.start_error


def test_tune_grid_takes_its_steps_from_a_listed_spacing():
    result = cli("tune-grid", "--sampler", "ddim", "--spacing", "900@880,500,100", "-n", 2, "--sweeps", 0,
                 "--reference-nfe", 10, "--json", "-q")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["steps"] == 3 and payload["spacing"] == payload["start_spacing"] == "900@880,500,100"
