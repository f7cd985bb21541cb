"""Adafactor's and SM3's updates in the one-program JAX step on CPU as one call of the
NumPy engine's per-tensor passes through XLA's FFI (``engines/xla_ffi_tensorwise.py``,
``interop/optax_host_kernel.host_tensorwise``): they equal the traced update with groups,
clipping, decay and averages; ``"skip"`` leaves every array as it was; a non-finite step
applied is torch's (and the NumPy engine's and the traced update's); the train step that
uses them equals the separate evaluate + update."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from mithril.interop import optax_transformation  # noqa: E402
from mithril.utils.optimizers import SM3, Adafactor  # noqa: E402
from mithril.utils.optimizers.engines import xla_ffi, xla_ffi_tensorwise  # noqa: E402

#: a matrix, a vector, a batch of matrices, a scalar and an empty tensor
SHAPES = {"w1": (7, 5), "b1": (5,), "w3": (2, 5, 3), "s": (), "e": (0,)}


def _arrays(seed: int, scale: float = 1.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def _run(opt: Any, fused: bool, grads: list[dict[str, Any]]) -> tuple:
    """The updates of ``opt``'s transformation over ``grads`` (:func:`ffi_checks.updates`),
    through the kernel or traced; (params, state, probes taken)."""
    from ffi_checks import updates

    return updates(opt, fused, _arrays(0), grads)


def _atol(want: Any) -> float:
    """float32 rounding at the tensor's scale: an element near 0 of a tensor whose others
    are ~4 carries their rounding (~64 ulps of -0.016 in SM3's momentum on an Intel Xeon,
    where XLA fuses the traced update otherwise than on AMD)."""
    return 1e-7 * max(1.0, float(np.max(np.abs(np.asarray(want)), initial=0.0)))


def _same(got: dict, gstate: Any, want: dict, wstate: Any, rtol: float = 1e-6) -> None:
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=_atol(want[k]), err_msg=k)
    for s in wstate.slots:
        for k in want:
            w = wstate.slots[s][k]
            np.testing.assert_allclose(gstate.slots[s][k], w, rtol=rtol, atol=_atol(w),
                                       err_msg=f"{s}/{k}")


def _bias(n: str) -> bool:
    return n.startswith("b")


OPTIONS = {
    "defaults": {},
    "decay-clip-norm-group": {"weight_decay": 0.1, "clip_norm": 0.5, "param_groups": [
        {"params": _bias, "weight_decay": 0.0, "learning_rate": 5e-3}]},
    "clip-value-maximize-averages": {"clip_value": 0.3, "maximize": True, "ema_decay": 0.9,
                                     "swa_start": 2},
    "own-epsilon-d-beta2": {"epsilon": (1e-20, 1e-2), "d": 2.0, "beta2_decay": -0.5},
    "skip": {"nonfinite": "skip"},
}


@pytest.mark.parametrize("name", OPTIONS)
def test_equals_the_traced_update(name: str) -> None:
    grads = [_arrays(10 + i) for i in range(3)]
    want, wstate, _ = _run(Adafactor(learning_rate=1e-2, **OPTIONS[name]), False, grads)
    got, gstate, taken = _run(Adafactor(learning_rate=1e-2, **OPTIONS[name]), True, grads)
    assert taken == [[True, True]] * 3
    _same(got, gstate, want, wstate)
    assert int(gstate.count) == int(wstate.count) == 3
    assert not np.array_equal(got["w1"], _arrays(0)["w1"])  # (it moved)


@pytest.mark.parametrize("bad", [np.nan, 1e30])
def test_skip_keeps_everything_where_a_step_is_not_finite(bad: float) -> None:
    """A NaN gradient (gradients not finite) or a finite 1e30 (its square overflows: new
    values not finite): the step is skipped, every param and slot bit for bit as before,
    the count kept; the next step as the traced update's."""
    g = _arrays(11)
    g["w3"] = g["w3"].at[1, 2, 0].set(bad)
    grads = [_arrays(10), g, _arrays(12)]
    opt = Adafactor(learning_rate=1e-2, nonfinite="skip")
    before, bstate, _ = _run(opt, True, grads[:1])
    after, astate, taken = _run(opt, True, grads[:2])
    assert taken == [[True, True], [False, False] if np.isnan(bad) else [True, False]]
    for k in before:
        assert np.array_equal(after[k], before[k]), k
        for s in bstate.slots:
            assert np.array_equal(astate.slots[s][k], bstate.slots[s][k]), (s, k)
    assert int(astate.count) == 1
    want, wstate, _ = _run(opt, False, grads)
    got, gstate, _ = _run(opt, True, grads)
    _same(got, gstate, want, wstate)
    assert int(gstate.count) == int(wstate.count) == 2


def _engine(opt: Any, grads: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The same updates through ``opt.update`` on the JAX backend (the NumPy engine's
    fused Adafactor kernel on the arrays' host buffers)."""
    params = _arrays(0)
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return {k: np.asarray(v) for k, v in params.items()}


def test_a_non_finite_step_applied_is_torchs() -> None:
    """``"propagate"`` with a NaN in one element of a vector's and of a matrix's gradient:
    as torch.optim.Adafactor, the separate update and the traced one (``max(1, RMS(U)/d)``
    is 1 where RMS(U) is NaN, Python's ``max``: only the vector's NaN element goes NaN;
    the matrix's factors' mean is NaN, so all of it)."""
    torch = pytest.importorskip("torch")
    g = _arrays(11)
    g["b1"] = g["b1"].at[2].set(jnp.nan)
    g["w1"] = g["w1"].at[3, 1].set(jnp.nan)
    grads = [_arrays(10), g]
    got, _, taken = _run(Adafactor(learning_rate=1e-2), True, grads)
    assert taken == [[True, True], [False, False]]
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        want = _engine(Adafactor(learning_rate=1e-2), grads)
    tp = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in _arrays(0).items()
          if k != "e"}  # (torch's divides by an empty tensor's size)
    topt = torch.optim.Adafactor(list(tp.values()), lr=1e-2)
    for gr in grads:
        for k, p in tp.items():
            p.grad = torch.tensor(np.asarray(gr[k]))
        topt.step()
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for k in tp:
        np.testing.assert_allclose(got[k], tp[k].detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    assert np.isnan(got["b1"]).sum() == 1 and np.isfinite(got["w3"]).all()
    assert np.isnan(got["w1"]).all()  # (the row factors' mean is NaN)
    traced, _, _ = _run(Adafactor(learning_rate=1e-2), False, grads)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], traced[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_max_consecutive_skips_gives_up_as_the_traced_update() -> None:
    """With ``max_consecutive_skips=1`` the second NaN step in a row is applied (the dry
    pass left out): the counts and params as the traced update's and the separate
    update's."""
    g = _arrays(11)
    g["b1"] = g["b1"].at[2].set(jnp.nan)
    grads = [_arrays(10), g, g, _arrays(13)]
    opt = Adafactor(learning_rate=1e-2, nonfinite="skip", max_consecutive_skips=1)
    got, gstate, taken = _run(opt, True, grads)
    traced, wstate, _ = _run(opt, False, grads)
    assert taken == [[True, True], [False, False], [False, False], [True, False]]
    _same(got, gstate, traced, wstate)
    assert int(gstate.count) == int(wstate.count) == 3
    assert {k: int(v) for k, v in gstate.hyperparams.items() if k != "learning_rate"} == \
        {k: int(v) for k, v in wstate.hyperparams.items() if k != "learning_rate"}
    with pytest.warns(RuntimeWarning):
        want = _engine(opt, grads)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("skip", [False, True])
def test_the_program_holds_one_call(skip: bool) -> None:
    """One custom call for every tensor; ``"skip"``'s program has no conditional over the
    arrays (the traced one does)."""
    from ffi_checks import programs

    texts = programs(Adafactor(learning_rate=1e-2, nonfinite="skip" if skip else "propagate"),
                     _arrays(0), _arrays(1))
    assert texts[True].count("@mithril_adafactor_") == 1
    assert "mithril_adafactor_" not in texts[False]
    if skip:
        assert "stablehlo.case" in texts[False] or "stablehlo.if" in texts[False]
        assert "stablehlo.case" not in texts[True] and "stablehlo.if" not in texts[True]


def test_refused_where_it_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keras's and MLX's conventions, ``fused=False``, per-tensor clipping, gradients of
    another dtype, a tensor beyond MAX_TENSOR elements and the switch off: the traced
    update, no probe taken."""
    grads = [_arrays(10)]
    for kw in ({"convention": "keras"}, {"convention": "mlx"}, {"fused": False},
               {"clip_tensor_norm": 1.0}):
        assert _run(Adafactor(learning_rate=1e-2, **kw), True, grads)[2] == [], kw
    half = [{k: v.astype(jnp.bfloat16) for k, v in _arrays(10).items()}]
    assert _run(Adafactor(learning_rate=1e-2), True, half)[2] == []
    monkeypatch.setattr(xla_ffi, "MAX_TENSOR", 34)  # (w1: 35 elements)
    assert _run(Adafactor(learning_rate=1e-2), True, grads)[2] == []
    monkeypatch.undo()
    monkeypatch.setattr(xla_ffi, "ENABLED", False)
    assert _run(Adafactor(learning_rate=1e-2), True, grads)[2] == []
    monkeypatch.undo()
    assert _run(Adafactor(learning_rate=1e-2), True, grads)[2] == [[True, True]]


def test_whole_tensors_largest_first() -> None:
    table = xla_ffi_tensorwise.whole_pieces(np.array([3, 0, 7, 3, 1]))
    assert table.tolist() == [4, 4, 0, 1, 2, 3, 4, 2, 0, 3, 4, 0, 0, 0, 0, 7, 3, 3, 1]
    geo = xla_ffi_tensorwise.adafactor_geometry([(7, 5), (5,), (2, 5, 3), (), (0,)])
    assert geo.tolist() == [[35, 1, 7, 5], [5, 0, 0, 0], [30, 2, 5, 3], [1, 0, 0, 0],
                            [0, 0, 0, 0]]


def test_many_tensors_shared_with_the_pool_the_same_every_call() -> None:
    """64 tensors (4M params): whichever thread of XLA's pool claims a tensor, it does it
    whole, so every call gives the same bits; and they equal the traced update's to
    rounding."""
    rng = np.random.default_rng(0)
    shapes = [(256, 256)] * 60 + [(256,)] * 4
    params = {f"p{i:02d}": jnp.asarray(rng.standard_normal(s), jnp.float32)
              for i, s in enumerate(shapes)}
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
             for k, v in params.items()}
    tx = optax_transformation(Adafactor(learning_rate=1e-2, weight_decay=0.1))
    state = tx.init(params)
    outs = []
    for fused in (True, True, True, False):
        f = jax.jit(lambda g, s, p, fused=fused: tx.update(
            g, s, p, new_params=True, **({"host_kernel": []} if fused else {}))[0])
        outs.append({k: np.asarray(v) for k, v in f(grads, state, params).items()})
    for k in params:
        assert np.array_equal(outs[0][k], outs[1][k]) and np.array_equal(outs[0][k],
                                                                          outs[2][k]), k
        np.testing.assert_allclose(outs[0][k], outs[3][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_train_step_takes_it_and_equals_the_separate_calls() -> None:
    """make_train_step's program (the kernel through XLA) against evaluate + update (the
    NumPy engine's Adafactor kernel on the JAX arrays' host buffers): decay, global
    clipping, a group, four steps."""
    from ffi_checks import equals_separate_calls

    equals_separate_calls(lambda: Adafactor(
        learning_rate=1e-2, weight_decay=0.1, clip_norm=0.5,
        param_groups=[{"params": lambda n: "bias" in n, "weight_decay": 0.0}]),
        xla_ffi_tensorwise, "fused_adafactor")


def test_float64_params_take_it_too() -> None:
    """With ``jax_enable_x64`` (a process of its own): float64 params and slots through the
    handlers' float64 variants, against the traced update."""
    from ffi_checks import float64_equals_traced

    float64_equals_traced("Adafactor(learning_rate=1e-2, weight_decay=0.1, clip_norm=0.3)")
    float64_equals_traced("SM3(learning_rate=1e-2, weight_decay=0.1, clip_norm=0.3)")


#: SM3 on tensors of rank 0 to 4 (its per-axis accumulators) and an empty one
SM3_SHAPES = {"w1": (7, 5), "b1": (5,), "w3": (2, 5, 3), "w4": (2, 3, 1, 4), "s": (),
              "e": (0,)}

SM3_OPTIONS = {
    "defaults": {},
    "l2-clip-norm-group": {"weight_decay": 0.1, "clip_norm": 0.5, "param_groups": [
        {"params": _bias, "weight_decay": 0.0, "learning_rate": 5e-3}]},
    "clip-value-averages": {"clip_value": 0.3, "ema_decay": 0.9, "swa_start": 2},
    "beta2-momentum-epsilon": {"beta2": 0.99, "momentum": 0.5, "epsilon": 1e-3},
    "skip": {"nonfinite": "skip"},
}


def _sm3_arrays(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SM3_SHAPES.items()}


@pytest.mark.parametrize("name", SM3_OPTIONS)
def test_sm3_equals_the_traced_update(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SM3's kernel does the per-tensor path's operations one by one (no fastmath): the
    same bits as the traced update, up to XLA's own rounding (1e-6)."""
    monkeypatch.setattr(sys.modules[__name__], "_arrays", _sm3_arrays)
    grads = [_sm3_arrays(10 + i) for i in range(3)]
    want, wstate, _ = _run(SM3(learning_rate=1e-2, **SM3_OPTIONS[name]), False, grads)
    got, gstate, taken = _run(SM3(learning_rate=1e-2, **SM3_OPTIONS[name]), True, grads)
    assert taken == [[True, True]] * 3
    _same(got, gstate, want, wstate)
    assert not np.array_equal(got["w4"], _sm3_arrays(0)["w4"])


def test_sm3_skips_and_refuses_as_adafactor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN step skipped with every array as before; a rank beyond the kernel's
    (``MAX_RANK``) and bfloat16 gradients take the traced update."""
    from mithril.utils.optimizers.engines import sm3_kernels

    monkeypatch.setattr(sys.modules[__name__], "_arrays", _sm3_arrays)
    g = _sm3_arrays(11)
    g["w4"] = g["w4"].at[1, 2, 0, 3].set(jnp.nan)
    opt = SM3(learning_rate=1e-2, nonfinite="skip")
    before, bstate, _ = _run(opt, True, [_sm3_arrays(10)])
    after, astate, taken = _run(opt, True, [_sm3_arrays(10), g])
    assert taken == [[True, True], [False, False]]
    for k in before:
        assert np.array_equal(after[k], before[k]), k
        for s in bstate.slots:
            assert np.array_equal(astate.slots[s][k], bstate.slots[s][k]), (s, k)
    monkeypatch.setattr(sm3_kernels, "MAX_RANK", 3)
    assert _run(opt, True, [_sm3_arrays(10)])[2] == []
    monkeypatch.undo()
    monkeypatch.setattr(sys.modules[__name__], "_arrays", _sm3_arrays)
    half = [{k: v.astype(jnp.bfloat16) for k, v in _sm3_arrays(10).items()}]
    assert _run(opt, True, half)[2] == []


def test_sm3_train_step_equals_the_separate_calls() -> None:
    """make_train_step's program with SM3 (its kernel through XLA) against evaluate +
    update (the NumPy engine's SM3 kernel): coupled decay, global clipping, four steps."""
    from ffi_checks import equals_separate_calls

    equals_separate_calls(lambda: SM3(learning_rate=1e-2, weight_decay=0.01, clip_norm=0.5,
                                      beta2=0.99), xla_ffi_tensorwise, "fused_sm3")
