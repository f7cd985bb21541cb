"""``NLLLoss``, as ``torch.nn.NLLLoss`` / ``F.nll_loss``: CrossEntropy's ``"log_probs"`` loss
with torch's class axis (1, or 0 for one unbatched row) and torch's defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import DTypeError
from .losses import CrossEntropy
from .operator import Shape, ShapeError, fmt


class NLLLoss(CrossEntropy):
    """−weight[t] · input[t] per row, as ``torch.nn.NLLLoss(weight=None, ignore_index=-100,
    reduction="mean")``: ``input`` holds log-probabilities (used as they are, any values),
    (N, C), (N, C, d1, ...) or one row (C,); ``target`` the integer class indices, (N,),
    (N, d1, ...) or 0-d. Rows whose target equals ``ignore_index`` (default -100, as torch)
    have loss and gradient 0; ``"mean"`` divides the sum by Σ weight[t] over the rows not
    ignored (their count without weights), so a batch with every row ignored has a NaN mean
    (0/0), as torch; ``"sum"`` / ``"none"`` as named. ``ignore_index=None`` ignores nothing.
    No ``label_smoothing`` (torch's NLL has none: CrossEntropy takes it) and no probability
    targets (torch refuses them): a float target is a ``DTypeError`` naming its key. The
    kernels are :class:`CrossEntropy`'s (see :mod:`~mithril.models.cross_entropy_options`)."""

    def __init__(self, weight: Any = None, ignore_index: int | None = -100,
                 reduction: str = "mean") -> None:
        try:
            super().__init__(reduction, input_type="log_probs", axis=1, weight=weight,
                             ignore_index=ignore_index)
        except (TypeError, ValueError) as e:  # its messages name CrossEntropy
            raise type(e)(str(e).replace("CrossEntropy", "NLLLoss")) from None

    def _class_axis(self, rank: int) -> int:
        """torch's: axis 1, or 0 for an unbatched row (C,)."""
        if rank == 0:
            raise ShapeError("NLLLoss: 'input' needs a class axis, got shape ()")
        return 1 if rank > 1 else 0

    def infer_shape(self, shapes):
        s, t = shapes.get("input"), shapes.get("target")
        if s is not None and t is not None and len(t) == len(s):
            raise ShapeError(f"NLLLoss: 'target' must hold class indices of shape "
                             f"{fmt(s[:1] + s[2:])} for 'input' {fmt(s)}, got {fmt(t)} "
                             f"(probability targets: CrossEntropy)")
        try:
            return super().infer_shape(shapes)
        except ShapeError as e:  # (CrossEntropy's weight-length message)
            raise ShapeError(str(e).replace("CrossEntropy", "NLLLoss")) from None

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, Any], names: Mapping[str, str]) -> None:
        dt = dtypes.get("target")
        if dt is not None and "int" not in dt:
            raise DTypeError(f"NLLLoss: target '{names['target']}' must hold integer class "
                             f"indices, got dtype {dt}")
        super().check_inputs(shapes, dtypes, arrays, names)

    def __repr__(self) -> str:
        return (f"NLLLoss(weight={None if self.weight is None else self.weight.tolist()}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r})")
