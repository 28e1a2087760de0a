"""Each runtime × sampler on the shipped digits model, seed-only graphs: load time and samples/s at one batch.
Runtimes: our PyTorch pipeline, onnxruntime from Python (SamplerSession), onnxruntime-node (Node.js) and
onnxruntime-web (WebAssembly, one thread, headless Chromium). Every graph gives the torch samples for the same
seed (tests/test_apps.py, tests/test_onnx.py); this measures speed only.

    python bench/bench_runtimes.py [--batch 64] [--rounds 3] [--threads 2]

Needs node/npm (examples/onnx-node, examples/onnx-web installed with npm) and chromium for the last two
columns; a runtime that is missing is reported as such. Writes bench/results/runtimes.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import toolkit
from toolkit.exporters.onnx import export_sampler
from toolkit.exporters.runtime import SamplerSession

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CASES = {
    "ddim 50": dict(sampler="ddim", steps=50),
    "ddpm 100": dict(sampler="ddpm", steps=100),
    "dpmpp-2m 10": dict(sampler="dpmpp-2m", steps=10),
    "unipc 10 + cfg": dict(sampler="unipc", steps=10, guidance="cfg", guidance_options={"scale": 2.0}),
}


def npm_install(folder: Path) -> bool:
    if (folder / "node_modules").is_dir():
        return True
    if shutil.which("npm") is None:
        return False
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    return subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder,
                          env=env).returncode == 0


def timed(fn, rounds: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B = args.batch
    labels = [i % 10 for i in range(B)]
    tmp = Path(tempfile.mkdtemp())
    node_ok = shutil.which("node") is not None and npm_install(ROOT / "examples" / "onnx-node")
    chromium = shutil.which("chromium")
    web_ok = chromium is not None and npm_install(ROOT / "examples" / "onnx-web")
    web = None
    if web_ok:
        spec = importlib.util.spec_from_file_location("harness", ROOT / "examples" / "onnx-web" / "harness.py")
        web = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(web)
    rows = []
    for name, kw in CASES.items():
        t0 = time.perf_counter()
        pipe = toolkit.compose(**kw)
        load_torch = time.perf_counter() - t0
        graph = export_sampler(pipe, tmp / f"{name.replace(' ', '_').replace('+', '')}.onnx")
        scale = 2.0 if pipe.guidance else None
        results = {"torch": (load_torch, timed(lambda: pipe.sample(B, seed=0, labels=labels), args.rounds))}
        t0 = time.perf_counter()
        session = SamplerSession(graph, provider="cpu", threads=args.threads)
        load = time.perf_counter() - t0
        results["onnxruntime (Python)"] = (load, timed(lambda: session.sample(B, seed=0, labels=labels, scale=scale,
                                                                              batch_size=B), args.rounds))
        if node_ok:
            r = subprocess.run(["node", str(ROOT / "bench" / "js" / "bench_node.mjs"), str(graph), str(B),
                                str(args.rounds), str(args.threads)], capture_output=True, text=True, check=True)
            out = json.loads(r.stdout.strip().splitlines()[-1])
            results["onnxruntime-node"] = (out["load_s"], out["run_s"])
        if web is not None:
            site = web.site_with(tmp / f"site-{len(rows)}", [ROOT / "bench" / "js" / "bench.html",
                                                             ROOT / "bench" / "js" / "feeds.mjs"],
                                 ROOT / "examples" / "onnx-web" / "node_modules", [graph])
            out = web.run_page(chromium, site, f"bench.html?graph={graph.name}&batch={B}&rounds={args.rounds}", 1200)
            if "error" in out:
                raise RuntimeError(f"onnxruntime-web: {out['error']}")
            results["onnxruntime-web (wasm)"] = (out["load_s"], out["run_s"])
        for runtime, (load, times) in results.items():
            med = float(np.median(times))
            rows.append({"case": name, "runtime": runtime, "nfe": pipe.nfe, "batch": B, "load_s": load,
                         "median_s": med, "samples_per_s": B / med, "rounds": times})
            print(f"{name:<16} {runtime:<24} load {load:6.2f} s   {B / med:8.1f} samples/s", flush=True)
    result = {"batch": B, "rounds": args.rounds, "threads": args.threads, "rows": rows, "torch": torch.__version__,
              "node": node_ok, "chromium": bool(web_ok)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtimes.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'runtimes.json'}")


if __name__ == "__main__":
    main()
