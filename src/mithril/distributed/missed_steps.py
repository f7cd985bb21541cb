"""Per-parameter step counts in data-parallel training, as DDP + ``torch.optim`` give them.

What torch does (2 gloo ranks, ``DistributedDataParallel(find_unused_parameters=True)``,
``zero_grad(set_to_none=True)``): a parameter the loss reaches on *some* rank gets a
``.grad`` on *every* rank (the mean over ranks, zeros from the others), so ``torch.optim``
steps it everywhere; a parameter reached on *no* rank keeps ``.grad`` None on every rank,
so ``torch.optim.Adam`` skips it and its own ``state[p]['step']`` does not advance (its
bias corrections later count only its own steps). With ``set_to_none=False`` the ``.grad``
stays the zeros ``zero_grad`` wrote: a step with a zero gradient (moments decay, ``step``
advances). ``static_graph=True`` refuses a parameter whose use changes between steps.

:class:`~.data_parallel.DataParallel` mirrors it: ``gradients[name]`` absent (or None) on
this rank means its loss did not reach ``name``. Present on some rank: the mean with zeros
from the others, stepped on every rank (a zero array passed on purpose is a gradient, as
``set_to_none=False``'s). Absent on every rank: the parameter and its slots are left as
they were and its step count does not advance (:meth:`OptimizerState.note_missed
<mithril.utils.optimizers.OptimizerState.note_missed>`). The ranks learn it from the
presence flags that already travel with each step (replicated: the refusal all-reduce;
sharded: the reduce-scatter, each rank its own tensors'), so counting costs no collective.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def note_missed(opt: Any, local: Any, absent: Iterable[str]) -> None:
    """Count a missed step in ``local`` (this rank's state of the wrapped optimizer ``opt``)
    for the parameters ``absent`` (no gradient on any rank at the step just taken), unless
    that step was skipped (nothing was counted), or ``opt`` is a Lookahead with
    ``reset_state`` (its inner count restarts at each sync, one for all: what
    ``torch_optimizer`` does too)."""
    absent = list(absent)
    if absent and not local.last_step_skipped and not getattr(opt, "reset_state", False):
        local.note_missed(absent)
