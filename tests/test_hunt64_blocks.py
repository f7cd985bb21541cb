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
