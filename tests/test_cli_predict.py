"""``mithril predict`` and the tables ``mithril train --data`` reads: a run folder whose two
files disagree, a blank target cell, a table without features, a directory given as --out.
Each ends with one named error (exit status 2) or, for a blank target, a scored prediction."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import conftest
import numpy as np
import pytest

from mithril.cli import main


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, last=True)


def write_table(path: Path, n: int = 60, seed: int = 0) -> None:
    """Columns a, b, c and a two-class text target ``species``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "species"])
        for r in x:
            w.writerow([*np.round(r, 4), "setosa" if r[0] > 0 else "virginica"])


def train(data: Path, out: Path, *hidden: str) -> None:
    assert main(["train", "--data", str(data), "--target", "species", "--epochs", "2",
                 "--hidden", *hidden, "--no-progress", "--no-plot", "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The data, a run with --hidden 8 and one with --hidden 8 8."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "iris.csv"
    write_table(data)
    train(data, root / "runA", "8")
    train(data, root / "runB", "8", "8")
    return data, root / "runA", root / "runB"


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


# -- a run folder whose files disagree ---------------------------------------------------------
def test_preprocess_of_another_network_is_a_named_error(runs, tmp_path, capsys):
    data, run_a, run_b = runs
    mixed = copy_run(run_a, tmp_path / "mixed")
    shutil.copy(run_b / "preprocess.json", mixed / "preprocess.json")  # 8 8 vs the model's 8
    err = usage_error(capsys, ["predict", "--run", str(mixed), "--data", str(data)])
    assert "model.safetensors does not fit preprocess.json" in err
    assert not (mixed / "predictions.csv").exists()


def test_unknown_activation_in_preprocess_is_a_named_error(runs, tmp_path, capsys):
    data, run_a, _ = runs
    bad = copy_run(run_a, tmp_path / "bad")
    pre = json.loads((bad / "preprocess.json").read_text())
    pre["activation"] = "swishy"
    (bad / "preprocess.json").write_text(json.dumps(pre))
    err = usage_error(capsys, ["predict", "--run", str(bad), "--data", str(data)])
    assert "preprocess.json is damaged" in err and "swishy" in err


# -- a blank target cell -------------------------------------------------------------------------
def test_blank_target_cells_are_predicted_and_left_out_of_the_score(runs, tmp_path, capsys):
    _, run_a, _ = runs
    new = tmp_path / "new.csv"
    new.write_text("a,b,c,species\n1,2,3,\n-1,0,0,virginica\n2,0,0,setosa\n")
    capsys.readouterr()
    assert main(["predict", "--run", str(run_a), "--data", str(new), "--out",
                 str(tmp_path / "p.csv")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy against 'species'" in printed
    assert "2 rows; 1 without a 'species' value left out" in printed
    with open(tmp_path / "p.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3  # the blank row is predicted too

    only_blank = tmp_path / "blank.csv"
    only_blank.write_text("a,b,c,species\n1,2,3,\n0,0,0,NA\n")
    assert main(["predict", "--run", str(run_a), "--data", str(only_blank), "--out",
                 str(tmp_path / "q.csv")]) == 0
    assert "'species' is empty in every row: no score" in capsys.readouterr().out


def test_blank_target_is_still_refused_for_training(tmp_path, capsys):
    data = tmp_path / "t.csv"
    data.write_text("a,species\n1,x\n2,\n3,y\n4,x\n")
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "species"])
    assert "missing value in the target column 'species', row 2" in err


# -- a table without features --------------------------------------------------------------------
def test_a_table_without_feature_columns_is_refused(tmp_path, capsys):
    data, out = tmp_path / "only_y.csv", tmp_path / "run"
    data.write_text("y\n" + "".join(f"{i % 2}\n" for i in range(20)))
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y", "--out", str(out)])
    assert "no feature columns" in err and str(data) in err
    assert not out.exists()
    npz = tmp_path / "empty_x.npz"
    np.savez(npz, X=np.zeros((20, 0)), y=np.arange(20) % 2)
    err = usage_error(capsys, ["train", "--data", str(npz), "--out", str(out)])
    assert "'X' has no feature columns" in err
    assert not out.exists()


# -- --out a directory ---------------------------------------------------------------------------
def test_out_directory_hint_names_a_csv(runs, tmp_path, capsys):
    data, run_a, _ = runs
    err = usage_error(capsys, ["predict", "--run", str(run_a), "--data", str(data),
                               "--out", str(tmp_path)])
    assert "is a directory; give a file name such as predictions.csv" in err
    assert "schedule.png" not in err
