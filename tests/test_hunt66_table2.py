"""``mithril train --data FILE.csv`` / ``mithril predict``: column names in two Unicode forms,
class labels beyond 2**53, numbers as pandas' ``read_csv`` reads them, and a stray text cell
in a numeric target."""

from __future__ import annotations

import csv
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main

TRAIN = ["--epochs", "1", "--hidden", "4", "--dtype", "float64", "--no-progress", "--no-plot"]
COMPOSED, DECOMPOSED = "caf\u00e9", "cafe\u0301"  # 'café' both ways: NFC and NFD


def write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def table(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, 2)).round(3)
    return x, (x[:, 0] > 0).astype(int)


def test_names_differing_only_in_unicode_normalisation_are_one_name(tmp_path, capsys):
    """'café' written composed (U+00E9) in the training file and decomposed ('e' + U+0301, as
    macOS and some editors write it) in the predict file, or in --target, looked identical in
    the error 'lacks the feature column(s) 'café' (the model was trained on a, café)'; names
    are matched in NFC, as unicodedata.normalize('NFC', ...) makes them equal."""
    assert unicodedata.normalize("NFC", DECOMPOSED) == COMPOSED != DECOMPOSED
    x, y = table()
    data = write_rows(tmp_path / "t.csv", ["a", COMPOSED, "y"],
                      [[*r, c] for r, c in zip(x.tolist(), y.tolist())])
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    new = write_rows(tmp_path / "p.csv", ["a", DECOMPOSED], x.tolist())
    same = write_rows(tmp_path / "q.csv", ["a", COMPOSED], x.tolist())
    for name in ("p", "q"):
        assert main(["predict", "--run", str(tmp_path / "run"), "--data",
                     str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / f"{name}-o.csv")]) == 0
    assert new.exists() and same.exists()
    assert (tmp_path / "p-o.csv").read_text() == (tmp_path / "q-o.csv").read_text()
    # --target typed in the other form
    data = write_rows(tmp_path / "u.csv", ["a", "b", COMPOSED],
                      [[*r, c] for r, c in zip(x.tolist(), y.tolist())])
    assert main(["train", "--data", str(data), "--target", DECOMPOSED, *TRAIN,
                 "--out", str(tmp_path / "run2")]) == 0
    pre = json.loads((tmp_path / "run2" / "preprocess.json").read_text(encoding="utf-8"))
    assert pre["features"] == ["a", "b"] and pre["target"] == COMPOSED


def test_integer_class_labels_beyond_2_53_are_kept_exactly(tmp_path):
    """Labels 2**53 + 1 and 2**53 + 3 (identifiers, codes) were read as floats: the classes
    were written 9007199254740992 and 9007199254740996, not the file's values, as Python's int
    (and pandas' int64 column) keeps them."""
    big = [2**53 + 1, 2**53 + 3]
    x, y = table()
    data = write_rows(tmp_path / "b.csv", ["a", "b", "y"],
                      [[*r, big[c]] for r, c in zip(x.tolist(), y.tolist())])
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    pre = json.loads((tmp_path / "run" / "preprocess.json").read_text())
    assert pre["labels"] == big
    out = tmp_path / "o.csv"
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(data),
                 "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [k for k in rows[0] if k.startswith("p_")] == [f"p_{v}" for v in big]
    assert {int(r["prediction"]) for r in rows} <= set(big)
    # the same labels from an .npz's int64 target
    np.savez(tmp_path / "b.npz", X=x, y=np.array([big[c] for c in y], dtype=np.int64))
    assert main(["train", "--data", str(tmp_path / "b.npz"), *TRAIN,
                 "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "preprocess.json").read_text())["labels"] == big


def test_a_predict_score_compares_labels_beyond_2_53_exactly(tmp_path, capsys):
    """predict counted each row of class 2**53 + 1 as 'a class the model was not trained
    on': the labels were compared as floats."""
    big = [2**53 + 1, 2**53 + 3]
    x, y = table()
    data = write_rows(tmp_path / "b.csv", ["a", "b", "y"],
                      [[*r, big[c]] for r, c in zip(x.tolist(), y.tolist())])
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(data),
                 "--out", str(tmp_path / "o.csv")]) == 0
    out = capsys.readouterr().out
    assert "not trained on" not in out
    with open(tmp_path / "o.csv") as f:
        pred = [int(r["prediction"]) for r in csv.DictReader(f)]
    acc = np.mean([p == big[c] for p, c in zip(pred, y.tolist())])
    assert f"accuracy against 'y': {acc:.2%}" in out


@pytest.mark.parametrize("cell", ["1_000", "\u0663", "\uff11\uff12"])  # ٣, full-width 12
def test_a_feature_cell_that_pandas_reads_as_text_is_not_a_number(tmp_path, capsys, cell):
    """Python's float takes '1_000', Arabic-Indic '٣' and full-width digits; pandas' read_csv
    keeps such a column as text (object), so they are refused as a feature, with the hint."""
    x, y = table()
    rows = [[*r, c] for r, c in zip(x.tolist(), y.tolist())]
    rows[3][1] = cell
    data = write_rows(tmp_path / "c.csv", ["a", "b", "y"], rows)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--target", "y", *TRAIN,
              "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert f"column 'b', row 4 (line 5): {cell!r} is not a finite number" in err
    assert "ASCII digits" in err


def test_a_target_of_digits_pandas_reads_as_text_is_refused_unless_classes(tmp_path, capsys):
    """A target of '1_000'-style cells was read as numbers (a regression); pandas reads the
    column as text. It is refused with the hint, as a decimal comma is, and --objective
    classification takes the cells as labels."""
    x, _ = table()
    target = [f"{k}_000" for k in range(len(x))]
    data = write_rows(tmp_path / "t.csv", ["a", "b", "y"],
                      [[*r, c] for r, c in zip(x.tolist(), target)])
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--target", "y", *TRAIN,
              "--out", str(tmp_path / "run")])
    assert "holds '0_000' in row 1" in capsys.readouterr().err
    labels = write_rows(tmp_path / "l.csv", ["a", "b", "y"],
                        [[*r, "\u0661" if c else "\u0660"]
                         for r, c in zip(x.tolist(), table()[1].tolist())])
    assert main(["train", "--data", str(labels), "--target", "y", *TRAIN,
                 "--objective", "classification", "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "preprocess.json").read_text())["labels"] == \
        ["\u0660", "\u0661"]


@pytest.mark.parametrize("stray", ["1.2.3", "-"])
def test_one_text_cell_in_a_numeric_target_is_warned_of(tmp_path, capsys, stray):
    """A typo in a column of 40 fractional numbers made it 40 text classes without a word; the
    rule stays (text means classes) but the run's header names the cell, its row and line."""
    x, _ = table()
    target = (x[:, 0] * 3 + 1).round(3).tolist()
    target[5] = stray
    data = write_rows(tmp_path / "e.csv", ["a", "b", "y"],
                      [[*r, c] for r, c in zip(x.tolist(), target)])
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"warning: the target 'y' is numbers but for {stray!r} in row 6 (line 7)" in out
    assert "--objective regression" in out
    # text classes are not warned of
    labels = ["cat" if v > 0 else "dog" for v in x[:, 0]]
    labels[0] = "1"
    data = write_rows(tmp_path / "l.csv", ["a", "b", "y"],
                      [[*r, c] for r, c in zip(x.tolist(), labels)])
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run2")]) == 0
    assert "is numbers but for" not in capsys.readouterr().out
