"""DoG and DoWG (distance over gradients: learning-rate free), optax.contrib conventions:
two-pass optimizers whose one step size comes from sums over every parameter."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, describe
from .elementwise import maximum, sqrt, where

_INIT_STEPS = ("heuristic", "distance", "learning_rate")


def _dog_reduce(p, g, x0, lr):
    d = x0 - p                   # (a tensor's first update: x₀ is not set yet, and its
    return d * d, g * g, p * p   # distance is left out between the passes)


def _dowg_reduce(p, g, x0, lr):
    d = x0 - p
    return d * d, g * g


def _dog(p, g, x0, lr, first, eta):
    return p - lr * (eta * g), x0 + first * p   # x₀ ← p at the tensor's first update


def _started(tensors: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Each tensor's "x₀ is set" flag (0 before its first update), and the flags after
    this step. Arithmetic only: it also runs traced."""
    started = tensors["started"]
    return started, {**tensors, "started": started * 0.0 + 1.0}


class _Estimates:
    """Where DoG's / DoWG's two running estimates live: optimizer-wide values (optax, one
    step size for all parameters) or, ``layer_wise``, tensor slots (one per tensor)."""

    _estimates: tuple[str, str]
    layer_wise: bool
    #: they enter the step size(s) whatever the tensor's group: a group cannot have its own
    #: (tensor_scalars reads them from self; a group's was silently unused)
    step_wide = ("layer_wise", "epsilon")

    @property
    def tensor_slots(self) -> tuple[str, ...]:
        return ("started", *self._estimates) if self.layer_wise else ("started",)

    @property
    def state_values(self) -> tuple[str, ...]:
        return () if self.layer_wise else self._estimates

    def rule(self) -> tuple[Any, ...]:
        # one estimate or one per tensor: not both in one state
        return (*super().rule(), self.layer_wise)  # type: ignore[misc]

    def _split(self, tensors: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """The estimates as they were: the tensors' or the state's."""
        return tensors if self.layer_wise else values

    def _store(self, tensors: dict[str, Any], values: dict[str, Any],
               new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return ({**tensors, **new}, values) if self.layer_wise else (tensors, new)

    def _total(self, x: Any) -> Any:
        """A per-tensor sum as the estimate takes it: per tensor, or over all of them."""
        return x if self.layer_wise else x.sum()


class DoG(_Estimates, Optimizer):
    """DoG (Ivgi et al., 2023) as optax.contrib.dog: one step size for all parameters::

        r ← max(r, ‖x₀ − x‖)            (over every parameter; r starts at r_ε)
        S ← S + ‖g‖²                     (likewise)
        p ← p − lr · r / √(S + ε) · g

    ``init_step`` (optax's): ``("heuristic", c)`` r_ε = c·(1 + ‖x₀‖) (default, c = 1e-6),
    ``("distance", r_ε)``, or ``("learning_rate", η₀)``: r_ε = 0 and the first step size is
    η₀. The norms are sums over every parameter, taken in a first, read-only pass (see
    ``Optimizer.reductions``); ``r`` and ``S`` are optimizer-wide values (``state.values``).
    ``x₀`` (slot ``x0``) is each tensor's value at its first update (optax copies it at
    ``init``: the same, as nothing moves a tensor before; tensor slot ``started`` says which
    have it). With ``"heuristic"``, ‖x₀‖ is over the tensors updated at step 1. Defaults are
    optax's: lr 1 (a multiplier of the estimate), ε 1e-8, no decay; ``weight_decay`` is
    optax's coupled ``add_decayed_weights`` in front (``g ← g + wd·p``; its ``mask``:
    ``weight_decay_mask``). torch 2.x and Keras 3 have none.

    Parameter groups: a group's ``learning_rate`` / ``lr_scale`` multiplies the one step
    size (``optax.multi_transform`` with one DoG per group estimates one per group instead:
    build one optimizer per group for that); ``init_step`` and ``epsilon`` are the
    optimizer's only (``step_wide``: refused in a group). Likewise for :class:`DoWG`.

    ``layer_wise=True``: L-DoG (the paper's layer-wise variant, the ``dog-optimizer``
    package's ``LDoG``): every tensor has its own r, S and step size, the same formulas with
    the norms of that tensor only (r_ε = c·(1 + ‖x₀‖) of the tensor, ε added to each S);
    ``optax.multi_transform`` with one ``contrib.dog`` per tensor computes the same. r and S
    are then tensor slots ``max_dist`` and ``sum_sq``, and a tensor's first step is its own
    first update. The package's ``DoG(reps_rel=c)`` is ``init_step=("heuristic", c)``; its
    ``init_eta=η₀`` is ``("learning_rate", η₀)`` at lr 1 (optax multiplies η₀ by lr, the
    package does not); its estimate per *parameter group* is one DoG per group here.
    """

    slots = ("x0",)
    _estimates = ("max_dist", "sum_sq")
    loaded_domains = {"started": "flag", "max_dist": "nonnegative", "sum_sq": "nonnegative"}
    step_wide = ("init_step", *_Estimates.step_wide)
    reductions = 3
    #: ε is added to the squared norms' running sum (a float64 value or tensor slot), not
    #: to a float16 element: 1e-8 does not round to 0 there (checks.check_update)
    epsilon_elementwise = False

    def __init__(self, learning_rate: float = 1.0,
                 init_step: tuple[str, float] = ("heuristic", 1e-6), epsilon: float = 1e-8,
                 weight_decay: float = 0.0, layer_wise: bool = False, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.layer_wise = check_flag("layer_wise", layer_wise)
        if (not isinstance(init_step, (tuple, list)) or len(init_step) != 2
                or init_step[0] not in _INIT_STEPS):
            raise ValueError(f"init_step must be a pair (kind, value), kind one of "
                             f"{_INIT_STEPS}, got {describe(init_step)}")
        self.init_step = (init_step[0], check_positive("init_step", init_step[1]))
        self.epsilon = check_positive("epsilon", epsilon)

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate,)

    def reduce_math(self) -> Any:
        return _dog_reduce

    def kernel_math(self) -> Any:
        return _dog

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        # arithmetic only: it also runs traced (the jitted JAX engine, optax_transformation)
        kind, c = self.init_step
        started, tensors = _started(tensors)
        old, total = self._split(tensors, values), self._total
        # the estimate's first step: no tensor (layer-wise: this tensor) has x₀ yet. Not
        # ``step == 1``: ``step`` is each tensor's own count where they differ (a group's
        # step_offset, a parameter's missed steps), and r, S are one value for all of them
        first = total(started == 0.0) if self.layer_wise else (started == 0.0).all()
        r_eps = {"heuristic": c * (1 + sqrt(total(sums[2]))), "distance": c,
                 "learning_rate": 0.0}[kind]
        r = where(first, r_eps, old["max_dist"])
        max_dist = maximum(r, sqrt(total(started * sums[0])))
        sum_sq = old["sum_sq"] + total(sums[1])
        eta = max_dist / sqrt(sum_sq + self.epsilon)
        if kind == "learning_rate":
            eta = where(first, c, eta)
        tensors, values = self._store(tensors, values, {"max_dist": max_dist, "sum_sq": sum_sq})
        return (1.0 - started, eta), tensors, values


class DoWG(_Estimates, Optimizer):
    """DoWG (Khaled et al., 2023) as optax.contrib.dowg: DoG with weighted gradients::

        r² ← max(r², ‖x₀ − x‖²)          (over every parameter; r² starts at r₀²)
        W ← W + r²·‖g‖²
        p ← p − lr · r² / (√W + ε) · g

    ``init_estim_sq_dist`` r₀² (None: ε, as optax). The sums are over every parameter,
    taken in a first, read-only pass; ``r²`` and ``W`` are optimizer-wide values
    (``state.values``); ``x₀`` (slot ``x0``) is each tensor's value at its first update
    (optax copies it at ``init``: the same, as nothing moves a tensor before; tensor slot
    ``started`` says which have it). Defaults are optax's: lr 1, ε 1e-4, no decay; ``weight_decay`` is optax's
    coupled ``add_decayed_weights`` in front (``g ← g + wd·p``). torch 2.x and Keras 3 have
    none.

    ``layer_wise=True``: one r², W and step size per tensor (DoG's layer-wise variant, as
    :class:`DoG`'s; ``optax.multi_transform`` with one ``contrib.dowg`` per tensor), kept in
    the tensor slots ``estim_sq_dist`` and ``weighted_sq``.
    """

    slots = ("x0",)
    _estimates = ("estim_sq_dist", "weighted_sq")
    loaded_domains = {"started": "flag", "estim_sq_dist": "nonnegative",
                      "weighted_sq": "nonnegative"}
    step_wide = ("init_estim_sq_dist", *_Estimates.step_wide)  # (as DoG's)
    reductions = 2

    def __init__(self, learning_rate: float = 1.0, init_estim_sq_dist: float | None = None,
                 epsilon: float = 1e-4, weight_decay: float = 0.0, layer_wise: bool = False,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.layer_wise = check_flag("layer_wise", layer_wise)
        self.init_estim_sq_dist = (None if init_estim_sq_dist is None else
                                   check_positive("init_estim_sq_dist", init_estim_sq_dist))
        self.epsilon = check_positive("epsilon", epsilon)

    def state_value_init(self, name: str) -> float:
        if name != "estim_sq_dist":
            return 0.0
        return self.epsilon if self.init_estim_sq_dist is None else self.init_estim_sq_dist

    def slot_init(self, slot: str) -> float:  # (layer-wise, the estimates are tensor slots)
        return self.state_value_init(slot)

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate,)

    def reduce_math(self) -> Any:
        return _dowg_reduce

    def kernel_math(self) -> Any:
        return _dog

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        started, tensors = _started(tensors)
        old, total = self._split(tensors, values), self._total
        estim = maximum(old["estim_sq_dist"], total(started * sums[0]))
        weighted = estim * total(sums[1]) + old["weighted_sq"]
        eta = estim / (sqrt(weighted) + self.epsilon)
        tensors, values = self._store(tensors, values,
                                      {"estim_sq_dist": estim, "weighted_sq": weighted})
        return (1.0 - started, eta), tensors, values
