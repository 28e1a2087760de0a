"""The same seed, the same digits in other languages: the Node program (onnxruntime-node) and the web page
(onnxruntime-web, WebAssembly, in headless Chromium) sample the seed-only graphs and give Python's numbers
(issue 13). CI installs node, npm and chromium (.ci/run) and sets TOOLKIT_APP_TESTS=1, so there these tests
must run; elsewhere they are skipped when a tool is missing."""

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import toolkit
from toolkit.exporters.onnx import export_sampler

ROOT = Path(__file__).resolve().parents[1]
NODE_APP = ROOT / "examples" / "onnx-node"
WEB_APP = ROOT / "examples" / "onnx-web"
REQUIRED = os.environ.get("TOOLKIT_APP_TESTS") == "1"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if REQUIRED:
            pytest.fail(f"{tool} is not installed, and TOOLKIT_APP_TESTS=1 says these tests must run")
        pytest.skip(f"{tool} is not installed")
    return path


def npm_install(folder: Path) -> None:
    """`npm install` of an example (onnxruntime-node: ONNXRUNTIME_NODE_INSTALL=skip, no download at install)."""
    need("npm")
    if (folder / "node_modules").is_dir():
        return
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


CASES = {
    "ddim": dict(sampler="ddim", steps=10),
    "ddpm": dict(sampler="ddpm", steps=20),
    "cfg": dict(sampler="ddpm", steps=10, guidance="cfg", guidance_options={"scale": 2.0}),
}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("apps")
    return {name: (toolkit.compose(**kw), export_sampler(toolkit.compose(**kw), folder / f"{name}.onnx"))
            for name, kw in CASES.items()}


def node(*args, timeout=120):
    return subprocess.run([need("node"), str(NODE_APP / "sample.mjs"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("name", list(CASES))
def test_the_node_app_draws_pythons_digits(graphs, tmp_path, name):
    npm_install(NODE_APP)
    pipe, graph = graphs[name]
    out, numbers = tmp_path / "digits.png", tmp_path / "digits.json"
    r = node(graph, "--class", 7, "-n", 8, "--seed", 3, "--out", out, "--json", numbers)
    assert r.returncode == 0, r.stderr
    got = json.loads(numbers.read_text())
    got = np.asarray(got["data"], np.float32).reshape(got["dims"])
    expected = pipe.sample(8, seed=3, labels=7).numpy()
    assert np.abs(got - expected).max() < 1e-4
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.shape == (8 * 4 + 2, 8 * (8 * 4 + 1) + 1) and img.max() > 200


@pytest.mark.parametrize("args,message", [
    (["--class", 12], "--class must lie in 0..9, got 12"),
    (["--class", -3], "--class must lie in 0..9, got -3"),
    (["--seed", "x"], "--seed must be an integer"),
    (["-n", 0], "-n must lie in 1..4096"),
])
def test_the_node_app_refuses_bad_input_in_one_line(graphs, tmp_path, args, message):
    npm_install(NODE_APP)
    _, graph = graphs["ddim"]
    r = node(graph, *args, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}" or message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_the_node_app_on_a_truncated_graph(graphs, tmp_path):
    npm_install(NODE_APP)
    _, graph = graphs["ddim"]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(Path(graph).read_bytes()[:5000])
    shutil.copy(f"{graph}.json", f"{bad}.json")
    r = node(bad, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not a loadable ONNX graph" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def harness():
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_web_harness", WEB_APP / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_web_page_draws_pythons_digits(graphs, tmp_path):
    """The page in headless Chromium (WebAssembly): ten rows of digits, one per class, the numbers of
    `compose --class all -n 80 --seed 3`; the canvas is kept as the test's screenshot."""
    chromium = need("chromium")
    npm_install(WEB_APP)
    pipe, graph = graphs["ddpm"]
    web = harness()
    site = web.site_with(tmp_path / "site", [WEB_APP / "index.html", WEB_APP / "main.js"], WEB_APP / "node_modules",
                         [Path(graph)])
    report = web.run_page(chromium, site, f"index.html?graph={Path(graph).name}&seed=3&ep=wasm&report=1", 180)
    assert "error" not in report, report.get("error")
    got = np.asarray(report["data"], np.float32).reshape(report["dims"])
    labels = [i // 8 for i in range(80)]
    expected = pipe.sample(80, seed=3, labels=labels).numpy()
    assert np.abs(got - expected).max() < 1e-4
    from PIL import Image

    png = base64.b64decode(report["png"].split(",", 1)[1])
    (tmp_path / "page.png").write_bytes(png)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    tile = 8 * 6 + 2
    assert img.shape == (10 * tile + 2, 8 * tile + 2)  # ten rows of eight digits
    for row in range(10):  # every row holds bright strokes on a dark ground: digits, not a blank
        band = img[2 + row * tile: row * tile + tile]
        assert band.max() > 200 and band.min() < 60
    # and the page as Chromium draws it: the canvas is on screen, pixel for pixel the one reported
    shot = web.screenshot(chromium, site, f"index.html?graph={Path(graph).name}&seed=3&ep=wasm", tmp_path / "shot.png")
    screen = np.asarray(Image.open(shot).convert("L")).astype(np.int16)
    dark = screen < 20  # the digits' black ground: rows and columns with many such pixels cross the canvas
    top = int(np.argmax(dark.sum(1) > 100))
    left = int(np.argmax(dark.sum(0) > 100))
    H, W = img.shape
    best = min(np.abs(screen[t: t + H, c: c + W] - img).mean()
               for t in range(max(0, top - 12), top + 1)
               for c in range(max(0, left - 12), left + 1)
               if screen[t: t + H, c: c + W].shape == img.shape)
    assert best < 2, best
