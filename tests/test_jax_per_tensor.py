"""Per-tensor scalars inside the jitted JAX engine's program (``engines/jax_per_tensor.py``):
a two-pass optimizer's first pass, ``tensor_scalars`` traced on its sums, and per-tensor
clipping's scales, with nothing read back before the update. Checked against the NumPy
engine (float32), with groups, on CPU's chunks and on one chunk (an accelerator's layout);
refused steps; and the cases that stay on the host."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import host, optimizer_engine

from mithril.utils.optimizers import (
    ASGD,
    LAMB,
    LARS,
    Adam,
    NAdam,
    Novograd,
    Optimizer,
    Prodigy,
    ScheduleFreeAdamW,
)
from mithril.utils.optimizers.elementwise import sqrt, where
from mithril.utils.optimizers.engines import jax_chunks, jax_engine

SHAPES = {"w1": (300, 40), "b1": (40,), "w2": (40, 700), "s": (), "b2": (7, 3)}


def _run(make, steps: int = 4, engine: str = "numpy", between=None, drop=None):
    """``steps`` updates of ``make()`` on ``engine``; ``drop``: (step, name) whose gradient
    that step lacks."""
    rng = np.random.default_rng(3)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
              if drop is None or (i, k) != drop} for i in range(steps)]
    opt = make()
    with optimizer_engine(engine):
        p = p0 if engine == "numpy" else {k: jnp.asarray(v) for k, v in p0.items()}
        s = opt.init(p)
        for i, g in enumerate(grads):
            if between is not None:
                between(opt, i)
            p, s = opt.update(p, g if engine == "numpy" else
                              {k: jnp.asarray(v) for k, v in g.items()}, s)
    return {k: host(v) for k, v in p.items()}, s


def _no_host_pass(monkeypatch) -> None:
    """Fail the test if a step takes the host's pass: a first-pass program read back, or
    per-tensor clipping's scales made on the host."""
    def refuse(*_a, **_k):
        raise AssertionError("the step took the host's pass")

    monkeypatch.setattr(jax_engine.JaxEngine, "_first_pass", refuse)
    monkeypatch.setattr(jax_engine.JaxEngine, "_host_table", refuse)


@pytest.mark.parametrize("make", [
    lambda: LAMB(learning_rate=1e-2, weight_decay=0.01),
    lambda: LAMB(learning_rate=1e-2, weight_decay=0.01, clip_norm=1.0, param_groups=[
        {"params": r"^b", "weight_decay": 0.0, "learning_rate": 3e-3}]),
    lambda: LARS(learning_rate=0.1, momentum=0.9, weight_decay=1e-3, param_groups=[
        {"params": r"^b", "weight_decay": 0.0, "trust_coefficient": None}]),  # (no trust ratio)
    # per-tensor clipping's scales in the program too, before the first pass
    lambda: LAMB(learning_rate=1e-2, clip_tensor_norm=5.0, clip_norm=20.0, param_groups=[
        {"params": r"^w", "clip_tensor_norm": None, "clip_block_rms": 0.5}]),
], ids=["lamb", "lamb-groups-clip", "lars-groups", "lamb-tensor-clip"])
@pytest.mark.parametrize("threshold", [1 << 13, 1 << 40], ids=["chunks", "one-chunk"])
def test_one_program_equals_numpy_engine(monkeypatch, make, threshold):
    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", threshold)
    want, _ = _run(make)
    _no_host_pass(monkeypatch)
    got, s = _run(make, engine="jax-jit")
    assert type(s.engine).__name__ == "JaxEngine"
    # traced: one column added, no settings read
    assert list(s.engine._first_specs.values()) == [(1, (), ())]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=3e-6, atol=1e-6, err_msg=k)


def _floor_reduce(p, g, lr):
    return (g * g,)


def _floor_math(p, g, lr, scale):
    return (p - lr * scale * g,)


class FlooredSGD(Optimizer):
    """Normalised SGD whose ``tensor_scalars`` reads one of its settings: ``p ← p − lr ·
    g / max(‖g‖, floor)``."""

    reductions = 1

    def __init__(self, learning_rate: float = 0.1, floor: float = 1e-12, **kw) -> None:
        super().__init__(learning_rate, **kw)
        self.floor = floor

    def reduce_math(self):
        return _floor_reduce

    def kernel_math(self):
        return _floor_math

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):
        norm = sqrt(sums[0])
        return (1.0 / where(norm > self.floor, norm, self.floor),), tensors, values


def test_settings_read_are_arguments(monkeypatch):
    """A ``tensor_scalars`` that reads a numeric setting runs in the program, the setting a
    traced argument: changed between steps, it is used at once, without a compile."""
    def between(opt, i):
        opt.floor = 1e-12 if i < 2 else 1e3  # from step 3 the floor is every tensor's scale

    want, _ = _run(FlooredSGD, between=between)
    _no_host_pass(monkeypatch)
    programs = len(jax_engine._COMPILED)
    got, s = _run(FlooredSGD, engine="jax-jit", between=between)
    assert list(s.engine._first_specs.values()) == [(1, ("floor",), ())]
    assert len(jax_engine._COMPILED) == programs + 1
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=3e-6, atol=1e-6, err_msg=k)


class SwitchedSGD(FlooredSGD):
    """:class:`FlooredSGD` whose ``tensor_scalars`` branches on a bool setting (static: a
    change traces the program again) and, where ``branchy``, on a number (Python control
    flow on a traced value: the host's pass)."""

    def __init__(self, learning_rate: float = 0.1, **kw) -> None:
        super().__init__(learning_rate, **kw)
        self.halve, self.branchy = False, False

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):
        norm = sqrt(sums[0])
        scale = 1.0 / where(norm > self.floor, norm, self.floor)
        if self.branchy and self.floor > 1.0:
            scale = scale * 0.25
        return (scale * 0.5 if self.halve else scale,), tensors, values


class SuperSGD(FlooredSGD):
    """:class:`FlooredSGD` extended through ``super()``: the program's stand-in ``self`` is
    no instance of the class, so this one keeps the host's pass."""

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):
        (scale,), tensors, values = super().tensor_scalars(step, sums, scalars, tensors,
                                                           values, sizes)
        return (scale * 0.5,), tensors, values


def test_static_settings_and_python_branches():
    def between(opt, i):
        opt.halve = i >= 2

    want, _ = _run(SwitchedSGD, between=between)
    got, s = _run(SwitchedSGD, engine="jax-jit", between=between)
    assert list(s.engine._first_specs.values()) == [
        (1, ("floor",), (("branchy", False), ("halve", True)))]  # (found again at step 3)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=3e-6, atol=1e-6, err_msg=k)

    def branchy(opt, i):
        opt.branchy, opt.floor = True, (1e-12 if i < 2 else 1e3)

    want, _ = _run(SwitchedSGD, between=branchy)
    got, s = _run(SwitchedSGD, engine="jax-jit", between=branchy)
    assert list(s.engine._first_specs.values()) == [None]  # (`if` on a traced number)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=3e-6, atol=1e-6, err_msg=k)
    want, _ = _run(SuperSGD)
    got, s = _run(SuperSGD, engine="jax-jit")
    assert list(s.engine._first_specs.values()) == [None]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=3e-6, atol=1e-6, err_msg=k)


class ScaledSGD(FlooredSGD):
    """:class:`FlooredSGD` with an optional extra factor, None or a number."""

    def __init__(self, learning_rate: float = 0.1, **kw) -> None:
        super().__init__(learning_rate, **kw)
        self.factor = None

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):
        norm = sqrt(sums[0])
        scale = 1.0 / where(norm > self.floor, norm, self.floor)
        return (scale if self.factor is None else scale * self.factor,), tensors, values


def test_setting_between_none_and_a_number():
    """A setting that turns from None (static) to a number (traced) and back: traced anew
    each time its kind changes, never with a stale value."""
    def between(opt, i):
        opt.factor = [None, 0.5, 0.25, None][i]

    want, _ = _run(ScaledSGD, between=between)
    got, s = _run(ScaledSGD, engine="jax-jit", between=between)
    assert list(s.engine._first_specs.values()) == [(1, ("floor",), (("factor", None),))]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=3e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("make", [
    lambda: Novograd(learning_rate=1e-2, weight_decay=1e-3),
    lambda: Novograd(learning_rate=1e-2, beta2=0.5, eps_root=1e-4, param_groups=[
        {"params": r"^b", "learning_rate": 3e-3}]),
    lambda: NAdam(learning_rate=1e-2, momentum_decay=4e-3),
    lambda: ASGD(learning_rate=1e-2, t0=2.0),
], ids=["novograd", "novograd-groups", "nadam-torch", "asgd"])
@pytest.mark.parametrize("threshold", [1 << 13, 1 << 40], ids=["chunks", "one-chunk"])
def test_tensor_slots_in_the_program(monkeypatch, make, threshold):
    """Tensor slots (Novograd's ν, NAdam's μ product, ASGD's η and μ) are arguments of the
    program and come back from it, committed once the step is applied; a tensor without a
    gradient keeps its own (step 3 lacks ``b1``'s); Novograd's β₂ changed between steps is
    used (a traced setting)."""
    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", threshold)

    def between(opt, i):
        if isinstance(opt, Novograd) and i == 3:
            opt.beta2 = 0.9

    want, ws = _run(make, between=between, drop=(2, "b1"))
    _no_host_pass(monkeypatch)
    got, s = _run(make, engine="jax-jit", between=between, drop=(2, "b1"))
    assert [v is not None for v in s.engine._first_specs.values()] == [True]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for name in make().tensor_slots:
        np.testing.assert_allclose(host(s.slots[name]), ws.slots[name], rtol=1e-5, err_msg=name)


def _descent(make, engine: str, steps: int = 12, read_at=(), drop=None, seen=None):
    """``steps`` updates of ``make()`` on a quadratic (g = p − target: Prodigy's d grows);
    ``read_at``: steps after which ``state.values`` is read; ``seen``: a list that gets,
    after each step, whether its values were still held on the device."""
    rng = np.random.default_rng(4)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    target = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    opt = make()
    values = []
    with optimizer_engine(engine):
        native = (lambda a: a) if engine == "numpy" else jnp.asarray
        p = {k: native(v) for k, v in p0.items()}
        s = opt.init(p)
        for i in range(steps):
            g = {k: native(np.asarray(host(v) - target[k], np.float32)) for k, v in p.items()
                 if drop is None or (i, k) != drop}
            p, s = opt.update(p, g, s)
            if seen is not None:
                seen.append(s.held_values() is not None)
            if i in read_at:
                values.append(dict(s.values))
    return {k: host(v) for k, v in p.items()}, s, values


@pytest.mark.parametrize("make", [
    lambda: Prodigy(learning_rate=1.0, weight_decay=1e-2),
    lambda: Prodigy(learning_rate=1.0, beta3=0.9, param_groups=[
        {"params": r"^b", "learning_rate": 0.5, "beta2": 0.99}]),
    lambda: Prodigy(learning_rate=1.0, beta3=0.5, safeguard_warmup=True),
], ids=["prodigy", "prodigy-groups", "prodigy-safeguard"])
@pytest.mark.parametrize("threshold", [1 << 13, 1 << 40], ids=["chunks", "one-chunk"])
def test_state_values_in_the_program(monkeypatch, make, threshold):
    """Prodigy's ``d`` and numerator go into the program and come back, and its per-step
    scalars (of ``d``: ``scalar_values``) are made there, per group: no host pass, and
    nothing read back between steps (the values stay held on the device until
    ``state.values`` is read; read at step 5, the next step takes the floats). ``d`` grows
    here; equal to the NumPy engine's to float32's precision; step 3 lacks
    ``b1``'s gradient."""
    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", threshold)
    want, ws, want_values = _descent(make, "numpy", read_at=(5,), drop=(3, "b1"))
    _no_host_pass(monkeypatch)
    seen = []
    got, s, got_values = _descent(make, "jax-jit", read_at=(5,), drop=(3, "b1"), seen=seen)
    assert seen == [True] * 12
    assert len(s.engine._own_specs) == 1 and None not in s.engine._own_specs.values()
    assert ws.values["d"] > 1.5 * make().estim_lr0
    for w, g in zip([*want_values, ws.values], [*got_values, s.values]):
        # (sums in float32: the numerator, a sum of terms of both signs, to ~1e-5)
        assert g["d"] == pytest.approx(w["d"], rel=2e-5)
        assert g["numerator"] == pytest.approx(w["numerator"], rel=1e-4)
    assert isinstance(s.values["d"], float) and s.held_values() is None
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("warmup", [None, 3], ids=["", "warmup"])
@pytest.mark.parametrize("threshold", [1 << 13, 1 << 40], ids=["chunks", "one-chunk"])
def test_schedule_free_values_in_the_program(monkeypatch, threshold, warmup):
    """Schedule-free AdamW's weight sum and largest learning rate: in and out of the
    program (its scalars read no value), the learning rate changed at step 4; its warm-up's
    branch on the step a traced ``where``."""
    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", threshold)

    def make():
        return ScheduleFreeAdamW(learning_rate=1e-2, weight_decay=1e-3, warmup_steps=warmup,
                                 param_groups=[{"params": r"^b", "learning_rate": 3e-3}])

    def between(opt, i):
        if i == 4:
            opt.learning_rate = 2e-2

    want, ws = _run(make, steps=6, between=between)
    _no_host_pass(monkeypatch)
    got, s = _run(make, steps=6, engine="jax-jit", between=between)
    assert s.held_values() is not None
    for k in ws.values:
        assert s.values[k] == pytest.approx(ws.values[k], rel=1e-6), k
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_state_values_where_a_group_differs(monkeypatch):
    """A group whose static setting differs from the optimizer's (``safeguard_warmup``, a
    branch of the scalars) cannot share the program's scalars: that step takes the host's
    pass, reading the values back; the numbers stay the NumPy engine's."""
    make = lambda: Prodigy(learning_rate=1.0, param_groups=[  # noqa: E731
        {"params": r"^b", "safeguard_warmup": True}])
    want, ws, _ = _descent(make, "numpy", steps=6)
    calls = []
    real = jax_engine.JaxEngine._first_pass
    monkeypatch.setattr(jax_engine.JaxEngine, "_first_pass",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    got, s, _ = _descent(make, "jax-jit", steps=6)
    assert len(calls) == 6
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert s.values["d"] == pytest.approx(ws.values["d"], rel=1e-5)


def test_refused_step_keeps_state_values():
    """Prodigy under ``"skip"``: a step with a NaN gradient leaves ``d`` and the numerator
    as they were (its commit is dropped), still on the device; a state dict then holds
    floats, and the state restored from it steps on as the original."""
    rng = np.random.default_rng(8)
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
        opt = Prodigy(learning_rate=1.0, estim_lr0=1e-3, nonfinite="skip")
        s = opt.init(p)
        g = {k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32)) for k, v in p.items()}
        for _ in range(3):
            p, s = opt.update(p, g, s)
        held = {k: np.asarray(v) for k, v in s.held_values().items()}
        bad = dict(g, b1=g["b1"].at[0].set(jnp.nan))
        with pytest.warns(RuntimeWarning, match="step skipped"):
            p, s = opt.update(p, bad, s)
        assert {k: np.asarray(v) for k, v in s.held_values().items()} == held
        saved = opt.state_dict(s)
        assert saved["values"] == {k: float(v) for k, v in held.items()}
        again = opt.load_state_dict(saved, {k: v.copy() for k, v in p.items()})
        p2 = {k: v.copy() for k, v in p.items()}
        p, s = opt.update(p, g, s)
        p2, again = opt.update(p2, g, again)
        for k in p:
            np.testing.assert_array_equal(host(p[k]), host(p2[k]))
        assert again.values == s.values


def test_refused_step_keeps_tensor_slots():
    """Novograd under ``"skip"``: a step with a NaN gradient leaves ν as it was."""
    rng = np.random.default_rng(8)
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
        opt = Novograd(learning_rate=1e-2, nonfinite="skip")
        s = opt.init(p)
        g = {k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32)) for k, v in p.items()}
        p, s = opt.update(p, g, s)
        nu = host(s.slots["nu"])
        bad = dict(g, b1=g["b1"].at[0].set(jnp.nan))
        with pytest.warns(RuntimeWarning, match="step skipped"):
            p, s = opt.update(p, bad, s)
        np.testing.assert_array_equal(host(s.slots["nu"]), nu)
        p, s = opt.update(p, {k: 2 * v for k, v in g.items()}, s)  # (ν of g: ν again)
        np.testing.assert_allclose(host(s.slots["nu"]), nu * (0.25 + 0.75 * 4), rtol=1e-5)


def _overflowing():
    """LAMB's first step on ``w`` with ``w[0]`` near float32's largest value: the trust ratio
    ‖w‖/‖u‖ carries it past it (finite gradients, a non-finite new param)."""
    big = float(np.finfo(np.float32).max) * 0.75
    p = {"w": jnp.asarray([-big, 1.0, 2.0], jnp.float32), "b": jnp.asarray([0.5, -0.5], jnp.float32)}
    g = {"w": jnp.asarray([1.0, 0.1, 0.2], jnp.float32), "b": jnp.asarray([0.1, 0.1], jnp.float32)}
    return p, g


@pytest.mark.parametrize("clip", [None, 1e30], ids=["", "tensor-clip"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_refused_one_program_step_changes_nothing(policy, clip):
    """(The error names the tensor from the table the host then computes.)"""
    with optimizer_engine("jax-jit"):
        p, g = _overflowing()
        opt = LAMB(learning_rate=1.0, nonfinite=policy, clip_tensor_norm=clip)
        state = opt.init(p)
        before = {k: host(v) for k, v in p.items()}
        slots = {s: host(state.slots[s]) for s in state.slots}
        if policy == "raise":
            with pytest.raises(FloatingPointError, match=r"finite gradients.*\['w'\]"):
                opt.update(p, g, state)
            out = p
        else:
            with pytest.warns(RuntimeWarning, match="step skipped"):
                out, state = opt.update(p, g, state)
            assert state.last_step_skipped and state.num_skipped == 1
        assert list(state.engine._first_specs.values()) == [(1, (), ())]
        assert state.step == 0
        for k in before:
            np.testing.assert_array_equal(host(out[k]), before[k])
            np.testing.assert_array_equal(host(p[k]), before[k])
        for s in slots:
            np.testing.assert_array_equal(host(state.slots[s]), slots[s])


def test_tensor_clipping_unchecked_reads_nothing_back(monkeypatch):
    """Adam with ``clip_tensor_norm`` under ``"unchecked"``: the scales are made in the
    program, so nothing is measured for the host (no norm) and no host pass runs."""
    make = lambda: Adam(learning_rate=1e-2, clip_tensor_norm=1.0, nonfinite="unchecked")  # noqa: E731
    want, _ = _run(make)
    _no_host_pass(monkeypatch)
    got, s = _run(make, engine="jax-jit")
    assert s.last_grad_norm is None or np.isnan(s.last_grad_norm)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=3e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("make", [
    lambda: LAMB(learning_rate=1e-2, weight_decay=0.01),
    lambda: Adam(learning_rate=1e-2, clip_tensor_norm=1.0, clip_norm=3.0, param_groups=[
        {"params": r"^b", "clip_tensor_norm": None, "clip_block_rms": 0.5}]),
    lambda: Prodigy(learning_rate=1.0, param_groups=[{"params": r"^b", "beta2": 0.99}]),
], ids=["lamb", "adam-tensor-clip", "prodigy"])
def test_later_steps_compile_nothing(make):
    """The step number and the tables are arguments, the clipping settings constants that
    compare equal from step to step: every step after the first runs the same program
    (a key that differed each step made every step compile: ~0.3 s on 200k params).
    Prodigy's values: held on the device, or floats once read (step 4), the same
    signature."""
    rng = np.random.default_rng(5)
    opt = make()
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
        s = opt.init(p)
        grads = [{k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32))
                  for k, v in p.items()} for _ in range(3)]
        p, s = opt.update(p, grads[0], s)
        programs = len(jax_engine._COMPILED)
        traces = sum(f._cache_size() for f in jax_engine._COMPILED.values())
        for i, g in enumerate(grads * 2):
            p, s = opt.update(p, g, s)
            if i == 2:
                dict(s.values)  # (Prodigy's read back: floats for the next step)
    assert len(jax_engine._COMPILED) == programs
    assert sum(f._cache_size() for f in jax_engine._COMPILED.values()) == traces
