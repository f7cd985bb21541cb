"""Lookahead's ``load_state_dict`` restores a state as every optimizer's does (the shared
``_loaded_state``): its run of skipped steps (``consecutive_skips``) included, so a run
resumed in the middle of one gives up on the same step, bit for bit; unknown keys, a
malformed ``"missed"`` and averaged counts beyond the step are refused by name, and a
refused load changes nothing."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from mithril.utils.optimizers import Adam, Lookahead

#: per step: finite, or NaN in "a"; with max_consecutive_skips=2 the 3rd NaN in a row is
#: applied anyway (a NaN in the params from then on)
PATTERN = ["f", "f", "nan", "nan", "nan", "f"]
CUT = 3  # saved after the first NaN step: consecutive_skips == 1


def make() -> Lookahead:
    return Lookahead(Adam(0.05, nonfinite="skip", max_consecutive_skips=2, ema_decay=0.9),
                     sync_period=2, slow_step_size=0.5)


def start(backend: str) -> dict:
    rng = np.random.default_rng(0)
    p = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    return {n: torch.tensor(a) if backend == "torch" else a for n, a in p.items()}


def grad(t: int, backend: str) -> dict:
    rng = np.random.default_rng(10 + t)
    g = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    if PATTERN[t] == "nan":
        g["a"][1, 2] = np.nan
    return {n: torch.tensor(a) if backend == "torch" else a for n, a in g.items()}


def host(p: dict) -> dict:
    return {n: v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
            for n, v in p.items()}


def run(opt, p, state, steps, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in steps:
            p, state = opt.update(p, grad(t, backend), state)
    return p, state


def counters(state) -> tuple:
    return (state.step, state.num_skipped, state.num_nonfinite, state.consecutive_skips)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_resume_mid_run_of_skips_bit_for_bit(backend) -> None:
    opt = make()
    p0 = start(backend)
    want, ws = run(opt, p0, opt.init(p0), range(len(PATTERN)), backend)
    assert np.isnan(host(want)["a"]).any()  # (the run of 3 gave up at its 3rd)

    p, st = run(opt, p0, opt.init(p0), range(CUT), backend)
    d = opt.state_dict(st)
    assert d["consecutive_skips"] == 1
    other = make()
    st2 = other.load_state_dict(d, p)
    assert counters(st2) == counters(st)
    p2, st2 = run(other, p, st2, range(CUT, len(PATTERN)), backend)
    for n, v in host(want).items():
        np.testing.assert_array_equal(host(p2)[n], v, err_msg=n)
    assert counters(st2) == counters(ws)
    np.testing.assert_array_equal(host(other.ema_params(st2))["b"], host(opt.ema_params(ws))["b"])


def _saved() -> tuple[Lookahead, dict, dict]:
    opt = make()
    p = start("numpy")
    p, st = run(opt, p, opt.init(p), range(2), "numpy")
    return opt, opt.state_dict(st), p


@pytest.mark.parametrize("edit, error, match", [
    (lambda d: d.update(extra=1), KeyError, "'extra' unknown to Lookahead"),
    (lambda d: d.update(missed=[]), TypeError, "'missed' must be a dict"),
    (lambda d: d.update(missed={"a": 3}), ValueError, "'missed' of 'a' is 3"),
    (lambda d: d["averaged"]["ema"].update(a=3), ValueError, "'averaged' count of 'ema'.*'a'"),
    (lambda d: d["averaged"]["ema"].update(b=2**70), ValueError, "'averaged' count"),
    (lambda d: d.update(consecutive_skips=2**70), ValueError, "'consecutive_skips'"),
    (lambda d: d.update(step=2**70), ValueError, "'step' is too large"),
], ids=["unknown-key", "missed-list", "missed-beyond-step", "averaged-beyond-step",
        "averaged-2**70", "consecutive-2**70", "step-2**70"])
def test_refused_load_changes_nothing(edit, error, match) -> None:
    opt, d, p = _saved()
    d["hyperparameters"]["sync_period"] = 5  # (would change the optimizer, if loaded)
    edit(d)
    kept = copy.deepcopy(d)
    before = (opt.sync_period, opt.inner, opt.inner.learning_rate)
    with pytest.raises(error, match=match):
        opt.load_state_dict(d, p)
    assert (opt.sync_period, opt.inner, opt.inner.learning_rate) == before
    assert d.keys() == kept.keys() and d["averaged"] == kept["averaged"]
