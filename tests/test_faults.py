"""Nothing lost: checkpoint writes are atomic swaps, a write killed between its renames is recovered,
temporary folders of dead writers are cleaned (issue 14)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import toolkit
from helpers import run
from toolkit import checkpoint

TINY = ["--model-option", "base_channels=8", "--model-option", "attention_heads=2", "--batch-size", 8]


def dead_pid() -> int:
    """The PID of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_rewriting_a_checkpoint_leaves_only_the_new_one(tmp_path):
    out = tmp_path / "ck"
    checkpoint.write_checkpoint(out, {"kind": "noise_predictor", "n": 1}, {"w": torch.zeros(2)})
    checkpoint.write_checkpoint(out, {"kind": "noise_predictor", "n": 2}, {"w": torch.ones(2)})
    assert json.loads((out / "config.json").read_text())["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_write_killed_between_its_renames_is_recovered(tmp_path):
    """The old checkpoint renamed away, the new one never renamed in (a kill at that instant): the next
    read, resume or compose puts the old one back instead of reporting that nothing exists."""
    out = tmp_path / "ck"
    assert run("train", *TINY, "--steps", 2, "--out", out).exit_code == 0
    pid = dead_pid()
    os.rename(out, tmp_path / f".ck.old-{pid}")
    (tmp_path / f".ck.tmp-{pid}-abcd").mkdir()  # the dead writer's half-written new version
    r = run("train", *TINY, "--steps", 3, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["training"]["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_compose_recovers_a_stranded_checkpoint(tmp_path):
    out = tmp_path / "ck"
    assert run("train", *TINY, "--steps", 2, "--out", out).exit_code == 0
    os.rename(out, tmp_path / f".ck.old-{dead_pid()}")
    r = run("compose", "--model", out, "--steps", 2, "-n", 2, "--out", tmp_path / "x.npy")
    assert r.exit_code == 0, r.output
    assert toolkit.load_checkpoint(out).config["training"]["step"] == 2


def test_a_live_writers_folders_are_left_alone(tmp_path):
    out = tmp_path / "ck"
    checkpoint.write_checkpoint(out, {"kind": "noise_predictor"}, {"w": torch.zeros(2)})
    mine = tmp_path / f".ck.tmp-{os.getpid()}-x"
    mine.mkdir()
    checkpoint.recover(out)
    assert mine.is_dir()


def test_two_writers_of_one_checkpoint(tmp_path):
    """A second training run into an --out that another process is writing fails at once, naming it."""
    from helpers import one_line_error
    from toolkit.locks import output_lock

    out = tmp_path / "ck"
    with output_lock(out):
        one_line_error(run("train", *TINY, "--steps", 2, "--out", out), "being written by another toolkit process")
    assert not out.exists()
    assert run("train", *TINY, "--steps", 2, "--out", out).exit_code == 0  # released: the next run goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_concurrent_process_is_refused(tmp_path):
    """Two real processes: the second finds the first's lock (flock is per open file, not per process tree)."""
    out = tmp_path / "ck"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from toolkit.locks import output_lock\n"
        f"with output_lock({str(out)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, "-m", "toolkit", "train", *map(str, TINY), "--steps", "1", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_compose_and_export_take_the_lock_of_their_output(tmp_path):
    from helpers import one_line_error
    from toolkit.locks import output_lock

    for args, out in ((["compose", "-n", 2, "--steps", 2], tmp_path / "x.npy"),
                      (["export", "onnx", "--steps", 2], tmp_path / "g.onnx")):
        with output_lock(out):
            one_line_error(run(*args, "--out", out), "being written by another toolkit process")
        assert not out.exists()
    assert run("compose", "-n", 2, "--steps", 2, "--out", tmp_path / "x.npy").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_resume_is_exact_with_dropout(tmp_path):
    """4 steps in one run equal 2 + 2 with a resume, dropout included (its RNG is per step, not carried)."""
    from safetensors.torch import load_file

    opts = [*TINY, "--model-option", "dropout=0.3", "--checkpoint-every", 2]
    assert run("train", *opts, "--steps", 4, "--out", tmp_path / "one").exit_code == 0
    assert run("train", *opts, "--steps", 2, "--out", tmp_path / "two").exit_code == 0
    assert run("train", *opts, "--steps", 4, "--out", tmp_path / "two", "--resume").exit_code == 0
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- fault injection: a SIGKILL at every point of a write (toolkit.files.fault_point), then the next command ---

def toolkit_cli(*args, fault=None, extra_env=None, timeout=300):
    """`python -m toolkit ARGS` in a child process, killed at write point ``fault`` when given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("TOOLKIT_FAULT", None)
    if fault:
        env["TOOLKIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


CHECKPOINT_POINTS = [  # (point, the write path that reaches it)
    ("checkpoint:written", {}), ("checkpoint:synced", {}), ("checkpoint:swapped", {}),
    ("checkpoint:old-moved", {"TOOLKIT_NO_EXCHANGE": "1"}), ("checkpoint:new-moved", {"TOOLKIT_NO_EXCHANGE": "1"}),
]


@pytest.mark.parametrize("point,env", CHECKPOINT_POINTS, ids=[p for p, _ in CHECKPOINT_POINTS])
def test_a_kill_at_any_point_of_a_checkpoint_write_loses_nothing(tmp_path, point, env):
    """Resume from step 2 to 4 killed at ``point`` of its save: --out then holds step 2 or step 4 (never nothing,
    never a mix), the next resume finishes, and no temporary folder is left."""
    from toolkit.files import FAULT_POINTS

    assert point in FAULT_POINTS
    out = tmp_path / "ck"
    assert toolkit_cli("train", *TINY, "--steps", 2, "--out", out).returncode == 0
    killed = toolkit_cli("train", *TINY, "--steps", 4, "--resume", "--out", out, fault=point, extra_env=env)
    assert killed.returncode == -9, killed.stderr  # the fault point was reached
    step = toolkit.load_checkpoint(out).config["training"]["step"]  # loads: config and weights of one version
    assert step in (2, 4)
    state = checkpoint.read_tensors(out, checkpoint.TRAINING_STATE)
    assert int(state["optim.0.step"]) == step  # the training state is of the same version
    done = toolkit_cli("train", *TINY, "--steps", 6, "--resume", "--out", out, extra_env=env)
    assert done.returncode == 0, done.stderr
    assert toolkit.load_checkpoint(out).config["training"]["step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_kill_before_a_file_is_renamed_in(tmp_path):
    """compose killed with its .npy complete but not yet renamed: the old file is untouched; the next write of
    that name removes the dead writer's temporary file."""
    out = tmp_path / "x.npy"
    np.save(out, np.zeros(3, np.float32))
    killed = toolkit_cli("compose", "-n", 2, "--steps", 2, "--out", out, fault="file:written")
    assert killed.returncode == -9
    assert np.load(out).tolist() == [0, 0, 0]
    assert len(list(tmp_path.glob(".x.npy.tmp-*"))) == 1  # the dead writer's complete temporary file
    assert toolkit_cli("compose", "-n", 2, "--steps", 2, "--out", out).returncode == 0
    assert np.load(out).shape == (2, 1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_a_shard_killed_before_its_sidecar_is_refused_by_merge(tmp_path):
    """A rank killed between its .npy and its sidecar leaves a shard merge cannot vouch for; rerunning the rank
    completes the run."""
    from helpers import one_line_error

    run_dir = tmp_path / "run"
    assert toolkit_cli("compose", "-n", 4, "--steps", 2, "--out", f"{run_dir}/").returncode == 0
    (run_dir / "shard-00000-of-00001.json").unlink()
    (run_dir / "shard-00000-of-00001.npy").unlink()
    killed = toolkit_cli("compose", "-n", 4, "--seed", 1, "--steps", 2, "--out", f"{run_dir}/",
                         fault="file:written#2")  # the .npy is in place, its sidecar not yet
    assert killed.returncode == -9
    assert (run_dir / "shard-00000-of-00001.npy").is_file()
    one_line_error(run("merge", run_dir, "--out", tmp_path / "all.npy"), "has no readable shard-00000-of-00001.json")
    assert not (tmp_path / "all.npy").exists()
    assert toolkit_cli("compose", "-n", 4, "--steps", 2, "--out", f"{run_dir}/").returncode == 0
    assert run("merge", run_dir, "--out", tmp_path / "all.npy").exit_code == 0
    assert np.load(tmp_path / "all.npy").shape == (4, 1, 8, 8)


def test_a_full_disk_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while the new version is written: one line naming --out, exit 2, the old checkpoint as it was."""
    import errno

    from helpers import one_line_error

    out = tmp_path / "ck"
    assert run("train", *TINY, "--steps", 2, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    one_line_error(run("train", *TINY, "--steps", 4, "--resume", "--out", out), "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_leftover_of_pid_1_does_not_block_pid_1(tmp_path, monkeypatch):
    """In a container every run is PID 1: folders an earlier PID 1 left must not make later writes fail."""
    out = tmp_path / "ck"
    checkpoint.write_checkpoint(out, {"kind": "noise_predictor", "n": 1}, {"w": torch.zeros(2)})
    (tmp_path / ".ck.old-1-deadbeef").mkdir()
    (tmp_path / ".ck.tmp-1-abcdefgh").mkdir()
    monkeypatch.setattr(os, "getpid", lambda: 1)
    checkpoint.write_checkpoint(out, {"kind": "noise_predictor", "n": 2}, {"w": torch.ones(2)})
    assert json.loads((out / "config.json").read_text())["n"] == 2


# --- item 14: bad files in, item 15: paths, item 16: streaming ---

def huge_png(path, width=20000, height=20000):
    """A valid PNG header claiming width×height pixels (a few hundred bytes: nothing is ever decoded)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 9000])  # PIL's own bomb limit, and ours below it
def test_a_decompression_bomb_in_a_folder_dataset(tmp_path, side):
    from helpers import one_line_error

    (tmp_path / "imgs").mkdir()
    huge_png(tmp_path / "imgs" / "big.png", side, side)
    r = run("train", "--dataset", tmp_path / "imgs", "--steps", 1, "--out", tmp_path / "m")
    one_line_error(r, "big.png")
    assert not (tmp_path / "m").exists()


def test_a_truncated_shard_is_refused(tmp_path):
    from helpers import one_line_error

    assert run("compose", "-n", 4, "--steps", 2, "--out", f"{tmp_path / 'run'}/").exit_code == 0
    shard = tmp_path / "run" / "shard-00000-of-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    one_line_error(run("merge", tmp_path / "run", "--out", tmp_path / "all.npy"), "shard-00000-of-00001.npy")
    assert not (tmp_path / "all.npy").exists()


def test_a_symlinked_out_is_written_through(tmp_path):
    """--out a symlink to a checkpoint (or a file): the target is replaced, the link stays a link."""
    real = tmp_path / "real"
    assert run("train", *TINY, "--steps", 2, "--out", real).exit_code == 0
    (tmp_path / "link").symlink_to(real)
    assert run("train", *TINY, "--steps", 3, "--resume", "--out", tmp_path / "link").exit_code == 0
    assert (tmp_path / "link").is_symlink()
    assert toolkit.load_checkpoint(real).config["training"]["step"] == 3
    np.save(tmp_path / "x.npy", np.zeros(1, np.float32))
    (tmp_path / "samples.npy").symlink_to(tmp_path / "x.npy")
    assert run("compose", "-n", 2, "--steps", 2, "--out", tmp_path / "samples.npy").exit_code == 0
    assert (tmp_path / "samples.npy").is_symlink() and np.load(tmp_path / "x.npy").shape == (2, 1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "samples.npy", "x.npy"]


def test_a_dataset_path_with_a_colon(tmp_path):
    """A folder or array file whose name has ':' is that path, not `dist:name`."""
    data = tmp_path / "set:v2.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (16, 2)).astype(np.float32))
    r = run("train", "--dataset", data, "--model", "mlp", "--steps", 1, "--batch-size", 8, "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert toolkit.load_checkpoint(tmp_path / "m").config["data"]["name"] == "array:set:v2"


def test_a_recorded_schedule_survives_a_second_plugin_of_that_name(tmp_path, fresh_registry):
    """The checkpoint records dist:name, so installing another 'cosine' later does not make it ambiguous."""
    import types

    from toolkit import hookimpl

    out = tmp_path / "ck"
    assert run("train", *TINY, "--steps", 2, "--out", out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["schedule"]["dist"] == "diffusion-toolkit"
    mod = types.ModuleType("other_cosine")

    @hookimpl
    def register_schedules(register):
        register("cosine", lambda num_timesteps=1000: toolkit.create("schedule", "diffusion-toolkit:linear",
                                                                     num_timesteps=num_timesteps))
    mod.register_schedules = register_schedules
    fresh_registry.register_plugin(mod, "other", dist="other-dist")
    with pytest.raises(toolkit.PluginError, match="choose one"):
        toolkit.create("schedule", "cosine")
    assert toolkit.load_checkpoint(out).schedule.name == "cosine"
    r = run("compose", "--model", out, "-n", 2, "--steps", 2, "--out", tmp_path / "x.npy")
    assert r.exit_code == 0, r.output


STREAM = """
import resource, sys, torch, numpy as np
import toolkit

class Zero(torch.nn.Module):
    prediction, learned_variance, num_classes, sample_shape = "epsilon", False, None, (3, 32, 32)
    def forward(self, x, t, y=None):
        return torch.zeros_like(x)

n = int(sys.argv[2])
pipe = toolkit.compose(schedule="linear", sampler="ddim", model=Zero(), steps=1, batch_size=1000)
pipe.save(sys.argv[1], n, seed=0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_compose_streams_a_large_npy_in_bounded_memory(tmp_path):
    """n = 100 000 samples of 3×32×32 are 1.2 GB of float32: written batch by batch, the process's peak memory
    stays far below that: the ceiling is a third of it (whole in memory, as before, it grew by 2.9 GB)."""
    n = 100_000
    base = subprocess.run([sys.executable, "-c", STREAM, str(tmp_path / "small.npy"), "1000"], capture_output=True,
                          text=True, timeout=600)
    assert base.returncode == 0, base.stderr
    big = subprocess.run([sys.executable, "-c", STREAM, str(tmp_path / "big.npy"), str(n)], capture_output=True,
                         text=True, timeout=600)
    assert big.returncode == 0, big.stderr
    arr = np.load(tmp_path / "big.npy", mmap_mode="r")
    assert arr.shape == (n, 3, 32, 32) and arr.dtype == np.float32
    grew = int(big.stdout.split()[-1]) - int(base.stdout.split()[-1])
    assert grew < 400e6, f"peak memory grew by {grew / 1e6:.0f} MB for {arr.nbytes / 1e9:.1f} GB of samples"
    small = np.load(tmp_path / "small.npy")
    assert np.array_equal(arr[:1000], small)  # streamed or not, sample i is the same
