"""``mithril compare --checkpoint-every N`` / ``--checkpoint`` / ``--resume DIR``: each
configuration's checkpoint in its folder; SIGTERM in a configuration saves it at once, ranks
the configurations so far, prints the resume command and exits 143; a comparison killed
without warning resumes from its last periodic save; the resumed comparison equals the one
that did not stop bit for bit (parameters, optimizer state, metrics.csv, the ranking)."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main
from mithril.cli.training import Run
from mithril.utils.checkpoint import load_checkpoint

pytest.importorskip("sklearn")

#: 2 configurations x 23 steps (digits, batches of 64)
CONFIGS = ["--configs", "adam:lr=1e-2", "sgd:lr=0.05,momentum=0.9"]
FLAGS = [*CONFIGS, "--epochs", "1", "--hidden", "16", "--dtype", "float64", "--no-plot",
         "--no-progress"]
FOLDERS = ("01-adam_lr=1e-2", "02-sgd_lr=0.05_momentum=0.9")


def _ranking(run: Path) -> list[dict[str, str]]:
    with open(run / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "total_s"} for r in csv.DictReader(f)]


def _assert_same_comparison(a: Path, b: Path, folders=FOLDERS) -> None:
    for name in folders:
        assert (a / name / "metrics.csv").read_text() == (b / name / "metrics.csv").read_text()
        ca, cb = (load_checkpoint(d / name / "checkpoint.safetensors") for d in (a, b))
        assert ca["extra"]["steps"] == cb["extra"]["steps"]
        for k in ca["params"]:
            np.testing.assert_array_equal(cb["params"][k], ca["params"][k], err_msg=k)
        sa, sb = ca["optimizer_state_dict"], cb["optimizer_state_dict"]
        assert sa["step"] == sb["step"]
        for slot in sa["slots"]:
            for k in sa["slots"][slot]:
                np.testing.assert_array_equal(sb["slots"][slot][k], sa["slots"][slot][k])
    assert _ranking(a) == _ranking(b)


def _at_step(monkeypatch, k: int, act) -> None:
    """``act()`` inside the ``k``-th call of Run.step (over all configurations)."""
    step, calls = Run.step, [0]

    def hooked(self: Run, x: np.ndarray, y: np.ndarray) -> tuple:
        calls[0] += 1
        if calls[0] == k:
            act()
        return step(self, x, y)

    monkeypatch.setattr(Run, "step", hooked)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "whole"
    assert main(["compare", *FLAGS, "--checkpoint", "--out", str(out)]) == 0
    return out


def test_sigterm_in_the_second_configuration_then_resume(tmp_path, whole, monkeypatch,
                                                         capsys) -> None:
    """SIGTERM in step 30 (the 7th of sgd's): sgd's checkpoint is saved at once (the
    finished adam's too), the ranking of both so far is written, status 143; --resume reads
    adam back and finishes sgd: the comparison that did not stop."""
    cut = tmp_path / "cut"
    _at_step(monkeypatch, 30, lambda: os.kill(os.getpid(), signal.SIGTERM))
    capsys.readouterr()
    assert main(["compare", *FLAGS, "--out", str(cut)]) == 143
    out = capsys.readouterr().out
    assert f"resume with: mithril compare --resume {cut}" in out
    saved = [load_checkpoint(cut / f / "checkpoint.safetensors")["extra"] for f in FOLDERS]
    assert [e["steps"] for e in saved] == [23, 7]
    assert saved[1]["format"] == "mithril-compare-resume-1"
    assert [r["interrupted"] for r in _ranking(cut)] == ["False", "True"]
    monkeypatch.undo()
    assert main(["compare", "--resume", str(cut)]) == 0
    out = capsys.readouterr().out
    assert "2 configuration(s) from their checkpoints" in out
    _assert_same_comparison(whole, cut)


class _Killed(BaseException):
    """A kill without warning: nothing after it runs (no handler, no final write)."""


def test_a_kill_without_warning_resumes_from_the_last_periodic_save(tmp_path, whole,
                                                                   monkeypatch) -> None:
    """--checkpoint-every 5, killed in step 36 (sgd's 13th): adam's folder holds its final
    checkpoint (saved when it finished), sgd's the one after its 10th step; the staged
    ranking never appeared. --resume finishes the comparison that did not stop."""
    cut = tmp_path / "cut"

    def kill() -> None:
        raise _Killed

    _at_step(monkeypatch, 36, kill)
    with pytest.raises(_Killed):
        main(["compare", *FLAGS, "--checkpoint-every", "5", "--out", str(cut)])
    assert not (cut / "results.csv").exists()
    assert [load_checkpoint(cut / f / "checkpoint.safetensors")["extra"]["steps"]
            for f in FOLDERS] == [23, 10]
    monkeypatch.undo()
    assert main(["compare", "--resume", str(cut)]) == 0
    _assert_same_comparison(whole, cut)


def test_a_larger_epochs_trains_every_configuration_further(tmp_path) -> None:
    """--checkpoint with --scheduler none, 1 epoch; --resume --epochs 2 equals the 2-epoch
    comparison (the schedule does not depend on the length)."""
    flags = [*FLAGS, "--scheduler", "none"]
    two, one = tmp_path / "two", tmp_path / "one"
    assert main(["compare", *flags, "--epochs", "2", "--checkpoint", "--out", str(two)]) == 0
    assert main(["compare", *flags, "--checkpoint", "--out", str(one)]) == 0
    assert main(["compare", "--resume", str(one), "--epochs", "2"]) == 0
    _assert_same_comparison(two, one)


def test_bad_input_is_named_and_changes_nothing(tmp_path, whole, capsys) -> None:
    train_run = tmp_path / "train-run"
    assert main(["train", "--epochs", "1", "--hidden", "16", "--no-plot", "--no-progress",
                 "--checkpoint", "--out", str(train_run)]) == 0
    before = {p: p.read_bytes() for p in whole.rglob("*") if p.is_file()}
    cases = [
        (["compare", *FLAGS, "--checkpoint-every", "0", "--out", str(tmp_path / "new")],
         "argument --checkpoint-every: must be between 1 and"),
        (["compare", "--resume", str(tmp_path / "nowhere")], "nowhere: no such folder"),
        (["compare", "--resume", str(train_run)], "no configuration's checkpoint.safetensors"),
        (["compare", "--resume", str(whole), "--batch-size", "32"],
         "changes the comparison's --batch-size (64 in the comparison, 32 now)"),
        (["compare", "--resume", str(whole), "--configs", "adam"],
         "changes the comparison's --configs"),
        (["train", "--resume", str(whole / FOLDERS[0])],
         "not a checkpoint of `mithril train --checkpoint`"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert {p: p.read_bytes() for p in whole.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-run"]
