"""The published Mithril's ``pack_data_into_time_slots`` (its ``mithril.utils.utils``): samples
of sequences of several lengths as the per-step inputs of ``ManyToOne`` / ``OneToMany`` /
``EncoderDecoder`` (``input0``, ``input1``, ...: at step t the rows of the sequences still
running, longest first)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np


def pack_data_into_time_slots(data: Sequence[Sequence[Any]], backend: Any, lengths: Any = None,
                              key: tuple[str, ...] = ("input",), index: int = 0,
                              return_indices: bool = False,
                              sorted_data: bool = False) -> tuple[Any, ...]:
    """``data``: samples, each a tuple whose element ``index`` is one sequence (T_i, F). The
    samples sorted by that sequence's length, longest first (kept as given when
    ``sorted_data``; equal lengths keep their order, as Python's stable sort), each padded
    with zeros to the longest and stacked; step t is ``{key[0]}{t}``: the rows of the
    sequences longer than t, shape (N_t, 1, F), as backend arrays of the data's dtype.
    Returns ``(time_slots, sorted samples)``, with ``return_indices`` ``(indices,
    time_slots, sorted samples)`` where ``indices[i]`` is the position in ``data`` of the i-th
    sorted sample (``EncoderDecoder``'s ``indices`` for data sorted by input first).
    ``lengths``: the steps of each sequence to use, ints in [1, T_i] (default: all)."""
    if not data:
        raise ValueError("pack_data_into_time_slots: data has no samples")
    seqs = [np.asarray(backend.to_numpy(d[index]) if not isinstance(d[index], np.ndarray)
                       else d[index]) for d in data]
    for i, s in enumerate(seqs):
        if s.ndim < 1 or s.shape[0] < 1:
            raise ValueError(f"pack_data_into_time_slots: data[{i}][{index}] has shape "
                             f"{list(s.shape)}: a sequence needs a first (time) axis of length >= 1")
        if s.shape[1:] != seqs[0].shape[1:] or s.dtype != seqs[0].dtype:
            raise ValueError(f"pack_data_into_time_slots: data[{i}][{index}] is {s.dtype} "
                             f"{list(s.shape)}, data[0][{index}] {seqs[0].dtype} "
                             f"{list(seqs[0].shape)}: the feature shapes and dtypes must agree")
    given = list(lengths) if lengths is not None else [s.shape[0] for s in seqs]
    if len(given) != len(seqs):
        raise ValueError(f"pack_data_into_time_slots: {len(given)} lengths for {len(seqs)} samples")
    n = []
    for i, (m, s) in enumerate(zip(given, seqs)):  # as torch's pack_padded_sequence: [1, T_i]
        try:
            v = None if isinstance(m, (bool, np.bool_)) else operator.index(m)
        except TypeError:
            v = None
        if v is None or not 1 <= v <= s.shape[0]:
            raise ValueError(f"pack_data_into_time_slots: lengths[{i}] = {m!r} must be an int in "
                             f"[1, {s.shape[0]}] (the steps of data[{i}][{index}], shape "
                             f"{list(s.shape)})")
        n.append(v)
    order = list(range(len(seqs))) if sorted_data else \
        sorted(range(len(seqs)), key=lambda i: n[i], reverse=True)
    lens = [n[i] for i in order]
    if any(a < b for a, b in zip(lens, lens[1:], strict=False)):
        raise ValueError("pack_data_into_time_slots: sorted_data=True, but the lengths are not "
                         f"sorted longest first: {lens}")
    longest = lens[0]
    stacked = np.zeros((len(order), longest, *seqs[0].shape[1:]), dtype=seqs[0].dtype)
    for row, i in enumerate(order):
        stacked[row, :n[i]] = seqs[i][:n[i]]
    slots = {f"{key[0]}{t}": backend.array(stacked[:sum(m > t for m in lens), t][:, None])
             for t in range(longest)}
    ordered = [data[i] for i in order]
    return (order, slots, ordered) if return_indices else (slots, ordered)
