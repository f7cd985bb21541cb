"""Any mithril optimizer as an ``optax.GradientTransformation``.

:func:`optax_transformation` turns a mithril optimizer (:mod:`mithril.utils.optimizers`:
every one but LBFGS) into a transformation any JAX / Flax training loop takes: ``init`` and
``update`` are pure functions of pytrees, jittable, and compose in ``optax.chain``; the
numbers are the optimizer's own (the same elementwise math, prologue and per-step scalars
the JAX engine runs; for Muon and Adafactor, the same per-tensor ``tensor_update``:
:mod:`.optax_tensorwise`)::

    import jax
    import jax.numpy as jnp
    import optax
    from mithril.interop import optax_transformation
    from mithril.utils.optimizers import Adam

    params = {"layer": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax_transformation(Adam(learning_rate=1e-2, weight_decay=1e-4)))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        grads = jax.grad(lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

How it works:

* **State** (:class:`OptaxState`, a pytree): ``count`` (int32, the steps taken), ``slots``
  (slot name -> a pytree like the params: ``"m"``, ``"v"``, ..., and ``"ema"`` / ``"swa"``
  with weight averaging), ``tensor_slots`` (a two-pass optimizer's per-tensor slots: a pytree
  of 0-d arrays), ``values`` (its optimizer-wide scalars: Prodigy's ``d`` and
  ``numerator``, schedule-free's ``weight_sum`` and ``max_lr``) and ``hyperparams``
  (``{"learning_rate": ...}``, as ``optax.inject_hyperparams`` keeps it; schedule-free's
  also ``"beta1"``, which the update reads and :func:`schedule_free_eval_params` needs,
  as optax's ``state.b1``). Slots that the optimizer's
  ``init`` starts as a copy of the params are copies here too (schedule-free's ``z``,
  Prodigy's ``x0``, Lookahead's ``slow``); a tensorwise optimizer's slots have its
  ``slot_shape`` (Adafactor's factored statistics).
* **Learning rate.** By default it is read from ``state.hyperparams["learning_rate"]``
  (initially the optimizer's): set it between steps (``state.hyperparams["learning_rate"]
  = 0.01``, a Python float or a 0-d array) and nothing recompiles. Or give
  ``learning_rate=`` a number, or an optax schedule (a function of the 0-based step count),
  or wrap the factory in ``optax.inject_hyperparams(optax_transformation)(opt,
  learning_rate=...)`` (a fixed one is then not kept in the state: ``optax.tree_utils.
  tree_get(state, "learning_rate")`` finds inject_hyperparams' one; a schedule's value at
  the last update is). Parameter groups keep their ``lr_scale`` relative to it. Other float
  hyperparameters take optax schedules too: ``schedules={"alpha": optax.linear_schedule(
  ...)}`` (AdEMAMix's α, as optax's ``ScalarOrSchedule`` arguments), read at every update.
* **Per-step scalars** (bias corrections, ...) come from the step count in the state.
  Where the optimizer's ``scalars(step)`` is plain arithmetic (most are: ``1 - b**step``)
  it is traced with the step as a JAX value, so the update is one XLA program: ``math.sqrt``
  & co. in it run as their ``jnp`` versions, and ``b ** step`` as ``exp(step·ln b)``, with
  ``1 − b**step`` as ``−expm1(step·ln b)`` (float32 keeps the relative precision of
  ``1 − βᵗ``, which ``jnp.power(float32(β), t)`` would lose); they are float32 unless
  ``jax_enable_x64`` is on (the engines compute them in float64: the results differ by
  float32 rounding, ~1e-7 relative). Where ``scalars`` has Python control flow on the step
  (``0.0 if step == 1 else ...``: SGD with momentum, RAdam, NAdam, Adan, ADOPT, ASGD,
  Lookahead), they are computed on the host in float64 by a ``jax.pure_callback`` (still
  pure and jittable; the engines' very scalars, at the price of one small host round trip
  per step, and not differentiable with respect to the learning rate). Which one an
  optimizer gets is checked once (tracing, then comparing a few steps with the host's
  values); ``scalars="host"`` / ``"traced"`` force either, and :func:`scalars_on_host`
  says which ``"auto"`` picks, and why.
* **Everything else of the base class**, per leaf (no flat buffer): ``clip_norm`` (on the
  global norm over all leaves), ``clip_value``, coupled or decoupled ``weight_decay``,
  ``param_groups`` / ``weight_decay_mask`` / ``exclude_weight_decay`` (parameter names are
  the key paths, ``"layer/w"``; a group's ``step_offset`` ``k``: its rules count ``t − k``,
  and until the count passes ``k`` its params and slots are kept and its gradients left
  out, as torch's before ``add_param_group``; ``update(..., missed=m)``, one int per leaf:
  each leaf's rules count ``t − k − m``, its own row of scalars, as torch.optim's
  per-parameter ``step`` after steps the leaf had no gradient at), weight averaging (``ema_decay``, ``swa_start``: the
  averages are ``state.slots["ema"]`` / ``["swa"]``), two-pass optimizers (LAMB, LARS,
  Novograd: the per-tensor sums are per leaf) and ``nonfinite="skip"`` (a step with a
  non-finite gradient, or giving non-finite values, returns zero updates and leaves the
  state as it was, the count included; with ``max_consecutive_skips=N``, as optax's
  ``apply_if_finite``, one after ``N`` in a row is applied: ``state.hyperparams
  ["consecutive_skips"]`` counts them). ``nonfinite="raise"`` cannot raise inside
  ``jax.jit`` and is refused. Leaves may have different floating-point dtypes.
* **Dtypes, where optax differs.** Each gradient is cast to its parameter's dtype before
  the math, and the slots and the update returned have the parameter's dtype: with
  float32 params and bfloat16 gradients, optax squares the gradient in bfloat16 (Adam's
  steps then differ from ours by up to ~1e-3 relative; ours are those of the gradient in
  float32); with bfloat16 params and float32 gradients optax returns float32 updates,
  ours are bfloat16 (``optax.apply_updates`` casts both to the params' dtype: the same
  params). A complex or bool gradient (of a real parameter) is refused with a
  ``TypeError`` naming the key (cast, it would lose its imaginary part where optax steps
  with it). Integer leaves (a step counter kept in the params) are refused with a
  ``TypeError`` naming the key, where optax runs its arithmetic on them: leave them out
  with ``optax.masked(tx, mask)`` or ``optax.multi_transform({..., "frozen":
  optax.set_to_zero()}, labels)``, which then give optax's numbers. ``mu_dtype=`` /
  ``slot_dtypes=`` keep a slot in a dtype of its own (optax's ``mu_dtype``: a bfloat16
  first moment): computed in the wider of it and the parameter's dtype (a float32 moment
  of bfloat16 params: the step in float32, the params rounded), stored rounded. optax multiplies the
  stored moment by β in that dtype (its weak-typed float), we in the parameter's: from the
  second step the two differ by that rounding (``tests/test_review_optax48.py``).
* **optax's mask functions.** ``weight_decay_mask`` may be optax's function of the whole
  params pytree (``optax.adamw(mask=fn)``'s: ``lambda p: jax.tree.map(lambda x: x.ndim >
  1, p)``, a pytree of bools or a prefix of one): here it is called with the params at
  each new tree structure, as ``optax.masked`` calls it (:func:`.optax_inputs.optax_mask`).
* **Composition** (``tests/test_interop_optax_combinators.py``, side by side with optax):
  inside ``optax.chain``, ``MultiSteps``, ``masked``, ``multi_transform``,
  ``apply_if_finite``, ``lookahead``, before ``contrib.reduce_on_plateau``, wrapped by
  ``inject_hyperparams``, with optax schedules, under ``jax.lax.scan``, ``jax.vmap`` (an
  ensemble), ``donate_argnums`` and ``jax.grad`` through the updates (meta-learning), the
  params equal optax's at every step (float64: to 1e-12; float32: to rounding). None
  leaves and empty subtrees are kept as optax keeps them.
* The update returned is ``new_params − params`` (``optax.apply_updates`` then gives the
  optimizer's new parameters, exactly for any ordinary step size). ``update(updates, state,
  params, new_params=True)`` returns the new parameters themselves instead (what
  :func:`~mithril.utils.training.make_train_step`'s program uses: no ``p + (new − p)``,
  ~5% less for XLA to compile in a 50-layer MLP's step).
* The optimizer is copied when the transformation is made: changing its hyperparameters
  afterwards does not change the transformation (the learning rate lives in the state).
  A Mithril scheduler on the optimizer is warned about (``UserWarning``, once; it would be
  ignored: :mod:`.optax_scheduled`): schedule in optax instead (``learning_rate=``).

Optimizers that override ``init``/``update`` are supported where the override is known to
stay within this model (:mod:`.optax_special`): Lookahead, schedule-free SGD / AdamW and
Prodigy (``init`` copies the params into a slot), Muon and Adafactor
(``TensorwiseOptimizer``). The state values an optimizer's ``scalars`` reads (its
``scalar_values``: Prodigy's ``d``) are passed to it as keyword arguments, traced or as
arguments of the host callback, as the engines pass the state's. A two-pass
optimizer's ``tensor_scalars`` is traced where it is arithmetic, else (NumPy, Python control
flow: schedule-free's and Prodigy's) computed on the host in float64 by a
``jax.pure_callback``, as the engines do; its ``values`` are kept in float32 between steps
(float64 with ``jax_enable_x64``). LBFGS (a closure per step) and any other override are
refused with a ``TypeError`` naming the optimizer and why.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .optax_checks import (  # (optax_tensorwise imports _copied_slots from here)
    _check_optimizer,
    _copied_slots,
    _copy_optimizer,
    _own_mu_dtype,
)
from .optax_host_kernel import host_update
from .optax_hyperparams import as_schedules, check_schedules, not_kept, scheduled
from .optax_hyperparams import check as check_traced
from .optax_inputs import (
    _check_hyper,
    _flatten,
    _gradients,
    _state_leaves,
    optax_mask,
    with_mask,
)
from .optax_inputs import slot_dtypes as own_dtypes
from .optax_loss import extra_args, with_loss
from .optax_prologue import CONSECUTIVE, _prologue, _wide, forced, given_up
from .optax_scalars import (
    _INT32_MAX,
    _Hyper,
    _pair_of,
    _Plan,
    _probe,
    _row_scalars,
    joined,
    row_count,
)
from .optax_scheduled import watch_schedulers
from .optax_special import schedule_free_eval_params
from .optax_unreached import averages_only

__all__ = ["OptaxState", "optax_transformation", "scalars_on_host",
           "schedule_free_eval_params"]

_MODES = ("auto", "traced", "host")


class OptaxState(NamedTuple):
    """The state :func:`optax_transformation`'s ``init`` returns (a pytree)."""

    count: Any
    slots: dict[str, Any]
    tensor_slots: dict[str, Any]
    values: dict[str, Any]
    hyperparams: dict[str, Any]


def scalars_on_host(optimizer: Any) -> str | None:
    """Why ``optimizer``'s per-step scalars would be computed on the host (a
    ``jax.pure_callback``) under ``scalars="auto"``, or None when they are traced into the
    update (plain arithmetic on the step)."""
    _check_optimizer(optimizer)
    opt = copy.copy(optimizer)
    return _probe([opt], [1.0])


def _initial_hyperparams(opt: Any, learning_rate: Any,
                         schedules: Mapping[str, Callable] | None = None) -> dict[str, Any]:
    """``state.hyperparams`` of a fresh state: the learning rate (weak-typed: a Python
    float set later does not recompile), the hyperparameters the state drives and those
    ``schedules`` give (their values at count 0)."""
    import jax.numpy as jnp

    from .optax_special import state_hyperparams

    if learning_rate is None:
        lr = {"learning_rate": jnp.asarray(float(opt.learning_rate))}
    elif callable(learning_rate):
        lr = {"learning_rate": jnp.asarray(learning_rate(jnp.zeros((), jnp.int32)))}
    else:  # (a fixed rate, as optax.adam(0.01)'s: not in the state, which then holds one
        lr = {}  # "learning_rate" under optax.inject_hyperparams, as tree_get needs)
    counted = opt.nonfinite == "skip" and opt.max_consecutive_skips is not None
    return {**lr, **{h: jnp.asarray(float(getattr(opt, h)))
                                    for h in state_hyperparams(opt)},
            **{k: v for k, v in scheduled(schedules, jnp.zeros((), jnp.int32)).items()
               if k not in not_kept(schedules, state_hyperparams(opt))},
            **({CONSECUTIVE: jnp.zeros((), jnp.int32)} if counted else {})}


def _step_lr(learning_rate: Any, state: Any) -> Any:
    """This step's learning rate: the state's, the schedule's at the step count, or the
    one given."""
    if learning_rate is None:
        return state.hyperparams["learning_rate"]
    if callable(learning_rate):
        return learning_rate(state.count)
    return learning_rate


def _check_update(opt_name: str, state: Any, params: Any) -> None:
    if params is None:
        raise ValueError(f"{opt_name} as an optax transformation needs params: call "
                         f"update(updates, state, params)")
    if not isinstance(state, OptaxState):
        raise TypeError(f"state must be what this transformation's init returned "
                        f"(an OptaxState), got {type(state).__name__}")


def optax_transformation(optimizer: Any, *, learning_rate: Any = None,
                         scalars: str = "auto", traced_hyperparams: Sequence[str] = (),
                         schedules: Mapping[str, Callable[[Any], Any]] | None = None,
                         mu_dtype: Any = None, slot_dtypes: dict[str, Any] | None = None,
                         **hyperparameters: Any) -> Any:
    """``optimizer`` (a mithril optimizer: elementwise, two-pass, tensorwise; not LBFGS) as
    an ``optax.GradientTransformation`` whose ``init(params)`` / ``update(updates, state,
    params)`` are pure and jittable (see the module docs).

    ``learning_rate``: None (default) reads it from ``state.hyperparams["learning_rate"]``,
    initially the optimizer's (set it there between steps: nothing recompiles); a number or
    0-d array (what ``optax.inject_hyperparams`` passes) uses that (and is not kept in the
    state); a callable is an optax schedule of the 0-based step count. ``scalars``: ``"auto"`` (traced where the
    optimizer's ``scalars(step)`` (and a two-pass optimizer's ``tensor_scalars``) is
    arithmetic, else computed on the host by a ``jax.pure_callback``), ``"traced"`` (refuse
    otherwise) or ``"host"``.

    ``traced_hyperparams``: float hyperparameters the program reads at every update instead
    of baking in (names as in :mod:`.optax_hyperparams`: ``"beta1"``,
    ``"param_groups[1].lr_scale"``; sorted, as the transformation keeps them); their
    values are then passed to every call as ``update(..., hyper=pairs)``, row ``i`` of
    ``pairs`` the ``[hi, lo]`` of the ``i``-th name (:func:`~.optax_hyperparams.pair`), so
    a change compiles nothing. What :func:`~mithril.utils.training.make_train_step` uses once a
    hyperparameter has changed.

    ``schedules``: optax schedules of other hyperparameters, name (as for
    ``traced_hyperparams``) -> a function of the 0-based step count, called in the program
    at every update as optax calls its ``ScalarOrSchedule`` arguments:
    ``schedules={"alpha": optax.linear_schedule(0.0, 8.0, 1000)}`` is
    ``optax.contrib.ademamix(alpha=optax.linear_schedule(0.0, 8.0, 1000))`` (its ``b3``:
    ``"beta3"``). The values are traced, so not checked as the constructor checks them (nor
    by optax): keep them in the hyperparameter's range. ``state.hyperparams`` holds each
    one's last value under its name. The learning rate's schedule is ``learning_rate=``.

    ``mu_dtype``: optax's (``optax.adam(mu_dtype=jnp.bfloat16)``): the first moment (the
    slot ``"m"``: Adam, AdamW, NAdam, Lion, ADOPT...; AdEMAMix's ``"m1"`` and ``"m2"``) is
    kept in that dtype between steps, as optax keeps it: each step computes in the
    wider of the two dtypes from the stored value and stores the new one rounded (the
    update uses it unrounded). ``slot_dtypes``: the same for any slot by name (``{"momentum":
    jnp.bfloat16}`` is ``optax.sgd(accumulator_dtype=)``); the other slots keep their
    parameter's dtype. Elementwise optimizers only (not Muon, Adafactor).

    ``**hyperparameters``: other float hyperparameters by our names (``beta1=0.95``), each
    a number (a 0-d array) or a schedule, read by the program at every update as
    ``schedules`` are; a Python number is kept in ``state.hyperparams`` and read from there
    (write ``state.hyperparams["beta1"]`` between steps, as the learning rate); a 0-d
    array is fixed and not kept (as a fixed learning rate). With
    ``optax.inject_hyperparams`` (which sees named arguments only),
    name them in a factory, and ``state.hyperparams["beta1"]`` can be set between steps as
    optax's ``"b1"`` (nothing recompiles)::

        tx = optax.inject_hyperparams(lambda learning_rate, beta1: optax_transformation(
            Adam(convention="optax"), learning_rate=learning_rate, beta1=beta1))(
            learning_rate=0.01, beta1=0.9)"""
    import jax
    import jax.numpy as jnp
    import optax

    from ..utils.optimizers.engines.jax_finite import finite_grads, finite_step

    kind = _check_optimizer(optimizer)
    mu_dtype = _own_mu_dtype(optimizer, mu_dtype)
    if scalars not in _MODES:
        raise ValueError(f"scalars must be one of {_MODES}, got {scalars!r}")
    opt = _copy_optimizer(optimizer)
    traced = check_traced(opt, traced_hyperparams)
    sched = check_schedules(opt, as_schedules(opt, schedules, hyperparameters), traced)
    live = tuple(sorted({*traced, *sched}))  # what the program reads at every update
    # (a Mithril scheduler on `optimizer` would step what the copy no longer follows)
    given = {*live, *(() if learning_rate is None else ("learning_rate",))}
    if kind == "tensorwise":
        from .optax_tensorwise import tensorwise_transformation

        if mu_dtype is not None or slot_dtypes:
            raise TypeError(f"{type(opt).__name__}: mu_dtype / slot_dtypes: its slots are "
                            f"kept in the parameters' dtype (elementwise optimizers only)")

        tx = tensorwise_transformation(opt, learning_rate, scalars, traced, sched)
        watch_schedulers(optimizer, given)  # (at construction only)
        return tx
    from .optax_special import host_tensor_scalars, state_hyperparams

    opt_name = type(opt).__name__
    own = tuple(opt.slot_names())
    full = tuple(opt.full_slot_names())
    copied = _copied_slots(opt)
    dtypes = own_dtypes(opt, copied, mu_dtype, slot_dtypes)
    watch = watch_schedulers(optimizer, given)  # (and at init, update: a cheap look)
    tensor_slots = tuple(opt.tensor_slots)
    two_pass = opt.two_pass()
    n_avg = len(full) - len(own)
    scalar_values = tuple(opt.scalar_values)  # the state values scalars() reads
    driven_hyper = state_hyperparams(opt)
    dropped = not_kept(sched, driven_hyper)
    plans: dict[Any, _Plan] = {}

    leaf_fns: dict[Any, Any] = {}

    def leaf_math(math_fn: Any) -> Any:
        """The math of one leaf, ``(p, g, slots, scalars) -> (new p, *new slots)`` in the
        leaf's dtype, as a ``jax.jit`` function: inside a traced step each distinct leaf
        shape is traced once (a 50-layer MLP: 5 shapes, not 100 leaves), and XLA inlines
        the calls (the same program)."""
        fn = leaf_fns.get(math_fn)
        if fn is None:
            def one(p: Any, g: Any, slots: tuple, scal: tuple) -> tuple:
                # (a slot of its own dtype, mu_dtype's: computed in the wider of it and p's,
                # stored in its own; p's alone where every slot has p's dtype)
                wide = jnp.result_type(p.dtype, *(x.dtype for x in slots))
                # (the mu_dtype maths make optax's bias corrections from β and t: in float32
                # at least, as optax's, where bfloat16 rounds β₂ = 0.999 to 1: 1 − β₂ᵗ = 0)
                sw = jnp.promote_types(wide, jnp.float32) if getattr(
                    math_fn, "array_only", False) else wide
                out = math_fn(p.astype(wide), g.astype(wide), *(x.astype(wide) for x in slots),
                              *(x.astype(sw) for x in scal))
                return tuple(jnp.asarray(v).astype(d) for v, d in
                             zip(out, (p.dtype, *(x.dtype for x in slots))))

            if len(leaf_fns) >= 16:  # (a kernel_math that returns new closures: see its docs)
                leaf_fns.clear()
            fn = leaf_fns[math_fn] = jax.jit(one)
        return fn

    def plan_for(treedef: Any, names: list[str], per_leaf: bool = False,
                 params: Any = None) -> _Plan:
        mask = optax_mask(opt, params, names)  # (optax's mask function: by name, per tree)
        key = (treedef, per_leaf, None if mask is None else tuple(mask.items()))
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = _Plan.of_groups(with_mask(opt, mask), names, scalars, live,
                                                per_leaf)
        return plan

    def init(params: Any) -> OptaxState:
        if watch is not None:
            watch.check()
        leaves, treedef, _ = _flatten(params, opt_name)
        slots = {}
        for s in full:
            if s in copied:
                slots[s] = treedef.unflatten([jnp.array(p, copy=True) for p in leaves])
            else:
                v = opt.slot_init(s)
                slots[s] = treedef.unflatten([jnp.full(p.shape, v, dtypes.get(s, p.dtype))
                                              for p in leaves])
        tensors = {s: treedef.unflatten([jnp.full((), opt.slot_init(s), p.dtype) for p in leaves])
                   for s in tensor_slots}
        values = {v: jnp.asarray(float(opt.state_value_init(v)), _wide())
                  for v in opt.state_values}
        return OptaxState(jnp.zeros((), jnp.int32), slots, tensors, values,
                          _initial_hyperparams(opt, learning_rate, sched))

    def run_tensor_scalars(t: Any, lr: Any, sums: tuple, cols: tuple, tens: dict[str, Any],
                           values: dict[str, Any], sizes: np.ndarray, wide: dict[str, Any]
                           ) -> tuple:
        """``opt.tensor_scalars`` traced (arithmetic and elementwise functions only), else
        on the host (a ``jax.pure_callback``: NumPy, Python control flow); ``wide``: the
        optimizer-wide traced hyperparameters, set on it."""
        if scalars != "host":
            copied = copy.copy(opt)
            copied.assign({**wide, "learning_rate": lr})
            try:
                return copied.tensor_scalars(t, sums, cols, dict(tens), dict(values), sizes)
            except Exception as e:  # noqa: BLE001 - not traceable: on the host
                if scalars == "traced":
                    raise TypeError(
                        f"scalars='traced': {opt_name}.tensor_scalars does not run on traced "
                        f"JAX values ({type(e).__name__}: {e}); use scalars='auto' or 'host' "
                        f"(a host callback)") from e
        return host_tensor_scalars(opt, t, lr, sums, cols, tens, values, sizes, _wide(),
                                   {k: _pair_of(v) for k, v in wide.items()})

    def update(updates: Any, state: OptaxState, params: Any = None, *,
               new_params: bool = False, hyper: dict[str, Any] | None = None,
               missed: Any = None, average_only: Any = (), value: Any = None,
               host_kernel: list | None = None) -> tuple[Any, OptaxState]:
        """(updates, new state); ``new_params=True``: (the new params, new state)
        (what ``make_train_step`` takes: no ``p + (new − p)`` round trip); ``hyper``: the
        values of ``traced_hyperparams``, an array of their ``[hi, lo]`` rows; ``missed``:
        per leaf (flattening order, int32), the applied steps it had no gradient at, left
        out of its rules' count (``t − step_offset − missed``, torch.optim's per-parameter
        ``step``: each leaf its own row of scalars; the averages' weights count the
        optimizer's ``t``); ``average_only``: names of leaves that had no gradient this
        step: only their averages move, ``updates`` are not read (:mod:`.optax_unreached`);
        ``value``: the loss at ``params``, for a loss-aware optimizer (:mod:`.optax_loss`);
        ``host_kernel``: a list, where the caller (the one-program train step) lets the
        update run as one call of the fused CPU kernel (:mod:`.optax_host_kernel`): it then
        appends (gradients finite, new values finite), the kernel's probe."""
        _check_update(opt_name, state, params)
        if watch is not None:
            watch.check()
        held, state = state.values, with_loss(opt, state, value)  # (held: a skip keeps them)
        _check_hyper(opt_name, traced, hyper)
        leaves, treedef, names = _flatten(params, opt_name)
        grads = _gradients(opt_name, updates, treedef, leaves, names)
        if missed is not None and np.shape(missed) != (len(leaves),):
            raise ValueError(f"{opt_name}: update(missed=...) must hold one count per "
                             f"parameter ({len(leaves)}), got shape {np.shape(missed)}")
        plan = plan_for(treedef, names, missed is not None, params)
        slot_leaves = _state_leaves(opt_name, state, "slots", full, treedef, names, leaves,
                                    dtypes=dtypes)
        tensor_leaves = _state_leaves(opt_name, state, "tensor_slots", tensor_slots, treedef,
                                      names, leaves)
        count = state.count
        t = count + 1
        lr = _step_lr(learning_rate, state)
        driven = {h: state.hyperparams[h] for h in driven_hyper}
        driven.update({k: _Hyper(hyper[i, 0], hyper[i, 1]) for i, k in enumerate(traced)})
        now = scheduled(sched, count, state.hyperparams)
        driven.update(now)
        # (an optimizer whose reference counts per group keeps missed steps out: counts_missed)
        lost = jnp.asarray(missed, t.dtype) if missed is not None and leaves and getattr(
            opt, "counts_missed", True) else None
        t_rows = t if lost is None else t - lost
        rows = _row_scalars(plan, t_rows, lr, driven, _wide(),
                            {v: state.values[v] for v in scalar_values}, lost)
        attrs = plan.attrs(driven)
        n_full = len(rows[0]) - 1
        n_own = n_full - n_avg
        skip = opt.nonfinite == "skip"
        late = joined(plan, t)  # (groups that join after the first steps: see joined)
        if average_only:
            return averages_only(state, treedef, leaves, names, average_only, slot_leaves,
                                 full[len(own):],
                                 lambda i: rows[plan.index[i]][1 + n_own:], late, new_params)
        if late is not None:
            grads = [g if j is None else jnp.where(j, g, jnp.zeros_like(g))
                     for g, j in zip(grads, late)]

        def between(sums: list[Any]) -> tuple[list, dict, dict]:
            """A two-pass optimizer between its passes: ``tensor_scalars`` of the per-tensor
            ``sums``: (the second pass's extra columns, per tensor; the new tensor slots;
            the new values)."""
            dt = _wide()
            n = len(leaves)
            if late is not None and len(sums):  # a leaf whose group has not joined counts
                # for nothing (its p² too: DoG's ‖x₀‖), as the engines' absent tensors
                on = jnp.stack([jnp.asarray(True) if j is None else j for j in late])
                sums = [jnp.where(on, s, jnp.zeros_like(s)) for s in sums]
            own_rows = [rows[plan.index[i]][1:1 + n_own] for i in range(n)]
            cols = tuple(jnp.stack([own_rows[i][j] for i in range(n)]) for j in range(n_own))
            tens = {s: jnp.stack([x.astype(dt) for x in tensor_leaves[s]]) for s in tensor_slots}
            sizes = np.array([int(np.prod(p.shape, dtype=np.int64)) for p in leaves],
                             dtype=np.int64)
            # (per tensor where a group joined later: each tensor's own count, as the
            # engines' two_pass_table passes it)
            t_each = t if (late is None and missed is None) or getattr(
                opt, "tensor_scalars_step", "tensor") == "optimizer" else jnp.stack(
                [row_count(t_rows if jnp.ndim(t_rows) == 0 else t_rows[r], plan.offsets[r])
                 for r in plan.index]).astype(dt)
            ext, new_t, new_values = run_tensor_scalars(
                t_each, lr, tuple(s.astype(dt) for s in sums), cols, tens, dict(state.values),
                sizes, {k: v for k, v in driven.items() if k in live and "[" not in k})
            if set(new_t) != set(tensor_slots) or set(new_values) != set(opt.state_values):
                raise RuntimeError(f"{opt_name}.tensor_scalars must return every tensor slot "
                                   f"{sorted(tensor_slots)} and value {sorted(opt.state_values)}")
            return ([jnp.broadcast_to(jnp.asarray(e, dt), (n,)) for e in ext],
                    {s: [jnp.asarray(new_t[s], dt).reshape(n)[i].astype(leaves[i].dtype)
                         for i in range(n)] for s in tensor_slots},
                    {k: jnp.asarray(v, dt) for k, v in new_values.items()})

        def traced_update() -> tuple:
            """The update traced: prologue, a two-pass optimizer's sums, then the math per
            leaf (as XLA compiles it on any device)."""
            gs, ps, _, checked = _prologue(opt, plan, leaves, grads, rows, attrs, names)

            # two-pass optimizers: per-tensor sums, then tensor_scalars between the passes
            extra: list[Any] = []
            new_tensors: dict[str, Any] = {}
            new_values = dict(state.values)
            if two_pass and leaves:  # (no params: no sums, nothing between the passes)
                sums: list[Any] = []
                if opt.reductions:
                    reduce_fn = opt.reduce_math()
                    per_leaf = []
                    for i, (p, g) in enumerate(zip(ps, gs)):
                        scal = [x.astype(p.dtype) for x in rows[plan.index[i]][1:1 + n_own]]
                        terms = reduce_fn(p, g, *(slot_leaves[s][i].astype(p.dtype) for s in own),
                                          *scal)
                        acc = jnp.promote_types(p.dtype, jnp.float32)
                        per_leaf.append([jnp.sum(jnp.asarray(x).astype(acc)) for x in terms])
                    sums = [jnp.stack([per_leaf[i][k] for i in range(len(leaves))])
                            for k in range(opt.reductions)]
                extra, new_tensors, new_values = between(sums)

            # the elementwise math, per leaf
            leaf = leaf_math(opt.full_kernel_math(n_full + len(extra)))
            new_ps: list[Any] = []
            new_slots: dict[str, list[Any]] = {s: [] for s in full}
            for i, (p, g) in enumerate(zip(ps, gs)):
                row = rows[plan.index[i]]
                scal = (*row[1:1 + n_own], *(e[i] for e in extra), *row[1 + n_own:])
                out = leaf(p, g, tuple(slot_leaves[s][i] for s in full), scal)
                new_ps.append(out[0])
                for s, v in zip(full, out[1:]):
                    new_slots[s].append(v)

            return new_ps, new_slots, new_tensors, new_values, checked

        fused = None if host_kernel is None or not leaves else host_update(
            opt, plan, leaves, grads, rows, attrs, slot_leaves, full, dtypes,
            forced(opt, state.hyperparams) if skip else None,
            (between, own, n_own) if two_pass else None)
        if fused is not None:
            host_kernel.append(fused[2:4])
            new_ps, new_slots = list(fused[0]), {s: list(v) for s, v in fused[1].items()}
            new_tensors, new_values = fused[4:] if two_pass else ({}, dict(state.values))
        else:
            new_ps, new_slots, new_tensors, new_values, checked = traced_update()
        if late is not None:  # a group not joined yet keeps its params and slots (the
            # kernel's results too: XLA copies such a leaf before the call writes over it)
            for i, j in enumerate(late):
                if j is not None:
                    new_ps[i] = jnp.where(j, new_ps[i], leaves[i])
                    for s in full:
                        new_slots[s][i] = jnp.where(j, new_slots[s][i], slot_leaves[s][i])
                    for s in new_tensors:
                        new_tensors[s][i] = jnp.where(j, new_tensors[s][i], tensor_leaves[s][i])
        new_count = jnp.minimum(count, _INT32_MAX - 1) + 1
        if skip:  # (a two-pass step's tensor slots and values too: DoG's Σ‖g‖² may
            # overflow where its update stays finite; the kernel skipped such a step itself)
            state_ok = finite_step([], [], jax.tree_util.tree_leaves((new_tensors, new_values)))
            finite = state_ok & (fused[2] & fused[3] if fused is not None else finite_grads(
                checked) & finite_step(new_ps, list(new_slots.values())))
            finite, counts = given_up(opt, state.hyperparams, finite)  # (finite: applied)
        if skip and fused is not None:  # (the kernel left every array as it was, skipped)
            new_count = jnp.where(finite, new_count, count)
            if two_pass:  # its tensor slots and values, small arrays, picked here
                new_tensors, new_values = jax.lax.cond(
                    finite, lambda a, b: a, lambda a, b: b, (new_tensors, new_values),
                    ({s: list(tensor_leaves[s]) for s in new_tensors},
                     {k: held[k] for k in new_values}))
        elif skip:
            # one conditional picks the new or the old arrays: a select per array on the
            # one predicate took XLA's fusion 10x longer to compile (40 s on a 50-layer MLP)
            olds = (list(leaves), {s: list(slot_leaves[s]) for s in new_slots},
                    {s: list(tensor_leaves[s]) for s in new_tensors},
                    {k: held[k] for k in new_values}, count)
            new_ps, new_slots, new_tensors, new_values, new_count = jax.lax.cond(
                finite, lambda a, b: a, lambda a, b: b,
                (new_ps, new_slots, new_tensors, new_values, new_count), olds)

        out_updates = treedef.unflatten(new_ps if new_params else
                                        [a - b for a, b in zip(new_ps, leaves)])
        hyper = dict(state.hyperparams)
        if callable(learning_rate):
            hyper["learning_rate"] = jnp.asarray(lr)
        hyper.update({k: v for k, v in now.items() if k not in dropped})
        if skip:
            hyper.update(counts)
        new_state = OptaxState(
            new_count,
            {s: treedef.unflatten(v) for s, v in new_slots.items()},
            {s: treedef.unflatten(new_tensors[s]) if s in new_tensors else state.tensor_slots[s]
             for s in tensor_slots},
            new_values if two_pass else dict(state.values),
            hyper)
        return out_updates, new_state

    update.host_kernel = True  # type: ignore[attr-defined] - it takes host_kernel=
    return extra_args(init, update) if opt.needs_loss else optax.GradientTransformation(
        init, update)
