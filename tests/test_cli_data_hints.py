"""User tables the CLI meets: a decimal comma (a tab-separated export of a spreadsheet in many
locales), digit grouping, a target of one class, a unicode path through train, predict and
--resume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main

pytest.importorskip("sklearn")

DECIMAL = "a decimal comma, or commas grouping digits? Numbers are read with a decimal point " \
          "and no grouping, e.g. 1234.5"


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("name", "text", "cell"), [
    ("de.tsv", "a\tb\ty\n1.5\t2\t0\n1,5\t2\t1\n", "'1,5'"),
    ("grouped.csv", 'a,b,y\n1,2,0\n"1,234,567.5",2,1\n', "'1,234,567.5'"),
])
def test_a_comma_in_digits_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    name: str, text: str, cell: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    err = _fails(["train", "--data", str(path), "--target", "y", "--out",
                  str(tmp_path / "never")], capsys)
    assert err.endswith(f"--data {path}: column 'a', row 2 (line 3): {cell} is not a finite "
                        f"number ({DECIMAL})")
    assert not (tmp_path / "never").exists()


def test_text_feature_keeps_its_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.csv"
    path.write_text('a,b,y\n1,2,0\n"red, dark",2,1\n')
    err = _fails(["train", "--data", str(path), "--target", "y"], capsys)
    assert err.endswith("'red, dark' is not a finite number (features must be numeric: encode "
                        "a text column first, e.g. with pandas.get_dummies)")


def test_a_target_of_one_class_says_which(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.csv"
    path.write_text("a,b,kind\n1,2,cat\n3,4,cat\n5,6, cat\n")
    err = _fails(["train", "--data", str(path), "--target", "kind"], capsys)
    assert err.endswith("classification needs 2 to 1000 classes; the target 'kind' has 1 (its "
                        "3 rows all hold 'cat')")
    path.write_text("a,b,kind\n1,2,7\n")
    err = _fails(["train", "--data", str(path), "--target", "kind"], capsys)
    assert err.endswith("the target 'kind' has 1 (its 1 row all hold 7)")


def test_unicode_paths_train_predict_resume(tmp_path: Path) -> None:
    folder = tmp_path / "données ü 表"
    folder.mkdir()
    data = folder / "maisons é.tsv"
    rng = np.random.default_rng(1)
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\r\n")
        w.writerow(["größe", "zimmer", "typ"])
        w.writerows([[*r.round(3).tolist(), "groß" if r.sum() > 0 else "klein"]
                     for r in rng.standard_normal((24, 2))])
    run = folder / "lauf ä"
    flags = ["--target", "typ", "--hidden", "4", "--batch-size", "6", "--scheduler", "none",
             "--no-progress", "--no-plot"]
    assert main(["train", "--data", str(data), *flags, "--epochs", "1", "--checkpoint",
                 "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert main(["train", "--data", str(data), *flags, "--epochs", "2", "--out",
                 str(folder / "ganz")]) == 0
    assert (run / "model.safetensors").read_bytes() == \
        (folder / "ganz" / "model.safetensors").read_bytes()
    assert main(["predict", "--run", str(run), "--data", str(data)]) == 0
    rows = list(csv.DictReader(open(run / "predictions.csv", encoding="utf-8")))
    assert len(rows) == 24 and {r["prediction"] for r in rows} <= {"groß", "klein"}
    assert set(rows[0]) == {"row", "prediction", "p_groß", "p_klein"}


def test_out_never_replaces_the_data_or_the_run_logs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A data file named as a run file (metrics.csv) in --out would be overwritten by the
    run; predictions written over a run's metrics.csv would lose the training log."""
    monkeypatch.chdir(tmp_path)
    text = "a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20))
    Path("metrics.csv").write_text(text)
    err = _fails(["train", "--data", "metrics.csv", "--target", "y", "--out", "."], capsys)
    assert err.endswith("--out . would replace --data metrics.csv (the run writes its "
                        "metrics.csv there); give another --out, or rename the data file")
    assert Path("metrics.csv").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
    assert main(["train", "--data", "metrics.csv", "--target", "y", "--epochs", "1",
                 "--no-progress", "--no-plot", "--out", "run"]) == 0
    log = Path("run/metrics.csv").read_text()
    for name in ("metrics.csv", "epochs.csv", "checkpoint.safetensors"):
        err = _fails(["predict", "--run", "run", "--data", "metrics.csv", "--out",
                      f"run/{name}"], capsys)
        assert err.endswith(f"--out run/{name} is the run's {name} (run/{name}); give another "
                            f"file, such as run/predictions.csv")
    assert Path("run/metrics.csv").read_text() == log
    assert not Path("run/checkpoint.safetensors").exists()
