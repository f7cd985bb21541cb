"""Data-parallel ``mithril train`` on a preemptible machine: a SIGTERM to the ``--nprocs``
launcher, to the whole process group or to one rank stops every rank after the same step
(one all-reduce of the ranks' stop votes), rank 0 saves the checkpoint, the resume command is
printed and the status is 143; ``--checkpoint-every N`` saves every N steps; the resumed run
is the uninterrupted data-parallel run bit for bit (parameters, Adam's moments, metrics.csv).

The agreement and the launcher are unit-tested with fakes; one real two-process SIGTERM run
is in the default suite, the other ways the signal arrives and JAX's ``--devices`` under
``-m slow``."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main
from mithril.cli import parallel as parallel_mod
from mithril.cli.runtime import Aborted, HeldInterrupt
from mithril.cli.stop_agreement import StepAgreement, agree_stop, decision, vote
from mithril.cli.training import Run
from mithril.utils.checkpoint import load_checkpoint

pytest.importorskip("sklearn")

#: 180 steps per epoch (1437 digits, batches of 8): long enough for a signal to land mid-run
FLAGS = ["--epochs", "1", "--hidden", "16", "--batch-size", "8", "--lr", "1e-2", "--dtype",
         "float64", "--no-plot", "--no-progress"]
SIGTERM, SIGINT = int(signal.SIGTERM), int(signal.SIGINT)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    """The parameters and the optimizer's slots and counts of two run folders, bit for bit."""
    ca, cb = (load_checkpoint(d / "checkpoint.safetensors") for d in (a, b))
    assert ca["extra"]["steps"] == cb["extra"]["steps"]
    assert ca["params"].keys() == cb["params"].keys()
    for k in ca["params"]:
        np.testing.assert_array_equal(cb["params"][k], ca["params"][k], err_msg=k)
    sa, sb = ca["optimizer_state_dict"], cb["optimizer_state_dict"]
    assert sa["step"] == sb["step"] and set(sa["slots"]) == set(sb["slots"]) == {"m", "v"}
    for slot in sa["slots"]:
        for k in sa["slots"][slot]:
            np.testing.assert_array_equal(sb["slots"][slot][k], sa["slots"][slot][k])
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()


# -- the agreement --------------------------------------------------------------------------------
def _ranks_agree(signums: list[int | None]) -> list[int | None]:
    """Each simulated rank's agree_stop, the all-reduce summing every rank's vote."""
    total = sum(vote(s) for s in signums)

    def all_reduce(v: np.ndarray) -> None:
        v[:] = total

    return [agree_stop(s, all_reduce) for s in signums]


@pytest.mark.parametrize("signums, agreed", [
    ([None, None, None], None),
    ([None, SIGTERM, None], SIGTERM),  # one rank signalled: every rank stops
    ([SIGINT, None], SIGINT),
    ([SIGINT, SIGTERM], SIGTERM),  # different signals: one status for all (preemption's)
    ([SIGTERM, SIGTERM], SIGTERM),
])
def test_every_rank_gets_the_same_decision(signums, agreed) -> None:
    assert _ranks_agree(signums) == [agreed] * len(signums)


def test_a_vote_is_one_count_per_held_signal() -> None:
    np.testing.assert_array_equal(vote(None), [0.0, 0.0])
    np.testing.assert_array_equal(vote(SIGINT) + vote(SIGTERM) * 2, [1.0, 2.0])
    assert decision(np.array([3.0, 0.0])) == SIGINT
    with pytest.raises(ValueError, match="one of SIGINT, SIGTERM, got signal 10"):
        vote(10)


def _peer_signalled(signum: int | None):
    """An ``agree`` for a rank whose one peer got ``signum`` (at every settle)."""
    def all_reduce(v: np.ndarray) -> None:
        v += vote(signum)

    return lambda mine: agree_stop(mine, all_reduce)


def test_a_rank_stops_on_its_peers_signal_and_takes_its_own_copy_as_the_same() -> None:
    """Rank 1 got nothing: the settle after the step stops it with the peer's SIGTERM; the
    group's copy of the signal arriving after that is the same request (no abort), one
    outside the repeat window aborts."""
    held = HeldInterrupt(agree=_peer_signalled(SIGTERM), repeat_s=60.0)
    with held:
        assert not held.requested
        assert held.settle() is True and held.stop
        assert held.requested and held.signum == SIGTERM
        with pytest.raises(KeyboardInterrupt):
            held.check()
        os.kill(os.getpid(), signal.SIGTERM)  # the copy: the same request
        assert held.signum == SIGTERM
        held._at -= 61.0  # a minute later: a second request
        with pytest.raises(Aborted) as a:
            os.kill(os.getpid(), signal.SIGTERM)
        assert a.value.signum == SIGTERM


def test_a_signal_after_the_vote_waits_for_the_next_settle() -> None:
    """Every rank acts on the settled decision alone: a signal that lands after this rank
    voted (the peers voted 'go on' too) stops nobody now, and everybody at the next settle."""
    votes: list[int | None] = []

    def agree(mine: int | None) -> int | None:
        votes.append(mine)
        return agree_stop(mine, lambda v: None)  # (the peers: no signal)

    held = HeldInterrupt(agree=agree)
    with held:
        assert held.settle() is False
        os.kill(os.getpid(), signal.SIGTERM)  # came after the vote
        held.check()  # the decision stands: no stop
        assert held.requested and not held.stop
        assert held.settle() is True and votes == [None, SIGTERM]
        with pytest.raises(Aborted):  # no repeat window: a second signal aborts
            os.kill(os.getpid(), signal.SIGINT)


def test_the_vote_rides_on_the_steps_all_reduce() -> None:
    """StepAgreement: the step appends this rank's vote (what its HeldInterrupt holds when
    the step sums) to its own all-reduce; the settle after the step decides from that sum
    with no collective of its own; a settle with no step before it (after an epoch's
    measurement) runs one."""
    calls: list[np.ndarray] = []

    def all_reduce(v: np.ndarray) -> None:  # (the peer: SIGINT)
        calls.append(v.copy())
        v += vote(SIGINT)

    agreement = StepAgreement(all_reduce)
    held = HeldInterrupt(agree=agreement)
    agreement.current = held.ballot
    with held:
        sums = np.concatenate([np.zeros(4), agreement.ballot()])  # (a step's sums)
        sums[4:] += vote(None)  # the peer voted to go on
        agreement.counted(sums[4:])
        os.kill(os.getpid(), signal.SIGTERM)  # lands after the step summed
        assert held.settle() is False and calls == []  # the step's decision: go on
        assert held.settle() is True and held.signum == SIGTERM  # its own all-reduce
        np.testing.assert_array_equal(calls[0], vote(SIGTERM))


def test_one_process_keeps_the_single_process_rule() -> None:
    held = HeldInterrupt()
    with held:
        os.kill(os.getpid(), signal.SIGTERM)
        assert held.settle() is True
        with pytest.raises(Aborted):
            os.kill(os.getpid(), signal.SIGTERM)


# -- the launcher ------------------------------------------------------------------------------
class _Proc:
    """A fake rank: ends with ``codes[rank]`` after ``polls`` polls; records signals."""

    made: list[_Proc] = []

    def __init__(self, cmd: list[str], env: dict[str, str], codes: dict[int, int],
                 polls: dict[int, int]) -> None:
        self.cmd, self.rank = cmd, int(env["RANK"])
        self.code, self.left = codes[self.rank], polls[self.rank]
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.killed = False
        _Proc.made.append(self)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.left -= 1
            if self.left <= 0:
                self.returncode = self.code
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def kill(self) -> None:
        self.killed, self.returncode = True, -9


def _launch(monkeypatch, codes, polls, clock_step=1, signal_at: int | None = None):
    _Proc.made = []
    monkeypatch.setattr(parallel_mod.subprocess, "Popen",
                        lambda cmd, env: _Proc(cmd, env, codes, polls))
    ticks = iter(range(0, 10**7, clock_step))
    monkeypatch.setattr(parallel_mod.time, "monotonic", lambda: next(ticks))
    sleeps = [0]

    def sleep(_s: float) -> None:
        sleeps[0] += 1
        if sleeps[0] == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(parallel_mod.time, "sleep", sleep)
    world = parallel_mod.World(2, 0, False, "mithril", False, out="runs/x")
    return parallel_mod.launch(world, ["train", "--nprocs", "2"])


def test_the_launcher_forwards_sigterm_and_waits_for_rank_0_to_write(monkeypatch) -> None:
    """SIGTERM to the launcher reaches both ranks; rank 1 stops (143) long before rank 0 has
    written (50 polls later, 50 s on the fake clock, past the 10 s a failure gets): rank 0
    is not killed, the launcher exits 143 and restores the default SIGTERM handler."""
    rc = _launch(monkeypatch, {0: 143, 1: 143}, {0: 60, 1: 10}, signal_at=3)
    assert rc == 143
    assert [p.signals for p in _Proc.made] == [[SIGTERM], [SIGTERM]]
    assert not any(p.killed for p in _Proc.made)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # the ranks write into the launcher's folder
    assert _Proc.made[0].cmd[-2:] == ["--out", "runs/x"]


def test_the_launcher_forwards_a_sigint_sent_to_it_alone(monkeypatch) -> None:
    """`kill -INT <launcher>` (not the terminal's Ctrl-C, which reaches every process):
    forwarded, as SIGTERM is."""
    sleeps = [0]

    def sleep_and_interrupt(_s: float) -> None:
        sleeps[0] += 1
        if sleeps[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    _Proc.made = []
    monkeypatch.setattr(parallel_mod.subprocess, "Popen",
                        lambda cmd, env: _Proc(cmd, env, {0: 130, 1: 130}, {0: 5, 1: 5}))
    monkeypatch.setattr(parallel_mod.time, "sleep", sleep_and_interrupt)
    world = parallel_mod.World(2, 0, False, "mithril", False, out="runs/x")
    assert parallel_mod.launch(world, ["train"]) == 130
    assert [p.signals for p in _Proc.made] == [[SIGINT], [SIGINT]]


def test_a_failure_beats_a_stop_and_stops_the_others(monkeypatch) -> None:
    rc = _launch(monkeypatch, {0: 0, 1: 1}, {0: 10**6, 1: 2}, clock_step=1)
    assert rc == 1 and _Proc.made[0].killed  # rank 0 never ended: killed after the grace
    assert parallel_mod.exit_code([143, 1]) == 1
    assert parallel_mod.exit_code([143, 143]) == 143
    assert parallel_mod.exit_code([0, 130]) == 130
    assert parallel_mod.exit_code([-15, 0]) == 143  # killed by SIGTERM outside its loop
    assert parallel_mod.exit_code([143, -9]) == 137  # killed: a failure


def test_without_out_the_ranks_write_into_the_launchers_folder(tmp_path, monkeypatch) -> None:
    """No --out or --name: the launcher picks runs/train-<time>, creates it and hands it to
    the ranks (rank 0 computed its own before, found the launcher's folder there and wrote
    into runs/train-<time>-2, leaving the launcher's empty)."""
    cmds: list[list[str]] = []

    class Done:
        def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
            cmds.append(cmd)
            self.returncode = 0

        def poll(self) -> int:
            return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(parallel_mod.CHILD_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(parallel_mod.subprocess, "Popen", Done)
    assert main(["train", *FLAGS, "--nprocs", "2"]) == 0
    made = [p.relative_to(tmp_path) for p in (tmp_path / "runs").iterdir()]
    assert len(made) == 1 and made[0].name.startswith("train-")
    assert all(c[-2:] == ["--out", str(made[0])] for c in cmds) and len(cmds) == 2


# -- in one process (--nprocs 1: DataParallel, the checkpoint and resume paths) -----------------
def _signal_at(monkeypatch, k: int) -> None:
    step, calls = Run.step, [0]

    def signalled(self: Run, x: np.ndarray, y: np.ndarray) -> tuple:
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, x, y)

    monkeypatch.setattr(Run, "step", signalled)


def test_one_process_data_parallel_stops_saves_and_resumes_bit_for_bit(tmp_path, monkeypatch,
                                                                      capsys) -> None:
    """--nprocs 1 (DataParallel in this process) with --checkpoint-every 7: SIGTERM in step
    12 saves the replicated state; the resume equals the run that did not stop."""
    short = [*FLAGS, "--batch-size", "64", "--epochs", "2", "--nprocs", "1"]  # 46 steps
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", *short, "--checkpoint", "--out", str(whole)]) == 0
    _signal_at(monkeypatch, 12)
    assert main(["train", *short, "--checkpoint-every", "7", "--out", str(cut)]) == 143
    out = capsys.readouterr().out
    assert "stopped by SIGTERM after 12 of 46 steps" in out
    assert f"resume with: mithril train --resume {cut}" in out
    ckpt = load_checkpoint(cut / "checkpoint.safetensors")
    assert ckpt["extra"]["steps"] == 12 and ckpt["extra"]["world"]["nprocs"] == 1
    monkeypatch.undo()
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    _assert_same_checkpoint(whole, cut)


@pytest.mark.parametrize("extra, fmt", [
    (["--shard-state"], ["--dtype", "float64"]),
    (["--mixed-precision", "fp16", "--backend", "torch"], ["--dtype", "float32"])])
def test_sharded_and_mixed_precision_runs_stop_save_and_resume_bit_for_bit(
        tmp_path, monkeypatch, capsys, extra, fmt) -> None:
    """--shard-state and mixed precision (here --nprocs 1; two processes in
    test_cli_sharded_checkpoints.py): SIGTERM in step 9 saves the whole state (the shards
    gathered; the float32 masters and the loss scaler), the resume command is printed, and
    the resumed run equals the run that did not stop, bit for bit."""
    short = [*FLAGS, *fmt, "--batch-size", "64", "--epochs", "2", "--nprocs", "1", *extra]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", *short, "--checkpoint", "--out", str(whole)]) == 0
    _signal_at(monkeypatch, 9)
    assert main(["train", *short, "--checkpoint-every", "4", "--out", str(cut)]) == 143
    out = capsys.readouterr().out
    assert "stopped by SIGTERM after 9 of 46 steps" in out and "(no checkpoint" not in out
    assert f"resume with: mithril train --resume {cut}" in out
    ckpt = load_checkpoint(cut / "checkpoint.safetensors")
    assert ckpt["extra"]["steps"] == 9
    assert ckpt["extra"]["world"]["shard_state"] is ("--shard-state" in extra)
    assert ("mixed_precision_trainer" in ckpt["extra"]) is ("--mixed-precision" in extra)
    monkeypatch.undo()
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    _assert_same_checkpoint(whole, cut)
    if "--mixed-precision" in extra:
        saved = [load_checkpoint(d / "checkpoint.safetensors")["extra"] for d in (whole, cut)]
        assert saved[0]["mixed_precision_trainer"] == saved[1]["mixed_precision_trainer"]


# -- bad input: named, nothing written, no process started ----------------------------------------
def test_refused_combinations_change_nothing(tmp_path, monkeypatch, capsys) -> None:
    short = [*FLAGS, "--batch-size", "64", "--epochs", "2", "--nprocs", "1"]
    run = tmp_path / "run"
    assert main(["train", *short, "--checkpoint", "--out", str(run)]) == 0
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    monkeypatch.setattr(parallel_mod.subprocess, "Popen",
                        lambda *a, **k: pytest.fail("a rank was started"))
    cases = [
        (["train", *FLAGS, "--nprocs", "2", "--checkpoint-every", "0"],
         "argument --checkpoint-every: must be between 1 and"),
        # checked by the launcher before any rank starts (one error, not one per rank)
        (["train", "--resume", str(run), "--epochs", "3", "--nprocs", "2", "--lr", "0.5"],
         "--resume: this command changes the run's settings.lr (0.01 in the run, 0.5 now)"),
        (["train", "--resume", str(run), "--lr", "0.5", "--dry-run"],  # (--nprocs 1's)
         "--resume: this command changes the run's settings.lr (0.01 in the run, 0.5 now)"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([*argv, *([] if "--resume" in argv else ["--out", str(tmp_path / "new")])])
        assert e.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# -- two real processes ----------------------------------------------------------------------------
def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "mithril", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _finish(p: subprocess.Popen, deadline: float = 240) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{p.args} did not stop within {deadline} s")
    return p.returncode, out, err


def _sigterm_then_resume(tmp_path: Path, whole: Path, how: str, extra: list[str]) -> None:
    """Start the run with --checkpoint-every 5; once its first checkpoint exists, SIGTERM
    (the launcher, its process group, or rank 1); check the stop, resume, compare."""
    cut = tmp_path / f"cut-{how}"
    p = _start(["train", *FLAGS, *extra, "--checkpoint-every", "5", "--out", str(cut)])
    t0 = time.monotonic()
    while not (cut / "checkpoint.safetensors").exists():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 180, "no checkpoint after 180 s"
        time.sleep(0.01)
    if how == "launcher":
        p.send_signal(signal.SIGTERM)
    elif how == "group":  # as a cluster scheduler does: the launcher and every rank
        os.killpg(p.pid, signal.SIGTERM)
    else:  # one rank (rank 1: the second process the launcher started)
        kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        os.kill(int(kids[1]), signal.SIGTERM)
    rc, out, err = _finish(p)
    assert rc == 143, err[-3000:]
    steps = len(_rows(cut / "metrics.csv"))
    assert 5 <= steps < 180, steps  # stopped mid-run, after the first periodic save
    assert out.count(f"stopped by SIGTERM after {steps} of 180 steps") == 1
    assert out.count(f"resume with: mithril train --resume {cut}") == 1
    assert "aborted" not in err  # the group's copy and the forwarded one: one request
    ckpt = load_checkpoint(cut / "checkpoint.safetensors")
    assert ckpt["extra"]["steps"] == steps
    assert ckpt["extra"]["world"]["nprocs"] == (2 if "--nprocs" in extra else 1)
    if how == "launcher" and "--nprocs" in extra:  # another world size: the same run to
        other = tmp_path / "other"  # rounding (each batch's gradient summed in another split)
        shutil.copytree(cut, other)
        assert main(["train", "--resume", str(other), "--nprocs", "1", "--no-plot"]) == 0
        a, b = (load_checkpoint(d / "checkpoint.safetensors")["params"] for d in (whole, other))
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-9, atol=1e-12, err_msg=k)
    rc, out, err = _finish(_start(["train", "--resume", str(cut), "--no-plot"]))
    assert rc == 0, err[-3000:]
    assert out.count(f"resumed from {cut / 'checkpoint.safetensors'}: after step {steps}") == 1
    _assert_same_checkpoint(whole, cut)


@pytest.fixture(scope="module")
def whole_two(tmp_path_factory) -> Path:
    """The uninterrupted two-process run, with its final checkpoint."""
    whole = tmp_path_factory.mktemp("dp") / "whole"
    rc, _, err = _finish(_start(["train", *FLAGS, "--nprocs", "2", "--checkpoint", "--out",
                                 str(whole)]))
    assert rc == 0, err[-3000:]
    return whole


# kill tests of three two-process runs, ~30 s each (by default: the launcher's forwarding
# above and the one-process data-parallel stop and resume)
@pytest.mark.slow
@pytest.mark.parametrize("how", ["launcher", "group", "rank"])
def test_two_processes_sigterm_checkpoint_and_resume(tmp_path, whole_two, how) -> None:
    _sigterm_then_resume(tmp_path, whole_two, how, ["--nprocs", "2"])


@pytest.mark.slow  # JAX compiles in three processes, ~90 s
def test_jax_devices_sigterm_checkpoint_and_resume(tmp_path) -> None:
    """--backend jax --devices 2 trains in one process: SIGTERM saves the state gathered from
    the mesh, and the resume puts it back on the mesh, bit for bit."""
    jax = ["--backend", "jax", "--devices", "2"]
    whole = tmp_path / "whole"
    rc, _, err = _finish(_start(["train", *FLAGS, *jax, "--checkpoint", "--out", str(whole)]))
    assert rc == 0, err[-3000:]
    _sigterm_then_resume(tmp_path, whole, "launcher", jax)


@pytest.mark.slow  # two jax.distributed processes compile, ~60 s
def test_jax_processes_stop_after_the_same_step(tmp_path) -> None:
    """--backend jax --nprocs 2: the stop is agreed over jax.distributed (no torch group);
    SIGTERM to the process group after the first epoch stops both processes after the same
    step, status 143, the results so far written with the checkpoint (the state gathered
    from every process's devices to process 0; its resume: test_cli_sharded_checkpoints)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    p = subprocess.Popen([sys.executable, "-m", "mithril", "train", *FLAGS, "--epochs", "8",
                          "--backend", "jax", "--nprocs", "2", "--out", str(out)], env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    lines = []
    for line in p.stdout:  # (rank 0's lines; the launcher's own come first)
        lines.append(line)
        if line.startswith("train: epoch 1/8"):
            os.killpg(p.pid, signal.SIGTERM)
            break
    rc, rest, err = _finish(p)
    assert rc == 143, err[-3000:]
    steps = len(_rows(out / "metrics.csv"))
    assert 180 <= steps < 1440
    assert f"stopped by SIGTERM after {steps} of 1440 steps" in rest
    assert f"resume with: mithril train --resume {out}" in rest
    assert load_checkpoint(out / "checkpoint.safetensors")["extra"]["steps"] == steps
    assert "aborted" not in err and "Traceback" not in err
