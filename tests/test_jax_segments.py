"""Per-tensor sums over a flat chunk without a scatter (``engines/jax_segments.py``),
against NumPy's float64 sums of the same spans."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mithril.utils.optimizers.engines.jax_segments import MAX_BLOCK, SpanPlan


def _reference(x: np.ndarray, sizes: list[int]) -> np.ndarray:
    ends = np.cumsum(sizes)
    return np.array([x[e - s:e].astype(np.float64).sum() for s, e in zip(sizes, ends)])


def _close(got: np.ndarray, want: np.ndarray, sizes: list[int]) -> None:
    """float32 sums of a tree of blocks: within ~eps·sqrt(n) of the float64 sum (|x| ~ 1)."""
    tol = 4e-5 * np.sqrt(np.maximum(sizes, 1))
    bad = np.flatnonzero(np.abs(got - want) > tol)
    assert not bad.size, [(int(i), got[i], want[i]) for i in bad[:5]]


CASES = {
    "one": [5],
    "one-partial-block": [MAX_BLOCK * 3 + 7],
    "tiny": [1, 2, 3, 0, 4, 1],
    "empty-first-last": [0, 40, 0, 17, 0],
    "aligned": [MAX_BLOCK, 2 * MAX_BLOCK, MAX_BLOCK],
    "inside-one-block": [3, 5, 40_000, 2, 1],
    "mixed": [7, 50_000, 1, 1, 33_333, 16, 1024, 9_999, 3],
    "many-small": [500] * 400,
    "big-and-bias": [300_000, 10, 200_000, 10, 1],
}


@pytest.mark.parametrize("sizes", list(CASES.values()), ids=list(CASES))
def test_sums_equal_float64_reference(sizes):
    rng = np.random.default_rng(len(sizes))
    x = rng.standard_normal(sum(sizes)).astype(np.float32)
    plan = SpanPlan(sizes)
    got = np.asarray(jax.jit(plan)(jnp.asarray(x)), dtype=np.float64)
    _close(got, _reference(x, sizes), sizes)
    assert got.shape == (len(sizes),)
    assert np.all(got[np.asarray(sizes) == 0] == 0)


def test_random_layouts():
    rng = np.random.default_rng(7)
    for _ in range(60):
        n = int(rng.integers(1, 30))
        sizes = [int(s) for s in rng.choice([0, 1, 3, 15, 16, 17, 1023, 1024, 1025, 4096,
                                              70_001], n)]
        if not sum(sizes):
            sizes[0] = 1
        x = rng.standard_normal(sum(sizes)).astype(np.float32)
        got = np.asarray(jax.jit(SpanPlan(sizes))(jnp.asarray(x)), dtype=np.float64)
        _close(got, _reference(x, sizes), sizes)


def test_a_small_tensor_beside_a_large_one_keeps_its_digits():
    """Values are summed, never subtracted: a bias of tiny values between large weights
    keeps its own sum's precision (a prefix-sum difference would lose it)."""
    sizes = [100_003, 10, 100_000]
    x = np.full(sum(sizes), 1e4, dtype=np.float32)
    x[100_003:100_013] = np.arange(1, 11, dtype=np.float32) * 1e-6
    got = np.asarray(jax.jit(SpanPlan(sizes))(jnp.asarray(x)))
    assert got[1] == pytest.approx(55e-6, rel=1e-6)


def test_no_scatter_and_recursion():
    """The point of the module: no scatter in the program (XLA's scatter-add into few
    segments: ~25x a plain sum on CPU, a compare-and-swap loop per value on some GPUs)."""
    sizes = [50_000] * 40 + [3, 7]
    plan = SpanPlan(sizes)
    assert plan.next is not None  # the blocks' sums are summed per span again
    hlo = jax.jit(plan).lower(jnp.zeros(sum(sizes), jnp.float32)).as_text()
    assert "scatter" not in hlo


def test_bad_input():
    with pytest.raises(ValueError, match="span sizes"):
        SpanPlan([])
    with pytest.raises(ValueError, match="span sizes"):
        SpanPlan([3, -1])
    with pytest.raises(ValueError, match="expected 5 elements"):
        SpanPlan([2, 3])(jnp.zeros(4))
