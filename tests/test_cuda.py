"""On a CUDA GPU (skipped elsewhere; run on a lent GPU with `pytest tests/test_cuda.py`): one seed gives the
CPU's samples through torch on the GPU, onnxruntime's CUDA provider and the loop captured as a CUDA graph."""

import numpy as np
import pytest
import torch

import toolkit
from helpers import run
from toolkit.errors import ToolkitError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {  # ddim, ddpm (stochastic) with cfg, a multistep solver
    "ddim50": dict(sampler="ddim", steps=50),
    "ddpm100-cfg-beta": dict(sampler="ddpm", steps=100, variance="beta", guidance="cfg",
                             guidance_options={"scale": 1.5}),
    "dpmpp2m10": dict(sampler="dpmpp-2m", steps=10),
}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from toolkit.exporters.onnx import export_sampler

    folder = tmp_path_factory.mktemp("onnx-cuda")
    return {name: (toolkit.compose(**kw), export_sampler(toolkit.compose(**kw), folder / f"{name}.onnx"))
            for name, kw in CASES.items()}


def test_one_seed_gives_the_same_digits_on_cuda(graphs):
    """The generator on the GPU (torch) and the graph on onnxruntime's CUDA provider: the CPU's samples."""
    from toolkit.exporters.runtime import SamplerSession
    from toolkit.rng import normal_numpy, normal_torch

    index = np.arange(1000)
    assert np.array_equal(normal_torch(3, index, 2, (1, 8, 8), "cuda").cpu().numpy(),
                          normal_numpy(3, index, 2, (1, 8, 8)))
    for name, (pipe, path) in graphs.items():
        scale = [2.0, 0.5] * 4 if pipe.guidance else None
        labels = [3, 1, 4, 1, 5, 9, 2, 6] if pipe.num_classes else None
        cpu = pipe.sample(8, seed=7, labels=labels, scale=scale).numpy()
        gpu = toolkit.compose(**CASES[name], device="cuda").sample(8, seed=7, labels=labels, scale=scale).numpy()
        assert np.abs(gpu - cpu).max() < 1e-4, name
        session = SamplerSession(path, provider="cuda")
        assert session.provider == "cuda"
        assert np.abs(session.sample(8, seed=7, labels=labels, scale=scale) - cpu).max() < 1e-4, name


def test_cuda_graphs_give_the_eager_samples(graphs):
    """The loop captured once per batch size and replayed: the eager loop's samples, for every batch of a run
    (7 in batches of 3: graphs for 3 and 1), with per-sample labels and scales, and a later call reusing them."""
    for name, (pipe, _) in graphs.items():
        eager = toolkit.compose(**CASES[name], device="cuda")
        graphed = toolkit.compose(**CASES[name], device="cuda", cuda_graphs=True)
        labels = [3, 1, 4, 1, 5, 9, 2] if pipe.num_classes else None
        scale = [0.0, 1.0, 2.0, 3.0, 0.5, 1.5, 4.0] if pipe.guidance else None
        a = eager.sample(7, seed=5, labels=labels, scale=scale, batch_size=3)
        b = graphed.sample(7, seed=5, labels=labels, scale=scale, batch_size=3)
        assert sorted(graphed._graphed) == [1, 3]
        assert torch.abs(a - b).max() <= 1e-5, name
        captured = dict(graphed._graphed)
        c = graphed.sample(7, seed=6, labels=labels, batch_size=3)  # default scale again, another seed
        assert graphed._graphed == captured  # replayed, not captured again
        assert torch.abs(c - eager.sample(7, seed=6, labels=labels, batch_size=3)).max() <= 1e-5, name
        cpu = pipe.sample(7, seed=5, labels=labels, scale=scale)
        assert torch.abs(b - cpu).max() < 1e-4, name


def test_compose_cuda_graphs_from_the_cli(tmp_path):
    out_a, out_b = tmp_path / "a.npy", tmp_path / "b.npy"
    r = run("compose", "--device", "cuda", "--cuda-graphs", "-n", 6, "--steps", 20, "--out", out_a)
    assert r.exit_code == 0 and "torch cuda, CUDA graphs" in r.output, (r.output, r.stderr)
    r = run("compose", "--device", "cuda", "-n", 6, "--steps", 20, "--out", out_b)
    assert r.exit_code == 0, r.stderr
    assert np.abs(np.load(out_a) - np.load(out_b)).max() <= 1e-5


def test_a_step_that_syncs_with_the_host_is_refused_in_one_line():
    """Last in this file: a failed capture may leave the CUDA context unusable for what follows."""
    from attrs import define

    ddim = type(toolkit.compose().sampler)

    @define(frozen=True)
    class Syncing(ddim):
        def step(self, model_fn, x, state, i, plan, noise):
            if float(x.abs().max()) > 1e9:  # reads a GPU value on the host: not capturable
                raise AssertionError
            return ddim.step(self, model_fn, x, state, i, plan, noise)

    pipe = toolkit.compose(sampler=Syncing(), steps=5, device="cuda", cuda_graphs=True)
    with pytest.raises(ToolkitError, match="cannot be captured as a CUDA graph"):
        pipe.sample(2)
