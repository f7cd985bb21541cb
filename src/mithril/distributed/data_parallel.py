""":class:`DataParallel`: any optimizer of ours, data-parallel over the ranks of
:mod:`.process_group`, with the same ``init`` / ``update`` API.

* ``shard_state=False``: the gradients are copied into one flat buffer (skipped when they
  are already the views :meth:`DataParallel.gradient_views` gives), averaged by one
  all-reduce (float16 divided before it, as DDP, so that the sum cannot overflow), and every
  rank runs the same fused update on all parameters. A small all-reduce goes first, with
  each rank's refusal of its inputs and its presence flags: a refused step moves no
  gradient (the views are the caller's, and stay as they were). Clipping, non-finite
  policies and parameter groups are the wrapped optimizer's own: every rank sees exactly
  the averaged gradients one process would see.
* ``shard_state=True`` (ZeRO-1/2): a reduce-scatter leaves each rank the averaged gradients
  of the tensors it owns (:mod:`.sharding`: whole tensors, balanced by size); it runs the
  wrapped optimizer on those tensors alone (their slots are all the optimizer state it
  holds), then an all-gather gives every rank every updated parameter. The global gradient
  norm (``clip_norm``, ``state.last_grad_norm``, the non-finite policies) is one more
  all-reduce of three float64s (with the count of ranks refusing the step's inputs and
  the sum of the ranks' losses, for a loss-aware optimizer). Optimizer-wide values
  (Prodigy's ``d``, DoG's estimates, MoMo's) see every rank's per-tensor sums
  (:mod:`.global_sums`). In
  float16 the refusals travel first, alone (one float64), and the gradients are divided by
  N before the reduce-scatter (in a copy where they are the caller's gradient views: a
  sharded step leaves those as written, a replicated one leaves the mean there).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from ..utils.fixed_parts import FixedParts
from ..utils.optimizers.base import Optimizer
from ..utils.optimizers.groups import resolve
from ..utils.optimizers.loss_aware import wrapped_loss
from ..utils.optimizers.outer_wrapper import OuterWrapper
from . import process_group as pg
from .agreement import check_settings_votes, same_everywhere, settings, settings_votes
from .arrays import (  # noqa: F401 - the sharded step and checkpoint import them here
    _divide,
    _dtype_name,
    _empty,
    _host,
    _kind,
    _multiply,
    _nbytes,
    _small,
    _sumsq,
)
from .global_sums import needs_global_sums
from .missed_steps import note_missed
from .sharding import ChunkLayout, assign


def _holder(opt: Any) -> Any:
    """The optimizer holding the groups, ``_strict`` and ``clip_norm`` that ``opt`` runs
    with: a Lookahead's are its inner optimizer's (read-only on the Lookahead itself), a
    Mechanize's or ScheduleFree's its base optimizer's (the last of ``hyper_holders``)."""
    holders = opt.hyper_holders() if isinstance(opt, Optimizer) else (opt,)
    return holders[-1]


def _loss_kw(loss: float | None) -> dict[str, float]:
    """The step's ``loss=`` for a loss-aware optimizer (others take none: wrappers such as
    Mechanize have no such argument)."""
    return {} if loss is None else {"loss": loss}


def _check_init(params: Any) -> None:
    """Refuse what no rank can hold: not a non-empty dict, arrays of another library, or
    of several libraries or dtypes (named: one optimizer needs one of each)."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError("DataParallel: params must be a non-empty dict of arrays")
    for what, key in (("libraries", _kind), ("dtypes", _dtype_name)):
        groups: dict[str, list[str]] = {}
        for n, p in params.items():
            groups.setdefault(key(p), []).append(n)
        if len(groups) > 1:
            listing = "; ".join(f"{k}: {v}" for k, v in groups.items())
            raise TypeError(f"DataParallel: params mix {what} ({listing}); one optimizer "
                            f"needs one of each")


def _check_sharded_values(opt: Any, chunks: ChunkLayout) -> None:
    """Refuse, in sharded mode, an optimizer whose state keeps values computed over all
    parameters (``state_values``: Prodigy's and DAdaptAdamW's ``d``, DoG's estimates, MoMo's)
    where some rank holds no tensor: each step gathers every rank's per-tensor sums
    (:mod:`.global_sums`), which a rank without a first pass cannot join. Checked at
    ``init`` and at every ``update``: a setting changed in between may turn them on
    (``DoG(layer_wise=True)`` set to ``layer_wise=False``)."""
    idle = [r for r, (a, b) in enumerate(chunks.bounds) if a == b]
    if needs_global_sums(opt) and idle:
        raise NotImplementedError(
            f"shard_state=True: {type(opt).__name__} keeps optimizer-wide values "
            f"{list(opt.state_values)} computed over all parameters, and rank(s) {idle} "
            f"hold no tensor ({len(chunks.sizes)} tensors, {chunks.world} ranks); use "
            f"shard_state=False or fewer ranks")


def _check_sharded(opt: Any, names: tuple[str, ...], chunks: ChunkLayout) -> None:
    """Refuse what the sharded step cannot compute on a rank's own tensors: optimizer-wide
    values on a rank holding none (:func:`_check_sharded_values`), ``normalize_grad`` and
    ``clip_norm`` with per-tensor clipping (checked at ``init`` and again at every ``update``: either may be
    set in between)."""
    _check_sharded_values(opt, chunks)
    held = _holder(opt)
    if getattr(held, "normalize_grad", None) is not None or any(
            g.get("normalize_grad") is not None for g in held.param_groups):
        raise NotImplementedError("shard_state=True: normalize_grad (a norm of every rank's "
                                  "gradients together) is not supported; nothing changed")
    if opt.clip_norm is None:
        return
    _, rows, _ = resolve(_holder(opt), names)
    per_tensor = [k for k in ("clip_tensor_norm", "clip_block_rms", "adaptive_clip")
                  if getattr(opt, k) is not None or any(r.get(k) is not None for r in rows)]
    if per_tensor:
        raise NotImplementedError(f"shard_state=True: clip_norm together with {per_tensor} "
                                  f"(the global norm of per-tensor clipped gradients) is not "
                                  f"supported; nothing changed")


def broadcast_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Overwrite every rank's ``params`` (contiguous arrays, in place) with rank 0's, e.g.
    after an initialisation that was not seeded alike. Returns ``params``. Every rank must
    hold the same names, shapes and dtypes, in the same order: checked on every rank before
    anything is sent (a mismatch would otherwise reinterpret rank 0's bytes, or abort the
    process inside gloo), and refused alike on every rank, naming the parameter and the
    rank. A peer that stops calling is a :class:`~.process_group.PeerError` within the
    timeout."""
    if pg.world_size() > 1:
        error: Exception | None = None
        tensors: list[Any] = []
        try:
            if not isinstance(params, Mapping):
                raise TypeError(f"broadcast_params: params must be a dict of arrays, got "
                                f"{type(params).__name__}")
            for name, p in params.items():
                if _kind(p, None) is None:
                    raise TypeError(f"broadcast_params: params['{name}'] is a "
                                    f"{type(p).__name__}, not a NumPy or torch array")
                # (torch.from_numpy would write into a read-only array, a read-only mmap)
                if isinstance(p, np.ndarray) and not p.flags.writeable:
                    raise ValueError(f"broadcast_params: params['{name}'] is a read-only "
                                     f"NumPy array")
                t = pg.as_torch(p)
                if not t.is_contiguous():
                    raise ValueError(f"broadcast_params: params['{name}'] is not contiguous")
                tensors.append(t)
        except (TypeError, ValueError) as e:
            error = e
        pg.agree("broadcast_params", error)  # all checked before any is overwritten
        same_everywhere("broadcast_params", {
            "params": [[n, list(p.shape), _dtype_name(p)] for n, p in params.items()]})
        for name, t in zip(params, tensors):
            pg._run(f"broadcast of params['{name}']", pg._dist().broadcast, t, 0)
    return params


def _agree(params: Mapping[str, Any], opt: Any, sharded: bool) -> None:
    """Refuse, on every rank alike, parameter sets that differ between ranks (naming the
    first differing parameter), optimizer settings that differ (naming the first,
    :mod:`.agreement`) and parameter values that differ."""
    same_everywhere("DataParallel", {
        "optimizer": type(opt).__name__, "shard_state": sharded,
        "params": [[n, list(p.shape), str(p.dtype)] for n, p in params.items()],
        **settings(opt)})
    values = b"".join(pg.digest(np.ascontiguousarray(_host(p)).tobytes())
                      for p in params.values())
    if len(set(pg.all_gather_bytes(pg.digest(values)))) > 1:
        raise ValueError("DataParallel: the ranks' parameter values differ (initialise with the "
                         "same seed, or call mithril.distributed.broadcast_params(params) first)")


class DistributedState:
    """What :meth:`DataParallel.init` returns: the wrapped optimizer's state of this rank's
    parameters (``local``: all of them, or with ``shard_state`` those it owns, ``owned``)
    and the communication buffers. ``step``, the counters and ``last_grad_norm`` (the global
    norm of the averaged gradients) read as on an :class:`~mithril.utils.optimizers.OptimizerState`."""

    def __init__(self, local: Any, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
                 owned: tuple[str, ...], sharded: bool) -> None:
        self.local, self.names, self.shapes = local, names, shapes
        self.owned, self.sharded = owned, sharded
        self.world, self.rank = pg.world_size(), pg.rank()
        self.last_grad_norm: float | None = None
        #: payload bytes handed to each collective in the last step (per rank)
        self.bytes_communicated: dict[str, int] = {}
        self.chunks: ChunkLayout | None = None
        self._send: Any = None  # gradients in (all-reduce / reduce-scatter)
        self._recv: Any = None  # this rank's reduced chunk (sharded)
        self._pchunk: Any = None  # this rank's updated params (sharded)
        self._pfull: Any = None  # every rank's params (sharded)
        self._scratch: Any = None  # a copy of _send where the caller's views must stay
        self._grad_views: dict[str, Any] = {}
        self._out: dict[str, Any] = {}

    step = property(lambda self: self.local.step)
    num_skipped = property(lambda self: self.local.num_skipped)
    num_nonfinite = property(lambda self: self.local.num_nonfinite)
    last_step_skipped = property(lambda self: self.local.last_step_skipped)
    consecutive_skips = property(lambda self: self.local.consecutive_skips)

    def slot(self, name: str) -> dict[str, Any]:
        """Per-parameter arrays of slot ``name`` for the parameters this rank holds state of."""
        return self.local.slot(name)

    def state_bytes(self) -> int:
        """Bytes of optimizer slots this rank holds."""
        return int(sum(_host(v).nbytes if not hasattr(v, "element_size") else
                       v.element_size() * v.numel() for v in self.local.slots.values()))

    def __repr__(self) -> str:
        mode = "sharded" if self.sharded else "replicated"
        return (f"DistributedState({mode}, rank {self.rank}/{self.world}, step={self.step}, "
                f"owned={len(self.owned)}/{len(self.names)} params)")


class DataParallel(FixedParts):
    """Data-parallel training with ``optimizer`` (any built-in :class:`Optimizer`)::

        dist.init()                                # torchrun's environment
        dp = dist.DataParallel(Adam(1e-3), shard_state=True)
        state = dp.init(params)                    # same params on every rank
        params, state = dp.update(params, local_gradients, state)

    ``update`` takes this rank's gradients (of its share of the batch: a mean over it) and
    applies the mean over ranks, as one process would on the whole batch (the ranks' shares
    being of equal size). A gradient absent (or None) on some ranks counts as zero there
    (torch DDP's ``find_unused_parameters``); absent on all, the parameter and its slots are
    left untouched and its own step count does not advance, as DDP leaves its ``.grad`` None
    and ``torch.optim`` skips it (:mod:`.missed_steps`; at every world size). The
    ownership rule of :mod:`mithril.utils.optimizers.base` holds: rebind to what ``update``
    returns. Without a process group (one process) it is the wrapped optimizer (counting
    each parameter's own steps, as above). Around :class:`DifferentiallyPrivate` (DP-SGD)
    ``update`` takes this rank's per-example gradients (:mod:`.private_step`)."""

    def __init__(self, optimizer: Any, shard_state: bool = False) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"DataParallel wraps an optimizer of mithril.utils.optimizers, "
                            f"got {type(optimizer).__name__}")
        if not isinstance(shard_state, bool):
            raise TypeError(f"shard_state must be True or False, got {shard_state!r}")
        name = type(optimizer).__name__
        if "closure" in inspect.signature(optimizer.update).parameters:
            # (refused at the first update before, after the processes had started; and
            # the closure's gradients, of this rank's share, would not be averaged)
            raise NotImplementedError(
                f"DataParallel: {name} evaluates the loss itself (its update takes closure=: "
                f"L-BFGS's line search, SAM's gradient at the perturbed params); "
                f"DataParallel.update takes each rank's gradients only")
        if shard_state and isinstance(optimizer, OuterWrapper):
            # (its init failed on a missing clip_norm; each rank would take those sums over
            # its own tensors)
            raise NotImplementedError(
                f"shard_state=True: {name} runs its base optimizer's whole update and takes "
                f"norms and inner products over all parameters every step; use "
                f"shard_state=False")
        self.optimizer, self.shard_state = optimizer, shard_state
        self._made = True

    #: the checks above and every state init made hold for these only
    _FIXED = ("optimizer", "shard_state")
    _MAKER = "DataParallel(optimizer, shard_state=...)"

    # -- init ------------------------------------------------------------------------------
    def init(self, params: Mapping[str, Any]) -> DistributedState:
        """The state of this rank; every rank must call it with the same parameters (names,
        shapes, dtypes and values: refused otherwise, on every rank)."""
        opt = self.optimizer
        # what one rank refuses, every rank refuses before any collective of the init: a
        # rank raising alone would leave the others waiting in _agree (a PeerError at best)
        error: Exception | None = None
        try:
            _check_init(params)
            if self.shard_state:
                sizes = [math.prod(int(d) for d in p.shape) for p in params.values()]
                _check_sharded(opt, tuple(params),
                               ChunkLayout(sizes, assign(sizes, pg.world_size())))
        except (TypeError, ValueError, NotImplementedError) as e:
            error = e
        pg.agree("DataParallel.init", error)
        _agree(params, opt, self.shard_state)
        names = tuple(params)
        shapes = tuple(tuple(int(d) for d in p.shape) for p in params.values())
        sizes = [math.prod(s) for s in shapes]
        like = next(iter(params.values()))
        if not self.shard_state:
            state = DistributedState(opt.init(params), names, shapes, names, False)
            state._send = _empty(sum(sizes), like)  # (the presence flags travel apart)
            off = 0
            for n, s, shp in zip(names, sizes, shapes):
                state._grad_views[n] = state._send[off:off + s].reshape(shp)
                off += s
            return state
        world, me = pg.world_size(), pg.rank()
        chunks = ChunkLayout(sizes, assign(sizes, world))
        a, b = chunks.bounds[me]
        own = names[a:b]
        local = _local_init(opt, {n: params[n] for n in own})
        state = DistributedState(local, names, shapes, own, True)
        state.chunks = chunks
        state._send = _empty(chunks.total, like)
        state._pchunk = _empty(chunks.chunk, like)
        if world == 1:  # no collectives: the buffers alias
            state._recv, state._pfull = state._send, state._pchunk
        else:
            state._recv = _empty(chunks.chunk, like)
            state._pfull = _empty(chunks.total, like)
        for i, (n, shp) in enumerate(zip(names, shapes)):
            lo, hi = chunks.span(i)
            state._grad_views[n] = state._send[lo:hi].reshape(shp)
        self._sync_groups(state)
        return state

    def all_finite(self, local: bool) -> bool:
        """Whether every rank's gradients are finite, given this rank's answer (one
        all-reduce of one float64; every rank must call it). What
        :class:`~mithril.utils.mixed_precision.MixedPrecisionTrainer` asks before a step, so
        that a gradient overflowing on one rank only makes every rank skip the step and
        back off its loss scale alike, as one process would."""
        if not isinstance(local, (bool, np.bool_)):
            raise TypeError(f"all_finite takes a bool, got {type(local).__name__}")
        if pg.world_size() == 1:
            return bool(local)
        flag = np.array([0.0 if local else 1.0])
        pg.all_reduce(flag)
        return bool(flag[0] == 0.0)

    def update_hessian(self, state: DistributedState, estimate: Mapping[str, Any]
                       ) -> DistributedState:
        """Sophia's :meth:`~mithril.utils.optimizers.Sophia.update_hessian` with this rank's
        ``estimate`` (of its share of the batch): the mean over ranks is folded in on every
        rank, as one process folds the whole batch's (:mod:`.hessian_step`)."""
        from .hessian_step import update_hessian

        return update_hessian(self, state, estimate)

    def gradient_views(self, state: DistributedState) -> dict[str, Any]:
        """Arrays inside the communication buffer, one per parameter: gradients written into
        them (and passed to :meth:`update` as they are) are not copied."""
        return dict(state._grad_views)

    # -- update ----------------------------------------------------------------------------
    def _pack(self, gradients: Mapping[str, Any], state: DistributedState,
              flag_index: Any = None) -> None:
        """Copy the gradients into the send buffer and set the presence flags (at
        ``flag_index(i)`` of the buffer: sharded; replicated, they travel apart)."""
        if not isinstance(gradients, Mapping):
            raise TypeError(f"gradients must be a dict of arrays, got {type(gradients).__name__}")
        unknown = [n for n in gradients if n not in state._grad_views]
        if unknown:
            raise KeyMismatchError(f"gradients for unknown parameter(s) {sorted(unknown)}")
        buf = state._send
        for i, n in enumerate(state.names):
            view = state._grad_views[n]
            g = gradients.get(n)
            if flag_index is not None:
                buf[flag_index(i)] = 0 if g is None else 1
            if g is None:
                view[...] = 0
                continue
            if g is view:
                continue
            if tuple(g.shape) != state.shapes[i]:
                raise ShapeError(f"gradients['{n}'] has shape {tuple(g.shape)} but the parameter "
                                 f"has shape {state.shapes[i]}")
            if g.dtype != view.dtype or type(g) is not type(view):
                raise TypeError(f"gradients['{n}'] is a {type(g).__name__} of dtype {g.dtype}; "
                                f"the parameters are {type(view).__name__} of {view.dtype}")
            # (detached: a gradient of create_graph=True requires grad, and copying it into
            # the buffer would make the buffer part of its graph)
            view[...] = g if isinstance(g, np.ndarray) else g.detach()

    def _check_step(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                    state: DistributedState) -> None:
        """Raise, before anything is written, what the step would refuse: parameters and
        gradients not those of ``init`` (names, shapes, dtypes, array kind) and, sharded, a
        clipping setting it cannot apply. Every parameter is checked, not only this rank's:
        the same bad input is then the same error on every rank."""
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
        if not isinstance(gradients, Mapping):
            raise TypeError(f"gradients must be a dict of arrays, got {type(gradients).__name__}")
        # (the wrapped update refuses it too, but only after the gradients have travelled:
        # one rank evaluating with its EMA swapped in then raised there alone, and the others
        # applied the step (replicated) or waited in the all-gather until the timeout)
        swapped = getattr(state.local, "swapped", None)
        if swapped is not None:
            raise ValueError(f"the {swapped.upper()} is swapped in (swap_ema): call "
                             f"swap_ema(params, state.local) again to swap the training "
                             f"parameters back before an update")
        missing = [n for n in state.names if n not in params]
        unknown = sorted(set(params) - set(state.names))
        if missing or unknown:
            raise KeyMismatchError(f"params must hold exactly the parameters of init: missing "
                                   f"{missing}, unknown {unknown}")
        unknown = [n for n in gradients if n not in state._grad_views]
        if unknown:
            raise KeyMismatchError(f"gradients for unknown parameter(s) {sorted(unknown)}")
        ref = state._send
        want, kind = _dtype_name(ref), type(ref).__name__
        for i, n in enumerate(state.names):
            for what, x in (("params", params[n]), ("gradients", gradients.get(n))):
                if x is None and what == "gradients":
                    continue
                if (type(x) is not type(ref) if what == "gradients" else
                        not hasattr(x, "shape") or _kind(x, None) != _kind(ref)):
                    raise TypeError(f"{what}['{n}'] is a {type(x).__name__}; the parameters "
                                    f"of init are {kind} arrays")
                if tuple(x.shape) != state.shapes[i]:
                    raise ShapeError(f"{what}['{n}'] has shape {tuple(x.shape)} but the "
                                     f"parameter has shape {state.shapes[i]} (as at init)")
                if _dtype_name(x) != want:
                    raise DTypeError(f"{what}['{n}'] has dtype {_dtype_name(x)}; the "
                                     f"parameters of init are {want}")
        if state.sharded:
            _check_sharded(self.optimizer, state.names, state.chunks)

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
               state: DistributedState, *, loss: Any = None
               ) -> tuple[dict[str, Any], DistributedState]:
        """One step with this rank's ``gradients``; returns every parameter (updated alike on
        every rank) and the state. ``loss``: this rank's loss (the mean over its share of
        the batch), for a loss-aware optimizer only (``needs_loss``: PolyakSGD, Momo,
        MomoAdam); the step takes the mean over ranks, the whole batch's loss where the
        shares are of equal size, as the gradients. With shares of ``n_r`` of ``n`` rows,
        scale this rank's loss and gradients alike by ``world·n_r/n``: both means are then
        the whole batch's."""
        if not isinstance(state, DistributedState):
            raise TypeError(f"state must be what DataParallel.init returned, got "
                            f"{type(state).__name__}")
        if state.world != pg.world_size():
            raise ValueError(f"state was made for {state.world} ranks, the world has "
                             f"{pg.world_size()}")
        return (self._sharded if state.sharded else self._replicated)(params, gradients, state,
                                                                      loss)

    def _local_loss(self, loss: Any) -> float | None:
        """This rank's ``loss`` checked (a finite real scalar, given exactly where the
        optimizer needs it), as a float; None for an optimizer that takes none."""
        return wrapped_loss("DataParallel.update", self.optimizer, loss).get("loss")

    @property
    def needs_loss(self) -> bool:
        """The wrapped optimizer's: whether ``update`` takes ``loss=``."""
        return bool(getattr(self.optimizer, "needs_loss", False))

    def _replicated(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                    state: DistributedState, loss: Any = None
                    ) -> tuple[dict[str, Any], DistributedState]:
        if state.world == 1:  # nothing to average: the wrapped optimizer, bit for bit
            new, state.local = self.optimizer.update(params, gradients, state.local,
                                                     **_loss_kw(self._local_loss(loss)))
            state.last_grad_norm = state.local.last_grad_norm
            note_missed(self.optimizer, state.local,
                        [n for n in state.names if gradients.get(n) is None])
            return new, state
        if getattr(self.optimizer, "takes_per_example_gradients", False):
            from .private_step import private_step  # (DP-SGD: per-example gradients)

            return private_step(self, params, gradients, state, loss)
        buf, names = state._send, state.names
        # every rank checks its inputs before any gradient travels: the all-reduce sums the
        # buffer in place, and that buffer may be the caller's gradient_views (micro-batches
        # accumulated there, which a refused call must leave as they were). So the refusals
        # and the presence flags go first, in one all-reduce of len(names) + 1 float64s
        # (and this rank's loss: their mean is the step's; and the settings' digests: a
        # setting differing between ranks would make the replicas drift apart silently)
        refused: Exception | None = None
        mine = None
        try:
            self._check_step(params, gradients, state)
            mine = self._local_loss(loss)
        except (TypeError, ValueError, KeyError) as e:
            refused = e
        present = [0.0] * len(names) if refused is not None else [
            float(gradients.get(n) is not None) for n in names]
        hyper = settings_votes(self.optimizer) if state.world > 1 else []  # (alone: agrees)
        votes = _small([float(refused is not None), *present, mine or 0.0, *hyper], buf)
        pg.all_reduce(votes)
        flags = _host(votes)
        if flags[0] > 0:
            pg.agree("DataParallel.update", refused)
        if hyper:
            check_settings_votes("DataParallel.update", self.optimizer,
                                 flags[2 + len(names):], state.world)
        mean_loss = None if mine is None else float(flags[1 + len(names)]) / state.world
        self._pack(gradients, state)
        if len(buf) and _dtype_name(buf) == "float16":  # divided first, as DDP: the sum
            _divide(buf, state.world)                   # over ranks overflows where the
            pg.all_reduce(buf)                          # mean does not
        elif len(buf):
            pg.all_reduce(buf)
            _divide(buf, state.world)
        state.bytes_communicated = {"all_reduce": _nbytes(buf) + _nbytes(votes)}
        grads = {n: state._grad_views[n] for i, n in enumerate(names) if flags[1 + i] > 0}
        new, state.local = self.optimizer.update(params, grads, state.local,
                                                 **_loss_kw(mean_loss))
        state.last_grad_norm = state.local.last_grad_norm
        # (no rank's gradient: DDP leaves .grad None, torch.optim skips it: missed_steps.py)
        note_missed(self.optimizer, state.local, [n for n in names if n not in grads])
        return new, state

    def _sync_groups(self, state: DistributedState) -> None:
        """Resolve parameter groups over all parameters (as one process does), keeping this
        rank's tensors' rows: a group matching only other ranks' tensors is no error."""
        opt = _holder(self.optimizer)  # (a Lookahead's rows are its inner's)
        key = (opt._groups_version, id(opt._groups))
        cached = state.local.groups
        if cached is None or cached[0] != key:
            a, b = state.chunks.bounds[state.rank]
            index, rows, _ = resolve(opt, state.names)
            state.local.groups = (key, index[a:b], rows)

    def _sharded(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                 state: DistributedState, loss: Any = None
                 ) -> tuple[dict[str, Any], DistributedState]:
        from .sharded_step import sharded_step

        local = state.local
        before = (state.last_grad_norm, local.last_grad_norm, local.last_step_skipped,
                  local.step, local.num_skipped)
        try:
            new, state = sharded_step(self, params, gradients, state, loss)
        except BaseException:
            # a step refused on every rank ("raise" on a non-finite gradient or result)
            # changes nothing, as the wrapped optimizer's refused step: not even the norm
            # and the skipped flag it reports (the step records them before it raises)
            if state.local is local and local.step == before[3]:
                state.last_grad_norm, local.last_grad_norm, local.last_step_skipped = \
                    before[:3]
            raise
        if state.local.num_skipped > before[4]:  # as one process: a skipped step returns
            return dict(params), state            # the params given, not the last step's
        state.local.last_step_skipped = False  # (a rank holding no tensor never sets it)
        return new, state


@contextlib.contextmanager
def _no_clip_norm(opt: Any) -> Any:
    """``opt`` with ``clip_norm`` off (the sharded step applies the global one itself)."""
    opt = _holder(opt)
    saved = opt.clip_norm
    opt.clip_norm = None
    try:
        yield
    finally:
        opt.clip_norm = saved


def _local_init(opt: Any, own: Mapping[str, Any]) -> Any:
    """``opt.init`` of this rank's tensors ``own``: a group or mask matching only other
    ranks' tensors is no error (``strict`` off) and no warning here."""
    holder = _holder(opt)
    strict = holder._strict
    holder._strict = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*matches no parameter")
            return opt.init(own)
    finally:
        holder._strict = strict
