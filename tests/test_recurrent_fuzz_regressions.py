"""Minimal cases found by :mod:`test_recurrent_fuzz`: bad input to the recurrent blocks named
as the block the user made, in the shapes the user gave.

Unbatched inputs ((T, I) for a sequence, (I,) for a cell) are taken, as torch's (see
test_recurrent_unbatched_vs_torch); a batch axis of 1 gives the same numbers. Before the fix,
a cell's bad input was named as ``GRU: 'input' must be (T, N, I) here, got shape [1, 2]``
(the wrong block and its internal shape), and a ``batch_first`` sequence's as ``axes [1, 0,
2] are not a permutation of 2 axes``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.errors import InputValueError, ShapeError


@pytest.mark.parametrize("block, shapes, match", [
    (lambda: ml.LSTM(3), {"input": [4, 2, 2, 2]},
     r"LSTM: 'input' must be \(T, N, I\) or unbatched \(T, I\), got shape \[4, 2, 2, 2\]"),
    (lambda: ml.GRU(3, batch_first=True), {"input": [4]},
     r"GRU: 'input' must be \(N, T, I\) with batch_first, or unbatched .* got shape \[4\]"),
    (lambda: ml.GRUCell(3), {"input": [2], "prev_hidden": [2, 3]},
     r"GRUCell: 'prev_hidden' must be \(3,\) for the unbatched 'input' \[2\]"),
    (lambda: ml.RNNCell(3), {"input": [5, 2, 2]}, r"RNNCell: 'input' must be \(N, I\).* \[5, 2, 2\]"),
    (lambda: ml.LSTMCell(3), {"input": [2, 2], "prev_hidden": [2, 4], "prev_cell": [2, 3]},
     r"LSTMCell: 'prev_hidden' must be \(N, 3\) with N the batch of 'input' \[2, 2\], got "
     r"shape \[2, 4\]"),
    (lambda: ml.LSTM(3, num_layers=2, initial_states=True),
     {"input": [4, 2, 2], "initial_hidden": [1, 2, 3], "initial_cell": [2, 2, 3]},
     r"LSTM: 'initial_hidden' must be \(N, 3\) per layer and direction, \(2, N, 3\)"),
])
def test_unbatched_and_bad_shapes_are_named_as_the_users_block(block, shapes, match) -> None:
    with pytest.raises(ShapeError, match=match):
        ml.compile(block(), ml.NumpyBackend(dtype="float64"), shapes=shapes)


def test_a_batch_of_one_is_torchs_unbatched_call() -> None:
    """(T, 1, I) gives torch's unbatched (T, I) numbers."""
    torch.manual_seed(0)
    ref = torch.nn.GRU(2, 3, num_layers=2, bidirectional=True).double()
    x = np.random.default_rng(0).standard_normal((4, 2))
    block = ml.GRU(3, num_layers=2, bidirectional=True)
    backend = ml.NumpyBackend(dtype="float64")
    compiled = ml.compile(block, backend, shapes={"input": [4, 1, 2]})
    got = compiled.evaluate(block.params_from_torch(ref.state_dict()), {"input": x[:, None]})
    with torch.no_grad():
        o, h = ref(torch.tensor(x))
    assert np.abs(got["output"][:, 0] - o.numpy()).max() <= 1e-12
    assert np.abs(got["hidden"][:, 0] - h.numpy()).max() <= 1e-12


def test_lengths_out_of_range_are_named_and_change_nothing() -> None:
    """Refused calls between two good ones: the second good one is a fresh model's second call
    (the dropout step did not move)."""
    def compiled():
        return ml.compile(ml.GRU(3, lengths=True, num_layers=2, dropout=0.5),
                          ml.NumpyBackend(dtype="float64", seed=0),
                          shapes={"input": [4, 2, 2], "lengths": [2]})
    a, b = compiled(), compiled()
    params = a.get_parameters()
    good = {"input": np.ones((4, 2, 2)), "lengths": np.array([4, 2])}
    a.evaluate(params, good, training=True)
    for bad, shown in (([0, 2], 0), ([5, 1], 5)):
        with pytest.raises(InputValueError, match=rf"input 'lengths': sequence length {shown} out "
                                                  r"of range: every length must be in \[1, 4\]"):
            a.evaluate(params, {**good, "lengths": np.array(bad)}, training=True)
    b.evaluate(params, good, training=True)
    got, want = a.evaluate(params, good, training=True), b.evaluate(params, good, training=True)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
