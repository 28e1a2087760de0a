"""torchrun with two CPU processes (gloo): the same weights as one process, resume after a kill (with another
world size), sharded sampling equal to one process, a failing rank named."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

TINY = ["--model-option", "base_channels=8", "--model-option", "attention_heads=2", "-q"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOOLKIT_DIST_TIMEOUT": "60"}


def torchrun(*args, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "toolkit", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, **kw)


def single(*args):
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)


def _pids_with(text):
    """Processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if text.encode() in fh.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def max_diff(a, b, name):
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].is_floating_point())


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    common = ["train", *TINY, "--steps", 6, "--batch-size", 16, "--checkpoint-every", 3]
    r = torchrun(*common, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert single(*common, "--out", tmp_path / "one").returncode == 0
    assert max_diff(tmp_path / "one", tmp_path / "two", "training_state.safetensors") < 1e-5
    assert max_diff(tmp_path / "one", tmp_path / "two", "model.safetensors") < 1e-5
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2 and cfg["training"]["step"] == 6


def test_killed_run_resumes_with_another_world_size(tmp_path):
    """Kill a 2-process run after its first checkpoint, finish it with 1 process: one uninterrupted run's weights."""
    out = tmp_path / "killed"
    common = ["train", *TINY, "--steps", 120, "--batch-size", 16, "--checkpoint-every", 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "toolkit",
           *map(str, common), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads((out / "config.json").read_text())["training"]["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 2:  # kill every process of the run (torchrun starts its workers in their own sessions)
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in _pids_with(str(out)):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while _pids_with(str(out)) and time.time() < deadline:
        time.sleep(0.05)
    assert not _pids_with(str(out))
    step = json.loads((out / "config.json").read_text())["training"]["step"]
    if step >= 120:
        pytest.skip("the run finished before it could be killed")
    r = single(*common, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert single(*common, "--out", tmp_path / "straight").returncode == 0
    assert max_diff(out, tmp_path / "straight", "model.safetensors") < 1e-5
    assert max_diff(out, tmp_path / "straight", "training_state.safetensors") < 1e-4  # Adam moments: float drift
    assert json.loads((out / "config.json").read_text())["training"]["world_size"] == 1


def test_sharded_sampling_equals_one_process(tmp_path):
    r = torchrun("compose", "-n", 7, "--steps", 8, "--class", "1,5", "--seed", 4, "--out", f"{tmp_path / 'shards'}/",
                 "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 4), (4, 7)]
    assert single("merge", tmp_path / "shards", "--out", tmp_path / "merged.npy").returncode == 0
    assert single("compose", "-n", 7, "--steps", 8, "--class", "1,5", "--seed", 4, "--out",
                  tmp_path / "one.npy", "-q").returncode == 0
    assert np.abs(np.load(tmp_path / "merged.npy") - np.load(tmp_path / "one.npy")).max() < 1e-5


def test_failing_ranks_exit_non_zero_and_are_named(tmp_path):
    r = torchrun("train", *TINY, "--steps", 2, "--batch-size", 15, "--out", tmp_path / "bad")
    assert r.returncode != 0
    assert "rank 0: error: --batch-size 15 (the global batch) must divide evenly over 2 processes" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_merge_reports_a_missing_shard(tmp_path):
    folder = tmp_path / "s"
    r = single("compose", "-n", 3, "--steps", 2, "--out", f"{folder}/", "-q")
    assert r.returncode == 0, r.stderr
    (folder / "shard-00000-of-00001.npy").unlink()
    r = single("merge", folder, "--out", tmp_path / "m.npy")
    assert r.returncode == 2 and "shard shard-00000-of-00001.npy is missing" in r.stderr
    assert not (tmp_path / "m.npy").exists()


def test_precision_options(tmp_path):
    r = single("train", *TINY, "--steps", 2, "--batch-size", 8, "--precision", "bf16", "--out", tmp_path / "bf16")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["training"]["precision"] == "bf16"
    r = single("train", *TINY, "--steps", 2, "--precision", "fp16", "--out", tmp_path / "fp16")
    assert r.returncode == 2 and "--precision fp16 needs --device cuda" in r.stderr


def test_a_killed_rank_stops_the_whole_run(tmp_path):
    """Rank 1 dies mid-run: torchrun stops rank 0 too (no hang) and exits non-zero, naming the failed rank."""
    out = tmp_path / "crash"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "toolkit",
           "train", *TINY, "--steps", 100000, "--batch-size", 16, "--checkpoint-every", 2, "--out", str(out)]
    proc = subprocess.Popen([str(c) for c in cmd], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        victims = [pid for pid in _pids_with(str(out)) if b"\x00RANK=1\x00" in _environ(pid)]
        assert victims, "rank 1 not found"
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "rank: 1" in stderr or "rank 1" in stderr, stderr[-2000:]
    time.sleep(1)
    assert not _pids_with(str(out))  # rank 0 did not hang on the lost peer


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return b"\x00" + fh.read()
    except OSError:
        return b""


def _rank(rank: int, world: int, *args):
    env = {**ENV, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_merge_refuses_shards_of_two_runs(tmp_path):
    """Ranks started with different seeds write shards of two runs: merge refuses them (it joined them before);
    a shard replaced after the run is refused too; the shards of one run still merge."""
    mixed, good = f"{tmp_path / 'mixed'}/", f"{tmp_path / 'good'}/"
    for rank in (0, 1):
        assert _rank(rank, 2, "compose", "-n", 6, "--steps", 3, "--seed", rank, "--out", mixed, "-q").returncode == 0
        assert _rank(rank, 2, "compose", "-n", 6, "--steps", 3, "--seed", 0, "--out", good, "-q").returncode == 0
    r = single("merge", mixed, "--out", tmp_path / "m.npy")
    assert r.returncode == 2 and "belongs to another run" in r.stderr, r.stderr
    assert single("merge", good, "--out", tmp_path / "g.npy").returncode == 0
    assert np.load(tmp_path / "g.npy").shape == (6, 1, 8, 8)
    shard = tmp_path / "good" / "shard-00001-of-00002.npy"
    np.save(shard, np.zeros_like(np.load(shard)))
    r = single("merge", good, "--out", tmp_path / "g2.npy")
    assert r.returncode == 2 and "changed or replaced" in r.stderr, r.stderr
    assert not (tmp_path / "m.npy").exists() and not (tmp_path / "g2.npy").exists()


def test_ranks_started_with_different_options_refuse(tmp_path):
    """Two ranks of one run launched by hand with different --seed: each stops with one line naming the
    difference (they used to train apart and exit 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "toolkit", "train", *map(str, TINY), "--steps", "2", "--batch-size", "8",
               "--seed", str(rank), "--out", str(tmp_path / "run")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=240) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 2, err[-2000:]
        assert f"rank {rank}: error: rank 1 runs with seed=1 but rank 0 with seed=0" in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_dead_peer_is_one_line_on_the_survivor(tmp_path):
    """Two ranks started by hand (no torchrun to stop the survivor): rank 1 is killed mid-run, rank 0's failed
    collective is one line saying so, not a gloo traceback or an 'internal error'."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "toolkit", "train", *map(str, TINY), "--steps", "100000", "--batch-size", "8",
               "--checkpoint-every", "2", "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        procs[1].kill()
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    lines = err.strip().splitlines()
    assert procs[0].returncode == 1 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("rank 0: error: another rank of this run stopped"), lines[0]
    assert toolkit_step(out) >= 2  # the last checkpoint is intact


def toolkit_step(out):
    return json.loads((out / "config.json").read_text())["training"]["step"]
