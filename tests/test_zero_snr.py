"""Sampling that does not degrade with more steps: zero-terminal-SNR rescaling of any schedule (Lin et al. 2024),
v-prediction where it is the right default, the CFG rescale φ, and data with no fixed range left unguarded."""

import json

import numpy as np
import pytest
import torch

import toolkit
from helpers import one_line_error, run
from toolkit.schedule import rescale_zero_terminal_snr, schedule_from_betas
from toolkit.training import TrainConfig


def lin_algorithm_1(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1, as printed: √ᾱ shifted to 0 at T and scaled to keep √ᾱ_0; returns ᾱ."""
    s = np.sqrt(np.cumprod(1 - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    return s**2


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_rescale_is_algorithm_1_with_a_finite_floor(name):
    plain = toolkit.create("schedule", name)
    z = toolkit.create("schedule", name, zero_terminal_snr="true")
    want = lin_algorithm_1(plain.betas.numpy())
    got = z.alphas_cumprod.numpy()
    assert np.allclose(got[:-1], want[:-1], rtol=1e-9, atol=1e-15)
    assert got[0] == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)  # √ᾱ_0 kept
    assert got[-1] == pytest.approx(min(2.0**-24, want[-2] / 2), rel=1e-9)  # 0 in the paper; finite here
    assert np.all(np.diff(got) < 0) and np.isfinite(z.log_snr.numpy()).all()
    assert z.name == name


def test_any_schedule_is_rescaled_and_bad_values_are_refused():
    custom = schedule_from_betas("mine", np.linspace(1e-3, 0.05, 50))
    z = rescale_zero_terminal_snr(custom)
    assert np.allclose(z.alphas_cumprod.numpy()[:-1], lin_algorithm_1(custom.betas.numpy())[:-1], rtol=1e-9)
    assert toolkit.create("schedule", "linear", zero_terminal_snr=False).alphas_cumprod[-1] > 1e-5  # off: unchanged
    with pytest.raises(toolkit.ToolkitError, match="zero_terminal_snr must be true or false"):
        toolkit.create("schedule", "cosine", zero_terminal_snr="maybe")
    with pytest.raises(toolkit.ToolkitError, match="at least 2 timesteps"):
        toolkit.create("schedule", "linear", num_timesteps=1, zero_terminal_snr=True)


def test_v_prediction_is_the_default_for_latent_models_and_zero_snr():
    assert TrainConfig().prediction == "epsilon"
    assert TrainConfig(latent="latent-digits-ae").prediction == "v"
    assert TrainConfig(schedule_options={"zero_terminal_snr": True}).prediction == "v"
    assert TrainConfig(latent="latent-digits-ae", loss="hybrid", learned_variance=True).prediction == "epsilon"
    assert TrainConfig(latent="latent-digits-ae", prediction="epsilon").prediction == "epsilon"  # asked for


@pytest.mark.parametrize("args, pattern", [
    (["--prediction", "epsilon"], "needs --prediction v"),
    (["--loss", "hybrid", "--learn-variance"], "--loss hybrid is written for ε-prediction"),
    (["--loss", "vlb", "--learn-variance", "--prediction", "v"], "--loss vlb is written for ε-prediction"),
])
def test_options_that_do_not_combine_with_zero_snr(tmp_path, args, pattern):
    out = tmp_path / "m"
    one_line_error(run("train", "--steps", 1, "--out", out, "--schedule-option", "zero_terminal_snr=true", *args),
                   pattern)
    assert not out.exists()


def test_a_learned_variance_needs_the_loss_that_trains_it(tmp_path):
    """Σ is trained through L_vlb only, and L_vlb is written for ε: v or L_simple with --learn-variance is refused."""
    for args, pattern in ((["--prediction", "v"], "--learn-variance trains Σ through L_vlb"),
                          ([], "--learn-variance trains Σ through L_vlb"),
                          (["--prediction", "v", "--loss", "hybrid"], "needs --prediction epsilon")):
        one_line_error(run("train", "--steps", 1, "--learn-variance", "--out", tmp_path / "m", *args), pattern)
        assert not (tmp_path / "m").exists()


class ConstantV(torch.nn.Module):
    """A v-model that predicts v = c everywhere: at SNR 0, x̂_0 = α x − σ v = −c."""

    prediction, learned_variance, num_classes, sample_shape = "v", False, None, (1, 4, 4)

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t, y=None):
        return torch.full_like(x, self.c)


@pytest.mark.parametrize("sampler, options", [("ddim", {}), ("dpmpp-2m", {"order": 1}), ("unipc", {"order": 1}),
                                              ("euler-a", {}), ("ddpm", {})])
def test_a_zero_snr_run_starts_at_snr_zero_and_forms_x0_from_v(sampler, options):
    schedule = toolkit.create("schedule", "cosine", zero_terminal_snr=True)
    pipe = toolkit.compose(schedule=schedule, model=ConstantV(0.4), sampler=sampler, steps=1, spacing="trailing",
                           clip_x0=False, **options)
    assert pipe.plan["alpha"][0].item() ** 2 == pytest.approx(schedule.alphas_cumprod[-1].item(), rel=1e-9)
    # one step from t = T-1 to the clean end: the sample is x̂_0 = α x_T − σ v ≈ −0.4 whatever x_T is
    # (|α x_T| ≤ 8e-4 here; forming x̂_0 through ε in float32 at α = 2^-12 adds up to 2e-3 of rounding)
    out = pipe.sample(16, seed=3)
    assert torch.allclose(out, torch.full_like(out, -0.4), atol=3e-3)


@pytest.fixture(scope="module")
def zero_snr_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("zsnr") / "m"
    r = run("train", "--steps", 3, "--batch-size", 16, "--model-option", "base_channels=8", "--model-option",
            "attention_heads=2", "--schedule-option", "zero_terminal_snr=true", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def test_zero_snr_checkpoint_records_it_and_samples_with_trailing_spacing(zero_snr_ckpt, tmp_path):
    config = json.loads((zero_snr_ckpt / "config.json").read_text())
    assert config["schedule"]["options"]["zero_terminal_snr"] is True
    assert config["model"]["options"]["prediction"] == "v"
    pipe = toolkit.compose(model=zero_snr_ckpt, sampler="ddim", steps=5, spacing="trailing")
    assert pipe.schedule.alphas_cumprod[-1].item() < 1e-7  # the recorded rescale is applied again
    for name in ("ddim", "dpmpp-2m", "unipc", "heun"):
        r = run("compose", "--model", zero_snr_ckpt, "--sampler", name, "--steps", 5, "--spacing", "trailing",
                "-n", 4, "--class", 3, "--backend", "torch", "--out", tmp_path / f"{name}.npy")
        assert r.exit_code == 0, r.output
        assert np.isfinite(np.load(tmp_path / f"{name}.npy")).all()


def test_zero_snr_export_equals_torch(zero_snr_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from toolkit.exporters.onnx import export_sampler
    from toolkit.exporters.runtime import SamplerSession

    pipe = toolkit.compose(model=zero_snr_ckpt, sampler="dpmpp-2m", steps=6, spacing="trailing", guidance="cfg",
                           guidance_options={"scale": 2.0, "rescale": 0.7})
    got = SamplerSession(export_sampler(pipe, tmp_path / "z.onnx")).sample(4, seed=2, labels=[0, 1, 2, 3])
    want = pipe.sample(4, seed=2, labels=[0, 1, 2, 3])
    # the first step forms x̂_0 = (x − σε)/α at α_T = 2⁻¹²: float32 rounding of ε (6·10⁻⁸) grows 4096-fold there, in
    # torch and onnxruntime alike but not identically; elsewhere the graph is within 1e-4
    assert np.abs(got - want.numpy()).max() <= 5e-4
    meta = json.loads((tmp_path / "z.onnx.json").read_text())
    assert meta["guidance_options"] == {"scale": 2.0, "rescale": 0.7}


# ---------------------------------------------------------------- CFG rescale φ


class Fixed(torch.nn.Module):
    """Returns one tensor for the conditional rows and another for the null label ∅."""

    prediction, learned_variance, num_classes, sample_shape = "v", False, 10, (1, 4, 4)

    def __init__(self, cond, uncond):
        super().__init__()
        self.cond, self.uncond = cond, uncond

    def forward(self, x, t, y):
        return torch.where((y == 10).reshape(-1, 1, 1, 1), self.uncond.repeat(2, 1, 1, 1), self.cond.repeat(2, 1, 1, 1))


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_cfg_rescale_is_lin_et_al_section_3_4(phi):
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 1, 4, 4, generator=g), 2 * torch.randn(3, 1, 4, 4, generator=g)
    w = 3.0
    guided = toolkit.create("guidance", "cfg", scale=w, rescale=phi).wrap(Fixed(cond, uncond))
    out = guided(torch.zeros(3, 1, 4, 4), torch.zeros(3), torch.tensor([1, 2, 3])).numpy()
    c, u = cond.numpy().astype(np.float64), uncond.numpy().astype(np.float64)
    for i in range(3):
        x_cfg = (w + 1) * c[i] - w * u[i]  # Ho & Salimans' w; Lin et al.'s guidance weight is w + 1
        x_rescaled = x_cfg * c[i].std(ddof=1) / x_cfg.std(ddof=1)
        want = phi * x_rescaled + (1 - phi) * x_cfg
        assert np.allclose(out[i], want, atol=1e-5)
    if phi == 1.0:
        assert np.allclose(out.reshape(3, -1).std(1, ddof=1), c.reshape(3, -1).std(1, ddof=1), rtol=1e-5)


def test_cfg_rescale_bad_input(tmp_path):
    one_line_error(run("compose", "--guidance", "cfg", "--guidance-option", "rescale=1.5", "--class", 1, "-n", 1,
                       "--out", tmp_path / "a.png"), "rescale φ must lie in")
    one_line_error(run("compose", "--guidance-option", "rescale=0.5", "-n", 1, "--out", tmp_path / "a.png"),
                   "--guidance-option needs --guidance")
    assert not (tmp_path / "a.png").exists()


# ---------------------------------------------------------------- data with no fixed range


@pytest.fixture(scope="module")
def moons_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons") / "m"
    r = run("train", "--dataset", "moons", "--model", "mlp", "--steps", 3, "--batch-size", 32, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def test_unbounded_vector_data_is_neither_clipped_nor_guarded(moons_ckpt, tmp_path):
    config = json.loads((moons_ckpt / "config.json").read_text())
    assert config["data"]["range"] is None  # standardized moons reach beyond ±1
    assert float(toolkit.create("dataset", "moons").x.abs().max()) > 1.5
    pipe = toolkit.compose(model=moons_ckpt, sampler="ddim", steps=5)
    assert pipe.value_range is None and pipe.sampler.clip_x0 is False
    from toolkit.sampling import run_plan

    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    raw = run_plan(pipe.sampler, pipe.model_fn(None), pipe.plan, x_T)
    out = pipe.sample(64, noise=x_T)
    assert torch.allclose(out, raw) and float(out.abs().max()) > 1  # returned as sampled, not cut to [-1, 1]
    images = toolkit.compose(sampler="ddim", steps=5)  # the shipped digits: images stay clipped
    assert images.value_range == (-1.0, 1.0) and images.sampler.clip_x0 is True
    for option in ("clip_x0=true", "threshold=0.99"):
        one_line_error(run("compose", "--model", moons_ckpt, "--sampler-option", option, "-n", 2,
                           "--out", tmp_path / "m.npy"), "has none")
    assert not (tmp_path / "m.npy").exists()
    r = run("compose", "--model", moons_ckpt, "--sampler-option", "clip_x0=true", "--sampler-option", "clip_range=3",
            "-n", 2, "--backend", "torch", "--out", tmp_path / "m.npy")
    assert r.exit_code == 0, r.output


def test_unbounded_data_export_has_no_clip(moons_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from toolkit.exporters.onnx import export_sampler
    from toolkit.exporters.runtime import SamplerSession

    pipe = toolkit.compose(model=moons_ckpt, sampler="ddim", steps=4)
    path = export_sampler(pipe, tmp_path / "m.onnx")
    assert "Clip" not in {n.op_type for n in onnx.load(path).graph.node}
    assert json.loads((tmp_path / "m.onnx.json").read_text())["value_range"] is None
    got = SamplerSession(path).sample(8, seed=1)
    assert np.abs(got - pipe.sample(8, seed=1).numpy()).max() <= 1e-4 * max(1.0, float(np.abs(got).max()))
