"""The :class:`Optimizer` base class: tree walking, validation, clipping, weight decay,
non-finite handling and the per-backend fast path. Each optimizer only states its
per-parameter math (MLX style).

Ownership rule (like torch's in-place ``step`` and JAX buffer donation):
``params, state = opt.update(params, gradients, state)`` *consumes* ``params`` and
``state``. Built-in optimizers keep all parameters in one flat buffer and return arrays
over it that the next update overwrites in place: NumPy/torch views; on JAX-on-CPU,
``jax.Array`` objects aliasing the (64-byte aligned) host buffer, whose gradients are
awaited before the write; on JAX accelerators, buffers donated to the jitted step. Always
rebind to what ``update`` returns, do not reuse an older state, and copy a returned array
if you need a snapshot. Arrays you pass that are not the ones ``update`` returned are
copied in, never modified, unless you hand them over with ``params = opt.adopt(params,
state)`` (NumPy/torch: moved into the flat buffer one by one, never held twice; see
:meth:`Optimizer.adopt`). On JAX-on-CPU the two host buffers alternate: arrays passed to
one update are overwritten by the one after it, so an asynchronous computation on
them must have finished by then (nothing waits for it, unlike a donated buffer).

The step count ``t`` (bias corrections, AdaGrad's lr decay, SGD's undampened first
buffer) is one per optimizer state, as in optax; torch counts per parameter, which differs
only for parameters that missed steps (absent from ``gradients``: left untouched). A state
counts those as torch does once told (:meth:`OptimizerState.note_missed`, ``torch_optimizer``
does), unless the class sets ``counts_missed = False`` (its reference counts per group).

Non-finite gradients and steps (``nonfinite=``, ``max_consecutive_skips=``): the four
policies (``"propagate"``, the default, ``"skip"``, ``"raise"``, ``"unchecked"``) are
described in :mod:`.nonfinite_steps`, which records each step's outcome.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from itertools import repeat
from typing import Any, ClassVar

import numpy as np

from . import averaging
from .argument_names import ALIASES as ALIASES  # (public: kept importable here)
from .argument_names import _catalog_takes as _catalog_takes  # (interop imports it here)
from .argument_names import _constructor
from .averaging import AveragingMixin
from .checks import (
    check_flag,
    check_mu_dtype,
    check_positive,
    check_uniform,
    check_update,
    infer_backend,
    refuse_traced,
)
from .clipping import check_clip_eps
from .engines.common import (
    NonfiniteState,
    host_norm,
    is_finite,
    must_skip,
    nonfinite_result_error,
)
from .groups import GroupsMixin, ParamGroups
from .hyperparameter_access import HyperparameterAccessMixin
from .layout import Layout, slot_shape_of
from .loss_aware import LOSS, WRITTEN, loss_step
from .name_patterns import check_mask
from .nonfinite_steps import NonfiniteStepsMixin, check_nonfinite, nonfinite_report
from .serialization import StateDictMixin
from .state import OptimizerState


def _bind_backend(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: Optimizer, params: Mapping[str, Any], *args: Any, **kw: Any) -> Any:
        self._bind(params)
        return method(self, params, *args, **kw)

    return wrapper


def _without_none(gradients: Any) -> Any:
    """``gradients`` without its entries whose value is None: a parameter without a gradient
    this step (torch leaves its ``.grad`` None), as if its key were absent (a new dict only
    where there is one; one C-speed pass otherwise)."""
    if isinstance(gradients, Mapping) and any(map(operator.is_, gradients.values(),
                                                  repeat(None))):
        return {k: g for k, g in gradients.items() if g is not None}
    return gradients


class Optimizer(HyperparameterAccessMixin, GroupsMixin, AveragingMixin, StateDictMixin,
                NonfiniteStepsMixin):
    """Base class. Construct with hyperparameters only; then::

        state = opt.init(params)
        params, state = opt.update(params, gradients, state)

    A built-in (or user) optimizer defines ``slots`` (names of its per-parameter state),
    :meth:`scalars` (per-step scalars, learning rate first) and :meth:`math`, a pure
    elementwise function ``(p, g, *slots, *scalars) -> (p, *slots)`` using only
    arithmetic and :mod:`~mithril.utils.optimizers.elementwise`. The base class then runs
    it as one fused numba kernel (NumPy, torch CPU), one ``jax.jit`` step with donated
    buffers (JAX) or flat tensor ops (other torch devices). Subclasses may instead
    override ``init``/``update`` entirely; ``self.backend`` is available inside them.

    Two passes (LAMB, Novograd, Prodigy): ``reductions`` per-tensor sums of
    :meth:`reduce`'s terms, taken in a read-only first pass; :meth:`tensor_scalars` turns
    them, the ``tensor_slots`` and the optimizer-wide ``state_values`` (``state.values``)
    into extra scalars of the second pass and the new tensor slots and values. Where the
    per-step :meth:`scalars` depend on some of those values, ``scalar_values`` names them:
    the state's (as they were before the step) are then passed as keyword arguments,
    ``scalars(step, d=...)``: the optimizer instance holds no per-state value during an
    update (one instance may step several states). Prodigy::

        state_values = ("d", "numerator")
        scalar_values = ("d",)

        def scalars(self, step, d=None):  # d None: state_value_init("d")
            ...

    Common options: ``weight_decay`` (coupled L2, ``g ← g + wd·p``, as torch.optim),
    ``clip_norm`` (scale all gradients by ``min(1, clip_norm/(‖g‖₂ + clip_eps))``: torch
    ``clip_grad_norm_`` with the default ``clip_eps=1e-6``, optax's ``clip_by_global_norm``
    and Keras's ``global_clipnorm`` with ``clip_eps=0``), ``clip_value`` (clamp each gradient to ``±clip_value``),
    ``nonfinite`` and ``max_consecutive_skips`` (:mod:`.nonfinite_steps`) and ``backend``
    (else inferred from the params).
    Per tensor, before those: ``clip_tensor_norm`` (Keras ``clipnorm``: each tensor scaled
    by ``c / max(‖g‖, c)``) and ``clip_block_rms`` (optax ``clip_by_block_rms``: by
    ``1 / max(1, rms(g) / c)``), measured in one more read-only pass over the gradients;
    ``clip_norm`` then sees the clipped gradients, and parameter groups may set or turn off
    (``None``) either. The reported ``state.last_grad_norm`` stays the raw gradients' norm.
    Before all of them, ``adaptive_clip`` (optax ``adaptive_grad_clip``: each unit of a
    gradient at most ``c·max(‖p_u‖, adaptive_clip_eps)``, :func:`.clipping.adaptive_clip`),
    fused on the numba engine (per-unit norms in a read-only pass, then each gradient element
    scaled by its unit's factor as the passes read it: :mod:`.engines.unitwise`) and inside
    the jitted JAX step; the tensor-op engine gets clipped copies of the gradients instead.
    First of all (optax users chain them first: ``chain(centralize(), clip_by_global_norm(c),
    adam(lr))``): ``centralize=True`` (optax ``centralize``: a tensor of 2+ axes less its mean
    over all axes but the first) then ``normalize_grad=s`` (``g ← s·g / (‖g‖₂ +
    normalize_eps)``, ‖g‖ over the normalizing tensors together: optax
    ``normalize_by_update_norm(s, eps)``, ``optax.contrib.normalize()`` with ``s=1,
    normalize_eps=0``; :mod:`.clipping`); groups may turn either off (None / False). The
    numba engine normalizes inside its step (per-tensor factors) and centralizes into a
    buffer of its own; the others get new arrays. ``state.last_grad_norm`` is then the norm
    of the transformed gradients.

    Weight averaging (:mod:`.averaging`), in the same fused pass: ``ema_decay`` keeps an
    exponential moving average of the parameters (slot ``"ema"``, :meth:`ema_params`),
    ``swa_start`` an equal average from that step on (slot ``"swa"``, :meth:`swa_params`),
    ``ema_every`` updates them every k steps, ``ema_start`` starts the EMA at that step
    (its first update on or after it copies the parameters); :meth:`swap_ema` swaps an average in for
    evaluation and back.
    """

    slots: ClassVar[tuple[str, ...]] = ()
    #: decoupled decay ``p ← p·(1 − lr·wd)`` instead of coupled L2 (AdamW)
    decoupled_weight_decay: ClassVar[bool] = False
    #: the math applies ``weight_decay`` itself (a scalar of its own), e.g. inside a trust
    #: ratio (LAMB): the base class then neither couples nor decouples it
    weight_decay_in_math: ClassVar[bool] = False
    #: slots holding one value per tensor (Novograd's second moment): :meth:`tensor_scalars`
    #: reads and updates them between the two passes; the kernels never see them
    tensor_slots: ClassVar[tuple[str, ...]] = ()
    #: optimizer-wide scalars kept in ``state.values`` (saved with the state)
    state_values: ClassVar[tuple[str, ...]] = ()
    #: the :attr:`state_values` that :meth:`scalars` reads: each step passes the state's
    #: (before the step) as keyword arguments, ``scalars(step, d=...)`` (Prodigy's ``d``)
    scalar_values: ClassVar[tuple[str, ...]] = ()
    #: how many per-tensor sums :meth:`reduce_math` gives (0: one pass, no reduction)
    reductions: ClassVar[int] = 0
    #: the step needs the loss: ``update(..., loss=f)``, state value ``"loss"`` (added to
    #: :attr:`state_values`) for :meth:`tensor_scalars` (:mod:`.loss_aware`)
    needs_loss: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.needs_loss and LOSS not in cls.state_values:
            cls.state_values = (*cls.state_values, LOSS)
        odd = [v for v in cls.scalar_values if v not in cls.state_values]
        if odd:
            raise TypeError(f"{cls.__name__}.scalar_values {odd} are not among its "
                            f"state_values {tuple(cls.state_values)}")
        for name in ("init", "update"):
            if name in cls.__dict__:  # a user override still gets self.backend
                setattr(cls, name, _bind_backend(cls.__dict__[name]))
        if "__init__" in cls.__dict__:
            cls.__init__ = _constructor(cls.__dict__["__init__"])

    def __init__(self, learning_rate: float = 1e-3, *, weight_decay: float = 0.0,
                 clip_norm: float | None = None, clip_value: float | None = None,
                 nonfinite: str = "propagate", backend: Any = None,
                 param_groups: Any = None, weight_decay_mask: Any = None,
                 exclude_weight_decay: Any = (), strict: bool = False,
                 ema_decay: float | None = None, ema_every: int = 1, ema_start: int = 1,
                 swa_start: int | None = None, clip_tensor_norm: float | None = None,
                 clip_block_rms: float | None = None, adaptive_clip: float | None = None,
                 adaptive_clip_eps: float = 1e-3, max_consecutive_skips: int | None = None,
                 clip_eps: float = 1e-6, centralize: bool | None = False,
                 normalize_grad: float | None = None, normalize_eps: float = 1e-6) -> None:
        self.learning_rate = check_positive("learning_rate", learning_rate)
        # (None: a group's way of turning it off, as the clips')
        self.centralize = False if centralize is None else check_flag("centralize", centralize)
        self.normalize_grad = (None if normalize_grad is None else
                               check_positive("normalize_grad", normalize_grad, False))
        self.normalize_eps = check_positive("normalize_eps", normalize_eps)
        self.clip_tensor_norm = (None if clip_tensor_norm is None else
                                 check_positive("clip_tensor_norm", clip_tensor_norm, False))
        self.clip_block_rms = (None if clip_block_rms is None else
                               check_positive("clip_block_rms", clip_block_rms, False))
        self.adaptive_clip = (None if adaptive_clip is None else
                              check_positive("adaptive_clip", adaptive_clip, False))
        self.adaptive_clip_eps = check_positive("adaptive_clip_eps", adaptive_clip_eps)
        self.weight_decay = check_positive("weight_decay", weight_decay)
        self.clip_norm = None if clip_norm is None else check_positive("clip_norm", clip_norm, False)
        self.clip_eps = check_clip_eps(clip_eps)
        self.clip_value = None if clip_value is None else check_positive("clip_value", clip_value, False)
        max_consecutive_skips = check_nonfinite(nonfinite, max_consecutive_skips)
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.ema_decay = averaging.check_ema_decay(ema_decay)
        self.ema_every = averaging.check_ema_every(ema_every)
        self.ema_start = averaging.check_ema_start(ema_start)
        self.swa_start = averaging.check_swa_start(swa_start)
        if backend is not None and not callable(getattr(backend, "is_native", None)):
            raise TypeError(f"backend must be a mithril backend (e.g. NumpyBackend()), got {backend!r}")
        self._backend = backend
        self._raw_groups = (param_groups, weight_decay_mask, exclude_weight_decay,
                            check_flag("strict", strict))
        self._groups: list[dict[str, Any]] = ParamGroups()
        self._wd_mask, self._wd_exclude, self._strict = None, [], False
        self._groups_version = 0
        if type(self).__init__ is Optimizer.__init__:  # no constructor of its own to wrap
            self._finish_groups()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "mu_dtype" and name in self.__dict__:
            value = check_mu_dtype(value)  # (kept as a name, as the constructor keeps it)
            if value != self.__dict__[name]:
                raise AttributeError(f"{type(self).__name__}'s mu_dtype is fixed at "
                                     f"construction (a state's m buffer has it): build "
                                     f"another optimizer")
        super().__setattr__(name, value)

    # -- backend -----------------------------------------------------------------------
    @property
    def backend(self) -> Any:
        if self._backend is None:
            raise RuntimeError("the optimizer's backend is known once init/update sees params "
                               "(or pass backend=... to the constructor)")
        return self._backend

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    def _bind(self, params: Mapping[str, Any]) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
        if self._backend is None:
            self._backend = infer_backend(params)

    # -- what a subclass states ----------------------------------------------------------
    def slot_names(self) -> tuple[str, ...]:
        return self.slots

    def slot_init(self, slot: str) -> float:
        """Initial value of every element of ``slot`` (0 unless overridden)."""
        return 0.0

    def slot_dtypes(self, dtype: str) -> dict[str, str]:
        """The slots kept in a dtype of their own for parameters of ``dtype``, name -> dtype
        name: optax's ``mu_dtype`` (``{"m": "bfloat16"}``), where it differs from ``dtype``
        or where the step is optax's ``mu_dtype`` order, which only the per-tensor array
        engine runs (``mu_dtype="float32"`` for float32 parameters: numba cannot compile
        it, and the jitted JAX engine ran it without moving the parameters); such a state
        takes the per-tensor array engine; empty: the fused engines."""
        mu = getattr(self, "mu_dtype", None)
        if mu is None or "m" not in self.slot_names():
            return {}
        return {"m": mu} if mu != dtype or getattr(self.kernel_math(), "array_only", False) \
            else {}

    def scalars(self, step: int) -> tuple[float, ...]:
        """Per-step scalars passed to :meth:`math` after the slots (``step`` is 1-based).
        An optimizer with :attr:`scalar_values` takes them as keyword arguments too,
        ``scalars(self, step, d=None)`` (the engines pass the state's; None, from a caller
        without a state, stands for the initial value)."""
        return (self.learning_rate,)

    @staticmethod
    def math(p: Any, g: Any, *args: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    # -- per-tensor reductions (see ``reductions``) -----------------------------------------
    def slot_shape(self, slot: str, shape: tuple[int, ...], name: str | None = None
                   ) -> tuple[int, ...]:
        """The shape of ``slot``'s part for a parameter of ``shape``: the parameter's own
        for the slots the elementwise math updates, ``()`` for :attr:`tensor_slots`. An
        optimizer that overrides ``update`` may return others (factored statistics);
        ``name``: the parameter's, for one that routes by it (Muon's exclusions)."""
        return () if slot in self.tensor_slots else shape

    def state_value_init(self, name: str) -> float:
        """Initial value of the optimizer-wide scalar ``name`` (0 unless overridden)."""
        return 0.0

    @staticmethod
    def reduce(p: Any, g: Any, *args: Any) -> tuple[Any, ...]:
        """The ``reductions`` elementwise terms ``(p, g, *slots, *scalars) -> (t₁, …, t_k)``
        whose per-tensor sums the first pass takes (reading only; in float64, the fused CPU
        kernels' tiles of 1,024 float32 terms in float32 where vectors are 256 bits or less,
        see :func:`~.engines.kernels.reduce_kernel`)."""
        raise NotImplementedError

    def reduce_math(self) -> Callable:
        """The function the first pass compiles (:meth:`reduce` by default; as with
        :meth:`kernel_math`, return the same function object every time)."""
        return type(self).reduce

    def tensor_scalars(self, step: int, sums: tuple[Any, ...], scalars: tuple[Any, ...],
                       tensors: dict[str, Any], values: dict[str, Any], sizes: Any
                       ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        """Between the two passes, per tensor: from the first pass's ``sums`` (k arrays with
        one float64 per tensor), this step's ``scalars`` (each tensor's value of every
        scalar of :meth:`scalars`, one array each), the :attr:`tensor_slots` (one array
        each) and :attr:`state_values`, return ``(extra, tensors, values)``: the extra
        scalars the second pass appends to :meth:`math`'s (arrays with one value per
        tensor, or floats), and the new tensor slots and values, kept only if the step is
        applied. ``sizes`` holds each tensor's element count. ``step``: each tensor's own
        count (an array where they differ: a group's ``step_offset``, missed steps), or the
        optimizer's, one number, where the class sets ``tensor_scalars_step = "optimizer"``
        (what optimizer-wide values read). Written with arithmetic and :mod:`.elementwise`
        functions only: the jitted JAX engine and the optax transformation run it traced,
        in the parameters' float width, the values kept on the device (``state.values``)."""
        return (), tensors, values

    def two_pass(self) -> bool:
        """Whether a step needs :meth:`tensor_scalars` between two passes."""
        return bool(self.reductions or self.tensor_slots or self.state_values)

    def kernel_math(self) -> Callable:
        """The pure elementwise function the engines compile (``math`` by default).

        Kernels are cached per function object: return the same (module-level) function
        on every call, not a new closure, or every step compiles anew."""
        return type(self).math

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments, e.g. for checkpoints and error messages (the group options
        only where set; a group given by a callable is listed by the names it matched at the
        last ``init``)."""
        out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        seen = self.__dict__.get("_matched", {})

        def named(spec: Any, key: str) -> Any:  # a callable as the names it matched
            return list(seen.get(key, [])) if callable(spec) and key in seen or (
                callable(spec) and seen) else spec

        if self._groups:
            out["param_groups"] = [{**g, "params": named(g["params"], f"group{i}")}
                                   for i, g in enumerate(self._groups)]
        if self._wd_mask is not None:
            out["weight_decay_mask"] = named(self._wd_mask, "mask")
        if self._wd_exclude:
            out["exclude_weight_decay"] = [named(e, f"exclude{j}")
                                           for j, e in enumerate(self._wd_exclude)]
        if self._strict:
            out["strict"] = True
        return out

    # -- init / update -------------------------------------------------------------------
    def init(self, params: Mapping[str, Any]) -> OptimizerState:
        """Zeroed (or ``slot_init``) state for ``params``; ``params`` are not modified.

        Every parameter must be an array of one backend (the constructor's ``backend=``, else
        inferred) and one floating-point dtype; where they mix, the error names the odd ones
        out (the smaller group). Nothing, the inferred backend included, is kept on error."""
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
        refuse_traced(f"{type(self).__name__}.init", params)
        from .engines import engine_for, spans_devices

        backend = self._backend
        if backend is None:
            check_uniform(params, "array type", lambda p: type(p).__module__.split(".", 1)[0]
                           .replace("jaxlib", "jax").replace("numpy", "NumPy"))
            backend = infer_backend(params)
        for name, p in params.items():
            if not backend.is_native(p):
                raise TypeError(f"params['{name}'] is a {type(p).__name__}, not a "
                                f"{backend.name} array")
        check_uniform(params, "dtype", backend.dtype_name)
        layout = Layout.of(params, backend.dtype_name)
        if params and layout.dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise TypeError(f"params['{next(iter(params))}'] has dtype {layout.dtype}; "
                            f"optimizers need floating-point parameters")
        check_mask(self, layout.names)  # (a dict missing a name, an optax-style function)
        own = self.slot_dtypes(layout.dtype)
        engine = engine_for(backend, layout, backend.name == "jax" and spans_devices(params),
                            own)
        layout = engine.layout  # an engine may pad offsets for alignment
        slots, slot_layouts = {}, {}
        for s in (*self.slot_names(), *self.tensor_slots):
            shapes = tuple(tuple(slot_shape_of(self, s, shp, n))
                           for n, shp in zip(layout.names, layout.shapes))
            lay = layout if shapes == layout.shapes else Layout(layout.names, shapes, layout.dtype)
            if lay is not layout:
                slot_layouts[s] = lay
            slots[s] = (engine.full(lay.total, self.slot_init(s), own[s]) if s in own else
                        engine.full(lay.total, self.slot_init(s)))
        averaged = self.full_slot_names()[len(self.slot_names()):]
        if averaged:  # an average starts as the parameters (torch's AveragedModel: a copy)
            flat = layout.flatten_numpy({n: engine.to_numpy(p) for n, p in params.items()})
            for i, s in enumerate(averaged):  # each its own buffer: the tensor-op engine's
                # from_numpy may wrap the host array (torch.from_numpy), and EMA and SWA
                # sharing one buffer averaged each other (torch-ops / CUDA)
                slots[s] = engine.from_numpy(flat if i == 0 else flat.copy())
        self._backend = backend
        values = {v: float(self.state_value_init(v)) for v in self.state_values}
        return OptimizerState(type(self).__name__, layout, slots, engine, slot_layouts, values)

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
               state: OptimizerState, *, loss: Any = None
               ) -> tuple[dict[str, Any], OptimizerState]:
        """One step; returns the new params and state (see the ownership rule above).
        ``loss``: the loss at ``params``, for an optimizer with :attr:`needs_loss` only."""
        if loss is not WRITTEN and (loss is not None or self.needs_loss):
            return loss_step(self, params, gradients, state, loss)  # (back with WRITTEN)
        if (n := self.max_consecutive_skips) is not None and state.consecutive_skips >= n \
                and self.nonfinite == "skip":  # (_give_up's "propagate": no recursion)
            return self._give_up(params, gradients, state, n)
        if getattr(state, "fast", None) is not None and not self._pre_clipping():
            # a loop's steady state (fast_step.py); it reads the gradients as given
            try:
                got = state.engine.fast_step(self, state, params, gradients)
                if got is not None and state.pending is not None:  # (a two-pass step's)
                    if getattr(state.pending, "nonfinite", None):  # inf/NaN tensor slots, values
                        got = (*got[:2], nonfinite_report(got[2]), False)
                    state.pending()
            finally:
                state.pending = None
            if got is not None:
                return self._record(state, state.step + 1, *got)
        bound = self._backend
        gradients = _without_none(gradients)
        try:
            self._bind(params)
            prepared, ours = check_update(self, params, gradients, state)
        except BaseException:
            self._backend = bound  # a refused call keeps nothing, an inferred backend included
            raise
        if self._pre_clipping() and (pre := self._pre_clip(
                gradients, state, state.engine.fuses_normalize(self, state))) is not None:
            gradients, prepared = pre, None  # (the engine locates the new arrays)
        if any(getattr(v, "adaptive_clip", None) is not None
               for v in self.group_rows(state)[1]) and not state.engine.fuses_adaptive_clip(
                   self, state):
            gradients = self._adaptive_clip(params, gradients, state)
            prepared = None  # the engine locates the clipped copies
        t = state.step + 1
        state.pending = None
        try:
            new_params, ok, norm, finite = state.engine.step(self, state, params, gradients, t,
                                                             prepared, ours)
            if ok and state.pending is not None:  # tensor slots and values of a two-pass step
                if getattr(state.pending, "nonfinite", None):  # inf/NaN ones: reported
                    finite, norm = False, nonfinite_report(norm)
                state.pending()
        except NonfiniteState as e:  # (before any write) non-finite gradients, or results
            norm = host_norm(gradients, state.engine.to_numpy)
            if not must_skip(self, norm, gradients, state.engine.to_numpy) and is_finite(norm) \
                    and self.nonfinite == "raise":
                raise nonfinite_result_error(self, e.names) from None
            return self._record(state, t, dict(params), False, norm, True)
        finally:
            state.pending = None
        return self._record(state, t, new_params, ok, norm, finite)

    def adopt(self, params: MutableMapping[str, Any], state: OptimizerState) -> dict[str, Any]:
        """Hand ``params`` over to the optimizer: the opt-in exception to the ownership rule,
        for callers that will not use their arrays again (returns the arrays to use instead).

        On NumPy and torch-CPU (float32/float64) each parameter is moved into the state's
        flat buffer in turn and its entry in ``params`` (a dict, changed in place) replaced
        by its view there, so that the original is freed (if nothing else refers to it)
        before the next is copied: the first ``update`` then copies nothing, and the
        parameters are never held twice (Adam's peak beyond params + gradients: 8 B/param,
        12 without). Values are bit for bit those of the plain path. Elsewhere (JAX, GPU,
        float16) nothing moves and ``dict(params)`` is returned: the first update copies as
        usual. See docs/optimizers.md, "Memory"."""
        if not isinstance(params, MutableMapping):
            raise TypeError(f"adopt needs the dict of arrays it may empty, got "
                            f"{type(params).__name__}")
        bound = self._backend
        try:
            self._bind(params)
            check_update(self, params, {}, state)  # the params against the state, no gradients
        except BaseException:
            self._backend = bound
            raise
        eng = state.engine
        if getattr(eng, "adopt_params", None) is None or eng.kind not in ("numpy", "torch"):
            return dict(params)
        return eng.adopt_params(state, params)

    def _pre_clipping(self) -> bool:
        """Whether ``centralize`` or ``normalize_grad`` may be set for some tensor (a cheap
        look at the options, before the groups are resolved)."""
        return bool(getattr(self, "centralize", False) or getattr(self, "normalize_grad", None)
                    is not None or any(g.get("centralize") or g.get("normalize_grad") is not None
                                       for g in self.__dict__.get("_groups", ())))

    def _pre_clip(self, gradients: Mapping[str, Any], state: OptimizerState,
                  fused: bool = False) -> dict[str, Any] | None:
        """The gradients centralized and normalized (:func:`.clipping.pre_clip`), each tensor
        by its group's ``centralize`` / ``normalize_grad`` / ``normalize_eps`` (new arrays,
        before any clip: optax's ``chain(centralize(), normalize..., clip..., opt)``); None
        where no tensor takes either. ``fused``: the step normalizes them itself (the numba
        engine: :func:`.engines.common.clipped_table`), only centralize here."""
        from .clipping import pre_clip

        index, views = self.group_rows(state)
        spec = [(bool(getattr(v, "centralize", False)),
                 None if fused else getattr(v, "normalize_grad", None),
                 getattr(v, "normalize_eps", 1e-6)) for v in views]
        if not any(c or s is not None for c, s, _ in spec):
            return None
        where = state.layout.index
        specs = {n: spec[index[where[n]]] for n in gradients}
        wide = {n: g for n, g in gradients.items() if specs[n][0] and len(g.shape) > 1}
        done = state.engine.centralized(wide) if wide else None
        if done is not None:  # (in the engine's own buffer: no new arrays)
            gradients = {**gradients, **done}
            specs = {n: (False, s, e) if n in done else (c, s, e)
                     for n, (c, s, e) in specs.items()}
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # inf/NaN: the policies' to find
            return pre_clip(gradients, specs)

    def _adaptive_clip(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                       state: OptimizerState) -> dict[str, Any]:
        """Gradients clipped unit-wise against their parameters, each tensor with its
        group's ``adaptive_clip`` (new arrays; none for a group that turns it off)."""
        from .clipping import adaptive_clip

        index, views = self.group_rows(state)
        lay, out = state.layout, dict(gradients)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            for name, g in gradients.items():
                v = views[index[lay.index[name]]]
                if v.adaptive_clip is not None:
                    p = params[name]
                    try:
                        out[name] = adaptive_clip(g, p.detach() if hasattr(p, "detach") else p,
                                                  v.adaptive_clip, v.adaptive_clip_eps)
                    except ValueError as e:
                        raise ValueError(f"adaptive_clip: parameter '{name}': {e}") from None
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
