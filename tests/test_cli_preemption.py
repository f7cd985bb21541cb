"""``mithril train`` on a preemptible machine: SIGTERM (and Ctrl-C) is held to the end of the
step, a checkpoint is saved before anything slower, the resume command is printed and the
status is 128 + signal; ``--checkpoint-every N`` saves every N steps, a kill in the middle of a
save leaving the previous one; a second signal aborts at once. A run stopped anywhere and
resumed is the run that did not stop, bit for bit (parameters, Adam's moments, the EMA, the
data order, metrics.csv, epochs.csv), DP-SGD runs included (their ε too)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli_resume import FLAGS, _assert_same_run, _table, _train

import mithril.utils.checkpoint as checkpoint_mod
from mithril.cli import train as train_mod
from mithril.cli.runtime import Aborted, HeldInterrupt, exit_status
from mithril.cli.training import Run
from mithril.utils.checkpoint import load_checkpoint

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _signal_at(monkeypatch: pytest.MonkeyPatch, *when: tuple[int, int]) -> None:
    """Send ``signum`` to this process inside the ``k``-th call of Run.step, for each
    ``(k, signum)`` of ``when`` (as a scheduler's SIGTERM lands in the middle of a step)."""
    step, calls = Run.step, [0]
    at = dict(when)

    def signalled(self: Run, x: np.ndarray, y: np.ndarray) -> tuple:
        calls[0] += 1
        if calls[0] in at:
            os.kill(os.getpid(), at[calls[0]])
        return step(self, x, y)

    monkeypatch.setattr(Run, "step", signalled)


# -- the handler ----------------------------------------------------------------------------------
def test_held_interrupt_holds_sigterm_then_aborts_on_the_second() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    held = HeldInterrupt()
    with held:
        os.kill(os.getpid(), signal.SIGTERM)  # held: the step under way goes on
        assert held.requested and held.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt) as e:
            held.check()
        assert type(e.value) is KeyboardInterrupt
        with pytest.raises(Aborted) as a:
            os.kill(os.getpid(), signal.SIGINT)  # a second one, whatever it is: at once
        assert a.value.signum == signal.SIGINT and str(a.value) == "SIGINT"
    assert {s: signal.getsignal(s) for s in before} == before
    assert exit_status(signal.SIGTERM) == 143 and exit_status(signal.SIGINT) == 130
    assert exit_status(None) == 130


def test_held_interrupt_leaves_a_handler_the_caller_set() -> None:
    got: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        with HeldInterrupt() as held:
            os.kill(os.getpid(), signal.SIGTERM)
            assert not held.requested and got == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGINT) == held._handle  # SIGINT still held
    finally:
        signal.signal(signal.SIGTERM, old)


# -- SIGTERM in a step: checkpoint, resume command, status 143 ------------------------------------
def test_sigterm_mid_epoch_saves_prints_the_command_and_the_resume_is_the_whole_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --checkpoint asked for: the signal saves one anyway. SIGTERM inside step 7 (epoch 2
    of 5, 4 steps each): the step ends, the checkpoint is saved (before the final metrics
    are measured), status 143, and `mithril train --resume DIR` finishes the run."""
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *FLAGS, "--epochs", "5"]
    assert _train(*common, "--checkpoint", "--out", str(tmp_path / "whole")) == 0
    cut = tmp_path / "cut"
    measured: list[bool] = []
    measure = Run.measure

    def measure_after_save(self: Run) -> dict:
        measured.append((cut / "checkpoint.safetensors").exists())
        return measure(self)

    monkeypatch.setattr(Run, "measure", measure_after_save)
    _signal_at(monkeypatch, (7, signal.SIGTERM))
    capsys.readouterr()
    assert _train(*common, "--out", str(cut)) == 143
    out = capsys.readouterr().out
    assert "stopped by SIGTERM after 7 of 20 steps" in out
    assert f"resume with: mithril train --resume {cut}" in out
    assert measured[-1] is True  # the final measure came after the checkpoint
    ckpt = load_checkpoint(cut / "checkpoint.safetensors")
    assert ckpt["extra"]["steps"] == 7 and ckpt["extra"]["position"]["epoch"] == 2
    assert ckpt["extra"]["position"]["batch"] == 3
    assert json.loads((cut / "summary.json").read_text())["interrupted"] is True
    monkeypatch.undo()
    assert _train("--resume", str(cut)) == 0
    _assert_same_run(tmp_path / "whole", cut)


def test_sigterm_while_an_epoch_is_measured_saves_at_the_epoch_boundary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while epoch 2's metrics are measured: the epoch is logged, the checkpoint is
    at the boundary (epoch 3, no batch done, 2 rows of epochs.csv), the resume the whole run."""
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *FLAGS, "--epochs", "4"]
    assert _train(*common, "--checkpoint", "--out", str(tmp_path / "whole")) == 0
    measure, calls = Run.measure, [0]

    def signalled(self: Run) -> dict:
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return measure(self)

    monkeypatch.setattr(Run, "measure", signalled)
    cut = tmp_path / "cut"
    assert _train(*common, "--out", str(cut)) == 143
    extra = load_checkpoint(cut / "checkpoint.safetensors")["extra"]
    assert (extra["steps"], extra["epochs"]) == (8, 2)
    assert (extra["position"]["epoch"], extra["position"]["batch"]) == (3, 0)
    monkeypatch.undo()
    assert _train("--resume", str(cut)) == 0
    _assert_same_run(tmp_path / "whole", cut)


def test_a_kill_while_the_results_are_written_keeps_the_signal_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grace period ends (SIGKILL, here an exception) while the final files are written:
    the checkpoint saved at the signal is in the folder, and resumes to the whole run."""
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *FLAGS, "--epochs", "3"]
    assert _train(*common, "--checkpoint", "--out", str(tmp_path / "whole")) == 0

    class Killed(BaseException):
        pass

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed

    _signal_at(monkeypatch, (5, signal.SIGTERM))
    monkeypatch.setattr(train_mod, "write_run", killed)
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        _train(*common, "--out", str(cut))
    assert sorted(p.name for p in cut.iterdir()) == ["checkpoint.safetensors", "epochs.csv",
                                                     "metrics.csv"]
    monkeypatch.undo()
    assert _train("--resume", str(cut)) == 0
    _assert_same_run(tmp_path / "whole", cut)


def test_a_second_signal_aborts_at_once_and_writes_nothing_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM in step 5, a second one before the step ends: status 143 at once, the folder
    holds what --checkpoint-every 2 saved last (step 4), which resumes to the whole run."""
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *FLAGS, "--epochs", "3"]
    assert _train(*common, "--checkpoint", "--out", str(tmp_path / "whole")) == 0
    step = Run.step
    calls = [0]

    def twice(self: Run, x: np.ndarray, y: np.ndarray) -> tuple:
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, x, y)

    monkeypatch.setattr(Run, "step", twice)
    cut = tmp_path / "cut"
    capsys.readouterr()
    assert _train(*common, "--checkpoint-every", "2", "--out", str(cut)) == 143
    err = capsys.readouterr().err
    assert "aborted by a second SIGTERM: stopped at once" in err
    assert sorted(p.name for p in cut.iterdir()) == ["checkpoint.safetensors", "epochs.csv",
                                                     "metrics.csv"]
    assert load_checkpoint(cut / "checkpoint.safetensors")["extra"]["steps"] == 4
    assert len(_rows(cut / "metrics.csv")) == 4
    monkeypatch.undo()
    assert _train("--resume", str(cut)) == 0
    _assert_same_run(tmp_path / "whole", cut)


# -- --checkpoint-every ------------------------------------------------------------------------
def test_checkpoint_every_then_a_hard_kill_resumes_from_the_last_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--checkpoint-every 3 and a kill (no signal handler runs) in step 11: the folder holds
    the save after step 9 (epoch 3, 1 batch done); the resume trains steps 10 on."""
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *FLAGS, "--epochs", "4"]
    assert _train(*common, "--checkpoint", "--out", str(tmp_path / "whole")) == 0
    step, calls, saved = Run.step, [0], []

    class Killed(BaseException):
        pass

    def killed_at_11(self: Run, x: np.ndarray, y: np.ndarray) -> tuple:
        calls[0] += 1
        if calls[0] == 11:
            raise Killed
        return step(self, x, y)

    save = train_mod.save_progress

    def counted(*args: object) -> None:
        saved.append(len(args[3]))  # type: ignore[arg-type]
        save(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(Run, "step", killed_at_11)
    monkeypatch.setattr(train_mod, "save_progress", counted)
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        _train(*common, "--checkpoint-every", "3", "--out", str(cut))
    assert saved == [3, 6, 9]
    ckpt = load_checkpoint(cut / "checkpoint.safetensors")
    assert ckpt["extra"]["steps"] == 9 and ckpt["extra"]["position"] == {
        **ckpt["extra"]["position"], "epoch": 3, "batch": 1}
    assert ckpt["extra"]["args"]["checkpoint_every"] == 3  # the resumed run saves on
    monkeypatch.undo()
    assert _train("--resume", str(cut)) == 0
    _assert_same_run(tmp_path / "whole", cut)


def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second periodic save dies after the logs (8 rows) and before the checkpoint: the
    one of step 4 stands, --resume takes the first 4 rows (and 0 of epochs.csv) and gives the whole run."""
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *FLAGS, "--epochs", "3"]
    assert _train(*common, "--checkpoint", "--out", str(tmp_path / "whole")) == 0
    real, calls = checkpoint_mod.save_checkpoint, [0]

    class Killed(BaseException):
        pass

    def dies_on_the_second(*args: object, **kwargs: object) -> None:
        calls[0] += 1
        if calls[0] == 2:  # (save_checkpoint writes a temporary file and renames it)
            raise Killed
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", dies_on_the_second)
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        _train(*common, "--checkpoint-every", "4", "--out", str(cut))
    assert load_checkpoint(cut / "checkpoint.safetensors")["extra"]["steps"] == 4
    assert len(_rows(cut / "metrics.csv")) == 8 and len(_rows(cut / "epochs.csv")) == 1
    assert not [p for p in cut.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert _train("--resume", str(cut)) == 0
    _assert_same_run(tmp_path / "whole", cut)


def test_checkpoint_every_is_refused_where_it_cannot_apply(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(_table(tmp_path / "t.csv"))
    for argv, message in [
            (["--checkpoint-every", "0"], "argument --checkpoint-every: must be between 1 and"),
            (["--checkpoint-every", "x"], "argument --checkpoint-every: 'x' is not an integer")]:
        with pytest.raises(SystemExit) as e:
            _train("--data", data, *FLAGS, *argv, "--out", str(tmp_path / "r"))
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


# -- DP-SGD -----------------------------------------------------------------------------------
DP = ["--target", "label", "--batch-size", "8", "--hidden", "6", "--no-progress", "--no-plot",
      "--optimizer", "dpsgd:lr=0.1,momentum=0.5", "--scheduler", "step:step_size=5,gamma=0.7"]


def _privacy(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["privacy"]


@pytest.mark.parametrize("noise", [["--target-epsilon", "3"],
                                   ["--optimizer", "dpsgd:lr=0.1,noise_multiplier=1.3"]])
def test_dp_sgd_stopped_and_resumed_is_the_whole_run_and_its_epsilon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noise: list[str]) -> None:
    """SIGTERM in step 6 of 16: the resume's parameters, momentum and noise (a function of
    the step count) are the whole run's, and so is the ε it reports (the accountant's
    history kept in the checkpoint): against dp_accounting's RDP accountant directly."""
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import RdpAccountant

    from mithril.utils.privacy_accounting import RDP_ORDERS

    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *DP, *noise, "--epochs", "4"]
    assert _train(*common, "--checkpoint", "--out", str(tmp_path / "whole")) == 0
    _signal_at(monkeypatch, (6, signal.SIGTERM))
    cut = tmp_path / "cut"
    assert _train(*common, "--out", str(cut)) == 143
    hist = load_checkpoint(cut / "checkpoint.safetensors")["extra"]["privacy"]
    sigma = _privacy(tmp_path / "whole")["noise_multiplier"]
    assert hist["accountant"]["history"] == [[sigma, 0.25, 6]]
    monkeypatch.undo()
    assert _train("--resume", str(cut)) == 0
    _assert_same_run(tmp_path / "whole", cut)
    whole, resumed = _privacy(tmp_path / "whole"), _privacy(cut)
    assert resumed == whole and resumed["steps"] == 16
    acc = RdpAccountant(RDP_ORDERS)
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        0.25, dp_accounting.GaussianDpEvent(sigma)), 16))
    assert math.isclose(resumed["epsilon"], acc.get_epsilon(1e-5), rel_tol=1e-12)


def test_dp_sgd_resumed_longer_accounts_the_steps_before_at_their_noise(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fixed σ: 2 epochs, then --resume --epochs 4 is the 4-epoch run (ε of 16 steps). With
    --target-epsilon (σ sized to the run's length) a longer resume is refused, nothing
    written."""
    data = str(_table(tmp_path / "t.csv"))
    fixed = ["--data", data, *DP, "--optimizer", "dpsgd:lr=0.1,noise_multiplier=1.3"]
    assert _train(*fixed, "--epochs", "4", "--checkpoint", "--out", str(tmp_path / "whole")) == 0
    assert _train(*fixed, "--epochs", "2", "--checkpoint", "--out", str(tmp_path / "half")) == 0
    assert _train("--resume", str(tmp_path / "half"), "--epochs", "4") == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "half")
    assert _privacy(tmp_path / "half") == _privacy(tmp_path / "whole")
    sized = tmp_path / "sized"
    assert _train("--data", data, *DP, "--target-epsilon", "3", "--epochs", "2", "--checkpoint",
                  "--out", str(sized)) == 0
    before = {p.name: p.read_bytes() for p in sized.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _train("--resume", str(sized), "--epochs", "4")
    err = capsys.readouterr().err
    assert "--resume: the run's noise multiplier was" in err and "keep --epochs 2" in err
    assert {p.name: p.read_bytes() for p in sized.iterdir()} == before


def test_a_dp_checkpoint_without_its_accounting_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DP-SGD checkpoint written before runs kept the accountant's history (here: saved
    without it) cannot give the run's ε: refused, nothing written."""
    data = str(_table(tmp_path / "t.csv"))
    real = checkpoint_mod.save_checkpoint

    def older(*args: object, **kwargs: object) -> None:
        kwargs["extra"] = {k: v for k, v in kwargs["extra"].items()  # type: ignore[union-attr]
                           if k != "privacy"}
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", older)
    old = tmp_path / "old"
    assert _train("--data", data, *DP, "--epochs", "1", "--checkpoint", "--out", str(old)) == 0
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _train("--resume", str(old), "--epochs", "2")
    assert "the checkpoint holds no privacy accounting" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_compare_reports_epsilon_for_dp_runs(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """results.csv/json get epsilon and delta for the DP-SGD configuration (blank for the
    other), the table an ε column, the configuration's summary.json its privacy record."""
    from mithril.cli import main
    from mithril.utils.privacy_accounting import get_epsilon

    data = str(_table(tmp_path / "t.csv"))
    out = tmp_path / "cmp"
    assert main(["compare", "--data", data, "--target", "label", "--configs", "adam",
                 "dpsgd:lr=0.1,noise_multiplier=1.5", "--epochs", "3", "--batch-size", "8",
                 "--hidden", "6", "--delta", "1e-4", "--no-progress", "--no-plot", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    rows = {r["config"]: r for r in _rows(out / "results.csv")}
    want = get_epsilon(1.5, 0.25, 12, 1e-4)
    dp = rows["dpsgd:lr=0.1,noise_multiplier=1.5"]
    assert float(dp["epsilon"]) == want and float(dp["delta"]) == 1e-4
    assert rows["adam"]["epsilon"] == "" and rows["adam"]["delta"] == ""
    assert "ε (δ=0.0001)" in text and f"{want:.4g}" in text
    js = {r["config"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert js["dpsgd:lr=0.1,noise_multiplier=1.5"]["epsilon"] == want
    assert "epsilon" not in js["adam"]
    summary = json.loads((out / dp["folder"] / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == want and summary["privacy"]["steps"] == 12
    assert main(["compare", "--data", data, "--target", "label", "--configs", "adam", "sgd",
                 "--epochs", "1", "--hidden", "6", "--no-progress", "--no-plot", "--out",
                 str(tmp_path / "plain")]) == 0
    assert "epsilon" not in _rows(tmp_path / "plain" / "results.csv")[0]


# -- a real process, a real signal ---------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def test_a_process_sigtermed_in_a_step_exits_143(tmp_path: Path) -> None:
    """In a child process (its own signal handling, its real exit status): SIGTERM inside
    step 6, status 143, the resume command on stdout, the checkpoint at step 6."""
    data = str(_table(tmp_path / "t.csv"))
    out = tmp_path / "cut"
    code = ("import os, signal, sys\n"
            "from mithril.cli import main\n"
            "from mithril.cli.training import Run\n"
            "step, n = Run.step, [0]\n"
            "def s(self, x, y):\n"
            "    n[0] += 1\n"
            "    if n[0] == 6: os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return step(self, x, y)\n"
            "Run.step = s\n"
            f"sys.exit(main(['train', '--data', {data!r}, *{FLAGS!r}, '--out', {str(out)!r}]))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 143, res.stderr
    assert f"resume with: mithril train --resume {out}" in res.stdout
    assert load_checkpoint(out / "checkpoint.safetensors")["extra"]["steps"] == 6


@pytest.mark.slow
def test_mithril_train_killed_by_an_outside_sigterm_resumes_to_the_whole_run(
        tmp_path: Path) -> None:
    """`python -m mithril train --checkpoint-every 1`, SIGTERM from outside once a save is
    there (wherever the loop is), then the printed resume command: the whole run."""
    data = str(_table(tmp_path / "t.csv", n=200))
    common = ["--data", data, *FLAGS, "--epochs", "60"]
    assert _train(*common, "--checkpoint", "--out", str(tmp_path / "whole")) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "mithril", "train", *common,
                             "--checkpoint-every", "1", "--out", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    deadline = time.monotonic() + 120
    while not (cut / "checkpoint.safetensors").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    steps = load_checkpoint(cut / "checkpoint.safetensors")["extra"]["steps"]
    assert 0 < steps < 60 * 20
    command = next(line for line in stdout.splitlines() if line.startswith("resume with: "))
    argv = command.removeprefix("resume with: mithril ").split()
    res = subprocess.run([sys.executable, "-m", "mithril", *argv], capture_output=True,
                         text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    _assert_same_run(tmp_path / "whole", cut)


def test_compare_stopped_by_sigterm_ranks_what_ran_and_exits_143(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mithril.cli import main

    data = str(_table(tmp_path / "t.csv"))
    _signal_at(monkeypatch, (6, signal.SIGTERM))  # in the second configuration's 2nd step
    out = tmp_path / "cmp"
    assert main(["compare", "--data", data, "--target", "label", "--configs", "adam", "sgd",
                 "rmsprop", "--epochs", "1", "--batch-size", "8", "--hidden", "6",
                 "--no-progress", "--no-plot", "--out", str(out)]) == 143
    assert "interrupted: ranking the configurations run so far" in capsys.readouterr().out
    rows = _rows(out / "results.csv")
    assert sorted((r["config"], r["steps"], r["interrupted"]) for r in rows) == [
        ("adam", "4", "False"), ("sgd", "2", "True")]  # (rmsprop never ran)


def test_the_epsilon_a_dp_run_reports_prints_no_absl_warnings(
        caplog: pytest.LogCaptureFixture) -> None:
    """`mithril train`/`compare` with DP-SGD print a screen of dp_accounting's notes (one per
    fractional RDP order that does not converge) that _epsilon means to silence."""
    pytest.importorskip("dp_accounting")
    from mithril.utils.privacy_accounting import get_epsilon

    with caplog.at_level("WARNING", logger="absl"):
        get_epsilon(1.0, 0.25, 12, 1e-5)
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []
