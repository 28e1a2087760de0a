"""Every sampling engine on one device, shipped digits UNet, DDIM: samples per second at batch 1, 16 and 256.

Contenders: ours in torch eager, with the whole sampling loop as one CUDA graph (``--cuda-graphs``), with the
network under torch.compile (and both); ours through the exported graph in onnxruntime (Loop and unrolled
layouts, an fp16 network; on a GPU the CUDA provider with IO binding, and the unrolled graph under
onnxruntime's own CUDA graph); and a diffusers DDIMScheduler loop around the same network. Each row records
the largest difference to the torch eager samples of the same seed (for fp16: its error). Contenders that
need what the device lacks are written as skipped, with the reason. One prepared script for a lent GPU; with
``--device cpu`` it runs to completion on any machine (the tests run it with ``--quick``).

    python bench/bench_gpu.py --device cuda                  # writes bench/results/gpu.json
    python bench/bench_gpu.py --device cpu --quick --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from attrs import evolve

import toolkit
from toolkit.backends import select
from toolkit.pipeline import load_predictor

RESULTS = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device, rounds: int) -> tuple[float, torch.Tensor]:
    """Best wall seconds of ``fn()`` over ``rounds`` (after one warm call), and its last output on the CPU."""
    out = fn()
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, out.detach().float().cpu()


def diffusers_contender(net, batch: int, shape, steps: int, device: torch.device):
    from diffusers import DDIMScheduler

    from toolkit.noise import NoiseStreams

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing="leading")
    x_T = NoiseStreams(0, range(batch), shape, device).draw()  # the x_T of our seed 0

    @torch.no_grad()
    def run() -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = x_T
        for t in scheduler.timesteps:
            eps = net(x, t.to(device).expand(batch).float(), None)[:, : shape[0]]  # ε without learned-Σ channels
            x = scheduler.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)

    return run


class CompiledNetwork(torch.nn.Module):
    """The shipped network under torch.compile, with the attributes a Pipeline reads."""

    def __init__(self, net, backend: str) -> None:
        super().__init__()
        self.net = net
        self.compiled = torch.compile(net, backend=backend, dynamic=False)
        for name in ("sample_shape", "num_classes", "prediction", "learned_variance"):
            setattr(self, name, getattr(net, name))

    def forward(self, x, t, y=None):
        return self.compiled(x, t, y)


def lazy(factory: Callable[[], Callable]) -> Callable:
    """A contender built on its first use (an export, a session load), and a failure to build it kept: the
    cheap contenders are measured first, and a refusal is reported once per batch without retrying."""
    built: dict[str, Any] = {}

    def make(b: int):
        if "error" in built:
            raise built["error"]
        if "make" not in built:
            try:
                built["make"] = factory()
            except Exception as exc:  # noqa: BLE001 - re-raised for every batch: one row each
                built["error"] = exc
                raise
        return built["make"](b)

    return make


def ort_session_contender(path: Path, device: torch.device):
    """Our graph in onnxruntime (CUDA provider with IO binding on a GPU: SamplerSession binds inputs and output
    on the device), sampling from seed 0 as the torch engines do."""
    from toolkit.exporters.runtime import SamplerSession

    session = SamplerSession(path, provider="cuda" if device.type == "cuda" else "cpu")
    return lambda b: (lambda: torch.from_numpy(session.sample(b, 0)))


def ort_cuda_contender(path: Path, pipe, cuda_graph: bool):
    """The unrolled graph with x_T as an input on the CUDA provider, inputs and output bound once at fixed device
    addresses (IO binding); with ``cuda_graph`` under onnxruntime's ``enable_cuda_graph``: the first run of each
    batch size captures (its own ``gpu_graph_id``), each later run replays."""
    import numpy as np
    import onnxruntime as ort

    from toolkit.rng import normal_numpy

    options = ort.SessionOptions()
    options.log_severity_level = 3
    provider = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"} if cuda_graph else {})
    session = ort.InferenceSession(str(path), options, providers=[provider])
    names = [i.name for i in session.get_inputs()]
    K = pipe.num_classes

    def make(b: int):
        x_T = normal_numpy(0, np.arange(b), 0, tuple(pipe.sample_shape)).astype(np.float32)  # draw 0: x_T of seed 0
        feeds = {"x_T": x_T}
        if "labels" in names:
            feeds["labels"] = np.full((b,), K, dtype=np.int64)
        values = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
        out = ort.OrtValue.ortvalue_from_shape_and_type((b, *pipe.output_shape), np.float32, "cuda", 0)
        binding = session.io_binding()
        for k, v in values.items():
            binding.bind_ortvalue_input(k, v)
        binding.bind_ortvalue_output("x0", out)
        run_options = ort.RunOptions()
        if cuda_graph:
            run_options.add_run_config_entry("gpu_graph_id", str(b))  # one captured graph per batch size

        def run() -> torch.Tensor:
            session.run_with_iobinding(binding, run_options)
            return torch.from_numpy(out.numpy())

        return run

    return make


def contenders(pipe, device: torch.device, quick: bool, tmp: Path) -> dict[str, Callable | str]:
    """name → a function (batch → run()) or the reason it is skipped here."""
    from toolkit.exporters.onnx import export_sampler

    out: dict[str, Callable | str] = {}
    cuda = device.type == "cuda"
    eager = select(pipe, "torch")
    out["ours_torch_eager"] = lambda b: (lambda: eager.sample(b, 0))
    if cuda:
        graphed = select(evolve(pipe, cuda_graphs=True), "torch")
        out["ours_torch_cuda_graphs"] = lambda b: (lambda: graphed.sample(b, 0))
    else:
        out["ours_torch_cuda_graphs"] = "needs CUDA"
    net = pipe.predictor
    # the quick check traces the network with dynamo only (backend "eager"): inductor's C++ build takes minutes
    compiled_pipe = evolve(pipe, predictor=CompiledNetwork(net, "eager" if quick else "inductor"))
    compiled = select(compiled_pipe, "torch")
    out["ours_torch_compiled"] = lambda b: (lambda: compiled.sample(b, 0))
    if cuda:
        compiled_graphed = select(evolve(compiled_pipe, cuda_graphs=True), "torch")
        out["ours_torch_compiled_cuda_graphs"] = lambda b: (lambda: compiled_graphed.sample(b, 0))
    else:
        out["ours_torch_compiled_cuda_graphs"] = "needs CUDA"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        for name in ("loop", "unrolled", "fp16", "unrolled_cuda_graph"):
            out[f"ours_onnxruntime_{name}"] = "onnxruntime is not installed"
    else:
        provider_ok = not cuda or "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        cpu_pipe = evolve(pipe, device=torch.device("cpu"), predictor=load_predictor("digits")[0]) if cuda else pipe

        def graph_contender(name: str, **kw):  # exported and loaded on its first batch, after the cheap rows
            return lazy(lambda: ort_session_contender(export_sampler(cpu_pipe, tmp / f"{name}.onnx", **kw), device))

        for name, kw in (("loop", {"layout": "loop"}), ("fp16", {"layout": "loop", "precision": "fp16"})):
            out[f"ours_onnxruntime_{name}"] = (graph_contender(name, **kw) if provider_ok else
                                               "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)")
        if not cuda:
            out["ours_onnxruntime_unrolled"] = graph_contender("unrolled", layout="unrolled")
            out["ours_onnxruntime_unrolled_cuda_graph"] = "needs CUDA and onnxruntime's CUDA provider"
        elif provider_ok:
            # on CUDA the unrolled graph runs under onnxruntime's CUDA graph, the point of unrolling there (one
            # session: loading a 50-step unrolled graph takes a minute or more)
            out["ours_onnxruntime_unrolled"] = "measured under onnxruntime's CUDA graph (the next row)"
            out["ours_onnxruntime_unrolled_cuda_graph"] = lazy(lambda: ort_cuda_contender(
                export_sampler(cpu_pipe, tmp / "unrolled.onnx", layout="unrolled", noise="inputs"), pipe,
                cuda_graph=True))
        else:
            out["ours_onnxruntime_unrolled"] = "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
            out["ours_onnxruntime_unrolled_cuda_graph"] = "needs onnxruntime's CUDA provider"
    try:
        import diffusers  # noqa: F401

        out["diffusers_eager"] = lambda b: diffusers_contender(net, b, pipe.sample_shape, pipe.steps, device)
    except ImportError:
        out["diffusers_eager"] = "diffusers is not installed (pip install 'diffusion-toolkit[diffusers]')"
    first = ("ours_torch_eager", "ours_torch_cuda_graphs", "diffusers_eager", "ours_onnxruntime_loop",
             "ours_onnxruntime_fp16")  # cheap first: a run cut short still has them
    return {**{k: out[k] for k in first}, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 2, 5 steps, one round")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu to check the script)")
    steps, rounds, batches = (5, 1, (1, 2)) if args.quick else (args.steps, args.rounds, (1, 16, 256))
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(done: bool) -> None:  # after every row: a run stopped early still leaves what it measured
        result = {"config": {"device": str(device), "steps": steps, "rounds": rounds, "batches": list(batches),
                             "quick": args.quick, "model": "digits", "sampler": "ddim", "complete": done},
                  "machine": {"torch": torch.__version__, "platform": platform.platform(),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "threads": torch.get_num_threads()},
                  "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TOOLKIT_CACHE_DIR"] = str(Path(tmp) / "cache")
        pipe = toolkit.compose(steps=steps, device=device)
        table = contenders(pipe, device, args.quick, Path(tmp))
        for batch in batches:
            reference = None
            for name, make in table.items():
                if isinstance(make, str):
                    rows.append({"contender": name, "batch": batch, "skipped": make})
                    continue
                try:
                    seconds, x = timed(make(batch), device, rounds)
                except Exception as exc:  # noqa: BLE001 - one contender failing on a GPU must not lose the others
                    if device.type != "cuda":
                        raise
                    why = " ".join(str(exc).split())[:300]
                    rows.append({"contender": name, "batch": batch, "failed": f"{type(exc).__name__}: {why}"})
                    print(f"batch {batch:>4} {name:<26} failed: {why}", flush=True)
                    write(False)
                    continue
                reference = x if reference is None else reference
                diff = float((x - reference).abs().max())
                rows.append({"contender": name, "batch": batch, "seconds": seconds, "samples_per_s": batch / seconds,
                             "max_abs_diff_to_eager": diff})
                print(f"batch {batch:>4} {name:<26} {batch / seconds:>10.1f} samples/s  (max diff {diff:.1e})",
                      flush=True)
                write(False)
    write(True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
