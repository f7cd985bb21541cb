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
  ``scheduler.step()`` only when ``state.applied`` is true.

The buffers are sums in the gradients' dtype on the gradients' device (in place on NumPy and
torch); ``mean()`` multiplies by ``1/Σw`` once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError

__all__ = ["Accumulate", "AccumulateState", "GradientAccumulator"]


def _module(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def _copy(x: Any) -> Any:
    mod = _module(x)
    if mod == "torch":
        return x.detach().clone()
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.array(x, copy=True)  # on CPU, optimizer-owned JAX arrays change in place
    return np.array(x, copy=True)


def _add_into(buf: Any, g: Any, w: float) -> Any:
    """``buf + w·g``, in place where the array type allows."""
    mod = _module(buf)
    if mod == "torch":
        return buf.add_(g.detach(), alpha=w) if w != 1 else buf.add_(g.detach())
    if mod in ("jax", "jaxlib"):
        return buf + g * w if w != 1 else buf + g
    if w != 1:
        buf += np.multiply(g, w, dtype=buf.dtype)
    else:
        buf += g
    return buf


def _scaled(x: Any, s: float) -> Any:
    if _module(x) in ("jax", "jaxlib"):
        return x * np.asarray(s, dtype=x.dtype)
    if _module(x) == "torch":
        return x * s
    return x * x.dtype.type(s)


class GradientAccumulator:
    """Sums gradient dicts; :meth:`mean` is their (weighted) mean.

    ``add(grads, weight=1.0)``: accumulate one micro-batch. With a mean-reduced loss, pass
    ``weight=micro_batch_size`` when the micro-batches differ in size, so that :meth:`mean`
    equals the gradient of the concatenated batch. Every ``add`` must have the same keys.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._sum: dict[str, Any] | None = None
        self.count = 0
        self.total_weight = 0.0

    def add(self, gradients: Mapping[str, Any], weight: float = 1.0) -> None:
        if not isinstance(gradients, Mapping):
            raise TypeError(f"gradients must be a dict of arrays, got {type(gradients).__name__}")
        w = float(weight)
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"weight must be positive and finite, got {weight!r}")
        if self._sum is None:
            self._sum = {k: _scaled(g, w) if w != 1 else _copy(g) for k, g in gradients.items()}
        else:
            if gradients.keys() != self._sum.keys():
                raise KeyMismatchError(
                    f"accumulated gradients have keys {sorted(self._sum)}, got {sorted(gradients)}")
            for k, g in gradients.items():
                self._sum[k] = _add_into(self._sum[k], g, w)
        self.count += 1
        self.total_weight += w

    def sum(self) -> dict[str, Any]:
        """The weighted sum Σ wᵢ·gᵢ (the internal buffers; do not modify)."""
        if self._sum is None:
            raise RuntimeError("nothing accumulated yet")
        return dict(self._sum)

    def mean(self) -> dict[str, Any]:
        """Σ wᵢ·gᵢ / Σ wᵢ (new arrays)."""
        s = self.sum()
        inv = 1.0 / self.total_weight
        return {k: _scaled(v, inv) for k, v in s.items()}

    def __repr__(self) -> str:
        return f"GradientAccumulator(count={self.count}, total_weight={self.total_weight})"


class AccumulateState:
    """State of :class:`Accumulate`: the wrapped optimizer's state and the gradient buffer.

    ``applied`` tells whether the last ``update`` stepped the wrapped optimizer;
    ``micro_step`` counts micro-batches since the last step; ``step``, ``num_skipped`` and
    ``last_step_skipped`` (a non-finite step refused by the wrapped optimizer) mirror the
    wrapped state; ``last_step_skipped`` is False on calls that only accumulated.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.accumulator = GradientAccumulator()
        self.applied = False
        self.last_step_skipped = False

    @property
    def micro_step(self) -> int:
        return self.accumulator.count

    @property
    def step(self) -> int:
        return getattr(self.inner, "step", 0)

    @property
    def num_skipped(self) -> int:
        return getattr(self.inner, "num_skipped", 0)

    def __repr__(self) -> str:
        return f"AccumulateState(micro_step={self.micro_step}, inner={self.inner!r})"


class Accumulate:
    """Wrap ``optimizer`` so that it steps once every ``k`` calls with the mean gradient.

    ``update(params, gradients, state, weight=1.0)`` adds ``gradients`` (weighted) to the
    buffer; on the ``k``-th call it runs ``optimizer.update(params, mean, inner_state)`` and
    clears the buffer, otherwise ``params`` come back unchanged (``state.applied`` is False).
    Learning-rate methods are forwarded, so schedulers work on the wrapper (step them only when
    ``state.applied``).
    """

    def __init__(self, optimizer: Any, k: int) -> None:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.optimizer = optimizer
        self.k = int(k)

    def init(self, params: Mapping[str, Any]) -> AccumulateState:
        return AccumulateState(self.optimizer.init(params))

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
               state: AccumulateState, weight: float = 1.0) -> tuple[Any, AccumulateState]:
        if not isinstance(state, AccumulateState):
            raise TypeError(f"state must come from Accumulate.init, got {type(state).__name__}")
        state.accumulator.add(gradients, weight)
        if state.accumulator.count < self.k:
            state.applied = False
            state.last_step_skipped = False
            return params, state
        mean = state.accumulator.mean()
        state.accumulator.reset()
        params, state.inner = self.optimizer.update(params, mean, state.inner)
        state.applied = True
        state.last_step_skipped = bool(getattr(state.inner, "last_step_skipped", False))
        return params, state

    # learning rate (for schedulers)
    def get_learning_rate(self) -> float:
        return self.optimizer.get_learning_rate()

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.get_learning_rate()

    def __repr__(self) -> str:
        return f"Accumulate({self.optimizer!r}, k={self.k})"
