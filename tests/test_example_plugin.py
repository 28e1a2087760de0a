"""The example plugin, installed with pip into this environment for real, then removed again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "toolkit-plugin-example"


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


def toolkit(*args):
    env = {**os.environ, "TOOLKIT_STRICT_PLUGINS": "1"}
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def installed():
    if pip("show", "toolkit-plugin-example").returncode == 0:
        pytest.skip("toolkit-plugin-example is already installed here; not touching it")
    # no network: no index, no build isolation, no dependencies (the toolkit is already here)
    r = pip("install", "--no-index", "--no-build-isolation", "--no-deps", str(EXAMPLE))
    assert r.returncode == 0, r.stdout + r.stderr
    yield
    r = pip("uninstall", "-y", "toolkit-plugin-example")
    assert r.returncode == 0, r.stderr


def test_listed_with_distribution_and_version(installed):
    r = toolkit("plugins", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    samplers = {e["name"]: e for e in data["plugins"]["sampler"]}
    schedules = {e["name"]: e for e in data["plugins"]["schedule"]}
    assert samplers["euler"]["dist"] == "toolkit-plugin-example" and samplers["euler"]["version"] == "0.1.0"
    assert schedules["sigmoid"]["dist"] == "toolkit-plugin-example"
    assert data["failed"] == []


def test_compose_with_the_plugin(installed, tmp_path):
    out = tmp_path / "e.npy"
    r = toolkit("compose", "--sampler", "euler", "--schedule", "sigmoid", "--steps", 10, "-n", 4, "--class", 3,
                "--out", out)
    assert r.returncode == 0, r.stderr
    x = np.load(out)
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all()
    r = toolkit("compose", "--sampler", "toolkit-plugin-example:euler", "--steps", 5, "-n", 2, "--out", out)
    assert r.returncode == 0, r.stderr


def test_plugin_own_tests_pass(installed):
    """Its tests use toolkit.testing (conformance, including a step torch.export can trace)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_export_the_plugin_sampler_to_onnx(installed, tmp_path):
    """Its step is traceable, so its whole sampling run exports and onnxruntime reproduces PyTorch."""
    graph, ref, got = tmp_path / "euler.onnx", tmp_path / "ref.npy", tmp_path / "got.npy"
    r = toolkit("export", "onnx", "--sampler", "euler", "--schedule", "sigmoid", "--steps", 8, "--out", graph)
    assert r.returncode == 0, r.stderr
    common = ["-n", 4, "--class", "1,2", "--seed", 5]
    assert toolkit("compose", "--sampler", "euler", "--schedule", "sigmoid", "--steps", 8, *common,
                   "--out", ref).returncode == 0
    r = toolkit("compose", "--backend", "onnxruntime", "--onnx", graph, *common, "--out", got)
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(ref) - np.load(got)).max() < 1e-4


def test_the_plugin_adds_a_command(installed):
    """`register_commands`: the plugin's `toolkit euler-grid` runs, is listed, and gets the one-line errors."""
    r = toolkit("euler-grid", "--steps", 4)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.strip().splitlines()]
    sigmas = [float(row[-1]) for row in rows]
    assert len(rows) == 4 and abs(sigmas[0] - 80.0) < 1e-3  # Karras' grid starts at σ̃ = 80 on the cosine schedule
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert "euler-grid" in toolkit("--help").stdout
    data = json.loads(toolkit("plugins", "--json").stdout)
    assert {"name": "euler-grid", "dist": "toolkit-plugin-example", "version": "0.1.0",
            "plugin": "toolkit-plugin-example:example"} in data["commands"]
    r = toolkit("euler-grid", "--steps", 0)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: Invalid value for '--steps': 0 is not in the range x>=1."]


def test_the_plugin_adds_a_training_task(installed, tmp_path):
    """`register_tasks`: `toolkit train --task eps-l1` trains with the plugin's loss in the toolkit's loop, and
    its checkpoint samples like any noise predictor's."""
    run = tmp_path / "l1"
    r = toolkit("train", "--task", "eps-l1", "--model-option", "base_channels=8", "--model-option", "attention_heads=2",
                "--steps", 4, "--batch-size", 8, "--checkpoint-every", 2, "--out", run)
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "eps-l1" and config["training"]["step"] == 4
    assert [row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [2, 4]
    r = toolkit("compose", "--model", run, "--steps", 3, "-n", 2, "--class", 5, "--out", tmp_path / "s.npy")
    assert r.returncode == 0, r.stderr
    r = toolkit("export", "onnx", "--component", "predictor", "--model", run, "--out", tmp_path / "eps.onnx")
    assert r.returncode == 0, r.stderr  # export takes every noise-predictor task's checkpoint, as compose does
    data = json.loads(toolkit("plugins", "--json").stdout)
    assert any(e["name"] == "eps-l1" and e["dist"] == "toolkit-plugin-example" for e in data["plugins"]["task"])
