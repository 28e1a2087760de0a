"""Fast by default: compose and evaluate pick onnxruntime where the exported graph matches torch, say which
engine ran, take a thread count, and the torch loop's own costs (allocator, constants) are paid once."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import toolkit
from helpers import one_line_error, run
from toolkit import backends, diffusion
from toolkit.errors import ToolkitError
from toolkit.exporters.runtime import GraphError, SamplerSession, check_threads, default_threads


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TOOLKIT_BACKEND", raising=False)
    return tmp_path / "cache" / "onnx"


@pytest.mark.parametrize("args", [["--steps", 10], ["--sampler", "ddpm", "--steps", 8, "--class", "3,5"]],
                         ids=["ddim", "ddpm-stochastic"])
def test_the_default_backend_is_onnxruntime_and_gives_the_torch_samples(tmp_path, cache, args):
    auto, torch_ = tmp_path / "auto.npy", tmp_path / "torch.npy"
    r = run("compose", *args, "-n", 6, "--seed", 4, "--out", auto)
    assert r.exit_code == 0, r.output
    assert "onnxruntime cpu" in r.output and "matches torch" in r.output, r.output
    r = run("compose", *args, "-n", 6, "--seed", 4, "--out", torch_, "--backend", "torch")
    assert r.exit_code == 0, r.output
    assert "torch cpu" in r.output and "onnxruntime" not in r.output
    assert np.abs(np.load(auto) - np.load(torch_)).max() <= 1e-4
    record = json.loads(next(cache.glob("*.verified.json")).read_text())  # checked once, recorded with the graph
    assert record["max_abs_diff"] <= backends.VERIFY_TOLERANCE


def test_auto_falls_back_to_torch_and_says_why(tmp_path, cache):
    r = run("compose", "--guidance", "classifier", "--class", 3, "-n", 2, "--steps", 4, "--out", tmp_path / "a.npy")
    assert r.exit_code == 0, r.output
    assert "torch cpu" in r.output and "does not export (guidance 'classifier' cannot be exported)" in r.output


def test_auto_refuses_a_graph_that_does_not_match_torch(cache, monkeypatch):
    pipe = toolkit.compose(steps=5)
    monkeypatch.setattr(backends, "VERIFY_TOLERANCE", 0.0)  # every graph differs from torch by float error
    engine = backends.select(pipe, "auto")
    assert engine.name == "torch" and "differs from torch" in engine.reason
    monkeypatch.setattr(backends, "VERIFY_TOLERANCE", 1e-4)
    assert backends.select(pipe, "auto").name == "onnxruntime"  # the recorded check is reused, not redone


@pytest.mark.parametrize("args, message", [
    (["--threads", 0], "'--threads': 0 is not in the range x>=1"),
    (["--threads", -3], "'--threads': -3 is not in the range x>=1"),
    (["--backend", "onnxruntime", "--guidance", "classifier", "--class", 1], "cannot be exported"),
    (["--backend", "tensorrt"], "'--backend': 'tensorrt' is not one of"),
    (["--backend", "torch", "--onnx", "x.onnx"], "drop --backend torch"),
])
def test_bad_backend_input(tmp_path, cache, args, message):
    one_line_error(run("compose", *args, "-n", 2, "--steps", 3, "--out", tmp_path / "x.npy"), message)
    assert not (tmp_path / "x.npy").exists()


def test_evaluate_fid_rows_say_their_engine_and_score_the_same(tmp_path, cache):
    common = ["evaluate", "--metric", "fid", "--steps", 4, "-n", 40, "--json"]
    auto = json.loads(run(*common).output)
    torch_ = json.loads(run(*common, "--backend", "torch").output)
    assert auto["rows"][0]["backend"].startswith("onnxruntime cpu")
    assert torch_["rows"][0]["backend"].startswith("torch cpu")
    assert auto["rows"][0]["fd"] == pytest.approx(torch_["rows"][0]["fd"], rel=1e-3)
    one_line_error(run("evaluate", "--metric", "nll", "--limit", 2, "--backend", "onnxruntime"), "applies to --metric fid")


def test_thread_counts(tmp_path, cache, monkeypatch):
    pipe = toolkit.compose(steps=3)
    path = backends.select(pipe, "onnxruntime", threads=1).graph
    session = SamplerSession(path, provider="cpu", threads=1)
    assert session.threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3 and SamplerSession(path, provider="cpu").threads == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == len(os.sched_getaffinity(0))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(GraphError, match="threads must be a positive integer"):
            check_threads(bad)
        with pytest.raises(ToolkitError, match="threads must be a positive integer"):
            backends.select(pipe, "torch", threads=bad)
    with pytest.raises(ToolkitError, match="backend must be one of"):
        backends.select(pipe, "tvm")


class _Recorder:
    """An onnxruntime session that records the batch of each call (what SamplerSession sends it)."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def run(self, names, feed):
        self.batches.append(len(feed["index"]) if "index" in feed else feed["noise"].shape[1])
        assert "x_T" not in feed or len(feed["x_T"]) == feed["noise"].shape[1]  # noise's batch is its axis 1
        return self.inner.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_threads_split_the_batch_into_shards_that_give_the_same_samples(tmp_path):
    """On the CPU a session runs a batch as `threads` contiguous shards at once (one onnxruntime thread each;
    onnxruntime's own intra-op threads cost more CPU): the samples are those of one call, labels and per-sample
    scales follow their samples, and noise fed as inputs is split on its batch axis (1)."""
    from toolkit.exporters.onnx import export_sampler

    pipe = toolkit.compose(sampler="ddpm", steps=4, guidance="cfg")
    seeded = export_sampler(pipe, tmp_path / "s.onnx")
    labels, scale = [0, 1, 2, 3, 4, 5, 6], [0.0, 1.0, 2.0, 3.0, 1.5, 0.5, 4.0]
    one = SamplerSession(seeded, provider="cpu", threads=1)
    three = SamplerSession(seeded, provider="cpu", threads=3)
    three.session = _Recorder(three.session)
    a = one.run_seed(5, range(7), labels, scale)
    b = three.run_seed(5, range(7), labels, scale)
    assert sorted(three.session.batches) == [2, 2, 3]  # 7 samples in 3 shards
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert np.abs(a[0] - a[1]).max() > 0.1  # different labels and scales: the test can tell samples apart
    three.session.batches.clear()
    assert np.abs(three.run_seed(5, [3], [3], [3.0]) - a[3]).max() <= 1e-6 and three.session.batches == [1]

    fed = export_sampler(pipe, tmp_path / "n.onnx", noise="inputs")
    one, two = SamplerSession(fed, provider="cpu", threads=1), SamplerSession(fed, provider="cpu", threads=2)
    two.session = _Recorder(two.session)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((5, *pipe.sample_shape)).astype(np.float32)
    noise = rng.standard_normal((one.noise_slots, 5, *pipe.sample_shape)).astype(np.float32)
    np.testing.assert_allclose(two.run(x_T, noise, labels[:5], scale[:5]), one.run(x_T, noise, labels[:5], scale[:5]),
                               rtol=0, atol=1e-6)
    assert sorted(two.session.batches) == [2, 3]


STARTUP = """
import sys, toolkit
from toolkit import backends
pipe = toolkit.compose(steps=3)
assert "torch._dynamo" not in sys.modules, "loading a model imported torch._dynamo"
engine = backends.select(pipe, "auto")
assert engine.name == "onnxruntime", engine.reason
heavy = [m for m in ("torch._dynamo", "onnxscript", "torch.onnx._internal.exporter") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""


def test_a_command_with_a_cached_graph_imports_no_compiler_or_exporter(cache):
    """torch._dynamo (imported by a meta-device build's normal_/arange) and onnxscript cost about 1.5 s of
    CPU at every start; neither is needed to load a model or run its cached graph."""
    env = {**os.environ, "TOOLKIT_CACHE_DIR": str(cache.parent)}
    backends.select(toolkit.compose(steps=3), "auto")  # exports and verifies into the cache once
    proc = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


RECORDED = """
import sys
from toolkit.cli.base import cli
try:
    cli.main(sys.argv[1:], prog_name="toolkit")
finally:
    print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
"""


def _compose_in_subprocess(cache, cwd, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOOLKIT_CACHE_DIR": str(cache.parent)}
    env.pop("TOOLKIT_BACKEND", None)
    return subprocess.run([sys.executable, "-c", RECORDED, "compose", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_a_repeated_compose_samples_its_recorded_graph_without_importing_torch(tmp_path, cache, monkeypatch):
    """Importing torch is about 2 s of CPU in every command; a request that already ran through its verified graph
    needs only onnxruntime. Same samples (those of torch within 1e-4), same result line."""
    monkeypatch.chdir(tmp_path)
    args = ["--sampler", "ddpm", "--steps", 8, "--class", "3,5", "-n", 6, "--seed", 4]
    first = run("compose", *args, "--out", "first.npy")
    assert first.exit_code == 0 and "onnxruntime cpu" in first.output, first.output
    again = _compose_in_subprocess(cache, tmp_path, *args, "--out", "again.npy")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.strip().endswith("no torch"), again.stderr[-2000:]
    assert again.stdout.replace("again.npy", "first.npy").strip() == first.output.strip()
    assert np.array_equal(np.load(tmp_path / "again.npy"), np.load(tmp_path / "first.npy"))
    r = run("compose", *args, "--out", "torch.npy", "--backend", "torch")
    assert r.exit_code == 0, r.output
    assert np.abs(np.load(tmp_path / "again.npy") - np.load(tmp_path / "torch.npy")).max() <= 1e-4
    png = _compose_in_subprocess(cache, tmp_path, *args, "--out", "again.png")  # the grid is drawn without torch
    assert png.returncode == 0 and png.stderr.strip().endswith("no torch"), png.stderr[-2000:]
    assert run("compose", *args, "--out", "first.png").exit_code == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "first.png").read_bytes()
    other = _compose_in_subprocess(cache, tmp_path, *args[:3], 9, *args[4:], "--out", "nine.npy")  # not recorded
    assert other.returncode == 0 and other.stderr.strip().endswith("torch imported"), other.stderr[-2000:]
    (graph,) = cache.glob("ddpm-8-*.onnx")  # an app's graph (compose --onnx) needs no torch either
    app = _compose_in_subprocess(cache, tmp_path, "--onnx", graph, *args[4:], "--out", "app.npy")
    assert app.returncode == 0 and app.stderr.strip().endswith("no torch"), app.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "app.npy"), np.load(tmp_path / "first.npy"))


def test_a_recorded_request_is_not_reused_once_its_weights_change(tmp_path, cache, monkeypatch):
    """The checkpoint's files are part of the record: new weights take the full path and give their own samples."""
    import shutil
    import time

    from safetensors.numpy import load_file, save_file

    from toolkit.checkpoint import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    shutil.copytree(resolve_checkpoint("digits"), tmp_path / "mine")
    time.sleep(2.1)  # a file changed within 2 s of a run's start is not trusted to be what the run read
    args = ["--model", "mine", "--steps", 6, "-n", 4, "--class", "7"]
    assert run("compose", *args, "--out", "old.npy").exit_code == 0
    hit = _compose_in_subprocess(cache, tmp_path, *args, "--out", "hit.npy")
    assert hit.returncode == 0 and hit.stderr.strip().endswith("no torch"), hit.stderr[-2000:]
    weights = tmp_path / "mine" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 4)[-1]
    tensors[name] = tensors[name] * np.float32(1.5)
    save_file(tensors, weights)
    miss = _compose_in_subprocess(cache, tmp_path, *args, "--out", "new.npy")
    assert miss.returncode == 0 and miss.stderr.strip().endswith("torch imported"), miss.stderr[-2000:]
    assert run("compose", *args, "--out", "torch.npy", "--backend", "torch").exit_code == 0
    new, old = np.load(tmp_path / "new.npy"), np.load(tmp_path / "old.npy")
    assert np.abs(new - old).max() > 1e-2  # the new weights sampled, not the recorded graph
    assert np.abs(new - np.load(tmp_path / "torch.npy")).max() <= 1e-4


def test_a_record_is_dropped_when_code_its_check_a_link_or_a_shadowing_folder_changes(tmp_path, cache, monkeypatch):
    import shutil
    import time

    from toolkit import graph_index
    from toolkit.checkpoint import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    probe = tmp_path / "probe_module_of_the_index.py"
    probe.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import probe_module_of_the_index  # noqa: F401 - loaded code: part of what a record depends on

    shutil.copytree(resolve_checkpoint("digits"), tmp_path / "mine")
    (tmp_path / "current").symlink_to("mine")
    time.sleep(2.1)
    assert run("compose", "--model", "current", "--steps", 5, "-n", 2, "--out", "a.npy").exit_code == 0
    (index,) = (cache / "requests").glob("*.json")
    key = index.stem
    assert graph_index.lookup(key) is not None
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to(resolve_checkpoint("digits"))  # the same weights, another folder
    assert graph_index.lookup(key) is None
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to("mine")
    assert graph_index.lookup(key) is not None
    (verified,) = cache.glob("*.verified.json")
    record = json.loads(verified.read_text())
    verified.write_text(json.dumps({**record, "max_abs_diff": 0.5}))  # its torch check no longer passes
    assert graph_index.lookup(key) is None
    verified.write_text(json.dumps(record))
    assert graph_index.lookup(key) is not None
    st = probe.stat()
    os.utime(probe, ns=(st.st_atime_ns, st.st_mtime_ns))  # the code "changed": same mtime, a new change time
    assert graph_index.lookup(key) is None
    (graph,) = cache.glob("*.onnx")
    reads = [("current", tmp_path / "current", graph_index.folder_stamps(tmp_path / "mine"))]
    describe = {"sampler": "ddim", "steps": 5, "nfe": 5, "schedule": "cosine", "iterations": 5}
    # a module changed since the run started: what it ran may not be what is on disk, so nothing is recorded
    assert graph_index.record("k", graph, "r", describe, reads, time.time_ns()) is None
    time.sleep(2.1)
    assert graph_index.record("k", graph, "r", describe, reads, time.time_ns()) is not None
    swapped = [("current", tmp_path / "current", {"model.safetensors": [1, 2, 3, 4]})]  # replaced after it was read
    assert graph_index.record("k2", graph, "r", describe, swapped, time.time_ns()) is None
    graph.write_bytes(graph.read_bytes() + b"\0")  # the graph is not the one checked
    assert graph_index.lookup("k") is None


def _page_faults(tuning: str) -> int:
    code = ("import resource, toolkit\n"
            "from toolkit.allocator import tune_allocator\n"
            "tune_allocator()\n"
            "pipe = toolkit.compose(model='digits', steps=4)\n"
            "next(pipe.batches(100, batch_size=100))\n"  # warm: the first batch maps what any run needs
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in pipe.batches(1500, batch_size=500): pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")
    env = {**os.environ, "TOOLKIT_MALLOC_TUNING": tuning, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_tuned_allocator_stops_refaulting_buffers_every_step():
    plain, tuned = _page_faults("0"), _page_faults("1")
    assert tuned * 5 < plain, (plain, tuned)


def test_cached_constants_equal_the_formulas():
    from toolkit.plugins.models.layers import embedding_frequencies, timestep_embedding

    t = torch.tensor([0.0, 1.5, 999.0])
    half = 16
    freqs = torch.tensor([10000 ** (-k / half) for k in range(half)], dtype=torch.float64)
    want = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], 1)
    got = timestep_embedding(t, 32, freqs=embedding_frequencies(32))
    assert torch.allclose(got.double(), want, atol=1e-4)
    schedule = toolkit.create("schedule", "cosine", num_timesteps=1000)
    at = diffusion.alpha_bar_fn(schedule)
    x = torch.zeros(3, 1, 2, 2)
    for tt in (torch.tensor([0, 10, 999]), torch.tensor([-1.0, 10.25, 998.5])):
        assert torch.allclose(at(tt, x), diffusion.alpha_bar(schedule, tt, x), rtol=1e-6)
    a = at(torch.tensor([3, 500, 900]), x)
    x_t, v = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    assert torch.allclose(diffusion.eps_from_output("v", a, x_t, v), (1 - a).sqrt() * x_t + a.sqrt() * v)
    x0 = torch.randn(3, 1, 2, 2)
    assert torch.allclose(diffusion.eps_from_output("x0", a, x_t, x0), (x_t - a.sqrt() * x0) / (1 - a).sqrt())


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(script, *args, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_gpu_runs_to_completion_on_cpu(tmp_path):
    result = _bench("bench_gpu.py", "--device", "cpu", "--quick", tmp_path=tmp_path)
    rows = {(r["contender"], r["batch"]): r for r in result["rows"]}
    for batch in (1, 2):
        for name in ("ours_torch_eager", "ours_torch_compiled", "ours_onnxruntime_loop", "ours_onnxruntime_unrolled"):
            assert rows[(name, batch)]["samples_per_s"] > 0
            assert rows[(name, batch)]["max_abs_diff_to_eager"] <= 1e-4, (name, batch)
        assert rows[("ours_torch_cuda_graphs", batch)]["skipped"] == "needs CUDA"
        if "skipped" not in rows[("diffusers_eager", batch)]:  # the same DDIM from our x_T, float32 coefficients
            assert rows[("diffusers_eager", batch)]["max_abs_diff_to_eager"] < 0.05


def test_bench_sampling_quick(tmp_path):
    result = _bench("bench_sampling.py", "--quick", "--rounds", "1", tmp_path=tmp_path)
    for row in result["engines"]:
        assert 0 < row["fraction_of_limit"]["ours_onnxruntime"] and 0 < row["fraction_of_limit"]["ours_torch"]
    assert result["overhead"][0]["us_per_step"]["ours_torch"] > 0
    faults = result["faults"]
    assert faults["torch_tuned"]["tuned"] and not faults["torch_untuned"]["tuned"]


def test_score_is_minus_eps_over_sigma():
    a = torch.tensor([0.9, 0.5, 0.01]).reshape(3, 1)
    eps = torch.randn(3, 4)
    score = -eps / (1 - a).sqrt()  # ∇ log q(x_t | x_0) = −ε/σ
    assert torch.allclose(diffusion.eps_from_output("score", a, torch.zeros(3, 4), score), eps, atol=1e-6)
