"""Faults of the ``mithril`` command line found by the sixty-third session's review: a long
configuration's folder name, paths too long to look at, a digits CNN with more conv blocks than
the image allows, a rerun that removed the user's files from a folder that never held a run,
a changed ``--task`` at ``--resume``, and what ``epochs.csv``'s ``lr`` holds."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import pytest
from conftest import usage_error

from mithril.cli import compare as compare_cli
from mithril.cli import main

pytest.importorskip("sklearn")

QUICK = ["--epochs", "1", "--hidden", "8", "--no-progress", "--no-plot"]
#: the review's configuration: its folder name was 257 characters, more than a file system
#: allows, and the comparison crashed after training (every result lost)
LONG = ("adamw:lr=3e-4,beta1=0.9,beta2=0.95,eps=1e-8,weight_decay=0.1,clip_norm=1.0,clip_eps=0,"
        "nonfinite=skip,scheduler=wsd,warmup_steps=10,warmup_start_lr=1e-6,stable_steps=30,"
        "decay_steps=6,final_lr=1e-5,decay_type=1-sqrt,exponent=1,amsgrad=false,"
        "centralize=true")
#: one whose folder name (about 150 characters) was writable before names were cut
MIDDLE = ("adamw:lr=3e-4,beta1=0.9,beta2=0.95,eps=1e-8,weight_decay=0.1,clip_norm=1.0,"
          "clip_eps=0,nonfinite=skip,scheduler=wsd,warmup_steps=10,stable_steps=30")
TOO_LONG = os.strerror(errno.ENAMETOOLONG)  # "File name too long"


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- 1. a configuration's folder name is bounded -------------------------------------------------

def test_slugs_are_bounded_unique_and_short_ones_unchanged():
    slug = compare_cli.slug
    assert slug(1, "adam") == "01-adam"
    assert slug(3, "sgd:lr=0.05,momentum=0.9,nesterov") == "03-sgd_lr=0.05_momentum=0.9_nesterov"
    long = slug(2, LONG)
    assert len(long) == compare_cli.SLUG_MAX < len(compare_cli._full_slug(2, LONG))
    assert long.startswith("02-adamw_lr=3e-4_beta1=0.9") and long == slug(2, LONG)  # stable
    assert slug(2, LONG + ",foreach=false")[:-8] == long[:-8] != slug(2, LONG + ",x=1")


def test_a_long_configuration_trains_and_writes_into_a_bounded_folder(tmp_path, capsys):
    """The folder was made after training: ``OSError: File name too long`` lost every result;
    ``--checkpoint-every`` saves into the same folder as the ranking's, and --resume finds it."""
    out = tmp_path / "cmp"
    assert main(["compare", "--configs", "adam", LONG, *QUICK, "--checkpoint-every", "1000",
                 "--out", str(out)]) == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["01-adam", compare_cli.slug(2, LONG)]
    assert {r["folder"] for r in rows(out / "results.csv")} == set(folders)
    for name in folders:
        assert {"metrics.csv", "summary.json", "checkpoint.safetensors"} <= \
            {p.name for p in (out / name).iterdir()}
    capsys.readouterr()
    assert main(["compare", "--resume", str(out), "--dry-run"]) == 0
    assert "2 configuration(s) from their checkpoints" in capsys.readouterr().out


def test_a_resume_finds_the_long_folder_of_a_comparison_made_before(tmp_path, capsys):
    """A name under 256 bytes was written whole before names were cut: resuming that
    comparison takes its folder, not a new one."""
    out = tmp_path / "cmp"
    assert main(["compare", "--configs", "adam", MIDDLE, *QUICK, "--checkpoint",
                 "--out", str(out)]) == 0
    new, old = compare_cli.slug(2, MIDDLE), compare_cli._full_slug(2, MIDDLE)
    assert len(new) < len(old) <= 255
    (out / new).rename(out / old)  # as the comparison made before named it
    assert compare_cli.folder_names(["adam", MIDDLE], str(out)) == ["01-adam", old]
    assert compare_cli.folder_names(["adam", MIDDLE], None) == ["01-adam", new]
    capsys.readouterr()
    assert main(["compare", "--resume", str(out), "--dry-run"]) == 0
    assert "2 configuration(s) from their checkpoints" in capsys.readouterr().out


# -- 2. a path too long to look at is a usage error naming its flag --------------------------------

@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> Path:
    """A `mithril train --data` run (what `predict --run` takes)."""
    folder = tmp_path_factory.mktemp("table")
    data = folder / "t.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "y"])
        for i in range(40):
            w.writerow([i % 7, i % 5, int(i % 7 > i % 5)])
    assert main(["train", "--data", str(data), "--target", "y", *QUICK,
                 "--out", str(folder / "run")]) == 0
    return folder


@pytest.mark.parametrize("argv,flag,verb", [
    (["train", "--out", "{L}"], "--out", "write"),
    (["train", "--out", "{L}/sub", "--dry-run"], "--out", "write"),
    (["train", "--name", "{N}"], "--out", "write"),
    (["train", "--name", "{N}", "--dry-run"], "--out", "write"),
    (["train", "--data", "{L}.csv", "--target", "y"], "--data", "read"),
    (["train", "--data", "{L}", "--target", "y"], "--data", "read"),
    (["train", "--resume", "{L}"], "--resume", "read"),
    (["compare", "--out", "{L}"], "--out", "write"),
    (["compare", "--out", "{L}", "--dry-run"], "--out", "write"),
    (["compare", "--data", "{L}.csv", "--target", "y"], "--data", "read"),
    (["compare", "--resume", "{L}"], "--resume", "read"),
    (["predict", "--run", "{L}", "--data", "x.csv"], "--run", "read"),
    (["predict", "--run", "{R}", "--data", "{L}.csv"], "--data", "read"),
    (["predict", "--run", "{R}", "--data", "{D}", "--out", "{L}.csv"], "--out", "write"),
    (["predict", "--run", "{R}", "--data", "{D}", "--out", "{L}/p.csv"], "--out", "write"),
    (["plot-schedule", "--out", "{L}.png"], "--out", "write"),
    (["plot-schedule", "--out", "{L}/x.png"], "--out", "write"),
])
def test_a_path_too_long_is_a_usage_error_naming_its_flag(tmp_path, capsys, monkeypatch,
                                                          table_run, argv, flag, verb):
    """Python 3.11's ``Path.exists()``/``is_dir()`` raise on a name too long: a traceback with
    exit status 1 in every command, where ``--out /proc/run`` gets a usage error."""
    monkeypatch.chdir(tmp_path)
    name = "a" * 300
    where = {"{L}": str(tmp_path / name), "{N}": name, "{R}": str(table_run / "run"),
             "{D}": str(table_run / "t.csv")}
    argv = [where.get(a[:3], "") + a[3:] if a[:3] in where else a for a in argv]
    err = usage_error(capsys, [*argv, *(QUICK[4:] if argv[0] in ("train", "compare") else [])],
                      last=True)
    what = "cannot write there" if verb == "write" else "cannot read it"
    assert f"error: {flag} " in err and err.endswith(f": {what} ({TOO_LONG})"), err
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, no folder made


@pytest.mark.parametrize("command", ["plot-schedule", "predict"])
def test_a_file_name_near_the_limit_is_written(tmp_path, capsys, table_run, command):
    """A 250-character name is allowed; its temporary file (``.NAME.XXXXXXXX.tmp``) was not."""
    out = tmp_path / ("b" * 250 + (".png" if command == "plot-schedule" else ".csv"))
    argv = ["plot-schedule"] if command == "plot-schedule" else \
        ["predict", "--run", str(table_run / "run"), "--data", str(table_run / "t.csv")]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.is_file() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# -- 3. digits-cnn: at most 3 conv blocks on an 8x8 image -----------------------------------------

@pytest.mark.parametrize("dry", [[], ["--dry-run"]])
def test_more_conv_blocks_than_the_digits_allow_is_a_usage_error(tmp_path, capsys, dry):
    out = tmp_path / "cnn"
    flags = ["--epochs", "1", "--no-progress", "--no-plot", "--out", str(out), *dry]
    err = usage_error(capsys, ["train", "--task", "digits-cnn", "--channels", "4", "4", "4", "4",
                               *flags], last=True)
    assert "--channels 4 4 4 4: the 8x8 digits allow at most 3 conv blocks (each halves the " \
           "image)" in err
    assert not out.exists()
    assert main(["train", "--task", "digits-cnn", "--channels", "2", "2", "2", *flags]) == 0


# -- 4. a folder that never held a run keeps the user's files --------------------------------------

YOURS = {"sample.txt": "my notes\n", "model.safetensors": "my model", "preprocess.json": "{}\n",
         "training.png": "my plot", "data.csv": "a,b\n1,2\n"}


def _fill(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in YOURS.items():
        (folder / name).write_text(text)


def _kept(folder: Path) -> None:
    for name, text in YOURS.items():
        assert (folder / name).read_text() == text, name


def test_train_into_a_folder_without_a_run_leaves_the_users_files(tmp_path, capsys):
    """The docs say only the files of an earlier run are removed: every file named like one a
    run can write (sample.txt, model.safetensors, ...) was deleted. In a folder of a run, its
    files that this run does not write still go, also where only the checkpoint of a run
    killed between periodic saves is there."""
    _fill(tmp_path / "myproj")
    assert main(["train", *QUICK, "--out", str(tmp_path / "myproj")]) == 0
    _kept(tmp_path / "myproj")
    assert (tmp_path / "myproj" / "summary.json").is_file()
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--checkpoint", "--out", str(out)]) == 0
    assert (out / "checkpoint.safetensors").is_file()
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    assert not (out / "checkpoint.safetensors").exists()
    assert main(["train", *QUICK, "--checkpoint", "--out", str(out)]) == 0
    (out / "summary.json").unlink()  # (as a run killed without warning leaves it)
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    assert not (out / "checkpoint.safetensors").exists()


def test_compare_into_folders_without_a_run_leaves_the_users_files(tmp_path, capsys):
    cmp = tmp_path / "cmp"
    _fill(cmp / "01-adam")
    assert main(["compare", "--configs", "adam", *QUICK, "--checkpoint", "--out", str(cmp)]) == 0
    _kept(cmp / "01-adam")
    assert (cmp / "01-adam" / "checkpoint.safetensors").is_file()
    assert main(["compare", "--configs", "adam", *QUICK, "--out", str(cmp)]) == 0
    assert not (cmp / "01-adam" / "checkpoint.safetensors").exists()  # the earlier run's


# -- 5. a changed --task at --resume ---------------------------------------------------------------

def test_a_changed_task_at_resume_names_task(tmp_path, capsys):
    """It said ``--hidden does not apply to the digits-cnn job``: a flag the user did not type
    (the run's own)."""
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--scheduler", "none", "--checkpoint", "--out",
                 str(out)]) == 0
    capsys.readouterr()
    err = usage_error(capsys, ["train", "--resume", str(out), "--epochs", "2", "--task",
                               "digits-cnn"], last=True)
    assert "--resume: this command changes the run's --task ('digits' in the run, " \
           "'digits-cnn' now); a resumed run keeps them" in err
    assert "--hidden" not in err
    assert main(["train", "--resume", str(out), "--epochs", "2", "--task", "digits",
                 "--no-progress", "--no-plot"]) == 0  # the same task: no refusal


# -- 6. what epochs.csv's lr holds -----------------------------------------------------------------

def test_epochs_lr_is_the_next_steps_rate_and_the_last_steps_at_the_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK[2:], "--epochs", "2", "--out", str(out)]) == 0
    steps, epochs = rows(out / "metrics.csv"), rows(out / "epochs.csv")
    first_of_second = next(s for s in steps if s["epoch"] == "2")
    assert epochs[0]["lr"] == first_of_second["lr"]  # the rate the next step uses
    assert epochs[-1]["lr"] == steps[-1]["lr"]  # no next step: the last step's rate
    doc = (Path(__file__).parents[1] / "docs" / "cli-train.md").read_text()
    assert "what a next step would use" not in doc
    assert "the last epoch's row has the rate of that step" in doc
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 2
