"""``mithril train --nprocs N [--shard-state]`` and ``torchrun -m mithril train``: the result
equals one process's, rank 0 alone writes, and the combinations that cannot work exit 2.

The multi-process runs are subprocesses in their own session, killed as a group if they
outlive their deadline (each collective also has a timeout of its own). The default suite
runs one of them (torch, float64); the other two-process runs are marked ``slow``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main
from mithril.cli import parallel as parallel_mod

#: 1 epoch of 23 steps (1437 training digits, batches of 64; the last has 29 rows)
TINY = ["--epochs", "1", "--hidden", "16", "--lr", "1e-2", "--no-plot", "--no-progress"]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_procs(argv: list[str], deadline: float = 150) -> subprocess.CompletedProcess:
    """``python -m mithril argv`` in a session of its own (the group is killed on timeout)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    p = subprocess.Popen([sys.executable, "-m", "mithril", *argv], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"mithril {' '.join(argv)} did not stop within {deadline} s")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def same_metrics(a: Path, b: Path, tol: float) -> None:
    ra, rb = rows(a / "metrics.csv"), rows(b / "metrics.csv")
    assert len(ra) == len(rb) == 23
    for key in ("loss", "acc", "grad_norm", "lr"):
        x = np.array([float(r[key]) for r in ra])
        y = np.array([float(r[key]) for r in rb])
        np.testing.assert_allclose(y, x, rtol=tol, atol=tol, err_msg=key)
    fa = json.loads((a / "summary.json").read_text())["final"]
    fb = json.loads((b / "summary.json").read_text())["final"]
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fb[k] == pytest.approx(fa[k], rel=tol, abs=tol), k


def test_two_processes_equal_one(tmp_path, capsys):
    """float64, replicated state: every per-step loss, accuracy and gradient norm and the
    final metrics equal the one-process run's to rounding (the uneven last batch too)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *TINY, "--dtype", "float64", "--out", str(one)]) == 0
    res = run_procs(["train", *TINY, "--dtype", "float64", "--nprocs", "2", "--out", str(two)])
    assert res.returncode == 0, res.stderr[-3000:]
    same_metrics(one, two, 1e-12)
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["nprocs"], summary["shard_state"], summary["launcher"]) == (2, False,
                                                                                "mithril")
    assert json.loads((one / "summary.json").read_text())["nprocs"] == 1
    # rank 0 alone prints and writes
    assert res.stdout.count("wrote ") == 1 and res.stdout.count("epoch 1/1") == 1
    assert "2 processes (gloo on loopback)" in res.stdout
    assert sorted(f.name for f in two.iterdir()) == ["epochs.csv", "metrics.csv",
                                                     "summary.json"]
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]


@pytest.mark.slow  # two processes (the library's own runs: test_distributed.py)
def test_sharded_state_float32_uneven_batches(tmp_path):
    """--shard-state, float32, batches of 50 (the last has 37 rows: 18 and 19 per rank)."""
    flags = [*TINY, "--batch-size", "50", "--optimizer", "sgd", "--momentum", "0.9",
             "--clip-norm", "1.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *flags, "--out", str(one)]) == 0
    res = run_procs(["train", *flags, "--nprocs", "2", "--shard-state", "--out", str(two)])
    assert res.returncode == 0, res.stderr[-3000:]
    ra, rb = rows(one / "metrics.csv"), rows(two / "metrics.csv")
    assert len(ra) == len(rb) == 29
    for key in ("loss", "acc", "grad_norm"):
        np.testing.assert_allclose([float(r[key]) for r in rb], [float(r[key]) for r in ra],
                                   rtol=2e-5, atol=2e-6, err_msg=key)
    assert json.loads((two / "summary.json").read_text())["shard_state"] is True


@pytest.mark.slow  # two processes (the library's own runs: test_distributed.py)
def test_mixed_precision_two_processes(tmp_path):
    """--mixed-precision fp16 on 2 processes: the overflow (the first step, at the initial
    scale) is agreed on, so the loss scale and the skipped steps equal one process's; the
    losses equal to half precision's rounding (two half-batches against the whole)."""
    flags = [*TINY, "--mixed-precision", "fp16"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *flags, "--out", str(one)]) == 0
    res = run_procs(["train", *flags, "--nprocs", "2", "--out", str(two)])
    assert res.returncode == 0, res.stderr[-3000:]
    ra, rb = rows(one / "metrics.csv"), rows(two / "metrics.csv")
    assert [r["loss_scale"] for r in ra] == [r["loss_scale"] for r in rb]
    assert [r["skipped"] for r in ra] == [r["skipped"] for r in rb]
    assert ra[0]["skipped"] == "1"
    for key in ("loss", "acc"):
        np.testing.assert_allclose([float(r[key]) for r in rb], [float(r[key]) for r in ra],
                                   rtol=3e-3, atol=3e-3, err_msg=key)


def test_one_process_data_parallel_is_the_plain_run(tmp_path, capsys):
    """--nprocs 1 (and with --shard-state) trains in this process through DataParallel."""
    plain, dp, sharded = tmp_path / "plain", tmp_path / "dp", tmp_path / "sharded"
    assert main(["train", *TINY, "--out", str(plain)]) == 0
    assert main(["train", *TINY, "--nprocs", "1", "--out", str(dp)]) == 0
    assert main(["train", *TINY, "--nprocs", "1", "--shard-state", "--out", str(sharded)]) == 0
    same_metrics(plain, dp, 0)
    same_metrics(plain, sharded, 1e-6)
    assert "data parallel: 1 process" in capsys.readouterr().out


def test_dry_run_starts_no_process(tmp_path, capsys, monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a dry run started processes")

    monkeypatch.setattr("mithril.cli.train.launch", no_launch)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--nprocs", "2", "--shard-state", "--dry-run",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 processes" in text and "sharded" in text and "dry run" in text
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--nprocs", "0"], "--nprocs"),
    (["--nprocs", "x"], "--nprocs"),
    (["--shard-state"], "--shard-state needs --nprocs"),
    (["--devices", "2"], "--backend jax"),
    (["--nprocs", "2", "--backend", "jax", "--ema", "0.9"], "--ema"),
    (["--devices", "2", "--backend", "jax", "--mixed-precision", "bf16"], "--mixed-precision"),
    (["--devices", "2", "--backend", "jax", "--momentum-cycle", "--optimizer", "sgd",
      "--momentum", "0.9"], "--momentum-cycle"),
    (["--nprocs", "2", "--mixed-precision", "fp16", "--batch-size", "1"], "at least 2 rows"),
    (["--nprocs", "2", "--task", "digits-cnn", "--channels", "4"], "BatchNorm"),
    (["--nprocs", "2", "--shard-state", "--ema", "0.9"], "--ema"),
])
def test_bad_combinations_exit_2_before_starting_anything(tmp_path, capsys, monkeypatch,
                                                          argv, words):
    monkeypatch.setattr("mithril.cli.train.launch", lambda *a: pytest.fail("launched"))
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "1", "--no-progress", *argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and words in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_nprocs_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(parallel_mod.CHILD_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["train", *TINY, "--nprocs", "2", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "under torchrun" in capsys.readouterr().err


def test_a_failing_rank_stops_the_launch(tmp_path, capsys, monkeypatch):
    """The parent returns the failing rank's status and stops the others."""
    calls = []

    class Proc:
        def __init__(self, cmd, env):
            self.rank = int(env["RANK"])
            self.returncode = None
            calls.append(env)

        def poll(self):
            if self.rank == 1:
                self.returncode = 3
            return self.returncode

        def kill(self):
            self.returncode = -9

    monkeypatch.setattr(parallel_mod.subprocess, "Popen", Proc)
    monkeypatch.setattr(parallel_mod.time, "monotonic", iter(range(0, 10**6, 20)).__next__)
    world = parallel_mod.World(2, 0, False, "mithril", False)
    assert parallel_mod.launch(world, ["train"]) == 3
    assert [c["RANK"] for c in calls] == ["0", "1"]
    assert {c["WORLD_SIZE"] for c in calls} == {"2"}
    assert calls[0][parallel_mod.CHILD_ENV] == "1"


@pytest.mark.slow
def test_torch_backend_sharded(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *TINY, "--backend", "torch", "--out", str(one)]) == 0
    res = run_procs(["train", *TINY, "--backend", "torch", "--nprocs", "2", "--shard-state",
                     "--out", str(two)])
    assert res.returncode == 0, res.stderr[-3000:]
    same_metrics(one, two, 2e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_launch(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *TINY, "--dtype", "float64", "--out", str(one)]) == 0
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    res = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port",
                          str(parallel_mod.free_port()), "-m", "mithril", "train", *TINY,
                          "--dtype", "float64", "--out", str(two)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    same_metrics(one, two, 1e-12)
    assert json.loads((two / "summary.json").read_text())["launcher"] == "torchrun"


# -- JAX: --devices (jax.sharding) and --nprocs (jax.distributed) ---------------------------

JAX64 = [*TINY, "--backend", "jax", "--dtype", "float64", "--optimizer", "sgd", "--momentum",
         "0.9", "--clip-norm", "1.0"]


@pytest.fixture(scope="module")
def jax_one(tmp_path_factory) -> Path:
    """The one-device JAX run (a subprocess: float64 JAX is process-global)."""
    one = tmp_path_factory.mktemp("jax") / "one"
    res = run_procs(["train", *JAX64, "--out", str(one)])
    assert res.returncode == 0, res.stderr[-3000:]
    return one


# by default the sharded state (the mesh's batch split, plus each device's share of the
# slots); the replicated state (the split alone) under -m slow: one CLI process each
@pytest.mark.parametrize("shard", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["replicated", "sharded"])
def test_jax_two_devices_equal_one(tmp_path, jax_one, shard):
    """--devices 2 (the last batch of 29 rows runs replicated): every step's loss, accuracy
    and gradient norm equal one device's to float64 rounding."""
    two = tmp_path / "two"
    res = run_procs(["train", *JAX64, "--devices", "2", *(["--shard-state"] if shard else []),
                     "--out", str(two)])
    assert res.returncode == 0, res.stderr[-3000:]
    same_metrics(jax_one, two, 1e-12)
    assert "2 device(s) (jax.sharding)" in res.stdout
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["devices"], summary["shard_state"]) == (2, shard)


@pytest.mark.slow  # two jax.distributed processes, ~35 s
def test_jax_two_processes_equal_one(tmp_path, jax_one):
    """--nprocs 2 --shard-state on JAX: jax.distributed with gloo CPU collectives."""
    two = tmp_path / "two"
    res = run_procs(["train", *JAX64, "--nprocs", "2", "--shard-state", "--out", str(two)])
    assert res.returncode == 0, res.stderr[-3000:]
    same_metrics(jax_one, two, 1e-12)
    assert res.stdout.count("wrote ") == 1
    assert "2 processes x 1 device(s) (jax.distributed, gloo)" in res.stdout
    assert json.loads((two / "summary.json").read_text())["nprocs"] == 2


def test_jax_more_devices_than_there_are(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    res = subprocess.run([sys.executable, "-m", "mithril", "train", *TINY, "--backend", "jax",
                          "--devices", "3", "--out", str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--devices 3" in res.stderr and "2 cpu device(s)" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_jax_devices_dry_run_checks_like_the_run(tmp_path):
    """--dry-run with --devices 2 gives JAX its 2 CPU devices before the run's backend starts
    JAX (it was refused: 'JAX sees 1 cpu device(s)', though the run itself trains)."""
    res = run_procs(["train", *TINY, "--backend", "jax", "--devices", "2", "--dry-run",
                     "--out", str(tmp_path / "run")])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 device(s) (jax.sharding)" in res.stdout and "dry run: would train" in res.stdout
    assert not (tmp_path / "run").exists()
