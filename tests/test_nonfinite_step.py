"""A step that makes params or optimizer state non-finite is detected whatever its cause
(issue #12, point 4): finite gradients with a learning rate too large for the dtype, a
finite gradient whose square overflows a slot, as well as the non-finite gradients the
policies always caught. Each policy on every engine:

* ``"propagate"``: the step is applied, a ``RuntimeWarning`` names the cause and
  ``num_nonfinite`` grows by one; values that stay non-finite are not reported again
  (``state.nonfinite_values``) until a step gives finite values;
* ``"skip"``: params, every slot and the counters but ``num_skipped`` are bitwise as
  before, and so are arrays an earlier update returned;
* ``"raise"``: ``FloatingPointError`` naming exactly the parameters at fault; nothing
  changed.

Engines: the fused numba kernel (NumPy, torch CPU, JAX CPU), the jitted JAX engine
(``jax-jit``), the tensor-op engine (float16 on NumPy and torch) and torch's fused kernels
(``torch-ops``: the CUDA engine, forced on CPU; its probe reads the flat buffers after the
kernel).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from optimizer_parity import engine_of, host, native

from mithril.utils.optimizers import SGD, Adam, RMSProp

ENGINES = ("numpy", "torch", "jax", "jax-jit", "numpy-f16", "torch-f16", "torch-ops")


def _backend_dtype(engine: str) -> tuple[str, str]:
    b, _, d = engine.partition("-")
    return ("jax" if b == "jax" else b), ("float16" if d == "f16" else "float32")


def _arrays(engine: str, d: dict) -> dict:
    backend, dtype = _backend_dtype(engine)
    return {k: native(backend, np.asarray(v, dtype=dtype)) for k, v in d.items()}


def _snap(params: dict, state) -> tuple:
    return ({k: host(v) for k, v in params.items()},
            {s: {k: host(v) for k, v in state.slot(s).items()} for s in state.slots},
            (state.step, state.num_skipped, state.num_nonfinite))


def _same(a: tuple, b: tuple) -> None:
    assert a[2] == b[2]
    for x, y in ((a[0], b[0]), *zip(a[1].values(), b[1].values())):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _problem(engine: str):
    """SGD on two params where ``w[0]`` is near the dtype's largest value, so that a finite
    gradient carries it past it; ``b`` stays finite."""
    big = float(np.finfo(_backend_dtype(engine)[1]).max) * 0.75
    p = {"w": [-big, 1.0, 2.0], "b": [0.5, -0.5]}
    g_bad = {"w": [big, 0.1, 0.2], "b": [0.1, 0.1]}  # finite; w[0] - g[0] overflows
    g_ok = {"w": [0.0, 0.1, 0.2], "b": [0.1, 0.1]}
    return _arrays(engine, p), _arrays(engine, g_bad), _arrays(engine, g_ok)


def _update(opt, params, grads, state):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, state = opt.update(params, grads, state)
        # the engines that queue work on a device read a "propagate" step's norm and probe
        # when needed (OptimizerState.settle): now, for its warning to be caught here
        state.settle()
    return params, state, [str(w.message) for w in caught if w.category is RuntimeWarning]


@pytest.mark.parametrize("engine", ENGINES)
def test_propagate_warns_and_counts_once(engine):
    with engine_of(engine.split("-f16")[0]):
        p, g_bad, g_ok = _problem(engine)
        opt = SGD(1.0, momentum=0.9)
        state = opt.init(p)
        p, state, msgs = _update(opt, p, g_ok, state)
        assert msgs == [] and state.num_nonfinite == 0
        p, state, msgs = _update(opt, p, g_bad, state)
        assert state.step == 2 and state.num_nonfinite == 1 and not state.last_step_skipped
        assert any("finite gradients, but the step made params or state non-finite" in m
                   for m in msgs), msgs
        assert np.isinf(host(p["w"])[0]) and np.isfinite(host(p["b"])).all()
        # w[0] was already inf before this step: nothing new is counted or warned about
        p, state, msgs = _update(opt, p, g_ok, state)
        assert state.num_nonfinite == 1 and msgs == [], msgs
        assert np.isfinite(state.last_grad_norm)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("ours", [True, False], ids=["returned-params", "fresh-params"])
def test_skip_changes_nothing(engine, ours):
    with engine_of(engine.split("-f16")[0]):
        p, g_bad, g_ok = _problem(engine)
        opt = SGD(1.0, momentum=0.9, nonfinite="skip")
        state = opt.init(p)
        p, state, _ = _update(opt, p, g_ok, state)  # the state now owns params and momentum
        before = _snap(p, state)
        given = p if ours else _arrays(engine, before[0])
        out, state, msgs = _update(opt, given, g_bad, state)
        assert state.last_step_skipped and state.num_skipped == 1 and state.step == 1
        assert any("would give non-finite params or state; step skipped" in m for m in msgs), msgs
        assert state.num_nonfinite == 0
        _same(_snap(p, state), (before[0], before[1], (1, 1, 0)))  # earlier arrays included
        _same(_snap(out, state), (before[0], before[1], (1, 1, 0)))
        # and the next good step is the one an unskipped run takes
        out, state, msgs = _update(opt, out, g_ok, state)
        assert state.step == 2 and msgs == []


@pytest.mark.parametrize("engine", ENGINES)
def test_raise_names_the_parameter_and_changes_nothing(engine):
    with engine_of(engine.split("-f16")[0]):
        p, g_bad, g_ok = _problem(engine)
        opt = SGD(1.0, momentum=0.9, nonfinite="raise")
        state = opt.init(p)
        p, state, _ = _update(opt, p, g_ok, state)
        before = _snap(p, state)
        with pytest.raises(FloatingPointError, match=r"finite gradients.*optimizer state for \['w'\]"):
            opt.update(p, g_bad, state)
        _same(_snap(p, state), before)
        assert not state.last_step_skipped or state.num_skipped == 0


@pytest.mark.parametrize("engine", ("numpy", "torch", "jax", "jax-jit"))
@pytest.mark.parametrize("policy", ["propagate", "skip", "raise"])
def test_learning_rate_too_large_for_the_dtype(engine, policy):
    """lr = 1e38 in float32: Adam's step size lr/(1-β₁) is inf, with finite gradients."""
    with engine_of(engine):
        p = _arrays(engine, {"w": np.ones((3, 4)), "b": np.ones(4)})
        g = _arrays(engine, {"w": np.full((3, 4), 0.5), "b": np.full(4, 0.5)})
        opt = Adam(1e38, nonfinite=policy)
        state = opt.init(p)
        before = _snap(p, state)
        if policy == "raise":
            with pytest.raises(FloatingPointError, match=r"\['w', 'b'\]"):
                opt.update(p, g, state)
            _same(_snap(p, state), before)
            return
        out, state, msgs = _update(opt, p, g, state)
        if policy == "skip":
            assert state.num_skipped == 1 and state.step == 0
            _same(_snap(out, state), (before[0], before[1], (0, 1, 0)))
        else:
            assert state.num_nonfinite == 1 and not np.isfinite(host(out["w"])).all()
        assert len(msgs) == 1, msgs


@pytest.mark.parametrize("engine", ("numpy", "torch", "jax", "jax-jit"))
def test_overflowing_slot_with_finite_params(engine):
    """A finite gradient of 1e20 squares to inf in float32: RMSProp's square average goes
    inf and the parameter stops moving (its update is g/inf = 0) - silent without the probe
    of the slots."""
    with engine_of(engine):
        p = _arrays(engine, {"w": np.ones(4)})
        g = _arrays(engine, {"w": [1e20, 1.0, 1.0, 1.0]})
        opt = RMSProp(0.01)
        state = opt.init(p)
        out, state, msgs = _update(opt, p, g, state)
        assert np.isfinite(host(out["w"])).all()
        assert np.isinf(host(state.slot("v")["w"])[0])
        assert state.num_nonfinite == 1 and len(msgs) == 1, msgs


@pytest.mark.parametrize("engine", ("numpy", "torch", "jax", "jax-jit"))
@pytest.mark.parametrize("name", ["Adam", "RMSProp"])
def test_second_moment_associates_as_torch(engine, name):
    """``(1 − β₂)·g·g`` is torch's ``((1 − β₂)·g)·g`` (``addcmul_``): a float32 gradient of
    1e20 leaves Adam's and RMSProp's (decay 0.99) second moment finite (1e37, 1e38, where
    ``g·g`` alone overflows), and the steps equal torch.optim's, run side by side (the fused
    kernels used to reassociate it: the moment went inf and the parameter froze)."""
    import torch

    p0 = np.array([1.0, -2.0, 3.0], np.float32)
    grads = [np.array([1e20, -1e20, 3e19], np.float32)] + [np.array([0.1, 0.2, -0.3],
                                                                    np.float32)] * 4
    ours = Adam(0.01) if name == "Adam" else RMSProp(0.01, decay=0.99)
    t = torch.tensor(p0, requires_grad=True)
    ref = (torch.optim.Adam([t], lr=0.01) if name == "Adam"
           else torch.optim.RMSprop([t], lr=0.01, alpha=0.99))
    with engine_of(engine):
        params = _arrays(engine, {"w": p0})
        state = ours.init(params)
        for g in grads:
            params, state, msgs = _update(ours, params, _arrays(engine, {"w": g}), state)
            assert not msgs, msgs
            t.grad = torch.tensor(g)
            ref.step()
    want = ref.state[t]["exp_avg_sq" if name == "Adam" else "square_avg"].numpy()
    assert np.isfinite(want).all() and want.max() > 1e36
    np.testing.assert_allclose(host(state.slot("v")["w"]), want, rtol=1e-6)
    np.testing.assert_allclose(host(params["w"]), t.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("engine", ("numpy", "jax-jit"))
def test_clip_norm_with_skip(engine):
    """With clipping by norm the norm is measured first, then the step is computed dry."""
    with engine_of(engine):
        big = float(np.finfo(np.float32).max) * 0.75
        p = _arrays(engine, {"w": [-big, 0.0]})
        g = _arrays(engine, {"w": [3.0, 4.0]})  # norm 5, clipped to 1: w[0] - 3e38·0.6 → -inf
        opt = SGD(float(big) / 0.75, clip_norm=1.0, nonfinite="skip")
        state = opt.init(p)
        before = _snap(p, state)
        out, state, msgs = _update(opt, p, g, state)
        assert state.num_skipped == 1 and state.last_grad_norm == pytest.approx(5.0)
        _same(_snap(out, state), (before[0], before[1], (0, 1, 0)))


@pytest.mark.parametrize("engine", ("numpy", "torch", "jax", "jax-jit"))
def test_params_that_already_are_nonfinite(engine):
    """A NaN the user's params bring in: under propagate it is reported once, and not again
    while it stays (``state.nonfinite_values``); under skip every step is refused until the
    params are repaired, and then the run goes on."""
    with engine_of(engine):
        g = _arrays(engine, {"w": [0.1, 0.1, 0.1]})
        opt = SGD(0.1)
        p = _arrays(engine, {"w": [np.nan, 1.0, 2.0]})
        state = opt.init(p)
        p, state, msgs = _update(opt, p, g, state)
        assert state.num_nonfinite == 1 and len(msgs) == 1 and state.nonfinite_values
        for step in (2, 3):
            p, state, msgs = _update(opt, p, g, state)
            assert state.num_nonfinite == 1 and msgs == [] and state.step == step
        w = host(p["w"])
        assert np.isnan(w[0]) and np.allclose(w[1:], [0.97, 1.97])

        careful = SGD(0.1, nonfinite="skip")
        bad = _arrays(engine, {"w": [np.nan, 1.0, 2.0]})
        state = careful.init(bad)
        out, state, msgs = _update(careful, bad, g, state)
        assert state.step == 0 and state.num_skipped == 1 and len(msgs) == 1, msgs
        assert np.isnan(host(out["w"])[0])
        repaired = _arrays(engine, {"w": [0.0, 1.0, 2.0]})
        out, state, msgs = _update(careful, repaired, g, state)
        assert state.step == 1 and msgs == [] and np.allclose(host(out["w"]), [-0.01, 0.99, 1.99])


def test_nonfinite_gradient_message_unchanged():
    p = {"w": np.ones(3, np.float32)}
    opt = SGD(0.1, nonfinite="raise")
    state = opt.init(p)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient\(s\) for \['w'\]"):
        opt.update(p, {"w": np.array([np.inf, 0, 0], np.float32)}, state)


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if w.category is RuntimeWarning]


@pytest.mark.parametrize("engine", ("jax-jit", "torch-ops"))
def test_deferred_report_is_read_when_needed(engine):
    """The engines that queue work on a device (jitted JAX, torch's fused kernels) leave a
    "propagate" step's norm and probe there: no wait, no warning in ``update``; they are
    read when the next update is queued (outcomes counted in step order, each warning
    naming its step) or when the norm or a counter is read. The step itself is applied at
    once, and "skip" / "raise" never defer (they decide on the values)."""
    with engine_of(engine):
        p, g_bad, g_ok = _problem(engine)
        ref_p, _, _ = _problem("numpy")
        opt, ref = SGD(1.0, momentum=0.9), SGD(1.0, momentum=0.9)
        state, ref_state = opt.init(p), ref.init(ref_p)
        (p, state), msgs = _caught(lambda: opt.update(p, g_ok, state))
        assert msgs == [] and state._report is not None and state.step == 1
        ref_p, ref_state = ref.update(ref_p, {k: host(v) for k, v in g_ok.items()}, ref_state)
        assert state.last_grad_norm == pytest.approx(ref_state.last_grad_norm, rel=1e-6)
        assert state._report is None  # (reading the norm read the report)
        # a step that makes w[0] inf: applied now, reported by the next update
        (p, state), msgs = _caught(lambda: opt.update(p, g_bad, state))
        assert msgs == [] and state.step == 2 and np.isinf(host(p["w"])[0])
        (p, state), msgs = _caught(lambda: opt.update(p, g_ok, state))
        assert len(msgs) == 1 and "non-finite" in msgs[0] and "at step 2;" in msgs[0], msgs
        assert state._report is not None and state.step == 3
        # step 3's report (w[0] still inf: nothing new) read with the counter
        assert _caught(lambda: (state.num_nonfinite, state.nonfinite_values)) == ((1, True), [])
        # a non-finite gradient: counted when asked, warned about once
        bad = dict(g_ok)
        bad["b"] = _arrays(engine, {"b": [np.nan, 0.1]})["b"]
        (p, state), msgs = _caught(lambda: opt.update(p, bad, state))
        assert msgs == [] and state._report is not None
        norm, msgs = _caught(lambda: state.last_grad_norm)
        assert np.isnan(norm) and len(msgs) == 1 and "non-finite gradient" in msgs[0]
        assert "at step 4" in msgs[0] and state.num_nonfinite == 2
        # a saved state holds the counters of every step taken
        (p, state), _ = _caught(lambda: opt.update(p, bad, state))
        saved, msgs = _caught(lambda: opt.state_dict(state))
        assert saved["num_nonfinite"] == 3 and len(msgs) == 1 and "at step 5" in msgs[0]
        for policy in ("skip", "raise", "unchecked"):
            o = SGD(1.0, momentum=0.9, nonfinite=policy)
            q, _, ok = _problem(engine)
            s = o.init(q)
            (q, s), msgs = _caught(lambda: o.update(q, ok, s))  # noqa: B023
            assert s._report is None and msgs == [], policy


@pytest.mark.parametrize("engine", ("jax-jit", "torch-ops"))
def test_deferred_warning_points_at_the_callers_line(engine):
    """A deferred report's warning names the caller's file: the update that read it, the
    counter read, or ``settle``."""
    with engine_of(engine):
        p, _, _ = _problem(engine)
        opt = SGD(0.1)
        state = opt.init(p)
        bad = {"w": _arrays(engine, {"w": [np.nan, 0.1, 0.2]})["w"],
               "b": _arrays(engine, {"b": [0.1, 0.1]})["b"]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                p, state = opt.update(p, bad, state)
            _ = state.num_nonfinite
            p, state = opt.update(p, bad, state)
            state.settle()
        assert [w.filename for w in caught] == [__file__] * 4, [w.filename for w in caught]
        assert [str(w.message).split(" at step ")[1][0] for w in caught] == list("1234")
