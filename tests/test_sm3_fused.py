"""SM3's fused numba step (:mod:`...engines.sm3_kernels`) against its per-tensor array-op
path (:meth:`SM3.tensor_update`, run here by making ``fused_step`` return None) and
optax.sm3.

Tolerance: none. The kernel performs the per-tensor path's operations one by one in the
parameters' dtype (the same roundings, no FMA, no reassociation; maxima and minima are
exact), so params and every slot equal NumPy's per-tensor path to the bit, float32 and
float64, NaN where NaN. Two exceptions, a few ulp of the dtype relative to each array's
largest magnitude (float64: ~1e-15): torch's CPU ``sqrt`` is now and then one ulp off
IEEE's (float32: 0.7% of random values), so torch's own per-tensor path differs from the
kernel by that, grown over the steps (8 ulp; the fused step on torch equals NumPy's path
bit for bit); and clipping by norm: the fused step sums the squares of a gradient in
another order (float64), so the clip factor may differ in its last float64 bit and,
rounded to the dtype, by one ulp (4 ulp). Each comparison runs the fused path with
``tensor_update`` patched to raise: it really ran.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import optax
import pytest
import torch

from mithril.utils.optimizers import SM3
from mithril.utils.optimizers.engines import threads

# rank 0 to 4, empty tensors of rank 1 to 3
SHAPES = {"s": (), "v": (7,), "w": (5, 6), "col": (6, 1), "c": (2, 3, 4), "q": (2, 1, 3, 2),
          "e": (0,), "e2": (0, 3), "e3": (2, 0, 3)}
STEPS = 8


def problem(dtype="float32", steps=STEPS, shapes=SHAPES, seed=0):
    """Params and gradients; "v" gets zero gradients on the first two steps (ν = 0: the
    update's ``where`` branch)."""
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 3) * (k != "v" or t >= 2), dtype)
              for k, s in shapes.items()} for t in range(steps)]
    return p0, grads


def native(backend, x):
    if backend == "torch":
        return torch.tensor(x)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    return np.array(x)


def host(x):
    return np.array(x.numpy() if isinstance(x, torch.Tensor) else x)


def _refuse(*args, **kwargs):
    raise AssertionError("the per-tensor path ran")


def run(make, p0, grads, backend="numpy", fused=True, drop=(), lr_after=None):
    """Every step (``drop``: names without a gradient at step 3; ``lr_after``: the learning
    rate from the middle on); the params and state as host arrays, and the state."""
    patch = (mock.patch.object(SM3, "tensor_update", _refuse) if fused else
             mock.patch.object(SM3, "fused_step", lambda *a, **k: None))
    opt = make()
    with patch:
        params = {k: native(backend, v) for k, v in p0.items()}
        state = opt.init(params)
        for t, g in enumerate(grads):
            if t == len(grads) // 2 and lr_after is not None:
                opt.set_learning_rate(lr_after)
            g = {k: native(backend, v) for k, v in g.items() if t != 3 or k not in drop}
            params, state = opt.update(params, g, state)
    return ({k: host(v) for k, v in params.items()},
            {s: {k: host(v) for k, v in state.slot(s).items()} for s in state.slots}, state)


def equal(a, b, ulps=0):
    """Equal dicts of arrays (NaN where NaN); with ``ulps``: within that many ulp of the
    dtype, relative to each array's largest magnitude."""
    for k in b:
        if isinstance(b[k], dict):
            equal(a[k], b[k], ulps)
        elif ulps == 0 or not b[k].size:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            tol = ulps * np.finfo(b[k].dtype).eps * float(np.abs(b[k]).max())
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=tol, err_msg=k)


OPTIONS = {
    "defaults": lambda: SM3(0.1),
    "b2_wd": lambda: SM3(0.05, momentum=0.5, beta2=0.9, epsilon=1e-6, weight_decay=0.01),
    "clip_value": lambda: SM3(0.1, clip_value=0.8, weight_decay=0.1),
    "averages": lambda: SM3(0.1, ema_decay=0.9, swa_start=3),
    "wd_exclude": lambda: SM3(0.1, weight_decay=0.1, exclude_weight_decay=["w"]),
    "adaptive_clip": lambda: SM3(0.1, adaptive_clip=0.01),
    "groups": lambda: SM3(0.1, weight_decay=0.01, param_groups=[
        {"params": ["c", "v"], "learning_rate": 0.02, "momentum": 0.0, "beta2": 0.5},
        {"params": "q", "weight_decay": 0.0, "clip_value": 0.5, "epsilon": 1e-3}]),
}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fused_equals_the_per_tensor_path(backend, dtype, option):
    """Each option, a learning rate changed half way, gradients missing at step 3 for
    some tensors (their params and accumulators stay, their averages still move)."""
    p0, grads = problem(dtype)
    drop = ("w", "s", "c")
    ours, s_ours, state = run(OPTIONS[option], p0, grads, backend, drop=drop, lr_after=0.03)
    ref, s_ref, _ = run(OPTIONS[option], p0, grads, backend, False, drop, 0.03)
    # torch's sqrt is not always IEEE's (float32: ~0.7% of values one ulp off)
    equal({"p": ours, **s_ours}, {"p": ref, **s_ref}, 8 if backend == "torch" else 0)
    # the kernel's: NumPy's per-tensor path, bit for bit (adaptive clipping scales the
    # gradients by each backend's own norms before the step: not the same inputs)
    if backend == "torch" and option != "adaptive_clip":
        ref, s_ref, _ = run(OPTIONS[option], p0, grads, "numpy", False, drop, 0.03)
        equal({"p": ours, **s_ours}, {"p": ref, **s_ref})
    assert state.step == STEPS and not np.array_equal(ours["w"], p0["w"])
    assert s_ours["mu"]["q"].shape == (8,) and s_ours["mu"]["e3"].shape == (5,)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kw", [{"clip_norm": 2.0}, {"clip_tensor_norm": 1.0},
                                {"clip_block_rms": 0.5, "clip_norm": 3.0}])
def test_clipping_by_norm(dtype, kw):
    p0, grads = problem(dtype)
    ours, s_ours, state = run(lambda: SM3(0.1, **kw), p0, grads)
    ref, s_ref, ref_state = run(lambda: SM3(0.1, **kw), p0, grads, fused=False)
    equal({"p": ours, **s_ours}, {"p": ref, **s_ref}, ulps=4)
    assert state.last_grad_norm == pytest.approx(ref_state.last_grad_norm, rel=1e-14)


def test_jax_double_buffer_equals_numpy():
    pytest.importorskip("jax")
    p0, grads = problem("float32")
    make = OPTIONS["averages"]
    ours, s_ours, state = run(make, p0, grads, "jax", drop=("w",))
    ref, s_ref, _ = run(make, p0, grads, "numpy", drop=("w",))
    assert type(state.engine).__name__ == "NumbaEngine"
    equal({"p": ours, **s_ours}, {"p": ref, **s_ref})


def test_matches_optax_in_float32():
    """The fused path side by side with optax.sm3 (jitted), float32, 10 steps (optax has no
    0-d parameters and fails on an empty one)."""
    import jax
    import jax.numpy as jnp

    shapes = {k: s for k, s in SHAPES.items() if k in ("v", "w", "col", "c", "q")}
    p0, grads = problem("float32", 10, shapes)
    ours, _, _ = run(lambda: SM3(0.05, momentum=0.8), p0, grads)
    tx = optax.sm3(0.05, momentum=0.8)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    opt_state = tx.init(params)

    @jax.jit
    def step(params, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for g in grads:
        params, opt_state = step(params, {k: jnp.asarray(v) for k, v in g.items()}, opt_state)
    for k in shapes:
        np.testing.assert_allclose(ours[k], np.asarray(params[k]), rtol=2e-6, atol=2e-6,
                                   err_msg=k)


def test_the_fused_path_runs_and_high_ranks_fall_back():
    """tensor_update is never called (it raises in every fused run above); a tensor of
    rank 9 (beyond the kernel's 8) sends the whole step down the per-tensor path."""
    calls = []
    original = SM3.tensor_update

    def counting(self, *args):
        calls.append(args[-1])
        return original(self, *args)

    shapes = {"w": (3, 4), "deep": (1, 2, 1, 1, 2, 1, 1, 1, 2)}
    p0, grads = problem("float64", 3, shapes)
    with mock.patch.object(SM3, "tensor_update", counting):
        ours, s_ours, _ = run(lambda: SM3(0.1), p0, grads, fused=False)
        assert sorted(set(calls)) == ["deep", "w"]
        calls.clear()
        SM3(0.1).update({k: v.copy() for k, v in p0.items()}, grads[0],
                        SM3(0.1).init(p0))
        assert sorted(set(calls)) == ["deep", "w"]  # the fallback
        calls.clear()
        small = {"w": p0["w"].copy()}
        opt = SM3(0.1)
        opt.update(small, {"w": grads[0]["w"]}, opt.init(small))
        assert calls == []


def test_thread_count_does_not_change_the_result():
    shapes = {f"m{i}": (300, 200) for i in range(3)} | {f"v{i}": (30000,) for i in range(3)} | {
        "t": (20, 30, 40)}
    p0, grads = problem("float32", 3, shapes)
    old = threads._threads
    try:
        out = []
        for n in (1, 2, 3):
            threads.set_num_threads(n)
            out.append(run(lambda: SM3(0.1, weight_decay=0.1), p0, grads)[:2])
    finally:
        threads._threads = old
    ref = run(lambda: SM3(0.1, weight_decay=0.1), p0, grads, fused=False)[:2]
    for other in out:
        equal({"p": other[0], **other[1]}, {"p": ref[0], **ref[1]})


# ---------------------------------------------------------------------------------------------
# non-finite values: nothing written unless the step is applied, NaN where NaN
# ---------------------------------------------------------------------------------------------

def snapshot(params, state):
    return ({k: host(v).copy() for k, v in params.items()},
            {s: host(v).copy() for s, v in state.slots.items()}, state.step)


def same(a, b):
    for x, y in zip(a[:2], b[:2]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a[2] == b[2]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_refused_and_skipped_steps_change_nothing(backend, dtype):
    """A NaN gradient; a weight decay that overflows (x = g + wd·p: inf, then m NaN); and
    in float32 a finite gradient whose ν overflows (g² = inf: only the accumulators of
    "q" would become inf, p and m stay finite): skipped or refused, nothing written."""
    p0, grads = problem(dtype, 3)
    with mock.patch.object(SM3, "tensor_update", _refuse):
        for policy in ("skip", "raise"):
            opt = SM3(0.1, weight_decay=0.1, ema_decay=0.9, nonfinite=policy)
            params = {k: native(backend, v) for k, v in p0.items()}
            state = opt.init(params)
            for g in grads[:2]:
                params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()},
                                           state)
            before = snapshot(params, state)
            nan = {k: native(backend, v) for k, v in grads[2].items()}
            nan["c"][1, 0, 2] = float("nan")
            good = {k: native(backend, v) for k, v in grads[2].items()}
            decay = SM3(0.1, weight_decay=1e308, ema_decay=0.9, nonfinite=policy)
            cases = [(opt, nan, "non-finite gradient"), (decay, good, "finite gradients, but")]
            if dtype == "float32":
                huge = {k: native(backend, v) for k, v in grads[2].items()}
                huge["q"][0, 0, 1, 1] = 1e20
                cases.append((opt, huge, r"for \['q'\]"))
            for o, g, what in cases:
                if policy == "skip":
                    with pytest.warns(RuntimeWarning, match="skipped"):
                        out, state = o.update(params, g, state)
                    assert out["w"] is params["w"] and state.last_step_skipped
                else:
                    with pytest.raises(FloatingPointError, match=what):
                        o.update(params, g, state)
                same(before, snapshot(params, state))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nonfinite_propagate_as_the_per_tensor_path(dtype):
    """``nonfinite="propagate"``: inf and NaN land where the per-tensor path puts them
    (an accumulator row of a NaN is NaN, of an overflow inf; later steps read them)."""
    p0, grads = problem(dtype, 4)
    grads[1]["c"][1, 2, 0] = np.nan
    grads[1]["w"][3, 4] = float(np.sqrt(np.finfo(dtype).max)) * 4
    grads[2]["v"][5] = -np.inf
    with pytest.warns(RuntimeWarning):
        ours, s_ours, state = run(lambda: SM3(0.1, ema_decay=0.5), p0, grads)
    with pytest.warns(RuntimeWarning):
        ref, s_ref, _ = run(lambda: SM3(0.1, ema_decay=0.5), p0, grads, fused=False)
    equal({"p": ours, **s_ours}, {"p": ref, **s_ref})
    assert np.isnan(s_ours["mu"]["c"]).any() and np.isinf(s_ours["mu"]["w"]).any()
    assert state.num_nonfinite >= 1 and state.step == 4


def test_one_optimizer_two_layouts():
    """The geometry table is cached per layout: one optimizer stepping two states of other
    shapes in turn keeps each one's."""
    problems = [problem("float64", 3, shapes) for shapes in ({"a": (3, 4)},
                                                             {"a": (4, 3), "b": (2, 2, 2)})]
    opt = SM3(0.1)
    with mock.patch.object(SM3, "tensor_update", _refuse):
        runs = [[{k: v.copy() for k, v in p0.items()}, opt.init(p0)] for p0, _ in problems]
        for t in range(3):
            for r, (_, grads) in zip(runs, problems):
                r[0], r[1] = opt.update(r[0], grads[t], r[1])
    for r, (p0, grads) in zip(runs, problems):
        ref, s_ref, _ = run(lambda: SM3(0.1), p0, grads, fused=False)
        equal({"p": {k: host(v) for k, v in r[0].items()},
               **{s: {k: host(v) for k, v in r[1].slot(s).items()} for s in r[1].slots}},
              {"p": ref, **s_ref})
