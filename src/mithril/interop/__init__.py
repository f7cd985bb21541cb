"""Using mithril's pieces inside other frameworks' training loops.

* :func:`torch_optimizer` - any mithril optimizer as a real ``torch.optim.Optimizer``
  (:mod:`.torch_optim`; torch is imported only when it is called).
* :func:`optax_transformation` - any mithril optimizer but LBFGS (which needs a closure:
  ``optax.lbfgs`` is optax's own, and ``LBFGS(convention="optax")`` its algorithm) as an ``optax.GradientTransformation``
  (:mod:`.optax_transform`; jax and optax are imported only when it is called);
  :func:`schedule_free_eval_params` gives a schedule-free transformation's evaluation params.
* :func:`mlx_optimizer` - any mithril optimizer as an ``mlx.optimizers.Optimizer`` for an
  MLX training loop (LBFGS and SAM with ``update(model, grads, closure=...)``;
  :mod:`.mlx_optim`; mlx is imported only when it is called).
* :func:`params_from_torch` / :func:`params_to_torch` - a torch ``state_dict`` (module,
  mapping, safetensors / ``.bin`` file) as a compiled model's params and state, and back
  (:mod:`.torch_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .torch_weights import params_from_torch, params_to_torch

if TYPE_CHECKING:  # pragma: no cover
    from .mlx_optim import MlxOptimizer
    from .optax_transform import OptaxState
    from .torch_optim import TorchOptimizer

__all__ = ["MlxOptimizer", "OptaxState", "TorchOptimizer", "mlx_optimizer", "optax_transformation",
           "params_from_torch", "params_to_torch", "schedule_free_eval_params", "torch_optimizer"]


def torch_optimizer(optimizer: Any, params: Any) -> TorchOptimizer:
    """``optimizer`` (a mithril optimizer) as a ``torch.optim.Optimizer`` over ``params``;
    see :func:`mithril.interop.torch_optim.torch_optimizer`."""
    from .torch_optim import torch_optimizer as make

    return make(optimizer, params)


def mlx_optimizer(optimizer: Any, learning_rate: Any = None) -> MlxOptimizer:
    """``optimizer`` (a mithril optimizer) as an ``mlx.optimizers.Optimizer``;
    ``learning_rate``: a number or an MLX schedule (default: the optimizer's own); see
    :func:`mithril.interop.mlx_optim.mlx_optimizer`."""
    from .mlx_optim import mlx_optimizer as make

    return make(optimizer, learning_rate)


def optax_transformation(optimizer: Any, *, learning_rate: Any = None,
                         scalars: str = "auto", traced_hyperparams: Sequence[str] = (),
                         schedules: Mapping[str, Callable[[Any], Any]] | None = None,
                         mu_dtype: Any = None, slot_dtypes: Mapping[str, Any] | None = None,
                         **hyperparameters: Any) -> Any:
    """``optimizer`` (a mithril optimizer) as an ``optax.GradientTransformation``
    with pure, jittable ``init``/``update``; ``schedules``: optax schedules of other
    hyperparameters (``{"alpha": optax.linear_schedule(...)}``); ``mu_dtype`` /
    ``slot_dtypes``: a slot stored in its own dtype (optax's ``mu_dtype``);
    ``**hyperparameters``: numbers or schedules read at every update (kept in
    ``state.hyperparams``, as ``optax.inject_hyperparams``); see
    :func:`mithril.interop.optax_transform.optax_transformation`."""
    from .optax_transform import optax_transformation as make

    return make(optimizer, learning_rate=learning_rate, scalars=scalars,
                traced_hyperparams=traced_hyperparams, schedules=schedules,
                mu_dtype=mu_dtype, slot_dtypes=None if slot_dtypes is None else
                dict(slot_dtypes), **hyperparameters)


def schedule_free_eval_params(state: Any, params: Any) -> Any:
    """The evaluation params (x) of a schedule-free transformation's ``state`` at ``params``
    (y); see :func:`mithril.interop.optax_special.schedule_free_eval_params`."""
    from .optax_special import schedule_free_eval_params as get

    return get(state, params)


def __getattr__(name: str) -> Any:
    if name == "MlxOptimizer":
        from .mlx_optim import MlxOptimizer

        return MlxOptimizer
    if name == "OptaxState":
        from .optax_transform import OptaxState

        return OptaxState
    if name == "TorchOptimizer":
        from .torch_optim import TorchOptimizer

        return TorchOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
