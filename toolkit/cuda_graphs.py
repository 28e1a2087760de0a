"""The whole sampling loop of one batch shape as one CUDA graph (the torch backend's ``--cuda-graphs``).

Every step's kernels are launched from Python once, at capture, then replayed for each batch of that shape:
no per-step launch overhead, which dominates small batches on a GPU (``bench/bench_gpu.py``). The graph
reads its inputs from static buffers: x_T, all the run's step noise [iterations, D, B, ...] (drawn before
the replay from the same per-sample streams as the eager loop, in the same order, so the samples are the
eager loop's), the labels and the guidance scales. One graph is captured per batch size, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from attrs import define, field
from torch import Tensor

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from toolkit.pipeline import Pipeline
    from toolkit.sampling import Plan


@define(eq=False)
class GraphedLoop:
    """A captured sampling loop: copy a batch's inputs into the static buffers, replay, read ``out``."""

    replay: Callable[[], None]
    x_T: Tensor
    noise: Tensor | None
    labels: Tensor | None
    scales: Tensor | None
    out: Tensor
    default_scale: float = 1.0  # what the scales buffer holds for a batch given no scales
    graph: Any = field(default=None, repr=False)  # the torch.cuda.CUDAGraph (kept alive with its memory pool)

    def __call__(self, x_T: Tensor, noise: Tensor | None, labels: Tensor | None, scales: Tensor | None) -> Tensor:
        for static, value in ((self.x_T, x_T), (self.noise, noise), (self.labels, labels)):
            if static is not None:
                static.copy_(value)
        if self.scales is not None:
            self.scales.copy_(scales) if scales is not None else self.scales.fill_(self.default_scale)
        self.replay()
        return self.out.clone()


def _cuda_capture(loop: Callable[[], Tensor], device: torch.device) -> tuple[Callable[[], None], Tensor, Any]:
    """Capture ``loop()`` as a CUDA graph after two warm-up runs on a side stream (lazy initialisation and
    library handles must not be created during capture: torch.cuda.graphs' rule)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            loop()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop()
    return graph.replay, out, graph


def _eager_capture(loop: Callable[[], Tensor], device: torch.device) -> tuple[Callable[[], None], Tensor, Any]:
    """The CPU stand-in for tests: 'replay' re-runs the loop into the same output buffer, so a loop that
    read anything but its static buffers would give another batch's samples."""
    out = loop()

    def replay() -> None:
        out.copy_(loop())

    return replay, out, None


def check_noise_memory(iterations: int, draws: int, batch: int, shape: tuple[int, ...], free_bytes: int) -> None:
    """The captured loop holds the run's whole step noise on the device: refuse (one line) when that buffer
    would take more than half the free device memory, rather than fail inside the capture."""
    import math

    nbytes = 4 * iterations * draws * batch * math.prod(shape)
    if nbytes > free_bytes // 2:
        raise ToolkitError(f"--cuda-graphs keeps the step noise of the whole run on the GPU: {iterations} iterations × "
                           f"{draws} draws of a batch of {batch} take {nbytes / 2**30:.1f} GiB, more than half the "
                           f"free {free_bytes / 2**30:.1f} GiB; lower --batch-size or sample without --cuda-graphs")


def _free_bytes(device: torch.device) -> int:
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 1 << 62


def _capturer(device: torch.device) -> Callable:
    if device.type != "cuda":
        raise ToolkitError(f"CUDA graphs need a CUDA device, not {device}")
    return _cuda_capture


def capture(pipe: Pipeline, plan: Plan, batch: int) -> GraphedLoop:
    """The sampling loop of ``pipe`` for batches of ``batch`` samples, captured once."""
    from toolkit.sampling import run_plan

    device = pipe.device
    capture_fn = _capturer(device)
    shape = tuple(pipe.sample_shape)
    plan = plan.cast(torch.float32, device)  # every table on the device before capture: no copies inside it
    D = plan.draws_per_step
    check_noise_memory(len(plan), D, batch, shape, _free_bytes(device))
    x_T = torch.zeros(batch, *shape, device=device)
    noise = torch.zeros(len(plan), D, batch, *shape, device=device) if D else None
    labels = (torch.full((batch,), int(pipe.num_classes), dtype=torch.long, device=device)
              if pipe.num_classes is not None else None)
    guided = pipe.guidance is not None and not pipe.mean_shift
    default = float(getattr(pipe.guidance, "scale", 1.0)) if pipe.guidance is not None else 1.0
    # the scale is always a device tensor: a Python float would be copied to the GPU inside the capture
    scales = torch.full((batch,), default, device=device) if pipe.guidance is not None else None
    sampler = pipe.sampler_for(labels, scales)
    model_fn = pipe.model_fn(labels, scales if guided else None)

    def loop() -> Tensor:
        return run_plan(sampler, model_fn, plan, x_T, noise_fn=(lambda i: noise[i]) if D else None)

    try:
        replay, out, graph = capture_fn(loop, device)
    except ToolkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's step or network that syncs with the host
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ToolkitError(f"this pipeline's sampling loop cannot be captured as a CUDA graph ({first}); "
                           "sample without --cuda-graphs") from exc
    return GraphedLoop(replay, x_T, noise, labels, scales, out, default, graph)
