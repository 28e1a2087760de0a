"""One validated schema for what is read back from disk, and numbers bounded before anything is allocated
(issue 14, items 12 and 13): an edited config.json, training_state or shard index, or one huge number on the
command line, is one line naming the field and exit 2, never a traceback or a request for terabytes."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import one_line_error, run
from toolkit import limits, schema
from toolkit.errors import ToolkitError

TINY = ["--model-option", "base_channels=8", "--model-option", "attention_heads=2", "--batch-size", 8]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("schema") / "ck"
    assert run("train", *TINY, "--steps", 2, "--out", out).exit_code == 0
    return out


def edited(trained, tmp_path, keys, value):
    """A copy of the checkpoint with config.json field ``keys`` set to ``value`` (None: deleted)."""
    ck = tmp_path / "edited"
    shutil.copytree(trained, ck)
    config = json.loads((ck / "config.json").read_text())
    obj = config
    for k in keys[:-1]:
        obj = obj[k]
    if value is None:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value
    (ck / "config.json").write_text(json.dumps(config))
    return ck


CONFIG_EDITS = [  # the figures of item 12: each was a traceback (or a terabyte allocation) before
    (["format_version"], "1", "format_version must be an integer"),
    (["latent"], "x", "latent must be an object"),
    (["model", "options", "num_classes"], 10**9, "model.options.num_classes must be an integer in 1..100000"),
    (["schedule", "options", "num_timesteps"], 10**12, "schedule.options.num_timesteps must be an integer in 1..100000"),
    (["model", "options", "sample_shape"], [1, 100000, 100000], "model.options.sample_shape must be an integer"),
    (["model", "options", "base_channels"], 0, "base_channels must be an integer in 1..65536"),
    (["data"], 5, "data must be an object"),
    (["training"], 5, "training must be an object"),
    (["model"], None, "model is missing"),
]


@pytest.mark.parametrize("keys,value,message", CONFIG_EDITS, ids=[".".join(e[0]) for e in CONFIG_EDITS])
def test_an_edited_config_is_one_line_naming_the_field(trained, tmp_path, keys, value, message):
    ck = edited(trained, tmp_path, keys, value)
    r = run("compose", "--model", ck, "-n", 2, "--steps", 2, "--out", tmp_path / "x.npy")
    one_line_error(r, message)
    assert str(ck) in r.stderr
    assert not (tmp_path / "x.npy").exists()


RESUME_EDITS = [
    (["training", "step"], "abc", "training.step must be an integer ≥ 0, got 'abc'"),
    (["training", "step"], -5, "training.step must be an integer ≥ 0, got -5"),
    (["training", "elapsed_s"], "x", "training.elapsed_s must be a finite number ≥ 0"),
    (["training", "commands"], "x", "training.commands must be a list"),
]


@pytest.mark.parametrize("keys,value,message", RESUME_EDITS, ids=lambda v: str(v)[:20])
def test_an_edited_training_record_refuses_resume(trained, tmp_path, keys, value, message):
    ck = edited(trained, tmp_path, keys, value)
    before = (ck / "model.safetensors").read_bytes()
    one_line_error(run("train", *TINY, "--steps", 3, "--resume", "--out", ck), message)
    assert (ck / "model.safetensors").read_bytes() == before


STATE_EDITS = [
    (lambda s: s.pop("ema.n_averaged"), "ema.n_averaged is missing"),
    (lambda s: s.update({"ema.n_averaged": torch.tensor(1.5)}), "ema.n_averaged must be one integer"),
    (lambda s: s.update({"optim.0.exp_avg": torch.zeros(3)}), "optim.0.exp_avg must be a float tensor of shape"),
    (lambda s: s.update({"optim.9999.exp_avg": torch.zeros(3)}), "optim.9999.exp_avg: the model has"),
    (lambda s: s.update({"optim.0.foo": torch.zeros(3)}), "unexpected tensor 'optim.0.foo'"),
    (lambda s: s.update({"optim.0.step": torch.tensor(float("nan"))}), "optim.0.step holds non-finite"),
]


@pytest.mark.parametrize("mutate,message", STATE_EDITS, ids=[m for _, m in STATE_EDITS])
def test_an_edited_training_state_refuses_resume(trained, tmp_path, mutate, message):
    ck = tmp_path / "edited"
    shutil.copytree(trained, ck)
    state = load_file(str(ck / "training_state.safetensors"))
    mutate(state)
    save_file(state, str(ck / "training_state.safetensors"))
    one_line_error(run("train", *TINY, "--steps", 3, "--resume", "--out", ck), f"training_state.safetensors: {message}")


@pytest.mark.parametrize("args,message", [
    (["--model-option", "base_channels=0"], "model 'unet': base_channels must be an integer in 1..65536, got 0"),
    (["--model-option", "attention_heads=0"], "attention_heads must be an integer in 1..65536, got 0"),
    (["--dataset", "moons", "--model", "mlp", "--model-option", "hidden=-1"], "hidden must be an integer"),
    (["--model-option", "dropout=1.5"], "dropout must be a finite number in [0, 1)"),
    (["--model-option", "base_channels=60000"], "more than this machine's"),  # 50 TB of parameters
    (["--num-timesteps", 10**12], "num-timesteps must be an integer in 1..100000"),
    (["--batch-size", 10**11], "--batch-size 100000000000 needs"),
])
def test_numbers_are_bounded_before_allocating(tmp_path, args, message):
    one_line_error(run("train", *args, "--steps", 1, "--out", tmp_path / "m"), message)
    assert not (tmp_path / "m").exists()


def test_a_huge_label_in_an_array_dataset(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 2, 10**9]))
    one_line_error(run("train", "--dataset", tmp_path / "d.npz", "--model", "mlp", "--steps", 1,
                       "--out", tmp_path / "m"), "labels must lie in 0..99999, found 1000000000")


def test_compose_refuses_outputs_that_cannot_fit(tmp_path):
    """-n 10^11: 25.6 TB of .npy is refused against the free disk space; as a PNG, against the grid size."""
    one_line_error(run("compose", "-n", 10**11, "--out", tmp_path / "x.npy"), "on disk")
    one_line_error(run("compose", "-n", 10**11, "--out", tmp_path / "x.png"), "write them to a .npy file instead")
    one_line_error(run("compose", "-n", 20000, "--out", tmp_path / "x.png"), "9660×9592 PNG")
    assert list(tmp_path.iterdir()) == []


def test_the_shipped_checkpoints_pass_the_schema():
    from toolkit.checkpoint import read_config, resolve_checkpoint
    from toolkit.registry import available

    for name in available("pretrained"):
        schema.check_config(read_config(resolve_checkpoint(name)))


def test_limits_refuse_bools_floats_and_strings():
    for bad in (True, 2.0, "3", None):
        with pytest.raises(ToolkitError, match="x must be an integer"):
            limits.integer("x", bad)
    assert limits.integer("x", np.int64(3)) == 3
    with pytest.raises(ToolkitError, match="finite"):
        limits.number("y", float("nan"))


@pytest.mark.parametrize("edit,message", [
    ({"n": "abc"}, "n must be an integer"),
    ({"shards": [{"file": "../../etc/passwd", "start": 0, "stop": 4}]}, "must be a shard file name"),
    ({"shards": [{"file": "shard-00000-of-00001.npy", "start": 1, "stop": 4}]}, "expected to start at 0"),
    ({"n": 5}, "the shards cover 4 samples, n is 5"),
    ({"world_size": 2}, "shards lists 1 files for world_size 2"),
])
def test_a_malformed_shard_index(tmp_path, edit, message):
    index = {"n": 4, "seed": 0, "world_size": 1, "shape": [1, 8, 8],
             "shards": [{"file": "shard-00000-of-00001.npy", "start": 0, "stop": 4}], **edit}
    with pytest.raises(ToolkitError, match=message.replace("(", r"\(").replace(".", r"\.")):
        schema.check_shard_index(index)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "index.json").write_text(json.dumps(index))
    one_line_error(run("merge", tmp_path / "run", "--out", tmp_path / "all.npy"), message)


@pytest.mark.parametrize("args,message", [
    (["compose", "-n", 2, "--seed", -1, "--out", "x.npy"], "'--seed': -1 is not in the range"),
    (["compose", "-n", 2, "--seed", 10**23, "--out", "x.npy"], "is not in the range 0<=x<=9223372036854775807"),
    (["evaluate", "--metric", "fid", "-n", 10**12], "-n 1000000000000 samples of shape [1, 8, 8] needs"),
    (["evaluate", "--steps", 2], "Missing option '--metric'. Choose from: nll, ode-nll, fid, ode"),  # click's 4 lines, as one
    (["train", "--dataset", "moons", "--data-option", "n=100000000000", "--model", "mlp", "--out", "m"],
     "moons: n must be an integer in 2..10000000"),
    (["train", "--dataset", "moons", "--data-option", "n=0", "--model", "mlp", "--out", "m"], "moons: n must be"),
])
def test_every_command_bounds_its_numbers(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    one_line_error(run(*args), message)
    assert list(tmp_path.iterdir()) == []
