"""Which engine samples a pipeline: torch, or the pipeline's exported graph in onnxruntime.

``auto`` (what ``compose`` and ``evaluate`` use unless told otherwise) picks onnxruntime on the CPU when
the pipeline exports and its graph, checked once against torch on a few samples, agrees within
``VERIFY_TOLERANCE`` (its loop takes 0.25–0.85 of torch's CPU time, batch 1 to 256,
`bench/bench_sampling.py`); else torch, with the reason. Both engines give the same samples for the same
seed: the graph makes its noise with the same counter-based generator (``toolkit.rng``) as the torch backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from attrs import define, field

from toolkit.errors import ToolkitError
from toolkit.graph_index import VERIFY_TOLERANCE

if TYPE_CHECKING:  # imported where used: a recorded graph (toolkit.graph_index) samples without importing torch
    from torch import Tensor

    from toolkit.pipeline import Pipeline

BACKENDS = ("auto", "torch", "onnxruntime")
VERIFY_SAMPLES = 2


def check_threads(threads: Any) -> int:
    """A thread count for either engine: a positive integer (None: the cores available to this process)."""
    from toolkit.exporters.runtime import GraphError
    from toolkit.exporters.runtime import check_threads as check

    try:
        return check(threads)
    except GraphError as exc:
        raise ToolkitError(str(exc)) from None


@define(frozen=True)
class Engine:
    """A pipeline bound to the engine that samples it; ``batches`` streams samples as ``Pipeline.batches`` does."""

    name: str  # "torch" or "onnxruntime"
    pipeline: Pipeline
    reason: str  # why this engine: one phrase for the user
    session: Any = field(default=None, repr=False)  # the onnxruntime SamplerSession
    graph: Path | None = None

    @property
    def label(self) -> str:
        """What ran, as the command reports it: 'torch' or 'onnxruntime cpu, 2 threads'."""
        if self.name == "torch":
            import torch

            threads = torch.get_num_threads()
        else:
            threads = self.session.threads
        device = self.pipeline.device.type if self.name == "torch" else self.session.provider
        graphs = ", CUDA graphs" if self.name == "torch" and self.pipeline.cuda_graphs else ""
        return f"{self.name} {device}{graphs}, {threads} thread{'' if threads == 1 else 's'}"

    def batches(self, n: int, seed: int = 0, labels: int | Sequence[int] | Tensor | None = None, *,
                scale: float | Sequence[float] | Tensor | None = None, offset: int = 0, batch_size: int | None = None,
                progress: Callable[[int], None] | None = None) -> Iterator[Tensor]:
        """Samples offset..offset+n-1 of run ``seed``, one batch at a time (on the CPU, in [-1, 1])."""
        pipe = self.pipeline
        if self.name == "torch":
            return pipe.batches(n, seed, labels, scale=scale, offset=offset, batch_size=batch_size, progress=progress)
        import torch

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ToolkitError(f"n must be a positive integer, got {n!r}")
        y = pipe._label_cycle(n, labels)  # the same checks as torch; the graph then cycles nothing itself
        if y is not None and labels is None:
            y = None  # the graph samples the null label itself
        if scale is not None and pipe.guidance is None:
            raise ToolkitError("scale given but the pipeline has no guidance")
        s = scale
        if isinstance(s, torch.Tensor):
            s = float(s) if s.numel() == 1 else s.reshape(-1).tolist()
        elif isinstance(s, (list, tuple)) and len(s) == 1:
            s = float(s[0])
        bs = batch_size or pipe.batch_size
        inner = graph_batches(self.session, n, seed, None if y is None else y.tolist(), s, offset=offset,
                              batch_size=bs)

        def ticking() -> Iterator[Tensor]:
            for x in inner:
                if progress is not None:
                    progress(pipe.iterations)
                yield torch.from_numpy(x)

        return ticking()

    def sample(self, n: int, seed: int = 0, labels: int | Sequence[int] | Tensor | None = None, **kw: Any) -> Tensor:
        """All n samples at once [n, *output_shape]."""
        import torch

        return torch.cat(list(self.batches(n, seed, labels, **kw)))


def open_session(path: str | os.PathLike, provider: str, threads: int | None):
    """An onnxruntime SamplerSession whose refusals (a bad file, no CUDA) are ToolkitErrors: one line in the CLI."""
    from toolkit.exporters.runtime import GraphError, SamplerSession

    try:
        return SamplerSession(path, provider=provider, threads=threads)
    except GraphError as exc:
        raise ToolkitError(str(exc)) from exc


def graph_batches(session, n: int, seed: int = 0, labels: Any = None, scale: Any = None, *, offset: int = 0,
                  batch_size: int = 500, image: Any = None, mask: Any = None) -> Iterator[np.ndarray]:
    """Samples offset..offset+n-1 of run ``seed`` from a ``runtime.SamplerSession``, one numpy batch at a time;
    labels (a list) are cycled over the samples, an inpainting graph's image [n, ...] and mask (one for all or
    one per image) are sliced with them. Needs no torch."""
    from toolkit.exporters.runtime import GraphError

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ToolkitError(f"n must be a positive integer, got {n!r}")
    y = None if labels is None else list(labels) if isinstance(labels, (list, tuple)) else labels
    if isinstance(y, list) and not y:
        raise ToolkitError("labels must not be empty")

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            yb = y
            if isinstance(y, list):  # sample i takes label i mod len(labels)
                yb = [y[i % len(y)] for i in range(start, stop)]
            scale_b = scale[start:stop] if isinstance(scale, (list, tuple)) and len(scale) == n else scale
            known = {k: (v[start:stop] if v.ndim == len(session.sample_shape) + 1 and len(v) == n else v)
                     for k, v in (("image", image), ("mask", mask)) if v is not None}
            known = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in known.items()}
            try:
                yield session.sample(stop - start, seed=seed, labels=yb, scale=scale_b, offset=offset + start,
                                     batch_size=stop - start, **known)
            except GraphError as exc:
                raise ToolkitError(str(exc)) from exc

    return batches()


def provider_for(device: Any) -> str:
    """onnxruntime's provider for a torch device or its name ("cuda:1" → cuda); anything else is refused."""
    kind = str(getattr(device, "type", device)).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ToolkitError(f"--device must be cpu or cuda, got {device!r}")
    return kind


def _verified(path: Path, pipe: Pipeline, session: Any) -> float:
    """max |torch − graph| over a few samples of seed 0, computed once per cached graph (recorded beside it)."""
    from toolkit.files import atomic_write

    record = path.with_suffix(".verified.json")
    digest = path.with_suffix(".sha256").read_text().strip()  # checked against the file by cached_sampler_graph

    try:
        saved = json.loads(record.read_text())
        if saved.get("sha256") == digest:
            return float(saved["max_abs_diff"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    K = pipe.num_classes
    labels = [k % K for k in range(VERIFY_SAMPLES)] if K is not None and pipe.guidance is not None else None
    engines = (Engine("torch", pipe, ""), Engine("onnxruntime", pipe, "", session, path))
    a, b = (e.sample(VERIFY_SAMPLES, 0, labels) for e in engines)
    diff = float((a - b).abs().max())
    text = json.dumps({"sha256": digest, "max_abs_diff": diff, "samples": VERIFY_SAMPLES})
    atomic_write(record, lambda tmp: Path(tmp).write_text(text + "\n"))
    return diff


def select(pipe: Pipeline, backend: str = "auto", *, threads: int | None = None, layout: str = "loop",
           graph: str | os.PathLike | None = None) -> Engine:
    """The engine for ``pipe``: ``torch``, ``onnxruntime`` (its graph exported to the cache on first use, or
    ``graph``), or ``auto``: onnxruntime where the pipeline exports and its graph agrees with torch, else torch.

    ``threads`` sets onnxruntime's threads (default: the cores available to this process); torch keeps the
    process's ``torch.get_num_threads()``. An explicit ``onnxruntime`` for a pipeline that cannot be exported
    raises ToolkitError saying why.
    """
    if backend not in BACKENDS:
        raise ToolkitError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    threads = check_threads(threads)
    if backend == "torch":
        return Engine("torch", pipe, "asked for")
    from toolkit.exporters.onnx import cached_sampler_graph

    if backend == "onnxruntime":
        path = Path(graph) if graph is not None else cached_sampler_graph(pipe, layout)
        return Engine("onnxruntime", pipe, "asked for", open_session(path, provider_for(pipe.device), threads), path)
    if pipe.device.type != "cpu":
        return Engine("torch", pipe, f"on {pipe.device.type} the torch backend (the ONNX path is measured on CPU only)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return Engine("torch", pipe, "onnxruntime is not installed")
    try:
        path = cached_sampler_graph(pipe, layout)
    except ToolkitError as exc:
        return Engine("torch", pipe, f"the pipeline does not export ({str(exc).split(':')[0]})")
    session = open_session(path, provider_for(pipe.device), threads)
    diff = _verified(path, pipe, session)
    if not diff <= VERIFY_TOLERANCE:
        return Engine("torch", pipe, f"its exported graph differs from torch by {diff:.2g} > {VERIFY_TOLERANCE:g}")
    return Engine("onnxruntime", pipe, f"its exported graph matches torch (max difference {diff:.1g})", session, path)
