"""``mithril train/predict --data FILE.tsv``: tab-separated tables read with the CSV rules.

The same table as .csv and as .tsv gives the same model, bit for bit, and the same
predictions; a ragged row names the file and its line; a file with the wrong separator for its
suffix is named with the fix.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main

pytest.importorskip("sklearn")

HEADER = ["height", "wïdth", "colour code", "label"]


def _rows(n: int = 40) -> list[list[object]]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 3)).round(4)
    return [[*r.tolist(), "yes" if r[0] + r[1] > 0 else "no"] for r in x]


def _write(path: Path, sep: str, rows: list[list[object]], newline: str = "\n") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=sep, lineterminator=newline).writerows([HEADER, *rows])
    return path


def _train(tmp_path: Path, data: Path, out: str, *extra: str) -> None:
    assert main(["train", "--data", str(data), "--target", "label", "--epochs", "3",
                 "--batch-size", "8", "--hidden", "5", "--no-progress", "--no-plot",
                 "--out", str(tmp_path / out), *extra]) == 0


def test_tsv_trains_the_csv_model_bit_for_bit_and_predicts_the_same(tmp_path: Path) -> None:
    rows = _rows()
    as_csv, as_tsv = _write(tmp_path / "t.csv", ",", rows), _write(tmp_path / "t.tsv", "\t", rows)
    _train(tmp_path, as_csv, "c")
    _train(tmp_path, as_tsv, "t")
    a, b = (tmp_path / d / "model.safetensors" for d in "ct")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "c/metrics.csv").read_text() == (tmp_path / "t/metrics.csv").read_text()
    assert (tmp_path / "c/preprocess.json").read_text() == \
        (tmp_path / "t/preprocess.json").read_text()
    # predictions: a .tsv and a .csv of the same rows, through the model of either
    for run in ("c", "t"):
        for data in (as_csv, as_tsv):
            out = tmp_path / f"p-{run}-{data.suffix[1:]}.csv"
            assert main(["predict", "--run", str(tmp_path / run), "--data", str(data),
                         "--out", str(out)]) == 0
    texts = {p.read_text() for p in tmp_path.glob("p-*.csv")}
    assert len(texts) == 1
    got = list(csv.DictReader(open(next(tmp_path.glob("p-*.csv")))))
    assert len(got) == 40 and {r["prediction"] for r in got} <= {"yes", "no"}
    probs = np.array([[float(r["p_no"]), float(r["p_yes"])] for r in got])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_tsv_with_windows_line_endings_and_a_tab_extension(tmp_path: Path) -> None:
    rows = _rows()
    _train(tmp_path, _write(tmp_path / "t.tsv", "\t", rows), "lf")
    _train(tmp_path, _write(tmp_path / "t.tab", "\t", rows, newline="\r\n"), "crlf")
    assert (tmp_path / "lf/model.safetensors").read_bytes() == \
        (tmp_path / "crlf/model.safetensors").read_bytes()


def test_ragged_tsv_row_names_the_file_and_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows(12)
    path = _write(tmp_path / "bad.tsv", "\t", rows)
    lines = path.read_text().splitlines()
    lines[5] += "\t7.5"  # data row 5, line 6: one cell too many
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, path, "never")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--data {path}: row 5 (line 6) has 5 cells, the header 4" in err
    assert not (tmp_path / "never").exists()


def test_tsv_predict_refuses_a_ragged_row_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _train(tmp_path, _write(tmp_path / "t.tsv", "\t", _rows()), "run")
    bad = tmp_path / "new.tsv"
    bad.write_text("\t".join(HEADER[:3]) + "\n1\t2\t3\n4\t5\n")
    with pytest.raises(SystemExit):
        main(["predict", "--run", str(tmp_path / "run"), "--data", str(bad)])
    assert f"--data {bad}: row 2 (line 3) has 2 cells, the header 3" in capsys.readouterr().err
    assert not (tmp_path / "run" / "predictions.csv").exists()


@pytest.mark.parametrize(("name", "sep", "hint"), [
    ("commas.tsv", ",", "Only tabs separate the columns of a .tsv; name a comma-separated "
                        "file .csv"),
    ("tabs.csv", "\t", "Only commas separate columns (name a tab-separated file .tsv)"),
])
def test_wrong_separator_for_the_suffix_is_named(tmp_path: Path, name: str, sep: str, hint: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / name, sep, _rows(10))
    with pytest.raises(SystemExit):
        _train(tmp_path, path, "never")
    err = capsys.readouterr().err
    assert "--target 'label' is not a column of" in err and hint in err


def test_tsv_with_only_a_header_is_refused(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.tsv"
    path.write_text("\t".join(HEADER) + "\n")
    with pytest.raises(SystemExit):
        _train(tmp_path, path, "never")
    assert f"--data {path}: no data rows" in capsys.readouterr().err


def test_trailing_tab_names_the_unnamed_column(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "export.tsv"
    path.write_text("a\tb\tlabel\t\n1\t2\tyes\t\n3\t4\tno\t\n")
    with pytest.raises(SystemExit):
        _train(tmp_path, path, "never")
    assert (f"--data {path}: column 4 has no name in the header row (the index pandas writes "
            f"without to_csv(index=False), or a trailing tab?)") in capsys.readouterr().err
