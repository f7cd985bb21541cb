"""The steady-state path of a plain update (``engines/fast_step.py``): bit for bit the full
path, step after step, while the learning rate is scheduled, other hyperparameters change,
groups change, clipping by value or by the global norm switches on, weights are averaged;
taken in a plain loop;
left for the full path wherever the recipe no longer holds (its errors and its copies
included); never kept for a wrapper (Lookahead). The jitted JAX engine's recipe
(:class:`fast_step.JaxRecipe`: the compiled program, called with this step's scalars) too,
through ``"jax-jit"``."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from mithril.errors import ShapeError
from mithril.utils.optimizers import (
    LAMB,
    LARS,
    SGD,
    Adam,
    AdamW,
    Lookahead,
    Novograd,
    Prodigy,
    engines,
)
from mithril.utils.optimizers.engines import fast_step


def _params(rng, lib="numpy"):
    p = {"w": rng.standard_normal((5, 3)).astype(np.float32),
         "b": rng.standard_normal(3).astype(np.float32),
         "s": rng.standard_normal((2, 2)).astype(np.float32)}
    return _native(p, lib)


def _native(arrays, lib):
    if lib == "torch":
        return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    if lib == "jax-jit":
        import jax.numpy as jnp

        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return arrays


def _grads(rng, params, lib="numpy"):
    g = {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in params.items()}
    return _native(g, lib)


@pytest.fixture
def jit_engine(monkeypatch):
    """JAX arrays through the jitted engine (the default on accelerators) on this CPU."""
    monkeypatch.setattr(engines, "JAX_ENGINE", "jit")


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class _Counted:
    """Counts the updates ``fast_step.run`` took (not None)."""

    def __init__(self, monkeypatch):
        self.taken = 0
        for name in ("run", "run_jax"):
            run = getattr(fast_step, name)

            def counted(*a, run=run):
                out = run(*a)
                self.taken += out is not None
                return out

            monkeypatch.setattr(fast_step, name, counted)


def _twin_run(make, changes, lib="numpy", steps=12, seed=0):
    """The same updates through two optimizers, one with the fast path, one without
    (``repeatable`` refused): params, slots and the state's record equal after every step.
    ``changes(step, opt)`` changes hyperparameters before a step (on both)."""
    rng = np.random.default_rng(seed)
    p0 = _params(rng, lib)
    grads = [_grads(rng, p0, lib) for _ in range(steps)]
    runs = []
    for fast in (True, False):
        opt = make()
        p = {k: (v.clone() if lib == "torch" else v + 0 if lib == "jax-jit" else v.copy())
             for k, v in p0.items()}
        s = opt.init(p)
        trace = []
        for i in range(steps):
            changes(i, opt)
            if not fast:
                s.fast, s.fast_waste = None, 99  # never made: the full path every step
            p, s = opt.update(p, grads[i], s)
            trace.append(({k: _np(v).copy() for k, v in p.items()},
                          {k: _np(v).copy() for k, v in s.slots.items()},
                          s.step, s.last_grad_norm, dict(s.values)))
        runs.append((trace, s))
    (fast_trace, fast_state), (full_trace, _) = runs
    for i, (a, b) in enumerate(zip(fast_trace, full_trace, strict=True)):
        for k in a[0]:
            np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=f"step {i} param {k}")
        for k in a[1]:
            np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=f"step {i} slot {k}")
        assert a[2:] == b[2:], i
    return fast_state


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax-jit"])
def test_scheduled_learning_rate_and_changed_hyperparameters_bit_for_bit(monkeypatch, lib):
    if lib == "jax-jit":
        monkeypatch.setattr(engines, "JAX_ENGINE", "jit")
    counted = _Counted(monkeypatch)

    def changes(i, opt):
        opt.learning_rate = 1e-2 * 0.9 ** i  # a scheduler: every step
        if i == 5:
            opt.beta1 = 0.8  # the recipe no longer holds: the full path, then a new recipe
        if i == 8:
            opt.clip_value = 0.05  # clipping by value: another kernel

    state = _twin_run(lambda: Adam(learning_rate=1e-2), changes, lib)
    assert state.fast is not None and state.fast.used
    if lib == "jax-jit":  # (the 1st step's params are the caller's: copied, no recipe)
        assert type(state.fast) is fast_step.JaxRecipe
    # the 1st step copies the params in and the 2nd makes the recipe: steps 3-5 take it; the
    # 6th (beta1) and the 9th (clip_value) take the full path and make a new one: 7-8, 10-12
    assert counted.taken == 3 + 2 + 3


@pytest.mark.parametrize("lib", ["numpy", "jax-jit"])
def test_groups_weight_decay_momentum_and_averaging_bit_for_bit(monkeypatch, lib):
    if lib == "jax-jit":
        monkeypatch.setattr(engines, "JAX_ENGINE", "jit")

    def changes(i, opt):
        if i == 4 and opt.param_groups:
            opt.set_learning_rate(0.05, group=0)  # a group's rate: the groups' version
        if i == 7:
            opt.weight_decay = 0.1
        if i == 9:
            opt.clip_norm = 0.5  # the global norm's pass, then the scaled update

    _twin_run(lambda: SGD(learning_rate=0.1, momentum=0.9,
                          param_groups=[{"params": ["b"], "momentum": 0.5}]), changes, lib)
    state = _twin_run(lambda: AdamW(learning_rate=1e-2, ema_decay=0.9), changes, lib)
    assert state.fast is not None and state.fast.used


@pytest.mark.parametrize("make", [
    lambda: LAMB(learning_rate=1e-2, weight_decay=0.01),
    lambda: LARS(learning_rate=0.1, momentum=0.9),
    lambda: Novograd(learning_rate=1e-2),  # a tensor slot, new arrays every step
    lambda: Prodigy(learning_rate=1.0),  # optimizer-wide values
], ids=["lamb", "lars", "novograd", "prodigy"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_two_pass_steps_bit_for_bit(monkeypatch, make, lib):
    """A two-pass step repeats its first pass and per-tensor table: the tensor slots and
    values it commits, params and slots, bit for bit the full path's, while the learning
    rate changes and clipping by the global norm switches on."""
    counted = _Counted(monkeypatch)

    def changes(i, opt):
        opt.learning_rate *= 0.9
        if i == 6:
            opt.clip_norm = 0.5

    state = _twin_run(make, changes, lib)
    assert state.fast is not None and state.fast.used and state.fast.two_pass
    assert counted.taken == 4 + 5  # steps 3-6; the 7th (clip_norm) makes a new recipe: 8-12


def test_a_plain_loop_takes_it_and_a_wrapper_never_does(monkeypatch):
    counted = _Counted(monkeypatch)
    rng = np.random.default_rng(1)
    p = _params(rng)
    opt = Adam(learning_rate=1e-3)
    s = opt.init(p)
    for _ in range(10):
        p, s = opt.update(p, _grads(rng, p), s)
    assert counted.taken == 8  # the first copies the params in, the second makes the recipe
    opt = Adam(learning_rate=1e-3, clip_norm=0.1)  # the global norm's pass is repeated too
    p = _params(rng)
    s = opt.init(p)
    for _ in range(5):
        p, s = opt.update(p, _grads(rng, p), s)
    assert counted.taken == 8 + 3
    look = Lookahead(Adam(learning_rate=1e-3))
    p = _params(rng)
    s = look.init(p)
    for _ in range(4):
        p, s = look.update(p, _grads(rng, p), s)
    assert s.fast is None and counted.taken == 8 + 3


def test_where_it_does_not_hold_the_full_path_runs_raises_and_copies():
    rng = np.random.default_rng(2)
    p = _params(rng)
    opt = SGD(learning_rate=0.1, momentum=0.9)
    s = opt.init(p)
    for _ in range(3):
        p, s = opt.update(p, _grads(rng, p), s)
    assert s.fast is not None
    before = {k: v.copy() for k, v in p.items()}
    slots = {k: v.copy() for k, v in s.slots.items()}
    # a gradient of the wrong shape: the full path's error, nothing changed
    bad = _grads(rng, p)
    bad["w"] = bad["w"][:4]
    with pytest.raises(ShapeError, match="gradients\\['w'\\]"):
        opt.update(p, bad, s)
    # momentum 0 means no momentum slot: the full path refuses this state, as it always did
    opt.momentum = 0.0
    with pytest.raises(ValueError, match="slots"):
        opt.update(p, _grads(rng, p), s)
    opt.momentum = 0.9
    for k in p:
        np.testing.assert_array_equal(p[k], before[k])
    for k in s.slots:
        np.testing.assert_array_equal(s.slots[k], slots[k])
    assert s.step == 3
    # the caller's own arrays (not those the last update returned): copied in, as always
    mine = {k: v.copy() + 1 for k, v in p.items()}
    g = _grads(rng, p)
    ref_opt = SGD(learning_rate=0.1, momentum=0.9)
    ref_s = ref_opt.init(mine)
    ref_s.slots["momentum"][...] = s.slots["momentum"]
    ref_s.step = s.step
    want, _ = ref_opt.update({k: v.copy() for k, v in mine.items()}, g, ref_s)
    got, s = opt.update(mine, g, s)
    for k in got:
        np.testing.assert_array_equal(got[k], want[k])


def test_jax_recipe_where_it_does_not_hold_and_its_policies(jit_engine, monkeypatch):
    """The jitted engine's recipe: a wrong gradient still gets the full path's error with
    nothing changed; a non-finite gradient under ``"propagate"`` is applied and warned about
    as the full path does; ``"unchecked"`` reads nothing back; the caller's own arrays go
    through the full path (copied, never donated)."""
    import jax.numpy as jnp

    counted = _Counted(monkeypatch)
    rng = np.random.default_rng(3)
    p = _params(rng, "jax-jit")
    opt = SGD(learning_rate=0.1, momentum=0.9)
    s = opt.init(p)
    for _ in range(3):
        p, s = opt.update(p, _grads(rng, p, "jax-jit"), s)
    assert type(s.fast) is fast_step.JaxRecipe and counted.taken == 1
    before = {k: np.array(v) for k, v in p.items()}
    bad = _grads(rng, p, "jax-jit")
    bad["w"] = bad["w"][:4]
    with pytest.raises(ShapeError, match="gradients\\['w'\\]"):
        opt.update(p, bad, s)
    assert s.step == 3 and all(np.array_equal(np.array(p[k]), before[k]) for k in p)
    g = _grads(rng, p, "jax-jit")
    g["b"] = g["b"].at[0].set(jnp.nan)
    with pytest.warns(RuntimeWarning, match="non-finite gradient .* at step 4"):
        p, s = opt.update(p, g, s)
        s.settle()  # (read when asked: see test_nonfinite_step's deferred reports)
    assert counted.taken == 2 and np.isnan(s.last_grad_norm) and s.num_nonfinite == 1
    assert np.isnan(np.array(p["b"])[0]) and np.isfinite(np.array(p["w"])).all()
    # the caller's own arrays: the full path (copies them: the caller's stay valid)
    mine = {k: jnp.asarray(v) for k, v in before.items()}
    p, s = opt.update(mine, _grads(rng, p, "jax-jit"), s)
    assert counted.taken == 2 and all(np.array_equal(np.array(mine[k]), before[k]) for k in mine)
    for _ in range(2):  # (the full path's new slots: a new recipe, then taken)
        p, s = opt.update(p, _grads(rng, p, "jax-jit"), s)
    assert counted.taken == 3
    # "unchecked": the program measures nothing, the recipe reads nothing back
    opt = Adam(learning_rate=1e-2, nonfinite="unchecked")
    p = _params(rng, "jax-jit")
    s = opt.init(p)
    for _ in range(4):
        p, s = opt.update(p, _grads(rng, p, "jax-jit"), s)
    assert counted.taken == 3 + 2 and s.fast.checked is False and s.last_grad_norm is None


def test_jax_recipe_refuses_gradients_its_signature_lets_through(jit_engine, monkeypatch):
    """The jitted recipe checks keys and types only; shapes and dtypes are JAX's signature
    of the call, and a new one is traced, where it is refused before anything runs. So a
    gradient of the same size but another shape (which the program's reshape would take),
    or of another dtype, still gets the full path's error with nothing changed, and JAX
    compiles nothing for it (a NumPy gradient gets it too); keys in another order are put
    in layout order (the full path's values); a learning rate beyond float32 takes the full table in
    the recipe (its inf cast and probed as the full path casts it)."""
    import jax
    import jax.numpy as jnp

    counted = _Counted(monkeypatch)
    rng = np.random.default_rng(5)
    p = _params(rng, "jax-jit")
    opt = Adam(learning_rate=1e-2)
    s = opt.init(p)
    for _ in range(3):
        p, s = opt.update(p, _grads(rng, p, "jax-jit"), s)
    assert counted.taken == 1
    before = ({k: np.array(v) for k, v in p.items()},
              {k: np.array(v) for k, v in s.slots.items()}, s.step)
    g = _grads(rng, p, "jax-jit")
    bads = (g["w"].reshape(3, 5), g["w"].astype(jnp.float16), np.asarray(g["w"]))
    compiles = []  # (what JAX compiles from here on)
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if "backend_compile" in event else None)
    for bad in bads:
        with pytest.raises((ShapeError, TypeError, ValueError), match="'w'"):
            opt.update(p, {**g, "w": bad}, s)
        after = ({k: np.array(v) for k, v in p.items()},
                 {k: np.array(v) for k, v in s.slots.items()}, s.step)
        for was, now in zip(before[:2], after[:2]):
            assert all(np.array_equal(was[k], now[k]) for k in was)
        assert after[2] == before[2]
    assert compiles == [] and counted.taken == 1
    # keys in another order (as a jax.jit returns a dict: sorted): the recipe, the values
    # of the full path's step
    twin_opt, twin_p = Adam(learning_rate=1e-2), {k: jnp.array(v) for k, v in p.items()}
    twin_s = twin_opt.init(twin_p)
    twin_s.slots.update({k: jnp.array(v) for k, v in s.slots.items()})
    twin_s.step = s.step
    twin_p, twin_s = twin_opt.update(twin_p, g, twin_s)
    p, s = opt.update(p, dict(reversed(list(g.items()))), s)
    assert counted.taken == 2
    for k in p:
        np.testing.assert_array_equal(np.array(p[k]), np.array(twin_p[k]))
    for _ in range(2):
        p, s = opt.update(p, _grads(rng, p, "jax-jit"), s)
    assert counted.taken == 4
    # a learning rate float32 cannot hold: the row is refused, the full table gives inf
    opt.learning_rate = 1e39
    with pytest.warns(RuntimeWarning, match="non-finite"):
        p, s = opt.update(p, _grads(rng, p, "jax-jit"), s)
        s.settle()
    assert counted.taken == 5 and not np.isfinite(np.array(p["w"])).all()


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax", "jax-jit"])
def test_gradients_in_another_order_take_the_located_path(monkeypatch, lib):
    """Gradients whose keys come in another order than the parameters' (``jax.jit`` returns
    a dict with its keys sorted) are put in layout order by one permutation, kept for the
    next step: the engine locates them as it does ordered ones, instead of checking and
    reading them key by key, with the same values bit for bit; a wrong shape among them is
    still refused by name, with nothing changed."""
    if lib == "jax-jit":
        monkeypatch.setattr(engines, "JAX_ENGINE", "jit")
    native = "jax-jit" if lib == "jax" else lib
    rng = np.random.default_rng(7)
    names = [f"layer{i}.{k}" for i in (2, 10, 1) for k in ("weight", "bias")]
    shapes = [(4, 3), (3,)] * 3
    p0 = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
             for _ in range(4)]
    located = []
    runs = []
    for order in (names, sorted(names)):
        opt = Adam(learning_rate=1e-2)
        p = _native({n: v.copy() for n, v in p0.items()}, native)
        s = opt.init(p)
        ordered = s.engine.ordered
        monkeypatch.setattr(s.engine, "ordered",
                            lambda g, ordered=ordered: located.append(
                                (out := ordered(g)) is not None) or out)
        for g in grads:
            p, s = opt.update(p, _native({n: g[n] for n in order}, native), s)
        runs.append({n: _np(v).copy() for n, v in p.items()})
        bad = _native({n: grads[0][n] for n in order}, native)
        bad[names[1]] = _native({"x": np.zeros((1, 3), np.float32)}, native)["x"]
        before = {n: _np(v).copy() for n, v in p.items()}
        with pytest.raises(ShapeError, match=f"gradients\\['{names[1]}'\\]"):
            opt.update(p, bad, s)
        assert s.step == len(grads)
        assert all(np.array_equal(_np(p[n]), before[n]) for n in p)
    for n in names:
        np.testing.assert_array_equal(runs[0][n], runs[1][n], err_msg=n)
    assert len(located) >= 2 * len(grads) and all(located)


@pytest.mark.parametrize("make", [lambda: SGD(learning_rate=0.1, momentum=0.9),
                                  lambda: Adam(learning_rate=0.1)], ids=["sgd", "adam"])
@pytest.mark.parametrize("dtype, huge", [(np.float32, 1e39), (np.float64, np.inf)])
@pytest.mark.parametrize("case", ["beyond", "missed"])
def test_one_group_row_a_scalar_beyond_the_dtype_and_missed_counts(monkeypatch, dtype, huge,
                                                                   make, case):
    """The one-group row built without the table (``fast_step._one_group``) is the table's
    cast bit for bit; a learning rate beyond the dtype (1e39 > float32's 3.4e38) at the
    last step takes the table, whose cast makes it inf, as the full path does; after a
    step that left a parameter out (its own missed count: a row of its own) every step
    takes the table."""
    rows = {"one": 0, "table": 0}
    one_group = fast_step._one_group

    def counted(*a):
        out = one_group(*a)
        rows["one" if out is not None else "table"] += 1
        return out

    monkeypatch.setattr(fast_step, "_one_group", counted)
    rng = np.random.default_rng(4)
    p0 = {k: v.astype(dtype) for k, v in _params(rng).items()}
    grads = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in p0.items()}
             for _ in range(10)]
    if case == "missed":
        del grads[6]["b"]
    runs = []
    for fast in (True, False):
        opt = make()
        p = {k: v.copy() for k, v in p0.items()}
        s = opt.init(p)
        trace = []
        for i, g in enumerate(grads):
            opt.learning_rate = huge if i == 9 and case == "beyond" else 0.1 * 0.8 ** i
            if not fast:
                s.fast, s.fast_waste = None, 99
            beyond = case == "beyond" and i == 9  # (both paths report it, as "propagate" does)
            with pytest.warns(RuntimeWarning, match="non-finite") if beyond else nullcontext():
                p, s = opt.update(p, g, s)
            if "b" not in g:
                s.note_missed(["b"])  # (as torch_optimizer and make_train_step count it)
            trace.append({k: v.copy() for k, v in p.items()})
        runs.append(trace)
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {i} param {k}")
    assert np.isfinite(runs[0][8]["w"]).all()
    # the 1st step copies the params in, the 2nd makes the recipe: 8 steps by it
    if case == "beyond":
        assert not np.isfinite(runs[0][9]["w"]).all()  # the lr did reach the step
        assert rows == {"one": 7, "table": 1}, rows
    else:  # the 7th step (b left out) takes the one row, the 8th-10th b's own: the table
        assert rows == {"one": 5, "table": 3}, rows
