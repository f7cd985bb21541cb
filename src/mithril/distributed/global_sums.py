"""Optimizer-wide values under ZeRO (``DataParallel(..., shard_state=True)``).

An optimizer with ``state_values`` (Prodigy's and DAdaptAdamW's ``d``, DoG's / DoWG's
estimates, MoMo's ``f̄``, ``γ``, ``lb``, PolyakSGD's loss) computes them in
``tensor_scalars`` from sums over *every* tensor (``sums[k].sum()``, ``(fac == fac[0])
.all()``, ``started.all()``). Each rank of the sharded step holds whole tensors, and its
first pass gives the per-tensor sums of those exactly as one process does. So each rank's
per-tensor inputs to ``tensor_scalars`` (the sums, each tensor's scalars, tensor slots,
sizes and step) are gathered into the table of all tensors in the one process's order (one
all-reduce of a float64 table holding zeros elsewhere: exact), ``tensor_scalars`` runs on
it (the same numbers on every rank: the same values), and each rank keeps its own rows of
the per-tensor results. No optimizer states this: whatever its ``tensor_scalars`` sums, the
sharded step sees the one process's sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import process_group as pg


def needs_global_sums(opt: Any) -> bool:
    """Whether ``opt``'s step keeps values computed over every parameter (then each rank's
    ``tensor_scalars`` must see all tensors' sums)."""
    return bool(opt.state_values)


def _column(x: Any, n: int) -> np.ndarray:
    """``x`` (a number, or one value per tensor) as ``n`` float64s."""
    return np.broadcast_to(np.asarray(x, dtype=np.float64), (n,))


def _own_rows(x: Any, a: int, b: int, total: int) -> Any:
    """This rank's rows of a per-tensor result (an array over every tensor), or ``x``
    itself where it is one number for all."""
    arr = np.asarray(x)
    return arr[a:b] if arr.ndim and arr.shape[0] == total else x


def _gathering(opt: Any, own: Any, a: int, b: int, total: int) -> Any:
    """``own`` (``opt``'s ``tensor_scalars``, bound) run on every tensor's inputs."""

    def tensor_scalars(step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN202
        cols = [*sums, *scalars, *tensors.values(), sizes, step]
        table = np.zeros((total, len(cols)), dtype=np.float64)
        for j, c in enumerate(cols):
            table[a:b, j] = _column(c, b - a)
        pg.all_reduce(table)  # (x + 0 is x: every rank then holds the one process's table)
        k, m = len(sums), len(scalars)
        full = [table[:, j] for j in range(len(cols))]
        steps = full[-1]
        # (one count for all, as a one-process step passes it where every tensor's is t)
        t = int(steps[0]) if total and (steps == steps[0]).all() else steps
        extra, new_tensors, new_values = own(
            t, tuple(full[:k]), tuple(full[k:k + m]),
            dict(zip(tensors, full[k + m:k + m + len(tensors)])), values,
            full[-2].astype(np.asarray(sizes).dtype))
        return (tuple(_own_rows(e, a, b, total) for e in extra),
                {s: _own_rows(v, a, b, total) for s, v in new_tensors.items()}, new_values)

    return tensor_scalars


@contextlib.contextmanager
def global_sums(opt: Any, bounds: tuple[int, int], total: int) -> Iterator[None]:
    """Within it, ``opt``'s ``tensor_scalars`` (this rank's tensors ``bounds`` of ``total``)
    sees every rank's tensors: a collective, so every rank runs a step inside it alike.
    Nothing where ``opt`` keeps no optimizer-wide values, or with one process."""
    if not needs_global_sums(opt) or pg.world_size() == 1:
        yield
        return
    d = opt.__dict__  # (not setattr: no hyperparameter changes, no program is invalidated)
    d["tensor_scalars"] = _gathering(opt, opt.tensor_scalars, *bounds, total)
    try:
        yield
    finally:
        d.pop("tensor_scalars", None)
