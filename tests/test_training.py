"""Training objectives: what each loss term trains."""

import torch

import toolkit
from toolkit.losses import HYBRID_LAMBDA, loss_hybrid, loss_simple


def output_grads(model, loss_fn):
    outputs = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append(out)

    handle = model.register_forward_hook(keep)
    try:
        model.zero_grad()
        loss_fn().backward()
    finally:
        handle.remove()
    return outputs[0].grad.clone()


def test_hybrid_vlb_term_does_not_train_the_mean():
    """L_vlb sees a stop-gradient ε: its gradient reaches only the variance channels."""
    model = toolkit.create("model", "unet", sample_shape=(1, 8, 8), base_channels=8, attention_heads=2,
                           learned_variance=True)
    sched = toolkit.create("schedule", "cosine", num_timesteps=1000)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(4, 1, 8, 8)
    hybrid = output_grads(model, lambda: loss_hybrid(model, sched, x0, t, noise, None, 17))
    simple = output_grads(model, lambda: loss_simple(model, sched, x0, t, noise, None))
    assert torch.allclose(hybrid[:, :1], simple[:, :1], atol=1e-7)  # ε channels: L_simple only
    assert hybrid[:, 1:].abs().sum() > 0 and HYBRID_LAMBDA == 0.001  # variance channels: λ·L_vlb


def test_a_training_config_passes_each_file_at_most_twice(tmp_path):
    """Architecture: following the TrainConfig of `toolkit train` to its saved checkpoint (every call that
    receives it), it passes each of our files at most twice: the loop, and the task it asks once."""
    import sys
    from collections import Counter
    from pathlib import Path

    from helpers import run
    from toolkit.training import TrainConfig

    root = str(Path(__file__).resolve().parents[1]) + "/"
    seq: list[str] = []

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if event == "call" and f.startswith(root) and "/tests/" not in f and "/.venv/" not in f \
                and any(type(v) is TrainConfig for v in frame.f_locals.values()):
            if not seq or seq[-1] != f:
                seq.append(f)

    sys.settrace(tracer)
    try:
        r = run("train", "--model-option", "base_channels=8", "--model-option", "attention_heads=2", "--steps", 4,
                "--batch-size", 8, "--checkpoint-every", 2, "--out", tmp_path / "run")
    finally:
        sys.settrace(None)
    assert r.exit_code == 0, r.output
    visits = Counter(seq)
    assert visits and max(visits.values()) <= 2, [s[len(root):] for s in seq]
