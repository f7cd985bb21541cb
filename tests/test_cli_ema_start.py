"""``mithril train --ema DECAY --ema-start STEP`` end to end: the optimizer's ``ema_start``;
an EMA that has not started yet is the initial weights, one of decay 0 that has is the
weights themselves; bad values refused before anything is written."""

from __future__ import annotations

import json

import conftest
import pytest

from mithril.cli import main

QUICK = ["train", "--hidden", "32", "--lr", "1e-2", "--scheduler", "none", "--no-progress",
         "--no-plot"]


def summary(folder) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_ema_start_reaches_the_optimizer_and_the_summary(tmp_path, capsys):
    out = tmp_path / "late"
    assert main([*QUICK, "--epochs", "2", "--ema", "0", "--ema-start", "30", "--out",
                 str(out)]) == 0
    assert "EMA of the weights: decay 0, from step 30" in capsys.readouterr().out
    s = summary(out)
    assert s["config"]["ema"] == 0 and s["config"]["ema_start"] == 30
    assert "ema_start=30" in s["optimizer"]
    # decay 0, started (step 30 of ~46): the EMA is the last weights
    assert s["final"]["test_acc_ema"] == s["final"]["test_acc"]
    assert s["final"]["test_loss_ema"] == pytest.approx(s["final"]["test_loss"])


def test_an_ema_not_started_yet_is_the_initial_weights(tmp_path):
    """--ema-start after the last step: the EMA still holds the initial weights, the same
    after one epoch as after two (the raw weights are not)."""
    finals = []
    for epochs in ("1", "2"):
        out = tmp_path / f"e{epochs}"
        assert main([*QUICK, "--epochs", epochs, "--ema", "0.5", "--ema-start", "100000",
                     "--out", str(out)]) == 0
        finals.append(summary(out)["final"])
    assert finals[0]["test_loss_ema"] == finals[1]["test_loss_ema"]
    assert finals[0]["test_loss"] != finals[1]["test_loss"]
    assert finals[1]["test_acc"] > 0.8 and finals[1]["test_acc_ema"] < 0.5  # untrained


@pytest.mark.parametrize(("argv", "message"), [
    (["--ema", "0.9", "--ema-start", "0"], "argument --ema-start: must be between 1"),
    (["--ema", "0.9", "--ema-start", "2.5"], "argument --ema-start: '2.5' is not an integer"),
    (["--ema", "0.9", "--ema-start", "x"], "argument --ema-start"),
    (["--ema-start", "5"], "--ema-start only applies with --ema"),
])
def test_bad_ema_start_is_refused_before_anything_runs(capsys, tmp_path, argv, message):
    out = tmp_path / "x"
    err = conftest.usage_error(capsys, [*QUICK, *argv, "--out", str(out)])
    assert message in err
    assert not out.exists()
