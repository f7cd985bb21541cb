"""DP-SGD under :class:`~.data_parallel.DataParallel` (replicated): each rank clips its own
examples' gradients, one all-reduce sums the clipped sums, and every rank adds the same
noise once and divides by the whole batch, so the step is the one a single process takes
with :class:`~mithril.utils.optimizers.DifferentiallyPrivate` on the whole batch::

    S_r = Σ_{i in rank r} c_i · g_i          (c_i = min(C / ‖g_i‖, 1): each example's own)
    ḡ   = (Σ_r S_r + C·σ · ξ_t) / Σ_r B_r    (ξ_t: a pure function of seed, name and t)

(``Σ_r B_r`` is ``expected_batch_size`` where the optimizer sets it: the whole step's
expected batch, over every rank.)

The noise is added once, not once per rank: its draws are a pure function of the seed, the
parameter's name and the step (:func:`~mithril.utils.optimizers.noisy_sgd.gaussian_noise`),
so every rank draws the same ``ξ_t`` without a collective. Opacus' ``DPDDP`` adds it on
one rank before the all-reduce, which is the same sum. The ranks' shares need no weights
(per-example gradients are each example's own), and may differ in size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..utils.optimizers.differentially_private import COUNT, clipped_sums, noised_mean
from ..utils.optimizers.tensorwise import ops_for
from . import process_group as pg
from .agreement import check_settings_votes, settings_votes
from .arrays import _host, _nbytes, _small
from .missed_steps import note_missed


def private_step(dp: Any, params: Mapping[str, Any], gradients: Mapping[str, Any],
                 state: Any, loss: Any = None) -> tuple[dict[str, Any], Any]:
    """One replicated step of ``dp`` (a :class:`DataParallel` around a
    :class:`DifferentiallyPrivate`) from this rank's per-example ``gradients``."""
    opt, names, buf = dp.optimizer, state.names, state._send
    # every rank checks first (its params and its per-example gradients): a refusal on any
    # rank is a refusal on every rank, before anything travels or changes
    refused: Exception | None = None
    batch = 0
    try:
        dp._check_step(params, {}, state)
        dp._local_loss(loss)  # (refused: DP-SGD takes no loss)
        # (a rank may hold no example of a step whose batch has some: an uneven last
        # batch, Poisson sampling; it was refused, and so the step on every rank)
        batch = opt.check_per_example(params, gradients, state.local, allow_empty=True)
    except (TypeError, ValueError, KeyError) as e:
        refused = e
    present = [0.0] * len(names) if refused is not None else [
        float(gradients.get(n) is not None) for n in names]
    hyper = settings_votes(opt)
    votes = _small([float(refused is not None), *present, float(batch), *hyper], buf)
    pg.all_reduce(votes)
    flags = _host(votes)
    if flags[0] > 0:
        pg.agree("DataParallel.update", refused)
    check_settings_votes("DataParallel.update", opt, flags[2 + len(names):], state.world)
    total = int(round(float(flags[1 + len(names)])))
    if total == 0 and opt.expected_batch_size is None:  # (every rank alike: nothing changed)
        raise opt.empty_batch_error(f"no example on any of the {state.world} ranks")
    xp = ops_for(opt._backend)
    sums = clipped_sums(xp, gradients, batch, opt.l2_norm_clip, opt.clip_epsilon)
    dp._pack({n: s.reshape(tuple(params[n].shape)) for n, s in sums.items()}, state)
    if len(buf):
        pg.all_reduce(buf)
    state.bytes_communicated = {"all_reduce": _nbytes(buf) + _nbytes(votes)}
    count = state.local.values[COUNT]
    std = opt.l2_norm_clip * opt.noise_multiplier
    reached = {n: state._grad_views[n].reshape(-1) for i, n in enumerate(names)
               if flags[1 + i] > 0}
    denom = opt.expected_batch_size or total  # (the whole step's, over every rank)
    mean = noised_mean(xp, reached, denom, std, opt.seed, int(count) + 1, bool(std))
    grads = {n: m.reshape(tuple(params[n].shape)) for n, m in mean.items()}
    new, state.local = opt.base_update(params, grads, state.local)
    state.local.values[COUNT] = count + 1
    state.last_grad_norm = state.local.last_grad_norm
    note_missed(opt, state.local, [n for n in names if n not in grads])
    return new, state
