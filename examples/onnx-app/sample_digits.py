"""Sample digits from a sampler graph written by `toolkit export onnx`, with onnxruntime and numpy only.

    python sample_digits.py sampler.onnx --class 7 -n 16 --seed 0 --out digits.png

No torch and no diffusion-toolkit needed: the graph holds the network, every sampling step and the
random generator; this program feeds it a seed and sample numbers and writes the PNG (zlib from the
stdlib). The same seed gives the same digits as `toolkit compose --seed`.
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


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graph")
    ap.add_argument("--class", dest="label", type=int, default=None, help="digit to draw (default: any)")
    ap.add_argument("--scale", type=float, default=None, help="guidance scale, for a guided graph")
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="digits.png")
    args = ap.parse_args()
    if not 1 <= args.n <= 4096:
        return fail(f"-n must lie in 1..4096, got {args.n}")
    if not 0 <= args.seed < 2**63:
        return fail(f"--seed must lie in 0..2^63-1, got {args.seed}")

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, printed below as one line
    try:
        session = ort.InferenceSession(args.graph, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a missing, truncated or foreign file
        return fail(f"{args.graph} is not a loadable ONNX graph ({str(exc).splitlines()[0][:200]})")
    try:  # every metadata value is JSON (metadata_version 2)
        meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    except ValueError:
        meta = {}
    if meta.get("kind") != "diffusion-toolkit-sampler" or meta.get("metadata_version", 1) < 2:
        return fail(f"{args.graph} is not a sampler graph of diffusion-toolkit 0.1 or later (export one with "
                    "`toolkit export onnx`)")
    names = {i.name for i in session.get_inputs()}
    if "seed" not in names:
        return fail("this graph takes its noise as inputs; export it with the default --noise seed")
    num_classes = meta.get("num_classes")
    feed = {"seed": np.array(args.seed, np.int64), "index": np.arange(args.n, dtype=np.int64)}
    if args.label is not None and (num_classes is None or not 0 <= args.label < num_classes):
        return fail(f"--class must lie in 0..{(num_classes or 1) - 1}, got {args.label}" if num_classes
                    else "--class given but the graph's model is unconditional")
    if "labels" in names:  # the null label (num_classes) means "any digit"
        if args.label is None and meta.get("guidance"):
            return fail(f"the graph's {meta['guidance']} guidance needs --class")
        feed["labels"] = np.full(args.n, num_classes if args.label is None else args.label, np.int64)
    if "scale" in names:
        scale = args.scale if args.scale is not None else meta.get("guidance_scale")
        if scale is None or not 0 <= scale < float("inf"):
            return fail(f"--scale must be a finite number >= 0, got {scale}")
        feed["scale"] = np.full(args.n, scale, np.float32)
    elif args.scale is not None:
        return fail("--scale needs a guided graph")
    try:
        samples = session.run(["x0"], feed)[0]
    except Exception as exc:  # noqa: BLE001 - the graph's own input checks name the input
        text = " ".join(str(exc).split())
        return fail(text.split("input check failed: ", 1)[1].split("'")[0] if "input check failed: " in text
                    else text[:200])
    write_png(args.out, grid(samples))
    print(f"wrote {args.out} ({args.n} samples, {meta['sampler']} {meta['steps']} steps, seed {args.seed}, "
          f"onnxruntime {session.get_providers()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
