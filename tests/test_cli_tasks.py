"""The jobs of ``mithril train`` besides the digits MLP, end to end with tiny budgets:
``--task digits-cnn``, ``--data FILE.csv|.npz`` with ``mithril predict``, ``--task charlm``;
and their bad input (a named error, exit status 2, nothing written)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import conftest
import numpy as np
import pytest

from mithril.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
FILES = {"metrics.csv", "epochs.csv", "summary.json", "training.png"}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, last=True)


def write_table(path: Path, n: int = 200, regression: bool = True, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["height", "width", "depth", "target"])
        for r in x:
            t = round(10 + 3 * r[0] - 2 * r[1], 4) if regression else \
                ("wide" if r[0] + r[1] > 0 else "narrow")
            w.writerow([*np.round(r, 4), t])


# -- digits-cnn ---------------------------------------------------------------------------------
def test_digits_cnn_writes_the_usual_files(tmp_path, capsys):
    out = tmp_path / "cnn"
    argv = ["train", "--task", "digits-cnn", "--epochs", "1", "--channels", "4", "8",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "CNN conv 3×3 4 → BN → relu → pool 2" in printed and "dropout 0.25" in printed
    assert {p.name for p in out.iterdir()} == FILES
    assert (out / "training.png").read_bytes()[:8] == PNG
    steps = rows(out / "metrics.csv")
    assert len(steps) == 23 and list(steps[0])[:4] == ["step", "epoch", "loss", "acc"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task"] == "digits-cnn"
    assert summary["config"]["task_settings"] == {"channels": [4, 8], "batchnorm": True,
                                                  "dropout": 0.25}
    assert summary["final"]["test_acc"] > 0.15  # above chance after one epoch of a tiny CNN


def test_digits_cnn_without_batchnorm_and_flags_of_other_jobs(tmp_path, capsys):
    out = tmp_path / "cnn"
    assert main(["train", "--task", "digits-cnn", "--epochs", "1", "--channels", "4",
                 "--no-batchnorm", "--dropout", "0", "--no-progress", "--no-plot",
                 "--out", str(out)]) == 0
    assert "BN" not in capsys.readouterr().out.splitlines()[0]
    err = usage_error(capsys, ["train", "--task", "digits-cnn", "--hidden", "8"])
    assert "--hidden does not apply to the digits-cnn job" in err
    err = usage_error(capsys, ["train", "--channels", "8"])
    assert "--channels does not apply to the digits job" in err


# -- tabular ------------------------------------------------------------------------------------
def test_csv_regression_train_then_predict(tmp_path, capsys):
    data, out = tmp_path / "boxes.csv", tmp_path / "run"
    write_table(data)
    assert main(["train", "--data", str(data), "--target", "target", "--epochs", "30",
                 "--lr", "1e-2", "--no-progress", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == FILES | {"model.safetensors", "preprocess.json"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task_settings"]["objective"] == "regression"
    final = summary["final"]
    assert set(final) == {"train_loss", "train_rmse", "train_r2", "test_loss", "test_rmse",
                          "test_r2"}
    assert final["test_r2"] > 0.9 and final["test_rmse"] < 1.5  # target std ≈ 3.6
    assert list(rows(out / "metrics.csv")[0])[3] == "rmse"
    assert "batch_rmse" in rows(out / "epochs.csv")[0]
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["features"] == ["height", "width", "depth"] and pre["objective"] == "regression"
    assert len(pre["mean"]) == 3 and pre["target"] == "target"
    assert (out / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors, not pickle
    capsys.readouterr()

    assert main(["predict", "--run", str(out), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "RMSE" in printed and "R²" in printed
    preds = rows(out / "predictions.csv")
    assert len(preds) == 200 and list(preds[0]) == ["row", "prediction"]
    truth = [float(r["target"]) for r in rows(data)]
    err = np.array([float(p["prediction"]) for p in preds]) - truth
    assert np.sqrt(np.mean(err**2)) < 1.5


def test_csv_classification_with_text_labels_and_npz(tmp_path, capsys):
    data, out = tmp_path / "kinds.csv", tmp_path / "run"
    write_table(data, regression=False)
    assert main(["train", "--data", str(data), "--target", "target", "--epochs", "20", "--lr", "1e-2",
                 "--hidden", "16", "--no-progress", "--no-plot", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task_settings"]["objective"] == "classification"
    assert summary["final"]["test_acc"] > 0.85
    assert json.loads((out / "preprocess.json").read_text())["labels"] == ["narrow", "wide"]
    new = tmp_path / "new.csv"  # only the features, in another order, plus a stray column
    with open(new, "w", newline="") as f:
        csv.writer(f).writerows([["depth", "note", "width", "height"], [0, "x", -1, 2],
                                 [0, "y", 1, -2]])
    assert main(["predict", "--run", str(out), "--data", str(new), "--out",
                 str(tmp_path / "p.csv")]) == 0
    preds = rows(tmp_path / "p.csv")
    assert [p["prediction"] for p in preds] == ["wide", "narrow"]
    assert list(preds[0]) == ["row", "prediction", "p_narrow", "p_wide"]
    assert abs(float(preds[0]["p_narrow"]) + float(preds[0]["p_wide"]) - 1) < 1e-6

    # integers with few values: classes; --objective overrides
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 2))
    npz = tmp_path / "xy.npz"
    np.savez(npz, X=x, y=(x[:, 0] > 0).astype(int) * 3)
    capsys.readouterr()
    assert main(["train", "--data", str(npz), "--epochs", "2", "--no-progress", "--no-plot",
                 "--out", str(tmp_path / "npz")]) == 0
    assert "2 classes" in capsys.readouterr().out
    assert main(["train", "--data", str(npz), "--objective", "regression", "--epochs", "2",
                 "--no-progress", "--no-plot", "--out", str(tmp_path / "npz2")]) == 0
    assert "regression on 'y'" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("a,b,y\n1,2,3\n4,,5\n", "missing value in column 'b', row 2 (line 3)"),
    ("a,b,y\n1,2,3\n4,NA,5\n", "missing value in column 'b', row 2 (line 3)"),
    ("a,b,y\n1,2,3\n4,5,6\nred,5,6\n", "column 'a', row 3 (line 4): 'red' is not a finite number"),
    ("a,b,y\n1,2,3\n4,5\n", "row 2 (line 3) has 2 cells, the header 3"),
    ("a,b,y\n1,2,\n4,5,6\n", "missing value in the target column 'y', row 1 (line 2)"),
    ("a,b,y\n", "no data rows"),
])
def test_bad_csv_is_named_before_any_work(tmp_path, capsys, content, message):
    data, out = tmp_path / "bad.csv", tmp_path / "run"
    data.write_text(content)
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y", "--out", str(out)])
    assert message in err
    assert not out.exists() and capsys.readouterr().out == ""


def test_bad_tabular_arguments(tmp_path, capsys):
    data = tmp_path / "t.csv"
    write_table(data, n=20)
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "price"])
    assert "--target 'price' is not a column of" in err and "height, width, depth, target" in err
    assert "give --target COLUMN" in usage_error(capsys, ["train", "--data", str(data)])
    err = usage_error(capsys, ["train", "--data", str(tmp_path / "none.csv"), "--target", "y"])
    assert "cannot read it" in err
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "target",
                               "--objective", "regression", "--task", "digits"])
    assert "--task digits trains on the digits" in err
    np.savez(tmp_path / "nan.npz", X=np.array([[1.0, np.nan], [2, 3]]), y=np.array([0, 1]))
    err = usage_error(capsys, ["train", "--data", str(tmp_path / "nan.npz")])
    assert "column 'x1', row 1" in err
    err = usage_error(capsys, ["predict", "--run", str(tmp_path), "--data", str(data)])
    assert "not a run of `mithril train --data`" in err


# -- charlm -------------------------------------------------------------------------------------
CHARLM = ["train", "--task", "charlm", "--steps", "4", "--eval-every", "2", "--context", "16",
          "--d-model", "16", "--layers", "1", "--heads", "2", "--batch-size", "4",
          "--eval-windows", "4", "--sample-chars", "40", "--no-progress"]


def test_charlm_on_a_text_file(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "lm"
    assert main([*CHARLM, "--data", str(text), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sample (temperature 0.8)" in printed and "bits/char" in printed
    assert {p.name for p in out.iterdir()} == FILES | {"sample.txt"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task"] == "charlm" and summary["config"]["optimizer"] == "adamw"
    assert summary["steps"] == 4 and summary["epochs_completed"] == 2
    assert summary["bits_per_char"] == pytest.approx(summary["final"]["test_bpc"])
    assert summary["final"]["test_bpc"] == pytest.approx(summary["final"]["test_loss"] / np.log(2))
    assert len(summary["sample"]) == 40 and set(summary["sample"]) <= set(text.read_text())
    assert (out / "sample.txt").read_text(encoding="utf-8") == summary["sample"] + "\n"
    settings = summary["config"]["settings"]
    assert settings["clip_norm"] == 1.0 and settings["warmup_steps"] == 0  # 4 steps: 4 // 10
    epochs = rows(out / "epochs.csv")
    assert len(epochs) == 2 and "test_bpc" in epochs[0]


def test_charlm_default_text_with_ema(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main([*CHARLM, "--ema", "0.9", "--no-plot", "--sample-chars", "0",
                 "--out", str(out)]) == 0
    assert "pydoc_data.topics" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert "test_bpc_ema" in summary["final"] and "sample" not in summary
    assert summary["final"]["test_bpc"] < 7.5  # log2 of ~100 characters is 6.7


def test_charlm_bad_input(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "lm"
    err = usage_error(capsys, [*CHARLM, "--data", str(short), "--out", str(out)])
    assert "the text has 9 characters, fewer than one batch: --batch-size 4 × (--context 16 + 1) = 68" in err
    assert not out.exists()
    err = usage_error(capsys, [*CHARLM, "--d-model", "10", "--heads", "3"])
    assert "--d-model 10 must be divisible by --heads 3" in err
    assert "--epochs does not apply to charlm" in usage_error(capsys, [*CHARLM, "--epochs", "2"])
    err = usage_error(capsys, ["train", "--steps", "5"])
    assert "--steps does not apply to the digits job (only to charlm)" in err


def test_charlm_half_precision_with_dropout(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "lm"
    assert main([*CHARLM, "--data", str(text), "--precision", "fp16", "--dropout", "0.1",
                 "--no-plot", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["mixed_precision"] == "fp16"
    assert "loss_scale" in rows(out / "metrics.csv")[0]
    err = usage_error(capsys, [*CHARLM, "--precision", "bf16", "--mixed-precision", "fp16"])
    assert "disagree" in err
