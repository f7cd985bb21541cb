"""Blocks against torch.nn.functional at edges found by a review (hunt 64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml

BACKENDS = {
    "numpy": lambda: ml.NumpyBackend(dtype="float64"),
    "torch": lambda: ml.TorchBackend(dtype="float64"),
    "jax": lambda: ml.JaxBackend(dtype="float64"),
}


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("offsets, last", [([0], False), ([0, 0, 0], False), ([0, 0], True)])
def test_embedding_bag_max_of_no_entries_is_zeros(name, offsets, last):
    """mode="max" with an empty input (every bag empty) gives zero rows and a zero weight
    gradient, as torch's F.embedding_bag (was numpy's 'argmax of an empty sequence' on NumPy
    and JAX)."""
    w = np.arange(8.0).reshape(4, 2) - 3.0
    off = np.array(offsets)
    want = F.embedding_bag(torch.zeros(0, dtype=torch.long), torch.tensor(w, requires_grad=True),
                           torch.tensor(off), mode="max", include_last_offset=last)
    g = np.linspace(-1.0, 1.0, want.numel()).reshape(tuple(want.shape))
    backend = BACKENDS[name]()
    model = ml.Model()
    model |= ml.EmbeddingBag(4, 2, mode="max", include_last_offset=last, offsets=True)(
        input="idx", offsets="off", output=ml.IOKey("output"))
    compiled = ml.compile(model, backend, shapes={"idx": [0], "off": [len(offsets)]})
    (key,) = compiled.get_parameters()
    out, grads = compiled.evaluate(
        {key: backend.array(w)}, {"idx": np.zeros(0, dtype=np.int64), "off": off},
        output_gradients={"output": backend.array(g)})
    assert np.asarray(out["output"]).shape == tuple(want.shape)
    np.testing.assert_array_equal(np.asarray(out["output"]), want.detach().numpy())
    np.testing.assert_array_equal(np.asarray(grads[key]), np.zeros_like(w))


MARGIN_LOSSES = {
    "multi_margin": (lambda: ml.MultiMarginLoss(), np.zeros(0, dtype=np.int64)),
    "multilabel_margin": (lambda: ml.MultiLabelMarginLoss(), np.zeros((0, 3), dtype=np.int64)),
}


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("loss", sorted(MARGIN_LOSSES))
def test_margin_loss_mean_of_no_rows_is_nan(name, loss):
    """The "mean" of an empty batch is NaN on every backend, as F.nll_loss / F.l1_loss /
    F.multilabel_soft_margin_loss give (torch's multi_margin_loss and multilabel_margin_loss
    kernels leave that mean unset: the torch backend returned uninitialised memory)."""
    make, target = MARGIN_LOSSES[loss]
    backend = BACKENDS[name]()
    model = ml.Model()
    model |= make()(input="x", target="t", output=ml.IOKey("output"))
    compiled = ml.compile(model, backend, shapes={"x": [0, 3]}, trainable_keys={"x"})
    for _ in range(3):  # (uninitialised memory: any value, some calls)
        out, grads = compiled.evaluate({"x": backend.array(np.zeros((0, 3)))}, {"t": target},
                                       output_gradients={"output": 1.0})
        assert np.isnan(float(np.asarray(out["output"])))
        assert np.asarray(grads["x"]).shape == (0, 3)
    x = torch.zeros(0, 3, dtype=torch.float64)
    assert np.isnan(F.multilabel_soft_margin_loss(x, x).item())  # torch's mean of no rows
