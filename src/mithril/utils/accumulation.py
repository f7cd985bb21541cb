"""Gradient accumulation: one optimizer step over several micro-batches.

With a mean-reduced loss, the gradient of the whole batch is the mean of the micro-batch
gradients when the micro-batches have equal sizes (and the size-weighted mean otherwise), so
accumulating ``k`` micro-batches and stepping once gives the same update as one step on the
concatenated batch, with the memory of one micro-batch.

Two ways to use it:

* :class:`GradientAccumulator`, a buffer you drive yourself::

      acc = GradientAccumulator()
      for micro in split(batch, 4):
          _, grads = model.evaluate(params, micro, output_gradients={"loss": 1.0})
          acc.add(grads)                      # or acc.add(grads, weight=len(micro))
      params, state = optimizer.update(params, acc.mean(), state)
      acc.reset()

* :class:`Accumulate`, an optimizer wrapper: ``update`` buffers the gradients and only every
  ``k``-th call steps the wrapped optimizer with their mean (in between it returns ``params``
  unchanged). It follows the optimizer contract (``init``/``update``, learning-rate methods
  for schedulers), so it can be used wherever an optimizer is expected; call
  ``scheduler.step()`` only when ``state.applied`` is true and ``state.last_step_skipped``
  false (a wrapped optimizer with ``nonfinite="skip"`` may skip the window's step): torch's
  and ``optax.MultiSteps``' count. Keras with ``gradient_accumulation_steps`` counts every
  call instead (step the scheduler after each ``update`` to reproduce it; see the optimizers
  guide).
  ``state.windows`` counts the windows emitted (``MultiSteps``' ``gradient_step``, skipped
  steps included; what a callable ``k`` reads), ``state.step`` the applied ones. The wrapped
  optimizer's state readers (``ema_params``, ``swa_params``, ``swap_ema``, ``slow_params``,
  ``eval_params``) are on the wrapper too, and take its state; ``state_dict`` /
  ``load_state_dict`` save and restore a run mid-window in memory
  (:mod:`mithril.utils.accumulate_state_dict`). ``should_skip_update_fn`` skips single
  micro-batches (a NaN one, say) as ``MultiSteps``' does (:mod:`mithril.utils.accumulate_skip`).

The buffers are sums on the gradients' device (in place on NumPy and torch), in the
gradients' dtype, but in float32 for float16 / bfloat16 gradients (as ``optax.MultiSteps``'
default ``accumulator_dtype``): a half-precision sum of ``k`` micro-batches would overflow
float16 (65504) where their mean does not, and round at each add. ``mean()`` multiplies by
``1/Σw`` once and gives the gradients' dtype back.

Every gradient is checked before anything is written, so a call that raises changes nothing:
the first ``add`` takes floating-point NumPy, torch or JAX arrays, all of one kind; every
later one must give, key by key, an array of the same kind with exactly the buffer's shape
(no broadcasting: :class:`~mithril.errors.ShapeError`), exactly its dtype (no silent
rounding or promotion: :class:`~mithril.errors.DTypeError`) and, on torch, its device.
:meth:`Accumulate.update` empties the buffer only once the wrapped optimizer has stepped: if
that step raises, the buffer is as it was before the call (the last micro-batch included).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from .accumulate_skip import ShouldSkipUpdateFn, ask
from .gradient_accumulator import _KINDS, GradientAccumulator, _kind
from .optimizers.checks import check_int, describe
from .optimizers.loss_aware import wrapped_loss

__all__ = ["Accumulate", "AccumulateState", "GradientAccumulator"]

def _wrapped_hyper(inner: Any, name: str) -> bool:
    """Whether ``name`` is a hyperparameter of the wrapped optimizer ``inner``, a wrapper's
    wrapped one's included (a Lookahead's inner ``beta1``, a SAM's base's: their
    ``flat_hyperparameters``; ``hyperparameters`` alone names only the wrapper's own)."""
    for method in ("flat_hyperparameters", "hyperparameters"):
        fn = getattr(inner, method, None)
        if callable(fn):
            return name in fn()
    return False


def _check_against_params(gradients: Mapping[str, Any], params: Mapping[str, Any],
                          optimizer: Any = None) -> None:
    """Every gradient names a parameter and has its shape (caught on the micro-batch that
    brings it, not ``k`` calls later in the wrapped optimizer). For a wrapped mithril
    :class:`~.optimizers.Optimizer` also its array library and dtype, which its ``update``
    requires: a float32 micro-batch for float64 params used to be buffered, and the window
    then refused on its ``k``-th call, and every later call (the buffer's dtype), for good."""
    from .optimizers.base import Optimizer

    unknown = sorted(str(k) for k in gradients if k not in params)
    if unknown:
        raise KeyMismatchError(f"gradients for unknown parameter(s) {unknown} "
                               f"(params: {sorted(map(str, params))})")
    strict = isinstance(optimizer, Optimizer)
    for k, g in gradients.items():
        p_shape, g_shape = getattr(params[k], "shape", None), getattr(g, "shape", None)
        if p_shape is not None and g_shape is not None and tuple(p_shape) != tuple(g_shape):
            raise ShapeError(f"gradients['{k}'] has shape {tuple(g_shape)}, params['{k}'] has "
                             f"shape {tuple(p_shape)}")
        kind, want = _kind(g), _kind(params[k])
        if not strict or kind is None or want is None:
            continue
        if kind != want:
            raise TypeError(f"gradients['{k}'] is {_KINDS[kind]}, params['{k}'] "
                            f"{_KINDS[want]}: the wrapped {type(optimizer).__name__} steps "
                            f"with gradients of the parameters' library")
        if g.dtype != params[k].dtype:
            raise DTypeError(f"gradients['{k}'] has dtype {g.dtype}, params['{k}'] has dtype "
                             f"{params[k].dtype}: the wrapped {type(optimizer).__name__} steps "
                             f"with gradients of the parameters' dtype")


class AccumulateState:
    """State of :class:`Accumulate`: the wrapped optimizer's state and the gradient buffer.

    ``applied`` tells whether the last ``update`` stepped the wrapped optimizer;
    ``micro_step`` counts micro-batches since the last step; ``step``, ``num_skipped``,
    ``last_grad_norm`` and ``last_step_skipped`` (a non-finite step refused by the wrapped
    optimizer) mirror the wrapped state; ``last_step_skipped`` is False and
    ``last_grad_norm`` None on calls that only accumulated.

    Two counts of windows: ``windows`` counts the windows emitted (every ``k``-th call that
    ran the wrapped optimizer's update, whether or not that optimizer skipped a non-finite
    step: ``optax.MultiSteps``' ``gradient_step``), and ``step`` the steps the wrapped
    optimizer applied (its own count, what its schedules read: the count of
    ``optax.apply_if_finite``'s inner transformation, torch's ``scheduler.step()`` calls
    when stepped only after applied steps). They differ only after skipped steps. A callable
    ``k`` (an every-``k`` schedule) reads ``windows``, as ``MultiSteps`` reads
    ``gradient_step``.

    With a ``should_skip_update_fn``, ``num_skipped_micro_batches`` counts the micro-batches
    it skipped and ``skip_state`` is what it returned on the last call (``MultiSteps``'
    ``skip_state``); a call that skipped its micro-batch leaves ``applied`` False and
    ``last_step_skipped`` True (as a micro-batch that
    :class:`~mithril.utils.mixed_precision.MixedPrecisionTrainer` drops for overflowing).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.accumulator = GradientAccumulator()
        self.applied = False
        self.last_step_skipped = False
        self.windows = 0
        #: micro-batches a ``should_skip_update_fn`` skipped (never buffered), in all
        self.num_skipped_micro_batches = 0
        #: the ``skip_state`` its last call gave (``MultiSteps``' ``skip_state``; None before)
        self.skip_state: Any = None

    @property
    def micro_step(self) -> int:
        return self.accumulator.count

    @property
    def step(self) -> int:
        return getattr(self.inner, "step", 0)

    @property
    def num_skipped(self) -> int:
        return getattr(self.inner, "num_skipped", 0)

    @property
    def last_grad_norm(self) -> Any:
        """The wrapped state's ``last_grad_norm`` (the global norm of the window's mean
        gradient, what torch's ``clip_grad_norm_`` returns before the window's step) after a
        call that stepped it; None after one that only buffered."""
        return getattr(self.inner, "last_grad_norm", None) if self.applied else None

    def __repr__(self) -> str:
        return (f"AccumulateState(micro_step={self.micro_step}, windows={self.windows}, "
                f"num_skipped_micro_batches={self.num_skipped_micro_batches}, "
                f"inner={self.inner!r})")


class Accumulate:
    """Wrap ``optimizer`` so that it steps once every ``k`` calls with the mean gradient.

    ``update(params, gradients, state, weight=1.0)`` adds ``gradients`` (weighted) to the
    buffer; on the ``k``-th call it runs ``optimizer.update(params, mean, inner_state)`` and
    clears the buffer, otherwise ``params`` come back unchanged (``state.applied`` is False).
    Learning-rate methods are forwarded, so schedulers work on the wrapper (step them only when
    ``state.applied`` and not ``state.last_step_skipped``).

    ``k`` is an integer >= 1 (``TypeError`` for a float, string or bool, ``ValueError`` below
    1 or above int64), or a callable of the windows emitted so far (``state.windows``)
    giving that integer: ``optax.MultiSteps``' ``every_k_schedule``, which reads its
    ``gradient_step`` (windows emitted, skipped steps included), not the wrapped
    optimizer's count (``state.step``, which a skipped step does not advance); it is called
    once per ``update``, constant within a window. An ``update`` that raises changes nothing: the gradients are checked
    (as :meth:`GradientAccumulator.add`, and against ``params``' keys and shapes) before they
    are added, and on the ``k``-th call the mean is formed in new arrays and the buffer
    emptied only after the wrapped optimizer has stepped.

    ``should_skip_update_fn`` (``MultiSteps``' argument; None: buffer every micro-batch) is
    asked ``fn(gradients, state.windows, params) -> (should_skip, skip_state)`` about each
    checked micro-batch; one it skips is not buffered nor counted toward ``k``, and nothing
    changes but ``state.skip_state`` and ``state.num_skipped_micro_batches``
    (:mod:`mithril.utils.accumulate_skip`: ``skip_not_finite``, ``skip_large_updates``, on
    every backend). ``use_grad_mean=False`` (``MultiSteps``' argument) steps with the sum
    Σ wᵢ·gᵢ instead of the mean (a torch loop calling ``loss.backward()`` on each
    micro-batch without dividing the loss by ``k``).

    A loss-aware optimizer (``needs_loss``: PolyakSGD, Momo, MomoAdam) takes
    ``update(..., loss=f)`` on every call, ``f`` that micro-batch's loss (checked as the
    optimizer checks it, before anything is buffered); the window's step gets the loss of
    its last call, as ``optax.MultiSteps`` passes the applying call's ``value=`` (not a
    mean: give the window's mean loss on its last call for that). SAM takes ``closure=f``
    on the window's last call (others ignore it): its step starts from the window's mean
    and asks ``f`` for the gradient at the perturbed point (``MultiSteps(contrib.sam(...,
    opaque_mode=True), k)`` with ``grad_fn=``; ``f`` may accumulate it over the window).

    Unlike ``optax.MultiSteps`` (else equal, to 1e-16 in float64 with its
    ``accumulator_dtype=jnp.float64``), the buffers keep the gradients' dtype (its default
    float32 rounds float64 gradients), and a window is emptied after its step: its
    ``0·acc`` keeps a NaN micro-batch for good, so around ``apply_if_finite(opt, N)`` every
    later window is skipped, then a NaN step applied; ``Accumulate(opt(nonfinite="skip",
    max_consecutive_skips=N), k)`` skips that one window and goes on.
    """

    def __init__(self, optimizer: Any, k: int,
                 should_skip_update_fn: ShouldSkipUpdateFn | None = None,
                 use_grad_mean: bool = True) -> None:
        self.k = k
        self.should_skip_update_fn = should_skip_update_fn
        self.use_grad_mean = use_grad_mean
        self.optimizer = optimizer

    def __setattr__(self, name: str, value: Any) -> None:
        """``k`` is checked whenever it is set (from the next call on, a step every ``k``);
        a wrapped optimizer's hyperparameter set on the wrapper (``acc.beta1 = 0.5``) would
        change no step: refused, naming where it goes."""
        if name == "k":
            value = value if callable(value) else check_int("k", value, minimum=1)
        elif name == "should_skip_update_fn" and value is not None and not callable(value):
            raise TypeError(f"should_skip_update_fn must be callable (as optax."
                            f"skip_not_finite) or None, got {describe(value)}")
        elif name == "use_grad_mean":
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"use_grad_mean must be a bool, got {describe(value)}")
            value = bool(value)
        elif "optimizer" in self.__dict__ and name not in self.__dict__ and \
                not hasattr(type(self), name):
            inner = self.optimizer
            if name == "lr" or _wrapped_hyper(inner, name):
                raise AttributeError(
                    f"Accumulate has no attribute {name!r}: setting it would change no step; "
                    f"it is the wrapped {type(inner).__name__}'s (acc.optimizer.{name} = ...; "
                    f"the learning rate: acc.set_learning_rate(lr))")
        object.__setattr__(self, name, value)

    def init(self, params: Mapping[str, Any]) -> AccumulateState:
        return AccumulateState(self.optimizer.init(params))

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
               state: AccumulateState, weight: float = 1.0, *, loss: Any = None,
               **extra: Any) -> tuple[Any, AccumulateState]:
        """Buffer ``weight·gradients``; on every ``k``-th call step the wrapped optimizer with
        the mean (the sum with ``use_grad_mean=False``) and, for a loss-aware optimizer, this
        call's ``loss``; for one whose update takes ``closure=`` (SAM), this call's
        ``closure=`` (the only keyword ``extra`` takes: out of the signature, where a
        ``closure`` parameter marks an optimizer that evaluates the loss itself, LBFGS, for
        ``make_train_step`` and ``torch_optimizer``). Returns ``(params, state)``; if it
        raises, nothing changed."""
        if not isinstance(state, AccumulateState):
            raise TypeError(f"state must come from Accumulate.init, got {type(state).__name__}")
        unknown = sorted(set(extra) - {"closure"})
        if unknown:
            raise TypeError(f"Accumulate.update got unexpected keyword argument(s) {unknown}")
        step_loss = wrapped_loss("Accumulate.update", self.optimizer, loss)
        step_loss.update(self._closure(extra.get("closure")))
        acc = state.accumulator
        k = self.k_for(state)
        if isinstance(gradients, Mapping) and isinstance(params, Mapping):
            _check_against_params(gradients, params, self.optimizer)
            if not gradients and params and acc.count == 0 and k > 1:
                # (the first micro-batch's keys are the window's: {} refused every later one,
                # and the state could not be saved)
                raise ValueError(f"Accumulate.update: gradients is empty on the window's first "
                                 f"micro-batch (params: {sorted(map(str, params))}); its keys "
                                 f"are the window's, every later micro-batch must bring them")
        fn, info = self.should_skip_update_fn, state.skip_state
        if fn is not None:
            acc._check(gradients, weight)  # (a bad micro-batch raises, is not skipped)
            skip, info = ask(fn, gradients, state.windows, params)
            if skip:
                state.num_skipped_micro_batches += 1
                state.skip_state, state.applied, state.last_step_skipped = info, False, True
                return params, state
        if acc.count + 1 < k:
            acc.add(gradients, weight)
            state.applied = False
            state.last_step_skipped = False
            state.skip_state = info
            return params, state
        if "closure" not in step_loss and self._needs_closure():
            raise TypeError(f"Accumulate.update: the wrapped {type(self.optimizer).__name__} "
                            f"needs closure= on the window's last call (call {k} of {k}): "
                            f"the gradient at the point it evaluates")
        # (checks; the buffer stays as it is)
        mean = acc._mean_with(gradients, weight, mean=self.use_grad_mean)
        params, inner = self.optimizer.update(params, mean, state.inner, **step_loss)
        state.inner = inner
        acc.reset()
        state.windows += 1
        state.applied = True
        state.last_step_skipped = bool(getattr(inner, "last_step_skipped", False))
        state.skip_state = info
        return params, state

    def _closure(self, closure: Any) -> dict[str, Any]:
        """``{"closure": closure}`` for a wrapped optimizer whose update takes one (SAM: its
        gradient at the perturbed point), ``{}`` where none is given; a closure given to one
        that takes none, or one not callable, is refused (naming it)."""
        if closure is None:
            return {}
        name = type(self.optimizer).__name__
        if not self._needs_closure():
            raise TypeError(f"Accumulate.update: the wrapped {name}'s update takes no "
                            f"closure= (only an optimizer that evaluates gradients itself, "
                            f"SAM, does)")
        if not callable(closure):
            raise TypeError(f"Accumulate.update: closure must be callable, got "
                            f"{describe(closure)}")
        return {"closure": closure}

    def _needs_closure(self) -> bool:
        return "closure" in inspect.signature(self.optimizer.update).parameters

    @property
    def needs_loss(self) -> bool:
        """The wrapped optimizer's: whether ``update`` takes ``loss=``."""
        return bool(getattr(self.optimizer, "needs_loss", False))

    def k_for(self, state: AccumulateState) -> int:
        """The micro-batches in ``state``'s current window: ``k``, or ``k(state.windows)``
        for a callable ``k`` (checked as an integer >= 1, naming it)."""
        k = self.k
        if not callable(k):
            return k
        v = k(state.windows)
        if not isinstance(v, (bool, np.bool_)) and hasattr(v, "__index__") and \
                not isinstance(v, (int, np.integer)):
            v = operator.index(v)  # (a 0-d integer array: what a jnp.where schedule gives)
        return check_int(f"k(windows={state.windows})", v, minimum=1)

    # -- state dicts (in memory; see :mod:`mithril.utils.accumulate_state_dict`) ------------
    def state_dict(self, state: AccumulateState | None = None, *, arrays: str = "numpy"
                   ) -> dict[str, Any]:
        """``k`` and the wrapped optimizer's state dict (``"inner"``) and, given ``state``,
        the window: windows emitted, micro-batches buffered, their total weight and the
        buffered gradient sums. Plain Python values and arrays, as the optimizers' own
        ``state_dict``: ``arrays="numpy"`` (NumPy) or ``"torch"`` (CPU tensors, the
        wrapped optimizer's too: ``torch.save`` then ``torch.load(weights_only=True)``
        with no allowed globals). :meth:`load_state_dict` takes either."""
        from .accumulate_state_dict import state_dict

        return state_dict(self, state, arrays=arrays)

    def load_state_dict(self, d: Mapping[str, Any], params: Mapping[str, Any] | None = None
                        ) -> AccumulateState | None:
        """Restore ``k`` and the wrapped optimizer; given ``params``, return the state with
        the saved window (the run goes on as if never stopped). Checked first: a call that
        raises changes nothing."""
        from .accumulate_state_dict import load_state_dict

        return load_state_dict(self, d, params)

    # -- the wrapped optimizer's state readers, on the accumulated state ------------------
    def _reader(self, name: str) -> Any:
        fn = getattr(self.optimizer, name, None)
        if not callable(fn):
            raise AttributeError(f"Accumulate.{name}: the wrapped {type(self.optimizer).__name__}"
                                 f" has no {name}")
        return fn

    @staticmethod
    def _inner(state: Any, name: str) -> Any:
        if not isinstance(state, AccumulateState):
            raise TypeError(f"{name}: state must come from Accumulate.init/update (an "
                            f"AccumulateState), got {type(state).__name__}")
        return state.inner

    def ema_params(self, state: AccumulateState) -> dict[str, Any]:
        """The wrapped optimizer's ``ema_params`` of ``state.inner`` (the EMA moves once per
        applied window, as torch's ``AveragedModel`` updated after each ``opt.step()``)."""
        return self._reader("ema_params")(self._inner(state, "ema_params"))

    def swa_params(self, state: AccumulateState) -> dict[str, Any]:
        """The wrapped optimizer's ``swa_params`` of ``state.inner``."""
        return self._reader("swa_params")(self._inner(state, "swa_params"))

    def swap_ema(self, params: Mapping[str, Any], state: AccumulateState,
                 average: str | None = None) -> dict[str, Any]:
        """The wrapped optimizer's ``swap_ema`` on ``state.inner`` (the buffered window is
        untouched: gradients are of the training parameters, so swap back before the next
        ``update``)."""
        return self._reader("swap_ema")(params, self._inner(state, "swap_ema"), average)

    def slow_params(self, state: AccumulateState) -> dict[str, Any]:
        """The wrapped ``Lookahead``'s ``slow_params`` of ``state.inner``."""
        return self._reader("slow_params")(self._inner(state, "slow_params"))

    def eval_params(self, state: AccumulateState, params: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
        """The wrapped schedule-free optimizer's ``eval_params`` of ``state.inner`` (optax's
        ``schedule_free_eval_params``)."""
        return self._reader("eval_params")(self._inner(state, "eval_params"), params)

    def hessian_due(self, state: AccumulateState) -> bool:
        """Whether the next :meth:`update` ends a window whose step folds an estimate into
        the wrapped Sophia's ν (its ``hessian_due`` on ``state.inner``): measure it at the
        params given to that call, as ``optax.MultiSteps(sophia)`` runs sophia's
        ``hessian_diagonal_fn`` on the window's last call."""
        due = self._reader("hessian_due")
        inner = self._inner(state, "hessian_due")
        return state.accumulator.count + 1 >= self.k_for(state) and bool(due(inner))

    def update_hessian(self, state: AccumulateState, estimate: Mapping[str, Any]
                       ) -> AccumulateState:
        """The wrapped optimizer's ``update_hessian`` on ``state.inner``, after the call that
        ended a window :meth:`hessian_due` named (checked there; a call that only buffered
        is refused here). Returns ``state``; a refused call changes nothing."""
        fold = self._reader("update_hessian")
        inner = self._inner(state, "update_hessian")
        if not state.applied:
            raise ValueError(f"Accumulate.update_hessian: the last update only buffered its "
                             f"micro-batch ({state.micro_step} of {self.k_for(state)} in "
                             f"the window): fold the estimate in after the window's last call")
        state.inner = fold(inner, estimate)
        return state

    def win_rate(self, state: AccumulateState) -> float:
        """The wrapped Sophia's ``win_rate`` of ``state.inner``."""
        return self._reader("win_rate")(self._inner(state, "win_rate"))

    def exclude_from_weight_decay(self, *args: Any, **kwargs: Any) -> None:
        """The wrapped optimizer's ``exclude_from_weight_decay`` (Keras calls it on the
        optimizer that accumulates)."""
        self._reader("exclude_from_weight_decay")(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """A wrapped optimizer's hyperparameter, read (``acc.beta1``; set it on
        ``acc.optimizer``)."""
        inner = self.__dict__.get("optimizer")
        if name[:1] != "_" and _wrapped_hyper(inner, name):
            return getattr(inner, name)
        raise AttributeError(f"Accumulate has no attribute {name!r}")

    # learning rate (for schedulers)
    def get_learning_rate(self) -> float:
        return self.optimizer.get_learning_rate()

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.get_learning_rate()

    @learning_rate.setter
    def learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def __repr__(self) -> str:
        skip = self.should_skip_update_fn
        return f"Accumulate({self.optimizer!r}, k={self.k}" + (
            f", should_skip_update_fn={getattr(skip, '__name__', skip)!r}" if skip else "") + (
            "" if self.use_grad_mean else ", use_grad_mean=False") + ")"
