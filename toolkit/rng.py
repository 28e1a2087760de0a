"""The toolkit's one random generator: counter-based, so value j of draw d of sample i of run ``seed`` is a pure
function of (seed, i, d, j). It is written once here on integer array operators that numpy and torch share
(the torch-free runtime uses the numpy path), and once more as ONNX operators (``onnx_normal``), so that
a seed gives the same samples in torch, onnxruntime, Node and a browser. This module never imports torch.

The algorithm, precisely (all integers unsigned 32-bit, ``^`` xor, ``>>`` logical shift, ``*`` mod 2^32)::

    mix(x)   = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (Wellons' lowbias32)
    key      = mix(i_hi ^ mix(i_lo ^ mix(s_hi ^ mix(s_lo ^ mix(d)))))   s = seed, i = sample index (64-bit each)
    key2     = mix(key ^ 0x9E3779B9)
    bits(c)  = mix(mix(c ^ key) + key2)                                 c = 0, 1, 2, ... (the counter)
    u(c)     = (2·(bits(c) >> 9) + 1) / 2^24                            in (0, 1), exact
    value j  = float32(sqrt(-2·ln u(2j)) · cos(2π·u(2j + 1)))           Box–Muller in float64

Draw d = 0 is x_T; iteration k of a sampler with D draws per step takes draws 1 + k·D ... k·D + D.
"""

from __future__ import annotations

import math
from typing import Any

MASK32 = 0xFFFFFFFF
MIX_1, MIX_2 = 0x7FEB352D, 0x846CA68B
GOLDEN = 0x9E3779B9
TWO_PI = 2 * math.pi


def _mul32(x: Any, m: int) -> Any:
    """x·m mod 2^32 for x in [0, 2^32) held in int64, without overflow: m is split into 16-bit halves."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix(x: Any) -> Any:
    """lowbias32 (Wellons' integer hash) on int64 arrays holding unsigned 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_2)
    return x ^ (x >> 16)


def keys(seed: int, index: Any, draw: int) -> tuple[Any, Any]:
    """(key, key2) of each sample's stream for one draw; ``index`` is an int64 array of sample numbers ≥ 0."""
    seed, draw = int(seed), int(draw)
    if not 0 <= seed < 2**64 or not 0 <= draw < 2**32:
        raise ValueError(f"seed must lie in 0..2^64-1 and draw in 0..2^32-1, got {seed}, {draw}")
    k = mix(index * 0 + draw)
    k = mix(k ^ (seed & MASK32))
    k = mix(k ^ (seed >> 32))
    k = mix(k ^ (index & MASK32))
    k = mix(k ^ ((index >> 32) & MASK32))
    return k, mix(k ^ GOLDEN)


def bits(key: Any, key2: Any, counter: Any) -> Any:
    """The 32 random bits at ``counter`` of each stream: key [B, 1], counter [1, C] → [B, C]."""
    return mix((mix(counter ^ key) + key2) & MASK32)


def uniform_from_bits(b: Any) -> Any:
    """Odd multiples of 2^-24: exactly representable in float32, never 0 or 1 (still int; the caller casts)."""
    return (b >> 9) * 2 + 1


def normal_numpy(seed: int, index: Any, draw: int, shape: tuple[int, ...]) -> Any:
    """Standard normal float32 [len(index), *shape] with numpy: the torch-free runtime's path."""
    import numpy as np

    index = np.asarray(index, dtype=np.int64).reshape(-1, 1)
    n = math.prod(shape)
    key, key2 = keys(seed, index, draw)
    u = uniform_from_bits(bits(key, key2, np.arange(2 * n, dtype=np.int64)[None])).astype(np.float64) * 2.0 ** -24
    z = np.sqrt(-2.0 * np.log(u[:, 0::2])) * np.cos(TWO_PI * u[:, 1::2])
    return z.astype(np.float32).reshape(len(index), *shape)


def normal_torch(seed: int, index: Any, draw: int, shape: tuple[int, ...], device: Any = "cpu") -> Any:
    """The same numbers with torch (on ``device``): the default noise of every sampler."""
    import torch

    index = torch.as_tensor(index, dtype=torch.int64, device=device).reshape(-1, 1)
    n = math.prod(shape)
    key, key2 = keys(seed, index, draw)
    counter = torch.arange(2 * n, dtype=torch.int64, device=device)[None]
    u = uniform_from_bits(bits(key, key2, counter)).to(torch.float64) * (2.0 ** -24)
    z = torch.sqrt(-2.0 * torch.log(u[:, 0::2])) * torch.cos(TWO_PI * u[:, 1::2])
    return z.to(torch.float32).reshape(index.shape[0], *shape)


# ---------------------------------------------------------------- ONNX operators


class OnnxBuilder:
    """Appends ONNX nodes to ``nodes`` with unique, prefixed value names: the generator and the exporter's
    graph code (input checks, draw numbers) build with it, so several copies coexist in one graph."""

    def __init__(self, prefix: str, nodes: list[Any] | None = None):
        from onnx import TensorProto, helper

        self.helper, self.T, self.prefix = helper, TensorProto, prefix
        self.nodes: list[Any] = [] if nodes is None else nodes
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def const(self, value: Any, dtype: str = "int64", dims: list[int] | None = None) -> str:
        """A Constant: a scalar, or the list ``value`` of shape ``dims`` (default [len(value)])."""
        out = self.name("c")
        kind = {"int64": self.T.INT64, "float": self.T.FLOAT, "double": self.T.DOUBLE, "bool": self.T.BOOL}[dtype]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        shape = dims if dims is not None else ([len(values)] if isinstance(value, (list, tuple)) else [])
        self.nodes.append(self.helper.make_node("Constant", [], [out], value=self.helper.make_tensor(
            out + "_v", kind, shape, values)))
        return out

    def ints(self, values: list[int], dims: list[int] | None = None) -> str:
        return self.const(values, "int64", dims)

    def op(self, kind: str, *inputs: str, **attrs: Any) -> str:
        out = self.name(kind.lower())
        self.nodes.append(self.helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def shr(self, x: str, k: int) -> str:  # x ≥ 0: a right shift is a floor division
        return self.op("Div", x, self.const(1 << k))

    def mask(self, x: str, m: int) -> str:
        return self.op("BitwiseAnd", x, self.const(m))

    def mul32(self, x: str, m: int) -> str:
        lo, hi = m & 0xFFFF, m >> 16
        low = self.op("Mul", x, self.const(lo))
        high = self.op("Mul", self.mask(self.op("Mul", x, self.const(hi)), 0xFFFF), self.const(1 << 16))
        return self.mask(self.op("Add", low, high), MASK32)

    def xor(self, a: str, b: str) -> str:
        return self.op("BitwiseXor", a, b)

    def mix(self, x: str) -> str:
        x = self.xor(x, self.shr(x, 16))
        x = self.mul32(x, MIX_1)
        x = self.xor(x, self.shr(x, 15))
        x = self.mul32(x, MIX_2)
        return self.xor(x, self.shr(x, 16))


def onnx_normal(b: OnnxBuilder, seed: str, index: str, draw: str, shape: tuple[int, ...]) -> str:
    """Nodes (appended through ``b``) computing normal [B, *shape] float32 from int64 tensors ``seed`` [] (≥ 0),
    ``index`` [B] (≥ 0) and ``draw`` [] — the same numbers as :func:`normal_numpy`. Returns the output's name."""
    n = math.prod(shape)
    idx = b.op("Unsqueeze", index, b.ints([1]))
    draw_b = b.op("Add", b.op("Mul", idx, b.const(0)), draw)  # draw as [B, 1]
    k = b.mix(draw_b)
    k = b.mix(b.xor(k, b.mask(seed, MASK32)))
    k = b.mix(b.xor(k, b.mask(b.shr(seed, 32), MASK32)))
    k = b.mix(b.xor(k, b.mask(idx, MASK32)))
    k = b.mix(b.xor(k, b.mask(b.shr(idx, 32), MASK32)))
    k2 = b.mix(b.xor(k, b.const(GOLDEN)))
    counter = b.ints(list(range(2 * n)), [1, 2 * n])
    x = b.mix(b.mask(b.op("Add", b.mix(b.xor(counter, k)), k2), MASK32))
    odd = b.op("Add", b.op("Mul", b.shr(x, 9), b.const(2)), b.const(1))
    u = b.op("Mul", b.op("Cast", odd, to=b.T.DOUBLE), b.const(2.0 ** -24, "double"))
    u = b.op("Reshape", u, b.ints([0, n, 2]))  # pairs (u(2j), u(2j + 1))
    u1 = b.op("Squeeze", b.op("Slice", u, b.ints([0]), b.ints([1]), b.ints([2])), b.ints([2]))
    u2 = b.op("Squeeze", b.op("Slice", u, b.ints([1]), b.ints([2]), b.ints([2])), b.ints([2]))
    radius = b.op("Sqrt", b.op("Mul", b.op("Log", u1), b.const(-2.0, "double")))
    angle = b.op("Cos", b.op("Mul", u2, b.const(TWO_PI, "double")))
    z = b.op("Cast", b.op("Mul", radius, angle), to=b.T.FLOAT)
    return b.op("Reshape", z, b.ints([0, *shape]))
