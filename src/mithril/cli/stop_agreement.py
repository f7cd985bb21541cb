"""Where the processes of a data-parallel run stop when a signal comes: all after the same
step.

A signal reaches the ranks at different moments (a scheduler signals the process group, the
``--nprocs`` launcher forwards it, a cluster may signal one node first), and a rank that
stopped alone would leave the others waiting in the next step's all-reduce. So no rank acts
on its own signal: at fixed points of the loop (after each step, after each epoch's
measurement) every rank calls :func:`agree_stop` with the signal it has received (or None),
and one sum over the ranks (a vector of one count per held signal, through
``torch.distributed``'s all-reduce, or JAX's for ``--backend jax --nprocs``) tells all of
them the same answer: stop if any rank was signalled. The answer names one signal for all
(SIGTERM before SIGINT: the preemption wins), so that every rank exits with the same status
``128 + signal``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import numpy as np

#: the signals a run holds back to the end of a step, one slot each in the vote
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: which one names the stop when ranks got different ones (the later, the stronger)
PRECEDENCE = (signal.SIGTERM, signal.SIGINT)


def vote(signum: int | None) -> np.ndarray:
    """This rank's vote: 1 in the slot of the signal it received (float64 zeros: none)."""
    v = np.zeros(len(SIGNALS))
    if signum is not None:
        if signum not in SIGNALS:
            raise ValueError(f"a stop is voted for with one of "
                             f"{', '.join(s.name for s in SIGNALS)}, got signal {signum}")
        v[SIGNALS.index(signum)] = 1.0
    return v


def decision(total: np.ndarray) -> int | None:
    """The stop the summed votes ask for: the signal (SIGTERM first) any rank received, or
    None (every rank goes on)."""
    for sig in PRECEDENCE:
        if total[SIGNALS.index(sig)] > 0:
            return int(sig)
    return None


def agree_stop(signum: int | None, all_reduce: Callable[[np.ndarray], None]) -> int | None:
    """The ranks' common decision (:func:`decision`) from each one's ``signum``;
    ``all_reduce`` sums a float64 vector over the ranks in place (every rank must call this
    at the same point of its loop)."""
    v = vote(signum)
    all_reduce(v)
    return decision(v)


def torch_all_reduce(x: np.ndarray) -> None:
    """The sum over the ranks of the ``torch.distributed`` process group (gloo), in place."""
    from ..distributed import process_group as pg

    pg.all_reduce(x)


def jax_all_reduce(x: np.ndarray) -> None:
    """The sum over the processes of ``jax.distributed``, in place (``--backend jax
    --nprocs``: there is no torch process group)."""
    from jax.experimental import multihost_utils

    x[:] = np.sum(np.asarray(multihost_utils.process_allgather(x)), axis=0)


class StepAgreement:
    """The ``agree`` of a data-parallel loop's :class:`~.runtime.HeldInterrupt` whose step
    already sums something over the ranks (the torch ranks' batch loss and metric): the step
    appends this rank's :func:`vote` to that all-reduce (:meth:`ballot`) and hands back the
    sum (:meth:`counted`), so that the settle after the step costs no collective of its own
    (one all-reduce of a few floats is ~0.1-0.4 ms on loopback gloo, several % of a small
    step). A settle with no vote counted since the last one (after an epoch's measurement)
    runs its own all-reduce. Every rank's step and settles come in the same order, so every
    rank uses the same sums."""

    def __init__(self, all_reduce: Callable[[np.ndarray], None]) -> None:
        self.all_reduce = all_reduce
        self._pending: np.ndarray | None = None
        #: what this rank votes in the next step (``HeldInterrupt.ballot``), set by the loop
        self.current: Callable[[], int | None] = lambda: None

    def ballot(self) -> np.ndarray:
        """This rank's vote, for the step's all-reduce."""
        return vote(self.current())

    def counted(self, total: np.ndarray) -> None:
        """The votes summed by the step's all-reduce (the next settle's decision)."""
        self._pending = np.array(total, dtype=np.float64)

    def __call__(self, signum: int | None) -> int | None:
        if self._pending is not None:
            total, self._pending = self._pending, None
            return decision(total)
        return agree_stop(signum, self.all_reduce)
