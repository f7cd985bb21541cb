"""Hunt 65, the recurrent area: regressions found side by side with ``torch.nn`` and
``torch.nn.utils.rnn``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import mithril as ml
from mithril.models import pack_data_into_time_slots


def test_time_slots_of_given_lengths_are_torchs_packed_steps_and_bad_lengths_are_named():
    """``lengths`` cut each sequence to its first steps: step t holds the rows torch's
    ``pack_padded_sequence(enforce_sorted=False)`` packs at t (batch_sizes[t] of them, longest
    first). A length outside [1, T_i] or not an int is a ValueError naming it (it was numpy's
    broadcast error for a length past the data, and a silent cut or nothing for 3.7, -1, 0)."""
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((t, 2)) for t in (3, 5, 4)]
    lengths = [2, 5, 3]
    b = ml.NumpyBackend(dtype="float64")
    slots, _ = pack_data_into_time_slots([(s,) for s in seqs], b, lengths=lengths)
    padded = torch.zeros(3, 5, 2, dtype=torch.float64)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = torch.tensor(s)
    packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True,
                                  enforce_sorted=False)
    assert sorted(slots) == [f"input{t}" for t in range(len(packed.batch_sizes))]
    start = 0
    for t, n in enumerate(packed.batch_sizes.tolist()):
        np.testing.assert_array_equal(slots[f"input{t}"][:, 0], packed.data[start:start + n].numpy())
        start += n
    for bad, at in (([6, 5, 3], r"lengths\[0\] = 6 must be an int in \[1, 3\]"),
                    ([2, 5, -1], r"lengths\[2\] = -1 must be an int in \[1, 4\]"),
                    ([2, 0, 3], r"lengths\[1\] = 0 must be an int in \[1, 5\]"),
                    ([2.5, 5, 3], r"lengths\[0\] = 2.5 must be an int"),
                    ([True, 5, 3], r"lengths\[0\] = True must be an int")):
        with pytest.raises(ValueError, match=at):
            pack_data_into_time_slots([(s,) for s in seqs], b, lengths=bad)
