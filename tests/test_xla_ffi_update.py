"""The one-program JAX step's elementwise update on CPU as one call of the engines' fused
kernel through XLA's FFI (``engines/xla_ffi.py``, ``interop/optax_host_kernel.py``): it
equals the traced update (what XLA compiles on accelerators) for every elementwise
optimizer of the catalog, with groups, clipping and weight decay; its probe sees
non-finite gradients and new values as the traced probe does; the train step that uses it
equals the separate evaluate + update; and a program with the call loads from JAX's
persistent cache in a later process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import mithril.utils.optimizers as catalog  # noqa: E402
from mithril.interop import optax_transformation  # noqa: E402
from mithril.interop.optax_special import classify  # noqa: E402
from mithril.utils.optimizers import LAMB, SGD, Adam, AdamW  # noqa: E402
from mithril.utils.optimizers.base import Optimizer  # noqa: E402
from mithril.utils.optimizers.engines import xla_ffi  # noqa: E402

SHAPES = {"w1": (7, 5), "b1": (5,), "w2": (5, 3), "s": ()}


def _arrays(seed: int, scale: float = 1.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def _run(opt: Any, fused: bool, steps: int = 3, grads: list | None = None) -> tuple:
    """``steps`` updates of ``opt``'s transformation (:func:`ffi_checks.updates`), of the
    gradients ``grads`` or fresh ones; returns (params, state, probes taken)."""
    from ffi_checks import updates

    return updates(opt, fused, _arrays(0),
                   grads if grads is not None else [_arrays(10 + i) for i in range(steps)])


def _same(got: dict, gstate: Any, want: dict, wstate: Any) -> None:
    """The params and every slot of two runs equal to 1e-6."""
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for s in wstate.slots:
        for k in want:
            np.testing.assert_allclose(gstate.slots[s][k], wstate.slots[s][k], rtol=1e-6,
                                       atol=1e-7, err_msg=f"{s}/{k}")


def _elementwise(two_pass: bool = False) -> list[str]:
    out = []
    for n in catalog.__all__:
        cls = getattr(catalog, n)
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)) or n == "Optimizer":
            continue
        try:
            opt = cls(learning_rate=1e-2)
            if classify(opt) != "elementwise" or opt.two_pass() != two_pass:
                continue
        except TypeError:
            continue
        out.append(n)
    return out


@pytest.mark.parametrize("name", _elementwise())
def test_every_elementwise_optimizer_equals_its_traced_update(name: str) -> None:
    cls = getattr(catalog, name)
    want, wstate, _ = _run(cls(learning_rate=1e-2), fused=False)
    got, gstate, taken = _run(cls(learning_rate=1e-2), fused=True)
    assert len(taken) == 3 and all(t == [True, True] for t in taken), name
    _same(got, gstate, want, wstate)
    assert int(gstate.count) == int(wstate.count) == 3


def test_the_elementwise_catalog_is_not_empty() -> None:
    assert {"Adam", "AdamW", "SGD", "Lion", "RMSProp"} <= set(_elementwise())
    assert {"LAMB", "LARS"} <= set(_elementwise(two_pass=True))


@pytest.mark.parametrize("name", _elementwise(two_pass=True))
def test_every_two_pass_optimizer_equals_its_traced_update(name: str) -> None:
    """LAMB, LARS, DoG, Prodigy...: the first pass's per-tensor sums one call, the step
    between the passes traced, the second pass one call with a row per tensor; the params,
    slots, tensor slots and values as the traced update's."""
    cls = getattr(catalog, name)
    want, wstate, _ = _run(cls(learning_rate=1e-2), fused=False)
    got, gstate, taken = _run(cls(learning_rate=1e-2), fused=True)
    assert len(taken) == 3 and all(t == [True, True] for t in taken), name
    _same(got, gstate, want, wstate)
    for s in wstate.tensor_slots:
        for k in want:
            np.testing.assert_allclose(gstate.tensor_slots[s][k], wstate.tensor_slots[s][k],
                                       rtol=1e-5, atol=1e-7, err_msg=f"{s}/{k}")
    for k in wstate.values:
        np.testing.assert_allclose(gstate.values[k], wstate.values[k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("make", [
    lambda: AdamW(learning_rate=1e-2, weight_decay=0.1, clip_norm=0.5),
    lambda: SGD(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                clip_value=0.3),
    lambda: Adam(learning_rate=1e-2, param_groups=[
        {"params": ["w1", "b1"], "lr": 3e-2, "weight_decay": 0.2},
        {"params": ["s"], "clip_value": 0.1}]),
    lambda: AdamW(learning_rate=1e-2, ema_decay=0.9, param_groups=[
        {"params": ["w2"], "lr": 1e-3}]),
    # a group joining after 2 steps (torch's add_param_group): kept until then
    lambda: Adam(learning_rate=1e-2, clip_norm=0.5, param_groups=[
        {"params": ["w2", "s"], "step_offset": 2}]),
    lambda: LAMB(learning_rate=1e-2, nonfinite="skip", ema_decay=0.9, param_groups=[
        {"params": ["w1"], "step_offset": 2}]),
], ids=["adamw-clipnorm", "sgd-clipvalue-l2", "groups", "ema-groups", "late-group",
        "two-pass-late-group-skip"])
def test_groups_clipping_decay_and_averages(make: Any) -> None:
    want, wstate, _ = _run(make(), fused=False, steps=4)
    got, gstate, taken = _run(make(), fused=True, steps=4)
    assert taken == [[True, True]] * 4  # (through the kernel, every step applied)
    _same(got, gstate, want, wstate)
    late = [g["params"] for g in make().param_groups if g.get("step_offset")]
    if late:  # moved: joined for the last two steps
        start = _arrays(0)
        assert all(not np.allclose(got[k], start[k]) for k in late[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_keeps_everything_where_a_gradient_is_not_finite(bad: float) -> None:
    grads = [_arrays(10), _arrays(11), _arrays(12)]
    grads[1] = {**grads[1], "w2": grads[1]["w2"].at[2, 1].set(bad)}
    want, wstate, _ = _run(Adam(learning_rate=1e-2, nonfinite="skip"), False, grads=grads)
    got, gstate, taken = _run(Adam(learning_rate=1e-2, nonfinite="skip"), True, grads=grads)
    assert taken == [[True, True], [False, False], [True, True]]
    assert int(gstate.count) == int(wstate.count) == 2  # the second step skipped
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        assert np.isfinite(np.asarray(got[k])).all()


@pytest.mark.parametrize("name", ["LAMB", "Prodigy"])
def test_a_two_pass_optimizer_skips_as_the_traced_update(name: str) -> None:
    """``"skip"`` with a NaN gradient at the second step: the second pass writes nothing,
    and the tensor slots and values (Prodigy's d, its sums) stay as they were."""
    grads = [_arrays(10), _arrays(11), _arrays(12)]
    grads[1] = {**grads[1], "w1": grads[1]["w1"].at[0, 0].set(np.nan)}
    cls = getattr(catalog, name)
    want, wstate, _ = _run(cls(learning_rate=1e-2, nonfinite="skip"), False, grads=grads)
    got, gstate, taken = _run(cls(learning_rate=1e-2, nonfinite="skip"), True, grads=grads)
    assert taken == [[True, True], [False, False], [True, True]]
    assert int(gstate.count) == int(wstate.count) == 2
    _same(got, gstate, want, wstate)
    for k in wstate.values:
        np.testing.assert_allclose(gstate.values[k], wstate.values[k], rtol=1e-5, err_msg=k)
    for k in want:
        assert np.isfinite(np.asarray(got[k])).all()


def test_skip_gives_up_after_max_consecutive_skips_as_the_traced_update() -> None:
    """``max_consecutive_skips=1``: a non-finite step skipped, the next one in a row
    applied (the kernel's one forced pass: NaN params), the counts as the traced update's."""
    grads = [_arrays(10), _arrays(11), _arrays(12)]
    for i in (1, 2):
        grads[i] = {**grads[i], "b1": grads[i]["b1"].at[0].set(np.nan)}

    def make() -> Adam:
        return Adam(learning_rate=1e-2, nonfinite="skip", max_consecutive_skips=1)

    want, wstate, _ = _run(make(), False, grads=grads)
    got, gstate, taken = _run(make(), True, grads=grads)
    assert taken == [[True, True], [False, False], [False, False]]
    assert int(gstate.count) == int(wstate.count) == 2  # (the third step applied)
    assert np.isnan(np.asarray(got["b1"])).any()
    _same(got, gstate, want, wstate)
    assert {k: int(v) for k, v in gstate.hyperparams.items() if np.ndim(v) == 0 and
            np.issubdtype(np.asarray(v).dtype, np.integer)} == \
        {k: int(v) for k, v in wstate.hyperparams.items() if np.ndim(v) == 0 and
         np.issubdtype(np.asarray(v).dtype, np.integer)}


def test_skip_keeps_no_conditional_over_the_arrays() -> None:
    """With the kernel, ``"skip"``'s program holds no conditional between the new and the
    old arrays (the kernel writes nothing where it skips); traced, it does."""
    from ffi_checks import programs

    texts = programs(Adam(learning_rate=1e-2, nonfinite="skip"), _arrays(0), _arrays(1))
    assert "stablehlo.case" in texts[False] or "stablehlo.if" in texts[False]
    assert "stablehlo.case" not in texts[True] and "stablehlo.if" not in texts[True]
    assert "mithril_update_" in texts[True]


def test_the_probe_tells_gradients_from_new_values() -> None:
    """Finite gradients of ~3e38 (Σ g² beyond float32) are finite; where they make a new
    value overflow (SGD at rate 10: the param passes float32's range) the new values are
    not finite, the gradients are; an inf clipped by value makes finite new values."""
    big = {k: jnp.full(s, 3e38, jnp.float32) for k, s in SHAPES.items()}
    _, _, taken = _run(SGD(learning_rate=1e-3), True, steps=1, grads=[big])
    assert taken[0] == [True, True]
    _, _, taken = _run(SGD(learning_rate=10.0), True, steps=1, grads=[big])
    assert taken[0] == [True, False]
    inf = {**_arrays(10), "b1": jnp.full((5,), np.inf, jnp.float32)}
    got, _, taken = _run(SGD(learning_rate=0.1, clip_value=0.5), True, steps=1, grads=[inf])
    assert taken[0] == [False, True]
    np.testing.assert_allclose(got["b1"], np.asarray(_arrays(0)["b1"]) - 0.05, rtol=1e-6)


def test_refused_where_it_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor beyond MAX_TENSOR elements, bfloat16 params, a slot kept in another dtype, gradients of
    another dtype, and the switch off: the traced update, no probe taken."""
    monkeypatch.setattr(xla_ffi, "MAX_TENSOR", 34)  # (w1: 35 elements)
    assert _run(Adam(learning_rate=1e-2), True, steps=1)[2] == []
    monkeypatch.undo()
    assert _run(Adam(learning_rate=1e-2), True, steps=1)[2] != []
    monkeypatch.setattr(xla_ffi, "ENABLED", False)
    assert _run(Adam(learning_rate=1e-2), True, steps=1)[2] == []
    monkeypatch.undo()
    p = [jnp.zeros((3,), jnp.bfloat16)]
    assert not xla_ffi.usable(p, [None])
    assert not xla_ffi.usable([jnp.zeros((3,), jnp.float32)], [jnp.bfloat16])
    assert xla_ffi.usable([jnp.zeros((3,), jnp.float32)], [None, jnp.float32])
    tx = optax_transformation(Adam(learning_rate=1e-2))
    params = _arrays(0)
    probe: list = []
    half = {k: v.astype(jnp.bfloat16) for k, v in _arrays(1).items()}
    jax.jit(lambda g, s, p: tx.update(g, s, p, new_params=True, host_kernel=probe)[0])(
        half, tx.init(params), params)
    assert probe == []
    assert xla_ffi.api_version() is not None and xla_ffi.api_version()[0] == 0


def test_the_train_step_takes_it_and_equals_the_separate_calls() -> None:
    """make_train_step's program (the fused kernel through XLA) against evaluate + update
    (the NumPy engine's kernel on the JAX arrays' host buffers), AdamW with a group, global
    clipping and decoupled decay, four steps."""
    from ffi_checks import equals_separate_calls

    equals_separate_calls(lambda: AdamW(
        learning_rate=1e-2, weight_decay=0.1, clip_norm=0.5,
        param_groups=[{"params": lambda n: "bias" in n, "weight_decay": 0.0}]),
        xla_ffi, "fused_update")


def test_a_later_process_loads_the_program_from_jax_cache(tmp_path: Path) -> None:
    """Two processes sharing one cache folder: the second finds the kernel in numba's cache
    and the program (its custom call by name) in JAX's, and computes the same."""
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        import jax, jax.numpy as jnp
        from mithril.interop import optax_transformation
        from mithril.utils.optimizers import Adam
        from mithril.utils.optimizers.engines import kernel_cache
        kernel_cache.configure_jax()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        tx = optax_transformation(Adam(learning_rate=1e-2))
        params = {"w": jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)}
        probe = []
        f = jax.jit(lambda g, s, p: tx.update(g, s, p, new_params=True, host_kernel=probe))
        state = tx.init(params)
        for i in range(2):
            params, state = f({"w": jnp.full((3, 4), 0.5 + i, jnp.float32)}, state, params)
        print(json.dumps({"w": np.asarray(params["w"]).tolist(), "probe": bool(probe),
                          "stats": kernel_cache.stats()}))
    """)
    env = {**os.environ, "MITHRIL_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    import json

    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0]["probe"] and outs[1]["probe"]
    assert outs[0]["w"] == outs[1]["w"]
    assert any(p.name.startswith("handler_") for p in (tmp_path / "kernels").iterdir())
    assert list((tmp_path / "jax").iterdir())  # the program was written to JAX's cache


def test_cfunc_is_cached_by_content_or_compiled_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_cache.cfunc: a C callable whose source lands in the cache folder (named by
    its content), and where no folder can be written, one compiled in memory that runs."""
    import ctypes

    from numba import types

    from mithril.utils.optimizers.engines import kernel_cache

    def twice(x):  # pragma: no cover - compiled by numba
        return 2.0 * x

    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))
    made = kernel_cache.cfunc(types.float64(types.float64), twice)
    assert ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_double)(made.address)(1.5) == 3.0
    assert [p.name for p in (tmp_path / "kernels").glob("twice_*.py")]
    monkeypatch.setattr(kernel_cache, "_folder", lambda: None)
    made = kernel_cache.cfunc(types.float64(types.float64), twice)
    assert ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_double)(made.address)(4.0) == 8.0


def test_float64_params_take_it_too() -> None:
    """With ``jax_enable_x64`` (a process of its own): float64 params and slots through the
    kernel's float64 variant, against the traced update."""
    from ffi_checks import float64_equals_traced

    float64_equals_traced("AdamW(learning_rate=1e-2, weight_decay=0.1, clip_norm=0.3)")


@pytest.mark.parametrize("sizes", [[0, 5, 1], [70_000, 3, 40_000, 1], [32_768, 32_768]])
def test_the_pieces_cover_every_element_once(sizes: list[int]) -> None:
    pt = xla_ffi.piece_table(sizes, 1 << 15)
    pieces, segs = int(pt[0]), int(pt[1])
    bounds = pt[2:3 + pieces]
    t, f, m = (pt[3 + pieces + i * segs:3 + pieces + (i + 1) * segs] for i in range(3))
    assert pt.dtype == np.int32 and bounds[0] == 0 and bounds[-1] == segs
    assert (np.diff(bounds) > 0).all()
    for k, n in enumerate(sizes):
        seen = np.zeros(n, int)
        for e in np.flatnonzero(t == k):
            seen[f[e]:f[e] + m[e]] += 1
        assert (seen == 1).all()
    per_piece = [int(m[bounds[i]:bounds[i + 1]].sum()) for i in range(pieces)]
    assert all(x <= 1 << 15 for x in per_piece)


def test_the_thread_pool_shares_a_large_update() -> None:
    """4M params in 128 pieces: XLA's intra-op pool's task claims pieces beside the calling
    thread in some of 20 calls (a late task finds none left), and every element is right
    whichever thread did it; a NaN in the last piece is seen."""
    if jax.local_devices()[0].client.platform != "cpu" or (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs")  # (XLA's pool then has one thread)
    math = SGD(learning_rate=0.1).full_kernel_math(1)
    rng = np.random.default_rng(0)
    ps = [jnp.asarray(rng.standard_normal(1 << 20), jnp.float32) for _ in range(4)]
    gs = [jnp.asarray(rng.standard_normal(1 << 20), jnp.float32) for _ in range(4)]
    table = jnp.asarray([[1.0, np.inf, 0.0, 1.0, 0.1]], jnp.float32)

    @jax.jit
    def step(ps: list, gs: list) -> tuple:
        pool: list = []
        new, _, gf, vf = xla_ffi.fused_update(math, False, table, np.zeros(4, np.int32), ps,
                                              gs, [], pool)
        return new, gf, vf, pool[0]

    want = [np.asarray(p) - np.float32(0.1) * np.asarray(g) for p, g in zip(ps, gs)]
    shared = 0
    for _ in range(20):
        new, gf, vf, by_pool = step([p.copy() for p in ps], gs)
        shared += int(by_pool) > 0
        assert bool(gf) and bool(vf)
        for a, b in zip(new, want):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)
    assert shared > 0
    bad = list(gs)
    bad[3] = bad[3].at[-1].set(np.nan)
    _, gf, vf, _ = step([p.copy() for p in ps], bad)
    assert not bool(gf) and not bool(vf)


def test_the_skip_kernel_writes_nothing_where_it_skips() -> None:
    """The ``skip`` variant on 4M params (SGD momentum, one slot) shared with the pool:
    finite, the plain kernel's results; a NaN in the last piece, every param and slot
    bit for bit as it was; forced, the step applied whatever it holds, in one pass."""
    math = SGD(learning_rate=0.1, momentum=0.9).full_kernel_math(3)
    rng = np.random.default_rng(2)
    ps = [jnp.asarray(rng.standard_normal(1 << 20), jnp.float32) for _ in range(4)]
    ms = [jnp.asarray(rng.standard_normal(1 << 20), jnp.float32) for _ in range(4)]
    gs = [jnp.asarray(rng.standard_normal(1 << 20), jnp.float32) for _ in range(4)]
    table = jnp.asarray([[1.0, np.inf, 0.0, 1.0, 0.1, 0.9, 1.0]], jnp.float32)
    group = np.zeros(4, np.int32)

    @jax.jit
    def step(ps: list, ms: list, gs: list, force: Any) -> tuple:
        pool: list = []
        new, slots, gf, vf = xla_ffi.fused_update(math, False, table, group, ps, gs, [ms],
                                                  pool, skip=force)
        return new, slots[0], gf, vf, pool[0]

    plain = jax.jit(lambda ps, ms, gs: xla_ffi.fused_update(math, False, table, group, ps,
                                                             gs, [ms])[:2])
    want_p, want_m = plain([p.copy() for p in ps], [m.copy() for m in ms], gs)
    shared = 0
    for _ in range(10):
        new, new_m, gf, vf, by_pool = step([p.copy() for p in ps], [m.copy() for m in ms],
                                           gs, False)
        shared += int(by_pool) > 0
        assert bool(gf) and bool(vf)
        for a, b in zip([*new, *new_m], [*want_p, *want_m[0]]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert shared > 0 or (os.cpu_count() or 1) < 2
    bad = list(gs)
    bad[3] = bad[3].at[-1].set(np.nan)
    for _ in range(5):
        new, new_m, gf, vf, _ = step([p.copy() for p in ps], [m.copy() for m in ms], bad,
                                     False)
        assert not bool(gf) and not bool(vf)
        for a, b in zip([*new, *new_m], [*ps, *ms]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    new, new_m, gf, vf, _ = step([p.copy() for p in ps], [m.copy() for m in ms], bad, True)
    assert not bool(gf) and not bool(vf)
    want_p, want_m = plain([p.copy() for p in ps], [m.copy() for m in ms], bad)
    for a, b in zip([*new, *new_m], [*want_p, *want_m[0]]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isnan(np.asarray(new[3])[-1])


def test_the_first_pass_sums_each_tensor_whoever_did_its_pieces() -> None:
    """``fused_reduce`` on 3M params in tensors of 1M, 1, 2M - 1 (pieces across tensors,
    shared with the pool): LAMB's sums (Σ p², Σ u²) per tensor against NumPy's in float64,
    the same in every call."""
    opt = catalog.LAMB(learning_rate=1e-2)
    rng = np.random.default_rng(3)
    sizes = [1 << 20, 1, (1 << 21) - 1]
    ps = [jnp.asarray(rng.standard_normal(n), jnp.float32) for n in sizes]
    gs = [jnp.asarray(rng.standard_normal(n), jnp.float32) for n in sizes]
    ms = [jnp.zeros(n, jnp.float32) for n in sizes]
    scal = opt.scalars(1)
    table = jnp.asarray([[1.0, np.inf, 0.0, 1.0, *scal[:len(scal)]]], jnp.float32)
    reduce_fn = opt.reduce_math()
    f = jax.jit(lambda ps, gs: xla_ffi.fused_reduce(
        reduce_fn, opt.reductions, False, table, np.zeros(3, np.int32), ps, gs, [ms, ms]))
    want = [[float(np.sum(np.asarray(t, np.float64)))
             for t in reduce_fn(np.asarray(p, np.float64), np.asarray(g, np.float64),
                                np.zeros(p.shape), np.zeros(p.shape),
                                *(np.float64(x) for x in scal))]
            for p, g in zip(ps, gs)]
    first = [np.asarray(x) for x in f(ps, gs)]
    for _ in range(5):
        again = [np.asarray(x) for x in f(ps, gs)]
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
    for k in range(opt.reductions):
        np.testing.assert_allclose(first[k], [w[k] for w in want], rtol=1e-5)


def test_calls_from_several_threads_at_once() -> None:
    """Four Python threads running the same large update at once (each call its own job
    slot; the pool's tasks shared between them): every result right, none stuck."""
    import threading

    math = SGD(learning_rate=0.1).full_kernel_math(1)
    rng = np.random.default_rng(1)
    ps = [jnp.asarray(rng.standard_normal(300_000), jnp.float32) for _ in range(3)]
    gs = [jnp.asarray(rng.standard_normal(300_000), jnp.float32) for _ in range(3)]
    table = jnp.asarray([[1.0, np.inf, 0.0, 1.0, 0.1]], jnp.float32)
    step = jax.jit(lambda ps, gs: xla_ffi.fused_update(math, False, table,
                                                       np.zeros(3, np.int32), ps, gs, [])[0])
    want = [np.asarray(p) - np.float32(0.1) * np.asarray(g) for p, g in zip(ps, gs)]
    step([p.copy() for p in ps], gs)  # (compiled once, before the threads)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(10):
                new = step([p.copy() for p in ps], gs)
                for a, b in zip(new, want):
                    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_steps_with_unreached_params_take_it(opt: str) -> None:
    """Two heads trained in turn, each loss reaching one (the params it does not reach
    counting their missed steps): the kernel updates the reached ones, and the program's
    params and slots are the NumPy step's (``test_train_step_unreached_jax``'s check)."""
    import unittest.mock as um

    from test_train_step_unreached_jax import test_two_heads_alternately_in_one_program_as_numpy

    calls: list[int] = []
    real = xla_ffi.fused_update

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    with um.patch.object(xla_ffi, "fused_update", counted):
        test_two_heads_alternately_in_one_program_as_numpy(opt)
    assert calls  # (traced at least once per program)
