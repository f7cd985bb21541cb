"""Using mithril's pieces inside other frameworks' training loops.

* :func:`torch_optimizer` - any mithril optimizer as a real ``torch.optim.Optimizer``
  (:mod:`.torch_optim`; torch is imported only when it is called).
* :func:`optax_transformation` - any elementwise mithril optimizer as an
  ``optax.GradientTransformation`` (:mod:`.optax_transform`; jax and optax are imported only
  when it is called).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .optax_transform import OptaxState
    from .torch_optim import TorchOptimizer

__all__ = ["OptaxState", "TorchOptimizer", "optax_transformation", "torch_optimizer"]


def torch_optimizer(optimizer: Any, params: Any) -> TorchOptimizer:
    """``optimizer`` (a mithril optimizer) as a ``torch.optim.Optimizer`` over ``params``;
    see :func:`mithril.interop.torch_optim.torch_optimizer`."""
    from .torch_optim import torch_optimizer as make

    return make(optimizer, params)


def optax_transformation(optimizer: Any, *, learning_rate: Any = None,
                         scalars: str = "auto") -> Any:
    """``optimizer`` (an elementwise mithril optimizer) as an ``optax.GradientTransformation``
    with pure, jittable ``init``/``update``; see
    :func:`mithril.interop.optax_transform.optax_transformation`."""
    from .optax_transform import optax_transformation as make

    return make(optimizer, learning_rate=learning_rate, scalars=scalars)


def __getattr__(name: str) -> Any:
    if name == "OptaxState":
        from .optax_transform import OptaxState

        return OptaxState
    if name == "TorchOptimizer":
        from .torch_optim import TorchOptimizer

        return TorchOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
