"""Run an exported sampler graph with onnxruntime and numpy only (this module never imports torch).

    >>> from toolkit.exporters.runtime import SamplerSession
    >>> s = SamplerSession("sampler.onnx")            # CUDA when really available, else CPU
    >>> x = s.sample(16, seed=0, labels=[7] * 16)     # [16, *sample_shape] float32 in [-1, 1]

The noise is drawn here with numpy (one stream per sample, as in the toolkit); pass ``x_T`` and
``noise`` to reproduce another run exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

SAMPLER_KIND = "diffusion-toolkit-sampler"
PROVIDERS = ("auto", "cpu", "cuda")


class GraphError(ValueError):
    """A file that is not a toolkit sampler graph, or inputs that do not fit it."""


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise GraphError("running a sampler graph needs onnxruntime: pip install onnxruntime "
                         "(onnxruntime-gpu for CUDA)") from exc
    return onnxruntime


def draw_noise(seed: int, n: int, shape: Sequence[int], steps: int, stochastic: bool,
               offset: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """x_T [n, *shape] and step noise [slots, n, *shape]: sample i's values come from its own numpy stream."""
    xs, noises = [], []
    for i in range(offset, offset + n):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, i]))
        xs.append(rng.standard_normal(tuple(shape), dtype=np.float32))
        if stochastic:
            noises.append(rng.standard_normal((steps, *shape), dtype=np.float32))
    x_T = np.stack(xs)
    noise = np.ascontiguousarray(np.stack(noises, axis=1)) if stochastic else None
    return x_T, noise


class SamplerSession:
    """An onnxruntime session over a sampler graph written by ``toolkit export onnx``."""

    def __init__(self, path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        ort = _onnxruntime()
        if provider not in PROVIDERS:
            raise GraphError(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise GraphError(f"no sampler graph at {path!r}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        wanted = ["CPUExecutionProvider"]
        if provider != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(path, options, providers=wanted)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; say what it means
            raise GraphError(f"{path!r} is not a loadable ONNX graph ({str(exc).strip().splitlines()[0][:300]})") \
                from exc
        # onnxruntime-gpu lists CUDA even without a GPU and falls back silently: ask the session
        self.provider = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if provider == "cuda" and self.provider != "cuda":
            raise GraphError("the CUDA execution provider is not available here (no GPU, or onnxruntime "
                             "without CUDA): use provider='cpu'")
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("kind") != SAMPLER_KIND:
            raise GraphError(f"{path!r} is not a diffusion-toolkit sampler graph (export one with "
                             f"`toolkit export onnx`)")
        self.path = path
        self.metadata: dict[str, str] = dict(meta)
        self.sample_shape = tuple(json.loads(meta["sample_shape"]))  # of x_T (latents, for a latent model)
        self.output_shape = tuple(json.loads(meta.get("output_shape") or meta["sample_shape"]))
        self.steps = int(meta["steps"])
        # noise slots: iterations × draws per step (graphs before plugin API 2: one per step)
        self.noise_slots = int(meta.get("noise_slots") or meta["steps"])
        self.stochastic = json.loads(meta["stochastic"])
        self.num_classes = json.loads(meta["num_classes"])
        self.guidance = meta.get("guidance") or None
        self.default_scale = json.loads(meta["guidance_scale"]) if meta.get("guidance_scale") else None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        expected = set(json.loads(meta["inputs"]))
        if set(self.inputs) != expected:
            raise GraphError(f"{path!r}: graph inputs {sorted(self.inputs)} do not match its metadata {sorted(expected)}")

    def _dtype(self, name: str):
        return {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                "tensor(double)": np.float64}[self.inputs[name].type]

    def _labels(self, n: int, labels: Any) -> np.ndarray | None:
        if "labels" not in self.inputs:
            if labels is not None:
                raise GraphError("this graph's model is unconditional: it takes no labels")
            return None
        K = int(self.num_classes)
        if labels is None:
            if self.guidance:
                raise GraphError(f"{self.guidance} guidance needs class labels")
            return np.full(n, K, self._dtype("labels"))  # the null label ∅: unconditional samples
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        if y.size == 0:
            raise GraphError("labels must not be empty")
        if y.min() < 0 or y.max() >= K:
            raise GraphError(f"class label {int(y.min() if y.min() < 0 else y.max())} is out of range: "
                             f"this graph has classes 0..{K - 1}")
        return np.resize(y, n).astype(self._dtype("labels"))

    def _scale(self, n: int, scale: Any) -> np.ndarray | None:
        if "scale" not in self.inputs:
            if scale is not None:
                raise GraphError("this graph has no guidance: it takes no scale")
            return None
        s = np.asarray(self.default_scale if scale is None else scale, dtype=np.float32).reshape(-1)
        if s.size not in (1, n):
            raise GraphError(f"scale must be one number or one per sample ({n}), got {s.size}")
        if (s < 0).any():
            raise GraphError("guidance scale must not be negative")
        return np.broadcast_to(s, (n,)).astype(np.float32)

    def check(self, x_T: np.ndarray, noise: np.ndarray | None) -> None:
        """Shapes and dtypes of x_T and noise against the graph, with a message that says what is wrong."""
        shape = self.sample_shape
        if x_T.ndim != len(shape) + 1 or tuple(x_T.shape[1:]) != shape:
            raise GraphError(f"x_T must have shape [B, {', '.join(map(str, shape))}], got {list(x_T.shape)}")
        if "noise" in self.inputs:
            want = (self.noise_slots, x_T.shape[0], *shape)
            if noise is None or tuple(noise.shape) != want:
                got = None if noise is None else list(noise.shape)
                raise GraphError(f"noise must have shape {list(want)} (noise slots, batch, sample), got {got}")
        elif noise is not None:
            raise GraphError("this graph's sampler is deterministic: it takes no noise")

    def run(self, x_T: np.ndarray, noise: np.ndarray | None = None, labels: np.ndarray | None = None,
            scale: np.ndarray | None = None) -> np.ndarray:
        """One call of the graph on prepared inputs (checked); IO binding on CUDA keeps them on the device."""
        x_T = np.ascontiguousarray(x_T, dtype=np.float32)
        noise = None if noise is None else np.ascontiguousarray(noise, dtype=np.float32)
        self.check(x_T, noise)
        n = x_T.shape[0]
        feed = {"x_T": x_T}
        if noise is not None:
            feed["noise"] = noise
        y, s = self._labels(n, labels), self._scale(n, scale)
        if y is not None:
            feed["labels"] = y
        if s is not None:
            feed["scale"] = s
        if self.provider == "cuda":
            ort = _onnxruntime()
            binding = self.session.io_binding()
            for name, value in feed.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            binding.bind_output("x0", "cuda", 0)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return self.session.run(["x0"], feed)[0]

    def sample(self, n: int, seed: int = 0, labels: Any = None, scale: Any = None, *, x_T: np.ndarray | None = None,
               noise: np.ndarray | None = None, batch_size: int = 500) -> np.ndarray:
        """n samples [n, *sample_shape] in [-1, 1]; noise from ``seed`` unless x_T (and noise) are given."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise GraphError(f"n must be a positive integer, got {n!r}")
        if batch_size < 1:
            raise GraphError(f"batch size must be positive, got {batch_size}")
        if x_T is not None and len(x_T) != n:
            raise GraphError(f"x_T holds {len(x_T)} samples, not n={n}")
        y, s = self._labels(n, labels), self._scale(n, scale)
        out = []
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            if x_T is None:
                xb, nb = draw_noise(seed, stop - start, self.sample_shape, self.noise_slots, "noise" in self.inputs,
                                    offset=start)
            else:
                xb = np.asarray(x_T)[start:stop]
                nb = None if noise is None else np.asarray(noise)[:, start:stop]
            out.append(self.run(xb, nb, None if y is None else y[start:stop],
                                None if s is None else s[start:stop]))
        return np.concatenate(out)
