"""Hunt 67, second pass: ``mithril`` command-line flags as a torch / Keras user gives them:
turning a job's default off, errors naming what was typed, resumes, predictions."""

from __future__ import annotations

import json
from pathlib import Path

import conftest
import numpy as np
from test_hunt67_cli_tasks import charlm, usage_error

from mithril.cli import main
from mithril.utils.checkpoint import load_checkpoint


# -- a default that is on can be turned off ------------------------------------------------------
def test_charlm_default_clip_norm_is_turned_off_with_none(tmp_path, capsys):
    """charlm clips at 1 by default; ``--clip-norm none`` was 'not a number' and ``0`` is
    refused by the optimizer, so a run without clipping (torch without clip_grad_norm_, Keras
    without clipnorm) could not be asked for. ``none`` now is that run: the same weights as a
    clip that never binds, and no clip_norm in the summary."""
    base = [*charlm(tmp_path), "--steps", "4", "--lr", "0.5", "--warmup-steps", "0"]
    assert main([*base, "--clip-norm", "none", "--out", str(tmp_path / "off")]) == 0
    assert main([*base, "--clip-norm", "1e30", "--out", str(tmp_path / "huge")]) == 0
    assert main([*base, "--out", str(tmp_path / "on")]) == 0
    off = load_checkpoint(tmp_path / "off" / "checkpoint.safetensors")["params"]
    huge = load_checkpoint(tmp_path / "huge" / "checkpoint.safetensors")["params"]
    on = load_checkpoint(tmp_path / "on" / "checkpoint.safetensors")["params"]
    assert all(np.array_equal(off[k], huge[k]) for k in off)
    assert not all(np.array_equal(off[k], on[k]) for k in off)  # (the default clip binds)
    summary = (tmp_path / "off" / "summary.json").read_text()
    assert '"clip_norm"' not in summary
    # resumed, the run keeps no clipping (and refuses one added)
    assert main(["train", "--resume", str(tmp_path / "off"), "--steps", "6"]) == 0
    err = usage_error(capsys, ["train", "--resume", str(tmp_path / "off"), "--steps", "8",
                               "--clip-norm", "1"])
    assert "clip_norm" in err


def test_charlm_clip_norm_none_in_the_optimizer_spec_too(tmp_path, capsys):
    """The docs say a spec's value may be ``none``; ``adamw:clip_norm=none`` was 'not a valid
    number'. It is the run of ``--clip-norm none`` now."""
    base = [*charlm(tmp_path), "--steps", "2", "--lr", "0.5", "--warmup-steps", "0"]
    assert main([*base, "--clip-norm", "none", "--out", str(tmp_path / "flag")]) == 0
    assert main([*base, "--optimizer", "adamw:clip_norm=none", "--out",
                 str(tmp_path / "spec")]) == 0
    a = load_checkpoint(tmp_path / "flag" / "checkpoint.safetensors")["params"]
    b = load_checkpoint(tmp_path / "spec" / "checkpoint.safetensors")["params"]
    assert all(np.array_equal(a[k], b[k]) for k in a)


# -- errors name what the user typed ------------------------------------------------------------
def test_a_spec_value_error_names_the_key_not_a_flag(tmp_path, capsys, monkeypatch):
    """``mithril cache warm adam:beta1=2`` said '(--beta1)', a flag cache warm does not have
    (nor compare, whose docs showed it so): the spec's key now where the command has no such
    flag."""
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path / "cache"))
    err = usage_error(capsys, ["cache", "warm", "adam:beta1=2", "--backend", "numpy"])
    assert "beta1 must be in [0, 1), got 2.0 (key beta1)" in err and "--beta1" not in err
    err = usage_error(capsys, ["cache", "warm", "adam:clip_eps=0", "--backend", "numpy"])
    assert "clip_eps only applies with clip_norm" in err and "got clip_eps=0" in err
    assert "--clip" not in err
    err = usage_error(capsys, ["cache", "warm", "lookahead:inner=adam,eps=-1"])
    assert "(key eps)" in err and "--eps" not in err
    out = tmp_path / "t"  # (train has the flag: its spec's key is named by it, as before)
    err = usage_error(capsys, ["train", "--optimizer", "adam:beta1=2", "--dry-run", "--out",
                               str(out)])
    assert "(--beta1)" in err
    err = usage_error(capsys, ["compare", "--configs", "adam:eps=0", "sgd", "--dry-run",
                               "--out", str(out)])
    assert "(key eps)" in err and "--eps" not in err
    assert not out.exists()


# -- DP-SGD on charlm: no accounting, said so ---------------------------------------------------
def test_charlm_dpsgd_says_there_is_no_accounting_without_nan(tmp_path, capsys):
    """charlm's batches are overlapping windows of the text: there is no per-example sampling
    rate, so no ε. The run printed 'no accounting ... sampling rate nan' and its header
    promised 'ε at δ = 1e-05 reported at the end'; --delta was taken and ignored."""
    base = [*charlm(tmp_path), "--steps", "2", "--optimizer", "dpsgd"]
    assert main([*base, "--out", str(tmp_path / "dp")]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "reported at the end" not in out
    assert "no ε" in out and "overlapping windows" in out
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] is None and summary["privacy"]["sample_rate"] is None
    assert main(["train", "--resume", str(tmp_path / "dp"), "--steps", "4"]) == 0
    assert "nan" not in capsys.readouterr().out
    err = usage_error(capsys, [*base, "--delta", "1e-6", "--out", str(tmp_path / "d")])
    assert "--delta 1e-06 does not apply to charlm" in err
    assert not (tmp_path / "d").exists()


# -- resume: what only shapes the sample may change ---------------------------------------------
def test_charlm_resume_takes_another_temperature_as_it_takes_sample_chars(tmp_path, capsys):
    """--temperature only shapes the text sampled after training (as --sample-chars, which a
    resume took): a resume refused it as a change of the run. Now the resumed run is the run
    that did not stop, its sample drawn at the new temperature; the model flags stay refused."""
    base = [*charlm(tmp_path), "--sample-chars", "20"]
    assert main([*base, "--steps", "4", "--temperature", "0.5", "--out",
                 str(tmp_path / "straight")]) == 0
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "cut")]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--steps", "4",
                 "--temperature", "0.5"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")["params"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["params"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "sample.txt").read_text() == \
        (tmp_path / "cut" / "sample.txt").read_text()
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["config"]["task_settings"]["temperature"] == 0.5
    err = usage_error(capsys, ["train", "--resume", str(tmp_path / "cut"), "--steps", "6",
                               "--d-model", "8"])
    assert "task_settings.d_model" in err


# -- a job's Adam rate is not another optimizer's ------------------------------------------------
def _params(folder: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(folder / "checkpoint.safetensors")["params"]


def test_digits_cnn_gives_another_optimizer_its_own_default_rate(tmp_path, capsys):
    """digits-cnn's default rate 3e-3 (tuned for its Adam) was given to every --optimizer:
    Ftrl stayed at ln 10 (Keras's Ftrl(0.1) on the same CNN learns), Prodigy's multiplier
    was 0.003 (loss 2.98 after 3 epochs), SGD ran at 3e-3, not its 0.05. Now each takes its
    own default, the run the explicit --lr gives; Adam keeps 3e-3."""
    base = ["train", "--task", "digits-cnn", "--epochs", "1", "--channels", "4",
            "--no-progress", "--no-plot", "--checkpoint"]
    for opt, lr in (("sgd", "0.05"), ("ftrl", "0.1"), ("adam", "3e-3")):
        assert main([*base, "--optimizer", opt, "--out", str(tmp_path / opt)]) == 0
        assert main([*base, "--optimizer", opt, "--lr", lr, "--out", str(tmp_path / "lr")]) == 0
        a, b = _params(tmp_path / opt), _params(tmp_path / "lr")
        assert all(np.array_equal(a[k], b[k]) for k in a), opt
    assert main(["train", "--task", "digits-cnn", "--epochs", "3", "--scheduler", "none",
                 "--optimizer", "ftrl", "--no-progress", "--no-plot", "--out",
                 str(tmp_path / "learns")]) == 0
    summary = json.loads((tmp_path / "learns" / "summary.json").read_text())
    assert summary["final"]["train_loss"] < 1.0  # (0.64; was 2.3024, about ln 10)


def test_charlm_gives_another_optimizer_its_own_rate_and_no_adamw_decay(tmp_path, capsys):
    """charlm's AdamW 3e-3 with decoupled decay 0.1 went to --optimizer adam as rate 3e-3
    and coupled L2 0.1. Now adam runs as Adam's defaults (1e-3, no decay)."""
    base = [*charlm(tmp_path), "--steps", "2", "--optimizer", "adam"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--lr", "1e-3", "--weight-decay", "0", "--out", str(tmp_path / "b")]) == 0
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert main([*charlm(tmp_path), "--steps", "2", "--out", str(tmp_path / "w")]) == 0
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["config"]["settings"]["lr"] == 3e-3
    assert summary["config"]["settings"]["weight_decay"] == 0.1


# -- bad flag values: named, nothing run --------------------------------------------------------
def test_an_empty_resume_is_refused_not_a_fresh_run(tmp_path, capsys):
    """``--resume ''`` (a shell variable left empty) was taken as no --resume: a fresh run
    started, exit status 0. Refused now, as an empty --data or --run."""
    out = tmp_path / "run"
    for argv in (["train", "--epochs", "1"], ["compare", "--configs", "adam", "sgd"]):
        err = usage_error(capsys, [*argv, "--resume", "", "--out", str(out)])
        assert "argument --resume: must not be empty" in err
        assert not out.exists()


def test_a_scheduler_error_names_the_flag_of_torchs_capitalised_argument(tmp_path, capsys):
    """CosineAnnealingLR's 'T_max must be > 0' and the warm restarts' 'T_0 ...' were not
    matched to --t-max / --t-0 (the other settings' flags were named)."""
    out = tmp_path / "lr.png"
    err = usage_error(capsys, ["plot-schedule", "--t-max", "-1", "--out", str(out)])
    assert "T_max must be > 0.0, got -1.0 (--t-max)" in err
    err = usage_error(capsys, ["plot-schedule", "--scheduler", "cosine-restarts", "--t-0", "0",
                               "--out", str(out)])
    assert "(--t-0)" in err
    err = usage_error(capsys, ["train", "--t-max", "0", "--dry-run", "--out", str(out)])
    assert "(--t-max)" in err
    assert not out.exists() and not out.with_suffix(".csv").exists()


def test_an_unknown_flag_is_named_by_its_command(tmp_path, capsys):
    """``mithril compare --beta1 0.8`` said 'mithril: error: unrecognized arguments' under the
    top-level usage; the command's now, with where optimizer settings go in compare."""
    out = tmp_path / "cmp"
    err = usage_error(capsys, ["compare", "--configs", "adam", "sgd", "--beta1", "0.8",
                               "--dry-run", "--out", str(out)])
    assert "mithril compare: error: unrecognized arguments: --beta1 0.8" in err
    assert "--configs 'adam:beta1=...'" in err
    err = conftest.usage_error(capsys, ["compare", "--steps", "3", "--out", str(out)])
    assert "usage: mithril compare" in err and "mithril compare: error: unrecognized " \
        "arguments: --steps 3" in err
    assert not out.exists()
