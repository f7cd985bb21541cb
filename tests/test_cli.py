"""The ``mithril`` command line end to end: train, compare, plot-schedule, errors, Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mithril.cli import main
from mithril.cli import training as training_mod  # noqa: E402
from mithril.cli.errors import CLIError  # noqa: E402
from mithril.cli.options import parse_spec  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = 23  # 1437 training digits in batches of 64
#: a small budget that still learns (> 85% test accuracy)
QUICK = ["--epochs", "2", "--hidden", "32", "--lr", "1e-2", "--scheduler", "none"]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG


def usage_error(capsys, argv: list[str]) -> str:
    """Run ``argv``; assert an argparse-style exit 2 without traceback; return stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


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
    (["compare", "--configs", "adam:lr=1e-3", "nadam:lr=1"], ["unknown optimizer 'nadam'"]),
    (["compare", "--configs", "adam:beta1=2"], ["config 'adam:beta1=2'", "beta1 must be"]),
    (["compare", "--configs", "adam:lr=fast"], ["lr='fast' is not a valid number"]),
    (["compare", "--configs", "adam:speed=3"], ["unknown setting 'speed'"]),
    (["plot-schedule", "--scheduler", "plateau"], ["plateau"]),
    (["plot-schedule", "--scheduler", "step", "cosine"], ["need 1 --switch-at"]),
    (["plot-schedule", "--steps", "0"], ["must be >= 1"]),
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
