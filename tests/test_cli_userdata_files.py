"""``mithril train --data`` / ``mithril predict`` as a torch or Keras user tries them on their
own files: the numbers the CLI trains are those of a plain torch loop from the same initial
weights, runs repeat exactly, a CSV without a header row is refused instead of losing its
first row, and ``predict`` picks an ``.npz``'s columns by ``feature_names`` as it picks a
CSV's by name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import conftest
import numpy as np
import pytest

import mithril as ml
from mithril.cli import main
from mithril.cli.networks import mlp_spec
from mithril.cli.tabular import mean_std, read_table, split
from mithril.cli.training import make_backend
from mithril.utils.checkpoint import load_checkpoint

TRAIN = ["--epochs", "1", "--hidden", "4", "--no-progress", "--no-plot"]


def write_table(path: Path, n: int = 40, header: bool = True, seed: int = 0) -> Path:
    """Three features, a two-class integer ``label`` and a regression target ``t``."""
    x = np.random.default_rng(seed).standard_normal((n, 3)).round(4)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["a", "b", "c", "label", "t"])
        w.writerows([[*r, int(r[0] + r[1] > 0), round(2.5 * r[0] - r[2] + 0.3, 4)] for r in x])
    return path


def torch_losses(path: Path, target: str, objective: str, epochs: int, batch: int, seed: int,
                 hidden: list[int]) -> tuple[list[float], dict[str, np.ndarray]]:
    """Per-step losses and final weights of torch's AdamW + CosineAnnealingLR on the CLI's
    split and standardisation, from the CLI's initial weights and batch order."""
    import torch

    table = read_table(str(path), target)
    y = np.asarray(table.y, dtype=np.float64)
    if objective == "classification":
        y = y.astype(np.int64)
    tr, _ = split(y, objective, 0.2, 0, str(path))
    mean, std = mean_std(table.x[tr])
    x, y = (table.x[tr] - mean) / std, y[tr]
    if objective == "regression":
        y = (y - y.mean()) / y.std()
    spec = mlp_spec(3, 2 if objective == "classification" else 1, hidden, "relu", objective)
    init = ml.compile(spec.model, make_backend("numpy", "float64", seed),
                      shapes=spec.shapes).get_parameters()
    p = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in init.items()}
    opt = torch.optim.AdamW(p.values(), lr=0.01, weight_decay=0.1)
    steps = epochs * -(-len(y) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng, losses = np.random.default_rng(seed), []
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            h = torch.tensor(x[idx])
            for k in range(len(hidden) + 1):
                h = h @ p[f"mlp.linear_{k}.weight"].T + p[f"mlp.linear_{k}.bias"]
                h = torch.relu(h) if k < len(hidden) else h
            yb = torch.tensor(y[idx])
            loss = torch.nn.functional.cross_entropy(h, yb) if objective == "classification" \
                else torch.nn.functional.mse_loss(h[:, 0], yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in p.items()}


@pytest.mark.parametrize("target, objective", [("label", "classification"), ("t", "regression")])
def test_training_is_a_plain_torch_loop(tmp_path, target, objective):
    """48 rows in batches of 7 (a last batch of 4): every step's loss in metrics.csv and the
    saved weights agree with torch.optim.AdamW under CosineAnnealingLR to rounding."""
    data = write_table(tmp_path / "t.csv", n=40)
    other = "t" if target == "label" else "label"  # the other target is a feature here
    with open(data) as f:
        rows = [{k: v for k, v in r.items() if k != other} for r in csv.DictReader(f)]
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target", target, "--epochs", "3",
                 "--batch-size", "7", "--hidden", "5", "4", "--dtype", "float64", "--seed", "3",
                 "--optimizer", "adamw", "--weight-decay", "0.1", "--lr", "0.01",
                 "--no-progress", "--no-plot", "--out", str(out)]) == 0
    losses, weights = torch_losses(data, target, objective, 3, 7, 3, [5, 4])
    with open(out / "metrics.csv") as f:
        cli = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(cli) == len(losses) == 3 * 5
    np.testing.assert_allclose(cli, losses, rtol=1e-12, atol=1e-12)
    assert losses[-1] < losses[0]
    saved = load_checkpoint(out / "model.safetensors")["params"]
    for k, v in weights.items():
        np.testing.assert_allclose(np.asarray(saved[k]), v, rtol=1e-10, atol=1e-12)


def test_the_same_seed_repeats_a_run_exactly(tmp_path):
    """Every step and weight again (the safetensors header's key order may differ: compare
    the tensors, not the bytes); another --seed gives other numbers."""
    data = write_table(tmp_path / "t.csv")
    runs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main(["train", "--data", str(data), "--target", "label", "--seed", seed,
                     "--batch-size", "5", *TRAIN, "--out", str(tmp_path / name)]) == 0
        params = load_checkpoint(tmp_path / name / "model.safetensors")["params"]
        runs.append(((tmp_path / name / "metrics.csv").read_text(),
                     np.concatenate([np.ravel(params[k]) for k in sorted(params)])))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0] and not np.allclose(runs[0][1], runs[2][1])


def test_a_csv_without_a_header_row_is_refused(tmp_path, capsys):
    """Its first data row would be taken for the column names and lost (and ``--target 3``
    would name a value, not the fourth column)."""
    data = write_table(tmp_path / "t.csv", header=False)
    first = data.read_text().splitlines()[0].split(",")
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", first[3],
                                        *TRAIN, "--out", str(tmp_path / "run")], last=True)
    assert f"--data {data}: line 1 holds only numbers" in err and "no header row" in err
    assert not (tmp_path / "run").exists()


def test_predict_picks_npz_columns_by_feature_names(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((30, 3))
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "t.npz", X=x, y=y, feature_names=np.array(["a", "b", "c"]))
    assert main(["train", "--data", str(tmp_path / "t.npz"), *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    # another order and an extra column: the same predictions
    np.savez(tmp_path / "p.npz", X=np.c_[x[:, [2, 0]], x[:, :1] * 9, x[:, 1]], y=y,
             feature_names=np.array(["c", "a", "extra", "b"]))
    outs = []
    for name in ("t", "p"):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--run", str(tmp_path / "run"), "--data",
                     str(tmp_path / f"{name}.npz"), "--out", str(out)]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 31
    capsys.readouterr()
    np.savez(tmp_path / "m.npz", X=x[:, :2], feature_names=np.array(["a", "c"]))
    err = conftest.usage_error(capsys, ["predict", "--run", str(tmp_path / "run"), "--data",
                                        str(tmp_path / "m.npz"), "--out",
                                        str(tmp_path / "m.csv")], last=True)
    assert "lacks the feature(s) 'b'" in err and not (tmp_path / "m.csv").exists()
    np.savez(tmp_path / "n.npz", X=x)  # no names: the columns cannot be matched
    err = conftest.usage_error(capsys, ["predict", "--run", str(tmp_path / "run"), "--data",
                                        str(tmp_path / "n.npz"), "--out",
                                        str(tmp_path / "n.csv")], last=True)
    assert "no 'feature_names'" in err and not (tmp_path / "n.csv").exists()


def test_images_for_the_mlp_say_how_to_flatten_them(tmp_path, capsys):
    """N×H×W×C images (the CNN is the digits' only): the MLP's 2-d X, with the reshape."""
    np.savez(tmp_path / "t.npz", X=np.zeros((20, 8, 8, 1)), y=np.arange(20) % 2)
    err = conftest.usage_error(capsys, ["train", "--data", str(tmp_path / "t.npz"), *TRAIN,
                                        "--out", str(tmp_path / "run")], last=True)
    assert "got float64 (20, 8, 8, 1)" in err and "X.reshape(len(X), -1)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("shape", [(20, 1), (20, 2)])
def test_a_2d_target_says_how_to_save_it(tmp_path, capsys, shape):
    """Keras's (N, 1) labels or one-hot rows: named with the fix, nothing written."""
    x = np.random.default_rng(0).standard_normal((20, 3))
    np.savez(tmp_path / "t.npz", X=x, y=np.zeros(shape))
    err = conftest.usage_error(capsys, ["train", "--data", str(tmp_path / "t.npz"), *TRAIN,
                                        "--out", str(tmp_path / "run")], last=True)
    assert f"got shape {shape}" in err and "y.ravel()" in err and "y.argmax(axis=1)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer", ["schedule-free-sgd", "adam"])
def test_the_saved_model_is_the_one_the_final_metrics_measure(tmp_path, optimizer):
    """Schedule-free runs are measured with their averaged weights: model.safetensors must
    hold those, so that predict on the test rows gives the test RMSE the run reported (it held
    the gradient point, whose predictions are others)."""
    data = write_table(tmp_path / "t.csv")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target", "t", "--optimizer", optimizer,
                 "--lr", "0.05", "--epochs", "5", "--batch-size", "8", "--test-size", "0.5",
                 "--hidden", "8", "--dtype", "float64", "--no-progress", "--no-plot", "--out", str(out)]) == 0
    assert main(["predict", "--run", str(out), "--data", str(data)]) == 0
    with open(out / "predictions.csv") as f:
        pred = np.array([float(r["prediction"]) for r in csv.DictReader(f)])
    table = read_table(str(data), "t")
    y = np.asarray(table.y, dtype=np.float64)
    _, test = split(y, "regression", 0.5, 0, str(data))
    rmse = float(np.sqrt(np.mean((pred[test] - y[test]) ** 2)))
    final = json.loads((out / "summary.json").read_text())["final"]
    assert rmse == pytest.approx(final["test_rmse"], rel=1e-5)  # predict computes in float32


@pytest.mark.parametrize("kind, message", [("gzip", "gzip-compressed: decompress it"),
                                           ("zip", "a zip archive (an .xlsx workbook")])
def test_a_compressed_csv_is_named_not_taken_for_latin1(tmp_path, capsys, kind, message):
    import gzip
    import zipfile

    data = tmp_path / "t.csv"
    text = write_table(tmp_path / "plain.csv").read_bytes()
    if kind == "gzip":
        data.write_bytes(gzip.compress(text))
    else:
        with zipfile.ZipFile(data, "w") as z:
            z.writestr("t.csv", text)
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "label",
                                        *TRAIN, "--out", str(tmp_path / "run")], last=True)
    assert f"--data {data}: the file is {message}" in err and "latin-1" not in err
    assert not (tmp_path / "run").exists()


def test_a_diverged_model_scores_nothing_and_predicts_nothing(tmp_path, capsys):
    """NaN logits are never right (argmax took them for class 0: a NaN model scored the share
    of class 0), and predict refuses a model of NaN weights before writing anything."""
    data = write_table(tmp_path / "t.csv")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target", "label", "--optimizer", "sgd",
                 "--lr", "1e30", "--batch-size", "8", *TRAIN, "--out", str(out)]) == 0
    with open(out / "metrics.csv") as f:  # the first step measures the initial weights
        assert [r["acc"] for r in csv.DictReader(f)][1:] == ["0.0"] * 3
    final = json.loads((out / "summary.json").read_text())["final"]
    assert final["train_acc"] == final["test_acc"] == 0 and final["test_loss"] == "nan"
    capsys.readouterr()
    err = conftest.usage_error(capsys, ["predict", "--run", str(out), "--data", str(data)],
                               last=True)
    assert f"--run {out}: model.safetensors holds inf/NaN weights (mlp.linear_0.weight" in err
    assert not (out / "predictions.csv").exists()


def test_a_rerun_into_the_same_folder_leaves_no_file_of_the_run_before(tmp_path, capsys):
    """A table's run, then a digits run with --no-plot into the same --out: the old model,
    preprocessing and plot go (predict would else use a model the summary does not describe);
    a file of the user's stays."""
    data = write_table(tmp_path / "t.csv")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target", "label", "--epochs", "1",
                 "--hidden", "4", "--no-progress", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert {"model.safetensors", "preprocess.json", "training.png"} <= {
        p.name for p in out.iterdir()}
    assert main(["train", *TRAIN, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["epochs.csv", "metrics.csv", "notes.txt",
                                                     "summary.json"]
    capsys.readouterr()
    err = conftest.usage_error(capsys, ["predict", "--run", str(out), "--data", str(data)],
                               last=True)
    assert "not a run of `mithril train --data`" in err


def test_test_rows_of_classes_never_trained_on_are_warned_of(tmp_path, capsys):
    """An identifier taken for the target: every class has one row, so no test row's class
    is in the training rows; the run says so (and trains: a rare class is the user's call)."""
    data = tmp_path / "t.csv"
    data.write_text("x,id\n" + "".join(f"{i},row{i}\n" for i in range(20)))
    assert main(["train", "--data", str(data), "--target", "id", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "20 classes (warning: 4 test row(s) of class(es) 'row" in out
    assert "that no training row has" in out
    assert main(["train", "--data", str(write_table(tmp_path / "ok.csv")), "--target", "label",
                 *TRAIN, "--out", str(tmp_path / "ok")]) == 0
    assert "warning" not in capsys.readouterr().out


def test_a_text_feature_says_how_to_encode_it(tmp_path, capsys):
    data = tmp_path / "t.csv"
    data.write_text("color,size,y\n" + "".join(f"{'red' if i % 2 else 'blue'},{i},{i % 2}\n"
                                                for i in range(10)))
    err = conftest.usage_error(capsys, ["train", "--data", str(data), "--target", "y", *TRAIN,
                                        "--out", str(tmp_path / "run")], last=True)
    assert "column 'color', row 1 (line 2): 'blue' is not a finite number" in err
    assert "pandas.get_dummies" in err and not (tmp_path / "run").exists()


def test_predict_reads_a_header_of_years_and_hints_at_a_missing_one(tmp_path, capsys):
    """Training on columns named 2019, 2020 (the target is not a number): predict finds them
    by name in a file of features only, and names a file without a header row."""
    x = np.random.default_rng(0).standard_normal((20, 2)).round(3)
    data = tmp_path / "t.csv"
    data.write_text("2019,2020,y\n" + "".join(f"{a},{b},{int(a > 0)}\n" for a, b in x))
    assert main(["train", "--data", str(data), "--target", "y", *TRAIN,
                 "--out", str(tmp_path / "run")]) == 0
    new = tmp_path / "new.csv"
    new.write_text("2020,2019\n" + "".join(f"{b},{a}\n" for a, b in x))
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(new)]) == 0
    capsys.readouterr()
    new.write_text("".join(f"{a},{b}\n" for a, b in x))
    err = conftest.usage_error(capsys, ["predict", "--run", str(tmp_path / "run"), "--data",
                                        str(new), "--out", str(tmp_path / "p.csv")], last=True)
    assert "lacks the feature column(s) '2019', '2020'" in err and "no header row?" in err
    assert not (tmp_path / "p.csv").exists()


def test_schedule_free_on_two_jax_devices_measures_and_saves_its_average(tmp_path):
    """--devices 2 with a schedule-free optimizer: its state is the sharded step's (it ended
    in an AttributeError traceback after the first epoch); the averaged weights are measured
    and saved, as on one device."""
    import subprocess
    import sys

    data = write_table(tmp_path / "t.csv")
    flags = ["--data", str(data), "--target", "t", "--optimizer", "schedule-free-adamw",
             "--backend", "jax", "--batch-size", "8", *TRAIN]
    assert main(["train", *flags, "--out", str(tmp_path / "one")]) == 0
    res = subprocess.run([sys.executable, "-m", "mithril", "train", *flags, "--devices", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "summary.json").read_text())["final"]
                for d in ("one", "two"))
    assert two["test_rmse"] == pytest.approx(one["test_rmse"], rel=1e-5)
    a, b = (load_checkpoint(tmp_path / d / "model.safetensors")["params"] for d in ("one", "two"))
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-5, atol=1e-6)
