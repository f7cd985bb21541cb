"""Mixed precision training: float32 master weights, half-precision compute, loss scaling.

:class:`MixedPrecisionTrainer` wraps a model compiled for a half-precision backend
(``TorchBackend(dtype="float16")`` / ``"bfloat16"``, ``JaxBackend(dtype="bfloat16")``,
``NumpyBackend(dtype="float16")``) and a mithril optimizer::

    trainer = MixedPrecisionTrainer(compiled_model, optimizer, params, optimizer_state)
    for batch in batches:
        outputs = trainer.forward(inputs)                       # half precision
        loss_gradients = {"loss": 1.0}                          # or e.g. {"output": 2 * (out - y)}
        params, optimizer_state, success = trainer.backward_and_update(loss_gradients)
        trainer.step_scheduler(scheduler)                       # only after a real update

What happens in one step:

1. **Master weights.** The trainer keeps float32 *master* copies of the parameters
   (:attr:`MixedPrecisionTrainer.master_params`, converted from the ``params`` you give it;
   float64 if the model itself computes in float64). The optimizer only ever sees the masters
   and float32 gradients.
2. **Compute copies.** Before a forward pass the masters are cast to the backend's dtype
   (:meth:`MixedPrecisionTrainer.compute_params`; cached until the masters change), and
   :meth:`~MixedPrecisionTrainer.forward` evaluates the model on them, keeping what the
   backward pass needs (the autograd graph on torch, the VJP residuals on JAX, every wire's
   value on NumPy), so the backward pass does not recompute the forward.
3. **Loss scaling.** :meth:`~MixedPrecisionTrainer.backward_and_update` multiplies the loss
   gradients by the current scale (in float32, or in the compute dtype where it is wider:
   float64, as ``GradScaler.scale``; then cast to the compute dtype), runs the model's VJP in
   half precision, casts the parameter gradients to float32 and multiplies them by
   ``1/scale`` rounded to float32 (GradScaler's ``inv_scale``). Casts stay on the device: ``Tensor.to`` on torch, ``astype`` inside one
   ``jax.jit`` on JAX (scaling, VJP, unscaling and the finiteness check are one jitted call).
4. **Skip on overflow.** If any unscaled gradient holds inf/NaN the step is skipped: masters,
   compute copies and optimizer state (slots and step count) are unchanged and ``success`` is
   ``False``. Only the bookkeeping of a built-in :class:`~mithril.utils.optimizers.OptimizerState`
   changes, as when the optimizer skips a step itself: ``state.last_step_skipped = True``,
   ``state.num_skipped += 1`` and ``state.last_grad_norm`` is the skipped gradients' global
   norm (inf or NaN: what torch's ``clip_grad_norm_`` returns after ``unscale_``). Otherwise
   the optimizer updates the masters. Parameters that none of the outputs given loss
   gradients reaches (another head's) are left out of the update, as ``torch.optim`` skips
   a ``.grad`` None (:mod:`~mithril.utils.unreached_params`, as a ``TrainStep``; not with
   an ``Accumulate``, which gets zeros for them).
5. **Dynamic scale** (:class:`LossScaler`, ``torch.amp.GradScaler`` semantics): on inf/NaN the
   scale is multiplied by ``backoff_factor`` and the growth tracker reset; after
   ``growth_interval`` consecutive finite steps it is multiplied by ``growth_factor`` (only if the
   result is finite in float32). The scale is held in float32 as in torch; ``min_loss_scale``
   puts a floor under backoffs (jmp's ``min_loss_scale``; none by default, as torch). With
   ``dynamic_loss_scaling=False`` the scale stays fixed (non-finite steps are still skipped).
   Note that float16's largest value is 65504: with the default scale 2**16 a loss gradient of
   1.0 (``{"loss": 1.0}``) already overflows, so the first step is skipped and the scale
   settles at 2**15 (as with GradScaler when the loss itself is float16).

Several optimizers, one scale (torch's one ``GradScaler`` stepping two optimizers, e.g. a
GAN's generator and discriminator): give every trainer the same :class:`LossScaler`
(``trainer_b.scaler = trainer_a.scaler``), call ``backward_and_update(...,
update_scale=False)`` on each (it records its overflow on the scaler), then
``scaler.update()`` once per iteration (or let the iteration's last trainer update it as
usual: the overflows recorded count too). Each trainer skips only its own
overflowing step (as ``scaler.step(opt)`` skips only that optimizer), every backward pass
of the iteration uses the same scale, and the scale backs off, or its growth tracker
advances, once per iteration, as ``scaler.update()``.

Learning-rate schedules must not advance on skipped steps: call
:meth:`~MixedPrecisionTrainer.step_scheduler` (steps the scheduler only when the last update
succeeded) or test :attr:`~MixedPrecisionTrainer.last_step_skipped` yourself.

With an :class:`~mithril.utils.accumulation.Accumulate` as the optimizer each call is one
micro-batch: ``step_scheduler`` steps only on the calls that update the masters
(:attr:`~MixedPrecisionTrainer.last_step_applied`, ``state.applied``), an overflowing
micro-batch is dropped (not buffered; ``state.applied`` False) and the loss scale counts
micro-batches - Keras' ``LossScaleOptimizer`` over an optimizer with
``gradient_accumulation_steps``; torch's accumulation loop checks and updates the scale once
per optimizer step and skips the whole window.

bfloat16 has float32's exponent range, so it rarely needs loss scaling; the trainer still
keeps float32 masters for it (bfloat16 has only 8 mantissa bits: small updates would round
away on bfloat16 weights).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputValueError, KeyMismatchError, ShapeError
from .accumulation import Accumulate, AccumulateState
from .fixed_parts import FixedParts
from .gradient_accumulator import _check_weight
from .loss_scaler import LossScaler, refuse_peer_names
from .mixed_precision_engines import ENGINES, Engine
from .optimizers.base import Optimizer
from .optimizers.checks import check_flag, check_int, describe
from .optimizers.state import OptimizerState
from .unreached_params import unreached_params, update_reached

__all__ = ["LossScaler", "MixedPrecisionTrainer"]

_HALF = ("float16", "bfloat16")


def _float_dtypes(state: Any, seen: set[int] | None = None) -> set[str]:
    """Names of the float dtypes of the arrays inside an optimizer state (any structure)."""
    seen = set() if seen is None else seen
    if id(state) in seen:
        return set()
    seen.add(id(state))
    if isinstance(state, OptimizerState):
        return {state.layout.dtype}
    if hasattr(state, "dtype") and hasattr(state, "shape"):
        name = str(state.dtype).removeprefix("torch.")
        return {name} if name in ("float16", "bfloat16", "float32", "float64") else set()
    if isinstance(state, Mapping):
        items: Any = state.values()
    elif isinstance(state, (list, tuple)):
        items = state
    elif hasattr(state, "__dict__") and not callable(state):
        items = vars(state).values()
    else:
        return set()
    out: set[str] = set()
    for v in items:
        out |= _float_dtypes(v, seen)
    return out


class MixedPrecisionTrainer(FixedParts):
    """Train a half-precision compiled model with float32 master weights and loss scaling.

    Parameters
    ----------
    model:
        A :class:`~mithril.CompiledModel` whose backend computes in float16 or bfloat16 (any
        float dtype is accepted; with float32 this is plain training with loss scaling).
    optimizer:
        A mithril optimizer (or any object with ``init(params)`` / ``update(params, grads,
        state)``). It updates the float32 masters; a built-in optimizer's backend (or that of
        the one an ``Accumulate`` wraps) is re-bound to the float32 twin of the model's
        backend. With a ``mithril.distributed.DataParallel`` all ranks agree on the overflow flag (one all-reduce): all skip, and back off, alike.
    params:
        Initial parameters, any float dtype (typically ``model.get_parameters()``): copied and
        converted to float32 masters. They are not modified.
    optimizer_state:
        The state must be for the float32 masters. If it was initialised on half-precision
        params (as in the guide: ``optimizer.init(params)`` on the float16 model's params), it
        is re-initialised on the masters; a built-in ``OptimizerState`` that has already taken
        steps keeps its step count and slots (converted to float32), as does the wrapped state
        of an :class:`~mithril.utils.accumulation.Accumulate`'s, which also keeps the
        micro-batches it has buffered. Another state type holding half arrays is
        re-initialised from scratch. ``None`` means ``optimizer.init(masters)``.
        Read the state in use from :attr:`optimizer_state`.
    loss_scale, dynamic_loss_scaling, growth_factor, backoff_factor, growth_interval:
        See :class:`LossScaler` (``torch.amp.GradScaler`` defaults).
    min_loss_scale:
        :class:`LossScaler`'s ``min_scale``: backoffs stop there (jmp's ``min_loss_scale``,
        1.0 by default there; 0 here, torch's and Keras' no floor).

    :meth:`backward_and_update` returns ``(params, optimizer_state, success)`` where ``params``
    are the **float32 master parameters** (:attr:`master_params`); :meth:`compute_params`
    gives the half-precision copies the model runs on (what you pass to
    ``model.evaluate``). As with the optimizers' ownership rule, the returned masters may be
    views that the next update overwrites in place (NumPy/torch) or donates (JAX): copy them
    if you need a snapshot.
    """

    def __init__(self, model: Any, optimizer: Any, params: Mapping[str, Any],
                 optimizer_state: Any = None, loss_scale: float = 2.0**16,
                 dynamic_loss_scaling: bool = True, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 min_loss_scale: float = 0.0, **peer: Any) -> None:
        refuse_peer_names("MixedPrecisionTrainer", peer, {
            "initial_scale": "loss_scale", "init_scale": "loss_scale",
            "dynamic_growth_steps": "growth_interval", "dynamic": "dynamic_loss_scaling",
            "min_scale": "min_loss_scale"})
        backend = getattr(model, "backend", None)
        if backend is None or getattr(backend, "name", None) not in ENGINES:
            raise TypeError("model must be a CompiledModel on a NumPy, JAX or torch backend, "
                            f"got {type(model).__name__}")
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.compute_dtype: str = backend.dtype
        self.master_dtype: str = "float64" if backend.dtype == "float64" else "float32"
        #: the model's backend with the master dtype (same kind and device)
        self.master_backend = copy.copy(backend)
        self.master_backend.dtype = self.master_dtype
        self._engine: Engine = ENGINES[backend.name](model, self.compute_dtype, self.master_dtype)
        self.scaler = LossScaler._named(
            ("loss_scale", "growth_factor", "backoff_factor", "growth_interval",
             "dynamic_loss_scaling", "min_loss_scale"),
            loss_scale, growth_factor, backoff_factor, growth_interval, dynamic_loss_scaling,
            min_loss_scale)

        self._master = self._to_master(params)
        self._compute: dict[str, Any] | None = None
        #: DataParallel: the all-reduce of the overflow flag (and its wrapped optimizer)
        self._agree = getattr(optimizer, "all_finite", None)
        inner = optimizer.optimizer if self._agree is not None else optimizer
        if isinstance(inner, Accumulate):  # (its wrapped optimizer updates the masters)
            inner = inner.optimizer
        bound = inner.__dict__.get("_backend") if isinstance(inner, Optimizer) else None
        if isinstance(inner, Optimizer):
            inner.backend = self.master_backend
        try:
            self.optimizer_state = self._master_state(optimizer_state)
        except BaseException:  # a refused trainer leaves the caller's optimizer as it was
            if isinstance(inner, Optimizer):
                inner.backend = bound
            raise

        self.num_steps = 0            # backward_and_update calls
        self.num_skipped_steps = 0    # of which skipped (non-finite gradients)
        self.last_step_skipped = False
        #: whether the last :meth:`backward_and_update` updated the masters (False when it
        #: was skipped, and when an :class:`~mithril.utils.accumulation.Accumulate` only
        #: buffered the micro-batch)
        self.last_step_applied = False
        #: whether the last backward pass's unscaled gradients had an inf/NaN (the overflow
        #: the scale backs off on; torch's ``found_inf``), for one ``scaler.update`` after
        #: several trainers' ``backward_and_update(..., update_scale=False)``
        self.last_found_inf = False
        #: the unscaled float32 gradients of the last backward pass (e.g. for monitoring)
        self.last_gradients: dict[str, Any] | None = None
        self._out_shapes: dict[str, tuple] = {}
        self._unreached: dict[frozenset[str], frozenset[str]] = {}  # (per loss keys)
        self._made = True

    #: what the masters, the engine and the state were made for
    _FIXED = ("model", "optimizer", "compute_dtype", "master_dtype", "master_backend")
    _MAKER = "MixedPrecisionTrainer(model, optimizer, params, ...)"

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "scaler" and "_made" in self.__dict__ and not isinstance(value, LossScaler):
            raise TypeError(f"MixedPrecisionTrainer.scaler must be a LossScaler, got "
                            f"{type(value).__name__}")
        super().__setattr__(name, value)

    # -- conversions -----------------------------------------------------------------------
    def _to_master(self, params: Mapping[str, Any]) -> dict[str, Any]:
        b = self.model.backend
        native = {k: v if b.is_native(v) else b.array(v, self.master_dtype)
                  for k, v in params.items()}
        return self._engine.to_master(native)

    def _master_state(self, state: Any, opt: Any = None) -> Any:
        opt, masters = self.optimizer if opt is None else opt, self._master
        if state is None:
            return opt.init(masters)
        dtypes = _float_dtypes(state)
        if not dtypes or dtypes == {self.master_dtype}:
            return state
        if isinstance(state, OptimizerState) and isinstance(opt, Optimizer) \
                and (state.step or state.num_skipped):
            # carry step counts and slots over to the masters' dtype
            return opt.load_state_dict(opt.state_dict(state), masters)
        if isinstance(state, AccumulateState) and isinstance(opt, Accumulate):
            # the wrapped optimizer's state as a plain one's, and the micro-batches already
            # buffered (their sums in the masters' dtype): re-initialising dropped both
            new = AccumulateState(self._master_state(state.inner, opt.optimizer))
            new.windows = state.windows  # (a callable k reads it)
            new.num_skipped_micro_batches = state.num_skipped_micro_batches
            new.skip_state = state.skip_state
            old, acc = state.accumulator, new.accumulator
            if old.count:
                sums = self._engine.cast_tree(old.sum(), self._engine.mdt)
                acc._restore(sums, {k: v.dtype for k, v in sums.items()}, old.count,
                             old.total_weight)
            return new
        return opt.init(masters)

    # -- parameters ------------------------------------------------------------------------
    @property
    def master_params(self) -> dict[str, Any]:
        """The float32 master parameters (the ones the optimizer updates)."""
        return dict(self._master)

    def compute_params(self) -> dict[str, Any]:
        """Half-precision copies of the masters (what the model evaluates), cached until the
        next successful update."""
        if self._compute is None:
            self._compute = self._engine.cast_tree(self._master, self._engine.cdt)
        return dict(self._compute)

    @property
    def loss_scale(self) -> float:
        """The current loss scale."""
        return self.scaler.scale

    # -- training ----------------------------------------------------------------------------
    def _prepare_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Float inputs in another float dtype (e.g. float32 data) are cast to the compute dtype."""
        b, kinds = self.model.backend, self.model.program.input_kinds
        out = dict(inputs)
        for k, v in inputs.items():
            if kinds.get(k) == "float" and b.is_native(v) and v.dtype != self._engine.cdt:
                name = b.dtype_name(v)
                if name in ("float16", "bfloat16", "float32", "float64"):
                    out[k] = self._engine.cast_tree({k: v}, self._engine.cdt)[k]
        return out

    def forward(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Evaluate the model on the half-precision copies; keeps what the backward pass needs.

        Float inputs are cast to the compute dtype. Returns the outputs (compute dtype).
        """
        if not isinstance(inputs, Mapping):
            raise TypeError("forward(inputs): inputs must be a dict keyed by name")
        # a refused forward changes nothing: the previous forward stays (as torch keeps its
        # earlier graph), ready for backward_and_update, and the Dropout counter is restored;
        # the engine replaces what it keeps only once the new forward has run
        model = self.model
        if model.program.state_shapes:  # (the compiler's error would point at evaluate(state=))
            raise KeyMismatchError(
                f"MixedPrecisionTrainer: the model keeps state {sorted(model.program.state_shapes)}"
                " (running statistics), which the trainer does not carry between steps: compile "
                "it without (BatchNorm(..., track_running_stats=False), GroupNorm, LayerNorm)")
        params, ins = model._validate(self.compute_params(), self._prepare_inputs(inputs))
        random_step = getattr(model, "step", None)
        try:
            # the model's mode, seed and step (a training-mode call advances the step
            # counter, so each step draws new Dropout masks); a model with state (BatchNorm)
            # is refused
            run = model._run_context(None, None, None)
            try:
                out = self._engine.forward(params, ins, run)
            except InputValueError:  # refused by an operator's NumPy forward: the
                model._check_concrete(ins, every_value=True)  # compiler's checks name the key
                raise
        except BaseException:
            if random_step is not None:
                model.step = random_step
            raise
        self._out_shapes = {k: tuple(v.shape) for k, v in out.items()}
        self._out = out  # (a loss-aware optimizer steps with the objective's value)
        self._step_before_forward = random_step  # (restored if its update is refused)
        return out

    def _cotangents(self, loss_gradients: Mapping[str, Any], out_shapes: Mapping[str, Any]
                    ) -> dict[str, Any]:
        if not isinstance(loss_gradients, Mapping):
            raise TypeError("loss_gradients must be a dict keyed by output name")
        unknown = sorted(set(loss_gradients) - set(out_shapes))
        if unknown:
            raise KeyMismatchError(f"loss_gradients: unknown output(s) {unknown} "
                                   f"(outputs: {sorted(out_shapes)})")
        cots = {}
        for k, g in loss_gradients.items():
            if isinstance(g, (str, bytes)):
                raise TypeError(f"loss gradient '{k}' must be a number or an array, got "
                                f"{describe(g)}")
            try:
                c = self._engine.cotangent(g)
            except OverflowError:
                raise ValueError(f"loss gradient '{k}' is too large: got {describe(g)} (not "
                                 f"representable as a float)") from None
            except (TypeError, ValueError):
                raise TypeError(f"loss gradient '{k}' must be a number or an array of numbers, "
                                f"got {describe(g)}") from None
            if tuple(c.shape) != tuple(out_shapes[k]):
                raise ShapeError(f"loss gradient '{k}': expected shape {tuple(out_shapes[k])}, "
                                 f"got {tuple(c.shape)}")
            cots[k] = c
        return cots

    def backward_and_update(self, loss_gradients: Mapping[str, Any], *, weight: float = 1.0,
                            update_scale: bool = True) -> tuple[dict[str, Any], Any, bool]:
        """Scaled half-precision backward pass, unscale, finiteness check, optimizer step.

        ``loss_gradients`` maps output names to dLoss/dOutput (any float dtype, or a Python
        number for a scalar output such as a loss). Returns ``(master_params,
        optimizer_state, success)``; ``success`` is ``False`` when the step was skipped
        because a gradient was inf/NaN (the loss scale then backs off). A call that raises
        (bad loss gradients, an update the optimizer refuses) changes nothing: bad loss
        gradients keep the forward, for the call to be made again; a refused update spends it,
        as torch's backward frees its graph, and puts the Dropout counter back to where that
        forward found it, so that ``forward`` then this call again give an uninterrupted run's
        result.

        ``weight``: with an :class:`~mithril.utils.accumulation.Accumulate` as the optimizer,
        this micro-batch's weight in the window's mean (its row count, for a mean-reduced
        loss, when the micro-batches differ in size); any other optimizer takes only 1.

        ``update_scale``: ``False`` leaves the loss scale (and its growth tracker) as it is
        and records this step's overflow on the scaler (:meth:`LossScaler.record`), for one
        ``scaler.update()`` after several trainers sharing the scaler have stepped (module
        docs; :attr:`last_found_inf` says whether this one overflowed).
        """
        w = _check_weight(weight)
        update_scale = check_flag("backward_and_update(update_scale=...)", update_scale)
        if w != 1.0 and not isinstance(self.optimizer, Accumulate):
            raise TypeError(f"backward_and_update(weight={weight!r}): a micro-batch weight is "
                            f"for an Accumulate optimizer, not {type(self.optimizer).__name__}")
        eng = self._engine
        if eng._saved is None:
            raise RuntimeError("backward_and_update() needs a forward() first (one backward per "
                               "forward)")
        cots = self._cotangents(loss_gradients, self._out_shapes)
        kw: dict[str, Any] = {"weight": w} if isinstance(self.optimizer, Accumulate) else {}
        if getattr(self.optimizer, "needs_loss", False):  # (Momo, PolyakSGD: the value the
            # gradients are of, Σ cotangent·output, as make_train_step passes it)
            to_np = self.model.backend.to_numpy
            kw["loss"] = sum(float(np.sum(np.asarray(to_np(self._out[k]), np.float64)
                                          * np.asarray(to_np(c), np.float64)))
                             for k, c in cots.items())
        scale = self.scaler.scale
        # torch's backward frees the graph as it goes (retaining it would hold every
        # activation through the backward pass): a refused update spends the forward
        grads, finite = eng.backward(cots, scale)
        if self._agree is not None:  # data-parallel: skip (and back off) on every rank alike
            finite = self._agree(bool(finite))
        if finite:
            try:  # (the optimizer's own checks: it then changed nothing, nor has this)
                # (parameters no given output reaches are left out, as torch.optim skips a
                # .grad None: no decay, no momentum, their missed step counted; not with an
                # Accumulate, whose window sums the same parameters whatever each call gives)
                unreached = self._unreached.get(frozenset(cots))
                if unreached is None:
                    unreached = self._unreached[frozenset(cots)] = frozenset() if isinstance(
                        self.optimizer, Accumulate) else unreached_params(
                        self.model, tuple(cots), self.optimizer)
                master, state = update_reached(
                    self.optimizer, unreached, self._master, grads, self.optimizer_state,
                    **kw) if unreached else self.optimizer.update(
                    self._master, grads, self.optimizer_state, **kw)
            except BaseException:
                eng.clear()
                step = getattr(self, "_step_before_forward", None)
                if step is not None:
                    self.model.step = step
                raise
            self._master, self.optimizer_state = master, state
            if not (isinstance(state, AccumulateState) and not state.applied):
                self._compute = None  # (a buffered micro-batch leaves the masters: keep them)
            # the optimizer may still skip the step (nonfinite="skip")
            success = not getattr(state, "last_step_skipped", False)
            # an Accumulate that only buffered this micro-batch made no update
            applied = success and getattr(state, "applied", True) is not False
        else:
            success = applied = False
            st = getattr(self.optimizer_state, "local", self.optimizer_state)
            if isinstance(st, OptimizerState):
                st.last_step_skipped = True
                st.num_skipped += 1
                # (not the previous step's: a log of the norm shows the overflow, as torch's
                # clip_grad_norm_ returns inf/NaN for it)
                st.last_grad_norm = self._global_norm(grads)
            elif isinstance(st, AccumulateState):
                # the micro-batch is dropped (not buffered): the state must not still say
                # that the previous call's update was applied
                st.applied, st.last_step_skipped = False, True
        eng.clear()  # (one backward per forward)
        self.num_steps += 1
        self.last_gradients = grads
        self.last_found_inf = not finite
        if update_scale:
            self.scaler.update(found_inf=not finite)
        else:
            self.scaler.record(not finite)
        self.last_step_skipped = not success
        self.last_step_applied = applied
        if not success:
            self.num_skipped_steps += 1
        return dict(self._master), self.optimizer_state, success

    def _global_norm(self, grads: Mapping[str, Any]) -> float:
        """The L2 norm of all of ``grads`` together (float64 sums of squares: inf for an
        inf, NaN for a NaN, as torch's ``clip_grad_norm_``)."""
        to_np, total = self.model.backend.to_numpy, 0.0
        with np.errstate(all="ignore"):
            for g in grads.values():
                a = np.asarray(to_np(g), dtype=np.float64)
                total += float(np.sum(a * a))
        return math.sqrt(total) if total == total else math.nan

    def step_scheduler(self, scheduler: Any, *args: Any, **kwargs: Any) -> bool:
        """``scheduler.step(*args, **kwargs)`` only if the last :meth:`backward_and_update`
        updated the masters (:attr:`last_step_applied`); returns whether it stepped. Use it
        instead of ``scheduler.step()`` so that skipped (overflowing) steps, and the
        micro-batches an :class:`~mithril.utils.accumulation.Accumulate` only buffers, do not
        advance the learning-rate schedule (torch's accumulation loop steps it once per
        optimizer step)."""
        if not self.last_step_applied:
            return False
        scheduler.step(*args, **kwargs)
        return True

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Scaler and step counters (save the masters and optimizer state separately)."""
        return {"scaler": self.scaler.state_dict(), "num_steps": self.num_steps,
                "num_skipped_steps": self.num_skipped_steps}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (scaler and counters; the masters and the optimizer
        state are restored separately). Everything is checked before anything is written:
        ``TypeError`` / ``ValueError`` / :class:`~mithril.errors.KeyMismatchError` naming the
        key at fault, and nothing changed."""
        if not isinstance(d, Mapping):
            raise TypeError(f"state dict must be a dict, got {type(d).__name__}")
        missing = [k for k in ("scaler", "num_steps", "num_skipped_steps") if k not in d]
        if missing:
            raise KeyMismatchError(f"MixedPrecisionTrainer state dict is missing key(s) {missing}")
        scaler = LossScaler._parse_state(d["scaler"], "state dict 'scaler'")
        steps = check_int("state dict 'num_steps'", d["num_steps"], minimum=0)
        skipped = check_int("state dict 'num_skipped_steps'", d["num_skipped_steps"], minimum=0)
        if skipped > steps:
            raise ValueError(f"state dict 'num_skipped_steps' = {skipped} exceeds 'num_steps' "
                             f"= {steps}")
        self.scaler._set(scaler)
        self.num_steps, self.num_skipped_steps = steps, skipped

    def __repr__(self) -> str:
        return (f"MixedPrecisionTrainer(compute={self.compute_dtype}, master={self.master_dtype}, "
                f"loss_scale={self.loss_scale}, steps={self.num_steps}, "
                f"skipped={self.num_skipped_steps})")
