"""``Accumulate(..., should_skip_update_fn=)`` side by side with ``optax.MultiSteps(...,
should_skip_update_fn=)``: the same micro-batch gradients, NaN / inf ones included (mid-window,
on a window's last call, several in a row), on NumPy, torch and JAX in float64 against optax in
float64; after every call the parameters agree to 1e-12 and so do the counters (``micro_step``
/ ``mini_step``, ``windows`` / ``gradient_step``, the wrapped optimizer's step / adam's
``count``) and the ``skip_state``. Then the skip count through state dicts and checkpoints, and
calls that raise changing nothing."""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import optax
import pytest
import torch
from conftest import jax_float64_results
from test_checkpoint_faults import build, parts

from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import CheckpointError, ShapeError
from mithril.utils.accumulate_skip import skip_large_updates, skip_not_finite
from mithril.utils.accumulation import Accumulate
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.optimizers import SGD, Adam

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
STEPS = 17
#: micro-batch -> (key, entry, value) made non-finite: mid-window (2), a window's would-be
#: last call (5), two in a row (9, 10), one NaN among finite keys (14)
BAD = {2: ("w", (0, 1), np.nan), 5: ("b", (1,), np.inf), 9: ("w", (2, 0), -np.inf),
       10: ("b", (0,), np.nan), 14: ("s", (), np.nan)}
MAX_SQ = 30.0  # skip_large_updates' bound: skips some finite micro-batches too
CASES = ("finite", "large", "schedule")


def _grads(t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + t)
    g = {"w": rng.standard_normal((3, 2)) * (1 + t % 3), "b": rng.standard_normal(2),
         "s": np.array(rng.standard_normal())}
    if t in BAD:
        key, at, v = BAD[t]
        g[key][at] = v
    return g


def _start() -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), 0.5), "b": np.full(2, -0.25), "s": np.array(1.5)}


def _k_schedule(windows):  # (jnp.where: a 0-d array for optax, an int-like one for us)
    import jax.numpy as jnp

    return jnp.where(windows < 2, 2, 3)


def _setup(case: str, ours: bool):
    """(k, predicate) of ``case``: ours or optax's."""
    k = _k_schedule if case == "schedule" else 3
    if case == "large":
        fn = skip_large_updates if ours else optax.skip_large_updates
        return k, functools.partial(fn, max_squared_norm=MAX_SQ), "norm_squared"
    return k, skip_not_finite if ours else optax.skip_not_finite, "num_not_finite"


def run(case: str, backend: str) -> dict[str, np.ndarray]:
    """Our run of ``case`` on ``backend`` (float64): the parameters after every call and
    the counters (micro_step, windows, step, skipped so far, should_skip, the skip_state
    value)."""
    be = BACKENDS[backend](dtype="float64")
    k, fn, key = _setup(case, ours=True)
    acc = Accumulate(Adam(learning_rate=0.05), k, should_skip_update_fn=fn)
    params = {n: be.array(v) for n, v in _start().items()}
    state = acc.init(params)
    out: dict[str, list] = {n: [] for n in params} | {"counts": []}
    for t in range(STEPS):
        params, state = acc.update(params, {n: be.array(v) for n, v in _grads(t).items()},
                                   state)
        for n, v in params.items():
            out[n].append(np.array(be.to_numpy(v), copy=True))  # (updated in place)
        out["counts"].append([state.micro_step, state.windows, state.step,
                              state.num_skipped_micro_batches, state.skip_state["should_skip"],
                              state.skip_state[key]])
    return {n: np.array(v, dtype=np.float64) for n, v in out.items()}


def _optax(case: str) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    k, fn, key = _setup(case, ours=False)
    with jax.enable_x64(True):
        tx = optax.MultiSteps(optax.adam(0.05), every_k_schedule=k, should_skip_update_fn=fn,
                              accumulator_dtype=jnp.float64)
        q = {n: jnp.asarray(v) for n, v in _start().items()}
        s, update = tx.init(q), jax.jit(tx.update)  # (eager, every call traces its conds)
        out: dict[str, list] = {n: [] for n in q} | {"counts": []}
        skipped = 0
        for t in range(STEPS):
            u, s = update({n: jnp.asarray(v) for n, v in _grads(t).items()}, s, q)
            q = optax.apply_updates(q, u)
            skipped += int(s.skip_state["should_skip"])
            for n, v in q.items():
                out[n].append(np.asarray(v))
            out["counts"].append([int(s.mini_step), int(s.gradient_step),
                                  int(s.inner_opt_state[0].count), skipped,
                                  bool(s.skip_state["should_skip"]), float(s.skip_state[key])])
        return {n: np.array(v, dtype=np.float64) for n, v in out.items()}


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, dict[str, np.ndarray]]]:
    out = {b: {c: run(c, b) for c in CASES} for b in ("numpy", "torch")}
    out["jax"] = jax_float64_results("test_accumulation_skip", "CASES", "run")
    out["optax"] = {c: _optax(c) for c in CASES}
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_skipped_micro_batches_match_optax_multisteps(results, backend, case):
    ours, ref = results[backend][case], results["optax"][case]
    # the counters after every call, skip_state's value (a count, or Σ‖g‖²) included
    np.testing.assert_allclose(ours["counts"], ref["counts"], rtol=1e-12, atol=0)
    for n in _start():
        assert np.isfinite(ours[n]).all(), n
        np.testing.assert_allclose(ours[n], ref[n], rtol=0, atol=1e-12, err_msg=n)
    skipped = ref["counts"][:, 3]
    if case != "large":  # every non-finite micro-batch, and only those, skipped
        assert skipped[-1] == len(BAD) and ours["counts"][:, 4].sum() == len(BAD)
    else:  # the NaN / inf ones and some finite ones beyond the bound
        assert skipped[-1] > len(BAD) and ref["counts"][:, 2][-1] >= 2
    assert not np.array_equal(ours["w"][-1], _start()["w"])  # (it trained)


def test_optax_predicates_work_unchanged_on_numpy_gradients():
    """``optax.skip_not_finite`` itself is accepted (a 0-d JAX bool): the same run as ours."""
    def go(fn):
        acc = Accumulate(SGD(learning_rate=0.1, momentum=0.9), 3, should_skip_update_fn=fn)
        p = _start()
        st = acc.init(p)
        for t in range(STEPS):
            p, st = acc.update(p, _grads(t), st)
        return p, st

    (p1, s1), (p2, s2) = go(optax.skip_not_finite), go(skip_not_finite)
    assert s1.num_skipped_micro_batches == s2.num_skipped_micro_batches == len(BAD)
    for n in p1:
        np.testing.assert_array_equal(p1[n], p2[n])


def test_without_a_predicate_nonfinite_micro_batches_reach_the_optimizer():
    """The default (None) buffers every micro-batch, as MultiSteps without the argument:
    a NaN spoils its window (a wrapped ``nonfinite="skip"`` optimizer then skips the whole
    window, as torch's GradScaler would)."""
    acc = Accumulate(Adam(learning_rate=0.05, nonfinite="skip"), 3)
    p = _start()
    st = acc.init(p)
    with pytest.warns(RuntimeWarning):
        for t in range(3):
            p, st = acc.update(p, _grads(t), st)
    assert st.windows == 1 and st.step == 0 and st.num_skipped == 1
    assert st.num_skipped_micro_batches == 0 and st.skip_state is None


# -- calls that raise change nothing -------------------------------------------------------------
def _snapshot(acc, st):
    d = acc.state_dict(st)
    return d, st.skip_state


def _same(a, b):
    (d1, s1), (d2, s2) = a, b
    assert s1 is s2
    assert d1.keys() == d2.keys()
    for key in d1:
        if key == "sums":
            assert d1[key].keys() == d2[key].keys()
            for n in d1[key]:
                np.testing.assert_array_equal(d1[key][n], d2[key][n])
        elif key != "inner":
            assert d1[key] == d2[key], key
    np.testing.assert_array_equal(d1["inner"]["step"], d2["inner"]["step"])


class Boom(Exception):
    pass


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_refused_call_changes_nothing(kind):
    be = BACKENDS[kind](dtype="float64")
    p0 = {n: be.array(v) for n, v in _start().items()}

    def boom(g, windows, params):
        raise Boom

    acc = Accumulate(Adam(learning_rate=0.05), 3, should_skip_update_fn=skip_not_finite)
    st = acc.init(p0)
    p = p0
    for t in range(5):  # one window emitted (t = 2 skipped), one micro-batch buffered
        p, st = acc.update(p, {n: be.array(v) for n, v in _grads(t).items()}, st)
    before = _snapshot(acc, st)
    assert (st.micro_step, st.windows, st.num_skipped_micro_batches) == (1, 1, 1)
    nan_w = {n: be.array(v) for n, v in _grads(2).items()}
    bad_shape = dict(nan_w, b=be.array(np.full(3, np.nan)))
    with pytest.raises(ShapeError, match=r"gradients\['b'\] has shape \(3,\)"):
        acc.update(p, bad_shape, st)  # (checked before the predicate is asked: not skipped)
    with pytest.raises(ValueError, match="weight must be positive"):
        acc.update(p, nan_w, st, weight=-1.0)
    for fn, err, msg in ((boom, Boom, None),
                         (lambda g, s, q: (np.array([True]), {}), ValueError, "boolean scalar"),
                         (lambda g, s, q: (torch.tensor(1.0, dtype=torch.float64), {}), ValueError, "dtype float64 and shape \\(\\)"),
                         (lambda g, s, q: True, ValueError, r"\(should_skip, skip_state\)")):
        acc.should_skip_update_fn = fn
        with pytest.raises(err, match=msg):
            acc.update(p, nan_w, st)
        _same(before, _snapshot(acc, st))
    with pytest.raises(TypeError, match="should_skip_update_fn must be callable"):
        acc.should_skip_update_fn = "skip_not_finite"
    # the wrapped optimizer refusing the window's step: the predicate's verdict not kept
    acc.should_skip_update_fn = skip_not_finite
    p, st = acc.update(p, {n: be.array(v) for n, v in _grads(6).items()}, st)
    before = _snapshot(acc, st)
    acc.optimizer.nonfinite = "raise"
    huge = {n: be.array(np.full_like(v, 1e308)) for n, v in _grads(0).items()}
    with pytest.raises(FloatingPointError):  # (finite micro-batches, an overflowing mean)
        acc.update(p, huge, st)
    _same(before, _snapshot(acc, st))
    assert st.micro_step == 2 and st.skip_state["num_not_finite"] == 0


# -- the count through state dicts and checkpoints -----------------------------------------------
NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                 np.dtypes.Float64DType]


def _run(acc, p, st, start, stop):
    for t in range(start, stop):
        p, st = acc.update(p, _grads(t), st)
    return p, st


def _fresh():
    return Accumulate(Adam(learning_rate=0.05), 3, should_skip_update_fn=skip_not_finite)


@pytest.mark.parametrize("via", ["state_dict", "checkpoint"])
def test_the_skip_count_survives_a_resume(via, tmp_path):
    acc = _fresh()
    full, fst = _run(acc, _start(), acc.init(_start()), 0, STEPS)
    cut = 11  # after the two skipped in a row, one micro-batch buffered
    p, st = _run(acc, _start(), acc.init(_start()), 0, cut)
    assert (st.num_skipped_micro_batches, st.micro_step) == (4, 1)
    acc2 = _fresh()
    if via == "state_dict":
        buf = io.BytesIO()
        torch.save(acc.state_dict(st), buf)
        buf.seek(0)
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            st2 = acc2.load_state_dict(torch.load(buf, weights_only=True), p)
    else:
        save_checkpoint(tmp_path / "ck", p, acc, st)
        st2 = load_checkpoint(tmp_path / "ck", p, acc2)["state"]
    assert (st2.num_skipped_micro_batches, st2.micro_step, st2.windows) == (4, 1, st.windows)
    assert st2.skip_state is None  # (the predicate's last output is not saved)
    resumed, rst = _run(acc2, p, st2, cut, STEPS)
    assert rst.num_skipped_micro_batches == fst.num_skipped_micro_batches == len(BAD)
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n], err_msg=n)


def test_state_dicts_without_the_count_load_and_bad_counts_are_refused():
    acc = _fresh()
    p, st = _run(acc, _start(), acc.init(_start()), 0, 4)
    d = acc.state_dict(st)
    assert d["num_skipped_micro_batches"] == 1
    older = {k: v for k, v in d.items() if k != "num_skipped_micro_batches"}
    assert _fresh().load_state_dict(older, p).num_skipped_micro_batches == 0
    for bad, err in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        fresh = Accumulate(Adam(learning_rate=0.3), 7)
        with pytest.raises(err, match="'num_skipped_micro_batches'"):
            fresh.load_state_dict(dict(d, num_skipped_micro_batches=bad), p)
        assert fresh.k == 7 and fresh.get_learning_rate() == 0.3
    no_window = {k: d[k] for k in ("optimizer", "k", "inner", "num_skipped_micro_batches")}
    with pytest.raises(KeyError, match=r"unknown \['num_skipped_micro_batches'\]"):
        _fresh().load_state_dict(no_window, p)


def test_an_edited_checkpoint_count_is_refused(tmp_path):
    acc = _fresh()
    p, st = _run(acc, _start(), acc.init(_start()), 0, 4)
    save_checkpoint(tmp_path / "ck", p, acc, st)
    meta, tensors, _, _ = parts(tmp_path / "ck")
    meta = json.loads(meta)
    assert meta["accumulate"]["num_skipped_micro_batches"] == 1
    meta["accumulate"]["num_skipped_micro_batches"] = -2
    (tmp_path / "bad").write_bytes(build(json.dumps(meta), tensors))
    fresh = Accumulate(Adam(learning_rate=0.3), 2)
    with pytest.raises(CheckpointError, match="'accumulate.num_skipped_micro_batches' is -2"):
        load_checkpoint(tmp_path / "bad", p, fresh)
    assert fresh.k == 2 and fresh.get_learning_rate() == 0.3
    del meta["accumulate"]["num_skipped_micro_batches"]  # (older checkpoints: 0)
    (tmp_path / "old").write_bytes(build(json.dumps(meta), tensors))
    assert load_checkpoint(tmp_path / "old", p, _fresh())["state"].num_skipped_micro_batches == 0


def test_mixed_precision_trainer_reports_a_skipped_micro_batch():
    """Under :class:`MixedPrecisionTrainer` a micro-batch the predicate skips (finite, too
    large) is reported as the trainer's own dropped ones: not applied, the scheduler not
    stepped, the loss scale not backed off; the masters are SGD on the kept ones' means."""
    from test_mixed_precision_peers import Counter, dyadic_batches, host, linear, p0

    from mithril.utils.mixed_precision import MixedPrecisionTrainer

    be = TorchBackend(dtype="float16")
    data = dyadic_batches(7, seed=3)
    sq = [sum(float((g ** 2).sum()) for g in gr.values()) for _, _, gr in data]
    bound = sorted(sq)[-2]  # the two largest skipped
    acc = Accumulate(SGD(learning_rate=0.25), 2,
                     should_skip_update_fn=functools.partial(skip_large_updates,
                                                             max_squared_norm=bound))
    trainer = MixedPrecisionTrainer(linear(be), acc, p0(be), loss_scale=64.0)
    counted, kept = Counter(), []
    want = {k: np.full(v.shape, 0.5, np.float32) for k, v in host(be, p0(be)).items()}
    for (x, c, g), s in zip(data, sq, strict=True):
        trainer.forward({"input": be.array(x)})
        _, state, ok = trainer.backward_and_update({"out": be.array(c)})
        assert ok is (s < bound) and state.last_step_skipped is (s >= bound)
        assert trainer.step_scheduler(counted) is state.applied
        kept += [g] if s < bound else []
        if len(kept) == 2:
            want = {k: want[k] - 0.25 * (kept[0][k] + kept[1][k]) / 2 for k in want}
            kept = []
        for k, v in host(be, trainer.master_params).items():
            np.testing.assert_allclose(v, want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert state.num_skipped_micro_batches == 2 and counted.n == state.windows == 2
    assert trainer.loss_scale == 64.0 and state.micro_step == 1


def test_skip_large_updates_sums_half_precision_gradients_without_overflow():
    """A float16 micro-batch of Σ‖g‖² = 9e6 (each entry 300, exact): optax sums its squares
    in float16 (inf past 65504) and skips it under a bound of 1e7; ours sums in float64 on
    NumPy and torch and float32 on JAX (float64 there needs x64), and keeps it."""
    import jax.numpy as jnp

    g = np.full(100, 300.0, np.float16)
    theirs = optax.skip_large_updates({"w": jnp.asarray(g)}, 0, None, max_squared_norm=1e7)
    assert bool(theirs[0]) and np.isinf(float(theirs[1]["norm_squared"]))
    for arr in (g, torch.from_numpy(g), jnp.asarray(g)):
        skip, info = skip_large_updates({"w": arr}, 0, None, max_squared_norm=1e7)
        assert skip is False and info == {"should_skip": False, "norm_squared": 9e6}
        assert skip_large_updates({"w": arr}, 0, None, max_squared_norm=9e6)[0] is True


def test_mixed_precision_trainer_keeps_the_skip_count_of_a_state_it_casts_to_its_masters():
    """A float16 Accumulate state handed to :class:`MixedPrecisionTrainer` is rebuilt in the
    masters' float32: the skipped micro-batch's count and ``skip_state`` come along with the
    buffered one (the rebuild dropped both)."""
    from test_mixed_precision_peers import linear, p0

    from mithril.utils.mixed_precision import MixedPrecisionTrainer

    be = TorchBackend(dtype="float16")
    params = {k: v.half() for k, v in p0(be).items()}
    acc = Accumulate(SGD(learning_rate=0.25), 2, should_skip_update_fn=skip_not_finite)
    state = acc.init(params)
    for fill in (float("nan"), 0.5):
        params, state = acc.update(params, {k: torch.full_like(v, fill)
                                            for k, v in params.items()}, state)
    trainer = MixedPrecisionTrainer(linear(be), acc, p0(be), optimizer_state=state)
    cast = trainer.optimizer_state
    assert cast is not state and cast.accumulator.count == 1
    assert cast.num_skipped_micro_batches == 1 and cast.skip_state == state.skip_state
