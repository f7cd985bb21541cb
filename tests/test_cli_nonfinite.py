"""``--nonfinite raise`` from the command line: a non-finite gradient ends ``mithril train``
and ``mithril compare`` with one error line naming the step, the epoch and the parameters
(exit status 1, no traceback); the steps completed before it are written as Ctrl-C writes
them, and a run that fails at its first step leaves no folder it created."""

from __future__ import annotations

import csv
import json

import pytest

from mithril.cli import main
from mithril.cli import training as cli_training

DIVERGE = ["--optimizer", "sgd", "--lr", "1e30", "--nonfinite", "raise"]
SMALL = ["--epochs", "2", "--hidden", "8", "--no-progress", "--no-plot"]


def error_line(capsys) -> str:
    """The one line on stderr: the error, with no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


@pytest.fixture
def fails_at_once(monkeypatch):
    """Every optimizer step raises as an optimizer built with nonfinite='raise' does."""
    def step(self, x, y):
        raise FloatingPointError("SGD: non-finite gradient(s) for ['mlp.linear_0.weight'] "
                                 "(global norm inf); params and state left unchanged")

    monkeypatch.setattr(cli_training.Run, "step", step)


def test_train_stops_with_one_line_and_keeps_the_steps_before(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["train", *DIVERGE, *SMALL, "--out", str(out)]) == 1
    line = error_line(capsys)
    assert line.startswith("mithril train: error: step 2 (epoch 1/2): SGD: non-finite")
    assert "mlp.linear_0.weight" in line and f"written to {out}" in line
    with open(out / "metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"].startswith("step 2 (epoch 1/2)") and summary["steps"] == 1
    assert not summary["interrupted"]


def test_train_failing_at_its_first_step_leaves_no_folder(tmp_path, capsys, fails_at_once):
    out = tmp_path / "runs" / "x"
    assert main(["train", *DIVERGE, *SMALL, "--out", str(out)]) == 1
    assert error_line(capsys).startswith("mithril train: error: step 1 (epoch 1/2): SGD")
    assert not (tmp_path / "runs").exists()  # --out and the parent it created are gone

    kept = tmp_path / "kept"  # an empty folder the user made is left alone
    kept.mkdir()
    assert main(["train", *DIVERGE, *SMALL, "--out", str(kept)]) == 1
    assert kept.is_dir() and not list(kept.iterdir())


def test_compare_ranks_what_ran_and_exits_1(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--configs", "adam", "sgd:lr=1e30,nonfinite=raise", "--epochs",
                 "1", "--hidden", "8", "--no-progress", "--no-plot", "--out", str(out)]) == 1
    line = error_line(capsys)
    assert line.startswith("mithril compare: error: config 'sgd:lr=1e30,nonfinite=raise': "
                           "step 2 (epoch 1/1)")
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["config"] for r in results] == ["adam", "sgd:lr=1e30,nonfinite=raise"]
    assert results[0]["error"] is None and results[1]["error"].startswith("step 2")


def test_compare_failing_at_once_leaves_no_folder(tmp_path, capsys, fails_at_once):
    out = tmp_path / "cmp"
    assert main(["compare", "--configs", "sgd:lr=1e30,nonfinite=raise", "adam", "--epochs",
                 "1", "--hidden", "8", "--no-progress", "--no-plot", "--out", str(out)]) == 1
    assert "step 1 (epoch 1/1)" in error_line(capsys)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_nprocs_2_stops_with_one_line(tmp_path, capfd):
    out = tmp_path / "n2"
    assert main(["train", *DIVERGE, *SMALL, "--nprocs", "2", "--out", str(out)]) == 1
    lines = capfd.readouterr().err.strip().splitlines()  # no traceback, no numpy warnings
    assert len(lines) == 1 and lines[0].startswith("mithril train: error: step 2 (epoch 1/2)")
    assert json.loads((out / "summary.json").read_text())["nprocs"] == 2
