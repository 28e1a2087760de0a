"""Nothing lost: checkpoint writes are atomic swaps, a write killed between its renames is recovered,
temporary folders of dead writers are cleaned (issue 14)."""

import json
import os
import subprocess
import sys

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
