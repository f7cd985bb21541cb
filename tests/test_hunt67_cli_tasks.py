"""Hunt 67: ``mithril train`` on its built-in jobs (the digits MLP, ``--task digits-cnn``,
``--task charlm``) as a user runs them: resume, flags, output files, against peers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import conftest
import numpy as np

from mithril.cli import main
from mithril.utils.checkpoint import load_checkpoint


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, last=True)


def charlm(tmp_path: Path) -> list[str]:
    text = tmp_path / "story.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return ["train", "--task", "charlm", "--data", str(text), "--context", "16",
            "--eval-every", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
            "--batch-size", "4", "--eval-windows", "4", "--sample-chars", "0",
            "--scheduler", "none", "--no-progress", "--no-plot", "--checkpoint"]


# -- charlm --resume ----------------------------------------------------------------------------
def test_charlm_resumed_to_more_steps_is_the_run_that_did_not_stop(tmp_path, capsys):
    base = charlm(tmp_path)
    assert main([*base, "--steps", "6", "--out", str(tmp_path / "straight")]) == 0
    assert main([*base, "--steps", "4", "--out", str(tmp_path / "cut")]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--steps", "6"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")["params"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["params"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "straight" / "metrics.csv") == rows(tmp_path / "cut" / "metrics.csv")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["steps"] == 6


def test_charlm_stopped_inside_an_eval_period_is_not_resumed_to_fewer_steps(tmp_path, capsys):
    """--steps 3 with --eval-every 2 measures a 1-step second "epoch"; resumed to --steps 6
    it trained one more 2-step period: 5 steps, not 6, with the measurements elsewhere than
    the run of 6 (its summary said steps 5 under task_settings.steps 6). Refused now, naming
    --steps and --eval-every, nothing written."""
    base = charlm(tmp_path)
    cut = tmp_path / "cut"
    assert main([*base, "--steps", "3", "--out", str(cut)]) == 0
    before = {p.name: p.read_bytes() for p in cut.iterdir()}
    err = usage_error(capsys, ["train", "--resume", str(cut), "--steps", "6"])
    assert "--steps" in err and "--eval-every 2" in err and "stopped at step 3" in err
    assert {p.name: p.read_bytes() for p in cut.iterdir()} == before


def test_a_finished_charlm_run_resumed_as_it_is_asks_for_more_steps_not_epochs(tmp_path,
                                                                                 capsys):
    base = charlm(tmp_path)
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "lm")]) == 0
    err = usage_error(capsys, ["train", "--resume", str(tmp_path / "lm")])
    assert "the run has done its 2 steps; give a larger --steps" in err
    assert "--epochs" not in err  # (--epochs is refused for charlm)
