"""Run an exported sampler graph with onnxruntime and numpy only (this module never imports torch).

    >>> from toolkit.exporters.runtime import SamplerSession
    >>> s = SamplerSession("sampler.onnx")            # CUDA when really available, else CPU
    >>> x = s.sample(16, seed=0, labels=[7] * 16)     # [16, *sample_shape] float32 in [-1, 1]

A graph exported with the default ``--noise seed`` makes its own noise from (seed, sample number) with the
toolkit's counter-based generator (``toolkit.rng``), so a seed gives the same samples here, in torch, in Node
and in a browser. A ``--noise inputs`` graph takes x_T and noise; they are drawn here with the same generator
(numpy) unless given.
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


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's limit), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """OMP_NUM_THREADS where it is set to a positive integer (what torch and OpenMP programs honour), else the
    cores available to this process."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else available_cores()


def check_threads(threads: Any) -> int:
    """A thread count: a positive integer (None: ``default_threads()``)."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise GraphError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise GraphError("running a sampler graph needs onnxruntime: pip install onnxruntime "
                         "(onnxruntime-gpu for CUDA)") from exc
    return onnxruntime


def draw_noise(seed: int, n: int, shape: Sequence[int], slots: int, stochastic: bool,
               offset: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """x_T [n, *shape] and step noise [slots, n, *shape] of samples offset..offset+n-1 (toolkit.rng: draw 0 is
    x_T, slot j is draw 1 + j): the numbers the torch backend and seed-only graphs use."""
    from toolkit.rng import normal_numpy

    index = np.arange(offset, offset + n, dtype=np.int64)
    x_T = normal_numpy(seed, index, 0, tuple(shape))
    noise = np.stack([normal_numpy(seed, index, 1 + j, tuple(shape)) for j in range(slots)]) if stochastic else None
    return x_T, noise


def _json(key: str, raw: str, version: int) -> Any:
    if version < 2:  # graphs of metadata version 1 kept some values as raw strings
        if raw in ("", "null"):
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    try:
        return json.loads(raw)
    except ValueError:
        raise GraphError(f"metadata {key!r} is not JSON: {raw[:80]!r}") from None


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 4 and all(_is_int(d, 1) for d in v)


METADATA_CHECKS: dict[str, tuple[bool, Any, str]] = {  # key: (required, check, what it must be)
    "sample_shape": (True, _is_shape, "a list of 1 to 4 positive sizes"),
    "output_shape": (False, _is_shape, "a list of 1 to 4 positive sizes"),
    "steps": (True, lambda v: _is_int(v, 1), "a positive integer"),
    "noise_slots": (False, _is_int, "an integer >= 0"),
    "stochastic": (True, lambda v: isinstance(v, bool), "true or false"),
    "num_classes": (False, lambda v: _is_int(v, 1), "null or a positive integer"),
    "guidance": (False, lambda v: v is None or isinstance(v, str), "null or a name"),
    "guidance_scale": (False, lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and v >= 0), "null or a number >= 0"),
    "inputs": (True, lambda v: isinstance(v, list) and all(isinstance(e, str) for e in v), "a list of names"),
    "sampler": (True, lambda v: isinstance(v, str), "a name"),
    "schedule": (True, lambda v: isinstance(v, str), "a name"),
}


def read_metadata(raw: dict[str, str], where: str = "graph") -> dict[str, Any]:
    """A sampler graph's metadata_props as Python values, every field the runtime uses checked (GraphError
    naming the field otherwise); graphs of metadata version 1 (some raw strings) are read too."""
    version = raw.get("metadata_version", "1")
    version = int(version) if version.isdigit() else 1
    kind = _json("kind", raw.get("kind", ""), version)
    if kind != SAMPLER_KIND:
        raise GraphError(f"{where} is not a diffusion-toolkit sampler graph (export one with `toolkit export onnx`)")
    meta = {k: _json(k, v, version) for k, v in raw.items()}
    for key, (required, check, what) in METADATA_CHECKS.items():
        if meta.get(key) is None:
            if required:
                raise GraphError(f"{where}: metadata {key!r} is missing")
            meta[key] = None
            continue
        if not check(meta[key]):
            raise GraphError(f"{where}: metadata {key!r} must be {what}, got {meta[key]!r}")
    meta["output_shape"] = meta["output_shape"] or meta["sample_shape"]
    if meta.get("noise_slots") is None:
        meta["noise_slots"] = meta["steps"]  # graphs before plugin API 2: one slot per step
    return meta


def _ort_message(exc: BaseException) -> str:
    """onnxruntime's error as one line; an in-graph input check is named by its node."""
    text = " ".join(str(exc).split())
    marker = "Name:'input check failed: "
    if marker in text:
        return text.split(marker, 1)[1].split("'", 1)[0]
    return text[:300]


def _cuda_device_present() -> bool:
    """Whether this machine has an NVIDIA device at all: without one, the CUDA provider is not even tried
    (onnxruntime-gpu would print a red libcublas/libcudart error on every session)."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg")) or os.name == "nt"


class SamplerSession:
    """An onnxruntime session over a sampler graph written by ``toolkit export onnx``."""

    def __init__(self, path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        """``threads`` (default: ``default_threads()``): on the CPU, a batch is split into that many contiguous
        shards run at once, each by one onnxruntime thread. Sample i depends only on (seed, i), so the shards
        give the same numbers as one call; on this UNet it takes 0.7–0.9 of the CPU time of onnxruntime's own
        intra-op threads (which also lose at batch 1: 1.6× slower than one thread), with threads that never
        spin-wait (``bench/bench_sampling.py``)."""
        ort = _onnxruntime()
        self.threads = check_threads(threads)
        self._pool = None  # the shards' threads, started on the first batch that has more than one shard
        if provider not in PROVIDERS:
            raise GraphError(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise GraphError(f"no sampler graph at {path!r}")
        options = ort.SessionOptions()
        options.log_severity_level = 4  # its errors come back as GraphError; no red lines on stderr
        options.intra_op_num_threads = 1  # parallel over the batch instead (see _run_sharded)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        wanted = ["CPUExecutionProvider"]
        if (provider == "cuda" or (provider == "auto" and _cuda_device_present())) \
                and "CUDAExecutionProvider" in ort.get_available_providers():
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(path, options, providers=wanted)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; say what it means
            raise GraphError(f"{path!r} is not a loadable ONNX graph ({_ort_message(exc)})") from exc
        # onnxruntime-gpu lists CUDA even without a GPU and falls back silently: ask the session
        self.provider = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if provider == "cuda" and self.provider != "cuda":
            raise GraphError("the CUDA execution provider is not available here (no GPU, or onnxruntime "
                             "without CUDA): use provider='cpu'")
        self.path = path
        self.metadata = read_metadata(dict(self.session.get_modelmeta().custom_metadata_map), repr(path))
        meta = self.metadata
        self.sample_shape = tuple(meta["sample_shape"])  # of x_T (latents, for a latent model)
        self.output_shape = tuple(meta["output_shape"])
        self.steps = meta["steps"]
        self.noise_slots = meta["noise_slots"]
        self.stochastic = meta["stochastic"]
        self.num_classes = meta["num_classes"]
        self.guidance = meta.get("guidance") or None
        self.default_scale = meta.get("guidance_scale")
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        # each input's batch axis (the dimension named "batch"); None: passed whole (the seed). A graph with an
        # input of neither kind is never split.
        axes = {name: (i.shape.index("batch") if "batch" in i.shape else None) for name, i in self.inputs.items()}
        shardable = all(a is not None or i.shape == [] for a, i in zip(axes.values(), self.inputs.values()))
        self._batch_axes = axes if shardable else None
        self.seeded = "seed" in self.inputs
        if set(self.inputs) != set(meta["inputs"]):
            raise GraphError(f"{path!r}: graph inputs {sorted(self.inputs)} do not match its metadata "
                             f"{sorted(meta['inputs'])}")

    def _dtype(self, name: str):
        return {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                "tensor(double)": np.float64}[self.inputs[name].type]

    def _labels(self, n: int, labels: Any) -> np.ndarray | None:
        """Integer labels, one for all or one per sample, in 0..K (K, the null label, samples unconditionally)."""
        if "labels" not in self.inputs:
            if labels is not None:
                raise GraphError("this graph's model is unconditional: it takes no labels")
            return None
        K = int(self.num_classes)
        if labels is None:
            if self.guidance:
                raise GraphError(f"{self.guidance} guidance needs class labels")
            return np.full(n, K, self._dtype("labels"))  # the null label ∅: unconditional samples
        y = np.asarray(labels)
        if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
            raise GraphError(f"labels must be integers, got {y.dtype} {np.ravel(y)[:4].tolist()}")
        y = y.astype(np.int64).reshape(-1)
        if y.size not in (1, n):
            raise GraphError(f"labels must be one label or one per sample ({n}), got {y.size}")
        if y.min() < 0 or y.max() > K:
            raise GraphError(f"class label {int(y.min() if y.min() < 0 else y.max())} is out of range: "
                             f"this graph has classes 0..{K - 1} and the null label {K}")
        return np.broadcast_to(y, (n,)).astype(self._dtype("labels"))

    def _scale(self, n: int, scale: Any) -> np.ndarray | None:
        if "scale" not in self.inputs:
            if scale is not None:
                raise GraphError("this graph has no guidance: it takes no scale")
            return None
        try:
            s = np.asarray(self.default_scale if scale is None else scale, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise GraphError(f"scale must be a number or one number per sample, got {scale!r}") from None
        if s.size not in (1, n):
            raise GraphError(f"scale must be one number or one per sample ({n}), got {s.size}")
        if not np.isfinite(s).all() or (s < 0).any():
            raise GraphError(f"guidance scale must be a finite number >= 0, got {s[:4].tolist()}")
        return np.broadcast_to(s, (n,)).astype(np.float32)

    def check(self, x_T: np.ndarray, noise: np.ndarray | None) -> None:
        """Shapes, dtypes and values of x_T and noise against the graph, with a message that says what is wrong."""
        if self.seeded:
            raise GraphError("this graph makes its noise from a seed (inputs seed, index): it takes no x_T; "
                             "export with --noise inputs to feed your own")
        shape = self.sample_shape
        if x_T.ndim != len(shape) + 1 or tuple(x_T.shape[1:]) != shape:
            raise GraphError(f"x_T must have shape [B, {', '.join(map(str, shape))}], got {list(x_T.shape)}")
        if not np.isfinite(x_T).all():
            raise GraphError("x_T holds NaN or infinite values")
        if "noise" in self.inputs:
            want = (self.noise_slots, x_T.shape[0], *shape)
            if noise is None or tuple(noise.shape) != want:
                got = None if noise is None else list(noise.shape)
                raise GraphError(f"noise must have shape {list(want)} (noise slots, batch, sample), got {got}")
            if not np.isfinite(noise).all():
                raise GraphError("noise holds NaN or infinite values")
        elif noise is not None:
            raise GraphError("this graph's sampler is deterministic: it takes no noise")

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        try:
            if self.provider == "cuda":
                ort = _onnxruntime()
                binding = self.session.io_binding()
                for name, value in feed.items():
                    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
                binding.bind_output("x0", "cuda", 0)
                self.session.run_with_iobinding(binding)
                out = binding.copy_outputs_to_cpu()[0]
            else:
                out = self._run_sharded(feed)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            raise GraphError(f"onnxruntime: {_ort_message(exc)}") from exc
        if not np.isfinite(out).all():
            raise GraphError("sampling produced NaN or infinite values")
        return out

    def _run_sharded(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One CPU call, its batch split into up to ``threads`` contiguous shards run concurrently (onnxruntime
        releases the GIL), joined in order."""
        axes = self._batch_axes
        sizes = {v.shape[axes[k]] for k, v in feed.items() if axes[k] is not None} if axes else set()
        n = sizes.pop() if len(sizes) == 1 else 1  # inputs of unequal batches go whole: the graph names the input
        shards = min(self.threads, n)
        if shards <= 1:
            return self.session.run(["x0"], feed)[0]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="toolkit-onnxruntime")
        bounds = np.linspace(0, n, shards + 1).round().astype(int)

        def part(lo: int, hi: int) -> np.ndarray:
            cut = {k: v if axes[k] is None else v[(slice(None),) * axes[k] + (slice(lo, hi),)]
                   for k, v in feed.items()}
            return self.session.run(["x0"], cut)[0]

        futures = [self._pool.submit(part, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        return np.concatenate([f.result() for f in futures])

    @property
    def inpaints(self) -> bool:
        """A graph of ``export onnx --task inpaint``: it takes image and mask."""
        return "image" in self.inputs

    def _inpaint_inputs(self, n: int, image: Any, mask: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """image [n, *shape] in [-1, 1] (or one [*shape] for all) and a 0/1 mask [H, W], [1 or C, H, W] or one per
        image (1 = fill in), both broadcast to [n, *shape] float32."""
        if not self.inpaints:
            if image is not None or mask is not None:
                raise GraphError("this graph does not inpaint: export it with --task inpaint to give image and mask")
            return None
        if image is None or mask is None:
            raise GraphError("this graph inpaints: give image (the known data) and mask (1 = fill in)")
        shape = self.sample_shape
        x = np.asarray(image, dtype=np.float32)
        if tuple(x.shape) == shape:
            x = x[None]
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or len(x) not in (1, n):
            raise GraphError(f"image must have shape [{n}, {', '.join(map(str, shape))}], got {list(x.shape)}")
        if not np.isfinite(x).all() or x.min() < -1 or x.max() > 1:
            raise GraphError("image values must be finite and lie in [-1, 1]")
        m = np.asarray(mask, dtype=np.float32)
        if m.ndim == len(shape) and m.shape[0] == n and n > 1 and n != shape[0]:
            m = m[:, None]  # one [H, W] mask per image
        while m.ndim < len(shape) + 1:
            m = m[None]
        if m.ndim != len(shape) + 1 or tuple(m.shape[2:]) != shape[1:] or m.shape[1] not in (1, shape[0]) \
                or m.shape[0] not in (1, n):
            raise GraphError(f"mask must have shape [{', '.join(map(str, shape[1:]))}] or "
                             f"[{n}, 1 or {shape[0]}, {', '.join(map(str, shape[1:]))}], got {list(np.shape(mask))}")
        if not np.isin(m, (0.0, 1.0)).all():
            raise GraphError("mask must be binary (1 = fill in, 0 = keep)")
        return (np.ascontiguousarray(np.broadcast_to(x, (n, *shape))),
                np.ascontiguousarray(np.broadcast_to(m, (n, *shape))))

    def run(self, x_T: np.ndarray, noise: np.ndarray | None = None, labels: np.ndarray | None = None,
            scale: np.ndarray | None = None, *, image: Any = None, mask: Any = None) -> np.ndarray:
        """One call of a graph exported with ``--noise inputs`` on prepared inputs (checked)."""
        x_T = np.ascontiguousarray(x_T, dtype=np.float32)
        noise = None if noise is None else np.ascontiguousarray(noise, dtype=np.float32)
        self.check(x_T, noise)
        n = x_T.shape[0]
        feed = {"x_T": x_T}
        if noise is not None:
            feed["noise"] = noise
        return self._run(self._conditioning(feed, n, labels, scale, image, mask))

    def run_seed(self, seed: int, index: Sequence[int] | np.ndarray, labels: Any = None, scale: Any = None, *,
                 image: Any = None, mask: Any = None) -> np.ndarray:
        """One call of a seed-only graph: samples number ``index`` of run ``seed``."""
        if not self.seeded:
            raise GraphError("this graph takes its noise as inputs (x_T, noise): use run() or sample()")
        seed = _check_seed(seed)
        index = np.ascontiguousarray(index, dtype=np.int64).reshape(-1)
        if index.size == 0 or index.min() < 0:
            raise GraphError("index must hold one sample number >= 0 per sample")
        return self._run(self._conditioning({"seed": np.array(seed, np.int64), "index": index}, index.size,
                                            labels, scale, image, mask))

    def _conditioning(self, feed: dict[str, np.ndarray], n: int, labels: Any, scale: Any, image: Any = None,
                      mask: Any = None) -> dict[str, np.ndarray]:
        y, s = self._labels(n, labels), self._scale(n, scale)
        if y is not None:
            feed["labels"] = np.ascontiguousarray(y)
        if s is not None:
            feed["scale"] = np.ascontiguousarray(s)
        known = self._inpaint_inputs(n, image, mask)
        if known is not None:
            feed["image"], feed["mask"] = known
        return feed

    def sample(self, n: int, seed: int = 0, labels: Any = None, scale: Any = None, *, x_T: np.ndarray | None = None,
               noise: np.ndarray | None = None, batch_size: int = 500, offset: int = 0, image: Any = None,
               mask: Any = None) -> np.ndarray:
        """n samples [n, *output_shape] in [-1, 1], numbers offset..offset+n-1 of run ``seed`` (the same as
        ``toolkit compose --seed``); with a ``--noise inputs`` graph, x_T (and noise) may be given instead.
        An inpainting graph also takes image and mask (see ``_inpaint_inputs``)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise GraphError(f"n must be a positive integer, got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise GraphError(f"batch size must be a positive integer, got {batch_size!r}")
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise GraphError(f"offset must be an integer >= 0, got {offset!r}")
        seed = _check_seed(seed)
        if x_T is not None and len(x_T) != n:
            raise GraphError(f"x_T holds {len(x_T)} samples, not n={n}")
        y, s = self._labels(n, labels), self._scale(n, scale)
        known = self._inpaint_inputs(n, image, mask)
        out = []
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            yb, sb = None if y is None else y[start:stop], None if s is None else s[start:stop]
            kb = {} if known is None else {"image": known[0][start:stop], "mask": known[1][start:stop]}
            if self.seeded:
                if x_T is not None or noise is not None:
                    raise GraphError("this graph makes its noise from the seed: it takes no x_T or noise")
                out.append(self.run_seed(seed, np.arange(offset + start, offset + stop), yb, sb, **kb))
                continue
            if x_T is None:
                xb, nb = draw_noise(seed, stop - start, self.sample_shape, self.noise_slots, "noise" in self.inputs,
                                    offset=offset + start)
            else:
                xb = np.asarray(x_T)[start:stop]
                nb = None if noise is None else np.asarray(noise)[:, start:stop]
            out.append(self.run(xb, nb, yb, sb, **kb))
        return np.concatenate(out)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise GraphError(f"seed must be an integer in 0..2^63-1, got {seed!r}")
    return int(seed)
