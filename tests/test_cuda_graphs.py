"""The torch backend's --cuda-graphs on any machine: the captured loop reads its inputs from static buffers only
(checked with a stand-in 'capture' that replays the loop on the CPU), and bad requests are refused. The real
capture on a GPU is tested in tests/test_cuda.py."""

import pytest
import torch
from attrs import evolve

import toolkit
from helpers import one_line_error, run
from toolkit import cuda_graphs
from toolkit.errors import ToolkitError


@pytest.fixture
def stand_in(monkeypatch):
    """CPU 'capture': the loop built once over the static buffers, each replay re-running it into the same output."""
    captured = []

    def capturer(device):
        def capture(loop, device):
            captured.append(1)
            return cuda_graphs._eager_capture(loop, device)
        return capture

    monkeypatch.setattr(cuda_graphs, "_capturer", capturer)
    return captured


@pytest.mark.parametrize("kw", [
    dict(sampler="ddpm", steps=20),  # stochastic: the step noise goes in through the noise buffer
    dict(sampler="dpmpp-2m", steps=6, guidance="cfg", guidance_options={"scale": 2.0}),  # state, labels, scales
])
def test_the_captured_loop_reads_only_its_static_buffers(stand_in, kw):
    """7 samples in batches of 3: two captures (sizes 3 and 1), then replays. Had the loop kept the first batch's
    x_T, noise, labels or scales, later batches would repeat them; the samples equal the eager loop's exactly."""
    eager = toolkit.compose(**kw)
    graphed = evolve(eager, cuda_graphs=True)
    labels = [3, 1, 4, 1, 5, 9, 2]
    scale = [0.0, 1.0, 2.0, 3.0, 0.5, 1.5, 4.0] if eager.guidance else None
    a = eager.sample(7, seed=5, labels=labels, scale=scale, batch_size=3)
    b = graphed.sample(7, seed=5, labels=labels, scale=scale, batch_size=3)
    assert torch.equal(a, b)
    assert sorted(graphed._graphed) == [1, 3] and len(stand_in) == 2
    c = graphed.sample(7, seed=6, labels=[0], batch_size=3)  # no scale: the guidance's default is put back
    assert torch.equal(c, eager.sample(7, seed=6, labels=[0], batch_size=3))
    assert len(stand_in) == 2  # replayed, not captured again
    assert not torch.equal(b[:3], b[3:6])


def test_cuda_graphs_are_refused_where_they_cannot_run():
    with pytest.raises(ToolkitError, match="CUDA graphs need a CUDA device"):
        toolkit.compose(cuda_graphs=True)
    with pytest.raises(ToolkitError, match="CUDA graphs need a CUDA device"):
        evolve(toolkit.compose(steps=3), cuda_graphs=True).sample(2)  # never captured on the CPU
    with pytest.raises(ToolkitError, match="cuda_graphs must be True or False"):
        toolkit.compose(cuda_graphs="yes")


@pytest.mark.parametrize("args,message", [
    ([], "--cuda-graphs needs --device cuda, not 'cpu'"),
    (["--backend", "onnxruntime"], "--cuda-graphs is an option of the torch backend"),
    (["--device", "cuda", "--init", "x.npy"], "--cuda-graphs captures sampling from seeds: drop --init"),
])
def test_cli_refuses_cuda_graphs_in_one_line(tmp_path, args, message):
    out = tmp_path / "x.npy"
    one_line_error(run("compose", "--cuda-graphs", *args, "-n", 2, "--steps", 3, "--out", out), message)
    assert not out.exists()


def test_a_step_noise_buffer_larger_than_half_the_free_memory_is_refused():
    """ddpm at 1000 steps keeps 1000 × B draws on the device: refused in one sentence, not an allocator failure."""
    shape = (4, 32, 32)
    cuda_graphs.check_noise_memory(1000, 1, 16, shape, free_bytes=2**30)  # 250 MiB of 1 GiB: fine
    with pytest.raises(ToolkitError, match=r"1000 iterations × 1 draws of a batch of 500 take 7\.6 GiB.*lower --batch-size"):
        cuda_graphs.check_noise_memory(1000, 1, 500, shape, free_bytes=8 * 2**30)
