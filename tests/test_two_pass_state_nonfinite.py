"""A two-pass optimizer's tensor slots and state values fall under the ``nonfinite`` policy
like its params and slots: DoG's and DoWG's running sums (Σ‖g‖², Σ r²‖g‖²) pass float32's
range for finite gradients of ~1e19, where the update itself stays finite (the step size
r/√S is then 0: training would stop, silently). ``"raise"`` raises naming the value and
changes nothing, ``"skip"`` skips, ``"propagate"`` applies the step and counts it (a
warning), on every engine: the fused kernel (NumPy, torch, JAX arrays), the jitted JAX
engine, ``optax_transformation`` and the one-program JAX train step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mithril.utils.optimizers import Adam, DoG, DoWG

HUGE, SMALL = 3e19, 0.5  # (HUGE² > float32's max: the running sums overflow)
CASES = [(DoG, {}), (DoWG, {}), (DoG, {"layer_wise": True})]
IDS = ["dog", "dowg", "dog-layer-wise"]


def _arr(kind: str, x: np.ndarray):
    if kind == "torch":
        import torch

        return torch.tensor(x)
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    return x


def _host(x) -> np.ndarray:
    return np.array(np.asarray(x.detach() if hasattr(x, "detach") else x))


def _start(kind: str, opt, w: float = 1.0) -> tuple:
    params = {"w": _arr(kind, np.full(4, w, np.float32)),
              "b": _arr(kind, np.full(3, -w, np.float32))}
    state = opt.init(params)
    grads = {k: _arr(kind, np.full(v.shape, SMALL, np.float32)) for k, v in params.items()}
    params, state = opt.update(params, grads, state)  # one ordinary step first
    return params, state


def _huge(kind: str, params: dict) -> dict:
    return {"w": _arr(kind, np.full(4, HUGE, np.float32)),
            "b": _arr(kind, np.full(3, SMALL, np.float32))}


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("opt_cls,kw", CASES, ids=IDS)
def test_raise_names_the_value_and_changes_nothing(kind: str, opt_cls, kw: dict) -> None:
    if kind != "numpy":
        pytest.importorskip(kind)
    opt = opt_cls(nonfinite="raise", **kw)
    params, state = _start(kind, opt)
    before = {k: _host(v) for k, v in params.items()}
    sd = opt.state_dict(state)
    with pytest.raises(FloatingPointError, match="non-finite params or optimizer state") as e:
        opt.update(params, _huge(kind, params), state)
    slot = "weighted_sq" if opt_cls is DoWG else "sum_sq"
    assert slot in str(e.value)
    assert all(np.array_equal(before[k], _host(v)) for k, v in params.items())
    after = opt.state_dict(state)
    assert after["step"] == sd["step"] == 1
    assert repr(after) == repr(sd)


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("opt_cls,kw", CASES, ids=IDS)
def test_skip_and_propagate(kind: str, opt_cls, kw: dict) -> None:
    if kind != "numpy":
        pytest.importorskip(kind)
    opt = opt_cls(nonfinite="skip", **kw)
    params, state = _start(kind, opt)
    before = {k: _host(v) for k, v in params.items()}
    with pytest.warns(RuntimeWarning, match="step skipped"):
        params, state = opt.update(params, _huge(kind, params), state)
    assert (state.num_skipped, state.step, state.last_step_skipped) == (1, 1, True)
    assert np.isclose(state.last_grad_norm, np.sqrt(4 * HUGE**2 + 3 * SMALL**2), rtol=1e-6)
    assert all(np.array_equal(before[k], _host(v)) for k, v in params.items())
    params, state = opt.update(params, {k: _arr(kind, np.full(v.shape, SMALL, np.float32))
                                        for k, v in before.items()}, state)
    assert not np.array_equal(before["w"], _host(params["w"]))  # training goes on

    opt = opt_cls(**kw)  # "propagate": applied (torch.optim's and optax's result), counted
    params, state = _start(kind, opt)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        params, state = opt.update(params, _huge(kind, params), state)
        state.settle()
    assert (state.num_nonfinite, state.nonfinite_values, state.step) == (1, True, 2)
    assert np.all(np.isfinite(_host(params["w"])))


def test_jitted_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jitted JAX engine, whose two-pass step makes DoWG's values in its program."""
    pytest.importorskip("jax")
    from mithril.utils.optimizers import engines

    monkeypatch.setattr(engines, "JAX_ENGINE", "jit")
    for opt_cls, kw in CASES:
        opt = opt_cls(nonfinite="raise", **kw)
        params, state = _start("jax", opt)
        assert type(state.engine).__name__ == "JaxEngine"
        before = _host(params["w"])
        with pytest.raises(FloatingPointError):
            opt.update(params, _huge("jax", params), state)
        assert np.array_equal(before, _host(params["w"])) and state.step == 1
        opt = opt_cls(nonfinite="skip", **kw)
        params, state = _start("jax", opt)
        with pytest.warns(RuntimeWarning, match="step skipped"):
            params, state = opt.update(params, _huge("jax", params), state)
        assert state.num_skipped == 1 and np.array_equal(before, _host(params["w"]))
        opt = opt_cls(**kw)
        params, state = _start("jax", opt)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            params, state = opt.update(params, _huge("jax", params), state)
            state.settle()
        assert state.num_nonfinite == 1


@pytest.mark.parametrize("opt_cls", [DoG, DoWG])
def test_optax_transformation_skips(opt_cls) -> None:
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    from mithril.interop import optax_transformation

    tx = optax_transformation(opt_cls(nonfinite="skip"))
    p = {"w": jnp.ones(4)}
    s = tx.init(p)
    u, s = tx.update({"w": jnp.full(4, SMALL)}, s, p)
    p = optax.apply_updates(p, u)
    u, s2 = tx.update({"w": jnp.full(4, HUGE)}, s, p)
    assert np.all(np.asarray(u["w"]) == 0) and int(s2.count) == int(s.count) == 1
    for a, b in zip(jax_leaves(s2.values), jax_leaves(s.values)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    u, _ = tx.update({"w": jnp.full(4, SMALL)}, s2, p)
    assert np.all(np.asarray(u["w"]) != 0)  # training goes on


def jax_leaves(tree) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("ffi", [True, False], ids=["kernel", "traced"])
@pytest.mark.parametrize("opt_cls", [DoG, DoWG])
def test_train_step_jax(opt_cls, ffi: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-program step (the update through the FFI kernel, or traced) against the
    separate calls: the huge batch skipped by both, then the same params."""
    pytest.importorskip("jax")
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.optimizers.engines import xla_ffi
    from mithril.utils.training import make_train_step

    if not ffi:
        monkeypatch.setattr(xla_ffi, "ENABLED", False, raising=False)
    b = JaxBackend()
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="out")
    m |= ml.Mean()(input="out", output=ml.IOKey("loss"))
    c = ml.compile(m, b, shapes={"input": [None, 3]})
    good = {"input": b.array(np.ones((4, 3), np.float32))}
    huge = {"input": b.array(np.full((4, 3), 2 * HUGE, np.float32))}
    results = []
    for fused in (True, False):
        step = make_train_step(c, opt_cls(nonfinite="skip"), loss="loss")
        p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
             for k, v in c.get_parameters().items()}
        s = step.init(p) if fused else step.optimizer.init(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for d in (good, huge, good):
                p, s, _ = step(p, s, d)
        st = step.to_optimizer_state(s, p) if fused else s
        results.append(({k: np.asarray(v) for k, v in p.items()}, st.num_skipped, st.step))
    (pf, kf, tf), (pu, ku, tu) = results
    assert (kf, tf) == (ku, tu) == (1, 2)
    for k in pf:
        np.testing.assert_allclose(pf[k], pu[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_tensor_op_engine(kind: str) -> None:
    """The flat tensor-op engine (torch's path on accelerators and for half precision)."""
    if kind == "torch":
        pytest.importorskip("torch")
    from conftest import optimizer_engine

    with optimizer_engine("array"):
        for opt_cls, kw in CASES:
            opt = opt_cls(nonfinite="raise", **kw)
            params, state = _start(kind, opt)
            assert type(state.engine).__name__ == "ArrayEngine"
            before = _host(params["w"])
            with pytest.raises(FloatingPointError):
                opt.update(params, _huge(kind, params), state)
            assert np.array_equal(before, _host(params["w"])) and state.step == 1
            opt = opt_cls(**kw)
            params, state = _start(kind, opt)
            with pytest.warns(RuntimeWarning, match="non-finite"):
                params, state = opt.update(params, _huge(kind, params), state)
                state.settle()
            assert state.num_nonfinite == 1


def test_adam_unchanged() -> None:
    """(What the elementwise probe already caught: Adam's v overflowing, as before.)"""
    opt = Adam(nonfinite="raise")
    p = {"w": np.ones(4, np.float32)}
    with pytest.raises(FloatingPointError, match=r"\['w'\]"):
        opt.update(p, {"w": np.full(4, 3e38, np.float32)}, opt.init(p))
