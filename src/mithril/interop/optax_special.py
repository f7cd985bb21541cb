"""What :func:`~mithril.interop.optax_transformation` knows about optimizers that override
``init`` or ``update`` (:mod:`.optax_transform` runs the elementwise model: slots,
``scalars(step)`` (given the state values it reads, ``scalar_values``, as keyword
arguments), ``math``, the two-pass ``tensor_scalars``).

Such an override is accepted where it is known to stay within that model:

* an ``init`` that only starts some slots as a copy of the params: Lookahead's ``slow``,
  schedule-free's ``z``, Prodigy's ``x0`` (and Muon's, which only checks the shapes). An
  optimizer class may state it itself: ``params_copy_slots = ("z",)``.
* :class:`~mithril.utils.optimizers.tensorwise.TensorwiseOptimizer`'s ``update`` (Muon,
  Adafactor): run by :mod:`.optax_tensorwise`.

Any other override is refused (``TypeError`` naming the optimizer and why), LBFGS with a
word on ``optax.lbfgs`` (which ``LBFGS(convention="optax")`` equals). Also here: a ``tensor_scalars`` that does not trace (NumPy, Python
control flow: schedule-free's, Prodigy's) runs on the host through ``jax.pure_callback``
(:func:`host_tensor_scalars`), and :func:`schedule_free_eval_params`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

__all__ = ["schedule_free_eval_params"]

LBFGS_REFUSAL = (
    "LBFGS cannot be an optax transformation: each of its steps evaluates the loss and "
    "gradients itself, through a closure, while a GradientTransformation's update sees one "
    "gradient. optax has its own: optax.lbfgs (a GradientTransformationExtraArgs whose "
    "update takes value=, grad=, value_fn=, with optax.value_and_grad_from_state). "
    "LBFGS(convention='optax') is optax.lbfgs() (memory_size=10 = history_size, "
    "scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy='one') = "
    "line_search_fn='zoom'; line_search_fn=None with learning_rate=lr is optax.lbfgs("
    "learning_rate=lr, linesearch=None)): one update is one optax iteration, optax's numbers "
    "to rounding. The default convention='torch' (torch.optim.LBFGS's algorithm and "
    "numbers) differs from it: up to max_iter iterations per update, torch's strong_wolfe "
    "line search or a fixed step, and torch's tolerance_grad / tolerance_change stopping "
    "tests. Use either through LBFGS.init / LBFGS.update(params, None, state, closure=...)")


def _known() -> tuple[dict[Any, tuple[str, ...]], Any]:
    """(init override -> the slots it copies from the params, the tensorwise update)."""
    from ..utils.optimizers import lookahead, muon, prodigy, schedule_free, tensorwise

    inits = {lookahead._init: (lookahead.SLOW,), schedule_free._init: ("z",),
             prodigy._init: ("x0",), muon._init: ()}
    return inits, tensorwise._update


def classify(opt: Any) -> str:
    """``"elementwise"`` or ``"tensorwise"``; ``TypeError`` for an optimizer whose
    ``init``/``update`` overrides are not known to stay within the model (module docs)."""
    from ..utils.optimizers.base import Optimizer
    from ..utils.optimizers.lbfgs import LBFGS

    cls, name = type(opt), type(opt).__name__
    if isinstance(opt, LBFGS):
        raise TypeError(LBFGS_REFUSAL if cls is LBFGS else f"{name}: {LBFGS_REFUSAL}")
    if getattr(opt, "takes_per_example_gradients", False):
        raise TypeError(f"{name} takes per-example gradients: chain its aggregation, "
                        f"opt.optax_aggregate(), with optax_transformation(opt.base_optimizer)"
                        f" (docs/privacy.md)")
    inits, tensorwise_update = _known()
    below = cls.__mro__[:cls.__mro__.index(Optimizer)]
    kind = "elementwise"
    for c in below:
        fn = c.__dict__.get("update")
        if fn is None:
            pass
        elif fn is tensorwise_update:
            kind = "tensorwise"
        else:
            raise TypeError(
                f"{name} overrides update() (in {c.__name__}): its step is not only the "
                f"elementwise math (slots, scalars(step), math) or the per-tensor "
                f"tensor_update that an optax transformation runs, so it cannot be one; use "
                f"it through its own init/update")
        fn = c.__dict__.get("init")
        if fn is not None and fn not in inits and getattr(cls, "params_copy_slots", None) is None:
            raise TypeError(
                f"{name} overrides init() (in {c.__name__}): its state is not only the slots "
                f"an optax transformation builds (each filled with slot_init, or a copy of the "
                f"params for the weight averages and a class's params_copy_slots), so it "
                f"cannot be one; use it through its own init/update")
    return kind


def params_copy_slots(opt: Any) -> tuple[str, ...]:
    """The optimizer's own slots that start as a copy of the params (the class's
    ``params_copy_slots``, else those of the ``init`` override it has)."""
    from ..utils.optimizers.base import Optimizer

    declared = getattr(type(opt), "params_copy_slots", None)
    if declared is not None:
        return tuple(declared)
    inits = _known()[0]
    cls = type(opt)
    for c in cls.__mro__[:cls.__mro__.index(Optimizer)]:
        fn = c.__dict__.get("init")
        if fn in inits:
            return tuple(s for s in inits[fn] if s in opt.slot_names())
    return ()


def state_hyperparams(opt: Any) -> tuple[str, ...]:
    """The hyperparameters besides the learning rate that the state keeps and the update
    reads (``state.hyperparams``): schedule-free's ``beta1``, which
    :func:`schedule_free_eval_params` needs too (as optax's ``state.b1``)."""
    from ..utils.optimizers.schedule_free import _ScheduleFree

    return ("beta1",) if isinstance(opt, _ScheduleFree) else ()


# -- tensor_scalars on the host ----------------------------------------------------------------
def _as_host(opt: Any, t: Any, lr: float, sums: Any, cols: Any, tensors: Any, values: Any,
             sizes: np.ndarray, attrs: dict[str, float] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``opt.tensor_scalars`` on the host, as the engines call it (float64 arrays, the
    values as Python floats, the optimizer at learning rate ``lr``): (extras, shape (e, n);
    tensor slots, (s, n); values, (v,))."""
    host = copy.copy(opt)
    host.assign({**(attrs or {}), "learning_rate": lr})  # (the traced ones' values)
    n = len(sizes)
    names_t, names_v = tuple(opt.tensor_slots), tuple(opt.state_values)
    f64 = np.float64
    with np.errstate(all="ignore"):
        ext, new_t, new_v = host.tensor_scalars(
            t, tuple(np.asarray(s, f64) for s in sums), tuple(np.asarray(c, f64) for c in cols),
            {s: np.asarray(x, f64) for s, x in zip(names_t, tensors)},
            {v: float(x) for v, x in zip(names_v, values)}, sizes)
        if set(new_t) != set(names_t) or set(new_v) != set(names_v):
            raise RuntimeError(f"{type(opt).__name__}.tensor_scalars must return every tensor "
                               f"slot {sorted(names_t)} and value {sorted(names_v)}")
        e = (np.stack([np.broadcast_to(np.asarray(x, f64), (n,)) for x in ext]) if ext
             else np.zeros((0, n), f64))
        ts = (np.stack([np.broadcast_to(np.asarray(new_t[s], f64), (n,)) for s in names_t])
              if names_t else np.zeros((0, n), f64))
        vs = np.array([float(new_v[v]) for v in names_v], f64)
    return e, ts, vs


def host_tensor_scalars(opt: Any, t: Any, lr: Any, sums: tuple, cols: tuple,
                        tensors: dict[str, Any], values: dict[str, Any], sizes: np.ndarray,
                        dt: Any, wide: dict[str, tuple] | None = None
                        ) -> tuple[tuple, dict[str, Any], dict[str, Any]]:
    """``opt.tensor_scalars`` computed on the host in float64 by a ``jax.pure_callback``
    (pure and jittable: the engines' very function), for traced ``t``, ``lr`` and the
    per-tensor arrays (each of shape ``(n,)``); ``wide``: traced optimizer-wide
    hyperparameters, each as its (hi, lo) pair. Returns what ``tensor_scalars`` does, as
    JAX arrays of dtype ``dt``."""
    import jax
    import jax.numpy as jnp

    n = len(sizes)
    names_t, names_v = tuple(opt.tensor_slots), tuple(opt.state_values)
    # how many extras: one dry run on the host, at step 1, with neutral inputs
    probe = _as_host(opt, 1, float(opt.learning_rate), [np.ones(n)] * len(sums),
                     [np.ones(n)] * len(cols), [np.full(n, float(opt.slot_init(s)))
                                                for s in names_t],
                     [float(opt.state_value_init(v)) for v in names_v], sizes)
    n_ext = probe[0].shape[0]
    out_dt = np.dtype(dt)

    names = sorted(wide or {})

    def callback(step: Any, rate: Any, s: Any, c: Any, ts: Any, vs: Any, hs: Any) -> tuple:
        attrs = {k: float(hs[i, 0]) + float(hs[i, 1]) for i, k in enumerate(names)}
        # (an array of each tensor's own count where a group joined later)
        count = int(step) if np.ndim(step) == 0 else np.asarray(step, np.float64)
        got = _as_host(opt, count, float(rate), list(s), list(c), list(ts), list(vs),
                       sizes, attrs)
        return tuple(x.astype(out_dt) for x in got)

    def stacked(xs: Any, rows: int) -> Any:
        return jnp.stack([jnp.asarray(x, dt) for x in xs]) if rows else jnp.zeros((0, n), dt)

    shapes = (jax.ShapeDtypeStruct((n_ext, n), dt), jax.ShapeDtypeStruct((len(names_t), n), dt),
              jax.ShapeDtypeStruct((len(names_v),), dt))
    ext, new_t, new_v = jax.pure_callback(
        callback, shapes, t, jnp.asarray(lr, dt), stacked(sums, len(sums)),
        stacked(cols, len(cols)), stacked([tensors[s] for s in names_t], len(names_t)),
        jnp.stack([jnp.asarray(values[v], dt) for v in names_v]) if names_v
        else jnp.zeros((0,), dt),
        jnp.array([[jnp.asarray(x, dt) for x in wide[k]] for k in names], dt).reshape(
            len(names), 2), vmap_method="sequential")
    return (tuple(ext[i] for i in range(n_ext)), {s: new_t[i] for i, s in enumerate(names_t)},
            {v: new_v[i] for i, v in enumerate(names_v)})


# -- schedule-free: the parameters to evaluate with -------------------------------------------
def _find_state(state: Any) -> Any:
    """The transformation's state with a ``z`` slot and ``beta1``: ``state`` itself or the
    only such one inside it (``optax.chain``'s tuple, ``inject_hyperparams``' inner state)."""
    import jax

    from .optax_transform import OptaxState

    def ours(x: Any) -> bool:
        return isinstance(x, OptaxState)

    found = [x for x in jax.tree_util.tree_leaves(state, is_leaf=ours)
             if ours(x) and "z" in x.slots and "beta1" in x.hyperparams]
    if len(found) != 1:
        what = "none" if not found else f"{len(found)}"
        if not found and any(ours(x) and "z" in x.slots for x in jax.tree_util.tree_leaves(
                state, is_leaf=ours)):  # (its b1 is the wrapper's: not in the state)
            raise ValueError("schedule_free_eval_params: this is a ScheduleFree wrapper's "
                             "state (make_train_step's program): use "
                             "opt.eval_params(state, params)")
        raise ValueError(f"schedule_free_eval_params: state must hold the state of one "
                         f"schedule-free optax_transformation (ScheduleFreeSGD / "
                         f"ScheduleFreeAdamW: a 'z' slot and hyperparams['beta1']); found "
                         f"{what}")
    return found[0]


def schedule_free_eval_params(state: Any, params: Any) -> Any:
    """The parameters to evaluate with, for the state of a schedule-free optimizer's
    :func:`~mithril.interop.optax_transformation` (or an ``optax.chain`` / wrapper state
    holding it): ``x = (y − (1 − β₁)·z) / β₁`` from the training parameters ``y``
    (``params``) and the state's ``z``, with the state's ``beta1``: what
    ``ScheduleFreeSGD.eval_params`` / ``ScheduleFreeAdamW.eval_params`` give for the
    optimizer's own state, and ``optax.contrib.schedule_free_eval_params`` for optax's. Pure
    and jittable; each leaf keeps its dtype."""
    import jax
    import jax.numpy as jnp

    st = _find_state(state)
    b1 = st.hyperparams["beta1"]

    def one(y: Any, z: Any) -> Any:
        y = jnp.asarray(y)
        b = jnp.asarray(b1).astype(y.dtype)
        return ((y - (1.0 - b) * z) / b).astype(y.dtype)

    return jax.tree.map(one, params, st.slots["z"])
