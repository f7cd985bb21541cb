"""``mithril train --data`` / ``mithril predict`` on the files users really have: blank
lines, an unclosed quote, an ``inf`` target, an ``.npz`` that is not one (an ``.npy``
renamed, a truncated or empty file), bytes strings, values too large to square, and a run
folder whose files were edited or damaged. Each is either read correctly or refused with one
named error (exit status 2, no traceback) that leaves nothing on disk."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import conftest
import numpy as np
import pytest

from mithril.cli import main

TRAIN = ["--epochs", "1", "--hidden", "4", "--no-progress", "--no-plot"]


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, last=True)


def write_rows(path: Path, rows: list[list], header: tuple[str, ...] = ("a", "b", "y")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def table_rows(n: int = 24, seed: int = 0, big: float = 1.0) -> list[list]:
    """Two features (the second times ``big``) and a two-class integer target."""
    x = np.random.default_rng(seed).standard_normal((n, 2))
    return [[float(a), float(b) * big, int(a > 0)] for a, b in x]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A CSV and a run trained on it."""
    root = tmp_path_factory.mktemp("user_data")
    data = write_rows(root / "t.csv", table_rows())
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(root / "run")]) == 0
    return data, root / "run"


# -- CSV -----------------------------------------------------------------------------------------
def test_blank_lines_do_not_count_as_data_rows(tmp_path, capsys):
    # the docs count data rows from 1 after the header; blank lines used to be counted too
    data = tmp_path / "blank.csv"
    data.write_text("a,b,y\n1,2,0\n\n  \n3,x,1\n")
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y",
                               "--out", str(tmp_path / "run")])
    assert "column 'b', row 2 (line 5): 'x' is not a finite number" in err
    assert not (tmp_path / "run").exists()


def test_a_line_of_spaces_is_a_blank_line(tmp_path):
    rows = table_rows()
    data = tmp_path / "spaces.csv"
    data.write_text("a,b,y\n" + "".join(f"{a},{b},{y}\n   \n" for a, b, y in rows))
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(data)]) == 0
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        assert [int(r["row"]) for r in csv.DictReader(f)] == list(range(1, len(rows) + 1))


def test_an_unclosed_quote_is_refused_not_merged_into_one_cell(tmp_path, capsys):
    # csv's lenient mode read the rest of the file into the quoted cell (rows silently lost)
    rows = "".join(f"{a},{b},{y}\n" for a, b, y in table_rows())
    data = tmp_path / "quote.csv"
    data.write_text('a,b,y\n1,2,0\n3,4,"1\n' + rows)
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y",
                               "--out", str(tmp_path / "run")])
    assert f"--data {data}: line 3: not a readable CSV row" in err
    assert "a quoted cell is never closed" in err
    assert not (tmp_path / "run").exists()
    data.write_text('a,b,y\n1,2,0\n3,4,"1" \n' + rows)
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y"])
    assert "line 3: not a readable CSV row" in err and "follows a closing quote" in err


def test_a_latin1_file_names_the_line(tmp_path, capsys):
    # the decoder's position is inside a read buffer: the message named no line of the file
    data = tmp_path / "latin1.csv"
    rows = "".join(f"{a},{b},{y}\n" for a, b, y in table_rows(n=400))
    data.write_bytes(b"a,b,y\n" + rows.encode() + "1,2,café\n".encode("latin-1"))
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y"])
    assert f"--data {data}: line 402: byte b'\\xe9' is not UTF-8 text" in err
    data.write_bytes("a,y\n1,0\n".encode("utf-16"))
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y"])
    assert "the file is UTF-16 text; save it as UTF-8" in err


def test_an_unnamed_column_is_refused_not_trained_on(tmp_path, capsys):
    # pandas' to_csv() writes the row index as a column without a name: it became a feature
    # named '' (the row number: a leak into the model)
    data = tmp_path / "pandas.csv"
    data.write_text(",a,b,y\n" + "".join(f"{i},{a},{b},{y}\n"
                                         for i, (a, b, y) in enumerate(table_rows())))
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y",
                               "--out", str(tmp_path / "run")])
    assert "column 1 has no name in the header row" in err and "index=False" in err
    assert not (tmp_path / "run").exists()


def test_an_infinite_target_is_named_not_taken_for_a_label(tmp_path, capsys):
    # 'inf' made the numeric target text, so the run became a classification of its values
    rows = [[a, b, round(a * 3 + b, 3)] for a, b, _ in table_rows()]
    rows[4][2] = "inf"
    data = write_rows(tmp_path / "inf.csv", rows)
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y",
                               "--out", str(tmp_path / "run")])
    assert "target column 'y', row 5 (line 6): 'inf' is not a finite number" in err


def test_huge_values_are_standardised_and_predicted(tmp_path):
    # the squares overflowed: std inf (the column silently zeroed), written as "inf" to
    # preprocess.json, and predict then failed with a traceback
    data = write_rows(tmp_path / "big.csv", table_rows(big=1e200))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN, "--out", str(out)]) == 0
    pre = json.loads((out / "preprocess.json").read_text())
    x = np.array([r[:2] for r in table_rows(big=1e200)])
    assert all(np.isfinite(pre["std"])) and pre["std"][1] > 1e199
    assert main(["predict", "--run", str(out), "--data", str(data)]) == 0
    # the same statistics as scikit-learn on ordinary values, to the last bit
    from sklearn.preprocessing import StandardScaler

    from mithril.cli.tabular import mean_std

    small = x / [1, 1e200]
    mean, std = mean_std(small)
    scaler = StandardScaler().fit(small)
    assert np.array_equal(mean, scaler.mean_) and np.array_equal(std, scaler.scale_)


def test_a_csv_with_a_digits_task_names_the_task(run, capsys):
    # --task digits-cnn said "give a .csv or .npz file" of the .csv it was given
    data, _ = run
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y",
                               "--task", "digits-cnn"])
    assert f"--task digits-cnn trains on the digits; leave --task out to train on --data " \
           f"{data}" in err


def test_a_semicolon_separated_file_gets_a_hint(run, tmp_path, capsys):
    data = tmp_path / "excel.csv"
    data.write_text("a;b;y\n1;2;0\n3;4;1\n")
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "y"])
    assert "(columns: a;b;y); the header is one cell: is the file separated by ';'?" in err
    _, trained = run
    data.write_text("a\tb\n1\t2\n")
    err = usage_error(capsys, ["predict", "--run", str(trained), "--data", str(data)])
    assert "lacks the feature column(s) 'a', 'b'" in err and "separated by '\\t'?" in err


def test_a_wide_table_is_read_in_linear_time(tmp_path, capsys):
    # list.count/index per column made 20,000 columns take ~25 s before a row was read
    import time

    from mithril.cli.tabular import read_csv

    n = 20_000
    data = tmp_path / "wide.csv"
    data.write_text(",".join(f"g{i}" for i in range(n)) + ",y\n"
                    + "".join(",".join(["1"] * n) + f",{r % 2}\n" for r in range(4)))
    start = time.perf_counter()
    table = read_csv(str(data), "y")
    assert time.perf_counter() - start < 5 and table.x.shape == (4, n)
    err = usage_error(capsys, ["train", "--data", str(data), "--target", "z"])
    assert f"g18, g19, ... ({n + 1} in all))" in err and len(err) < 400


@pytest.mark.parametrize("flag", ["--run", "--data", "--out"])
def test_a_nul_byte_in_a_predict_path_is_a_usage_error(run, capsys, flag):
    # open()/Path.exists() raise ValueError on it: a traceback from main([...])
    data, trained = run
    argv = {"--run": str(trained), "--data": str(data), "--out": "p.csv"}
    argv[flag] = argv[flag] + "\0x"
    err = usage_error(capsys, ["predict", *(v for kv in argv.items() for v in kv)])
    assert f"argument {flag}: must not contain a NUL byte" in err
    err = usage_error(capsys, ["train", "--data", "t\0.csv", "--target", "y"])
    assert "argument --data: must not contain a NUL byte" in err


def test_predict_out_cannot_replace_its_inputs(run, tmp_path, capsys):
    # --out new.csv --data new.csv replaced the user's data with the predictions (and --out
    # RUN/model.safetensors the model)
    data, trained = run
    new = Path(shutil.copy(data, tmp_path / "new.csv"))
    before = new.read_bytes()
    err = usage_error(capsys, ["predict", "--run", str(trained), "--data", str(new),
                               "--out", str(tmp_path / "." / "new.csv")])
    assert "is --data" in err and new.read_bytes() == before
    model = trained / "model.safetensors"
    before = model.read_bytes()
    err = usage_error(capsys, ["predict", "--run", str(trained), "--data", str(new),
                               "--out", str(model)])
    assert "is the run's model" in err and model.read_bytes() == before


def test_a_byte_order_mark_is_not_part_of_a_charlm_text(tmp_path):
    # it was read as the text's first character: a vocabulary entry the model could sample
    from mithril.cli.charlm import load_text

    text = tmp_path / "notes.txt"
    text.write_bytes("\ufeffhello\n".encode("utf-8"))
    assert load_text(str(text)) == ("hello\n", str(text))


# -- .npz ----------------------------------------------------------------------------------------
def _npy_renamed(path: Path) -> None:
    np.save(path.with_suffix(".npy"), np.zeros((4, 2)))
    path.with_suffix(".npy").rename(path)


def _truncated(path: Path) -> None:
    np.savez(path, X=np.zeros((40, 2)), y=np.arange(40) % 2)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("make, message", [
    (_npy_renamed, "not an .npz file (a single .npy array)"),
    (lambda p: p.write_bytes(b""), "not an .npz file (an empty file)"),
    (lambda p: p.write_bytes(b"hello, world\n" * 4), "not an .npz file (not a zip archive)"),
    (_truncated, "not a readable .npz of plain arrays"),
    (lambda p: np.savez(p, X=np.zeros((4, 2)), y=np.arange(4) % 2,
                        feature_names=np.array("a")),
     "'feature_names' must be a 1-d array of strings"),
    (lambda p: np.savez(p, X=np.zeros((4, 2)), y=np.arange(4) % 2,
                        feature_names=np.array(["a", "a"])), "duplicate feature name(s) 'a'"),
    (lambda p: np.savez(p, X=np.zeros((4, 2)), y=np.arange(4).astype("datetime64[D]")),
     "'y' must hold numbers or strings, got datetime64[D]"),
    (lambda p: np.savez(p, X=np.zeros((4, 2)), y=np.array(["a", "", "b", "a"])),
     "missing value in the target 'y', row 2"),
])
def test_bad_npz_is_a_named_error(tmp_path, capsys, make, message):
    data, out = tmp_path / "d.npz", tmp_path / "run"
    make(data)
    err = usage_error(capsys, ["train", "--data", str(data), "--out", str(out)])
    assert f"--data {data}" in err and message in err
    assert not out.exists()


def test_predict_on_an_npy_says_what_to_save(run, tmp_path, capsys):
    # it was read as a CSV: "byte b'\\x93' is not UTF-8 text"
    _, trained = run
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    err = usage_error(capsys, ["predict", "--run", str(trained), "--data",
                               str(tmp_path / "x.npy")])
    assert "an .npy holds one array" in err and "np.savez('data.npz', X=..., y=...)" in err


def test_bytes_feature_names_and_labels_are_decoded(tmp_path):
    rows = np.array(table_rows())
    data, out = tmp_path / "b.npz", tmp_path / "run"
    np.savez(data, X=rows[:, :2], y=np.array([b"no", b"yes"])[rows[:, 2].astype(int)],
             feature_names=np.array([b"height", b"width"]))
    assert main(["train", "--data", str(data), *TRAIN, "--out", str(out)]) == 0
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["features"] == ["height", "width"] and pre["labels"] == ["no", "yes"]
    new = write_rows(tmp_path / "new.csv", [[1, 2, "yes"]], ("width", "height", "y"))
    assert main(["predict", "--run", str(out), "--data", str(new)]) == 0
    with open(out / "predictions.csv", newline="") as f:
        assert list(next(csv.DictReader(f))) == ["row", "prediction", "p_no", "p_yes"]


# -- a damaged run folder ------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    ({"mean": [0.0]}, "'mean' must hold 2 finite numbers"),
    ({"std": [1.0, 0.0]}, "'std' must be > 0"),
    ({"std": ["inf", 1.0]}, "'std' must hold 2 finite numbers"),
    ({"features": "ab"}, "'features' must be a non-empty list"),
    ({"labels": ["only"]}, "'labels' must list the classes"),
    ({"labels": ["a", "a"]}, "'labels' must not repeat a class"),
    ({"target_std": "nan"}, "'target_std' must be a finite number"),
    ([1, 2], "a JSON object expected, got list"),
])
def test_edited_preprocess_json_is_named(run, tmp_path, capsys, edit, message):
    data, trained = run
    bad = Path(shutil.copytree(trained, tmp_path / "bad"))
    pre = json.loads((bad / "preprocess.json").read_text())
    (bad / "preprocess.json").write_text(json.dumps({**pre, **edit} if isinstance(edit, dict)
                                                    else edit))
    out = tmp_path / "p.csv"
    err = usage_error(capsys, ["predict", "--run", str(bad), "--data", str(data),
                               "--out", str(out)])
    assert f"--run {bad}: preprocess.json is damaged ({message}" in err
    assert not out.exists()


def test_a_model_of_the_same_shape_from_another_run_is_refused(run, tmp_path, capsys):
    # same features and network, other data: the shapes fit, so it predicted silently with
    # statistics the model was not trained with
    data, trained = run
    other = write_rows(tmp_path / "other.csv", table_rows(seed=1, big=50.0))
    assert main(["train", "--data", str(other), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "other")]) == 0
    mixed = Path(shutil.copytree(trained, tmp_path / "mixed"))
    shutil.copy(tmp_path / "other" / "model.safetensors", mixed / "model.safetensors")
    err = usage_error(capsys, ["predict", "--run", str(mixed), "--data", str(data)])
    assert f"--run {mixed}: model.safetensors was saved with another preprocess.json" in err
    assert main(["predict", "--run", str(tmp_path / "other"), "--data", str(data)]) == 0


def test_damaged_model_file_is_named(run, tmp_path, capsys):
    data, trained = run
    bad = Path(shutil.copytree(trained, tmp_path / "bad"))
    model = bad / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    err = usage_error(capsys, ["predict", "--run", str(bad), "--data", str(data)])
    assert "model.safetensors is damaged" in err
    model.unlink()
    model.mkdir()  # a folder of that name: an OSError, not a traceback
    err = usage_error(capsys, ["predict", "--run", str(bad), "--data", str(data)])
    assert "cannot read model.safetensors" in err
    assert not (bad / "predictions.csv").exists()
