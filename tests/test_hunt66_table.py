"""``mithril train --data FILE.csv`` / ``mithril predict`` on tables an ML engineer brings,
checked against scikit-learn (StandardScaler, train_test_split, sklearn.metrics)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main

TRAIN = ["--epochs", "3", "--hidden", "8", "--dtype", "float64", "--no-progress", "--no-plot"]


def write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def predictions(path: Path) -> np.ndarray:
    with open(path) as f:
        return np.array([[float(v) for k, v in r.items() if k.startswith("p_")]
                         for r in csv.DictReader(f)])


@pytest.mark.parametrize("value", [0.7, 0.1, 123.456])
def test_a_column_constant_but_for_rounding_is_left_at_zero_as_standard_scaler(
        tmp_path, value):
    """A column holding 0.7 in every training row has a NumPy standard deviation of about
    1e-16 (its mean is not exactly 0.7); it was used as the scale, so a new row with 0.75
    was standardised to ~4e14 and its prediction was garbage. StandardScaler takes such a
    column for a constant one (scale 1)."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from mithril.cli.tabular import mean_std

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 2)).round(3)
    y = (x[:, 0] > x[:, 1]).astype(int)
    data = write_rows(tmp_path / "t.csv", ["a", "b", "rate", "y"],
                      [[*r, value, c] for r, c in zip(x.tolist(), y.tolist())])
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    pre = json.loads((tmp_path / "run" / "preprocess.json").read_text())
    tr, _ = (np.sort(i) for i in train_test_split(np.arange(len(y)), test_size=0.2,
                                                   random_state=0, stratify=y))
    full = np.c_[x, np.full(len(y), value)]
    scaler = StandardScaler().fit(full[tr])
    assert pre["std"][2] == 1.0
    np.testing.assert_allclose(pre["std"], scaler.scale_, rtol=1e-14, atol=0)
    np.testing.assert_allclose(pre["mean"], scaler.mean_, rtol=1e-14, atol=0)
    mean, std = mean_std(np.full((48, 1), value))
    assert std.tolist() == [1.0] and abs(mean[0] - value) <= 1e-15 * value
    # a new value of the column moves the predictions a little, as with scikit-learn's scaling
    moved = write_rows(tmp_path / "moved.csv", ["a", "b", "rate"],
                       [[*r, value + 0.05] for r in x.tolist()])
    same = write_rows(tmp_path / "same.csv", ["a", "b", "rate"],
                      [[*r, value] for r in x.tolist()])
    for name in ("moved", "same"):
        assert main(["predict", "--run", str(tmp_path / "run"), "--data",
                     str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / f"{name}-p.csv")]) == 0
    assert moved.exists() and same.exists()
    p_moved, p_same = (predictions(tmp_path / f"{n}-p.csv") for n in ("moved", "same"))
    assert np.abs(p_moved - p_same).max() < 0.05


def test_a_regression_target_constant_but_for_rounding_has_scale_one(tmp_path):
    """The same rule for a regression target: 123.456 in each of 40 training rows was
    standardised by 1.4e-14."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 2)).round(3)
    data = write_rows(tmp_path / "r.csv", ["a", "b", "y"],
                      [[*r, 123.456] for r in x.tolist()])
    assert main(["train", "--data", str(data), "--target", "y", "--objective", "regression",
                 *TRAIN, "--out", str(tmp_path / "run")]) == 0
    pre = json.loads((tmp_path / "run" / "preprocess.json").read_text())
    assert pre["target_std"] == 1.0 and abs(pre["target_mean"] - 123.456) < 1e-12


def test_predict_rows_with_nan_outputs_are_not_the_first_class(tmp_path, capsys):
    """A feature finite in float64 but far outside the training range (1e39) overflows a float32
    model to NaN logits; predict wrote the first class (argmax of NaN) as the prediction and its
    accuracy counted the row right when the truth was that class. Now the prediction is empty and
    the row counts as wrong, as `mithril train` counts NaN logits (run_types.correct)."""
    from sklearn.metrics import accuracy_score

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 2)).round(3)
    names = np.array(["no", "yes"])[(x[:, 0] > x[:, 1]).astype(int)]
    data = write_rows(tmp_path / "t.csv", ["a", "b", "y"],
                      [[*r, c] for r, c in zip(x.tolist(), names.tolist())])
    flags = ["--epochs", "2", "--hidden", "8", "--no-progress", "--no-plot"]
    assert main(["train", "--data", str(data), "--target", "y", *flags,
                 "--out", str(tmp_path / "run")]) == 0
    new = write_rows(tmp_path / "new.csv", ["a", "b", "y"],
                     [[1e39, 0.0, "no"], [x[0, 0], x[0, 1], names[0]], [x[1, 0], x[1, 1], "no"]])
    capsys.readouterr()
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(new),
                 "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["prediction"] == "" and np.isnan(float(rows[0]["p_no"]))
    assert all(r["prediction"] in ("no", "yes") for r in rows[1:])
    truth = ["no", names[0], "no"]
    expected = accuracy_score(truth, ["<nan>", *(r["prediction"] for r in rows[1:])])
    assert f"accuracy against 'y': {expected:.2%}" in out
    assert "warning: 1 row(s) (the first: row 1) give inf/NaN outputs in float32" in out


def test_predict_ignores_repeated_names_of_columns_it_does_not_read(tmp_path, capsys):
    """predict reads the model's columns by name and ignores the others, and it did ignore one
    trailing empty column, but two (a spreadsheet's export: 'a,b,,') or two 'note' columns
    were 'duplicate column name(s)'; pandas reads such files. A repeated feature or target is
    still refused (which one to read?), and training names the unnamed column first."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2)).round(3)
    y = (x[:, 0] > 0).astype(int)
    data = write_rows(tmp_path / "t.csv", ["a", "b", "y"],
                      [[*r, c] for r, c in zip(x.tolist(), y.tolist())])
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    base = tmp_path / "base.csv"
    write_rows(base, ["a", "b"], x[:5].tolist())
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(base),
                 "--out", str(tmp_path / "base-p.csv")]) == 0
    for name, header, extra in (("empty", ["a", "b", "", ""], ["", ""]),
                                ("notes", ["note", "a", "note", "b"], None)):
        rows = [[*r, *extra] if extra else ["x", r[0], "y", r[1]] for r in x[:5].tolist()]
        f = write_rows(tmp_path / f"{name}.csv", header, rows)
        assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(f),
                     "--out", str(tmp_path / f"{name}-p.csv")]) == 0
        assert (tmp_path / f"{name}-p.csv").read_text() == (tmp_path / "base-p.csv").read_text()
    capsys.readouterr()
    twice = write_rows(tmp_path / "twice.csv", ["a", "b", "a"], [[1, 2, 3]])
    with pytest.raises(SystemExit):
        main(["predict", "--run", str(tmp_path / "run"), "--data", str(twice)])
    assert "duplicate column name(s) 'a'" in capsys.readouterr().err
    trailing = write_rows(tmp_path / "trailing.csv", ["a", "b", "y", "", ""],
                          [[*r, c, "", ""] for r, c in zip(x.tolist(), y.tolist())])
    with pytest.raises(SystemExit):
        main(["train", "--data", str(trailing), "--target", "y", *TRAIN,
              "--out", str(tmp_path / "bad")])
    assert "column 4 has no name in the header row" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_numbers_quoted_after_a_space_get_the_quote_hint(tmp_path, capsys):
    """'1, "3.5"' (a separator ', ' with quoted numbers): Python's csv, as pandas, keeps the
    quotes of a cell that does not open with one, so the target '"3.5"' was text and the run
    trained silently one class per value; a feature got 'encode a text column first'."""
    lines = ["a, b, y", *(f'{i}, {i % 3}, "{i + 0.5}"' for i in range(20))]
    data = tmp_path / "q.csv"
    data.write_text("\n".join(lines) + "\n")
    # Python's csv reads these cells so: the quotes stay (pandas' read_csv too)
    assert list(csv.reader(lines[1:2])) == [["0", " 0", ' "0.5"']]
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--target", "y", *TRAIN,
              "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "the target 'y' holds '\"0.5\"' in row 1: a space before an opening quote?" in err
    assert not (tmp_path / "run").exists()
    data.write_text('a, b, y\n1, "2", 0\n')
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--target", "y", *TRAIN])
    assert "column 'b', row 1 (line 2): '\"2\"' is not a finite number (a space before an " \
           "opening quote?" in capsys.readouterr().err


def test_predict_ignores_repeated_feature_names_it_does_not_read_in_an_npz(tmp_path, capsys):
    """The same for an .npz: its columns are picked by feature_names, and a repeated name of a
    column the model does not use was refused."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2))
    y = (x[:, 0] > 0).astype(int)
    np.savez(tmp_path / "t.npz", X=x, y=y, feature_names=np.array(["a", "b"]))
    assert main(["train", "--data", str(tmp_path / "t.npz"), *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    np.savez(tmp_path / "base.npz", X=x[:5], feature_names=np.array(["a", "b"]))
    extra = np.c_[np.zeros(5), x[:5, 1], np.ones(5), x[:5, 0]]
    np.savez(tmp_path / "extra.npz", X=extra, feature_names=np.array(["id", "b", "id", "a"]))
    for name in ("base", "extra"):
        assert main(["predict", "--run", str(tmp_path / "run"), "--data",
                     str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"{name}.csv")]) == 0
    assert (tmp_path / "extra.csv").read_text() == (tmp_path / "base.csv").read_text()
    np.savez(tmp_path / "twice.npz", X=extra, feature_names=np.array(["a", "b", "id", "a"]))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "twice.npz")])
    assert "duplicate feature name(s) 'a'" in capsys.readouterr().err


def test_a_target_name_quoted_after_a_space_is_pointed_at(tmp_path, capsys):
    """A header 'a, "b", "y"' keeps the quotes in the names; --target y was 'not a column'
    with no hint why (the list shows '"y"')."""
    data = tmp_path / "q.csv"
    data.write_text('a, "b", "y"\n1,2,0\n3,4,1\n')
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--target", "y", *TRAIN])
    err = capsys.readouterr().err
    assert "--target 'y' is not a column of" in err
    assert "the header has '\"y\"': a space before an opening quote?" in err


def test_blank_lines_above_the_header_are_skipped(tmp_path, capsys):
    """Blank lines are skipped (the docs; pandas' skip_blank_lines), but one above the header
    made the whole file 'empty file, or no header row', in train and predict."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 2)).round(3)
    y = (x[:, 0] > 0).astype(int)
    body = "a,b,y\r\n" + "".join(f"{p},{q},{c}\r\n" for (p, q), c in zip(x.tolist(), y))
    plain, lead = tmp_path / "plain.csv", tmp_path / "lead.csv"
    plain.write_bytes(body.encode())
    lead.write_bytes(("\r\n  \r\n" + body).encode())
    for name in ("plain", "lead"):
        assert main(["train", "--data", str(tmp_path / f"{name}.csv"), "--target", "y", *TRAIN,
                     "--out", str(tmp_path / f"run-{name}")]) == 0
        assert main(["predict", "--run", str(tmp_path / "run-plain"), "--data",
                     str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / f"p-{name}.csv")]) == 0
    assert (tmp_path / "run-lead" / "metrics.csv").read_text() == \
        (tmp_path / "run-plain" / "metrics.csv").read_text()
    assert (tmp_path / "p-lead.csv").read_text() == (tmp_path / "p-plain.csv").read_text()
    # the lines named count the blank ones
    bad = tmp_path / "bad.csv"
    bad.write_text("\n\na,b,y\n1,2,0\n3,x,1\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(bad), "--target", "y", *TRAIN])
    assert "column 'b', row 2 (line 5): 'x' is not a finite number" in capsys.readouterr().err
    bad.write_text("\n  \n")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(bad), "--target", "y", *TRAIN])
    assert "empty file, or no header row" in capsys.readouterr().err


def test_a_trailing_comma_on_the_data_rows_is_named(tmp_path, capsys):
    """Data rows ending with a separator the header lacks (some exports write one): pandas
    then takes the first column for the index and shifts every name silently; refused here,
    and now the message says what the extra cell is."""
    data = tmp_path / "t.csv"
    data.write_text("a,b,y\n1,2,0,\n3,4,1,\n")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--target", "y", *TRAIN,
              "--out", str(tmp_path / "run")])
    assert "row 1 (line 2) has 4 cells, the header 3 (its last is empty: a trailing comma " \
           "ends the data rows? remove it)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    data = tmp_path / "t.tsv"
    data.write_text("a\tb\ty\n1\t2\t0\t\n")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--target", "y", *TRAIN])
    assert "has 4 cells, the header 3 (its last is empty: a trailing tab" in \
        capsys.readouterr().err


def test_predict_names_a_non_finite_regression_truth_instead_of_calling_it_text(tmp_path, capsys):
    """A regression target cell 'inf' in the predicted file said "'y' holds text: no RMSE"."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2)).round(3)
    data = write_rows(tmp_path / "t.csv", ["a", "b", "y"],
                      [[p, q, round(2 * p - q + 0.5, 3)] for p, q in x.tolist()])
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    for cell, what in (("inf", "a number that is not finite, 'inf'"), ("big", "text, 'big'")):
        new = write_rows(tmp_path / "new.csv", ["a", "b", "y"], [[0.1, 0.2, 1.0], [0, 0, cell]])
        capsys.readouterr()
        assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(new)]) == 0
        assert f"('y' holds {what}: no RMSE)" in capsys.readouterr().out


def test_nan_features_of_an_npz_are_counted_per_column_with_the_fix(tmp_path, capsys):
    """The docs: a missing feature is refused, counted per column first, and the message says
    what to do (--impute mean). An .npz with NaN said only 'missing or non-finite value in
    column ..., row ...' (no count, no --impute)."""
    x = np.arange(24.0).reshape(8, 3)
    x[1, 0] = x[2, 0] = x[5, 2] = np.nan
    y = np.array([0, 1] * 4)
    np.savez(tmp_path / "nan.npz", X=x, y=y, feature_names=np.array(["a", "b", "c"]))
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path / "nan.npz"), *TRAIN,
              "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "3 missing values (empty, NA, NaN, ...) in 'a' (2), 'c' (1)" in err
    assert "give --impute mean" in err and "The first: missing value in column 'a', row 2" in err
    assert not (tmp_path / "run").exists()
    # with --impute mean it trains (SimpleImputer's means); an inf is still refused, named
    assert main(["train", "--data", str(tmp_path / "nan.npz"), *TRAIN, "--impute", "mean",
                 "--out", str(tmp_path / "run")]) == 0
    x[3, 1] = -np.inf
    np.savez(tmp_path / "inf.npz", X=x, y=y, feature_names=np.array(["a", "b", "c"]))
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path / "inf.npz"), *TRAIN])
    assert "missing or non-finite value in column 'b', row 4 (-inf)" in capsys.readouterr().err
