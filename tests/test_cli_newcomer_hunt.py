"""``mithril train --data`` / ``predict`` / ``--resume`` as a newcomer from Keras, scikit-learn
or torch tries them on messy files of their own, following the docs as written: Excel's
``#N/A`` and pandas' other missing-value markers, numbers written with commas in the target,
a ``--target`` given as a position or in the wrong case, an ``.npz`` saved from pandas' object
columns, an unclosed quote in a long file, and the documented checkpoint-and-resume example."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import conftest
import numpy as np
import pytest

from mithril.cli import main

QUICK = ["--hidden", "4", "--no-progress", "--no-plot"]


def houses(path: Path, n: int = 120, seed: int = 3, price=None) -> Path:
    """``rooms, area, price``: a regression table (``price`` formatted by ``price(i, p)``)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rooms", "area", "price"])
        for i in range(n):
            a, b = rng.uniform(1, 6), rng.uniform(30, 200)
            p = 1000 * b + 5000 * a + rng.normal() * 100
            w.writerow([round(a, 1), round(b, 1), price(i, p) if price else round(p)])
    return path


def losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


# -- checkpoint and resume, as docs/cli-train.md and `train --help` show it ---------------------

@pytest.mark.parametrize("schedule", [["plateau"], ["step", "--step-size", "5"]])
def test_the_documented_resume_example_continues_the_run(tmp_path, schedule):
    """The docs' example (``--checkpoint`` then ``--resume --epochs`` larger) used the default
    cosine schedule, which a resume refuses to stretch: with the schedule it now names, the
    resumed run is the uninterrupted one, step for step."""
    data = houses(tmp_path / "houses.csv")
    args = ["--data", str(data), "--target", "price", "--scheduler", *schedule, *QUICK]
    assert main(["train", *args, "--epochs", "2", "--checkpoint",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--resume", str(tmp_path / "a"), "--epochs", "4", *QUICK[2:]]) == 0
    assert main(["train", *args, "--epochs", "4", "--out", str(tmp_path / "b")]) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 4 * 2 and a == b
    fa = json.loads((tmp_path / "a" / "summary.json").read_text())["final"]
    fb = json.loads((tmp_path / "b" / "summary.json").read_text())["final"]
    assert fa == fb


def test_a_resume_refused_for_a_default_step_schedule_names_the_fix(tmp_path, capsys):
    """``--scheduler step`` without ``--step-size`` is sized to the run (a third of it): the
    refusal used to recommend exactly that ("e.g. step or exponential")."""
    data = houses(tmp_path / "houses.csv")
    assert main(["train", "--data", str(data), "--target", "price", "--scheduler", "step",
                 "--epochs", "3", "--checkpoint", "--out", str(tmp_path / "a"), *QUICK]) == 0
    capsys.readouterr()
    err = conftest.usage_error(capsys, ["train", "--resume", str(tmp_path / "a"), "--epochs",
                                        "6", *QUICK[2:]], last=True)
    assert "the defaults of step, multistep and exponential" in err
    assert "--scheduler step --step-size 100" in err and "keep --epochs 3" in err
    assert "e.g. step or exponential" not in err


# -- missing values and numbers the way spreadsheets write them --------------------------------

@pytest.mark.parametrize("marker", ["#N/A", "-nan", "<NA>", "None", "#NA", "1.#QNAN"])
def test_pandas_missing_markers_in_the_target_are_missing_not_a_class(tmp_path, capsys, marker):
    """Excel writes ``#N/A`` in a numeric column: read as text it made the whole target text,
    and a price column silently became a classifier of one class per price (pandas' read_csv
    reads these markers as NaN)."""
    data = houses(tmp_path / "h.csv", n=60, price=lambda i, p: marker if i == 7 else round(p))
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "price",
                                        "--dry-run", *QUICK], last=True)
    assert err.endswith(f"--data {data}: missing value in the target column 'price', "
                        f"row 8 (line 9)")


def test_pandas_missing_markers_in_a_feature_are_named_missing(tmp_path, capsys):
    data = houses(tmp_path / "h.csv", n=20)
    rows = data.read_text().splitlines()
    rows[4] = "#N/A" + rows[4][rows[4].index(","):]
    data.write_text("\n".join(rows) + "\n")
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "price",
                                        "--dry-run", *QUICK], last=True)
    assert err.endswith("missing value in column 'rooms', row 4 (line 5)")


def test_predict_leaves_a_na_target_out_of_the_score(tmp_path, capsys):
    """At predict the target is optional: ``#N/A`` there is a row predicted, not scored (it
    used to turn the whole column to text: 'no RMSE')."""
    data = houses(tmp_path / "h.csv", n=60)
    assert main(["train", "--data", str(data), "--target", "price", "--epochs", "1",
                 "--out", str(tmp_path / "run"), *QUICK]) == 0
    new = houses(tmp_path / "new.csv", n=10, seed=5,
                 price=lambda i, p: "#N/A" if i < 3 else round(p))
    capsys.readouterr()
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(new)]) == 0
    out = capsys.readouterr().out
    assert "(7 rows; 3 without a 'price' value left out)" in out and "RMSE" in out


@pytest.mark.parametrize("text", ["{:,.0f}", "{:.1f}"])
def test_a_target_of_numbers_with_commas_is_refused_not_one_class_each(tmp_path, capsys, text):
    """``"102,097"`` (digit grouping) or ``3,5`` (a decimal comma) in the target: every value
    was text, so a regression target trained a classifier with a class per row, with only a
    warning about unseen test classes. Features already got this hint."""
    def fmt(i, p):
        s = text.format(p)
        return s if "," in s else s.replace(".", ",")

    data = houses(tmp_path / "h.csv", n=60, price=fmt)
    first = next(csv.DictReader(open(data)))["price"]
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "price",
                                        "--dry-run", *QUICK], last=True)
    assert f"the target 'price' holds {first!r} in row 1: a decimal comma, or commas " \
           f"grouping digits?" in err
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "price",
                                        "--objective", "regression", "--dry-run", *QUICK],
                               last=True)
    assert f"non-numeric value {first!r} in row 1 (a decimal comma" in err
    # asked for, they are labels: one class per distinct value, as a scikit-learn classifier
    assert main(["train", "--data", str(data), "--target", "price", "--objective",
                 "classification", "--dry-run", *QUICK]) == 0
    classes = len({r["price"] for r in csv.DictReader(open(data))})
    assert f"{classes} classes" in capsys.readouterr().out


def test_a_categorical_target_with_commas_in_its_labels_still_trains(tmp_path, capsys):
    """Labels that are text, some with commas ('small, cheap'), are classes as before."""
    data = houses(tmp_path / "h.csv", n=40,
                  price=lambda i, p: "small, cheap" if p < 120000 else "large")
    assert main(["train", "--data", str(data), "--target", "price", "--dry-run", *QUICK]) == 0
    assert "2 classes" in capsys.readouterr().out


# -- naming the target ---------------------------------------------------------------------------

@pytest.mark.parametrize("target, hint", [
    ("PRICE", "did you mean 'price'? (names are case-sensitive)"),
    (" price ", "did you mean 'price'?"),
    ("2", "--target takes a column's name from the header row, not its position (the last "
          "column is 'price')"),
    ("-1", "--target takes a column's name from the header row, not its position"),
])
def test_a_target_given_by_position_or_in_another_case_is_pointed_to(tmp_path, capsys, target,
                                                                      hint):
    data = houses(tmp_path / "h.csv", n=10)
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", target,
                                        "--dry-run", *QUICK], last=True)
    assert f"--target {target!r} is not a column of {data} (columns: rooms, area, price); " \
           f"{hint}" in err


def test_an_unknown_target_without_a_near_name_gets_no_guess(tmp_path, capsys):
    data = houses(tmp_path / "h.csv", n=10)
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "cost",
                                        "--dry-run", *QUICK], last=True)
    assert err.endswith("(columns: rooms, area, price)")


# -- files from pandas and spreadsheets ------------------------------------------------------------

def test_an_npz_of_object_arrays_names_the_array_and_the_fix(tmp_path, capsys):
    """``np.savez(..., y=df['label'].to_numpy())`` saves dtype object, which loads only with
    pickle: the error named no array and gave no fix."""
    x = np.random.default_rng(0).standard_normal((10, 2))
    np.savez(tmp_path / "t.npz", X=x, y=np.array(["a", "b"] * 5, dtype=object))
    err = conftest.usage_error(capsys, ["train", "--data", str(tmp_path / "t.npz"),
                                        "--dry-run", *QUICK], last=True)
    assert "the array 'y' holds Python objects" in err and "save y.astype(str)" in err
    # the fix it names trains, with the same classes
    np.savez(tmp_path / "t.npz", X=x, y=np.array(["a", "b"] * 5, dtype=object).astype(str))
    assert main(["train", "--data", str(tmp_path / "t.npz"), "--dry-run", *QUICK]) == 0
    assert "2 classes" in capsys.readouterr().out


def test_an_unclosed_quote_in_a_long_file_is_named(tmp_path, capsys):
    """Past 128 KiB the csv module stops at its field limit, not at the end of the file: the
    message named the line but not the likely cause."""
    data = tmp_path / "q.csv"
    data.write_text('a,b,y\n1,2,0\n3,"4,1\n' + "".join(f"{i},{i},1\n" for i in range(30000)))
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "y",
                                        "--dry-run", *QUICK], last=True)
    assert err.endswith("line 3: not a readable CSV row (field larger than field limit "
                        "(131072); a quote opened on this line is never closed?)")


# -- predict's score against the data's own target column -------------------------------------

def labelled(path: Path, labels: list[str], n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "y"])
        w.writerows([[*rng.standard_normal(2).round(3), labels[i % len(labels)]]
                     for i in range(n)])
    return path


def scored(capsys, run: Path, data: Path, out: Path) -> tuple[str, list[str], list[str]]:
    """predict's accuracy line, its predictions and the data's target column."""
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "accuracy" in x)
    with open(out, newline="") as f:
        pred = [r["prediction"] for r in csv.DictReader(f)]
    with open(data, newline="") as f:
        truth = [r["y"] for r in csv.DictReader(f)]
    return line, pred, truth


def test_text_labels_that_look_like_numbers_are_scored_as_written(tmp_path, capsys):
    """A model of the text classes '1.0', '2.50', 'x': a file to predict whose target holds
    only '1.0' and '2.50' was read as the numbers 1 and 2.5, which matched no label: 0%
    accuracy whatever the predictions. scikit-learn's accuracy_score on the same strings is
    the reference."""
    from sklearn.metrics import accuracy_score

    train = labelled(tmp_path / "t.csv", ["1.0", "x", "2.50"], 60, 0)
    assert main(["train", "--data", str(train), "--target", "y", "--epochs", "30", "--lr",
                 "0.05", "--out", str(tmp_path / "run"), *QUICK]) == 0
    new = labelled(tmp_path / "new.csv", ["1.0", "2.50"], 20, 1)
    line, pred, truth = scored(capsys, tmp_path / "run", new, tmp_path / "p.csv")
    want = accuracy_score(truth, pred)
    assert 0 < want and line.endswith(f"accuracy against 'y': {want:.2%}")


def test_number_labels_are_scored_as_numbers(tmp_path, capsys):
    """Integer classes 0/1 against a target written 0.0/1.0 (a float column saved by
    pandas): the same classes."""
    from sklearn.metrics import accuracy_score

    train = labelled(tmp_path / "t.csv", ["0", "1"], 60, 0)
    assert main(["train", "--data", str(train), "--target", "y", "--epochs", "30", "--lr",
                 "0.05", "--out", str(tmp_path / "run"), *QUICK]) == 0
    new = labelled(tmp_path / "new.csv", ["0.0", "1.0"], 20, 1)
    line, pred, truth = scored(capsys, tmp_path / "run", new, tmp_path / "p.csv")
    want = accuracy_score([float(t) for t in truth], [float(p) for p in pred])
    assert 0 < want < 1 and line.endswith(f"accuracy against 'y': {want:.2%}")


def test_rows_of_classes_the_model_never_saw_are_counted_wrong_and_named(tmp_path, capsys):
    """As scikit-learn's accuracy_score, a row of an unseen class counts as wrong; the line
    now says so instead of leaving a low accuracy unexplained."""
    from sklearn.metrics import accuracy_score

    train = labelled(tmp_path / "t.csv", ["yes", "no"], 40, 0)
    assert main(["train", "--data", str(train), "--target", "y", "--epochs", "2",
                 "--out", str(tmp_path / "run"), *QUICK]) == 0
    new = labelled(tmp_path / "new.csv", ["yes", "maybe", "no", "perhaps"], 12, 1)
    line, pred, truth = scored(capsys, tmp_path / "run", new, tmp_path / "p.csv")
    assert line == (f"accuracy against 'y': {accuracy_score(truth, pred):.2%} (6 row(s) of "
                    f"class(es) the model was not trained on, 'maybe', 'perhaps': counted as "
                    f"wrong)")


# -- flags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["train", "compare"])
def test_float64_with_mixed_precision_is_refused_not_dropped(tmp_path, capsys, cmd):
    """``--mixed-precision bf16 --dtype float64`` trained with float32 masters in bfloat16
    while summary.json recorded dtype float64."""
    err = conftest.usage_error(capsys, [cmd, "--mixed-precision", "bf16", "--dtype", "float64",
                                        "--epochs", "1", "--dry-run", "--no-plot",
                                        "--out", str(tmp_path / "r")], last=True)
    assert err.endswith("--dtype float64 does not apply with --mixed-precision bf16 (float32 "
                        "master weights, computing in bf16); give one of them")
    assert not (tmp_path / "r").exists()


def test_plot_schedule_does_not_write_over_a_csv_of_yours_beside_its_out(tmp_path, capsys):
    """``--out data.png`` wrote the values to ``data.csv`` beside it, silently replacing the
    user's training table there; a values CSV of an earlier plot is replaced as before."""
    data = houses(tmp_path / "data.csv", n=5)
    before = data.read_bytes()
    err = conftest.usage_error(capsys, ["plot-schedule", "--steps", "10", "--out",
                                        str(tmp_path / "data.png")], last=True)
    assert f"the values go beside it to {tmp_path / 'data.csv'}, which exists and is not a " \
           f"schedule of this command" in err
    assert data.read_bytes() == before and not (tmp_path / "data.png").exists()
    out = tmp_path / "cos.png"
    for steps in (10, 4):  # the second replaces the first's values
        assert main(["plot-schedule", "--steps", str(steps), "--lr", "0.5",
                     "--out", str(out)]) == 0
    with open(out.with_suffix(".csv"), newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    import torch  # the values are torch's CosineAnnealingLR over the 4 steps

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    want = []
    for _ in range(4):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=1e-15)


def test_a_headerless_file_with_a_text_label_is_refused_not_read_without_its_first_row(
        tmp_path, capsys):
    """UCI's iris.data saved as .csv: no header, four measurements and a text class. Its first
    row was taken for the column names (the all-numbers check missed the text cell), so a
    ``--target Iris-setosa`` trained on one row fewer, with measurements for feature names.
    A header of whole numbers (pandas' default columns 0, 1, 2) is still a header."""
    rng = np.random.default_rng(0)
    rows = [[*rng.uniform(4, 7, 4).round(1), ["Iris-setosa", "Iris-virginica"][i % 2]]
            for i in range(30)]
    data = tmp_path / "iris.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "Iris-setosa",
                                        "--dry-run", *QUICK], last=True)
    assert err.endswith(f"line 1 holds numbers such as {str(rows[0][0])!r} "
                        f"({', '.join(map(str, rows[0]))}), and 'Iris-setosa' is a value of its "
                        f"column too: the file has no header row? Add one naming the columns "
                        f"(--target names one of them)")
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([["0", "1", "2", "3", "label"], *rows])
    assert main(["train", "--data", str(data), "--target", "label", "--dry-run", *QUICK]) == 0
    assert "rows of 30, 4 features, 2 classes" in capsys.readouterr().out
    # spectra: wavelengths for column names, a numeric target: a header
    spectra = tmp_path / "nir.csv"
    with open(spectra, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["908.1", "909.7", "911.3", "protein"])
        w.writerows([[*rng.uniform(0, 1, 3).round(3), round(float(rng.uniform(8, 14)), 2)]
                     for _ in range(20)])
    assert main(["train", "--data", str(spectra), "--target", "protein", "--dry-run",
                 *QUICK]) == 0
    assert "rows of 20, 3 features, regression on 'protein'" in capsys.readouterr().out


def test_resuming_a_run_whose_data_moved_says_to_give_it_again(tmp_path, capsys, monkeypatch):
    """The run's ``--data`` is kept as typed (relative to where it was trained): resumed
    after the file moved, or from another folder, the error named a flag not given
    ("--data h.csv: cannot read it"). ``--data NEW`` resumes it, as the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    houses(tmp_path / "h.csv", n=60)
    args = ["--target", "price", "--scheduler", "none", *QUICK]
    assert main(["train", "--data", "h.csv", *args, "--epochs", "1", "--checkpoint",
                 "--out", "a"]) == 0
    assert main(["train", "--data", "h.csv", *args, "--epochs", "2", "--out", "b"]) == 0
    (tmp_path / "h.csv").rename(tmp_path / "moved.csv")
    err = conftest.usage_error(capsys, ["train", "--resume", "a", "--epochs", "2", *QUICK[2:]],
                               last=True)
    assert err.endswith("--resume a: the run's data file h.csv is not there (moved or renamed, "
                        "or a path relative to the folder it was trained from?); give it with "
                        "--data FILE (its content is checked against the run's)")
    assert main(["train", "--resume", "a", "--epochs", "2", "--data", "moved.csv",
                 *QUICK[2:]]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.parametrize("arrays, hint", [
    ({"X": np.arange(10.0), "y": np.arange(10) % 2},
     "'X' must be a 2-d array of numbers, got float64 (10,) (one feature: save "
     "X.reshape(-1, 1), as scikit-learn asks)"),
    ({"x": np.zeros((10, 2)), "y": np.arange(10) % 2},
     "no array 'X' (it holds x, y); save the features as X, e.g. np.savez(path, X=x, y=...)"),
    ({"x_train": np.zeros((10, 2)), "y_train": np.arange(10) % 2},
     "no array 'X' (it holds x_train, y_train); save the features as X, e.g. "
     "np.savez(path, X=x_train, y=...)"),
])
def test_npz_layouts_of_keras_and_numpy_users_get_the_fix(tmp_path, capsys, arrays, hint):
    np.savez(tmp_path / "t.npz", **arrays)
    err = conftest.usage_error(capsys, ["train", "--data", str(tmp_path / "t.npz"),
                                        "--dry-run", *QUICK], last=True)
    assert err.endswith(f"--data {tmp_path / 't.npz'}: {hint}")


def test_predict_names_a_feature_column_in_another_case(tmp_path, capsys):
    data = houses(tmp_path / "h.csv", n=30)
    assert main(["train", "--data", str(data), "--target", "price", "--epochs", "1",
                 "--out", str(tmp_path / "run"), *QUICK]) == 0
    new = tmp_path / "new.csv"
    new.write_text(data.read_text().replace("rooms,area", "Rooms,area", 1))
    err = conftest.usage_error(capsys, ["predict", "--run", str(tmp_path / "run"), "--data",
                                        str(new)], last=True)
    assert err.endswith("lacks the feature column(s) 'rooms' (the model was trained on rooms, "
                        "area); the file has 'Rooms' for 'rooms' (names are case-sensitive)")


def test_a_dry_run_refuses_the_out_the_run_would_refuse(tmp_path, capsys):
    """``--dry-run`` said "would ... write to data.csv" for an --out that is a file (the run
    then refused it): it checks the same, and still creates nothing."""
    data = houses(tmp_path / "h.csv", n=30)
    assert main(["train", "--data", str(data), "--target", "price", "--epochs", "1",
                 "--out", str(tmp_path / "run"), *QUICK]) == 0
    cases = [
        (["train", "--data", str(data), "--target", "price", "--out", str(data)],
         f"--out {data}: exists and is not a directory"),
        (["train", "--data", str(data), "--target", "price", "--out", str(data / "sub")],
         f"--out {data / 'sub'}: cannot write there ("),  # (the OS's words, or the file)
        (["compare", "--epochs", "1", "--out", str(data)],
         f"--out {data}: exists and is not a directory"),
        (["predict", "--run", str(tmp_path / "run"), "--data", str(data), "--out",
          str(tmp_path / "run")],
         f"--out {tmp_path / 'run'}: is a directory; give a file name such as predictions.csv"),
    ]
    for argv, message in cases:
        for dry in ([], ["--dry-run"]):  # the run and its dry run say the same
            extra = ["--no-plot"] if argv[0] != "predict" else []
            err = conftest.usage_error(capsys, [*argv, *dry, *extra], last=True)
            assert message in err and err.index(message) == err.index("--out"), (argv, dry)
    new = tmp_path / "new" / "deeper"
    assert main(["train", "--data", str(data), "--target", "price", "--out", str(new),
                 "--dry-run", *QUICK]) == 0
    assert not (tmp_path / "new").exists()


def test_whole_number_targets_taken_for_classes_say_how_to_regress(tmp_path, capsys):
    """An age or a count with at most 20 distinct values is taken for classes (as
    scikit-learn's type_of_target calls it multiclass); the header now says so, and how to
    predict a number instead. Two classes (0/1, -1/1) need no note."""
    from sklearn.utils.multiclass import type_of_target

    data = houses(tmp_path / "h.csv", n=40, price=lambda i, p: 20 + i % 7)
    ages = [float(r["price"]) for r in csv.DictReader(open(data))]
    assert type_of_target(np.array(ages)) == "multiclass"
    assert main(["train", "--data", str(data), "--target", "price", "--dry-run", *QUICK]) == 0
    assert "7 classes (its 7 distinct whole numbers taken for classes; --objective regression " \
           "predicts a number)" in capsys.readouterr().out
    binary = houses(tmp_path / "b.csv", n=40, price=lambda i, p: i % 2)
    assert main(["train", "--data", str(binary), "--target", "price", "--dry-run", *QUICK]) == 0
    assert "2 classes;" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["${:.2f}", "{:.0f} €", "{:,.0f}%", "{:,.0f}"])
def test_a_target_with_currency_percent_or_spaces_is_refused_not_one_class_each(
        tmp_path, capsys, fmt):
    """'$77399.02', '77399 €', '16.6%', '201 838' (a no-break space grouping digits, as
    French spreadsheets write): text, so one class per row, as with commas."""
    def written(i, p):
        s = fmt.format(p)
        return s.replace(",", "\u00a0") if fmt == "{:,.0f}" else s.replace(",", "")

    data = houses(tmp_path / "h.csv", n=40, price=written)
    first = next(csv.DictReader(open(data, encoding="utf-8")))["price"]
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "price",
                                        "--dry-run", *QUICK], last=True)
    assert err.endswith(f"the target 'price' holds {first!r} in row 1: a currency or percent "
                        f"sign, or spaces grouping digits? Numbers are read plain, e.g. 1234.5 "
                        f"(--objective classification takes such values as class labels)")


def test_a_feature_with_a_currency_sign_gets_the_number_hint_not_get_dummies(tmp_path, capsys):
    data = tmp_path / "f.csv"
    data.write_text("rooms,cost,y\n1,$5,0\n2,$6,1\n")
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "y",
                                        "--dry-run", *QUICK], last=True)
    assert err.endswith("column 'cost', row 1 (line 2): '$5' is not a finite number (a currency "
                        "or percent sign, or spaces grouping digits? Numbers are read plain, "
                        "e.g. 1234.5)")


@pytest.mark.parametrize("sep", [";", ","])
def test_excels_sep_line_is_named(tmp_path, capsys, sep):
    """Excel may write a first line ``sep=;`` naming the separator: it was read as the header
    (and, for ';', got the semicolon hint only)."""
    data = tmp_path / "x.csv"
    data.write_text(f"sep={sep}\n" + f"a{sep}b{sep}y\n1{sep}2{sep}0\n")
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "y",
                                        "--dry-run", *QUICK], last=True)
    assert f"line 1 is Excel's 'sep={sep}' line, not a header: remove it (and separate the " \
           f"cells by commas)" in err
