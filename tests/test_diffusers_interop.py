"""Bring your diffusers model: UNet2DModel folders built with diffusers itself, loaded with --model, checked against
diffusers' own forward and DDIMScheduler loop, exported to ONNX, converted both ways; bad folders refused."""

import json
import shutil

import numpy as np
import pytest
import torch

import toolkit
from helpers import one_line_error, run

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402


def _unet(num_class_embeds=None, out_channels=1, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       num_class_embeds=num_class_embeds)
    with torch.no_grad():  # a freshly initialized UNet2DModel outputs nearly zero: make it say something
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    plain = _unet()
    plain.save_pretrained(root / "unet")  # a UNet2DModel folder with its scheduler_config.json beside
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False).save_pretrained(
        root / "unet")
    cond = _unet(num_class_embeds=4, seed=1)
    cond.register_to_config(toolkit_null_label=3)
    DDPMPipeline(unet=cond, scheduler=DDPMScheduler(beta_schedule="linear")).save_pretrained(root / "pipe")
    return root, plain, cond


def test_eps_equals_diffusers_forward(folders):
    root, plain, cond = folders
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([0, 10, 250, 500, 999])
    pipe = toolkit.compose(model=root / "unet", sampler="ddim", steps=10)
    assert pipe.schedule.num_timesteps == 1000 and pipe.predictor.num_classes is None
    with torch.no_grad():
        assert torch.allclose(pipe.predictor(x, t), plain(x, t).sample, atol=1e-6)
    cpipe = toolkit.compose(model=root / "pipe", sampler="ddim", steps=10)
    y = torch.tensor([0, 1, 2, 3, 1])
    assert cpipe.predictor.num_classes == 3 and cpipe.predictor.null_label_trained
    with torch.no_grad():
        assert torch.allclose(cpipe.predictor(x, t, y), cond(x, t, class_labels=y).sample, atol=1e-6)


def _diffusers_ddim(unet, scheduler_config, x_T, steps, labels=None, clip=False):
    sched = DDIMScheduler.from_config(scheduler_config, clip_sample=clip, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t, class_labels=labels).sample
            x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


@pytest.mark.parametrize("which", ["unet", "pipe"])
def test_ddim_samples_equal_diffusers_ddim_scheduler(folders, which):
    root, plain, cond = folders
    pipe = toolkit.compose(model=root / which, sampler="ddim", steps=20)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(6, 1, 8, 8, generator=g)
    labels = None if which == "unet" else torch.tensor([0, 1, 2, 0, 1, 2])
    unet = plain if which == "unet" else cond
    config = json.loads(((root / which / "scheduler_config.json") if which == "unet"
                         else (root / which / "scheduler" / "scheduler_config.json")).read_text())
    clip = bool(config.get("clip_sample", True))
    ours = pipe.sample(6, labels=labels, noise=x_T)
    theirs = _diffusers_ddim(unet, config, x_T, 20, labels, clip).clamp(-1, 1)
    assert float((ours - theirs).abs().max()) <= 1e-4


def test_every_sampler_runs_and_the_exported_graph_equals_torch(folders, tmp_path):
    pytest.importorskip("onnxruntime")
    from toolkit.exporters.onnx import export_sampler
    from toolkit.exporters.runtime import SamplerSession

    root, _, _ = folders
    for name in ("ddpm", "dpmpp-2m", "unipc", "heun", "euler-a"):
        out = toolkit.compose(model=root / "pipe", sampler=name, steps=5).sample(3, labels=[0, 1, 2])
        assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    steered = toolkit.compose(model=root / "unet", sampler="ddpm", steps=5, guidance="classifier")  # the shipped one
    assert torch.isfinite(steered.sample(2, labels=[3, 7])).all()
    cfg = toolkit.compose(model=root / "pipe", sampler="dpmpp-2m", steps=8, guidance="cfg",
                          guidance_options={"scale": 2.0})
    path = export_sampler(cfg, tmp_path / "d.onnx")
    got = SamplerSession(path).sample(4, seed=2, labels=[0, 1, 2, 0])
    want = cfg.sample(4, seed=2, labels=[0, 1, 2, 0])
    assert np.abs(got - want.numpy()).max() <= 1e-4


def test_cli_compose_export_and_convert_round_trip(folders, tmp_path):
    root, _, _ = folders
    r = run("compose", "--model", root / "pipe", "--class", "0,1,2", "--steps", 10, "--seed", 1,
            "--out", tmp_path / "a.npy", "--backend", "torch")
    assert r.exit_code == 0, r.output
    r = run("convert", "--from", "diffusers", root / "pipe", tmp_path / "ckpt")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]["name"] == "diffusers-unet2d"
    r = run("convert", "--to", "diffusers", tmp_path / "ckpt", tmp_path / "back")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "back" / "model_index.json").is_file() and (tmp_path / "back" / "README.md").is_file()
    for model, out in ((tmp_path / "ckpt", "b.npy"), (tmp_path / "back", "c.npy")):
        r = run("compose", "--model", model, "--class", "0,1,2", "--steps", 10, "--seed", 1, "--out", tmp_path / out,
                "--backend", "torch")
        assert r.exit_code == 0, r.output
    a, b, c = (np.load(tmp_path / f) for f in ("a.npy", "b.npy", "c.npy"))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    loaded = DDPMPipeline.from_pretrained(tmp_path / "back", local_files_only=True)  # diffusers reads it back
    assert loaded.unet.config.num_class_embeds == 4 and loaded.scheduler.config.beta_schedule == "linear"
    r = run("export", "onnx", "--model", root / "unet", "--steps", 5, "--out", tmp_path / "u.onnx")
    assert r.exit_code == 0, r.output


def test_train_a_diffusers_unet_and_convert_it(tmp_path):
    r = run("train", "--model", "diffusers-unet2d", "--steps", 3, "--batch-size", 16, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    r = run("convert", "--to", "diffusers", tmp_path / "run", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    pipe = DDPMPipeline.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = toolkit.compose(model=tmp_path / "run", sampler="ddim", steps=5)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.allclose(ours.predictor(x, t, y), pipe.unet(x, t, class_labels=y).sample, atol=1e-6)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"  # the toolkit's cosine schedule


def test_bad_folders_and_hub_ids_are_refused(folders, tmp_path):
    root, _, _ = folders
    out = tmp_path / "o.npy"
    one_line_error(run("compose", "--model", "google/ddpm-cifar10-32", "--out", out), "never downloads")
    for key, value, pattern in (("prediction_type", "nonsense", "prediction_type"),
                                ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr"),
                                ("beta_schedule", "sigmoid", "beta_schedule"),
                                ("variance_type", "learned", "variance_type")):
        bad = tmp_path / f"bad-{key}"
        shutil.copytree(root / "unet", bad)
        config = json.loads((bad / "scheduler_config.json").read_text())
        config[key] = value
        (bad / "scheduler_config.json").write_text(json.dumps(config))
        one_line_error(run("compose", "--model", bad, "--out", out), pattern)
    nolabel = tmp_path / "no-null"
    shutil.copytree(root / "pipe", nolabel)
    config = json.loads((nolabel / "unet" / "config.json").read_text())
    del config["toolkit_null_label"]
    (nolabel / "unet" / "config.json").write_text(json.dumps(config))
    one_line_error(run("compose", "--model", nolabel, "--out", out), "null label")
    nosched = tmp_path / "no-sched"
    shutil.copytree(root / "unet", nosched)
    (nosched / "scheduler_config.json").unlink()
    one_line_error(run("compose", "--model", nosched, "--out", out), "scheduler_config.json")
    assert not out.exists()
    one_line_error(run("convert", "--to", "diffusers", "digits", tmp_path / "x"), "no diffusers UNet2DModel equivalent")
    one_line_error(run("convert", root / "unet", tmp_path / "x"), "--from diffusers or --to diffusers")
    assert not (tmp_path / "x").exists()


def test_fixed_large_variance_and_other_t_map_both_ways(folders, tmp_path):
    from toolkit.plugins.diffusers_interop import scheduler_config

    root, _, _ = folders
    large = tmp_path / "large"
    shutil.copytree(root / "unet", large)
    config = json.loads((large / "scheduler_config.json").read_text())
    config["variance_type"] = "fixed_large"
    (large / "scheduler_config.json").write_text(json.dumps(config))
    assert toolkit.compose(model=large, sampler="ddpm", steps=5).sampler.variance == "beta"  # diffusers' σ² = β
    short = toolkit.compose(model=large, sampler="ddim", steps=5, num_timesteps=250)  # its own schedule at another T
    want = toolkit.create("schedule", "diffusers", num_timesteps=250, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(short.schedule.alphas_cumprod, want.alphas_cumprod)
    assert toolkit.compose(model=large, sampler="ddpm", steps=5, variance="posterior").sampler.variance == "posterior"
    # the toolkit's linear schedule at T = 500 (both ends scaled by 1000/T) is written as its betas
    sched = DDPMScheduler.from_config(scheduler_config({"name": "linear", "options": {"num_timesteps": 500}}, "epsilon",
                                                       False, True))
    ours = toolkit.create("schedule", "linear", num_timesteps=500)
    assert torch.allclose(sched.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-5)
