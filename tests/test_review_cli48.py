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

from mithril.cli import main, tabular
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


# -- mithril compare --data ------------------------------------------------------------------
def write_table(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Three features, then a two-class ``label`` and a regression target ``t``."""
    x = np.random.default_rng(seed).standard_normal((n, 3)).round(4)
    return write_csv(path, ["a", "b", "c", "label", "t"],
                     [[*r, int(r[0] + r[1] > 0), round(2.5 * r[0] - r[2] + 0.3, 4)]
                      for r in x.tolist()])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


RUN = ["--epochs", "3", "--batch-size", "7", "--hidden", "5", "4", "--dtype", "float64",
       "--seed", "3", "--no-progress", "--no-plot"]


@pytest.mark.parametrize("target, objective", [("label", "classification"), ("t", "regression")])
def test_compare_on_a_table_is_train_per_config_and_a_torch_loop(tmp_path, target, objective):
    """Before, ``compare`` took the digits only (``--data`` was an unknown argument). Each
    configuration now trains what ``mithril train --data`` trains with its flags (every row
    of metrics.csv, the saved model), and AdamW's steps are torch.optim.AdamW's under
    CosineAnnealingLR on the same split, standardisation and batches."""
    from test_cli_userdata_files import torch_losses

    full = write_table(tmp_path / "full.csv", n=40)
    drop = "t" if target == "label" else "label"
    rows = [{k: v for k, v in r.items() if k != drop} for r in read_rows(full)]
    data = write_csv(tmp_path / "d.csv", list(rows[0]), [list(r.values()) for r in rows])
    configs = ["adamw:lr=0.01,weight_decay=0.1", "sgd:lr=0.05,momentum=0.9"]
    assert main(["compare", "--data", str(data), "--target", target, *RUN, "--configs",
                 *configs, "--out", str(tmp_path / "cmp")]) == 0
    results = read_rows(tmp_path / "cmp" / "results.csv")
    metric = "test_acc" if objective == "classification" else "test_rmse"
    assert metric in results[0] and ("test_r2" in results[0]) == (objective == "regression")
    values = [float(r[metric]) for r in results]
    assert values == sorted(values, reverse=objective == "classification")
    for i, spec in enumerate(configs, 1):
        name, settings = spec.split(":")
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in
                 (s.split("=") for s in settings.split(","))]
        out = tmp_path / f"train{i}"
        assert main(["train", "--data", str(data), "--target", target, *RUN, "--optimizer",
                     name, *flags, "--out", str(out)]) == 0
        folder = tmp_path / "cmp" / next(r["folder"] for r in results if r["config"] == spec)
        assert (folder / "metrics.csv").read_text() == (out / "metrics.csv").read_text()
        assert (folder / "preprocess.json").read_text() == (out / "preprocess.json").read_text()
        a = load_params(folder / "model.safetensors")
        b = load_params(out / "model.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        summary = (folder / "summary.json").read_text()
        assert '"task": "tabular"' in summary and objective in summary
    losses, weights = torch_losses(data, target, objective, 3, 7, 3, [5, 4])
    adamw = tmp_path / "cmp" / next(r["folder"] for r in results if r["config"] == configs[0])
    cli = [float(r["loss"]) for r in read_rows(adamw / "metrics.csv")]
    assert len(cli) == len(losses) == 15
    np.testing.assert_allclose(cli, losses, rtol=1e-12, atol=1e-12)
    saved = load_params(adamw / "model.safetensors")
    for k, v in weights.items():
        np.testing.assert_allclose(saved[k], v, rtol=1e-10, atol=1e-12)
    # the best configuration's folder is a run `mithril predict` uses
    best = tmp_path / "cmp" / results[0]["folder"]
    assert main(["predict", "--run", str(best), "--data", str(data)]) == 0
    assert len(read_rows(best / "predictions.csv")) == 40


def load_params(path: Path) -> dict[str, np.ndarray]:
    from mithril.utils.checkpoint import load_checkpoint

    return {k: np.asarray(v) for k, v in load_checkpoint(path)["params"].items()}


@pytest.mark.parametrize("argv, message", [
    (["--target", "y"], "--target only applies with --data FILE"),
    (["--objective", "regression"], "--objective only applies with --data FILE"),
    (["--data", "{dir}/notes.txt", "--target", "y"], "notes.txt: give a .csv, .tsv, .npz or .safetensors file, or a folder of .npy"),
    (["--data", "{dir}/t.csv"], "t.csv: give --target COLUMN, the column to predict"),
    (["--data", "{dir}/t.csv", "--target", "price"], "--target 'price' is not a column of"),
    (["--data", "{dir}/t.csv", "--target", "label", "--configs", "adam", "adam:lr=nan"],
     "optimizer 'adam:lr=nan': lr='nan': must be a finite number"),
    (["--data", "{dir}/results.csv", "--target", "label", "--out", "{dir}"],
     "would replace --data"),
])
def test_compare_data_mistakes_are_named_and_nothing_is_written(tmp_path, capsys, argv,
                                                                message):
    write_table(tmp_path / "t.csv")
    write_table(tmp_path / "results.csv")
    (tmp_path / "notes.txt").write_text("hello")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "cmp")]
    err = usage_error(capsys, ["compare", *argv, *out, "--epochs", "1", "--no-progress",
                               "--no-plot"])
    assert message in err, err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_digits_comparison_after_a_table_one_leaves_no_model_of_it(tmp_path):
    # the folders of the same configuration are merged: the model.safetensors and
    # preprocess.json of the table run would sit beside the digits run's metrics
    write_table(tmp_path / "t.csv")
    argv = ["--configs", "adam", "--epochs", "1", "--hidden", "4", "--no-progress",
            "--no-plot", "--out", str(tmp_path / "cmp")]
    assert main(["compare", "--data", str(tmp_path / "t.csv"), "--target", "label", *argv]) == 0
    folder = tmp_path / "cmp" / "01-adam"
    assert (folder / "model.safetensors").is_file()
    assert main(["compare", *argv]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["epochs.csv", "metrics.csv",
                                                        "summary.json"]


# -- safetensors and a folder of .npy files ----------------------------------------------------
def test_safetensors_and_a_folder_of_npy_train_the_npz_model_bit_for_bit(tmp_path, capsys):
    """Before, both were refused ("give a .csv, .tsv or .npz file"). The same X and y as an
    .npz, a safetensors file (feature names in its metadata) and a folder of .npy files (with
    an array the run does not use) train the same model, and predict reads each."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 3))
    y = (x[:, 0] - x[:, 2] > 0).astype(np.int64)
    names = ["a", "b", "c"]
    np.savez(tmp_path / "t.npz", X=x, y=y, feature_names=np.array(names))
    save_file({"X": x, "y": y}, tmp_path / "t.safetensors",
              metadata={"feature_names": json.dumps(names)})
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "X.npy", x)
    np.save(folder / "y.npy", y)
    np.save(folder / "feature_names.npy", np.array(names))
    np.save(folder / "X_test.npy", np.array([object()], dtype=object), allow_pickle=True)
    runs = {}
    for data in ("t.npz", "t.safetensors", "arrays"):
        out = tmp_path / f"run-{data}"
        assert main(["train", "--data", str(tmp_path / data), *TRAIN, "--dtype", "float64",
                     "--out", str(out)]) == 0
        runs[data] = out
        assert json.loads((out / "preprocess.json").read_text())["features"] == names
    metrics = {d: (o / "metrics.csv").read_text() for d, o in runs.items()}
    assert metrics["t.safetensors"] == metrics["t.npz"] == metrics["arrays"]
    for data in ("t.npz", "t.safetensors", "arrays"):  # any run predicts any of them
        assert main(["predict", "--run", str(runs["arrays"]), "--data", str(tmp_path / data),
                     "--out", str(tmp_path / f"p-{data}.csv")]) == 0
    assert (tmp_path / "p-t.npz.csv").read_text() == (tmp_path / "p-arrays.csv").read_text() \
        == (tmp_path / "p-t.safetensors.csv").read_text()
    capsys.readouterr()


def test_a_torch_bfloat16_safetensors_trains_on_its_float32_values(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g).to(torch.bfloat16)
    y = (x[:, 0] > 0).long()
    save_file({"X": x, "y": y}, tmp_path / "bf.safetensors")
    np.savez(tmp_path / "f.npz", X=x.float().numpy().astype(np.float64), y=y.numpy())
    for data in ("bf.safetensors", "f.npz"):
        assert main(["train", "--data", str(tmp_path / data), *TRAIN, "--dtype", "float64",
                     "--out", str(tmp_path / data.split(".")[0])]) == 0
    assert (tmp_path / "bf" / "metrics.csv").read_text() == \
        (tmp_path / "f" / "metrics.csv").read_text()


def _bad_folder(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / "arrays"
    folder.mkdir()
    x = np.zeros((6, 2))
    if kind == "empty":
        (folder / "notes.txt").write_text("none")
    elif kind == "x_train":
        np.save(folder / "x_train.npy", x)
        np.save(folder / "y.npy", np.arange(6) % 2)
    elif kind == "objects":
        np.save(folder / "X.npy", x)
        np.save(folder / "y.npy", np.array(["a", 1] * 3, dtype=object), allow_pickle=True)
    elif kind == "empty-file":
        np.save(folder / "X.npy", x)
        (folder / "y.npy").write_bytes(b"")
    elif kind == "short-y":
        np.save(folder / "X.npy", x)
        np.save(folder / "y.npy", np.arange(5) % 2)
    return folder


@pytest.mark.parametrize("kind, message", [
    ("empty", "a folder without .npy files; save the features as X.npy and the target as y.npy"),
    ("x_train", "no array 'X' (it holds x_train, y); save the features as X"),
    ("objects", "y.npy holds Python objects (dtype object)"),
    ("empty-file", "y.npy is empty"),
    ("short-y", "'y' must be 1-d with one value per row of X (6), got shape (5,)"),
])
def test_a_bad_folder_of_npy_is_named_and_nothing_is_written(tmp_path, capsys, kind, message):
    folder = _bad_folder(tmp_path, kind)
    err = usage_error(capsys, ["train", "--data", str(folder), *TRAIN,
                               "--out", str(tmp_path / "run")])
    assert f"--data {folder}" in err and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_text("a,b\n1,2\n"), "not a readable safetensors file"),
    (lambda p: __import__("safetensors.numpy").numpy.save_file(
        {"X": np.zeros((4, 2)), "y": np.arange(4) % 2}, p, metadata={"feature_names": "a,b"}),
     "its metadata 'feature_names' must be a JSON list of strings"),
    (lambda p: np.save(p.with_name("X.npy"), np.zeros((4, 2))), "an .npy holds one array"),
])
def test_a_bad_safetensors_or_a_lone_npy_is_named(tmp_path, capsys, write, message):
    path = tmp_path / "t.safetensors"
    write(path)
    data = path if path.exists() else tmp_path / "X.npy"
    err = usage_error(capsys, ["train", "--data", str(data), *TRAIN,
                               "--out", str(tmp_path / "run")])
    assert f"--data {data}" in err and message in err, err
    assert not (tmp_path / "run").exists()


# -- classification or regression ------------------------------------------------------------
def test_whole_number_codes_taken_for_a_regression_target_say_so(tmp_path, capsys):
    """More than 20 distinct whole numbers (product or region codes) are silently a number to
    predict, where scikit-learn's type_of_target calls them multiclass: the header now says
    which it took and how to get the other; a target with fractions gets no such note."""
    from sklearn.utils.multiclass import type_of_target

    x = np.random.default_rng(0).standard_normal((300, 2)).round(3)
    codes = [int(abs(a) * 20) % 50 for a in x[:, 0]]
    write_csv(tmp_path / "codes.csv", ["a", "b", "code"], [[*r, c] for r, c in
                                                           zip(x.tolist(), codes)])
    assert type_of_target(np.array(codes)) == "multiclass" and len(set(codes)) > 20
    assert main(["train", "--data", str(tmp_path / "codes.csv"), "--target", "code",
                 "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert (f"regression on 'code' (its {len(set(codes))} distinct whole numbers taken for a "
            f"number to predict, more than 20; --objective classification takes them for "
            f"classes)") in out, out
    assert main(["train", "--data", str(tmp_path / "codes.csv"), "--target", "code",
                 "--objective", "classification", "--dry-run",
                 "--out", str(tmp_path / "run")]) == 0
    assert f"{len(set(codes))} classes" in capsys.readouterr().out
    write_csv(tmp_path / "price.csv", ["a", "b", "price"], [[*r, r[0] * 3.5 + 0.25] for r in
                                                             x.tolist()])
    assert main(["train", "--data", str(tmp_path / "price.csv"), "--target", "price",
                 "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "regression on 'price';" in out and "whole numbers" not in out
    assert not (tmp_path / "run").exists()


# -- predict on a large file -------------------------------------------------------------------
def test_predict_on_a_large_file_is_torch_in_chunks(tmp_path):
    """Rows on both sides of a chunk boundary (:data:`predict.PREDICT_ROWS`) get the
    probabilities torch.nn.functional computes from the saved float64 weights."""
    torch = pytest.importorskip("torch")
    from mithril.cli import predict as predict_module

    n = getattr(predict_module, "PREDICT_ROWS", 16384) + 500
    x = np.random.default_rng(2).standard_normal((n, 3)).round(5)
    y = np.where(x[:, 0] > 0.5, "high", np.where(x[:, 0] < -0.5, "low", "mid"))
    data = write_csv(tmp_path / "d.csv", ["a", "b", "c", "level"],
                     [[*r, c] for r, c in zip(x.tolist(), y.tolist())])
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target", "level", "--epochs", "1",
                 "--batch-size", "2048", "--hidden", "8", "--dtype", "float64", "--no-progress",
                 "--no-plot", "--out", str(run)]) == 0
    assert main(["predict", "--run", str(run), "--data", str(data)]) == 0
    rows = read_rows(run / "predictions.csv")
    assert [r["row"] for r in rows] == [str(i) for i in range(1, n + 1)]
    got = np.array([[float(r[f"p_{c}"]) for c in ("high", "low", "mid")] for r in rows])
    pre = __import__("json").loads((run / "preprocess.json").read_text())
    w = {k: torch.tensor(v) for k, v in load_params(run / "model.safetensors").items()}
    h = torch.tensor((x - np.array(pre["mean"])) / np.array(pre["std"]))
    h = torch.relu(torch.nn.functional.linear(h, w["mlp.linear_0.weight"], w["mlp.linear_0.bias"]))
    p = torch.softmax(torch.nn.functional.linear(h, w["mlp.linear_1.weight"],
                                                 w["mlp.linear_1.bias"]), dim=1).numpy()
    np.testing.assert_allclose(got, p, rtol=0, atol=1e-14)
    labels = np.array(["high", "low", "mid"])[p.argmax(axis=1)]
    assert [r["prediction"] for r in rows] == labels.tolist()


def test_predict_holds_neither_all_activations_nor_a_dict_per_row(tmp_path, capsys):
    """40,000 rows through 256-wide layers: one evaluation of all of them held 40 MB per
    activation, and the predictions a dict per row; in chunks and written as made the peak is
    a few times a chunk's."""
    x = np.random.default_rng(3).standard_normal((40_000, 4)).round(4)
    data = write_csv(tmp_path / "d.csv", ["a", "b", "c", "d", "y"],
                     [[*r, int(r[0] > 0)] for r in x.tolist()])
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target", "y", "--epochs", "1",
                 "--batch-size", "8192", "--hidden", "256", "256", "--no-progress", "--no-plot",
                 "--out", str(run)]) == 0
    tracemalloc.start()
    try:
        assert main(["predict", "--run", str(run), "--data", str(data)]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    capsys.readouterr()
    assert peak < 110e6, peak / 1e6  # 171 MB before, 72 MB now


def test_the_metrics_of_a_large_table_are_measured_in_chunks(tmp_path, capsys):
    """After each epoch the whole training and test sets were evaluated in one call (40,000
    rows through 256-wide layers: 40 MB an activation); now in chunks of CHUNK_ROWS, with the
    loss and accuracy torch.nn.functional gives on the whole set from the saved weights."""
    torch = pytest.importorskip("torch")

    x = np.random.default_rng(4).standard_normal((40_000, 4)).round(4)
    data = write_csv(tmp_path / "d.csv", ["a", "b", "c", "d", "y"],
                     [[*r, int(r[0] * r[1] > 0)] for r in x.tolist()])
    run = tmp_path / "run"
    tracemalloc.start()
    try:
        assert main(["train", "--data", str(data), "--target", "y", "--epochs", "1",
                     "--batch-size", "4096", "--hidden", "256", "256", "--no-progress",
                     "--no-plot", "--out", str(run)]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    capsys.readouterr()
    assert peak < 150e6, peak / 1e6  # 191 MB before, 128 MB now
    from mithril.cli.tabular import mean_std, split

    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    tr, te = split(y, "classification", 0.2, 0, str(data))
    mean, std = mean_std(x[tr])
    w = {k: torch.tensor(v, dtype=torch.float64)
         for k, v in load_params(run / "model.safetensors").items()}
    final = read_rows(run / "epochs.csv")[-1]
    for which, idx in (("train", tr), ("test", te)):
        h = torch.tensor((x[idx] - mean) / std)
        for k in range(3):
            h = torch.nn.functional.linear(h, w[f"mlp.linear_{k}.weight"],
                                           w[f"mlp.linear_{k}.bias"])
            h = torch.relu(h) if k < 2 else h
        loss = torch.nn.functional.cross_entropy(h, torch.tensor(y[idx])).item()
        acc = float((h.argmax(dim=1).numpy() == y[idx]).mean())
        assert abs(float(final[f"{which}_loss"]) - loss) < 1e-5  # float32 run
        assert abs(float(final[f"{which}_acc"]) - acc) <= 2 / len(idx)  # a tie or two


# -- the character model on the user's text ----------------------------------------------------
CHARLM = ["--task", "charlm", "--steps", "3", "--eval-every", "3", "--context", "8",
          "--d-model", "8", "--layers", "1", "--heads", "1", "--batch-size", "2",
          "--eval-windows", "2", "--sample-chars", "5", "--no-progress", "--no-plot"]


def test_a_windows_text_trains_the_charlm_of_its_unix_copy(tmp_path, capsys):
    text = "the quick brown fox jumps over the lazy dog\n" * 12
    (tmp_path / "unix.txt").write_text(text, newline="\n")
    (tmp_path / "win.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    for name in ("unix", "win"):
        assert main(["train", "--data", str(tmp_path / f"{name}.txt"), *CHARLM,
                     "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "unix" / "metrics.csv").read_text() == \
        (tmp_path / "win" / "metrics.csv").read_text()
    assert (tmp_path / "unix" / "sample.txt").read_text() == \
        (tmp_path / "win" / "sample.txt").read_text()
    capsys.readouterr()


def test_a_latin1_text_names_its_line_and_byte(tmp_path, capsys):
    # it said "not UTF-8 text ('utf-8' codec can't decode byte 0xe9 in position 40: ...)"
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line is fine\nso is the second\ncaf\xe9 au lait\n" * 20)
    err = usage_error(capsys, ["train", "--data", str(path), *CHARLM,
                               "--out", str(tmp_path / "run")])
    assert err.endswith(f"--data {path}: line 3: byte b'\\xe9' is not UTF-8 text (latin-1 or "
                        f"cp1252?); save the file as UTF-8 ('CSV UTF-8' in a spreadsheet)"), err
    assert not (tmp_path / "run").exists()


# -- missing values: --impute mean -------------------------------------------------------------
def holey_table(path: Path, n: int = 80, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """Three features with empty, NA and NaN cells, a two-class target; (path, x with NaN, y)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).round(3) * [1.0, 10.0, 0.1]
    y = (x[:, 0] + x[:, 1] / 10 > 0).astype(int)
    holes = rng.random((n, 3)) < 0.15
    marks = np.array(["", "NA", "NaN"])[rng.integers(0, 3, (n, 3))]
    cells = np.where(holes, marks, x.astype(str))
    write_csv(path, ["a", "b", "c", "y"], [[*r, c] for r, c in zip(cells.tolist(), y.tolist())])
    return path, np.where(holes, np.nan, x), y


def test_impute_mean_is_scikit_learns_simple_imputer_then_standard_scaler(tmp_path, capsys):
    """Before, a missing cell could only be refused (the fix: fill it yourself, and fill new
    data the same way before predict). --impute mean fits SimpleImputer(strategy="mean") on the
    training rows, standardises the filled rows, and predict fills a missing cell the same way:
    the run is the one on the file filled by scikit-learn, bit for bit."""
    import json

    from sklearn.impute import SimpleImputer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    data, x, y = holey_table(tmp_path / "holes.csv")
    flags = ["--target", "y", "--epochs", "3", "--batch-size", "16", "--hidden", "6",
             "--dtype", "float64", "--no-progress", "--no-plot"]
    assert main(["train", "--data", str(data), *flags, "--impute", "mean",
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"{int(np.isnan(x).sum())} missing values filled with the training rows' mean" in out
    tr, _ = (np.sort(i) for i in train_test_split(np.arange(len(y)), test_size=0.2,
                                                   random_state=0, stratify=y))
    imputer = SimpleImputer(strategy="mean").fit(x[tr])
    scaler = StandardScaler().fit(imputer.transform(x[tr]))
    pre = json.loads((tmp_path / "run" / "preprocess.json").read_text())
    np.testing.assert_allclose(pre["impute"], imputer.statistics_, rtol=1e-15, atol=0)
    np.testing.assert_allclose(pre["mean"], scaler.mean_, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(pre["std"], scaler.scale_, rtol=1e-14, atol=0)
    # the same run on the file filled with those values (repr: the exact floats)
    filled_x = np.where(np.isnan(x), pre["impute"], x)
    filled = write_csv(tmp_path / "filled.csv", ["a", "b", "c", "y"],
                       [[*map(repr, r), c] for r, c in zip(filled_x.tolist(), y.tolist())])
    assert main(["train", "--data", str(filled), *flags, "--out", str(tmp_path / "ref")]) == 0
    assert (tmp_path / "run" / "metrics.csv").read_text() == \
        (tmp_path / "ref" / "metrics.csv").read_text()
    a, b = (load_params(tmp_path / r / "model.safetensors") for r in ("run", "ref"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # predict fills the missing cells of new data with the training means
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(data),
                 "--out", str(tmp_path / "p1.csv")]) == 0
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(filled),
                 "--out", str(tmp_path / "p2.csv")]) == 0
    assert (tmp_path / "p1.csv").read_text() == (tmp_path / "p2.csv").read_text()
    # a model trained without it still refuses a missing cell at predict
    err = usage_error(capsys, ["predict", "--run", str(tmp_path / "ref"), "--data", str(data),
                               "--out", str(tmp_path / "p3.csv")])
    assert "missing value" in err and not (tmp_path / "p3.csv").exists()


def test_impute_in_an_npz_resume_and_compare(tmp_path, capsys):
    _, x, y = holey_table(tmp_path / "unused.csv", n=60, seed=1)
    np.savez(tmp_path / "t.npz", X=x, y=y)
    flags = ["--data", str(tmp_path / "t.npz"), "--impute", "mean", "--hidden", "5",
             "--batch-size", "16", "--dtype", "float64", "--scheduler", "none", "--no-progress",
             "--no-plot"]
    assert main(["train", *flags, "--epochs", "2", "--checkpoint",
                 "--out", str(tmp_path / "half")]) == 0
    assert main(["train", "--resume", str(tmp_path / "half"), "--epochs", "4"]) == 0
    assert main(["train", *flags, "--epochs", "4", "--out", str(tmp_path / "full")]) == 0
    assert (tmp_path / "half" / "metrics.csv").read_text() == \
        (tmp_path / "full" / "metrics.csv").read_text()
    assert main(["compare", *flags, "--epochs", "4", "--configs", "adam:lr=1e-3",
                 "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "01-adam_lr=1e-3" / "metrics.csv").read_text() == \
        (tmp_path / "full" / "metrics.csv").read_text()
    # a run without --impute cannot be resumed with it (nor the other way): named, unchanged
    np.savez(tmp_path / "full.npz", X=np.nan_to_num(x), y=y)
    plain = tmp_path / "plain"
    assert main(["train", "--data", str(tmp_path / "full.npz"), "--epochs", "1", "--hidden", "5",
                 "--checkpoint", "--no-progress", "--no-plot", "--out", str(plain)]) == 0
    before = {p.name: p.read_bytes() for p in plain.iterdir()}
    err = usage_error(capsys, ["train", "--resume", str(plain), "--epochs", "2", "--impute",
                               "mean"])
    assert "task_settings.impute (None in the run, 'mean' now)" in err, err
    assert {p.name: p.read_bytes() for p in plain.iterdir()} == before
    # an infinite feature is not a missing one
    np.savez(tmp_path / "inf.npz", X=np.where(np.isnan(x), np.inf, x), y=y)
    err = usage_error(capsys, ["train", "--data", str(tmp_path / "inf.npz"), "--impute", "mean",
                               "--out", str(tmp_path / "run")])
    assert "inf.npz: missing or non-finite value in column 'x" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--impute", "mean"], "--impute does not apply to the digits job"),
    (["compare", "--impute", "mean"], "--impute only applies with --data FILE"),
    (["train", "--data", "{dir}/empty-col.csv", "--target", "y", "--impute", "mean"],
     "--impute mean: the feature(s) 'b' of {dir}/empty-col.csv have no value in any training "
     "row; drop them"),
])
def test_impute_mistakes_are_named(tmp_path, capsys, argv, message):
    write_csv(tmp_path / "empty-col.csv", ["a", "b", "y"],
              [[i, "", i % 2] for i in range(62)])
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    err = usage_error(capsys, [*argv, "--out", str(tmp_path / "run")])
    assert message.replace("{dir}", str(tmp_path)) in err, err
    assert not (tmp_path / "run").exists()
