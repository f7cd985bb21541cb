"""Review of the CLI by an ML engineer with their own data (cli48): a large CSV read without a
table of Python floats, ``mithril compare`` on the user's table, and tables stored as
safetensors or a folder of ``.npy`` files. Numbers are checked against scikit-learn's split
and a plain torch loop run side by side, errors against their message and the files left."""

from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import conftest
import numpy as np
import pytest

from mithril.cli import main
from mithril.cli import tabular
from mithril.cli.tabular import read_csv

TRAIN = ["--epochs", "2", "--hidden", "8", "--no-progress", "--no-plot"]


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, last=True)


def write_csv(path: Path, header: list[str], rows, newline: str = "\n") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator=newline)
        w.writerow(header)
        w.writerows(rows)
    return path


# -- a large CSV -----------------------------------------------------------------------------
def test_a_large_csv_is_read_in_blocks_not_as_python_floats(tmp_path):
    # 20,000 rows of 20 features used to be held as lists of Python floats (32 bytes a value
    # and the list's pointers), then copied to the array: a peak of about six times the array
    # (a 1 GB CSV needed 8 GB). Now text blocks of BLOCK_ROWS rows are converted as read.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 20)).round(6)
    path = write_csv(tmp_path / "big.csv", [f"f{i}" for i in range(20)] + ["y"],
                     ([*r, int(r[0] > 0)] for r in x.tolist()))
    tracemalloc.start()
    try:
        table = read_csv(str(path), "y")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(table.x, x)  # the values float() reads, in file order
    assert np.array_equal(table.x, np.loadtxt(path, delimiter=",", skiprows=1)[:, :20])
    assert table.y == [float(v) for v in (x[:, 0] > 0).astype(int)]
    assert peak < 3.2 * x.nbytes, peak / x.nbytes  # the blocks, their copy, the target


def test_errors_in_a_later_block_name_their_row_and_line(tmp_path, capsys):
    r = getattr(tabular, "BLOCK_ROWS", 4096) + 100  # a row of the second block (0-based)
    n = r + 200
    rows = [[i, i % 7, i % 2] for i in range(n)]
    # blank lines shift the file lines: data row r + 1 is on line r + 1 + 1 (header) + 3
    text = "a,b,y\n" + "\n".join(",".join(map(str, r)) for r in rows[:10])
    text += "\n\n\n\n" + "\n".join(",".join(map(str, r)) for r in rows[10:]) + "\n"
    good = tmp_path / "good.csv"
    good.write_text(text)
    table = read_csv(str(good), "y")
    assert table.x.shape == (n, 2) and np.array_equal(table.x[:, 0], np.arange(n))
    lines = text.split("\n")
    k = lines.index(",".join(map(str, rows[r])))
    assert k == r + 4
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines[:k] + [f"{r},x,1"] + lines[k + 1:]))
    err = usage_error(capsys, ["train", "--data", str(bad), "--target", "y", *TRAIN,
                               "--out", str(tmp_path / "run")])
    assert err.endswith(f"column 'b', row {r + 1} (line {k + 1}): 'x' is not a finite number "
                        f"(features must be numeric: encode a text column first, e.g. with "
                        f"pandas.get_dummies)"), err
    # missing cells of two blocks are counted together, the first named
    holes = tmp_path / "holes.csv"
    holes.write_text("\n".join(lines[:3] + ["2,,0"] + lines[4:k] + [f"{r},NA,1"] + lines[k + 1:]))
    err = usage_error(capsys, ["train", "--data", str(holes), "--target", "y", *TRAIN,
                               "--out", str(tmp_path / "run")])
    assert "2 missing values (empty, NA, NaN, ...) in 'b' (2)" in err
    assert err.endswith("The first: missing value in column 'b', row 3 (line 4)"), err
    # a bad cell above a ragged row of the same block is named first, as cell by cell
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("\n".join(lines[:k] + [f"{r},x,1", f"{r + 1},1"] + lines[k + 2:]))
    err = usage_error(capsys, ["train", "--data", str(ragged), "--target", "y", *TRAIN,
                               "--out", str(tmp_path / "run")])
    assert f"column 'b', row {r + 1}" in err and "'x'" in err
    assert not (tmp_path / "run").exists()


def test_windows_line_endings_a_bom_and_the_label_first_read_as_the_plain_file(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3)).round(4)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    plain = write_csv(tmp_path / "plain.csv", ["a", "b", "c", "label"],
                      [[*r, c] for r, c in zip(x.tolist(), y.tolist())])
    excel = tmp_path / "excel.csv"
    with open(excel, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(["label", "a", "b", "c"])
        w.writerows([[c, *r] for r, c in zip(x.tolist(), y.tolist())])
    a, b = read_csv(str(plain), "label"), read_csv(str(excel), "label")
    assert a.features == b.features == ["a", "b", "c"]
    assert np.array_equal(a.x, b.x) and a.y == b.y
