"""Review of DP-SGD as an Opacus user: the privacy accountant beside Opacus 1.6's
(``RDPAccountant``, ``PRVAccountant``, ``get_noise_multiplier``), run side by side, and
``mithril train --optimizer dpsgd`` with the ε it reports. Per-sample gradients and the DP
step beside Opacus: ``test_review_privacy49_opacus.py``."""

from __future__ import annotations

import builtins
import math
import re
import warnings

import numpy as np
import pytest
from conftest import usage_error

opacus = pytest.importorskip("opacus")  # (the test extra installs it: a peer, not a feature)
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier as opacus_noise  # noqa: E402

from mithril.cli import main  # noqa: E402
from mithril.utils import privacy_accounting as pa  # noqa: E402
from mithril.utils.optimizers import differentially_private as dp_module  # noqa: E402

#: (σ, q, steps, δ) where the best Rényi order is large (σ ≳ 1.1 and ε ≲ 5: the usual runs,
#: e.g. MNIST's 60,000 examples in batches of 256) or an integer
RUNS = [(1.1, 256 / 60000, 2000, 1e-5), (4.0, 0.1, 10, 1e-3), (1.0, 1.0, 50, 1e-5),
        (2.0, 0.001, 1, 1e-5), (10.0, 0.3, 7, 1e-5), (1.5, 0.01, 10000, 1e-5),
        (4.0, 0.05, 1000, 1e-6)]
#: where the best order is small and fractional: dp_accounting 0.6 sums the fractional
#: order's binomial series without the coefficients' signs (|binom(α, i)|), an upper bound
#: of Opacus's (exact) A_α: ε is larger by this much at most (measured)
LOOSER = [(1.0, 0.01, 1000, 1e-5, 1e-6), (1.1, 0.05, 10000, 1e-5, 3e-2),
          (0.8, 0.05, 3000, 1e-5, 4e-2), (0.6, 0.004, 10000, 1e-5, 2e-3),
          (2.0, 0.05, 10000, 1e-6, 1e-3)]


def opacus_rdp(history: list, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():  # (its "optimal order is the largest alpha" note)
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps, delta", RUNS)
def test_epsilon_equals_opacus_rdp_accountant(sigma, q, steps, delta) -> None:
    ours = pa.get_epsilon(sigma, q, steps, delta)
    theirs = opacus_rdp([(sigma, q, steps)], delta)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=0)


def test_the_accountant_steps_as_opacus_and_mixes_settings() -> None:
    ours, theirs = pa.PrivacyAccountant(), RDPAccountant()
    for sigma, q in [(1.5, 0.01)] * 30 + [(3.0, 0.02)] * 20 + [(1.5, 0.01)] * 5:
        ours.step(noise_multiplier=sigma, sample_rate=q)
        theirs.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.history == theirs.history
    assert ours.get_epsilon(1e-5) == pytest.approx(opacus_rdp(theirs.history, 1e-5), rel=1e-9)
    again = pa.PrivacyAccountant()
    again.load_state_dict(ours.state_dict())
    assert again.history == ours.history and len(again) == 3
    assert pa.PrivacyAccountant().get_epsilon(1e-5) == 0.0


@pytest.mark.parametrize("sigma, q, steps, delta, rel", LOOSER)
def test_where_the_best_order_is_small_epsilon_is_a_looser_bound(sigma, q, steps, delta,
                                                                 rel) -> None:
    """σ=0.8, q=0.05, α=1.8: log A_α is 0.00685 here, 0.00643 in Opacus and by numerical
    integration (mpmath, 40 digits): ε is larger than Opacus's, still a valid bound."""
    ours = pa.get_epsilon(sigma, q, steps, delta)
    theirs = opacus_rdp([(sigma, q, steps)], delta)
    assert theirs < ours <= theirs * (1 + rel)


@pytest.mark.parametrize("target, q, epochs, delta", [(3.0, 0.004, 10, 1e-5),
                                                      (1.0, 0.01, 5, 1e-5),
                                                      (8.0, 256 / 60000, 15, 1e-5)])
def test_noise_multiplier_equals_opacus(target, q, epochs, delta) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = opacus_noise(target_epsilon=target, target_delta=delta, sample_rate=q,
                              epochs=epochs)
    ours = pa.get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q,
                                   epochs=epochs)
    assert ours == pytest.approx(theirs, rel=1e-12)
    steps = int(epochs / q)
    eps = pa.get_epsilon(ours, q, steps, delta)
    assert target - 0.01 <= eps <= target  # (Opacus's tolerance, from below)
    same = pa.get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q,
                                   steps=steps)
    assert same == ours


def test_pld_is_within_two_percent_of_opacus_prv() -> None:
    for sigma, q, steps, delta in [(1.1, 256 / 60000, 2000, 1e-5), (2.0, 0.05, 500, 1e-6)]:
        prv = PRVAccountant()
        prv.history = [(sigma, q, steps)]
        theirs = prv.get_epsilon(delta)
        ours = pa.get_epsilon(sigma, q, steps, delta, accountant="pld")
        assert ours == pytest.approx(theirs, rel=0.02)
        assert ours < pa.get_epsilon(sigma, q, steps, delta)  # (tighter than RDP)


def test_no_noise_is_no_privacy_and_no_step_is_none() -> None:
    assert pa.get_epsilon(0.0, 0.01, 10, 1e-5) == math.inf
    assert pa.get_epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert math.isinf(opacus_rdp([(0.0, 0.01, 10)], 1e-5))


@pytest.mark.parametrize("kwargs, match", [
    ({"noise_multiplier": -1.0}, "noise_multiplier must be in"),
    ({"sample_rate": 1.5}, "sample_rate must be in"),
    ({"steps": 2.5}, "steps must be a non-negative integer"),
    ({"delta": 1.0}, "delta must be in"),
    ({"delta": float("nan")}, "delta must be a finite number"),
    ({"accountant": "prv"}, "accountant must be one of 'rdp', 'pld'"),
])
def test_bad_arguments_are_named(kwargs, match) -> None:
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=match):
        pa.get_epsilon(**args)


def test_a_refused_step_or_load_changes_nothing() -> None:
    acc = pa.PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=3)
    before = acc.state_dict()
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(noise_multiplier=1.0, sample_rate=-0.1)
    with pytest.raises(ValueError, match="history entry"):
        acc.load_state_dict({"mechanism": "rdp", "history": [[1.0, 0.1, 2], [1.0]]})
    with pytest.raises(ValueError, match="accountant must be one of"):
        acc.load_state_dict({"mechanism": "moments", "history": []})
    assert acc.state_dict() == before


def test_noise_multiplier_errors() -> None:
    with pytest.raises(ValueError, match="either steps or epochs"):
        pa.get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01)
    with pytest.raises(ValueError, match="out of reach"):
        pa.get_noise_multiplier(target_epsilon=1e-9, target_delta=1e-12, sample_rate=1.0,
                                steps=10**6)
    with pytest.raises(ValueError, match="target_epsilon must be in"):
        pa.get_noise_multiplier(target_epsilon=0.0, target_delta=1e-5, sample_rate=0.01,
                                steps=10)


def test_missing_dp_accounting_names_the_extra(monkeypatch) -> None:
    real = builtins.__import__

    def no_dp(name, *args, **kwargs):
        if name.startswith("dp_accounting"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dp)
    with pytest.raises(ImportError, match=r"pip install 'mithril\[privacy\]'"):
        pa.get_epsilon(1.0, 0.01, 10, 1e-5)


def test_exported_beside_the_dp_optimizer() -> None:
    assert dp_module.get_epsilon is pa.get_epsilon
    assert dp_module.get_noise_multiplier is pa.get_noise_multiplier
    assert dp_module.PrivacyAccountant is pa.PrivacyAccountant
    assert np.isfinite(dp_module.get_epsilon(1.0, 0.01, 10, 1e-5))


def test_exported_from_the_optimizers_package() -> None:
    from mithril.utils import optimizers

    assert optimizers.get_epsilon is pa.get_epsilon
    assert optimizers.get_noise_multiplier is pa.get_noise_multiplier
    assert optimizers.PrivacyAccountant is pa.PrivacyAccountant


# -- mithril train --optimizer dpsgd -----------------------------------------------------------

QUICK = ["--epochs", "1", "--hidden", "16", "--scheduler", "none", "--no-progress", "--no-plot"]
DIGITS_ROWS = 1437  # (the digits task's training rows: its fixed split)


def summary(out) -> dict:
    import json

    with open(out / "summary.json") as f:
        return json.load(f)


def test_cli_trains_with_dpsgd_and_reports_opacus_epsilon(tmp_path, capsys) -> None:
    out = tmp_path / "dp"
    assert main(["train", "--optimizer", "dpsgd:noise_multiplier=1.5,l2_norm_clip=0.8",
                 "--delta", "1e-6", *QUICK, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    got = summary(out)
    priv = got["privacy"]
    q = 64 / DIGITS_ROWS
    assert got["steps"] == 23 and priv["steps"] == 23 and priv["sample_rate"] == q
    assert priv["noise_multiplier"] == 1.5 and priv["l2_norm_clip"] == 0.8
    assert priv["epsilon"] == pytest.approx(opacus_rdp([(1.5, q, 23)], 1e-6), rel=1e-9)
    assert f"privacy: ε = {priv['epsilon']:.4g} at δ = 1e-06" in printed
    assert got["final"]["test_acc"] > 0.3  # (it learns: 10 classes)


def test_cli_target_epsilon_sets_opacus_noise_multiplier(tmp_path) -> None:
    out = tmp_path / "dp"
    assert main(["train", "--optimizer", "dpsgd", "--target-epsilon", "1.5", *QUICK,
                 "--out", str(out)]) == 0
    priv = summary(out)["privacy"]
    q = 64 / DIGITS_ROWS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = opacus_noise(target_epsilon=1.5, target_delta=1e-5, sample_rate=q, steps=23)
    assert priv["noise_multiplier"] == pytest.approx(want, rel=1e-12)
    assert 1.5 - 0.01 <= priv["epsilon"] <= 1.5


@pytest.mark.parametrize("argv, match", [
    (["--task", "digits-cnn", "--optimizer", "dpsgd"],
     "BatchNorm .* has them. Train a model without them \\(digits-cnn: --no-batchnorm"),
    (["--optimizer", "dpsgd", "--nprocs", "2"], "dpsgd \\(DP-SGD\\) trains in one process"),
    (["--optimizer", "adam", "--delta", "1e-6"], "--delta only applies with a DP-SGD"),
    (["--optimizer", "dpsgd", "--ema", "0.9"],
     "--ema does not apply to optimizer dpsgd \\(its SGD is its own\\)"),
    (["--optimizer", "lookahead:inner=dpsgd"], "cannot be lookahead's inner optimizer"),
    (["--optimizer", "dpsgd", "--clip-norm", "1"],
     "--clip-norm does not apply to optimizer dpsgd: it clips each example's gradient to "
     "l2_norm_clip"),
    (["--optimizer", "dpsgd:noise_multiplier=1", "--target-epsilon", "2"],
     "give it or noise_multiplier=, not both"),
    (["--optimizer", "dpsgd", "--mixed-precision", "bf16"], "--mixed-precision does not apply"),
    (["--optimizer", "dpsgd", "--delta", "0"], "argument --delta: must be in \\(0, 1\\)"),
])
def test_cli_refusals_name_the_flag_and_write_nothing(tmp_path, capsys, argv, match) -> None:
    out = tmp_path / "dp"
    err = usage_error(capsys, ["train", *argv, "--epochs", "1", "--no-progress", "--out",
                               str(out)], last=True)
    assert re.search(match, err), err
    assert not out.exists()


def test_cli_a_dp_run_is_not_resumed_and_its_folder_stays(tmp_path, capsys) -> None:
    """A run sized by --target-epsilon cannot be lengthened on resume: its σ was sized to
    the run's length (once, a resumed run rebuilt σ for the longer run and reported an ε
    that took that σ for every step: 1.074 then 1, ε 2.81 instead of the run's)."""
    out = tmp_path / "dp"
    assert main(["train", "--optimizer", "dpsgd", "--target-epsilon", "2", "--checkpoint",
                 *QUICK, "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir()), summary(out)
    capsys.readouterr()
    err = usage_error(capsys, ["train", "--resume", str(out), "--epochs", "2",
                               "--no-progress"], last=True)
    assert "--resume: the run's noise multiplier was" in err and "keep --epochs 1" in err
    assert (sorted(p.name for p in out.iterdir()), summary(out)) == before


def test_cli_a_cnn_without_batchnorm_and_dropout_is_accepted(tmp_path) -> None:
    assert main(["train", "--task", "digits-cnn", "--optimizer", "dpsgd", "--no-batchnorm",
                 "--dropout", "0", "--dry-run", "--out", str(tmp_path / "dp")]) == 0


def test_cli_the_wrapper_takes_ema_through_its_base(tmp_path) -> None:
    out = tmp_path / "dp"
    assert main(["train", "--optimizer",
                 "differentially-private:base_optimizer=sgd,noise_multiplier=2",
                 "--lr", "0.5", "--ema", "0.9", *QUICK, "--out", str(out)]) == 0
    got = summary(out)
    assert "test_acc_ema" in got["final"]
    assert got["privacy"]["epsilon"] == pytest.approx(
        opacus_rdp([(2.0, 64 / DIGITS_ROWS, 23)], 1e-5), rel=1e-9)

