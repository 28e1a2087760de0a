import pytest
import torch
from torch import nn

import toolkit


class Recorder(nn.Module):
    """A user's own predictor: a fixed function of x and t that records the times it was asked at."""

    prediction = "epsilon"
    learned_variance = False
    num_classes = 3
    sample_shape = (1, 4, 4)

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, x, t, y=None):
        self.times.append(t.clone())
        scale = (t.float() / 1000).reshape(-1, 1, 1, 1)
        bias = 0.0 if y is None else (y.float() / 10).reshape(-1, 1, 1, 1)
        return torch.tanh(x * 0.5 + scale + bias)


def test_user_module_and_timesteps():
    pipe = toolkit.compose(schedule="cosine", sampler="ddim", model=Recorder(), steps=10)
    assert pipe.timesteps.tolist() == list(range(900, -1, -100))
    x = pipe.sample(4, seed=1)
    assert x.shape == (4, 1, 4, 4) and x.min() >= -1 and x.max() <= 1


def test_same_seed_same_samples_and_batch_invariance():
    pipe = toolkit.compose(schedule="linear", sampler="ddpm", model=Recorder(), steps=25)
    a = pipe.sample(7, seed=3, labels=[0, 1, 2])
    b = pipe.sample(7, seed=3, labels=[0, 1, 2])
    assert torch.equal(a, b)
    c = pipe.sample(10, seed=3, labels=[0, 1, 2], batch_size=3)  # more samples, other batches
    assert torch.allclose(a, c[:7], atol=1e-6)
    d = pipe.sample(7, seed=4, labels=[0, 1, 2])
    assert not torch.allclose(a, d)


def test_offset_shards_reproduce_one_run():
    pipe = toolkit.compose(schedule="cosine", sampler="ddpm", model=Recorder(), steps=6)
    whole = pipe.sample(9, seed=2, labels=[0, 1, 2])
    first = pipe.sample(4, seed=2, labels=[0, 1, 2, 0])
    rest = pipe.sample(5, seed=2, labels=[1, 2, 0, 1, 2], offset=4)
    assert torch.allclose(torch.cat([first, rest]), whole, atol=1e-6)


def test_noise_is_x_T():
    pipe = toolkit.compose(schedule="cosine", sampler="ddim", model=Recorder(), steps=5)
    noise = torch.randn(3, 1, 4, 4)
    a = pipe.sample(3, seed=0, noise=noise)
    b = pipe.sample(3, seed=99, noise=noise)  # deterministic sampler: only x_T matters
    assert torch.equal(a, b)
    with pytest.raises(toolkit.ToolkitError, match="noise must have shape"):
        pipe.sample(2, noise=noise)


def test_labels_checked():
    pipe = toolkit.compose(schedule="cosine", model=Recorder(), steps=2)
    with pytest.raises(toolkit.ToolkitError, match="class label 3 is out of range"):
        pipe.sample(2, labels=3)
    with pytest.raises(toolkit.ToolkitError, match="class label -1"):
        pipe.sample(2, labels=[-1])


def test_schedule_differs_from_training_schedule(tiny_ckpt):
    """A cosine-trained model sampled with linear is asked at the cosine time of equal log-SNR."""
    pipe = toolkit.compose(schedule="linear", sampler="ddim", model=tiny_ckpt, steps=5)
    rec = Recorder()
    rec.num_classes = 10
    rec.sample_shape = (1, 8, 8)
    pipe = toolkit.Pipeline(schedule=pipe.schedule, predictor=rec, sampler=pipe.sampler, steps=5,
                            train_schedule=pipe.train_schedule)
    pipe.sample(2)
    asked = torch.stack([t[0] for t in rec.times]).double()
    cos, lin = pipe.train_schedule, pipe.schedule
    for t_lin, t_cos in zip(pipe.timesteps.tolist(), asked.tolist()):
        lo = int(t_cos)
        frac = t_cos - lo
        hi = min(lo + 1, 999)
        lam = cos.log_snr[lo] * (1 - frac) + cos.log_snr[hi] * frac
        assert lam.item() == pytest.approx(lin.log_snr[int(t_lin)].item(), abs=1e-4)
    assert not torch.allclose(asked, pipe.timesteps.double())


def test_checkpoint_pipeline_defaults(tiny_ckpt):
    pipe = toolkit.compose(model=str(tiny_ckpt))
    assert pipe.schedule.name == "cosine" and pipe.steps == 50 and pipe.num_classes == 10
    assert pipe.model_times() is None
    x = pipe.sample(3, labels=[1, 2, 3])
    assert x.shape == (3, 1, 8, 8)


def test_v_prediction_converted_to_eps():
    class VModel(Recorder):
        prediction = "v"

    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    pipe = toolkit.compose(schedule=sched, model=VModel(), steps=3)
    fn = pipe.model_fn(None)
    x = torch.randn(2, 1, 4, 4)
    t = torch.tensor([500, 10])
    v = VModel()(x, t)
    a = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    assert torch.allclose(fn(x, t), (1 - a).sqrt() * x + a.sqrt() * v, atol=1e-6)  # ε = √(1-ᾱ)x + √ᾱ v


def test_bad_compose_inputs(tiny_ckpt):
    with pytest.raises(toolkit.ToolkitError, match="steps must be an integer in 1..1000"):
        toolkit.compose(model=tiny_ckpt, steps=1001)
    with pytest.raises(toolkit.PluginError, match="unknown schedule 'cosin'"):
        toolkit.compose(schedule="cosin", model=tiny_ckpt)
    with pytest.raises(toolkit.ToolkitError, match="missing"):
        toolkit.compose(schedule="cosine", model=object())
    with pytest.raises(toolkit.CheckpointError, match="no checkpoint directory"):
        toolkit.compose(model="no-such-model")
