"""``mithril train --optimizer NAME[:KEY=VALUE,...]`` and ``mithril compare`` configs over the
whole optimizer catalog (:mod:`mithril.cli.optimizer_catalog`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import usage_error

import mithril.utils.optimizers as optim
from mithril.cli import main
from mithril.cli.optimizer_catalog import (
    CATALOG,
    DEFAULT_LR,
    NAMES,
    REFUSED,
    SETTINGS,
    cli_name,
    parse_optimizer_spec,
)
from mithril.cli.options import OPTIMIZERS

TRAINABLE = [n for n in NAMES if n not in REFUSED]
WRAPPERS = ("lookahead", "sam", "mechanize", "schedule-free", "differentially-private")
QUICK = ["--epochs", "2", "--hidden", "32", "--scheduler", "none", "--no-progress",
         "--no-plot"]


def same(a: optim.Optimizer, b: optim.Optimizer) -> None:
    """Same class and hyperparameters (a nested optimizer, Muon's fallback or Lookahead's
    inner, compared by its own)."""
    assert type(a) is type(b)
    ha, hb = a.hyperparameters(), b.hyperparameters()
    assert ha.keys() == hb.keys()
    for k in ha:
        if isinstance(ha[k], optim.Optimizer):
            same(ha[k], hb[k])
        else:
            assert ha[k] == hb[k], k


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


# -- names -------------------------------------------------------------------------------------
def test_every_library_optimizer_has_a_cli_name():
    classes = {getattr(optim, n) for n in optim.__all__ if isinstance(getattr(optim, n), type)
               and issubclass(getattr(optim, n), optim.Optimizer)} - {optim.Optimizer}
    assert set(CATALOG.values()) == classes and len(NAMES) == len(classes) >= 35
    assert NAMES[:5] == ("adam", "adamw", "sgd", "rmsprop", "adagrad")
    assert {cli_name(c) for c in ("ScheduleFreeAdamW", "SignSGD", "NAdam", "AdEMAMix",
                                  "OptimisticGD", "LAMB", "DoWG", "AdaBelief", "RMSProp")} == {
        "schedule-free-adamw", "sign-sgd", "nadam", "ademamix", "optimistic-gd", "lamb",
        "dowg", "adabelief", "rmsprop"}


def test_the_five_original_tables_are_what_the_signatures_give():
    for name, kind in OPTIMIZERS.items():
        assert CATALOG[name] is kind.cls and DEFAULT_LR[name] == kind.default_lr
        for key, arg in kind.args.items():
            assert SETTINGS[name][key].arg == arg


# -- every optimizer: the dry run builds the library's optimizer -------------------------------
@pytest.mark.parametrize("name", TRAINABLE)
def test_dry_run_builds_the_library_optimizer(name, built, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dry-run", "--optimizer", name, "--out", str(out)]) == 0
    lr = DEFAULT_LR.get(name, SETTINGS[name].get("lr") and SETTINGS[name]["lr"].default)
    expected = CATALOG[name](optim.Adam(learning_rate=1e-3)) if name in WRAPPERS \
        else CATALOG[name](learning_rate=lr)
    same(built[0].optimizer, expected)
    assert not out.exists()


@pytest.mark.parametrize("name", [n for n in TRAINABLE if "weight_decay" in SETTINGS[n]
                                  and n not in WRAPPERS])  # (theirs: the spec cases below)
def test_flags_and_spec_settings_reach_the_constructor(name, built, tmp_path):
    argv = ["train", "--dry-run", "--optimizer", f"{name}:weight_decay=0.003,clip_norm=2",
            "--lr", "0.0123", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    # (muon: --weight-decay reaches its fallback too, which updates the biases)
    nested = {"fallback": optim.AdamW(weight_decay=0.003)} if name == "muon" else {}
    expected = CATALOG[name](learning_rate=0.0123, weight_decay=0.003, clip_norm=2.0, **nested)
    same(built[0].optimizer, expected)


@pytest.mark.parametrize("spec, expected", [
    ("lion:beta1=0.95,beta2=0.98", optim.Lion(learning_rate=1e-3, beta1=0.95, beta2=0.98)),
    ("rprop:etas=[0.4,1.3],step_sizes=1e-5/10", optim.Rprop(
        learning_rate=0.01, etas=(0.4, 1.3), step_sizes=(1e-5, 10.0))),
    ("prodigy:beta3=none,safeguard_warmup", optim.Prodigy(safeguard_warmup=True)),
    ("muon:ns_steps=3,adjust_lr_fn=original,fallback=sgd", optim.Muon(
        learning_rate=0.02, ns_steps=3, adjust_lr_fn="original",
        fallback=optim.SGD(learning_rate=0.05))),
    ("dog:init_step=[heuristic,1e-3]", optim.DoG(init_step=("heuristic", 1e-3))),
    ("adafactor:epsilon=[none,1e-4]", optim.Adafactor(epsilon=(None, 1e-4))),
    ("schedule-free-adamw:optimizer_warmup_steps=10,beta1=0.95",
     optim.ScheduleFreeAdamW(warmup_steps=10, beta1=0.95)),
    ("asgd:t0=100,alpha=0.5", optim.ASGD(learning_rate=0.05, t0=100.0, alpha=0.5)),
    ("adadelta:rho=0.8", optim.Adadelta(rho=0.8)),
    ("lookahead:inner=sgd,sync_period=5,momentum=0.9", optim.Lookahead(
        optim.SGD(learning_rate=0.05, momentum=0.9), sync_period=5)),
    ("SignSGD:momentum=0.5", optim.SignSGD(momentum=0.5)),
    ("sam:base_optimizer=sgd,rho=0.1,momentum=0.9,adaptive", optim.SAM(
        optim.SGD(learning_rate=0.05, momentum=0.9), rho=0.1, adaptive=True)),
    ("mechanize:base_optimizer=adam,eps=1e-6,lr=2e-3", optim.Mechanize(
        optim.Adam(learning_rate=2e-3), eps=1e-6)),  # (its own eps: the wrapper's wins)
])
def test_spec_values_are_parsed_by_the_argument_type(spec, expected, built, tmp_path):
    assert main(["train", "--dry-run", "--optimizer", spec, "--out", str(tmp_path / "r")]) == 0
    same(built[0].optimizer, expected)


def test_lookahead_flags_go_to_the_inner_optimizer(built, tmp_path):
    argv = ["train", "--dry-run", "--optimizer", "lookahead:inner=sgd,slow_step_size=0.6",
            "--lr", "0.2", "--momentum", "0.8", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    same(built[0].optimizer, optim.Lookahead(optim.SGD(learning_rate=0.2, momentum=0.8),
                                             slow_step_size=0.6))


# -- short runs: the loss falls -----------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    "lion",  # elementwise
    "lamb",  # two passes (trust ratio)
    "adafactor",  # tensorwise (factored second moment)
    "galore:rank=8,update_proj_gap=10",  # tensorwise (low-rank projection, refreshed)
    "prodigy",  # learning-rate free
    "lookahead:inner=adam,lr=3e-3",
    "sam:base_optimizer=adam,lr=3e-3",  # a second gradient at the perturbed params
    "schedule-free-sgd",  # evaluated with its averaged weights
])
def test_short_run_loss_falls(spec, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--optimizer", spec, *QUICK, "--out", str(out)]) == 0
    loss = losses(out)
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["optimizer"] == spec.partition(":")[0]
    name = spec.partition(":")[0]
    assert summary["optimizer"].startswith(CATALOG[name].__name__)
    assert summary["final"]["test_acc"] > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINABLE)
def test_every_optimizer_trains_the_default_task_with_its_cli_defaults(name, tmp_path):
    out = tmp_path / "run"
    # dog's 1e-6 initial step and mechanize's 1e-6 initial scale start slowly, as do Sophia's
    # steps (clipped to its 1e-4 learning rate a coordinate) and DP-SGD's noisy ones
    epochs = "6" if name in ("dog", "mechanize", "sophia", "differentially-private") else "2"
    argv = ["train", "--optimizer", name, *QUICK, "--epochs", epochs, "--out", str(out)]
    assert main(argv) == 0
    loss = losses(out)
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:5]) / 5


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--ema", "0.9"], ["--no-decay-on", "bias"],
                                   ["--clip-norm", "1"], ["--mixed-precision", "bf16"],
                                   ["--momentum-cycle", "--scheduler", "onecycle"]])
@pytest.mark.parametrize("name", ["lion", "muon", "prodigy", "schedule-free-adamw", "lamb"])
def test_run_features_work_with_new_optimizers(name, flags, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--optimizer", name, *QUICK, "--epochs", "1", *flags, "--out", str(out)]
    assert main(argv) == 0
    loss = losses(out)
    assert len(loss) == 23 and sum(loss[-5:]) < sum(loss[:5])
    if "--momentum-cycle" in flags:  # the cycled beta1 or momentum, 0.95 → 0.85 → 0.95
        with open(out / "metrics.csv", newline="") as f:
            momentum = [float(r["momentum"]) for r in csv.DictReader(f)]
        assert momentum[0] == pytest.approx(0.95) and min(momentum) == pytest.approx(0.85, abs=0.01)


def test_momentum_cycle_drives_lookaheads_inner_beta1(tmp_path):
    """Lookahead's inner Adam's beta1 is cycled (torch's OneCycleLR rule), as Adam's own."""
    out = tmp_path / "run"
    assert main(["train", "--optimizer", "lookahead:inner=adam", *QUICK, "--epochs", "1",
                 "--momentum-cycle", "--scheduler", "onecycle", "--out", str(out)]) == 0
    with open(out / "metrics.csv", newline="") as f:
        momentum = [float(r["momentum"]) for r in csv.DictReader(f)]
    assert momentum[0] == pytest.approx(0.95) and min(momentum) == pytest.approx(0.85, abs=0.01)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["momentum_hyperparameter"] == "beta1"


def test_momentum_cycle_refused_without_momentum_or_beta1(capsys, tmp_path):
    err = usage_error(capsys, ["train", "--dry-run", "--optimizer", "adafactor",
                               "--momentum-cycle", "--out", str(tmp_path / "r")])
    assert "optimizer adafactor has no momentum or beta1 to cycle" in err


# -- bad settings --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--optimizer", "lionn"], ["argument --optimizer: invalid choice: 'lionn' (choose from "
                                "'adam', ", "'lion', ", "'schedule-free-adamw'"]),
    (["--optimizer", "lionn:beta1=0.9"], ["invalid choice: 'lionn'"]),
    (["--optimizer", "lion:speed=3"], ["unknown setting 'speed'", "lion takes lr, beta1, "
                                       "beta2, weight_decay, mode, smooth_beta, convention, mu_dtype, clip_norm"]),
    (["--optimizer", "lion:beta1=abc"], ["beta1='abc' is not a valid number"]),
    (["--optimizer", "lion:beta1=1.5"], ["invalid hyperparameter for lion: beta1", "(--beta1)"]),
    (["--optimizer", "rprop:etas=[a,b]"], ["invalid hyperparameter for rprop: etas",
                                           "(key etas)"]),
    (["--optimizer", "lion", "--momentum", "0.9"], ["--momentum does not apply to optimizer "
                                                    "lion (it takes --lr, --beta1, --beta2, "
                                                    "--weight-decay; its other settings go in "
                                                    "--optimizer lion:KEY=VALUE,...: mode, "
                                                    "smooth_beta, convention, mu_dtype)"]),
    (["--optimizer", "ademamix", "--momentum", "0.9"], [
        "--momentum does not apply to optimizer ademamix (it takes --lr, --beta1, --beta2, "
        "--eps, --weight-decay; its other settings go in --optimizer ademamix:KEY=VALUE,...: "
        "beta3, alpha, eps_root)"]),
    (["--optimizer", "lookahead:inner=lookahead"], ["inner=lookahead cannot be"]),
    (["--optimizer", "lookahead:inner=nope"], ["unknown inner optimizer 'nope'; choose from adam, "]),
    (["--optimizer", "sam:base_optimizer=mechanize"], ["base_optimizer=mechanize cannot be "
                                                       "sam's inner optimizer"]),
    (["--optimizer", "sam:base_optimizer=lbfgs"], ["cannot be sam's inner optimizer"]),
    (["--optimizer", "sam:rho=-1"], ["invalid hyperparameter for sam: ", "rho", "(key rho)"]),
    (["--optimizer", "lbfgs"], ["optimizer lbfgs is not supported", "closure"]),
    (["--optimizer", "muon:fallback=lbfgs"], ["optimizer lbfgs is not supported"]),
    (["--optimizer", "adam:step_size=3"], ["unknown setting 'step_size'"]),
    (["--optimizer", "muon:ns_steps=x"], ["ns_steps='x' is not a valid value of ns_steps"]),
])
def test_bad_optimizer_settings_exit_2_and_write_nothing(argv, expected, capsys, tmp_path):
    out = tmp_path / "run"
    err = usage_error(capsys, ["train", *argv, "--out", str(out)])
    for text in expected:
        assert text in err
    assert not out.exists()


def test_spec_parser_accepts_dashes_and_aliases():
    assert parse_optimizer_spec("Schedule_Free_AdamW:weight-decay=0.1,learning_rate=0.01") == (
        "schedule-free-adamw", {"weight_decay": 0.1, "lr": 0.01})
    assert parse_optimizer_spec("signsgd") == ("sign-sgd", {})
    # alpha is COCOB's own setting here, not rmsprop's decay alias
    assert parse_optimizer_spec("cocob:alpha=50") == ("cocob", {"alpha": 50.0})


# -- compare --------------------------------------------------------------------------------------
def test_compare_runs_catalog_configs(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--configs", "lion:lr=1e-3", "lookahead:inner=sgd,sync_period=4",
            "prodigy", "--epochs", "3", "--hidden", "32", "--scheduler", "none", "--no-plot",
            "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["config"] for r in rows) == sorted(argv[2:5])
    assert all(r["test_acc"] > 0.6 for r in rows)
    by = {r["config"]: r for r in rows}
    assert by["lookahead:inner=sgd,sync_period=4"]["optimizer"].startswith("Lookahead(")
    assert "Lion(" in by["lion:lr=1e-3"]["optimizer"]


def test_compare_bad_config_names_it(capsys, tmp_path):
    err = usage_error(capsys, ["compare", "--configs", "adam", "lion:beta3=0.9",
                               "--out", str(tmp_path / "c")])
    assert "unknown setting 'beta3'" in err and "lion takes" in err
    assert not (tmp_path / "c").exists()


def test_help_lists_the_catalog(capsys):
    for command in ("train", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for name in ("schedule-free-adamw", "lion", "lookahead", "prodigy", "sign-sgd",
                     "galore"):
            assert name in text, (command, name)


# -- schedule-free evaluation, data-parallel -----------------------------------------------------
def test_schedule_free_runs_evaluate_the_averaged_weights(built, tmp_path):
    import numpy as np

    out = tmp_path / "run"
    assert main(["train", "--optimizer", "schedule-free-sgd", *QUICK, "--epochs", "1",
                 "--out", str(out)]) == 0
    run = built[0]
    x = run.optimizer.eval_params(run.state, run.params)
    evaluated = run.eval_params()
    name = next(iter(x))
    assert np.array_equal(np.asarray(evaluated[name]), np.asarray(x[name]))
    assert not np.allclose(np.asarray(evaluated[name]), np.asarray(run.params[name]))
    # the written test loss is the averaged weights' (not the gradient point's)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_loss"] == pytest.approx(run.evaluate("test")["loss"])


def test_schedule_free_with_mixed_precision_evaluates_the_masters_average(built, tmp_path):
    """bfloat16 compute, float32 masters: the evaluated weights are the schedule-free
    average x of the masters, cast to bfloat16 (not the gradient point's compute copy)."""
    import numpy as np

    out = tmp_path / "run"
    assert main(["train", "--optimizer", "schedule-free-adamw", *QUICK, "--epochs", "1",
                 "--backend", "torch", "--mixed-precision", "bf16", "--out", str(out)]) == 0
    run = built[0]
    trainer = run.trainer
    x = run.optimizer.eval_params(run.state, trainer.master_params)
    evaluated, point = run.eval_params(), trainer.compute_params()
    name = next(iter(x))
    as_f32 = lambda a: np.asarray(run.backend.to_numpy(a), dtype=np.float32)  # noqa: E731
    assert str(evaluated[name].dtype) == str(point[name].dtype) == "torch.bfloat16"
    want = as_f32(trainer._engine.cast_tree({name: x[name]}, trainer._engine.cdt)[name])
    assert np.array_equal(as_f32(evaluated[name]), want)
    assert not np.array_equal(as_f32(evaluated[name]), as_f32(point[name]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_loss"] == pytest.approx(run.evaluate("test")["loss"])


@pytest.mark.parametrize("name", ["prodigy", "dog", "dowg"])
def test_shard_state_takes_optimizer_wide_values(name, capsys, tmp_path):
    """Refused before; the sharded step now gathers every rank's per-tensor sums
    (mithril.distributed.global_sums), and the dry run passes the check. (schedule-free
    with --shard-state is refused since 2dc29180: each process holds only its share of the
    averaged x that one process evaluates; tests/test_hunt67_distributed.py.)"""
    assert main(["train", "--optimizer", name, "--nprocs", "2", "--shard-state", "--dry-run",
                 "--out", str(tmp_path / "r")]) == 0


@pytest.mark.parametrize("argv", [["compare", "--configs", "adamx"],
                                  ["train", "--optimizer", "adamx", "--dry-run"]])
def test_an_unknown_name_lists_only_usable_optimizers(capsys, argv):
    """The choices listed are those the command takes: L-BFGS (refused by train and compare:
    it needs a closure) was listed, and then refused when chosen."""
    err = usage_error(capsys, argv)
    assert "adamx" in err and "lion" in err and "yogi" in err
    assert not any(name in err for name in REFUSED), err
