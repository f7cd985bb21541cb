"""Differentially private training (Abadi et al., 2016): per-example gradients clipped to a
global norm, summed, noised and averaged before any base optimizer's step, as
``optax.contrib.differentially_private_aggregate``; :class:`DPSGD` is
``optax.contrib.dpsgd``. The privacy a run spends (ε for σ, the sampling rate, the steps
and δ; σ for a target ε): :mod:`mithril.utils.privacy_accounting`, re-exported here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from ...errors import ShapeError
from ..privacy_accounting import PrivacyAccountant, get_epsilon, get_noise_multiplier
from .checks import check_int, check_positive, describe
from .noisy_sgd import gaussian_noise
from .outer_wrapper import OuterWrapper, check_base, check_grads
from .sgd import SGD
from .state import OptimizerState
from .tensorwise import JaxOps, NumpyOps, ops_for

#: the state's count of aggregated steps (the noise's counter: step = count + 1)
COUNT = "dp_count"
_HINT = ("one row per example along a leading batch axis: compute them with "
         "mithril.utils.per_example.per_example_gradients")


def _check_seed(value: Any) -> int:
    return check_int("seed", value, maximum=2**32 - 1)


def _check_expected(value: Any) -> int | None:
    return None if value is None else check_int("expected_batch_size", value, minimum=1)


class DPAggregateState(NamedTuple):
    """The state of :meth:`DifferentiallyPrivate.optax_aggregate`: the steps aggregated."""

    count: Any


#: JAX: the jitted aggregation (made on first use)
_JITTED: Any = None


def clipped_sums(xp: NumpyOps, gradients: Mapping[str, Any], batch: int,
                 clip: Any, eps: Any = 0.0) -> dict[str, Any]:
    """``Σ_i c_i · g_i`` of :class:`DifferentiallyPrivate`, flat, per parameter (a sum over
    ranks of these is the whole batch's: how :class:`~mithril.distributed.DataParallel`
    aggregates); ``eps`` is ``clip_epsilon``."""
    # (the row length spelled out: an empty batch cannot infer a -1)
    rows = {n: g.reshape(batch, math.prod(tuple(g.shape[1:]))) for n, g in gradients.items()}
    sq = sum((r * r).sum(1) for r in rows.values())
    with np.errstate(all="ignore"):  # (a zero example: C/0 = inf, 0/0 = NaN; both 1)
        ratio = clip / (xp.m.sqrt(sq) + eps)
    scale = xp.m.where(ratio < 1.0, ratio, xp.m.ones_like(ratio))
    out = {n: scale @ r for n, r in rows.items()}  # (flat: a 0-d result stays an array)
    # (NumPy's bfloat16 product, ml_dtypes', comes back float32: rounded as torch's and JAX's)
    return {n: s.astype(rows[n].dtype) if isinstance(s, np.ndarray) and s.dtype != rows[n].dtype
            else s for n, s in out.items()}


def noised_mean(xp: NumpyOps, sums: Mapping[str, Any], batch: int, std: Any, seed: int,
                step: Any, noisy: bool) -> dict[str, Any]:
    """``(sums + C·σ·ξ_t) / batch``, flat (no draw unless ``noisy``: optax's numbers
    exactly for σ = 0); ``batch`` is the denominator (the expected batch size, if set)."""
    out = {}
    for n, s in sums.items():
        if noisy:  # (the draws of the parameter's shape, in its element order)
            s = s + std * gaussian_noise(xp, tuple(s.shape), seed, f"dp/{n}", step, s.dtype)
        out[n] = s / batch
    return out


def _aggregate(xp: NumpyOps, gradients: Mapping[str, Any], batch: int, denom: int, clip: Any,
               eps: Any, std: Any, seed: int, step: Any, noisy: bool) -> dict[str, Any]:
    """``ḡ`` of :class:`DifferentiallyPrivate` (``std`` = C·σ, ``denom`` the batch size or
    the expected one)."""
    mean = noised_mean(xp, clipped_sums(xp, gradients, batch, clip, eps), denom, std, seed,
                       step, noisy)
    return {n: m.reshape(tuple(gradients[n].shape[1:])) for n, m in mean.items()}


class DifferentiallyPrivate(OuterWrapper):
    """DP-SGD's aggregation around ``base_optimizer`` (any optimizer here but LBFGS), equal
    to ``optax.chain(optax.contrib.differentially_private_aggregate(l2_norm_clip,
    noise_multiplier), base)`` (0.2.8). ``update`` takes **per-example gradients**: for
    each parameter an array of shape ``(B, *param.shape)``, row ``i`` the gradient of
    example ``i``'s own loss (:func:`~mithril.utils.per_example.per_example_gradients`).
    Per step ``t`` (the batch size ``B``, C = ``l2_norm_clip``, σ = ``noise_multiplier``)::

        n_i = ‖(g_i[p] for every parameter p)‖₂       example i's global norm
        c_i = min(C / (n_i + ε), 1)  (1 where C / n_i is NaN: 0/0; ε = clip_epsilon)
        ḡ   = (Σ_i c_i · g_i + C·σ · ξ_t) / B'        ξ_t ~ N(0, I), per parameter
        the base optimizer's step with ḡ

    ``B' = B``, the batch's size (optax), or ``expected_batch_size`` when it is set: Opacus's
    ``DPOptimizer`` divides by the *expected* batch size, which with Poisson sampling (each
    example drawn with probability q, a batch of varying size) keeps the noise's scale
    fixed relative to the sum: ``expected_batch_size = q · N``. ``clip_epsilon``: 0 is
    optax's clipping, 1e-6 Opacus's (``max_grad_norm / (norm + 1e-6)``). Both together
    with σ = 0 step as ``opacus.PrivacyEngine.make_private``'s optimizer to rounding.

    The noise is :func:`~.noisy_sgd.gaussian_noise`: a pure function of ``seed``, the
    parameter's name and ``t`` (the same draws on NumPy, torch and JAX, resumed runs
    included); optax's ``jax.random`` draws differ, the distribution is the same. With
    ``noise_multiplier=0`` the step is optax's exactly (clipping only: no privacy).

    The state is the base optimizer's (its learning rate, schedulers, groups, weight
    decay and ``nonfinite`` are the base's) plus the value ``"dp_count"`` (aggregated
    steps), which ``state_dict`` and checkpoints keep. ``gradients`` may leave parameters out
    (not in ``n_i``, no noise, no step for them, as the base treats a missing gradient). A
    call that raises (a gradient without the batch axis, batch sizes that disagree, a row of
    another shape or dtype) changes neither the params nor the state (nor the count).
    """

    OWN = ("l2_norm_clip", "noise_multiplier", "seed", "expected_batch_size", "clip_epsilon")
    #: ``update`` takes per-example gradients (what a training loop giving the batch's
    #: gradient, as make_train_step, the CLI or the torch drop-in, can key a refusal on)
    takes_per_example_gradients: bool = True

    def __init__(self, base_optimizer: Any, l2_norm_clip: float = 1.0,
                 noise_multiplier: float = 1.0, seed: int = 0, *,
                 expected_batch_size: int | None = None, clip_epsilon: float = 0.0) -> None:
        self.__dict__["base_optimizer"] = check_base(base_optimizer, type(self).__name__)
        self.l2_norm_clip = check_positive("l2_norm_clip", l2_norm_clip)
        self.noise_multiplier = check_positive("noise_multiplier", noise_multiplier)
        self.seed = _check_seed(seed)
        self.expected_batch_size = _check_expected(expected_batch_size)
        self.clip_epsilon = check_positive("clip_epsilon", clip_epsilon)
        self._backend = base_optimizer._backend

    def check_own(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        checks = {"l2_norm_clip": lambda v: check_positive("l2_norm_clip", v),
                  "noise_multiplier": lambda v: check_positive("noise_multiplier", v),
                  "seed": _check_seed, "expected_batch_size": _check_expected,
                  "clip_epsilon": lambda v: check_positive("clip_epsilon", v)}
        return {k: checks[k](v) for k, v in hp.items() if k in checks}

    def own_values(self) -> tuple[str, ...]:
        return (COUNT,)

    def checked_value(self, name: str, value: Any) -> float:
        v = super().checked_value(name, value)
        if not (v >= 0 and v.is_integer()):
            raise ValueError(f"state dict value {name!r} must be a count, got {describe(value)}")
        return v

    def init(self, params: Mapping[str, Any]) -> OptimizerState:
        state = super().init(params)
        state.values[COUNT] = 0.0
        return state

    def check_per_example(self, params: Mapping[str, Any], gradients: Any,
                          state: OptimizerState, allow_empty: bool = False) -> int:
        """The batch size of ``gradients`` (per-example, checked against ``params`` and
        ``state``), or the error naming the key and shapes. ``allow_empty``: one rank's
        share of a data-parallel step, which may hold no example (0 rows, or ``{}``: a rank
        out of batches) where the whole step's batch does not (checked over the ranks)."""
        who = type(self).__name__
        check_grads(self, params, {}, state, "gradients")  # (the params and state first)
        self.check_own({k: getattr(self, k) for k in self.OWN})  # (set as attributes since)
        if COUNT not in state.values:
            raise ValueError(f"{who}: state lacks {COUNT!r} (not made by {who}.init?)")
        if isinstance(gradients, Mapping) and not gradients and allow_empty:
            return 0
        if not isinstance(gradients, Mapping) or not gradients:
            raise TypeError(f"{who}.update takes per-example gradients, a non-empty dict of "
                            f"arrays ({_HINT}), got {describe(gradients)}")
        shapes = {n: tuple(getattr(g, "shape", ())) for n, g in gradients.items()}
        for n, s in shapes.items():
            want = tuple(params[n].shape) if n in params else None
            if want is not None and (len(s) != len(want) + 1 or s[1:] != want):
                got = (f"the parameter's own shape {s} (a batch's gradient?)" if s == want
                       else f"shape {s}, the parameter {want}")
                raise ShapeError(f"{who}: gradients[{n!r}] has {got}: per-example gradients "
                                 f"have shape (batch{''.join(f', {d}' for d in want)}), {_HINT}")
        sizes = {s[0] for n, s in shapes.items() if n in params}
        if len(sizes) > 1:
            raise ShapeError(f"{who}: the per-example gradients disagree on the batch size "
                             f"(axis 0): {', '.join(f'{n!r} {s}' for n, s in shapes.items())}")
        if sizes == {0} and self.expected_batch_size is None and not allow_empty:
            raise self.empty_batch_error(f"shapes {shapes}")
        # (each row as a gradient: the backend, dtype and names, as the base would check; an
        # empty batch's sum is a zero row of the same kind)
        check_grads(self, params, {n: g[:1].reshape(tuple(g.shape[1:])) if len(g) else g.sum(0)
                                   for n, g in gradients.items()}, state, "gradients")
        return sizes.pop()

    def empty_batch_error(self, what: str) -> ShapeError:
        """The refusal of a step whose whole batch holds no example (``what``: its shapes)."""
        return ShapeError(f"{type(self).__name__}: per-example gradients of an empty batch "
                          f"({what}); with Poisson sampling set expected_batch_size, and an "
                          f"empty batch is a step of noise alone (as Opacus takes it)")

    def aggregate(self, gradients: Mapping[str, Any], batch: int, step: int) -> dict[str, Any]:
        """``ḡ`` of the class docs for the per-example ``gradients`` at 1-based ``step`` (on
        JAX one jitted program per signature: the step and hyperparameters are arguments)."""
        clip, std = self.l2_norm_clip, self.l2_norm_clip * self.noise_multiplier
        denom, eps = self.expected_batch_size or batch, self.clip_epsilon
        if self._backend.name != "jax":
            return _aggregate(ops_for(self._backend), gradients, batch, denom, clip, eps, std,
                              self.seed, step, bool(std))
        global _JITTED
        if _JITTED is None:
            import jax

            _JITTED = jax.jit(lambda g, b, d, c, e, s, seed, t, noisy: _aggregate(
                JaxOps(), g, b, d, c, e, s, seed, t, noisy), static_argnums=(1, 2, 6, 8))
        return _JITTED(dict(gradients), batch, denom, clip, eps, std, self.seed, step,
                       bool(std))

    def optax_aggregate(self) -> Any:
        """This aggregation as an ``optax.GradientTransformation`` for JAX programs: per-example
        updates in (a pytree whose leaves have the batch axis first), ``ḡ`` out, its state
        the step count (an int32 0-d array). The noise is :meth:`update`'s (a top-level
        dict's leaves are named by their key; other pytrees by their ``keystr`` path), so
        ``optax.chain(dp.optax_aggregate(), optax_transformation(dp.base_optimizer))`` in a
        ``jax.jit`` steps as ``dp.update`` does on every backend. The hyperparameters are
        read when this is called (later changes need a new transformation)."""
        import jax
        import jax.numpy as jnp
        import optax

        clip, std, seed = self.l2_norm_clip, self.l2_norm_clip * self.noise_multiplier, self.seed
        expected, eps = self.expected_batch_size, self.clip_epsilon

        def init(params: Any) -> DPAggregateState:
            del params
            return DPAggregateState(jnp.zeros((), jnp.int32))

        def update(updates: Any, state: DPAggregateState, params: Any = None) -> tuple:
            del params
            leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
            sizes = {tuple(g.shape[:1]) for _, g in leaves}
            if len(sizes) != 1 or sizes == {()}:
                raise ValueError("DifferentiallyPrivate.optax_aggregate: the updates must be "
                                 "per-example, every leaf with the same batch axis first; got "
                                 + ", ".join(f"{jax.tree_util.keystr(k)} {tuple(g.shape)}"
                                             for k, g in leaves))
            names = [k[0].key if len(k) == 1 and isinstance(k[0], jax.tree_util.DictKey)
                     else jax.tree_util.keystr(k) for k, _ in leaves]
            batch = sizes.pop()[0]
            out = _aggregate(JaxOps(), {n: g for n, (_, g) in zip(names, leaves, strict=True)},
                             batch, expected or batch, clip, eps, std, seed, state.count + 1,
                             bool(std))
            return (jax.tree_util.tree_unflatten(treedef, [out[n] for n in names]),
                    DPAggregateState(state.count + 1))

        return optax.GradientTransformation(init, update)

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
               state: OptimizerState) -> tuple[dict[str, Any], OptimizerState]:
        """One step from per-example ``gradients`` (class docs); on any error neither
        ``params`` nor ``state`` has changed."""
        batch = self.check_per_example(params, gradients, state)
        count = state.values[COUNT]
        mean = self.aggregate(gradients, batch, int(count) + 1)
        params, state = self.base_update(params, mean, state)
        state.values[COUNT] = count + 1
        return params, state


class DPSGD(DifferentiallyPrivate):
    """``optax.contrib.dpsgd(learning_rate, l2_norm_clip, noise_multiplier, seed, momentum,
    nesterov)``: :class:`DifferentiallyPrivate` around ``SGD(learning_rate, momentum,
    nesterov, convention="optax")`` (``momentum=None``: plain SGD, as optax's identity;
    ``optax.trace``'s momentum is torch's without dampening). ``update`` takes per-example
    gradients; the math, noise and state are :class:`DifferentiallyPrivate`'s."""

    def __init__(self, learning_rate: float = 1e-2, l2_norm_clip: float = 1.0,
                 noise_multiplier: float = 1.0, seed: int = 0, momentum: float | None = None,
                 nesterov: bool = False, *, expected_batch_size: int | None = None,
                 clip_epsilon: float = 0.0) -> None:
        base = SGD(learning_rate, 0.0 if momentum is None else momentum,
                   nesterov=nesterov and momentum is not None, convention="optax")
        super().__init__(base, l2_norm_clip, noise_multiplier, seed,
                         expected_batch_size=expected_batch_size, clip_epsilon=clip_epsilon)


__all__ = ["DPAggregateState", "DPSGD", "DifferentiallyPrivate", "PrivacyAccountant",
           "get_epsilon", "get_noise_multiplier"]
