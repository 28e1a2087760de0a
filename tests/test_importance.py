"""Improved DDPM, complete: L_vlb alone and importance-sampled t (Nichol & Dhariwal §3.3), against the paper's
rule written out here; exact resume with the loss history; bad combinations refused."""

import math

import pytest
import torch
from safetensors.torch import load_file

import toolkit
from helpers import one_line_error, run
from toolkit import diffusion
from toolkit.importance import HISTORY, LossSecondMoment
from toolkit.losses import loss_hybrid, loss_vlb

TINY = ["--model-option", "base_channels=8", "--model-option", "attention_heads=2"]


def test_uniform_until_every_t_has_ten_values_then_proportional_to_the_rms_loss():
    T = 4
    s = LossSecondMoment(T)
    g = torch.Generator().manual_seed(0)
    t, w = s.sample(6, g)
    assert torch.equal(t, torch.randint(T, (6,), generator=torch.Generator().manual_seed(0)))  # a uniform run's draw
    assert torch.equal(w, torch.ones(6, dtype=torch.float64))
    values = {0: [1.0] * 12, 1: [2.0] * 10, 2: [float(k) for k in range(15)], 3: [3.0] * 9}
    for ti, losses in values.items():
        s.update(torch.full((len(losses),), ti), torch.tensor(losses))
    assert not s.warm  # t = 3 has 9 values
    s.update(torch.tensor([3]), torch.tensor([3.0]))
    assert s.warm
    kept = {0: [1.0] * 10, 1: [2.0] * 10, 2: [float(k) for k in range(5, 15)], 3: [3.0] * 10}  # the last ten
    rms = torch.tensor([math.sqrt(sum(v * v for v in kept[t]) / HISTORY) for t in range(T)], dtype=torch.float64)
    want = 0.999 * rms / rms.sum() + 0.001 / T
    assert torch.allclose(s.probabilities(), want, atol=1e-12)
    t, w = s.sample(20000, g)
    freq = torch.bincount(t, minlength=T).double() / len(t)
    assert torch.allclose(freq, want, atol=0.015)
    assert torch.allclose(w, 1 / (T * want[t]))


def _toy(learned=True):
    return toolkit.create("model", "unet", sample_shape=(1, 8, 8), base_channels=8, attention_heads=2,
                          learned_variance=learned)


def test_vlb_alone_trains_the_mean_and_weights_each_sample():
    schedule = toolkit.create("schedule", "cosine", num_timesteps=50)
    torch.manual_seed(0)
    model = _toy()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x0 = toolkit.create("dataset", "digits").x[:6]
    t, noise = torch.tensor([0, 3, 10, 20, 30, 49]), torch.randn(6, 1, 8, 8)
    observed = {}
    out = loss_vlb(model, schedule, x0, t, noise, None, 17, observed=observed)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    raw = model(x_t, t)
    terms = diffusion.vlb_terms(schedule, x0, x_t, t, raw[:, :1],
                                diffusion.learned_range_log_variance(schedule, t, raw[:, 1:]), 17)
    assert torch.allclose(out, 50 * terms.mean(), rtol=1e-5) and torch.allclose(observed["loss"], 50 * terms, rtol=1e-5)
    w = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.25, 4.0])
    weighted = loss_vlb(model, schedule, x0, t, noise, None, 17, weights=w)
    assert torch.allclose(weighted, (50 * terms * w).mean(), rtol=1e-5)
    # L_vlb reaches the mean (ε head); L_hybrid's L_vlb term does not (a stop-gradient on ε)
    head = model.conv_out.weight

    def eps_grad(loss_fn):
        model.zero_grad()
        loss_fn(model, schedule, x0, t, noise, None, 17).backward()
        return head.grad[:1].abs().sum()

    assert eps_grad(loss_vlb) > 0
    simple_only = torch.autograd.grad((model(x_t, t)[:, :1] - noise).pow(2).mean(), head)[0][:1]
    model.zero_grad()
    loss_hybrid(model, schedule, x0, t, noise, None, 17).backward()
    assert torch.allclose(head.grad[:1], simple_only, atol=1e-6)


def test_importance_sampled_training_resumes_exactly(tmp_path):
    """-T 20: 200 values fill the history, so by step 8 (batch 64) t is drawn by the loss; 8 + 4 steps resumed
    equal 12 in one run."""
    common = [*TINY, "--loss", "vlb", "--learn-variance", "--importance-sampling", "-T", 20, "--batch-size", 64,
              "--checkpoint-every", 4]
    assert run("train", *common, "--steps", 12, "--out", tmp_path / "one").exit_code == 0
    r = run("train", *common, "--steps", 8, "--out", tmp_path / "two")
    assert r.exit_code == 0, r.output
    state = load_file(tmp_path / "two" / "training_state.safetensors")
    assert bool((state["importance.count"] >= HISTORY).all())  # warm: the resumed steps sample by the loss
    assert run("train", *common, "--steps", 12, "--out", tmp_path / "two", "--resume").exit_code == 0
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    one_line_error(run("train", *TINY, "--loss", "vlb", "--learn-variance", "-T", 20, "--batch-size", 32,
                       "--checkpoint-every", 4, "--steps", 16, "--out", tmp_path / "two", "--resume"), "cannot resume")


def test_bad_combinations(tmp_path):
    out = tmp_path / "r"
    one_line_error(run("train", "--loss", "vlb", "--steps", 1, "--out", out), "add --learn-variance")
    one_line_error(run("train", "--importance-sampling", "--steps", 1, "--out", out), "--loss vlb or hybrid")
    one_line_error(run("train", "--loss", "vlb", "--learn-variance", "--prediction", "v", "--steps", 1, "--out", out),
                   "needs --prediction epsilon")
    assert not out.exists()
