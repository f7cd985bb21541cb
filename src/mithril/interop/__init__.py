"""Using mithril's pieces inside other frameworks' training loops.

* :func:`torch_optimizer` - any mithril optimizer as a real ``torch.optim.Optimizer``
  (:mod:`.torch_optim`; torch is imported only when it is called).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .torch_optim import TorchOptimizer

__all__ = ["TorchOptimizer", "torch_optimizer"]


def torch_optimizer(optimizer: Any, params: Any) -> TorchOptimizer:
    """``optimizer`` (a mithril optimizer) as a ``torch.optim.Optimizer`` over ``params``;
    see :func:`mithril.interop.torch_optim.torch_optimizer`."""
    from .torch_optim import torch_optimizer as make

    return make(optimizer, params)


def __getattr__(name: str) -> Any:
    if name == "TorchOptimizer":
        from .torch_optim import TorchOptimizer

        return TorchOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
