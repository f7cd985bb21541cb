"""A whole training step - forward, backward and the optimizer update - as one call.

::

    step = make_train_step(compiled, optimizer, loss="final_cost")
    opt_state = step.init(params)            # or optimizer.init(params)
    params, opt_state, outputs = step(params, opt_state, data)

``step(params, opt_state, data)`` equals ``outputs, grads = compiled.evaluate(params, data,
output_gradients={loss: 1.0})`` followed by ``params, opt_state = optimizer.update(params,
grads, opt_state)``, and follows the same ownership rule: it *consumes* ``params`` and
``opt_state``; always rebind to what it returns. With a model that keeps state
(BatchNorm), pass ``state=`` and get it back last: ``params, opt_state, outputs, state =
step(params, opt_state, data, state=state)``.

How each backend runs it:

* **NumPy, torch**: the compiled forward+VJP, then the optimizer's fused kernel, which
  reads every gradient where the backward pass left it (by address: no gather, no copy, no
  per-tensor Python call between the two; the params are views of the flat buffer the
  kernel writes). The model's checks of the params are skipped when they are the very
  arrays the previous step returned. Bit for bit the separate calls. Params the loss does
  not reach are left out of the update, as torch.optim skips a ``.grad`` None (see
  :mod:`~mithril.utils.unreached_params`; on JAX too, in the program: each parameter
  counts its own steps there, :mod:`~mithril.utils.train_step_states`).
* **JAX**, with the state of :meth:`TrainStep.init` (an
  :class:`~mithril.interop.OptaxState`): forward, backward and the update of any optimizer
  but LBFGS (groups, clipping, two-pass, tensorwise, weight averaging, Mechanize and
  ScheduleFree around any of them, SAM's second gradient:
  :mod:`~mithril.utils.train_step_sam`, DP-SGD's per-example gradients:
  :mod:`~mithril.utils.train_step_private`) are **one**
  ``jax.jit`` program (the optimizer's own math, through
  :func:`~mithril.interop.optax_transformation`), with the params and the optimizer state
  donated; the inputs are checked as ``evaluate`` checks them (shapes, dtypes and types once
  per data signature, value checks such as class indices in range once per JAX array, on
  host views, without waiting for the previous step; in a loop's steady state - the
  params and state the last step returned, JAX arrays of the shapes seen - the call is
  ~2 µs of Python around the program). It reads ``optimizer.learning_rate``
  on every call (schedules work, nothing recompiles). The other hyperparameters are
  watched by the count each optimizer keeps of its changes. A float one of an
  elementwise or two-pass optimizer or of one of its groups (``opt.beta1 = ...``, a
  momentum cycle, a scheduler driving ``weight_decay``, a group's learning rate) becomes
  an argument of the program at its first change (one rebuild; ``step.rebuilds`` counts
  them), passed as float32 pairs that keep its float64 value
  (:mod:`~mithril.interop.optax_hyperparams`): later changes compile nothing. Any other
  change (a flag, an integer, the groups' matching, a Lookahead's inner optimizer, a
  per-tensor optimizer's hyperparameter) builds and compiles the program anew at the next
  call (the eighth such rebuild warns: to make one every step, pass ``optimizer.init``'s
  state, below). With ``make_train_step(..., grad_norm=True)``,
  ``step.last_grad_norm`` is the global gradient norm of the last step (a 0-d array); by
  default it is not computed (one more reduction per tensor in the program, ~3% of a small
  MLP's step) and stays None. Equal to the separate calls to float32 rounding (~1e-7 relative: the
  per-step scalars are computed in float32 inside the program). With ``nonfinite="skip"``
  the program counts the skipped steps in the donated state (``hyperparams["num_skipped"]``;
  :meth:`TrainStep.to_optimizer_state`'s ``num_skipped``), and a later call warns of them
  once the device has the count (never waiting for it).
* **JAX with an** :class:`~mithril.utils.optimizers.state.OptimizerState` (what
  ``optimizer.init`` returns): the separate calls, unfused, so that every engine feature
  (``last_grad_norm``, ``nonfinite="raise"``, hyperparameters changed at every step
  without compiling anything) is there. :meth:`TrainStep.to_optimizer_state` /
  :meth:`TrainStep.from_optimizer_state` convert between the two states (e.g. to
  checkpoint with :mod:`mithril.utils.checkpoint`, or to resume a checkpoint in the fused
  step).
* **LBFGS** (any optimizer whose ``update`` takes ``closure=``), on every backend: one
  ``torch.optim.LBFGS.step(closure)`` (with ``convention="optax"``: one ``optax.lbfgs``
  iteration and its zoom line search), the closure being the model's loss and gradients on
  the step's ``data`` at the params L-BFGS asks for (up to ``max_eval`` evaluations a
  step); the outputs are those at the params given. :meth:`TrainStep.init` is
  ``optimizer.init`` there, JAX included (a line search of data-dependent length is not one
  program). SAM (its ``update`` takes ``closure=`` too) is the same on NumPy and torch
  (the closure gives the gradient at the perturbed point); on JAX its step is one program
  (:mod:`~mithril.utils.train_step_sam`) unless the model has context operators or the
  base needs the loss.
* **JAX with** ``nonfinite="raise"`` (a program cannot raise): the separate calls, as with
  an ``OptimizerState``; :meth:`TrainStep.init` is ``optimizer.init``. A wrapper of a whole
  base optimizer's update (Mechanize, ScheduleFree) is one program too
  (:mod:`~mithril.interop.optax_outer`: the base's transformation and the wrapper's math
  around it), its own hyperparameters baked in (a change builds the program anew), the
  base's learning rate read on every call.
* **DP-SGD** (an optimizer whose ``update`` takes per-example gradients,
  :class:`~mithril.utils.optimizers.DifferentiallyPrivate`), on NumPy and torch (and on
  JAX with an ``OptimizerState``):
  :func:`~mithril.utils.per_example.per_example_gradients` of the step's data, then one
  ``update``; :meth:`TrainStep.init` is ``optimizer.init`` there. On JAX it is one program
  (:mod:`~mithril.utils.train_step_private`: ``jax.vmap`` of the forward+VJP, the
  aggregation and the base's update).
* **A wrapper of the optimizer contract** that is not a mithril optimizer
  (:class:`~mithril.utils.accumulation.Accumulate`): ``evaluate`` + its ``update`` on every
  backend (an ``Accumulate``'s without the params the loss does not reach, as above);
  :meth:`TrainStep.init` is its ``init``.
"""

from __future__ import annotations

import inspect
import operator
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from ..compiler.compiled_model import signature
from ..errors import KeyMismatchError, ShapeError
from ..interop.optax_outer import one_program
from .fixed_parts import FixedParts
from .optimizers.checks import check_state_kind
from .optimizers.state import OptimizerState
from .train_step_hyper import HyperparameterWatch
from .train_step_inputs import TrainStepInputs
from .train_step_jax import (
    SKIPPED,
    Returned,
    SteadyState,
    committed,
    gradients_norm,
    refuse_consumed,
    report_skips,
    returned_of,
    same_params,
    state_before_run,
    step_body,
)
from .train_step_private import check_per_example_model
from .train_step_sam import fuses
from .train_step_states import counts_own_steps, optax_state_of, optimizer_state_of, with_missed
from .unreached_params import unreached_params, update_reached

__all__ = ["TrainStep", "make_train_step"]


def _loss_key(compiled: Any, loss: str, where: str = "make_train_step") -> str:
    """``loss``, checked: a scalar output of ``compiled`` (errors start with ``where``, the
    function the user called)."""
    outs = compiled.program.outputs
    if loss not in outs:
        raise KeyMismatchError(f"{where}: loss {loss!r} is not an output of the model "
                               f"(outputs: {sorted(outs)})")
    shape = compiled.program.output_shape(loss)
    if shape is not None and tuple(shape) != ():
        raise ShapeError(f"{where}: the loss {loss!r} must be a scalar output, it has "
                         f"shape {shape}")
    return loss


class TrainStep(FixedParts, HyperparameterWatch, TrainStepInputs):
    """What :func:`make_train_step` returns; see the module docs.

    Attributes: ``optimizer``, ``compiled``, ``loss`` (the output key), ``fused`` (whether
    :meth:`init` gives the one-program JAX state), ``last_grad_norm`` and ``rebuilds``
    (how often the JAX program was built anew after a hyperparameter changed; 0 unless one
    did)."""

    def __init__(self, compiled: Any, optimizer: Any, loss: str = "final_cost", *,
                 grad_norm: bool = False) -> None:
        from .optimizers.base import Optimizer

        self._own = own = isinstance(optimizer, Optimizer)
        if not own and not (callable(getattr(optimizer, "init", None))
                            and callable(getattr(optimizer, "update", None))
                            and hasattr(optimizer, "learning_rate")):
            raise TypeError(f"make_train_step needs a mithril optimizer (or a wrapper with "
                            f"its init / update / learning_rate, as Accumulate), got "
                            f"{type(optimizer).__name__}")
        # DP-SGD (update takes per-example gradients): the step computes them
        self._per_example = bool(getattr(optimizer, "takes_per_example_gradients", False))
        self.compiled, self.optimizer = compiled, optimizer
        self.loss = _loss_key(compiled, loss)
        self.backend = compiled.backend
        # params the loss does not reach: left out of each update, as torch.optim's .grad None
        self._unreached = unreached_params(compiled, self.loss, optimizer)
        # an optimizer that evaluates the loss itself (LBFGS: ``update(..., closure=)``) gets
        # the model's forward+VJP on the step's data as its closure, on every backend
        self._closure_driven = "closure" in inspect.signature(optimizer.update).parameters
        if self._per_example:  # (refused here, not at the first step)
            check_per_example_model(compiled)
        # the separate calls everywhere for a wrapper of the optimizer contract (Accumulate)
        # and for nonfinite="raise" (a program cannot raise)
        # (SAM's second gradient is a second forward+VJP in the program: train_step_sam)
        self._sam = own and self._closure_driven and fuses(optimizer, compiled)
        self._fused = self.backend.name == "jax" and own and (
            not self._closure_driven or self._sam) and \
            optimizer.nonfinite != "raise" and one_program(optimizer)
        # (each parameter's own step count in the program: see train_step_states)
        self._own_counts = self._fused and counts_own_steps(optimizer)
        self._fused = self._fused and (self._own_counts or not self._unreached)
        self._cots: dict[str, Any] | None = None
        self._last_grad_norm: Any = None
        self._norm_of: OptimizerState | None = None  # (see last_grad_norm)
        self.grad_norm = bool(grad_norm)  # the JAX program computes it (else None there)
        # the JAX program (built on first use)
        self._tx: Any = None
        self._jitted: Callable | None = None
        self._returned: tuple | None = None  # the params tuple the last fused step returned
        self._returned_state: Any = None  # and its opt_state
        # what the last fused step of this model returned, whichever step ran it: steps of
        # two losses taking turns on one state take each other's params without the copy
        # that keeps a user's arrays undonated (a sharded step keeps its own: its arrays
        # live on its mesh)
        self._shared = returned_of(compiled) if type(self) is TrainStep else Returned()
        self._views_checked: Any = None  # see _model_views
        self._state_checked: Any = None  # see _check_state
        # the (key, type, shape, dtype) signatures of data that passed the checks unchanged,
        # and those the JAX program has run with (compiled: nothing left to warn about)
        self._data_sigs: set[tuple] = set()
        self._run_sigs: set[tuple] = set()
        self._value_keys: frozenset[str] | None = None
        # JAX arrays whose value checks passed, by (id, data signature): see _inputs
        self._values_seen: dict[tuple, weakref.ref] = {}
        self._steady: SteadyState | None = None  # see _steady_args
        self._jax_array: type = type(None)
        self._watch_hyperparameters(optimizer)
        if self._fused:
            import jax

            self._jax_array = jax.Array
        self._made = True

    #: what the step is made of: chosen once (its program, cotangents and state kind follow)
    _FIXED = ("compiled", "optimizer", "loss", "backend", "grad_norm")
    _MAKER = "make_train_step(compiled, optimizer, loss=..., grad_norm=...)"
    _WHAT = "the step"

    # -- states ------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        """Whether :meth:`init` gives the one-program JAX state (an ``OptaxState``): on JAX,
        for every optimizer but a closure-driven one (LBFGS) or one made with
        ``nonfinite="raise"``; where the loss does not reach every parameter, for one whose
        program counts each parameter's steps."""
        return self._fused

    def init(self, params: Mapping[str, Any], *, adopt: bool = False) -> Any:
        """The optimizer state this step runs fastest with: ``optimizer.init(params)`` on
        NumPy and torch, the transformation's ``OptaxState`` on JAX. ``adopt=True`` (NumPy,
        torch) also hands ``params`` over (``optimizer.adopt``: its entries become views of
        the flat buffer, the originals freed one by one), so the first step copies nothing
        (Adam's peak beyond params + gradients: 8 B/param instead of 12)."""
        if not self.fused:
            if adopt and not callable(getattr(self.optimizer, "adopt", None)):
                raise TypeError(f"init(adopt=True): {type(self.optimizer).__name__} cannot "
                                f"adopt params (a mithril optimizer can)")
            state = self.optimizer.init(params)
            if adopt:
                self.optimizer.adopt(params, state)
            return state
        return with_missed(self, self._counted(self._transformation().init(dict(params)), 0),
                           None)

    SKIPPED = SKIPPED  # (see train_step_jax.SKIPPED)

    @property
    def _skips_seen(self) -> tuple | None:
        """What :func:`~.train_step_jax.report_skips` last read, shared with the steps of
        this model taking turns on one state (:class:`~.train_step_jax.Returned`)."""
        return self._shared.skips_seen

    @_skips_seen.setter
    def _skips_seen(self, value: tuple | None) -> None:
        self._shared.skips_seen = value

    def _counted(self, state: Any, skipped: int) -> Any:
        """``state`` (an ``OptaxState``) with the skipped-steps counter at ``skipped`` when
        the optimizer skips non-finite steps (the program then counts them, as ``update``'s
        ``state.num_skipped``)."""
        if self.optimizer.nonfinite != "skip":
            return state
        import jax.numpy as jnp

        return state._replace(hyperparams={**state.hyperparams,
                                           self.SKIPPED: jnp.asarray(skipped, jnp.int32)})

    def from_optimizer_state(self, state: OptimizerState) -> Any:
        """``state`` (of ``optimizer.init`` / ``update``, or a loaded checkpoint) as the state
        this step takes, checked against the optimizer and the model's parameters: the fused
        JAX step's ``OptaxState`` (slots, step count, values; the learning rate is the
        optimizer's), else ``state`` itself (the state :meth:`init` gives there)."""
        if not self._own:
            return state  # (a wrapper's state: its update checks it)
        if not isinstance(state, OptimizerState):
            raise TypeError(f"expected an OptimizerState, got {type(state).__name__}")
        check_state_kind(self.optimizer, state)
        same_params("the optimizer state", dict(zip(state.layout.names, state.layout.shapes)),
                     self.compiled.program.param_shapes)
        if not self.fused:
            return state
        # (a fused step counts each parameter's own steps for every optimizer it takes:
        # counts_own_steps; a Lookahead with reset_state's missed steps are refused there)
        return optax_state_of(self, state)

    def to_optimizer_state(self, opt_state: Any, params: Mapping[str, Any]) -> OptimizerState:
        """The fused JAX step's ``opt_state`` as ``optimizer.init(params)`` would hold it
        after as many updates (for ``optimizer.update``, checkpoints); ``params`` are
        not modified."""
        if isinstance(opt_state, OptimizerState) or not self._own:
            return opt_state  # (a wrapper's state, as Accumulate's, is its own)
        from ..interop.optax_transform import OptaxState

        if not isinstance(opt_state, OptaxState):
            raise TypeError(f"opt_state must come from step.init (an OptaxState), got "
                            f"{type(opt_state).__name__}")
        return optimizer_state_of(self, opt_state, params)

    # -- one step ------------------------------------------------------------------------
    def __call__(self, params: Mapping[str, Any], opt_state: Any, data: Mapping[str, Any], *,
                 state: Mapping[str, Any] | None = None) -> tuple:
        """``(params, opt_state, outputs)``, or with ``state=`` (a model that keeps state)
        ``(params, opt_state, outputs, state)``."""
        if self.fused and not isinstance(opt_state, OptimizerState):
            return self._fused_step(params, opt_state, data, state)
        if self._closure_driven:
            return self._closure_step(params, opt_state, data, state)
        if self._per_example:
            return self._private_step(params, opt_state, data, state)
        return self._separate_step(params, opt_state, data, state)

    @property
    def last_grad_norm(self) -> Any:
        """The global gradient norm of the last step: the optimizer state's
        ``last_grad_norm`` (read when asked, see :class:`OptimizerState`), or the JAX
        program's 0-d array (``grad_norm=True``; else None)."""
        return getattr(self._norm_of, "last_grad_norm", None) if self._norm_of is not None \
            else self._last_grad_norm

    @last_grad_norm.setter
    def last_grad_norm(self, value: Any) -> None:
        self._norm_of, self._last_grad_norm = None, value

    def _cotangents(self) -> dict[str, Any]:
        if self._cots is None:
            self._cots = self.compiled._cotangents({self.loss: 1.0})
        return self._cots

    def _separate_step(self, params: Mapping[str, Any], opt_state: Any,
                       data: Mapping[str, Any], state: Any) -> tuple:
        """``evaluate`` + ``update``; the params' checks are skipped when they are the views
        the optimizer returned (already checked, of the right type, shape and dtype)."""
        c, opt = self.compiled, self.optimizer
        cots = self._cotangents()
        if self._own:  # the state and params the update would refuse, before the model runs
            self._check_state(params, opt_state)
        views = opt_state.param_views if isinstance(opt_state, OptimizerState) else None
        random_step = c.step  # (each training-mode evaluation of a random model moves it)
        try:
            if (views is not None and isinstance(params, Mapping) and len(views) == len(params)
                    and state is None and params.keys() == views.keys()
                    and all(map(operator.is_, params.values(), views.values()))
                    and self._model_views(views)):
                outputs, grads = c._evaluate(params, self._steady_inputs(data), cots, None)
            elif state is None:  # (a number: evaluate's steady path compares it by value)
                outputs, grads = c.evaluate(params, data, output_gradients={self.loss: 1.0})
            else:
                outputs, grads, state = c.evaluate(params, data, output_gradients=cots,
                                                   state=state)
            loss = {"loss": outputs[self.loss]} if getattr(opt, "needs_loss", False) else {}
            params, opt_state = update_reached(opt, self._unreached, params, grads, opt_state,
                                               **loss) \
                if self._unreached else opt.update(params, grads, opt_state, **loss)
        except BaseException:  # a refused step (nonfinite="raise", a wrapper's own checks)
            c.step = random_step  # changes nothing: the next step draws the masks it would
            raise
        self._norm_of = opt_state  # (read when asked: it may still be on the device)
        return (params, opt_state, outputs) if state is None else (
            params, opt_state, outputs, state)

    def _check_state(self, params: Any, opt_state: Any) -> None:
        """:func:`state_before_run` (what ``update`` would refuse, before the model runs),
        but once per state while it is given the params it returned (the steady state)."""
        if opt_state is not self._state_checked or not isinstance(params, Mapping) or \
                not opt_state.returned(params):
            state_before_run(self.optimizer, self.compiled.program.param_shapes, params,
                             opt_state)
            self._state_checked = opt_state

    def _closure_step(self, params: Mapping[str, Any], opt_state: Any,
                      data: Mapping[str, Any], state: Any) -> tuple:
        """An optimizer that evaluates the loss itself (LBFGS, SAM): one ``update(params,
        grads, opt_state, closure=f, loss=...)`` (:func:`update_reached` where the loss does
        not reach some), ``grads`` and loss at ``params`` from the step's own ``evaluate``,
        ``f(p)`` the model's at ``p`` on the same data (torch's ``step(closure)``). The
        outputs are those at ``params``; a model's state goes through every evaluation."""
        check_state_kind(self.optimizer, opt_state)  # before the model runs
        c, cots, loss = self.compiled, self._cotangents(), self.loss
        random_step = c.step  # (each training-mode evaluation of a random model moves it)
        latest = [state]  # the model's state after the last evaluation

        def evaluate(p: Mapping[str, Any]) -> tuple[Any, Any]:
            if latest[0] is None:
                return c.evaluate(p, data, output_gradients=cots)
            out, g, latest[0] = c.evaluate(p, data, output_gradients=cots, state=latest[0])
            return out, g

        def closure(p: Mapping[str, Any]) -> tuple[Any, Any]:
            out, g = evaluate(p)
            return out[loss], g

        try:
            outputs, grads = evaluate(params)
            params, opt_state = update_reached(self.optimizer, self._unreached, params, grads,
                                               opt_state, closure=closure, loss=outputs[loss])
        except BaseException:  # a refused step changes nothing, the model's counter included
            c.step = random_step
            raise
        self._norm_of = opt_state
        return (params, opt_state, outputs) if state is None else (
            params, opt_state, outputs, latest[0])

    def _private_step(self, params: Mapping[str, Any], opt_state: Any,
                      data: Mapping[str, Any], state: Any) -> tuple:
        """DP-SGD (an optimizer taking per-example gradients): the outputs of the whole
        batch, each example's gradients
        (:func:`~mithril.utils.per_example.per_example_gradients`, every data key batched;
        the parameters the loss does not reach left out, as a ``.grad`` None), then one
        ``update``. The forward runs once more than in the other steps (the outputs')."""
        from .per_example import per_example_gradients

        if state is not None:
            raise TypeError("make_train_step: a DP-SGD step takes no model state (its model "
                            "can hold no BatchNorm: per-example gradients)")
        check_state_kind(self.optimizer, opt_state)  # before the model runs
        c = self.compiled
        rows = per_example_gradients(c, params, data, self.loss)
        outputs = c.evaluate(params, data)
        # (their missed steps counted, as the other steps count them: each parameter's
        # rules then read its own step, t − missed)
        params, opt_state = update_reached(self.optimizer, self._unreached, params, rows,
                                           opt_state)
        self._norm_of = opt_state
        return params, opt_state, outputs

    def _model_views(self, views: dict[str, Any]) -> bool:
        """Whether ``views`` (the arrays an update returned) are the model's parameters, in
        its order, for a model without context operators (remembered per views dict: an
        optimizer state keeps one)."""
        if views is self._views_checked:
            return True
        p = self.compiled.program
        if p.has_context or list(views) != list(p.param_shapes):
            return False
        self._views_checked = views
        return True

    # -- JAX: one program ------------------------------------------------------------------
    def _build(self) -> Callable:
        import jax

        from .optimizers.engines.kernel_cache import configure_jax

        configure_jax()  # the step's program compiles once per machine (JAX's disk cache)
        c, tx, loss = self.compiled, self._transformation(), self.loss
        ev = c._eval
        sam, private = self._program_gradients()
        with_ctx = c.program.has_context

        def program(ptuple: tuple, opt_state: Any, inputs: dict, rng: Any, mstate: dict,
                    lr: Any, hyper: Any, training: bool) -> tuple:
            new, new_state, out, new_mstate, grads = step_body(
                ev, tx, loss, with_ctx, ptuple, opt_state, inputs, rng, mstate, training, lr,
                hyper, self._unreached, sam, private)
            return new, new_state, out, new_mstate, (
                gradients_norm(list(grads)) if self.grad_norm else None)

        return jax.jit(program, donate_argnums=(0, 1), static_argnames=("training",))

    def _program_gradients(self) -> tuple[Any, tuple | None]:
        """``step_body``'s ``sam`` and ``private``: what the program takes other gradients
        with than the batch's (SAM's at its perturbed point: train_step_sam; DP-SGD's
        per-example ones and their aggregation: train_step_private), else None."""
        private = (self.optimizer, frozenset(self.compiled._consts)) if self._per_example \
            else None
        return (self.optimizer if self._sam else None), private

    def _steady_args(self, params: Any, opt_state: Any, data: Any) -> tuple | None:
        """``(params tuple, inputs)`` for the program when only the data's values changed
        since the last step (the loop's steady state), else None: the params and state are
        the ones it returned, the data has the keys and, by JAX's shared abstract values,
        the types, shapes and dtypes of data that passed (so its checks and the program's
        compile are behind it), and the value-checked arrays passed their checks before.
        ~4 µs of Python a step less than the full path's (inside a loop, where XLA's threads
        run the previous step on the same cores)."""
        s = self._steady
        if (opt_state is not s.opt_state or type(params) is not dict or type(data) is not dict
                or len(params) != len(s.ptuple) or not all(map(operator.is_, params.values(),
                                                                s.ptuple))
                or tuple(data) != s.keys):
            return None
        vals = list(data.values())
        try:  # (a value that is not a JAX array of the class fails here)
            if list(map(s.aval, vals)) != s.avals:
                return None
        except (TypeError, AttributeError):
            return None
        seen = self._values_seen
        for i in s.value_index:
            r = seen.get((id(vals[i]), s.sig))
            if r is None or r() is not vals[i]:
                return None
        ins = dict(data)
        ins.update(self.compiled._consts)
        return s.ptuple, ins

    def _fused_step(self, params: Mapping[str, Any], opt_state: Any, data: Mapping[str, Any],
                    state: Any) -> tuple:
        if self.optimizer.nonfinite == "skip":  # (the steps skipped before: see report_skips)
            report_skips(self, opt_state)
        if self._tx is not None and self._hyper_versions() != self._hyper_seen:
            self._hyper_changed()
        if self._steady is not None and state is None and opt_state is self._shared.opt_state:
            args = self._steady_args(params, opt_state, data)
            if args is not None:
                if self._resync:
                    opt_state = self._fed(opt_state)
                new, opt_state, out, _, norm = self._jitted(
                    args[0], opt_state, args[1], None, {}, float(self.optimizer.learning_rate),
                    self._hyper_args, training=True)
                self._returned = self._steady.ptuple = new
                self._steady.opt_state = self._returned_state = opt_state
                self._shared.ptuple, self._shared.opt_state = new, opt_state
                self.last_grad_norm = norm
                return dict(zip(self.compiled._eval.names, new)), opt_state, out
        self._steady = None
        if self._jitted is None:
            import jax.numpy

            from ..interop.optax_transform import OptaxState

            self._jitted = self._build()
            self._jnp, self._state_type = jax.numpy, OptaxState  # imported once
            # a copy by the runtime: no program to compile per parameter shape
            self._device_put, self._array_type = jax.device_put, jax.Array
        jnp = self._jnp
        if type(opt_state) is not self._state_type and not isinstance(opt_state,
                                                                      self._state_type):
            raise TypeError(f"opt_state must come from step.init (an OptaxState) or "
                            f"optimizer.init (an OptimizerState), got {type(opt_state).__name__}")
        shared = self._shared  # (the last return of any step of this model: see __init__)
        if opt_state is not shared.opt_state:
            refuse_consumed("opt_state", opt_state)
        c = self.compiled
        names = c._eval.names
        # (.get: a missing key is refused by _validate, naming it)
        ptuple = tuple(map(params.get, names)) if isinstance(params, Mapping) else None
        if ptuple is None or shared.ptuple is None or len(params) != len(names) or any(
                a is not b for a, b in zip(ptuple, shared.ptuple)):
            if ptuple is not None:
                refuse_consumed("params", params)
            checked, _ = c._validate(params, data)
            # the user's arrays are never donated: a copy is (the step's own are)
            put = self._device_put
            ptuple = tuple(put(a, a.sharding, may_alias=False) if isinstance(a, self._array_type)
                           else jnp.array(a, copy=True) for a in (checked[n] for n in names))
        sig = signature(data) if isinstance(data, Mapping) else None
        ins = self._inputs(data, sig)
        # a state the program refuses (of another optimizer, of other params: refused while
        # tracing, before a buffer is donated) changes nothing, the Dropout counter and the
        # pending re-read of the state's hyperparameters included
        random_step, resync = c.step, self._resync
        try:
            opt_state = self._fed(opt_state)
            lr = float(self.optimizer.learning_rate)
            run = c._run_context(None, state, None)
            if run is not None:
                rng, mstate, training = c._eval._rng(run), dict(run.state), run.training
            else:
                rng, mstate, training = None, {}, True
            run_sig = (sig, training)
            if sig is not None and run_sig in self._run_sigs:  # compiled: nothing to warn about
                new, opt_state, out, new_mstate, norm = self._jitted(
                    ptuple, opt_state, ins, rng, mstate, lr, self._hyper_args, training=training)
            else:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                    # what the program returns is committed to its device: so must be what it is
                    # first given of the same (params, state), or the second step compiles again
                    ptuple, opt_state, mstate = committed((ptuple, opt_state, mstate))
                    new, opt_state, out, new_mstate, norm = self._jitted(
                        ptuple, opt_state, ins, rng, mstate, lr, self._hyper_args, training=training)
                if sig is not None:
                    if len(self._run_sigs) >= 256:
                        self._run_sigs.clear()
                    self._run_sigs.add(run_sig)
        except BaseException:
            c.step, self._resync = random_step, resync
            raise
        self._returned, self._returned_state = new, opt_state
        shared.ptuple, shared.opt_state = new, opt_state
        self.last_grad_norm = norm
        params = dict(zip(names, new, strict=True))
        if state is None:
            if run is None and sig in self._data_sigs and type(data) is dict:
                self._steady = SteadyState.of(self, opt_state, new, data, sig)
            return params, opt_state, out
        return params, opt_state, out, {**mstate, **new_mstate}


def make_train_step(compiled_model: Any, optimizer: Any, loss: str = "final_cost", *,
                    grad_norm: bool = False) -> TrainStep:
    """``step(params, opt_state, data) -> (params, opt_state, outputs)``: forward, backward
    of ``loss`` (an output key; ``"final_cost"`` of a ``TrainModel`` by default) and one
    ``optimizer`` update. ``grad_norm=True``: the one-program JAX step also computes
    ``step.last_grad_norm`` (NumPy and torch always have it: their kernels sum the squares
    as they read the gradients). See :mod:`mithril.utils.training`."""
    return TrainStep(compiled_model, optimizer, loss, grad_norm=grad_norm)
