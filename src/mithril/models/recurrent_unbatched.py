"""Unbatched inputs of the recurrent blocks, as torch's: a sequence (T, I) with initial states
(K, H), a cell's step (I,) with its state (H,). :class:`~mithril.models.recurrent.Recurrence`
runs them as a batch of one (a batch axis inserted before the features of ``input``, ``h0``
and ``c0``) and drops that axis from its output: the same numbers as the batched call,
and the outputs without the batch axis, as torch returns them."""

from __future__ import annotations

from typing import Any

from .operator import ShapeError, fmt

#: the inputs of a ``Recurrence`` that carry the batch axis, second from the end
BATCHED = ("input", "h0", "c0")


def batch_of_one(x: Any) -> Any:
    """(..., F) -> (..., 1, F), on NumPy, JAX and torch arrays."""
    return x[..., None, :]


def unbatched_vjp(vjp: Any, g: Any, out: Any, args: Any, wrt: Any) -> dict[str, Any]:
    """The batched ``vjp`` on a batch of one, its cotangents of ``input`` / ``h0`` / ``c0``
    without that axis again (the weights' are the same either way)."""
    one = {k: batch_of_one(v) if k in BATCHED and v is not None else v for k, v in args.items()}
    res = vjp(batch_of_one(g), batch_of_one(out), one, wrt)
    return {k: v[..., 0, :] if k in BATCHED else v for k, v in res.items()}


def check_unbatched(who: str, s: tuple[Any, ...], lengths: bool) -> None:
    """``lengths`` (packed sequences) are a batch's, as torch's: refused for (T, I)."""
    if lengths:
        raise ShapeError(f"{who}: 'lengths' needs a batched 'input' (T, N, I) (one length per "
                         f"sequence, as torch's packed sequences), got the unbatched shape "
                         f"{fmt(s)}")
