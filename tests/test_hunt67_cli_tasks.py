"""Hunt 67: ``mithril train`` on its built-in jobs (the digits MLP, ``--task digits-cnn``,
``--task charlm``) as a user runs them: resume, flags, output files, against peers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import conftest
import numpy as np
import pytest

from mithril.cli import main
from mithril.utils.checkpoint import load_checkpoint


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, last=True)


def charlm(tmp_path: Path) -> list[str]:
    text = tmp_path / "story.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return ["train", "--task", "charlm", "--data", str(text), "--context", "16",
            "--eval-every", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
            "--batch-size", "4", "--eval-windows", "4", "--sample-chars", "0",
            "--scheduler", "none", "--no-progress", "--no-plot", "--checkpoint"]


# -- charlm --resume ----------------------------------------------------------------------------
def test_charlm_resumed_to_more_steps_is_the_run_that_did_not_stop(tmp_path, capsys):
    base = charlm(tmp_path)
    assert main([*base, "--steps", "6", "--out", str(tmp_path / "straight")]) == 0
    assert main([*base, "--steps", "4", "--out", str(tmp_path / "cut")]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--steps", "6"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")["params"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["params"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "straight" / "metrics.csv") == rows(tmp_path / "cut" / "metrics.csv")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["steps"] == 6


def test_charlm_stopped_inside_an_eval_period_is_not_resumed_to_fewer_steps(tmp_path, capsys):
    """--steps 3 with --eval-every 2 measures a 1-step second "epoch"; resumed to --steps 6
    it trained one more 2-step period: 5 steps, not 6, with the measurements elsewhere than
    the run of 6 (its summary said steps 5 under task_settings.steps 6). Refused now, naming
    --steps and --eval-every, nothing written."""
    base = charlm(tmp_path)
    cut = tmp_path / "cut"
    assert main([*base, "--steps", "3", "--out", str(cut)]) == 0
    before = {p.name: p.read_bytes() for p in cut.iterdir()}
    err = usage_error(capsys, ["train", "--resume", str(cut), "--steps", "6"])
    assert "--steps" in err and "--eval-every 2" in err and "stopped at step 3" in err
    assert {p.name: p.read_bytes() for p in cut.iterdir()} == before


def test_a_finished_charlm_run_resumed_as_it_is_asks_for_more_steps_not_epochs(tmp_path,
                                                                                 capsys):
    base = charlm(tmp_path)
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "lm")]) == 0
    err = usage_error(capsys, ["train", "--resume", str(tmp_path / "lm")])
    assert "the run has done its 2 steps; give a larger --steps" in err
    assert "--epochs" not in err  # (--epochs is refused for charlm)


# -- charlm sampling ----------------------------------------------------------------------------
def test_a_diverged_charlm_run_writes_its_files_and_a_cut_sample(tmp_path, capsys):
    """A run whose weights went NaN (the default --nonfinite propagate) crashed at the end
    with numpy's "Probabilities contain NaN" traceback, its files never written; now it
    writes them, as a diverged digits run does, and says why the sample stops."""
    base = charlm(tmp_path)
    out = tmp_path / "div"
    argv = [*base, "--steps", "4", "--optimizer", "sgd", "--lr", "1e38", "--sample-chars", "5",
            "--out", str(out)]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert main(argv) == 0
    assert "sampling stopped after 0 characters" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_loss"] == "nan" and summary["sample"] == ""  # (JSON: text)
    assert (out / "sample.txt").read_text() == "\n"


def test_a_tiny_temperature_samples_the_likeliest_characters(tmp_path, capsys):
    """--temperature 1e-310 (positive, finite: accepted) made logits / T overflow to inf and
    inf - inf NaN: the same traceback after training. As T -> 0 sampling is the argmax: the
    same characters as at 1e-30."""
    base = charlm(tmp_path)
    got = []
    for t in ("1e-30", "1e-310"):
        out = tmp_path / t
        assert main([*base, "--steps", "2", "--sample-chars", "8", "--temperature", t,
                     "--out", str(out)]) == 0
        got.append(json.loads((out / "summary.json").read_text())["sample"])
    assert len(got[0]) == 8 and got[0] == got[1]


# -- charlm's job defaults and the optimizer ----------------------------------------------------
def test_charlm_trains_with_dpsgd_whose_clipping_is_its_own(tmp_path, capsys):
    """charlm's defaults --clip-norm 1 and --weight-decay 0.1 were forced onto dpsgd, which
    refuses both ("--clip-norm does not apply to optimizer dpsgd", a flag not typed, with
    no way to unset it): charlm could not train with dpsgd at all. With noise 0 and a clip
    no gradient reaches, DP-SGD is SGD: the same losses as --optimizer sgd."""
    base = [*charlm(tmp_path), "--steps", "4", "--warmup-steps", "0", "--lr", "0.5"]
    dp, sgd = tmp_path / "dp", tmp_path / "sgd"
    assert main([*base, "--optimizer", "dpsgd:noise_multiplier=0,l2_norm_clip=100",
                 "--out", str(dp)]) == 0
    assert main([*base, "--optimizer", "sgd", "--weight-decay", "0", "--clip-norm", "1e9",
                 "--out", str(sgd)]) == 0
    got = [float(r["loss"]) for r in rows(dp / "metrics.csv")]
    want = [float(r["loss"]) for r in rows(sgd / "metrics.csv")]
    assert len(got) == 4 and got == pytest.approx(want, rel=1e-5)
    settings = json.loads((dp / "summary.json").read_text())["config"]["settings"]
    assert "clip_norm" not in settings and "weight_decay" not in settings
    # a --clip-norm the user gives is still refused, naming the per-example clip
    err = usage_error(capsys, [*base, "--optimizer", "dpsgd", "--clip-norm", "1", "--dry-run"])
    assert "--clip-norm does not apply to optimizer dpsgd" in err


def test_charlm_with_ftrl_names_the_default_warm_up_it_refuses(tmp_path, capsys):
    """charlm warms up from 0 by default (a tenth of --steps); Ftrl divides by its rate, so
    it is refused: the message said only "invalid warm-up: learning_rate must be > 0", no
    flag (the user typed none). It names --warmup-steps and --warmup-start-lr now, and a
    start above 0 runs."""
    base = [*charlm(tmp_path), "--steps", "20", "--optimizer", "ftrl", "--dry-run"]
    err = usage_error(capsys, [*base, "--out", str(tmp_path / "lm")])
    assert "--warmup-steps 2 from --warmup-start-lr 0" in err and "learning_rate" in err
    assert main([*base, "--warmup-start-lr", "1e-3", "--out", str(tmp_path / "lm")]) == 0
    assert not (tmp_path / "lm").exists()


# -- flags that did nothing ---------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "compare"])
def test_loss_scale_without_mixed_precision_is_refused_not_ignored(tmp_path, capsys, command):
    """--loss-scale 1024 without --mixed-precision trained in float32 as if it were not
    given (as --max-momentum without --momentum-cycle, it is refused now, nothing written);
    with --mixed-precision (or --precision) it is the scale of the first step."""
    out = tmp_path / "run"
    err = usage_error(capsys, [command, "--loss-scale", "1024", "--epochs", "1", "--out", str(out)])
    assert "--loss-scale only applies with --mixed-precision" in err and not out.exists()
    if command == "compare":
        return
    assert main(["train", "--precision", "bf16", "--loss-scale", "1024", "--epochs", "1",
                 "--hidden", "8", "--batch-size", "512", "--no-progress", "--no-plot",
                 "--out", str(out)]) == 0
    assert float(rows(out / "metrics.csv")[0]["loss_scale"]) == 1024.0
    assert json.loads((out / "summary.json").read_text())["config"]["loss_scale"] == 1024.0


@pytest.mark.parametrize("argv", [
    ["train", "--warmup-start-lr", "0.01", "--epochs", "1"],
    ["train", "--task", "charlm", "--steps", "5", "--warmup-start-lr", "0.001"],  # 5 // 10 = 0
    ["compare", "--configs", "adam:warmup_start_lr=0.01", "--epochs", "1"],
    ["plot-schedule", "--warmup-start-lr", "0.01", "--steps", "100"],
])
def test_warmup_start_lr_without_a_warm_up_is_refused_not_ignored(tmp_path, capsys, argv):
    """--warmup-start-lr without a warm-up changed nothing (the rate started at --lr): refused
    now, naming --warmup-steps, before anything is written."""
    out = tmp_path / ("s.png" if argv[0] == "plot-schedule" else "run")
    err = usage_error(capsys, [*argv, "--out", str(out)])
    assert "--warmup-start-lr only applies with a warm-up (--warmup-steps N > 0)" in err
    assert not out.exists() and not out.with_suffix(".csv").exists()


def test_warmup_start_lr_with_a_warm_up_is_its_first_rate(tmp_path):
    out = tmp_path / "s.png"
    assert main(["plot-schedule", "--warmup-steps", "4", "--warmup-start-lr", "0.02",
                 "--scheduler", "none", "--lr", "0.1", "--steps", "6", "--out", str(out)]) == 0
    lr = [float(r["lr"]) for r in rows(out.with_suffix(".csv"))]
    assert lr == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])


def test_charlm_resumed_to_more_steps_names_its_default_warm_up(tmp_path, capsys):
    """charlm's default warm-up is a tenth of --steps, so a resume to more steps changed it
    and was refused with "only --steps may change" though only --steps was given; the
    message now names the default and the --warmup-steps that keeps the run's, which
    resumes."""
    base = [*charlm(tmp_path), "--eval-every", "10"]
    assert main([*base, "--steps", "20", "--out", str(tmp_path / "lm")]) == 0
    err = usage_error(capsys, ["train", "--resume", str(tmp_path / "lm"), "--steps", "30"])
    assert "settings.warmup_steps (2 in the run, 3 now)" in err
    assert "give --warmup-steps 2 to keep the run's" in err
    assert main(["train", "--resume", str(tmp_path / "lm"), "--steps", "30",
                 "--warmup-steps", "2"]) == 0
    assert len(rows(tmp_path / "lm" / "metrics.csv")) == 30


def test_split_seed_does_not_apply_to_charlm(tmp_path, capsys):
    """charlm holds out the end of the text: --split-seed 5 trained the same run as without
    it, silently. Refused now, naming --seed (which does order the windows)."""
    out = tmp_path / "lm"
    err = usage_error(capsys, [*charlm(tmp_path), "--steps", "2", "--split-seed", "5",
                               "--out", str(out)])
    assert "--split-seed does not apply to charlm" in err and "--seed" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, flag, needs", [
    (["train", "--clip-eps", "0"], "--clip-eps", "--clip-norm"),
    (["train", "--normalize-eps", "0.5"], "--normalize-eps", "--normalize-grad"),
    (["train", "--optimizer", "lookahead:inner=sgd,clip_eps=0"], "--clip-eps", "--clip-norm"),
    (["compare", "--configs", "adam:clip_eps=0"], "--clip-eps", "--clip-norm"),
])
def test_an_epsilon_without_its_rule_is_refused_not_ignored(tmp_path, capsys, argv, flag,
                                                           needs):
    """--clip-eps (the global-norm clip's floor) without --clip-norm, and --normalize-eps
    without --normalize-grad, changed nothing: refused now, naming both flags."""
    out = tmp_path / "run"
    err = usage_error(capsys, [*argv, "--epochs", "1", "--out", str(out)])
    assert f"{flag} only applies with {needs}" in err and not out.exists()


def test_clip_eps_with_clip_norm_is_the_clip_rule_of_optax(tmp_path):
    """With --clip-norm, --clip-eps 0 is optax's clip_by_global_norm: a run logs the same
    losses as one whose spec says so (and trains, where the refusal above does not hit)."""
    argv = ["train", "--epochs", "1", "--hidden", "8", "--batch-size", "256", "--no-progress",
            "--no-plot", "--optimizer", "sgd", "--lr", "1.0"]
    assert main([*argv, "--clip-norm", "0.1", "--clip-eps", "0", "--out", str(tmp_path / "a")]) == 0
    assert main([*argv[:-4], "--optimizer", "sgd:lr=1.0,clip_norm=0.1,clip_eps=0",
                 "--out", str(tmp_path / "b")]) == 0
    assert rows(tmp_path / "a" / "metrics.csv") == rows(tmp_path / "b" / "metrics.csv")


def test_temperature_without_a_sample_is_refused_not_ignored(tmp_path, capsys):
    out = tmp_path / "lm"
    err = usage_error(capsys, [*charlm(tmp_path), "--steps", "2", "--temperature", "0.5",
                               "--out", str(out)])  # (charlm(): --sample-chars 0)
    assert "--temperature 0.5 only applies to the sample" in err and not out.exists()


@pytest.mark.parametrize("flags", [["--momentum-cycle"], ["--scheduler", "onecycle"]])
def test_charlm_one_cycle_is_torchs_without_a_default_warm_up_before_it(tmp_path, flags):
    """charlm put its default warm-up (a tenth of --steps) before one-cycle too: the rate
    climbed to --lr in 4 steps, fell to --lr/25 and climbed again. One-cycle warms up
    itself: now the run's rates (and β₁ with --momentum-cycle) are torch's OneCycleLR over
    all the steps."""
    torch = pytest.importorskip("torch")
    out = tmp_path / "lm"
    base = charlm(tmp_path)
    i = base.index("--scheduler")
    del base[i:i + 2]  # (charlm(): --scheduler none)
    assert main([*base, "--steps", "40", "--eval-every", "10", *flags, "--out", str(out)]) == 0
    log = rows(out / "metrics.csv")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=40)
    for row in log:
        assert float(row["lr"]) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        if "momentum" in row:
            assert float(row["momentum"]) == pytest.approx(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    assert ("momentum" in log[0]) == (flags == ["--momentum-cycle"])
