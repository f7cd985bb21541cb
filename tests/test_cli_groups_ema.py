"""``mithril train --no-decay-on REGEX`` and ``--ema DECAY`` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import conftest
import numpy as np
import pytest

from mithril.cli import main
from mithril.cli import train as train_mod

#: a small budget that still learns (as in test_cli.py)
QUICK = ["train", "--epochs", "2", "--hidden", "32", "--lr", "1e-2", "--scheduler", "none",
         "--no-progress", "--no-plot"]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, usage="mithril train")


@pytest.fixture
def runs(monkeypatch) -> list[train_mod.Run]:
    """Every :class:`Run` the command builds (to look at its parameters after training)."""
    built: list[train_mod.Run] = []

    class Recorded(train_mod.Run):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_mod, "Run", Recorded)
    return built


def max_abs(run: train_mod.Run) -> dict[str, float]:
    return {n: float(np.abs(run.backend.to_numpy(v)).max()) for n, v in run.params.items()}


# -- --no-decay-on ---------------------------------------------------------------------------
def test_no_decay_on_leaves_the_matched_parameters_undecayed(tmp_path, capsys, runs):
    # AdamW with lr * wd = 1: decoupled decay p <- p (1 - lr wd) wipes a decayed parameter
    # every step, leaving only that step's update (|p| <= ~3 lr); undecayed ones accumulate
    argv = [*QUICK, "--optimizer", "adamw", "--weight-decay", "100"]
    assert main([*argv, "--no-decay-on", "bias", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "no weight decay on: mlp.linear_0.bias, mlp.linear_1.bias" in printed
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    exempt, decayed = (max_abs(r) for r in runs)
    assert set(exempt) == {"mlp.linear_0.weight", "mlp.linear_0.bias", "mlp.linear_1.weight",
                           "mlp.linear_1.bias"}
    assert all(v < 0.035 for v in decayed.values()), decayed  # everything wiped each step
    assert exempt["mlp.linear_0.weight"] < 0.035 and exempt["mlp.linear_1.weight"] < 0.035
    assert exempt["mlp.linear_0.bias"] > 0.1  # kept what it learnt
    assert exempt["mlp.linear_0.bias"] > 5 * decayed["mlp.linear_0.bias"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["config"]["no_decay_on"] == "bias"
    assert "exclude_weight_decay=['bias']" in summary["optimizer"]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["config"]["no_decay_on"] \
        is None


@pytest.mark.parametrize("regex, message", [
    ("(", "is not a valid regular expression"),
    ("[a-", "is not a valid regular expression"),
    ("", "must not be empty"),
])
def test_no_decay_on_refuses_invalid_regexes(capsys, regex, message, tmp_path):
    err = usage_error(capsys, [*QUICK, "--no-decay-on", regex, "--out", str(tmp_path / "x")])
    assert "--no-decay-on" in err and message in err
    assert not (tmp_path / "x").exists()


def test_no_decay_on_refuses_a_regex_matching_no_parameter(capsys, tmp_path):
    out = tmp_path / "x"
    err = usage_error(capsys, [*QUICK, "--no-decay-on", "norm", "--out", str(out)])
    assert "--no-decay-on 'norm' matches no parameter" in err
    assert "mlp.linear_0.bias" in err  # names what there is
    assert not out.exists()  # checked before anything is written
    err = usage_error(capsys, [*QUICK, "--no-decay-on", "norm", "--dry-run"])
    assert "matches no parameter" in err


# -- --ema -----------------------------------------------------------------------------------
def test_ema_is_evaluated_beside_the_raw_weights(tmp_path, capsys):
    out, plain = tmp_path / "ema", tmp_path / "plain"
    assert main([*QUICK, "--ema", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "EMA of the weights: decay 0.9" in printed
    assert "test (EMA)" in printed and "train (EMA)" in printed and "EMA test acc" in printed
    final = json.loads((out / "summary.json").read_text())["final"]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        v = final[f"{key}_ema"]
        assert isinstance(v, float) and math.isfinite(v)
        if key.endswith("acc"):
            assert 0 <= v <= 1
    assert final["test_acc_ema"] > 0.8  # it learnt too
    assert final["test_acc_ema"] != final["test_acc"]  # a different set of weights
    assert final["test_loss_ema"] != final["test_loss"]
    epochs = rows(out / "epochs.csv")
    assert list(epochs[0])[:10] == ["epoch", "step", "train_loss", "train_acc", "test_loss",
                                    "test_acc", "train_loss_ema", "train_acc_ema",
                                    "test_loss_ema", "test_acc_ema"]
    assert len(epochs) == 2
    assert float(epochs[-1]["test_acc_ema"]) == pytest.approx(final["test_acc_ema"])
    # evaluating the EMA does not disturb training: the raw weights are those of a run
    # without --ema
    assert main([*QUICK, "--out", str(plain)]) == 0
    raw = json.loads((plain / "summary.json").read_text())["final"]
    assert set(raw) == {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert "test_acc_ema" not in rows(plain / "epochs.csv")[0]
    for key in raw:
        assert final[key] == pytest.approx(raw[key], rel=1e-5), key


def test_ema_zero_is_the_weights_themselves(tmp_path):
    out = tmp_path / "ema0"
    assert main([*QUICK, "--epochs", "1", "--ema", "0", "--out", str(out)]) == 0
    final = json.loads((out / "summary.json").read_text())["final"]
    assert final["test_acc_ema"] == final["test_acc"]
    assert final["train_loss_ema"] == pytest.approx(final["train_loss"])


@pytest.mark.parametrize("value, message", [
    ("1", "must be in [0, 1)"),
    ("1.5", "must be in [0, 1)"),
    ("-0.1", "must be in [0, 1)"),
    ("nan", "must be a finite number"),
    ("inf", "must be a finite number"),
    ("x", "is not a number"),
])
def test_ema_refuses_bad_values(capsys, value, message, tmp_path):
    err = usage_error(capsys, [*QUICK, "--ema", value, "--out", str(tmp_path / "x")])
    assert "argument --ema" in err and message in err
    assert not (tmp_path / "x").exists()


def test_both_flags_together(tmp_path, capsys):
    out = tmp_path / "both"
    assert main([*QUICK, "--optimizer", "adamw", "--weight-decay", "0.05",
                 "--no-decay-on", "bias|norm", "--ema", "0.95", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["ema"] == 0.95 and summary["config"]["no_decay_on"] == "bias|norm"
    assert "ema_decay=0.95" in summary["optimizer"]
    assert 0 <= summary["final"]["test_acc_ema"] <= 1
