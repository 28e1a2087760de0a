"""ONNX export of the predictor and of whole sampling runs; the torch-free runtime; parity with PyTorch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import toolkit
from helpers import one_line_error, run
from toolkit.exporters.onnx import export_predictor, export_sampler
from toolkit.exporters.runtime import GraphError, SamplerSession, draw_noise
from toolkit.noise import NoiseStreams

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "onnx-app" / "sample_digits.py"


def torch_inputs(pipe, n, seed=0):
    """x_T and the noise slots exactly as Pipeline.sample draws them (x_T first, then each iteration's draws)."""
    streams = NoiseStreams(seed, range(n), pipe.sample_shape)
    x_T = streams.draw()
    slots = [streams.draw() for _ in range(pipe.plan.noise_slots)]
    return x_T, torch.stack(slots) if slots else None


CASES = {
    "ddim50": dict(sampler="ddim", steps=50),
    "ddim20-eta-cfg": dict(sampler="ddim", steps=20, eta=0.5, guidance="cfg", guidance_options={"scale": 3.0}),
    "ddpm1000": dict(sampler="ddpm", steps=1000),
    "ddpm100-cfg-beta": dict(sampler="ddpm", steps=100, variance="beta", guidance="cfg",
                             guidance_options={"scale": 1.5}),
    "ddim10-hat": dict(sampler="ddim", steps=10, sigma="hat"),
    "dpmpp2m10": dict(sampler="dpmpp-2m", steps=10),
    "dpmpp2m8-cfg": dict(sampler="dpmpp-2m", steps=8, guidance="cfg", guidance_options={"scale": 2.0}),
    "unipc8": dict(sampler="unipc", steps=8),
    "unipc6-cfg": dict(sampler="unipc", steps=6, guidance="cfg", guidance_options={"scale": 2.0}),
    "heun6": dict(sampler="heun", steps=6),
    "heun8-cfg": dict(sampler="heun", steps=8, guidance="cfg", guidance_options={"scale": 2.0}),
    "euler-a10": dict(sampler="euler-a", steps=10),
    "dpmpp2m8-linear": dict(schedule="linear", sampler="dpmpp-2m", steps=8),  # fractional t, another schedule
    "euler-a8-cfg": dict(sampler="euler-a", steps=8, guidance="cfg", guidance_options={"scale": 2.0}),
    # listed spacings (toolkit tune-grid): fractional step times, the network told shifted times
    "unipc5-tuned-cfg": dict(sampler="unipc", spacing="991@882.9,891.3@907.9,546.2@556.5,233.9@260.2,59.6@49.1",
                             guidance="cfg", guidance_options={"scale": 2.0}),
    "ddim5-listed": dict(sampler="ddim", eta=0.5, spacing="999,700.5@690,400,150.25,20"),
}


INPUT_CASES = ("ddpm100-cfg-beta", "heun6", "dpmpp2m10", "ddim20-eta-cfg")  # also exported with --noise inputs


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, kwargs in CASES.items():
        pipe = toolkit.compose(**kwargs)
        out[name] = (pipe, export_sampler(pipe, folder / f"{name}.onnx"))
        if name in INPUT_CASES:
            out[name + "/inputs"] = (pipe, export_sampler(pipe, folder / f"{name}-inputs.onnx", noise="inputs"))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_whole_run_parity_with_pytorch(graphs, name):
    """The same seed: the seed-only graph makes the pipeline's x_T and step noise itself (toolkit.rng in ONNX
    operators), and onnxruntime's samples equal the PyTorch pipeline's within 1e-4."""
    pipe, path = graphs[name]
    n = 6
    labels = [0, 3, 7, 9, 1, 5]
    scale = [0.0, 1.0, 2.0, 3.0, 4.0, 0.5] if pipe.guidance else None
    expected = pipe.sample(n, seed=11, labels=labels, scale=scale)
    session = SamplerSession(path, provider="cpu")
    assert session.seeded and set(session.inputs) >= {"seed", "index"}
    got = session.sample(n, seed=11, labels=labels, scale=scale)
    assert session.metadata["nfe"] == pipe.nfe
    assert got.shape == (n, 1, 8, 8)
    assert np.abs(got - expected.numpy()).max() < 1e-4
    later = session.run_seed(11, [4, 5], labels[4:], None if scale is None else scale[4:])  # sample i: (seed, i)
    assert np.abs(later - expected[4:].numpy()).max() < 1e-4
    if not pipe.guidance:  # the null label samples unconditionally, as the pipeline does with labels=None
        unc = session.sample(2, seed=11)
        assert np.abs(unc - pipe.sample(2, seed=11).numpy()).max() < 1e-4


@pytest.mark.parametrize("name", INPUT_CASES)
def test_a_graph_with_noise_inputs_runs_the_same_noise(graphs, name):
    """--noise inputs: the app feeds x_T and the noise slots; fed the torch streams, the samples are torch's."""
    pipe, path = graphs[name + "/inputs"]
    n, labels = 4, [2, 5, 8, 1]
    scale = [1.0, 2.0, 0.0, 3.0] if pipe.guidance else None
    x_T, noise = torch_inputs(pipe, n, seed=11)
    session = SamplerSession(path, provider="cpu")
    assert not session.seeded
    got = session.run(x_T.numpy(), noise.numpy() if noise is not None else None, np.array(labels), scale)
    expected = pipe.sample(n, seed=11, labels=labels, scale=scale).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(session.sample(n, seed=11, labels=labels, scale=scale) - expected).max() < 1e-4  # numpy rng


def test_metadata_and_inputs(graphs):
    pipe, path = graphs["ddim20-eta-cfg"]
    model = onnx.load(path)
    raw = {p.key: p.value for p in model.metadata_props}
    meta = {k: json.loads(v) for k, v in raw.items()}  # every value is JSON: one parser reads them all
    assert meta["kind"] == "diffusion-toolkit-sampler" and meta["toolkit_version"] == toolkit.__version__
    assert meta["sampler"] == "ddim" and meta["steps"] == 20 and meta["eta"] == 0.5
    assert meta["schedule"] == "cosine" and meta["sample_shape"] == [1, 8, 8]
    assert meta["guidance"] == "cfg" and meta["guidance_scale"] == 3.0
    assert meta["num_classes"] == 10 and meta["null_label"] == 10 and meta["value_range"] == [-1, 1]
    assert meta["timesteps"] == pipe.timesteps.tolist()
    assert meta["noise"] == "seed" and meta["rng"] == "toolkit-counter-1" and meta["metadata_version"] == 2
    assert json.loads(Path(f"{path}.json").read_text()) == meta  # the same object beside the graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"seed": [], "index": ["batch"], "labels": ["batch"], "scale": ["batch"]}
    assert any(n.op_type == "Loop" for n in model.graph.node)
    _, inputs_path = graphs["ddim20-eta-cfg/inputs"]
    model = onnx.load(inputs_path)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"x_T": ["batch", 1, 8, 8], "noise": [20, "batch", 1, 8, 8], "labels": ["batch"],
                    "scale": ["batch"]}


def test_unrolled_layout_gives_the_same_samples(tmp_path):
    pipe = toolkit.compose(sampler="ddpm", steps=6)
    loop, unrolled = export_sampler(pipe, tmp_path / "l.onnx"), export_sampler(pipe, tmp_path / "u.onnx",
                                                                               layout="unrolled")
    assert not any(n.op_type == "Loop" for n in onnx.load(unrolled).graph.node)
    a = SamplerSession(loop, provider="cpu").sample(3, seed=0, labels=[1, 2, 3])
    b = SamplerSession(unrolled, provider="cpu").sample(3, seed=0, labels=[1, 2, 3])
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(a - pipe.sample(3, seed=0, labels=[1, 2, 3]).numpy()).max() < 1e-4


def test_predictor_export_dynamic_batch(tmp_path, tiny_ckpt):
    import onnxruntime as ort

    ckpt = toolkit.load_checkpoint(tiny_ckpt)
    path = export_predictor(ckpt.model, tmp_path / "eps.onnx", config=ckpt.config)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "t", "y"]
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["kind"] == "diffusion-toolkit-predictor" and meta["prediction"] == "epsilon"
    for B in (1, 7):
        x, t, y = torch.randn(B, 1, 8, 8), torch.rand(B) * 999, torch.arange(B) % 11
        got = session.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]
        assert np.abs(got - ckpt.model(x, t, y).detach().numpy()).max() < 1e-4


def test_runtime_sample_with_numpy_noise(graphs):
    pipe, path = graphs["ddpm100-cfg-beta/inputs"]
    session = SamplerSession(path, provider="cpu")
    a = session.sample(5, seed=3, labels=[4], batch_size=2)
    b = session.sample(5, seed=3, labels=[4])
    assert a.shape == (5, 1, 8, 8) and np.abs(a - b).max() < 1e-5  # sample i depends only on (seed, i)
    assert a.min() >= -1 and a.max() <= 1
    x_T, noise = draw_noise(3, 5, (1, 8, 8), 100, True)
    c = session.sample(5, labels=[4], x_T=x_T, noise=noise)
    assert np.abs(a - c).max() < 1e-5


def test_runtime_bad_input(graphs, tmp_path, tiny_ckpt):
    _, path = graphs["ddim20-eta-cfg/inputs"]
    s = SamplerSession(path, provider="cpu")
    with pytest.raises(GraphError, match=r"x_T must have shape \[B, 1, 8, 8\]"):
        s.run(np.zeros((2, 1, 9, 9), np.float32), np.zeros((20, 2, 1, 9, 9), np.float32), [1, 2])
    with pytest.raises(GraphError, match=r"noise must have shape \[20, 2, 1, 8, 8\]"):
        s.run(np.zeros((2, 1, 8, 8), np.float32), np.zeros((19, 2, 1, 8, 8), np.float32), [1, 2])
    with pytest.raises(GraphError, match="out of range"):
        s.sample(2, labels=[11])
    with pytest.raises(GraphError, match="needs class labels"):
        s.sample(2)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a graph")
    with pytest.raises(GraphError, match="not a loadable ONNX graph"):
        SamplerSession(garbage)
    predictor = export_predictor(toolkit.load_checkpoint(tiny_ckpt).model, tmp_path / "p.onnx")
    with pytest.raises(GraphError, match="not a diffusion-toolkit sampler graph"):
        SamplerSession(predictor)
    if s.provider == "cpu" and SamplerSession(path).provider == "cpu":  # no usable GPU here
        with pytest.raises(GraphError, match="CUDA execution provider is not available"):
            SamplerSession(path, provider="cuda")


def test_cli_export_and_onnxruntime_backend(tmp_path):
    graph = tmp_path / "s.onnx"
    r = run("export", "onnx", "--sampler", "ddim", "--steps", 10, "--eta", 0.3, "--out", graph)
    assert r.exit_code == 0, r.output
    ref, got, cached = tmp_path / "ref.npy", tmp_path / "got.npy", tmp_path / "cached.npy"
    common = ["-n", 5, "--class", "2,4", "--seed", 9]
    assert run("compose", "--steps", 10, "--eta", 0.3, *common, "--out", ref).exit_code == 0
    r = run("compose", "--backend", "onnxruntime", "--onnx", graph, *common, "--out", got)
    assert r.exit_code == 0, r.output
    assert "onnxruntime cpu" in r.output
    assert np.abs(np.load(ref) - np.load(got)).max() < 1e-4
    os.environ["TOOLKIT_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        r = run("compose", "--backend", "onnxruntime", "--steps", 10, "--eta", 0.3, *common, "--out", cached)
        assert r.exit_code == 0, r.output
        assert len(list((tmp_path / "cache" / "onnx").glob("ddim-10-*.onnx"))) == 1
    finally:
        del os.environ["TOOLKIT_CACHE_DIR"]
    assert np.abs(np.load(ref) - np.load(cached)).max() < 1e-4
    r = run("export", "onnx", "--component", "predictor", "--out", tmp_path / "eps.onnx")
    assert r.exit_code == 0 and (tmp_path / "eps.onnx").stat().st_size > 1e6


@pytest.mark.parametrize("args, message", [
    (["export", "onnx", "--guidance", "classifier", "--out", "c.onnx"], "guidance 'classifier' cannot be exported"),
    (["export", "onnx", "--out", "c.txt"], "--out must be a .onnx file"),
    (["export", "onnx", "--out", "missing/c.onnx"], "does not exist"),
    (["export", "onnx", "--component", "predictor", "--steps", "5", "--out", "c.onnx"], "exports the network alone"),
    (["export", "onnx", "--component", "predictor", "--model", "digits-classifier", "--out", "c.onnx"],
     "holds a classifier checkpoint, not a noise predictor"),
    (["compose", "--backend", "onnxruntime", "--onnx", "nope.onnx", "--out", "x.png"], "no sampler graph at"),
    (["compose", "--onnx", "nope.onnx", "--out", "x.png"], "no sampler graph at"),  # $TOOLKIT_BACKEND=torch: no matter
    (["compose", "--backend", "onnxruntime", "--onnx", "g.onnx", "--sampler", "ddpm", "--out", "x.png"],
     "drop --sampler"),
])
def test_bad_input(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    one_line_error(run(*args), message)
    assert list(tmp_path.iterdir()) == []


def _torch_blocked_env(tmp_path):
    """An environment in which `import torch` fails: a shadowing torch package first on the path."""
    block = tmp_path / "block" / "torch"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('torch is not available in this process')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(block.parent), str(ROOT)])}


def test_onnx_app_runs_without_torch(graphs, tmp_path):
    _, path = graphs["ddim50"]
    env = _torch_blocked_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "torch is not available" in check.stderr
    out = tmp_path / "sevens.png"
    r = subprocess.run([sys.executable, str(APP), str(path), "--class", "7", "-n", "8", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.ndim == 2 and img.shape[1] == 8 * (8 * 4 + 1) + 1 and img.max() > 200
    # and the toolkit's own runtime module imports and samples without torch too
    code = ("import sys; from toolkit.exporters.runtime import SamplerSession; "
            f"x = SamplerSession({str(path)!r}).sample(3, seed=1, labels=[2]); "
            "assert 'torch' not in sys.modules; print(x.shape)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "(3, 1, 8, 8)" in r.stdout, r.stderr


def test_solver_metadata_records_every_option(graphs):
    pipe, path = graphs["dpmpp2m10"]
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["sampler_options"]) == {"order": 2, "clip_x0": True, "threshold": 0.0, "clip_range": 1.0,
                                                   "spacing": "logsnr", "default_steps": 20}
    assert (meta["plugin_api"], meta["iterations"], meta["nfe"], meta["noise_slots"]) == ("2", "10", "10", "0")
    assert [d.dim_param or d.dim_value for d in onnx.load(path).graph.input[1].type.tensor_type.shape.dim] == \
        ["batch"]
    heun, path = graphs["heun6"]
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert (meta["steps"], meta["iterations"], meta["nfe"]) == ("6", "11", "11")  # 2S − 1 network calls


def test_a_v1_sampler_with_its_own_loop_is_refused(tmp_path, fresh_registry):
    """Plugin API 1 with a sample() that is not the standard loop: torch runs it, the exporter refuses it."""
    import types

    from helpers import HalvedV1

    mod = types.ModuleType("halved_plugin")
    mod.register_samplers = toolkit.hookimpl(lambda register: register("halved", HalvedV1))
    fresh_registry.register_plugin(mod, "halved", dist="halved-dist")
    r = run("compose", "--sampler", "halved", "--steps", 4, "-n", 2, "--out", tmp_path / "x.npy")
    assert r.exit_code == 0, r.output
    one_line_error(run("export", "onnx", "--sampler", "halved", "--steps", 4, "--out", tmp_path / "h.onnx"),
                   "own sample() loop")
    assert not (tmp_path / "h.onnx").exists()


def test_the_onnx_cache_trusts_nothing_it_did_not_check(tmp_path, monkeypatch):
    """A graph planted under a cached name (a 3-step graph as the 10-step one, digest and all) and a corrupt
    entry are exported again, never run; a cache folder others can write to is refused."""
    import shutil

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    common = ["-n", 3, "--class", "2", "--seed", 1, "--steps", 10]
    ref, got = tmp_path / "ref.npy", tmp_path / "got.npy"
    assert run("compose", *common, "--out", ref).exit_code == 0
    assert run("compose", "--backend", "onnxruntime", *common, "--out", got).exit_code == 0
    (entry,) = (tmp_path / "cache" / "onnx").glob("ddim-10-*.onnx")
    planted = export_sampler(toolkit.compose(steps=3), tmp_path / "three.onnx")
    shutil.copy(planted, entry)
    from toolkit.graph_index import digest_file

    entry.with_suffix(".sha256").write_text(digest_file(entry) + "\n")
    assert run("compose", "--backend", "onnxruntime", *common, "--out", got).exit_code == 0
    assert np.abs(np.load(ref) - np.load(got)).max() < 1e-4  # the planted graph did not run
    entry.write_bytes(entry.read_bytes()[:1000])  # a corrupt entry: exported again
    assert run("compose", "--backend", "onnxruntime", *common, "--out", got).exit_code == 0
    assert np.abs(np.load(ref) - np.load(got)).max() < 1e-4
    os.chmod(tmp_path / "cache" / "onnx", 0o777)
    one_line_error(run("compose", "--backend", "onnxruntime", *common, "--out", got), "refusing the ONNX cache")


def test_the_predictor_graph_says_what_it_outputs(tmp_path, tiny_ckpt):
    """Batch dimension 'batch' (it was 's13'), JSON metadata, no value range for ε, and the schedule's ᾱ table."""
    ckpt = toolkit.load_checkpoint(tiny_ckpt)
    path = export_predictor(ckpt.model, tmp_path / "eps.onnx", config=ckpt.config)
    model = onnx.load(path)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["prediction"] == "epsilon" and meta["value_range"] is None and "noise" in meta["output"]
    assert np.allclose(meta["alphas_cumprod"], ckpt.schedule.alphas_cumprod.numpy())
    assert json.loads(Path(f"{path}.json").read_text()) == meta


# --- issue 13: one seed, the same digits; a runtime that never crashes on bad input ---

def test_one_seed_gives_the_same_digits_in_torch_numpy_and_the_graph(graphs, tmp_path):
    """SamplerSession.sample(seed=0) and `toolkit compose --seed 0` differed by up to 1.9 (numpy vs torch
    streams); now the graph makes the noise with the toolkit's generator and they agree within 1e-4."""
    pipe, path = graphs["ddpm100-cfg-beta"]
    r = run("compose", "--sampler", "ddpm", "--steps", 100, "--variance", "beta", "--guidance", "cfg", "--scale", 1.5,
            "--class", "3", "-n", 4, "--seed", 0, "--out", tmp_path / "torch.npy")
    assert r.exit_code == 0, r.output
    got = SamplerSession(path, provider="cpu").sample(4, seed=0, labels=3)
    assert np.abs(got - np.load(tmp_path / "torch.npy")).max() < 1e-4
    from toolkit.rng import normal_numpy, normal_torch

    index = np.array([0, 1, 2**40])
    assert np.array_equal(normal_numpy(5, index, 7, (3, 4)), normal_torch(5, index, 7, (3, 4)).numpy())


def test_the_generator_is_a_standard_normal():
    """Mean 0, variance 1, normal tails, and no correlation between neighbouring samples or draws."""
    from toolkit.rng import normal_numpy

    a = normal_numpy(0, np.arange(4000), 1, (64,)).astype(np.float64)
    b = normal_numpy(0, np.arange(4000), 2, (64,)).astype(np.float64)
    c = normal_numpy(1, np.arange(4000), 1, (64,)).astype(np.float64)
    n = a.size
    assert abs(a.mean()) < 4 / np.sqrt(n) and abs(a.var() - 1) < 4 * np.sqrt(2 / n)
    assert abs(((a - a.mean()) ** 4).mean() / a.var() ** 2 - 3) < 0.1  # kurtosis of a normal
    assert abs((np.abs(a) > 1.96).mean() - 0.05) < 0.005
    for x, y in ((a[:-1], a[1:]), (a, b), (a, c), (a[:, :-1], a[:, 1:])):
        assert abs(np.corrcoef(x.ravel(), y.ravel())[0, 1]) < 4 / np.sqrt(x.size)


def test_the_graph_refuses_bad_inputs_naming_them(graphs):
    """Raw onnxruntime (what a Node or web app calls): negative labels no longer wrap (−3 drew eights), a
    labels/scale/noise tensor of batch 1 no longer broadcasts; the error names the input."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    _, path = graphs["ddim20-eta-cfg"]
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ok = {"seed": np.array(1, np.int64), "index": np.arange(4, dtype=np.int64),
          "labels": np.array([1, 2, 3, 10], np.int64), "scale": np.full(4, 3, np.float32)}
    assert s.run(None, ok)[0].shape == (4, 1, 8, 8)  # 10: the null label, allowed
    for change, message in (({"labels": np.array([1, 2, 3, -3])}, "labels must lie in 0..10"),
                            ({"labels": np.array([1, 2, 3, 11])}, "labels must lie in 0..10"),
                            ({"labels": np.array([1])}, "labels must hold one label per sample"),
                            ({"scale": np.array([1.0], np.float32)}, "scale must hold one value per sample"),
                            ({"scale": np.full(4, np.nan, np.float32)}, "scale must be finite and >= 0"),
                            ({"seed": np.array(-1)}, "seed must be >= 0"),
                            ({"index": np.array([0, -1, 2, 3])}, "index must be >= 0")):
        with pytest.raises(Exception, match=message):
            s.run(None, {**ok, **{k: v.astype(ok[k].dtype) for k, v in change.items()}})
    _, path = graphs["ddpm100-cfg-beta/inputs"]
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x_T, noise = draw_noise(0, 4, (1, 8, 8), 100, True)
    feed = {"x_T": x_T, "noise": noise[:, :1], "labels": np.array([1, 2, 3, 4]), "scale": np.ones(4, np.float32)}
    with pytest.raises(Exception, match="noise must be"):
        s.run(None, feed)


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=3.7), "labels must be integers"),
    (dict(labels="7"), "labels must be integers"),
    (dict(labels=[1, 2, 3, 4]), "one label or one per sample (16), got 4"),
    (dict(labels=[11]), "class label 11 is out of range"),
    (dict(labels=[-1]), "class label -1 is out of range"),
    (dict(labels=[2], scale=float("nan")), "guidance scale must be a finite number"),
    (dict(labels=[2], seed=-1), "seed must be an integer in 0..2^63-1"),
    (dict(labels=[2], seed=2.5), "seed must be an integer"),
])
def test_the_runtime_refuses_bad_input(graphs, kwargs, message):
    _, path = graphs["ddim20-eta-cfg"]
    s = SamplerSession(path, provider="cpu")
    with pytest.raises(GraphError, match=message.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")):
        s.sample(16, **kwargs)


def test_the_runtime_samples_unconditionally_without_labels_and_takes_the_null_label(graphs):
    """sample(n) without labels on a conditional graph failed ('class label 10 is out of range')."""
    pipe, path = graphs["ddim50"]
    s = SamplerSession(path, provider="cpu")
    expected = pipe.sample(3, seed=2).numpy()
    assert np.abs(s.sample(3, seed=2) - expected).max() < 1e-4
    assert np.abs(s.sample(3, seed=2, labels=[10]) - expected).max() < 1e-4  # the null label, explicitly


def test_the_runtime_refuses_nan_noise_and_reads_metadata_through_one_check(graphs, tmp_path):
    _, path = graphs["ddpm100-cfg-beta/inputs"]
    s = SamplerSession(path, provider="cpu")
    x_T, noise = draw_noise(0, 2, (1, 8, 8), 100, True)
    x_T[0, 0, 0, 0] = np.nan
    with pytest.raises(GraphError, match="x_T holds NaN"):
        s.run(x_T, noise, [1, 2], [1.0, 1.0])
    model = onnx.load(path)
    for key, value, message in (("sample_shape", '"x"', "metadata 'sample_shape' must be a list"),
                                ("steps", "{", "metadata 'steps' is not JSON"),
                                ("inputs", None, "metadata 'inputs' is missing")):
        edited = onnx.ModelProto()
        edited.CopyFrom(model)
        props = [p for p in edited.metadata_props if p.key != key]
        del edited.metadata_props[:]
        edited.metadata_props.extend(props)
        if value is not None:
            entry = edited.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(edited, tmp_path / "edited.onnx")
        with pytest.raises(GraphError, match=message):
            SamplerSession(tmp_path / "edited.onnx")


def test_compose_on_a_truncated_graph_is_one_line(graphs, tmp_path):
    _, path = graphs["ddim50"]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(Path(path).read_bytes()[:4000])
    one_line_error(run("compose", "--backend", "onnxruntime", "--onnx", bad, "-n", 2, "--out", tmp_path / "x.npy"),
                   "is not a loadable ONNX graph")


def test_no_red_provider_noise_without_a_gpu(graphs):
    """On a machine without an NVIDIA device, a session prints nothing (onnxruntime-gpu used to print its
    libcublas error on every session)."""
    from toolkit.exporters.runtime import _cuda_device_present

    if _cuda_device_present():
        pytest.skip("this machine has a GPU")
    _, path = graphs["ddim50"]
    code = (f"from toolkit.exporters.runtime import SamplerSession; s = SamplerSession({str(path)!r}); "
            "print(s.provider, s.sample(1).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "cpu (1, 1, 8, 8)" and r.stderr == "", r.stderr


@pytest.mark.parametrize("args,message", [
    (["--class", "12"], "--class must lie in 0..9, got 12"),
    (["--class", "-3"], "--class must lie in 0..9, got -3"),
])
def test_the_python_app_refuses_bad_input_in_one_line(graphs, tmp_path, args, message):
    _, path = graphs["ddim50"]
    r = subprocess.run([sys.executable, str(APP), str(path), *args, "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}", r.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(Path(path).read_bytes()[:4000])
    r = subprocess.run([sys.executable, str(APP), str(bad), "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a loadable" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_the_python_app_draws_the_same_digits_as_compose(graphs, tmp_path):
    pipe, path = graphs["ddim50"]
    out = tmp_path / "app.png"
    r = subprocess.run([sys.executable, str(APP), str(path), "--class", "7", "-n", "8", "--seed", "4",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    img = np.asarray(Image.open(out)).astype(np.float64)
    expected = np.round((pipe.sample(8, seed=4, labels=7).numpy()[:, 0] + 1) * 127.5)
    for k in range(8):  # the app enlarges each sample 4× with a 1-pixel border
        tile = img[1:1 + 32, 1 + k * 33: 1 + k * 33 + 32][::4, ::4]
        assert np.abs(tile - expected[k]).max() <= 1


def test_an_fp16_graph_halves_the_weights_and_reports_its_precision(tmp_path):
    """--precision fp16: the network's weights and arithmetic in float16 inside the float32 loop (inputs and
    output stay float32); its samples differ from float32's by the rounding alone (bench_gpu.py reports it)."""
    pipe = toolkit.compose(steps=10)
    full = export_sampler(pipe, tmp_path / "fp32.onnx")
    r = run("export", "onnx", "--steps", 10, "--precision", "fp16", "--out", tmp_path / "fp16.onnx")
    assert r.exit_code == 0, r.stderr
    half = tmp_path / "fp16.onnx"
    assert half.stat().st_size < 0.6 * full.stat().st_size
    session = SamplerSession(half, provider="cpu")
    assert session.metadata["precision"] == "fp16"
    assert json.loads((tmp_path / "fp16.onnx.json").read_text())["precision"] == "fp16"
    assert [session.inputs[k].type for k in ("seed", "index")] == ["tensor(int64)"] * 2
    labels = [k % 10 for k in range(16)]
    x16 = session.sample(16, seed=0, labels=labels)
    x32 = SamplerSession(full, provider="cpu").sample(16, seed=0, labels=labels)
    assert x16.dtype == np.float32
    assert 1e-5 < np.abs(x16 - x32).max() < 2e-2
    one_line_error(run("export", "onnx", "--component", "predictor", "--precision", "fp16",
                       "--out", tmp_path / "p.onnx"), "--component predictor exports the network alone")
