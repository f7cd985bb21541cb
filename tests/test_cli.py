"""The ``mithril`` command line end to end: train, compare, plot-schedule, errors, Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import usage_error

from mithril.cli import main
from mithril.cli import train as train_mod  # noqa: E402
from mithril.cli import training as training_mod  # noqa: E402
from mithril.cli.errors import CLIError  # noqa: E402
from mithril.cli.options import OPTIONS, parse_spec  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = 23  # 1437 training digits in batches of 64
#: a small budget that still learns (> 85% test accuracy)
QUICK = ["--epochs", "2", "--hidden", "32", "--lr", "1e-2", "--scheduler", "none"]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG




# -- train -------------------------------------------------------------------------------------
def test_train_defaults_reach_95_percent_and_write_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test" in printed and "s per epoch" in printed
    steps = rows(out / "metrics.csv")
    assert len(steps) == 20 * STEPS_PER_EPOCH
    assert list(steps[0]) == ["step", "epoch", "loss", "acc", "lr", "grad_norm", "skipped"]
    assert [int(r["step"]) for r in steps] == list(range(1, len(steps) + 1))
    # default schedule: cosine over the run, from the optimizer's lr towards 0
    assert float(steps[0]["lr"]) == pytest.approx(1e-3)
    assert float(steps[-1]["lr"]) < 1e-5
    assert all(float(r["grad_norm"]) > 0 for r in steps)
    epochs = rows(out / "epochs.csv")
    assert len(epochs) == 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_acc"] >= 0.95
    assert summary["final"]["test_acc"] == pytest.approx(float(epochs[-1]["test_acc"]))
    assert summary["interrupted"] is False
    assert is_png(out / "training.png")


def test_train_options_reach_the_optimizer_and_schedule(tmp_path, capsys):
    out = tmp_path / "sgd"
    argv = ["train", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--nesterov",
            "--weight-decay", "1e-4", "--clip-norm", "5", "--scheduler", "step",
            "--step-size", "8", "--gamma", "0.5", "--warmup-steps", "10", "--epochs", "2",
            "--hidden", "32", "--batch-size", "128", "--no-plot", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    steps = rows(out / "metrics.csv")
    assert len(steps) == 2 * 12  # ceil(1437 / 128) steps per epoch
    lrs = [float(r["lr"]) for r in steps]
    assert lrs[:3] == pytest.approx([0.0, 0.01, 0.02])  # linear warm-up from 0
    assert lrs[10:13] == pytest.approx([0.1] * 3)  # then StepLR from the base lr
    assert lrs[17:19] == pytest.approx([0.1, 0.05])
    summary = json.loads((out / "summary.json").read_text())
    assert "SGD(learning_rate=0.1" in summary["optimizer"] and "nesterov=True" in summary["optimizer"]
    assert summary["config"]["settings"]["clip_norm"] == 5.0
    assert not (out / "training.png").exists()


def test_nonfinite_unchecked_reaches_the_optimizer(tmp_path, capsys):
    out = tmp_path / "unchecked"
    assert main(["train", "--nonfinite", "unchecked", "--epochs", "1", "--hidden", "16",
                 "--no-plot", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["settings"]["nonfinite"] == "unchecked"
    # the CPU kernel measures the norm in its pass whatever the policy
    assert all(float(r["grad_norm"]) > 0 for r in rows(out / "metrics.csv"))


def test_plateau_scheduler_with_warmup(tmp_path, capsys):
    out = tmp_path / "plateau"
    argv = ["train", "--scheduler", "plateau", "--patience", "0", "--factor", "0.5",
            "--threshold", "0.5", "--warmup-steps", "5", "--epochs", "3", "--hidden", "16",
            "--no-plot", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    epoch_lr = [float(r["lr"]) for r in rows(out / "epochs.csv")]
    # the epoch loss never improves by 50%... after the first epoch: lr halves each epoch
    assert epoch_lr == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert float(rows(out / "metrics.csv")[5]["lr"]) == pytest.approx(1e-3)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_other_backends_train(tmp_path, capsys, backend):
    out = tmp_path / backend
    assert main(["train", "--backend", backend, *QUICK, "--no-plot", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["backend"] == backend
    assert summary["final"]["test_acc"] > 0.85


def test_mixed_precision_bf16(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["train", "--mixed-precision", "bf16", *QUICK, "--no-progress",
                 "--out", str(out)]) == 0
    steps = rows(out / "metrics.csv")
    assert "loss_scale" in steps[0] and float(steps[0]["loss_scale"]) > 0
    assert json.loads((out / "summary.json").read_text())["final"]["test_acc"] > 0.85
    assert is_png(out / "training.png")


def test_ctrl_c_stops_cleanly_and_writes_what_was_measured(tmp_path, capsys, monkeypatch):
    real_step = training_mod.Run.step
    calls = {"n": 0}

    def step(self, x, y):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return real_step(self, x, y)

    monkeypatch.setattr(training_mod.Run, "step", step)
    out = tmp_path / "stopped"
    assert main(["train", "--hidden", "16", "--no-progress", "--out", str(out)]) == 130
    assert "interrupted after 30" in capsys.readouterr().out
    assert len(rows(out / "metrics.csv")) == 30
    assert len(rows(out / "epochs.csv")) == 1  # one full epoch of 23 steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == 30
    assert 0 < summary["final"]["test_acc"] <= 1
    assert is_png(out / "training.png")


def test_python_dash_m_runs_the_cli(tmp_path):
    out = tmp_path / "sub"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "mithril", "train", *QUICK, "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert len(rows(out / "metrics.csv")) == 2 * STEPS_PER_EPOCH
    assert is_png(out / "training.png")
    assert json.loads((out / "summary.json").read_text())["final"]["test_acc"] > 0.85
    bad = subprocess.run([sys.executable, "-m", "mithril", "train", "--optimizer", "adamx"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2
    assert "invalid choice: 'adamx'" in bad.stderr and "Traceback" not in bad.stderr


# -- compare -------------------------------------------------------------------------------------
def test_compare_ranks_configs_and_writes_plot_and_tables(tmp_path, capsys):
    out = tmp_path / "cmp"
    configs = ["sgd:lr=0.001", "adam:lr=3e-3", "sgd:lr=0.1,momentum=0.9,nesterov"]
    assert main(["compare", "--configs", *configs, "--epochs", "2", "--hidden", "32",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank" in printed
    ranked = rows(out / "results.csv")
    assert [int(r["rank"]) for r in ranked] == [1, 2, 3]
    accs = [float(r["test_acc"]) for r in ranked]
    assert accs == sorted(accs, reverse=True)
    assert ranked[-1]["config"] == "sgd:lr=0.001"  # far too small a step for 46 updates
    assert accs[0] > 0.85
    data = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in data["results"]] == [r["config"] for r in ranked]
    assert is_png(out / "compare.png")
    for r in ranked:
        assert len(rows(out / r["folder"] / "metrics.csv")) == 2 * STEPS_PER_EPOCH


# -- plot-schedule -------------------------------------------------------------------------------
def test_plot_schedule_warmup_then_cosine(tmp_path, capsys):
    png = tmp_path / "s" / "cosine.png"
    assert main(["plot-schedule", "--scheduler", "cosine", "--steps", "200", "--lr", "0.1",
                 "--warmup-steps", "20", "--out", str(png)]) == 0
    assert is_png(png)
    lrs = [float(r["lr"]) for r in rows(png.with_suffix(".csv"))]
    assert len(lrs) == 200
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(0.05) and lrs[20] == pytest.approx(0.1)
    assert lrs[20 + 90] == pytest.approx(0.05)  # cosine half-way over the 180 remaining steps
    assert max(lrs) == pytest.approx(0.1)


def test_plot_schedule_restarts_and_sequences(tmp_path, capsys):
    png = tmp_path / "restarts.png"
    assert main(["plot-schedule", "--scheduler", "cosine-restarts", "--t-0", "50", "--steps",
                 "150", "--out", str(png)]) == 0
    lrs = [float(r["lr"]) for r in rows(png.with_suffix(".csv"))]
    assert lrs[0] == lrs[50] == lrs[100] == pytest.approx(0.1)
    assert lrs[49] < 0.001

    png = tmp_path / "seq.png"
    assert main(["plot-schedule", "--scheduler", "step:step_size=10,gamma=0.5", "exponential",
                 "--gamma", "0.9", "--switch-at", "30", "--steps", "40", "--out", str(png)]) == 0
    lrs = [float(r["lr"]) for r in rows(png.with_suffix(".csv"))]
    assert lrs[:30:10] == pytest.approx([0.1, 0.05, 0.025])
    assert lrs[30:33] == pytest.approx([0.1, 0.09, 0.081])
    assert is_png(png)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["train", "--optimizer", "adamx"], ["invalid choice: 'adamx'"]),
    (["train", "--scheduler", "linear"], ["unknown scheduler 'linear'", "cosine"]),
    (["train", "--beta1", "1.5"], ["beta1 must be in [0, 1), got 1.5", "--beta1"]),
    (["train", "--lr", "-1"], ["learning_rate must be >= 0", "--lr"]),
    (["train", "--optimizer", "sgd", "--beta2", "0.9"], ["--beta2 does not apply to optimizer sgd"]),
    (["train", "--scheduler", "cosine", "--gamma", "0.5"], ["--gamma does not apply"]),
    (["train", "--scheduler", "cosine:lr=0.1"], ["lr is not a setting of scheduler cosine"]),
    (["train", "--scheduler", "onecycle", "--pct-start", "2"], ["pct_start must be"]),
    (["train", "--warmup-steps", "100000"], ["--warmup-steps (100000) must be smaller"]),
    (["compare", "--configs", "adam:lr=1e-3", "adamx:lr=1"], ["unknown optimizer 'adamx'"]),
    (["compare", "--configs", "adam:beta1=2"], ["config 'adam:beta1=2'", "beta1 must be"]),
    (["compare", "--configs", "adam:lr=fast"], ["lr='fast' is not a valid number"]),
    (["compare", "--configs", "adam:speed=3"], ["unknown setting 'speed'"]),
    (["plot-schedule", "--scheduler", "plateau"], ["plateau"]),
    (["plot-schedule", "--scheduler", "step", "cosine"], ["need 1 --switch-at"]),
    (["plot-schedule", "--steps", "0"], ["must be between 1 and 1000000, got 0"]),
])
def test_bad_names_and_hyperparameters_exit_2_with_a_message(tmp_path, capsys, argv, words):
    out = tmp_path / "never"
    flag = ["--out", str(out / "x.png")] if argv[0] == "plot-schedule" else ["--out", str(out)]
    err = usage_error(capsys, [*argv, *flag])
    for w in words:
        assert w in err
    assert not out.exists()  # validated before anything is written


@pytest.mark.parametrize("command", ["train", "compare", "plot-schedule"])
def test_unwritable_output_is_refused_before_training(tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "sub" / ("x.png" if command == "plot-schedule" else "run")
    err = usage_error(capsys, [command, "--out", str(out)])
    assert "cannot write" in err or "not a directory" in err
    assert "epoch" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "compare"])
def test_dry_run_checks_and_writes_nothing(tmp_path, capsys, command):
    out = tmp_path / "plan"
    assert main([command, "--dry-run", "--out", str(out)]) == 0
    assert "dry run: would train" in capsys.readouterr().out
    assert not out.exists()


def test_help_of_every_command(capsys):
    for command in ("train", "compare", "plot-schedule"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert f"usage: mithril {command}" in capsys.readouterr().out


def test_spec_parsing():
    assert parse_spec("sgd:lr=0.1,momentum=0.9,nesterov", "optimizer", ["sgd"]) == \
        ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True})
    assert parse_spec("multistep:milestones=[10,20],gamma=0.5", "scheduler", ["multistep"]) == \
        ("multistep", {"milestones": [10, 20], "gamma": 0.5})
    assert parse_spec("Adam:learning-rate=1e-3,epsilon=1e-6,amsgrad=false", "optimizer",
                      ["adam"]) == ("adam", {"lr": 1e-3, "eps": 1e-6, "amsgrad": False})
    with pytest.raises(CLIError, match="needs a value"):
        parse_spec("adam:lr", "optimizer", ["adam"])


# -- missing optional dependencies -------------------------------------------------------------
def hide_module(monkeypatch, name: str) -> None:
    """Make ``import name`` (and its submodules) fail, as without the extra installed."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("module, argv, extra", [
    ("tqdm", ["train"], "cli"),
    ("matplotlib", ["train", "--no-progress"], "cli"),
    ("sklearn", ["train", "--no-progress", "--no-plot"], "cli"),
    ("threadpoolctl", ["train", "--no-progress", "--no-plot"], "cli"),
    ("tqdm", ["compare", "--configs", "adam"], "cli"),
    ("matplotlib", ["compare", "--configs", "adam", "--no-progress"], "cli"),
    ("matplotlib", ["plot-schedule"], "cli"),
    ("torch", ["train", "--backend", "torch", "--no-progress", "--no-plot"], "torch"),
    ("jax", ["train", "--backend", "jax", "--no-progress", "--no-plot"], "jax"),
])
def test_missing_extra_is_one_line_and_status_1_before_any_work(tmp_path, capsys, monkeypatch,
                                                                module, argv, extra):
    import sklearn  # noqa: F401 - loaded first: it imports threadpoolctl, which a case hides
    hide_module(monkeypatch, module)
    out = tmp_path / "never"
    budget = [] if argv[0] == "plot-schedule" else QUICK[:4]  # in case it did run
    flag = str(out / "x.png") if argv[0] == "plot-schedule" else str(out)
    assert main([*argv, *budget, "--out", flag]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith(f"mithril {argv[0]}: error: missing module '{module}'")
    assert lines[0].endswith(f"pip install 'mithril[{extra}]'")
    assert captured.out == ""  # nothing loaded, trained or printed
    assert not out.exists()


def test_no_progress_and_no_plot_need_neither_tqdm_nor_matplotlib(tmp_path, capsys, monkeypatch):
    hide_module(monkeypatch, "tqdm")
    hide_module(monkeypatch, "matplotlib")
    out = tmp_path / "bare"
    assert main(["train", *QUICK, "--no-progress", "--no-plot", "--out", str(out)]) == 0
    assert len(rows(out / "metrics.csv")) == 2 * STEPS_PER_EPOCH
    assert json.loads((out / "summary.json").read_text())["final"]["test_acc"] > 0.85
    assert sorted(p.name for p in out.iterdir()) == ["epochs.csv", "metrics.csv", "summary.json"]


def test_missing_extra_in_a_real_process(tmp_path):
    """``python -m mithril`` with tqdm unimportable: one line on stderr, exit status 1."""
    out = tmp_path / "never"
    argv = ["mithril", "train", *QUICK, "--out", str(out)]
    code = ("import runpy, sys; sys.modules['tqdm'] = None; "
            f"sys.argv = {argv!r}; runpy.run_module('mithril', run_name='__main__')")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 1, res.stderr
    assert res.stderr.splitlines() == [
        "mithril train: error: missing module 'tqdm' (the progress bar; --no-progress does "
        "without it): pip install 'mithril[cli]'"]
    assert res.stdout == "" and not out.exists()


# -- every flag refuses bad values with usage and status 2 ---------------------------------------
def usage_exit(capsys, argv: list[str]) -> str:
    """Like :func:`usage_error`, and the usage line is printed."""
    err = usage_error(capsys, argv)
    assert "usage: mithril" in err
    return err


BAD_NUMBERS = ["nan", "inf", "-inf", "1e400", "1" + "0" * 400, "abc", ""]


@pytest.mark.parametrize("option", [o for o in OPTIONS.values() if o.kind in ("float", "int",
                                                                                "ints")],
                         ids=lambda o: o.flag)
@pytest.mark.parametrize("value", BAD_NUMBERS, ids=["nan", "inf", "-inf", "1e400", "10**400",
                                                    "abc", "empty"])
def test_every_numeric_option_refuses_non_finite_and_huge_values(tmp_path, capsys, option, value):
    err = usage_exit(capsys, ["train", "--dry-run", option.flag, value])
    assert f"argument {option.flag}" in err


@pytest.mark.parametrize("option", [o for o in OPTIONS.values() if o.kind in ("int", "ints")],
                         ids=lambda o: o.flag)
def test_every_integer_option_refuses_negative_values(capsys, option):
    err = usage_exit(capsys, ["train", "--dry-run", option.flag, "-3"])
    assert f"argument {option.flag}: must be between 0 and 1000000000, got -3" in err


@pytest.mark.parametrize("argv, words", [
    (["--seed", "-5"], ["argument --seed: must be between 0 and 4294967295, got -5"]),
    (["--seed", "4294967296"], ["argument --seed: must be between 0 and 4294967295"]),
    (["--split-seed", "-1"], ["argument --split-seed: must be between 0 and 4294967295"]),
    (["--seed", "1" + "0" * 400], ["argument --seed:", "is too large"]),
    (["--epochs", "0"], ["argument --epochs: must be between 1 and 10000, got 0"]),
    (["--epochs", "1" + "0" * 400], ["argument --epochs:", "too large"]),
    (["--epochs", "2.5"], ["argument --epochs: '2.5' is not an integer"]),
    (["--batch-size", "-64"], ["argument --batch-size: must be between 1 and 1000000"]),
    (["--hidden", "32", "0"], ["argument --hidden: must be between 1 and 8192, got 0"]),
    (["--hidden", "100000"], ["argument --hidden: must be between 1 and 8192"]),
    (["--threads", "0"], ["argument --threads: must be between 1 and 1024"]),
    (["--test-size", "nan"], ["argument --test-size: must be a finite number, got 'nan'"]),
    (["--test-size", "0"], ["argument --test-size: must be between 0 and 1 (exclusive)"]),
    (["--test-size", "1"], ["argument --test-size: must be between 0 and 1"]),
    (["--test-size", "0.001"], ["--test-size 0.001", "cannot split the 1797 digits"]),
    (["--test-size", "0.999"], ["cannot split the 1797 digits"]),
    (["--loss-scale", "0"], ["argument --loss-scale: must be > 0, got 0"]),
    (["--loss-scale", "inf"], ["argument --loss-scale: must be a finite number"]),
    (["--epochs", "2000", "--batch-size", "1"], ["2,874,000 steps; at most 2,000,000"]),
    (["--backend", "cuda"], ["argument --backend: invalid choice: 'cuda'"]),
    (["--dtype", "float16"], ["argument --dtype: invalid choice: 'float16'"]),
    (["--activation", "swish"], ["argument --activation: invalid choice"]),
    (["--mixed-precision", "fp8"], ["argument --mixed-precision: invalid choice"]),
    (["--nonfinite", "ignore"], ["argument --nonfinite: invalid choice"]),
    (["--anneal-strategy", "cubic"], ["argument --anneal-strategy: invalid choice"]),
    (["--scheduler", "step:step_size=-1"], ["step_size='-1': must be between 0 and"]),
    (["--scheduler", "cosine:t_max=inf"], ["t_max='inf': must be a finite number"]),
    (["--out", ""], ["argument --out: must not be empty"]),
    (["--out", "a\0b"], ["argument --out: must not contain a NUL byte"]),
    (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
])
def test_bad_task_flags_exit_2_with_usage(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    err = usage_exit(capsys, ["train", "--dry-run", *argv])
    for w in words:
        assert w in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, words", [
    (["compare", "--configs", "adam:lr=nan"], ["optimizer 'adam:lr=nan'", "must be a finite number"]),
    (["compare", "--configs", "sgd:lr=1e400"], ["lr='1e400': must be a finite number"]),
    (["compare", "--configs", "adam:scheduler=step,step_size=" + "9" * 40],
     ["step_size=", "too large"]),
    (["compare", "--seed", "-1"], ["argument --seed: must be between 0"]),
    (["plot-schedule", "--steps", "10000000"], ["argument --steps: must be between 1 and 1000000"]),
    (["plot-schedule", "--lr", "nan"], ["argument --lr: must be a finite number"]),
    (["plot-schedule", "--milestones", "-1"], ["argument --milestones: must be between 0 and"]),
    (["plot-schedule", "--out", "dir/"], ["--out dir: give a .png, .svg or .pdf file name"]),
    (["plot-schedule", "--out", "x.png/.."], ["give a .png, .svg or .pdf file name"]),
])
def test_bad_flags_of_compare_and_plot_schedule(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    err = usage_exit(capsys, [*argv, "--dry-run"] if argv[0] == "compare" else argv)
    for w in words:
        assert w in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "/abs", "", "  ", "a\\b", "c:x",
                                  "runs/../.."])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_name_cannot_leave_the_runs_folder(tmp_path, capsys, monkeypatch, name, command):
    monkeypatch.chdir(tmp_path)
    err = usage_exit(capsys, [command, "--name", name, "--epochs", "1"])
    assert "argument --name:" in err
    assert list(tmp_path.iterdir()) == []  # neither runs/ nor anything beside it


def test_a_plain_name_goes_under_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--name", "my-run.v2", "--dry-run"]) == 0
    assert "write to runs/my-run.v2" in capsys.readouterr().out


# -- output files appear complete or not at all ----------------------------------------------
def ctrl_c_while_writing(*args, **kwargs):
    """Stands in for a figure function: half a PNG is written to its path, then Ctrl-C."""
    path = next(a for a in args if isinstance(a, Path))
    path.write_bytes(PNG[:4])
    raise KeyboardInterrupt


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def test_ctrl_c_while_writing_leaves_no_partial_set(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "training_figure", ctrl_c_while_writing)
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--no-progress", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    # not metrics.csv without summary.json, no half PNG; nor the empty folder it created
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_ctrl_c_while_rewriting_keeps_the_previous_complete_set(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--no-progress", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["epochs.csv", "metrics.csv", "summary.json", "training.png"]
    monkeypatch.setattr(train_mod, "training_figure", ctrl_c_while_writing)
    assert main(["train", *QUICK, "--no-progress", "--seed", "1", "--out", str(out)]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads(before["summary.json"])["config"]["seed"] == 0
    assert leftovers(tmp_path) == []
    monkeypatch.undo()  # a complete rerun replaces every file of the set
    assert main(["train", *QUICK, "--no-progress", "--seed", "1", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1
    assert is_png(out / "training.png") and (out / "training.png").read_bytes() != \
        before["training.png"]
    assert leftovers(tmp_path) == []


def test_files_get_the_usual_permissions(tmp_path, capsys):
    out = tmp_path / "perm"
    assert main(["train", *QUICK, "--no-progress", "--out", str(out)]) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_compare_interrupted_while_writing_writes_nothing(tmp_path, capsys, monkeypatch):
    from mithril.cli import compare as compare_mod

    monkeypatch.setattr(compare_mod, "compare_figure", ctrl_c_while_writing)
    out = tmp_path / "cmp"
    assert main(["compare", "--configs", "adam:lr=1e-2", "sgd:lr=0.1", *QUICK[:4],
                 "--no-progress", "--out", str(out)]) == 130
    assert not out.exists() and leftovers(tmp_path) == []  # no empty folder left either


def test_plot_schedule_interrupted_keeps_the_previous_files(tmp_path, capsys, monkeypatch):
    png = tmp_path / "s.png"
    assert main(["plot-schedule", "--steps", "50", "--out", str(png)]) == 0
    old_png, old_csv = png.read_bytes(), png.with_suffix(".csv").read_bytes()

    def savefig_interrupted(self, f, **kwargs):
        f.write(PNG[:4])
        raise KeyboardInterrupt

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", savefig_interrupted)
    assert main(["plot-schedule", "--steps", "80", "--out", str(png)]) == 130
    assert png.read_bytes() == old_png and is_png(png)
    assert png.with_suffix(".csv").read_bytes() == old_csv
    assert len(rows(png.with_suffix(".csv"))) == 50
    assert leftovers(tmp_path) == []
