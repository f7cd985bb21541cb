"""Several torch entries as one Mithril parameter: ``concat={Mithril name: [torch names]}``.

Hugging Face's BERT, LLaMA, … keep an attention's query, key and value projections as three
``Linear`` layers (``query.weight``, ``key.weight``, ``value.weight``); Mithril's
``MultiHeadAttention`` packs them as torch's ``in_proj_weight`` (3E, E), the q, k, v rows in
that order (``in_proj_bias`` likewise). ``concat`` names the torch entries whose rows (axis 0)
are stacked, in order, into one Mithril entry; the export splits it back by the same rows."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from .torch_weights_files import Entry

Concat = Mapping[str, Sequence[str]] | None


def merged(entries: dict[str, Entry], concat: Concat, what: str,
           ) -> tuple[dict[str, Entry], dict[str, str], dict[str, list[tuple[str, int]]]]:
    """``entries`` with each group of ``concat`` replaced by one entry named ``"a+b+c"`` (where
    its first name was), the pairs ``{that name: Mithril name}``, and each merged entry's parts
    ``[(torch name, rows)]``. Checked first: names known and used once, the same dtype and the
    same shape past axis 0."""
    if not concat:
        return entries, {}, {}
    if not isinstance(concat, Mapping) or not all(
            isinstance(m, str) and isinstance(ts, Sequence) and not isinstance(ts, str)
            and len(ts) >= 2 and all(isinstance(t, str) for t in ts) for m, ts in concat.items()):
        raise TypeError(f"{what}: concat must map each Mithril name to a list of two or more "
                        f"torch names, got {concat!r}")
    seen: dict[str, str] = {}
    for m, ts in concat.items():
        for t in ts:
            if t not in entries:
                near = difflib.get_close_matches(t, list(entries), 3)
                raise KeyMismatchError(f"{what}: concat['{m}'] names torch '{t}', which the "
                                       f"state_dict lacks (closest: {near})")
            if t in seen:
                raise KeyMismatchError(f"{what}: concat puts torch '{t}' into both '{seen[t]}' "
                                       f"and '{m}'")
            seen[t] = m
        parts = [entries[t] for t in ts]
        if len({e.dtype for e in parts}) > 1 or len({e.shape[1:] for e in parts}) > 1 or \
                not all(e.shape for e in parts):
            listed = ", ".join(f"'{t}' {e.shape} {e.dtype}" for t, e in zip(ts, parts))
            error = DTypeError if len({e.dtype for e in parts}) > 1 else ShapeError
            raise error(f"{what}: concat['{m}'] stacks rows of tensors of one dtype and one "
                        f"shape past axis 0, got {listed}")
    out: dict[str, Entry] = {}
    fixed: dict[str, str] = {}
    rows: dict[str, list[tuple[str, int]]] = {}
    firsts = {ts[0]: m for m, ts in concat.items()}
    for k, e in entries.items():
        if k in firsts:
            m = firsts[k]
            parts = [entries[t] for t in concat[m]]
            name = "+".join(concat[m])
            out[name] = _stack(parts)
            fixed[name], rows[name] = m, [(t, entries[t].shape[0]) for t in concat[m]]
        elif k not in seen:
            out[k] = e
    return out, fixed, rows


def _stack(parts: list[Entry]) -> Entry:
    values = [e.value for e in parts]
    if all(hasattr(v, "detach") for v in values):
        import torch

        value: Any = torch.cat([v.detach() for v in values])
    else:
        value = np.concatenate([np.asarray(v) for v in values])
    shape = (sum(e.shape[0] for e in parts), *parts[0].shape[1:])
    return Entry(shape, parts[0].dtype, value)


def split(name: str, value: np.ndarray, rows: Mapping[str, list[tuple[str, int]]],
          ) -> dict[str, np.ndarray]:
    """``{torch name: its rows of value}`` for a merged ``name``; ``{name: value}`` else."""
    if name not in rows:
        return {name: value}
    ends = np.cumsum([n for _, n in rows[name]])[:-1]
    return {t: part for (t, _), part in zip(rows[name], np.split(value, ends))}
