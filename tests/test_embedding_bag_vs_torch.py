"""``EmbeddingBag`` side by side with ``torch.nn.functional.embedding_bag``.

Float64, modes sum / mean / max: 2-D bags, 1-D input with offsets (empty bags, a bag at the
end), ``include_last_offset`` (a last offset below the input's length: the last bag still runs
to the end, as torch's forward and backward), ``padding_idx``
(left out of sums, means and maxima: a bag of padding only is zeros), repeated indices,
``per_sample_weights`` (differentiated, as torch does): the output and the gradients w.r.t.
the weight and the per-sample weights on NumPy and torch in process and on JAX in a fresh
x64 process within 1e-10 of torch autograd's. Bad indices, offsets and shapes are refused
naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import Case, parity_tests

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import InputValueError, ShapeError
from mithril.models.embedding_bag import EmbeddingBag


def _ref(**kw):
    def ref(t: dict, d: dict) -> dict:
        w = next(v for k, v in t.items() if k.endswith("weight") and k != "per_sample_weights")
        return {"output": F.embedding_bag(d["input"], w, d.get("offsets"),
                                          per_sample_weights=t.get("per_sample_weights"), **kw)}
    return ref


_BAGS = np.array([[1, 3, 3], [0, 2, 5], [5, 5, 5], [4, 1, 0]])  # 5: padding in some cases
_FLAT = np.array([2, 0, 6, 6, 1, 3, 4, 0, 5])
_OFF = np.array([0, 3, 3, 7])  # bag 1 empty, bag 3 two entries
_OFF_LAST = np.array([0, 2, 2, 9])  # include_last_offset: 3 bags, the last offset M
_OFF_SHORT = np.array([0, 2, 2, 6])  # a last offset below M: torch's last bag runs to the end

CASES: dict[str, Case] = {}
for mode in ("sum", "mean", "max"):
    for pad in (None, 5):
        kw = {"mode": mode, "padding_idx": pad}
        CASES[f"2-D {mode} pad={pad}"] = Case(
            lambda kw=kw: EmbeddingBag(7, 4, **kw), {}, _ref(**kw), data={"input": _BAGS})
        CASES[f"offsets {mode} pad={pad}"] = Case(
            lambda kw=kw: EmbeddingBag(7, 3, offsets=True, **kw), {}, _ref(**kw),
            data={"input": _FLAT, "offsets": _OFF})
    kw = {"mode": mode, "include_last_offset": True}
    CASES[f"include_last_offset {mode}"] = Case(
        lambda kw=kw: EmbeddingBag(7, 3, offsets=True, **kw), {}, _ref(**kw),
        data={"input": _FLAT, "offsets": _OFF_LAST})
    kw = {"mode": mode, "include_last_offset": True, "padding_idx": 0}
    CASES[f"include_last_offset short {mode}"] = Case(
        lambda kw=kw: EmbeddingBag(7, 3, offsets=True, **kw), {}, _ref(**kw),
        data={"input": _FLAT, "offsets": _OFF_SHORT})
CASES["2-D sum per_sample_weights pad=5"] = Case(
    lambda: EmbeddingBag(7, 4, mode="sum", padding_idx=5, per_sample_weights=True),
    {"per_sample_weights": (4, 3)}, _ref(mode="sum", padding_idx=5), data={"input": _BAGS})
CASES["offsets sum per_sample_weights last"] = Case(
    lambda: EmbeddingBag(7, 2, mode="sum", offsets=True, include_last_offset=True,
                         per_sample_weights=True),
    {"per_sample_weights": (9,)}, _ref(mode="sum", include_last_offset=True),
    data={"input": _FLAT, "offsets": _OFF_LAST})

JAX_NAMES = ["2-D mean pad=5", "offsets max pad=5", "include_last_offset sum",
             "2-D sum per_sample_weights pad=5"]
test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_embedding_bag_vs_torch", CASES, jax_default=JAX_NAMES)


def _compiled(block: EmbeddingBag, shapes: dict):
    model = ml.Model()
    model |= block(**{k: k for k in block.inputs}, output="output")
    return ml.compile(model, NumpyBackend(dtype="float64"), shapes=shapes)


def test_padding_bag_and_empty_bag_are_zero_and_padding_row_gets_no_gradient() -> None:
    c = _compiled(EmbeddingBag(7, 3, mode="max", padding_idx=5, offsets=True),
                  {"input": [9], "offsets": [4]})
    w = np.random.default_rng(0).standard_normal((7, 3))
    key = next(iter(c.get_parameters()))
    data = {"input": np.array([5, 5, 1, 2, 5, 0, 3, 3, 4]), "offsets": np.array([0, 2, 2, 5])}
    out, grads = c.evaluate({key: w}, data, output_gradients={"output": np.ones((4, 3))})[:2]
    assert (out["output"][[0, 1]] == 0).all() and (grads[key][5] == 0).all()
    assert np.array_equal(out["output"][2], np.maximum(w[1], w[2]))


@pytest.mark.parametrize(("data", "match"), [
    ({"input": np.array([1, 7, 2]), "offsets": np.array([0, 1])},
     r"input 'input' holds index 7: indices must be in \[0, 6\]"),
    ({"input": np.array([1, 2, 2]), "offsets": np.array([1, 2])}, r"offsets\[0\] must be 0"),
    ({"input": np.array([1, 2, 2]), "offsets": np.array([0, 2, 1])},
     r"offsets 'offsets' \[0, 2, 1\]: offsets must be non-decreasing"),
    ({"input": np.array([1, 2, 2]), "offsets": np.array([0, 4])},
     r"offsets must be at most the input's length 3"),
])
def test_bad_indices_and_offsets_are_named(data, match) -> None:
    c = _compiled(EmbeddingBag(7, 3, offsets=True),
                  {k: list(v.shape) for k, v in data.items()})
    with pytest.raises(InputValueError, match=match):
        c.evaluate({next(iter(c.get_parameters())): np.zeros((7, 3))}, data)


@pytest.mark.parametrize(("block", "shapes", "match"), [
    (EmbeddingBag(7, 3), {"input": [5]}, r"'input' must be \(B, S\), one bag per row"),
    (EmbeddingBag(7, 3, offsets=True), {"input": [5, 2]}, r"'input' must be 1-D \(M,\)"),
    (EmbeddingBag(7, 3, mode="sum", per_sample_weights=True),
     {"input": [2, 3], "per_sample_weights": [2, 4]},
     r"'per_sample_weights' \[2, 4\] must have 'input''s shape \[2, 3\]"),
])
def test_bad_shapes_are_named(block, shapes, match) -> None:
    with pytest.raises(ShapeError, match=match):
        _compiled(block, shapes)


@pytest.mark.parametrize(("kw", "match"), [
    ({"mode": "prod"}, "mode must be 'sum', 'mean' or 'max'"),
    ({"per_sample_weights": True}, "per_sample_weights needs mode='sum'"),
    ({"include_last_offset": True}, "include_last_offset=True needs offsets=True"),
    ({"padding_idx": 7}, r"padding_idx must be an int in \[-7, 6\]"),
])
def test_bad_arguments_are_named(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        EmbeddingBag(7, 3, **kw)


def test_torch_reference_is_live() -> None:
    """The max of a bag holding only padding is 0 in torch too (the case above is real)."""
    w = torch.tensor(np.random.default_rng(0).standard_normal((7, 3)))
    out = F.embedding_bag(torch.tensor(_BAGS), w, mode="max", padding_idx=5)
    assert (out[2] == 0).all() and (out[0] != 0).all()
