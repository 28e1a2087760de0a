"""The shipped digits model: small, self-describing, and it draws the digit it is asked for."""

import json
from pathlib import Path

import torch

import toolkit
from toolkit.checkpoint import resolve_checkpoint


def nearest_class_mean(samples, data):
    """Label each sample with the class whose mean real image is nearest (90% accurate on real digits)."""
    means = torch.stack([data.x[data.y == k].mean(0) for k in range(10)])
    dist = ((samples[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    return dist.argmin(1)


def test_shipped_checkpoint_is_small_and_records_its_command():
    path = resolve_checkpoint("digits")
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    assert size <= 3 * 1024 * 1024
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["training"]["command"].startswith("toolkit train ")
    assert cfg["model"]["options"]["num_classes"] == 10 and cfg["schedule"]["name"] == "cosine"
    assert not (path / "training_state.safetensors").exists()
    shipped = sum(f.stat().st_size for name in toolkit.available("pretrained")
                  for f in Path(resolve_checkpoint(name)).iterdir())
    assert shipped <= 6_000_000  # everything shipped (latent diffusion issue: at most 6 MB)


def test_shipped_classifier_steers_the_unconditional_model():
    data = toolkit.create("dataset", "digits")
    labels = torch.arange(10).repeat(5)
    plain = toolkit.compose(sampler="ddim", steps=20).sample(50, seed=0)  # unconditional (∅)
    guided = toolkit.compose(sampler="ddim", steps=20, guidance="classifier",
                             guidance_options={"scale": 10.0}).sample(50, seed=0, labels=labels)
    hit_plain = (nearest_class_mean(plain, data) == labels).float().mean().item()
    hit_guided = (nearest_class_mean(guided, data) == labels).float().mean().item()
    assert hit_plain < 0.3 and hit_guided >= 0.7, (hit_plain, hit_guided)


def test_shipped_model_draws_requested_digits_with_variety():
    data = toolkit.create("dataset", "digits")
    pipe = toolkit.compose(sampler="ddim", steps=20)
    labels = torch.arange(10).repeat(10)
    x = pipe.sample(100, seed=0, labels=labels)
    accuracy = (nearest_class_mean(x, data) == labels).float().mean().item()
    assert accuracy >= 0.8, accuracy
    # varied: samples of one class are about as far apart as real digits of that class
    for k in (0, 7):
        own = x[labels == k].flatten(1)
        real = data.x[data.y == k].flatten(1)
        assert torch.cdist(own, own).mean() > 0.5 * torch.cdist(real, real).mean()


def test_shipped_checkpoints_record_commands_that_name_no_outside_folder():
    """The recorded training commands are runnable in a checkout: no absolute --out of the machine they ran on."""
    for name in toolkit.available("pretrained"):
        training = json.loads((resolve_checkpoint(name) / "config.json").read_text()).get("training", {})
        for command in [training.get("command"), *(training.get("commands") or [])]:
            if command:
                out = command.split("--out ", 1)[1].split()[0]
                assert not Path(out).is_absolute(), (name, command)
