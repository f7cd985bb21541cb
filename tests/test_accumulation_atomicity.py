"""Gradient accumulation refuses bad input before writing anything (issue #12).

``GradientAccumulator.add`` checks every gradient (kind, exact shape, exact dtype, torch
device) and the weight before it adds any of them; ``Accumulate.update`` empties its buffer
only after the wrapped optimizer has stepped, so a step that raises leaves the buffer as it
was before the call. The property tests drive random sequences of good and bad calls on the
three backends and compare every buffer bitwise before and after each call that raises.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mithril.errors import DTypeError, KeyMismatchError, ShapeError
from mithril.utils.accumulate_skip import skip_not_finite
from mithril.utils.accumulation import Accumulate, GradientAccumulator
from mithril.utils.optimizers import SGD, Adam

KINDS = ["numpy", "torch", "jax"]
SHAPES = {"a": (3, 4), "b": (4,), "c": (2, 1)}
ALLOWED = (ValueError, TypeError, KeyError)  # the project's errors subclass these


# -- helpers --------------------------------------------------------------------------------------
def arr(kind: str, a: Any) -> Any:
    """``a`` (NumPy) as an array of ``kind`` with the same dtype."""
    a = np.array(a)
    if kind == "torch":
        return torch.from_numpy(a)
    if kind == "jax":
        return jnp.asarray(a)
    return a


def host(x: Any) -> np.ndarray:
    """A NumPy copy of any array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def grads(kind: str, seed: int, dtype: Any = np.float32, scale: float = 1.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {k: arr(kind, (scale * rng.standard_normal(s)).astype(dtype)) for k, s in SHAPES.items()}


def bits(x: Any) -> tuple[str, tuple[int, ...], bytes]:
    h = host(x)
    return str(h.dtype), h.shape, h.tobytes()


def acc_snapshot(acc: GradientAccumulator) -> tuple:
    sums = None if acc._sum is None else {k: bits(v) for k, v in acc._sum.items()}
    return acc.count, acc.total_weight.hex(), sums


def big_id(v: Any) -> str | None:
    """A test id for huge ints (``str(10**5000)`` raises)."""
    return f"int_{v.bit_length()}_bits" if isinstance(v, int) and abs(v) > 2**64 else None


def other_kind(kind: str) -> str:
    return {"numpy": "torch", "torch": "jax", "jax": "numpy"}[kind]


# -- GradientAccumulator.add: unit tests ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_broadcastable_shape_is_a_shape_error_and_changes_nothing(kind):
    acc = GradientAccumulator()
    acc.add(grads(kind, 0))
    before = acc_snapshot(acc)
    bad = grads(kind, 1)
    bad["c"] = arr(kind, np.ones((1, 1), np.float32))  # would broadcast into (2, 1)
    with pytest.raises(ShapeError, match=r"gradients\['c'\].*\(1, 1\).*\(2, 1\)"):
        acc.add(bad)
    assert acc_snapshot(acc) == before  # "a" and "b" (added before "c" by the old code) too
    bad = grads(kind, 1)
    bad["a"] = arr(kind, np.ones((1, 1), np.float32))  # (1, 1) into (3, 4)
    with pytest.raises(ShapeError, match=r"gradients\['a'\]"):
        acc.add(bad)
    assert acc_snapshot(acc) == before and tuple(acc.sum()["a"].shape) == (3, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_later_key_raises_a_library_error_before_any_write(kind):
    acc = GradientAccumulator()
    acc.add(grads(kind, 0))
    before = acc_snapshot(acc)
    cases = [("x", TypeError, "is a str"), (None, TypeError, "NoneType"),
             (1.0, TypeError, "is a float"), ([[1.0]], TypeError, "is a list"),
             (arr(other_kind(kind), np.ones((2, 1), np.float32)), TypeError, "accumulated"),
             (arr(kind, np.ones((2, 1), np.float16)), DTypeError, "float16"),
             (arr(kind, np.ones((2, 1), np.int32)), DTypeError, "int32"),
             (arr(kind, np.ones((1, 2), np.float32)), ShapeError, r"\(1, 2\)")]
    for value, err, msg in cases:
        bad = {**grads(kind, 1), "c": value}
        with pytest.raises(err, match=msg) as info:
            acc.add(bad)
        assert "'c'" in str(info.value)
        assert acc_snapshot(acc) == before
    with pytest.raises(KeyMismatchError):
        acc.add({k: v for k, v in grads(kind, 1).items() if k != "b"})
    with pytest.raises(TypeError, match="dict"):
        acc.add(list(grads(kind, 1).values()))
    assert acc_snapshot(acc) == before
    # after all that, a good add gives the right mean
    g0, g1 = grads(kind, 0), grads(kind, 1)
    acc.add(g1, weight=3)
    for k, v in acc.mean().items():
        want = (host(g0[k]).astype(np.float64) + 3 * host(g1[k])) / 4
        np.testing.assert_allclose(host(v), want, rtol=1e-6, atol=1e-6)
    assert acc.count == 2 and acc.total_weight == 4.0


@pytest.mark.parametrize("kind", KINDS)
def test_first_add_checks_every_key(kind):
    acc = GradientAccumulator()
    good = grads(kind, 0)
    for value, err, msg in [("x", TypeError, r"gradients\['c'\] is a str"),
                            (np.float32(1.0), TypeError, r"gradients\['c'\] is a float32"),
                            (arr(kind, np.ones((2, 1), np.int64)), DTypeError, r"gradients\['c'\]"),
                            (arr(other_kind(kind), np.ones((2, 1), np.float32)), TypeError,
                             r"gradients\['c'\] is .* but gradients\['a'\]")]:
        with pytest.raises(err, match=msg):
            acc.add({**good, "c": value})
        assert acc_snapshot(acc) == (0, (0.0).hex(), None)
    acc.add({})  # no parameters: nothing to check, one (empty) micro-batch
    assert acc.count == 1 and acc.mean() == {}


@pytest.mark.parametrize("weight, err, msg", [
    (10**400, ValueError, "too large"), (10**5000, ValueError, "too large"),
    (True, TypeError, "number"), ("2", TypeError, "number"), (None, TypeError, "number"),
    ([1.0], TypeError, "number"), (0, ValueError, "positive"), (-1.0, ValueError, "positive"),
    (math.nan, ValueError, "positive"), (math.inf, ValueError, "positive"),
], ids=big_id)
def test_weight_errors(weight, err, msg):
    acc = GradientAccumulator()
    acc.add(grads("numpy", 0), weight=2.0)
    before = acc_snapshot(acc)
    with pytest.raises(err, match=msg) as info:
        acc.add(grads("numpy", 1), weight=weight)
    assert "weight" in str(info.value)
    assert acc_snapshot(acc) == before
    with pytest.raises(err, match=msg):
        GradientAccumulator().add(grads("numpy", 1), weight=weight)


def test_total_weight_that_would_overflow_is_refused():
    acc = GradientAccumulator()
    acc.add(grads("numpy", 0), weight=1e308)
    before = acc_snapshot(acc)
    with pytest.raises(ValueError, match="total weight"):
        acc.add(grads("numpy", 1), weight=1e308)
    assert acc_snapshot(acc) == before


def test_torch_device_mismatch_is_refused():
    acc = GradientAccumulator()
    acc.add(grads("torch", 0))
    before = acc_snapshot(acc)
    bad = {**grads("torch", 1), "b": torch.ones(4, device="meta")}
    with pytest.raises(ValueError, match=r"gradients\['b'\].*meta"):
        acc.add(bad)
    assert acc_snapshot(acc) == before
    with pytest.raises(TypeError, match="strided"):
        GradientAccumulator().add({"a": torch.ones(3, 4).to_sparse()})


def test_torch_gradients_requiring_grad_are_detached():
    w = torch.ones(3, requires_grad=True)
    acc = GradientAccumulator()
    acc.add({"w": w * 2}, weight=0.5)
    acc.add({"w": w * 4})
    s = acc.sum()["w"]
    assert not s.requires_grad and torch.equal(s, torch.full((3,), 5.0))


# -- Accumulate: k and a failing step -------------------------------------------------------------
@pytest.mark.parametrize("k, err, msg", [
    (10**400, ValueError, "too large"), (2**63, ValueError, "too large"), (0, ValueError, ">= 1"),
    (-2, ValueError, ">= 1"), (2.5, TypeError, "integer"), ("3", TypeError, "integer"),
    (True, TypeError, "integer"), (None, TypeError, "integer"), (4.0, TypeError, "integer"),
], ids=big_id)
def test_accumulate_k_errors(k, err, msg):
    with pytest.raises(err, match=msg) as info:
        Accumulate(SGD(), k)
    assert str(info.value).startswith("k ")
    acc = Accumulate(SGD(), np.int64(3))
    assert acc.k == 3
    with pytest.raises(err, match=msg):  # set later: the same check, nothing changed
        acc.k = k
    assert acc.k == 3


def test_accumulate_attributes_reach_the_wrapped_optimizer_or_are_refused():
    """``acc.learning_rate = x`` sets the wrapped optimizer's (as ``set_learning_rate``);
    one of its hyperparameters set on the wrapper would change no step: refused."""
    acc = Accumulate(Adam(learning_rate=0.1), 2)
    acc.learning_rate = 0.05
    assert acc.optimizer.learning_rate == 0.05
    for name in ("beta1", "weight_decay", "lr"):
        with pytest.raises(AttributeError, match=f"Accumulate has no attribute '{name}': "
                                                 f"setting it would change no step; it is "
                                                 f"the wrapped Adam's"):
            setattr(acc, name, 0.5)
        assert name not in vars(acc)
    acc.note = "mine"  # (a name of the user's own)


class Flaky:
    """An optimizer wrapper that refuses its step when ``fail`` is set."""

    def __init__(self, opt: Any) -> None:
        self.opt, self.fail = opt, False

    def init(self, params: Any) -> Any:
        return self.opt.init(params)

    def update(self, params: Any, gradients: Any, state: Any) -> Any:
        if self.fail:
            raise ValueError("refused on purpose")
        return self.opt.update(params, gradients, state)

    def get_learning_rate(self) -> float:
        return self.opt.get_learning_rate()

    def set_learning_rate(self, lr: float) -> None:
        self.opt.set_learning_rate(lr)


def params_of(kind: str) -> dict[str, Any]:
    return grads(kind, 100)


@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_step_keeps_every_micro_batch(kind):
    """k = 3: two micro-batches, then the wrapped step raises on the third; the buffer still
    holds exactly the first two, and a retry gives the uninterrupted result."""
    inner = Flaky(SGD(learning_rate=0.5, momentum=0.9, nonfinite="raise"))  # 1st step: p - lr·g
    wrapped = Accumulate(inner, 3)
    params = params_of(kind)
    p0 = {k: host(v).astype(np.float64) for k, v in params.items()}
    state = wrapped.init(params)
    g = [grads(kind, i) for i in range(3)]
    params, state = wrapped.update(params, g[0], state)
    params, state = wrapped.update(params, g[1], state, weight=2.0)
    before = acc_snapshot(state.accumulator)
    inner.fail = True
    with pytest.raises(ValueError, match="on purpose"):
        wrapped.update(params, g[2], state)
    assert acc_snapshot(state.accumulator) == before and state.micro_step == 2
    assert state.step == 0 and state.applied is False
    inner.fail = False
    # a non-finite third micro-batch: the optimizer raises FloatingPointError, nothing changes
    bad = {**g[2], "b": arr(kind, np.full(4, np.inf, np.float32))}
    with pytest.raises(FloatingPointError):
        wrapped.update(params, bad, state)
    assert acc_snapshot(state.accumulator) == before and state.step == 0
    for k, v in params.items():
        np.testing.assert_array_equal(host(v), p0[k])
    params, state = wrapped.update(params, g[2], state)
    assert state.applied is True and state.step == 1 and state.micro_step == 0
    for k, v in params.items():
        mean = (host(g[0][k]) + 2.0 * host(g[1][k]) + host(g[2][k])) / 4.0
        np.testing.assert_allclose(host(v), p0[k] - 0.5 * mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_accumulate_checks_gradients_against_params_on_every_micro_batch(kind):
    wrapped = Accumulate(SGD(learning_rate=0.1), 4)
    params = params_of(kind)
    state = wrapped.init(params)
    with pytest.raises(KeyMismatchError, match="'z'"):
        wrapped.update(params, {**grads(kind, 0), "z": arr(kind, np.ones(2, np.float32))}, state)
    bad = {**grads(kind, 0), "a": arr(kind, np.ones((1, 1), np.float32))}
    with pytest.raises(ShapeError, match=r"gradients\['a'\].*params\['a'\]"):
        wrapped.update(params, bad, state)
    assert state.micro_step == 0 and state.accumulator._sum is None


# -- property tests: random good and bad calls ----------------------------------------------------
BAD_GRADS = ["shape11", "shape_other", "dtype16", "int", "str", "none", "float", "list",
             "other_kind", "missing_key", "extra_key", "not_mapping"]
GOOD_WEIGHTS = [1, 1.0, 0.5, 3, 2.5]
BAD_WEIGHTS = [0, -1.0, math.nan, math.inf, 10**400, True, "2", None, [1.0]]


@st.composite
def add_calls(draw: st.DrawFn) -> tuple[str, str, Any, int]:
    variant = draw(st.sampled_from(["good"] * 14 + BAD_GRADS))
    key = draw(st.sampled_from(list(SHAPES)))
    weight = draw(st.sampled_from(GOOD_WEIGHTS * 6 + BAD_WEIGHTS))
    return variant, key, weight, draw(st.integers(0, 2**16))


def make_grads(kind: str, variant: str, key: str, seed: int) -> Any:
    g = grads(kind, seed)
    bad = {"shape11": lambda: arr(kind, np.ones((1, 1), np.float32)),
           "shape_other": lambda: arr(kind, np.ones(SHAPES[key] + (1,), np.float32)),
           "dtype16": lambda: arr(kind, np.ones(SHAPES[key], np.float16)),
           "int": lambda: arr(kind, np.ones(SHAPES[key], np.int32)),
           "str": lambda: "x", "none": lambda: None, "float": lambda: 1.5,
           "list": lambda: np.ones(SHAPES[key]).tolist(),
           "other_kind": lambda: arr(other_kind(kind), np.ones(SHAPES[key], np.float32))}
    if variant in bad:
        g[key] = bad[variant]()
    elif variant == "missing_key":
        del g[key]
    elif variant == "extra_key":
        g["zz"] = arr(kind, np.ones(2, np.float32))
    elif variant == "not_mapping":
        return list(g.values())
    return g


def weight_ok(w: Any) -> bool:
    return any(w is x for x in GOOD_WEIGHTS)


def check_accumulator_sequence(kind: str, calls: list) -> dict[str, int]:
    """Run ``calls`` on a GradientAccumulator; every call fails exactly when it is bad, a
    failing call changes nothing (bitwise) and raises a library error; the final mean is
    the float64 mean of the good calls."""
    acc = GradientAccumulator()
    good: list[tuple[dict[str, np.ndarray], float]] = []
    stats = {"calls": 0, "raised": 0}
    for variant, key, weight, seed in calls:
        empty = acc._sum is None
        if empty and variant in ("shape11", "shape_other", "dtype16", "missing_key", "extra_key"):
            variant = "good"  # valid on a first add (it sets the buffer's layout)
        g = make_grads(kind, variant, key, seed)
        expect_ok = variant == "good" and weight_ok(weight)
        before = acc_snapshot(acc)
        stats["calls"] += 1
        try:
            acc.add(g, weight=weight)
        except ALLOWED as e:
            stats["raised"] += 1
            assert not expect_ok, f"a good add raised {e!r}"
            assert acc_snapshot(acc) == before, f"{variant}/{weight!r} changed the accumulator"
            continue
        assert expect_ok, f"{variant}/{weight!r} was accepted"
        good.append(({k: host(v).astype(np.float64) for k, v in g.items()}, float(weight)))
    assert acc.count == len(good)
    assert acc.total_weight == sum(w for _, w in good)
    if good:
        total = sum(w for _, w in good)
        for k, v in acc.mean().items():
            want = sum(w * gg[k] for gg, w in good) / total
            np.testing.assert_allclose(host(v), want, rtol=1e-5, atol=1e-5)
    return stats


def wrap_snapshot(inner: Any, state: Any, params: dict) -> tuple:
    """What an Accumulate call may change, bitwise (its per-call flags aside)."""
    return (acc_snapshot(state.accumulator), {n: bits(v) for n, v in params.items()},
            repr(inner.opt.state_dict(state.inner)), state.step, state.windows)


def check_accumulate_sequence(kind: str, k: int, calls: list, skip: bool = False
                              ) -> dict[str, int]:
    """The same on ``Accumulate(SGD(momentum=0.9, nonfinite="raise"), k)``, with steps that
    the wrapped optimizer refuses (on purpose, or a non-finite mean); params and the
    optimizer state are compared too, and the final params against a float64 model. With
    ``skip``, ``should_skip_update_fn=skip_not_finite``: an inf micro-batch anywhere in a
    window is skipped, changing nothing but the skip count and skip_state."""
    lr, mu = 0.1, 0.9
    inner = Flaky(SGD(learning_rate=lr, momentum=mu, nonfinite="raise"))
    wrapped = Accumulate(inner, k, should_skip_update_fn=skip_not_finite if skip else None)
    params = params_of(kind)
    state = wrapped.init(params)
    ref = {n: host(v).astype(np.float64) for n, v in params.items()}
    buf: dict[str, np.ndarray] | None = None
    pending: list[tuple[dict[str, np.ndarray], float]] = []
    stats = {"calls": 0, "raised": 0, "skipped": 0}
    for (variant, key, weight, seed), fail in calls:
        empty = state.accumulator._sum is None
        if empty and variant in ("dtype16", "missing_key"):
            variant = "good"
        steps = state.micro_step + 1 == k
        nonfinite = fail == "nonfinite" and (steps or skip) and variant == "good"
        g = make_grads(kind, variant, key, seed)
        if nonfinite:
            g[key] = arr(kind, np.full(SHAPES[key], np.inf, np.float32))
        inner.fail = fail == "refuse"
        expect_ok = variant == "good" and weight_ok(weight) and not (
            steps and not skip and (inner.fail or nonfinite)) and not (
            steps and inner.fail and not nonfinite)
        before = wrap_snapshot(inner, state, params) + (
            state.applied, state.num_skipped_micro_batches, repr(state.skip_state))
        stats["calls"] += 1
        try:
            new_params, state = wrapped.update(params, g, state, weight=weight)
        except (*ALLOWED, FloatingPointError) as e:
            stats["raised"] += 1
            assert not expect_ok, f"a good update raised {e!r}"
            after = wrap_snapshot(inner, state, params) + (
                state.applied, state.num_skipped_micro_batches, repr(state.skip_state))
            assert after == before, f"{variant}/{weight!r}/{fail} changed something"
            continue
        assert expect_ok, f"{variant}/{weight!r}/{fail} was accepted"
        if skip and nonfinite:  # skipped: as if it never came
            stats["skipped"] += 1
            assert new_params is params and wrap_snapshot(inner, state, params) == before[:5]
            assert (state.applied, state.last_step_skipped) == (False, True)
            assert state.num_skipped_micro_batches == stats["skipped"]
            assert state.skip_state["num_not_finite"] == int(np.prod(SHAPES[key]))
            continue
        pending.append(({n: host(v).astype(np.float64) for n, v in g.items()}, float(weight)))
        assert state.applied is steps
        if steps:
            total = sum(w for _, w in pending)
            mean = {n: sum(w * gg[n] for gg, w in pending) / total for n in ref}
            buf = mean if buf is None else {n: mu * buf[n] + mean[n] for n in ref}
            ref = {n: ref[n] - lr * buf[n] for n in ref}
            pending = []
        else:
            assert new_params is params
        params = new_params
    for n, v in params.items():
        np.testing.assert_allclose(host(v), ref[n], rtol=1e-4, atol=1e-4)
    return stats


FAILS = st.sampled_from([None, None, None, "refuse", "nonfinite"])
ACC_SEQS = st.lists(add_calls(), min_size=1, max_size=10)
WRAP_SEQS = st.tuples(st.integers(1, 4), st.lists(st.tuples(add_calls(), FAILS), min_size=1,
                                                   max_size=10))


@pytest.mark.parametrize("kind", KINDS)
@settings(derandomize=True, max_examples=40, deadline=None)
@given(calls=ACC_SEQS)
def test_property_accumulator_add_is_all_or_nothing(kind, calls):
    check_accumulator_sequence(kind, calls)


@pytest.mark.parametrize("kind", KINDS)
@settings(derandomize=True, max_examples=25, deadline=None)
@given(seq=WRAP_SEQS)
def test_property_accumulate_update_is_all_or_nothing(kind, seq):
    check_accumulate_sequence(kind, *seq)


@pytest.mark.parametrize("kind", KINDS)
@settings(derandomize=True, max_examples=25, deadline=None)
@given(seq=WRAP_SEQS)
def test_property_accumulate_skipping_non_finite_micro_batches(kind, seq):
    check_accumulate_sequence(kind, *seq, skip=True)


# -- slow: the same with many more examples (pytest -m slow) --------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@settings(derandomize=True, max_examples=500, deadline=None)
@given(calls=ACC_SEQS)
def test_slow_property_accumulator_add(kind, calls):
    check_accumulator_sequence(kind, calls)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@settings(derandomize=True, max_examples=300, deadline=None)
@given(seq=WRAP_SEQS)
def test_slow_property_accumulate_update(kind, seq):
    check_accumulate_sequence(kind, *seq)
