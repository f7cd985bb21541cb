"""Unbatched inputs of the recurrent blocks, as torch's: a sequence (T, I) with initial states
(K, H), a cell's step (I,) with its state (H,). :class:`~mithril.models.recurrent.Recurrence`
runs them as a batch of one (a batch axis inserted before the features of ``input``, ``h0``
and ``c0``) and drops that axis from its output: the same numbers as the batched call,
and the outputs without the batch axis, as torch returns them. And the ``batch_first``
layout's transpose (:class:`_TimeMajor`), which leaves an unbatched sequence as it is."""

from __future__ import annotations

from typing import Any

from .operator import ShapeError, fmt
from .shaping import Transpose

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


class _TimeMajor(Transpose):
    """(N, T, I) <-> (T, N, I), a ``batch_first`` sequence's input and output; an unbatched
    (T, I) one as it is (torch ignores ``batch_first`` there). Any other rank is named as the
    block's error, not as a bad permutation."""

    #: the sequence's float data, checked and cast as the recurrence's own input (a Transpose
    #: takes any dtype: a torch int64 or float32 tensor reached torch's matmul unnamed)
    any_dtype_inputs: frozenset[str] = frozenset()

    def __init__(self, who: str) -> None:
        super().__init__((1, 0, 2))
        self.who = who

    def _perm(self, ndim: int) -> tuple[int, ...]:
        return (0, 1) if ndim == 2 else super()._perm(ndim)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is not None and len(s) not in (2, 3):
            raise ShapeError(f"{self.who}: 'input' must be (N, T, I) with batch_first, or "
                             f"unbatched (T, I), got shape {fmt(s)}")
        return super().infer_shape(shapes)


_TimeMajor.__name__ = "Transpose"  # the compiler names a block after its class: as before
