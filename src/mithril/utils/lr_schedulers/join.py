"""optax's ``join_schedules`` for schedulers: :class:`JoinSchedules`."""

from __future__ import annotations

from collections.abc import Sequence

from .base import LRScheduler, SupportsLearningRate
from .sequential import SequentialLR

__all__ = ["JoinSchedules"]


class JoinSchedules(SequentialLR):
    """Schedulers one after another, under the names of ``optax.join_schedules``.

    With ``boundaries = [b_1, ..., b_{k-1}]`` (non-decreasing integers ``>= 0``, ``b_0 =
    0``; a repeat or a ``0`` gives a schedule no steps, as in optax), schedule ``i`` is active for ``b_i <= t < b_{i+1}`` and sees the step ``t - b_i``:

    .. math:: \\eta_t = \\text{schedules}_i.\\text{get\\_lr\\_at}(t - b_i)

    exactly optax's ``join_schedules(schedules, boundaries)``. This is :class:`SequentialLR`
    (``milestones`` = ``boundaries``), with the same re-basing: every schedule's ``base_lr``
    becomes ``schedules[0].base_lr`` (the optimizer's learning rate before the first one was
    constructed), the value an optax schedule would get as ``init_value``; schedules with
    explicit rates (:class:`OneCycleLR`, :class:`CyclicLR`, :class:`PiecewiseConstant` with
    ``values``) keep them. A :class:`ReduceLROnPlateau` schedule is accepted, as in
    :class:`SequentialLR`.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        schedules: at least one distinct scheduler, all on ``optimizer``.
        boundaries: ``len(schedules) - 1`` non-decreasing integers ``>= 0``.
    """

    _HPARAMS = ("boundaries",)
    #: (the constructor's name: per group, its lanes drive the children's lanes)
    _LANE_CHILDREN = ("schedules",)

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        schedules: Sequence[LRScheduler],
        boundaries: Sequence[int],
    ) -> None:
        super().__init__(optimizer, schedules, boundaries)

    def _configure(self, *, boundaries: Sequence[int] | None = None,  # type: ignore[override]
                   milestones: Sequence[int] | None = None) -> None:
        values = boundaries if boundaries is not None else milestones
        try:
            super()._configure(milestones=values)  # type: ignore[arg-type]
        except ValueError as exc:  # report optax's names
            raise ValueError(
                str(exc).replace("milestones", "boundaries").replace("schedulers", "schedules")
            ) from None

    @property
    def boundaries(self) -> list[int]:
        """The switching steps (alias of ``milestones``)."""
        return self.milestones

    @property
    def schedules(self) -> list[LRScheduler]:
        """The joined schedulers (alias of ``schedulers``)."""
        return self.schedulers
