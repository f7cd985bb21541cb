"""The ZeRO step of :class:`~mithril.distributed.DataParallel` (``shard_state=True``):
reduce-scatter, the global norm, the wrapped optimizer's fused update of this rank's
tensors, all-gather.

Non-finite policies: a non-finite *gradient* shows in the global norm, which every rank
knows, so ``"skip"`` skips and ``"raise"`` raises on every rank alike before anything
changes, as in one process. A step whose gradients are finite but whose *results* are
non-finite is judged by each rank on its own tensors; with ``"skip"`` / ``"raise"`` the
ranks then compare (one more all-reduce of two numbers): if only some refused, the others
have applied their slice and the sharded state no longer equals one process's, which is
reported as a ``RuntimeError`` on every rank.

``max_consecutive_skips=N`` (optax ``apply_if_finite``): every rank keeps the count of
non-finite steps in a row (``state.consecutive_skips``), set alike from what all ranks
know (the global norm; the votes above, with one more number on a step taken after ``N``
in a row: whether any rank's results were non-finite), so that all give up, warn and
count on at the same step, as one process does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from ..utils.optimizers.engines.common import norm_scale
from . import process_group as pg
from .agreement import check_settings_votes, settings_votes
from .data_parallel import (
    DistributedState,
    _divide,
    _dtype_name,
    _empty,
    _holder,
    _host,
    _multiply,
    _nbytes,
    _no_clip_norm,
    _small,
    _sumsq,
)
from .global_sums import global_sums
from .missed_steps import note_missed


def sharded_step(dp: Any, params: Mapping[str, Any], gradients: Mapping[str, Any],
                 state: DistributedState, loss: Any = None
                 ) -> tuple[dict[str, Any], DistributedState]:
    """One sharded step (see the module docstring); ``loss``: this rank's, for a
    loss-aware optimizer (the step takes the mean over ranks, in the norm's all-reduce)."""
    opt, ch, me, world = dp.optimizer, state.chunks, state.rank, state.world
    a, b = ch.bounds[me]
    # every rank checks every input before any rank changes anything; a refusal travels in
    # the norm's all-reduce, so that all ranks raise before any applies its slice
    refused: Exception | None = None
    my_loss = None
    try:
        dp._check_step(params, gradients, state)
        my_loss = dp._local_loss(loss)
    except (TypeError, ValueError, KeyError, NotImplementedError) as e:
        if world == 1:
            raise
        refused = e
    if refused is None:
        dp._pack(gradients, state, ch.flag)
    recv, data, send = state._recv, ch.data[me], state._send
    half = world > 1 and _dtype_name(recv) == "float16"
    # the caller's gradient_views stay as written (as in float32 on several ranks): in
    # float16 the send buffer is divided in place, and alone it is the buffer the clip
    # scales; so where they were passed, a scratch copy takes that (before, the views were
    # left divided by N, or clipped)
    if refused is None and (half or world == 1 and opt.clip_norm is not None) and any(
            gradients.get(n) is v for n, v in state._grad_views.items()):
        if state._scratch is None:
            state._scratch = _empty(ch.total, send)
        state._scratch[...] = send
        send = state._scratch
        if world == 1:
            recv = send
    # the settings' digests travel with the first refusal votes: a setting differing
    # between ranks (the non-finite policy) would make them run different collectives
    hyper = settings_votes(opt) if world > 1 else []
    n_hyper = len(hyper)
    if half:
        # the send buffer is divided in place below, and it may hold the caller's gradient
        # views (accumulated micro-batches): a refusal must be known to all before that,
        # or a refused step leaves them divided by N and the retry applies mean/N
        vote = _small([float(refused is not None), *hyper], recv)
        pg.all_reduce(vote)
        if float(_host(vote)[0]) > 0:
            pg.agree("DataParallel.update", refused)
        check_settings_votes("DataParallel.update", opt, _host(vote)[1:], world)
        hyper = []
        # divided first, as DDP: the sum over ranks overflows where the mean does not
        _divide(send, world)
    if world > 1:
        pg.reduce_scatter(recv, send)
    mine = recv[:data]
    if world > 1 and not half:
        _divide(mine, world)
    local_sq, own, grads = 0.0, state.names[a:b], {}
    if refused is None:  # (views of recv: the clip below scales them in place)
        grads = _own_grads(state, recv)
        local_sq = _measured_sq(dp, state, params, grads) if _reshapes(opt) else _sumsq(mine)
    total = _small([local_sq, float(refused is not None), my_loss or 0.0, *hyper], mine)
    pg.all_reduce(total)
    if float(_host(total)[1]) > 0:
        pg.agree("DataParallel.update", refused)
    if hyper:
        check_settings_votes("DataParallel.update", opt, _host(total)[3:], world)
    step_loss = {} if my_loss is None else {"loss": float(_host(total)[2]) / world}
    norm = math.sqrt(float(_host(total)[0]))
    state.last_grad_norm = norm
    sent = ({"reduce_scatter": _nbytes(state._send),
             "all_reduce": 8 * (3 + n_hyper + half)}
            if world > 1 else {})
    local = state.local
    name = type(opt).__name__
    # max_consecutive_skips: the run of non-finite steps is one for all ranks (each keeps
    # it, set alike below), so every rank gives up at the same step
    limit = opt.max_consecutive_skips if opt.nonfinite == "skip" else None
    run = local.consecutive_skips
    forced = limit is not None and run >= limit
    if not math.isfinite(norm) and opt.nonfinite in ("skip", "raise") and not forced:
        local.last_grad_norm, local.last_step_skipped = norm, True
        state.bytes_communicated = sent
        if opt.nonfinite == "raise":
            raise FloatingPointError(f"{name}: non-finite gradient (global norm {norm}); "
                                     f"nothing changed (nonfinite='raise')")
        local.num_skipped += 1
        local.consecutive_skips += 1
        warnings.warn(f"{name}: non-finite gradient (global norm {norm}); step skipped, "
                      f"params and optimizer state unchanged", RuntimeWarning, stacklevel=3)
        return (dict(state._out) if state._out else dict(params)), state
    if opt.clip_norm is not None:  # (the engines' rule, an applied non-finite norm's too:
        # inf scales every gradient by 0, as torch's clip_grad_norm_; NaN by min(1, NaN) = 1)
        scale = norm_scale(opt.clip_norm, norm, opt.clip_eps)
        if scale < 1.0:
            _multiply(mine, scale)
    dp._sync_groups(state)
    before = local.num_skipped
    # ("propagate": whether the last step left non-finite values anywhere, alike on every
    # rank, and the count before this step; see _agree_nonfinite_results)
    was_bad, counted = local.nonfinite_values, local.num_nonfinite
    error: BaseException | None = None
    new: dict[str, Any] = {}
    # (optimizer-wide values: each rank's tensor_scalars sees every rank's sums)
    with _no_clip_norm(opt), global_sums(opt, (a, b), len(state.names)), \
            warnings.catch_warnings():
        # (a forced step's warning is given below, by every rank alike: not by the wrapped
        # optimizer, which judges this rank's tensors only)
        warnings.filterwarnings("ignore", message=".* non-finite steps in a row")
        try:
            if own:
                new, local = opt.update({n: params[n] for n in own}, grads, local,
                                        **step_loss)
            else:  # more ranks than tensors: this one holds none, and only counts the step
                local.step += 1
                local.last_step_skipped = False
        except FloatingPointError as e:
            error = e
    state.local = local
    local.last_grad_norm = norm
    if (not math.isfinite(norm) and math.isfinite(local_sq)  # "propagate", culprit elsewhere
            and opt.nonfinite != "unchecked"):
        local.num_nonfinite += 1
        warnings.warn(f"{name}: non-finite gradient (global norm {norm}) applied; params may "
                      f"now be non-finite", RuntimeWarning, stacklevel=3)
    skipped = local.num_skipped > before
    # a forced step (applied as under "propagate") is bad where its gradients or results
    # are non-finite: the wrapped optimizer's _give_up then counted the run on, here
    bad = forced and (not math.isfinite(norm) or local.consecutive_skips > run)
    if opt.nonfinite in ("skip", "raise") and world > 1:
        # (a rank holding no tensor has no results to judge: it abstains, then follows)
        votes = _small([float(skipped), float(error is not None), float(bool(own)),
                        *([float(bad)] if forced else [])], mine)
        pg.all_reduce(votes)
        n_skip, n_raise, n_hold, *n_bad = (int(v) for v in _host(votes))
        sent["all_reduce"] += 8 * len(votes)
        bad = bool(n_bad) and n_bad[0] > 0
        if n_skip + n_raise and n_skip + n_raise < n_hold:
            state.bytes_communicated = sent
            raise RuntimeError(f"{name}: {n_skip + n_raise} of the {n_hold} ranks holding "
                               f"tensors refused the step (non-finite results on their "
                               f"tensors, nonfinite='{opt.nonfinite}') while the others "
                               f"applied theirs: the sharded state no longer equals one "
                               f"process's; restore a checkpoint") from error
        if not own and n_skip + n_raise:  # refused where the tensors are: so here
            local.step -= 1
            if n_raise:
                error = FloatingPointError(f"{name}: non-finite results on the other ranks' "
                                           f"tensors; nothing changed (nonfinite='raise')")
            else:
                local.num_skipped += 1
                local.last_step_skipped = skipped = True
    if error is not None:
        raise error
    if opt.nonfinite == "skip":  # (the wrapped optimizer's own rule, every rank alike)
        local.consecutive_skips = run + 1 if skipped or bad else 0
        if bad:
            warnings.warn(f"{name}: {run + 1} non-finite steps in a row (max_consecutive_"
                          f"skips={limit}): step {local.step} applied", RuntimeWarning,
                          stacklevel=3)
    if skipped:
        state.bytes_communicated = sent
        return (dict(state._out) if state._out else dict(params)), state
    # this rank's tensors that no rank had a gradient for (their flags, summed over the
    # ranks by the reduce-scatter, are 0): their own step counts stay (missed_steps.py)
    note_missed(opt, local, [n for n in own if n not in grads])
    pchunk = state._pchunk
    for k, n in enumerate(own):
        lo = int(ch.local_offset[a + k])
        pchunk[lo:lo + ch.sizes[a + k]] = new[n].reshape(-1)
    agree = world > 1 and opt.nonfinite == "propagate"
    if agree:  # (in the chunk's first free element: every rank's has one, see sharding.py)
        pchunk[data] = float(bool(own) and local.nonfinite_values)
    if world > 1:
        pg.all_gather(state._pfull, pchunk)
    if agree:
        _agree_nonfinite_results(state, name, norm, was_bad, counted)
        sent["all_gather"] = _nbytes(pchunk) * world
    state.bytes_communicated = sent
    out = {}
    for i, n in enumerate(state.names):
        if a <= i < b:
            out[n] = new[n]
        else:
            lo, hi = ch.span(i)
            out[n] = state._pfull[lo:hi].reshape(state.shapes[i])
    state._out = out
    return dict(out), state


def _agree_nonfinite_results(state: DistributedState, name: str, norm: float, was_bad: bool,
                             counted: int) -> None:
    """Under ``"propagate"``, count and report a step whose finite gradients gave non-finite
    results on some rank's tensors as one process does, on every rank (the flags came with
    the all-gather): before, only the ranks holding those tensors counted it in
    ``num_nonfinite`` and warned, so rank 0 (the one that prints, whose counters
    ``gather_state`` and ``save_sharded`` keep) could report 0 where one process reports 1."""
    ch, local = state.chunks, state.local
    bad = any(float(_host(state._pfull[r * ch.chunk + ch.data[r]:
                                       r * ch.chunk + ch.data[r] + 1])[0]) > 0
              for r in range(state.world))
    if math.isfinite(norm) and bad and not was_bad and local.num_nonfinite == counted:
        local.num_nonfinite = counted + 1
        warnings.warn(f"{name}: finite gradients, but the step made params or state "
                      f"non-finite on another rank's tensors (a learning rate or other "
                      f"hyperparameter too large for the dtype?) at step {local.step}; "
                      f"params may now be non-finite", RuntimeWarning, stacklevel=4)
    local.nonfinite_values = bad


def _reshapes(opt: Any) -> bool:
    """Whether the wrapped optimizer changes the gradients before it measures their norm
    (``centralize``, ``adaptive_clip``), for some tensor."""
    h = _holder(opt)
    return h._pre_clipping() or h.adaptive_clip is not None or any(
        "adaptive_clip" in g for g in h.__dict__.get("_groups", ()))


def _own_grads(state: DistributedState, recv: Any) -> dict[str, Any]:
    """This rank's tensors' averaged gradients, views of ``recv`` (those some rank gave:
    their flags, summed by the reduce-scatter, are non-zero)."""
    ch, (a, b) = state.chunks, state.chunks.bounds[state.rank]
    data = ch.data[state.rank]
    flags, out = _host(recv[data:data + (b - a)]), {}
    for k, n in enumerate(state.names[a:b]):
        if flags[k] > 0:
            lo = int(ch.local_offset[a + k])
            out[n] = recv[lo:lo + ch.sizes[a + k]].reshape(state.shapes[a + k])
    return out


def _measured_sq(dp: Any, state: DistributedState, params: Mapping[str, Any],
                 grads: dict[str, Any]) -> float:
    """Σ g² of this rank's averaged gradients ``grads`` as one process's optimizer measures
    its norm: centralized and adaptively clipped first (each per tensor, or per unit of a
    tensor: this rank's own tensors suffice; copies, the step does it again). The global
    norm then scales the gradients as one process's clip does (centralizing is linear)."""
    h = _holder(dp.optimizer)
    if not grads:
        return 0.0
    dp._sync_groups(state)
    local = state.local
    if h._pre_clipping():
        grads = h._pre_clip(grads, local) or grads
    if any(getattr(v, "adaptive_clip", None) is not None for v in h.group_rows(local)[1]):
        grads = h._adaptive_clip(params, grads, local)
    return sum(_sumsq(g.reshape(-1)) for g in grads.values())
