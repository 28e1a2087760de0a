"""Sample digits from a sampler graph written by `toolkit export onnx`, with onnxruntime and numpy only.

    python sample_digits.py sampler.onnx --class 7 -n 16 --seed 0 --out digits.png

No torch and no diffusion-toolkit needed: the graph holds the network and every sampling step;
this program only draws the noise, feeds the graph and writes the PNG (with zlib from the stdlib).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib

import numpy as np
import onnxruntime as ort


def write_png(path: str, image: np.ndarray) -> None:
    """An 8-bit grayscale PNG of a [H, W] uint8 array."""
    h, w = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def grid(samples: np.ndarray, scale: int = 4, pad: int = 1) -> np.ndarray:
    """[N, 1, H, W] in [-1, 1] → one uint8 image, 8 per row, each sample enlarged ``scale`` times."""
    n, _, h, w = samples.shape
    cols = min(8, n)
    rows = -(-n // cols)
    img = np.zeros((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad), np.uint8)
    pixels = np.round((samples[:, 0] + 1) * 127.5).clip(0, 255).astype(np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        big = np.kron(pixels[k], np.ones((scale, scale), np.uint8))
        img[pad + r * (h * scale + pad):][:h * scale, pad + c * (w * scale + pad):][:, :w * scale] = big
    return img


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graph")
    ap.add_argument("--class", dest="label", type=int, default=None, help="digit to draw (default: any)")
    ap.add_argument("--scale", type=float, default=None, help="guidance scale, for a guided graph")
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="digits.png")
    args = ap.parse_args()

    session = ort.InferenceSession(args.graph, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("kind") != "diffusion-toolkit-sampler":
        print(f"error: {args.graph} is not a diffusion-toolkit sampler graph", file=sys.stderr)
        return 2
    shape = tuple(json.loads(meta["sample_shape"]))
    steps, num_classes = int(meta["steps"]), json.loads(meta["num_classes"])
    names = {i.name for i in session.get_inputs()}
    rng = np.random.default_rng(args.seed)
    feed = {"x_T": rng.standard_normal((args.n, *shape), dtype=np.float32)}
    if "noise" in names:
        slots = int(meta.get("noise_slots") or steps)  # iterations × draws per step
        feed["noise"] = rng.standard_normal((slots, args.n, *shape), dtype=np.float32)
    if "labels" in names:  # the null label (num_classes) means "any digit"
        feed["labels"] = np.full(args.n, num_classes if args.label is None else args.label, np.int64)
    if "scale" in names:
        feed["scale"] = np.full(args.n, args.scale if args.scale is not None else json.loads(meta["guidance_scale"]),
                                np.float32)
    samples = session.run(["x0"], feed)[0]
    write_png(args.out, grid(samples))
    print(f"wrote {args.out} ({args.n} samples, {meta['sampler']} {steps} steps, onnxruntime {session.get_providers()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
