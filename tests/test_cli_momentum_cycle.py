"""``mithril train --momentum-cycle`` end to end: the one-cycle schedule cycles the
optimizer's momentum (SGD, RMSProp) or beta1 (Adam, AdamW) as torch's
``OneCycleLR(cycle_momentum=True)``, and metrics.csv, epochs.csv and summary.json record it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import conftest
import pytest
import torch

from mithril.cli import main

#: a small budget (as in test_cli_groups_ema.py): 23 steps per epoch
QUICK = ["train", "--hidden", "32", "--no-progress", "--no-plot"]
STEPS_PER_EPOCH = 23


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, usage="mithril train")


def torch_one_cycle(steps: int, max_lr: float, betas: bool, base: float, top: float
                    ) -> tuple[list[float], list[float]]:
    """torch's learning rate and momentum (or beta1) of each of ``steps`` steps."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([p], lr=max_lr) if betas else \
        torch.optim.SGD([p], lr=max_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps,
                                                base_momentum=base, max_momentum=top)
    lrs, moms = [], []
    for _ in range(steps):
        group = opt.param_groups[0]
        lrs.append(group["lr"])
        moms.append(group["betas"][0] if betas else group["momentum"])
        opt.step()
        sched.step()
    return lrs, moms


def test_momentum_cycle_switches_to_onecycle_and_records_the_momentum(tmp_path, capsys):
    out = tmp_path / "sgd"
    argv = [*QUICK, "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
            "--momentum-cycle", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "schedule:  onecycle" in printed  # the default cosine is replaced
    assert "momentum cycle: momentum 0.95 → 0.85 → 0.95" in printed
    steps = rows(out / "metrics.csv")
    assert list(steps[0]) == ["step", "epoch", "loss", "acc", "lr", "grad_norm", "skipped",
                              "momentum"]
    n = 2 * STEPS_PER_EPOCH
    assert len(steps) == n
    lrs, moms = torch_one_cycle(n, 0.05, False, 0.85, 0.95)
    assert [float(r["momentum"]) for r in steps] == pytest.approx(moms, rel=1e-15, abs=0)
    assert [float(r["lr"]) for r in steps] == pytest.approx(lrs, rel=1e-15, abs=0)
    assert float(steps[0]["momentum"]) == pytest.approx(0.95)
    assert min(float(r["momentum"]) for r in steps) == pytest.approx(0.85, abs=2e-3)
    epochs = rows(out / "epochs.csv")
    assert list(epochs[0])[-2:] == ["momentum", "time_s"]
    assert len(epochs) == 2 and all(0.85 <= float(e["momentum"]) <= 0.95 for e in epochs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["momentum_cycle"] == {"base_momentum": 0.85, "max_momentum": 0.95}
    assert summary["config"]["schedulers"] == [["onecycle", {}]]
    assert summary["momentum_hyperparameter"] == "momentum"
    assert summary["schedule"] == "onecycle"
    assert summary["final"]["test_acc"] > 0.5  # it learnt


def test_adam_cycles_beta1_with_given_bounds(tmp_path, capsys):
    out = tmp_path / "adam"
    assert main([*QUICK, "--epochs", "1", "--lr", "1e-2", "--scheduler", "onecycle",
                 "--max-lr", "2e-2", "--momentum-cycle", "--base-momentum", "0.8",
                 "--max-momentum", "0.9", "--out", str(out)]) == 0
    assert "momentum cycle: beta1 0.9 → 0.8 → 0.9" in capsys.readouterr().out
    steps = rows(out / "metrics.csv")
    lrs, moms = torch_one_cycle(STEPS_PER_EPOCH, 2e-2, True, 0.8, 0.9)
    assert [float(r["momentum"]) for r in steps] == pytest.approx(moms, rel=1e-15, abs=0)
    assert [float(r["lr"]) for r in steps] == pytest.approx(lrs, rel=1e-15, abs=0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["momentum_hyperparameter"] == "beta1"
    assert summary["config"]["momentum_cycle"] == {"base_momentum": 0.8, "max_momentum": 0.9}
    assert "beta1=0.9" in summary["optimizer"]  # as built, before the schedule moved it


def test_without_the_flag_nothing_changes(tmp_path, capsys):
    assert main([*QUICK, "--epochs", "1", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "schedule:  cosine" in printed and "momentum cycle" not in printed
    out = tmp_path / "plain"
    assert main([*QUICK, "--epochs", "1", "--scheduler", "none", "--out", str(out)]) == 0
    assert "momentum" not in rows(out / "metrics.csv")[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["momentum_cycle"] is None
    assert summary["momentum_hyperparameter"] is None


def test_warm_up_and_sequences_keep_the_cycle(capsys):
    assert main([*QUICK, "--epochs", "2", "--dry-run", "--optimizer", "rmsprop", "--momentum",
                 "0.5", "--scheduler", "step", "onecycle", "--switch-at", "20",
                 "--warmup-steps", "5", "--momentum-cycle"]) == 0
    printed = capsys.readouterr().out
    assert "warm-up 5 steps → step → onecycle" in printed
    assert "momentum cycle: momentum 0.95 → 0.85 → 0.95" in printed


@pytest.mark.parametrize("extra, message", [
    (["--scheduler", "step"], "--momentum-cycle needs --scheduler onecycle"),
    (["--scheduler", "plateau"], "--momentum-cycle needs --scheduler onecycle"),
    (["--optimizer", "adagrad"], "optimizer adagrad has no momentum or beta1 to cycle"),
    (["--optimizer", "sgd"], "--momentum-cycle with sgd needs --momentum > 0"),
    (["--optimizer", "rmsprop"], "--momentum-cycle with rmsprop needs --momentum > 0"),
    (["--optimizer", "sgd", "--momentum", "0.9", "--base-momentum", "0"],
     "--base-momentum 0: SGD: momentum=0.0 changes SGD's state slots"),
    (["--base-momentum", "1"], "argument --base-momentum: must be in [0, 1)"),
    (["--max-momentum", "nan"], "argument --max-momentum: must be a finite number"),
])
def test_bad_combinations_exit_2_before_anything(capsys, tmp_path, extra, message):
    out = tmp_path / "x"
    err = usage_error(capsys, [*QUICK, "--epochs", "1", "--momentum-cycle", *extra,
                               "--out", str(out)])
    assert message in err
    assert not out.exists()


def test_bounds_without_the_flag_are_refused(capsys, tmp_path):
    err = usage_error(capsys, [*QUICK, "--base-momentum", "0.8", "--max-momentum", "0.9"])
    assert "--base-momentum and --max-momentum only apply with --momentum-cycle" in err


def test_help_documents_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--momentum-cycle" in text and "--base-momentum" in text and "--max-momentum" in text
    assert "without --scheduler, onecycle replaces the default cosine" in text
