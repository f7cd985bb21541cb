"""Linear warm-up, optionally followed by another scheduler: :class:`LinearWarmupScheduler`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import (
    LRScheduler,
    SupportsLearningRate,
    _check_child,
    _check_int,
    _check_real,
    _check_step,
    _load_nested,
)
from .plateau import _drive_child, _metric_value, _needs_metric

__all__ = ["LinearWarmupScheduler"]


class LinearWarmupScheduler(LRScheduler):
    """Linear warm-up, optionally followed by another scheduler.

    .. math::
        \\eta_t = \\text{start\\_lr} + (\\text{end\\_lr} - \\text{start\\_lr})
                  \\frac{t}{\\text{warmup\\_steps}} \\quad (0 \\le t < \\text{warmup\\_steps})

    For ``t >= warmup_steps``: if ``after_scheduler`` is ``None`` the rate stays at ``end_lr``;
    otherwise ``after_scheduler`` drives it with its own step counter, which is ``0`` at
    ``t = warmup_steps`` (so ``eta_t = after.get_lr_at(t - warmup_steps)``).

    The ``after_scheduler``'s ``base_lr`` is **re-based to** ``end_lr`` (whatever the optimizer's
    learning rate was when it was constructed), so a base-relative schedule continues seamlessly
    from the end of the warm-up. Schedules with explicit rates (:class:`OneCycleLR`) ignore this;
    those going on from the rate they find (:class:`SWALR`, :class:`MultiplicativeLR`) start
    from the warm-up's last one (step ``warmup_steps - 1``), as in torch's
    ``SequentialLR([LinearLR(...), it], [warmup_steps])``.
    ``after_scheduler`` may be a :class:`ReduceLROnPlateau`; then ``step(metric)`` forwards the
    metric to it after the warm-up (the metric is ignored during the warm-up and on the step
    that ends it, since it measures the warm-up phase).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        warmup_steps: warm-up length, integer ``>= 0`` (``0`` means no warm-up).
        start_lr: learning rate at ``t = 0``, ``>= 0``.
        end_lr: learning rate at ``t = warmup_steps``, ``>= 0``.
        after_scheduler: optional scheduler on the same optimizer.
    """

    _HPARAMS = ("warmup_steps", "start_lr", "end_lr")
    _GROUP_ARGS = ("start_lr", "end_lr")
    _LANEWISE = True
    _LANE_CHILDREN = ("after_scheduler",)

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        warmup_steps: int,
        start_lr: float,
        end_lr: float,
        after_scheduler: LRScheduler | None = None,
    ) -> None:
        super().__init__(optimizer)
        self._configure(warmup_steps=warmup_steps, start_lr=start_lr, end_lr=end_lr)
        if after_scheduler is not None:
            _check_child(type(self).__name__, optimizer, after_scheduler, "after_scheduler")
            after_scheduler._rebase(self.end_lr)
        self.after_scheduler = after_scheduler
        self._restart()

    def _configure(self, *, warmup_steps: int, start_lr: float, end_lr: float) -> None:
        warmup_steps = _check_int("warmup_steps", warmup_steps, minimum=0)
        start_lr = _check_real("start_lr", start_lr, ge=0.0)
        end_lr = _check_real("end_lr", end_lr, ge=0.0)
        self.warmup_steps, self.start_lr, self.end_lr = warmup_steps, start_lr, end_lr

    @property
    def requires_metric(self) -> bool:
        return self.after_scheduler is not None and self.after_scheduler.requires_metric

    def _next_needs_metric(self) -> bool:
        """Whether the next step observes a metric (see :func:`.plateau._needs_metric`)."""
        after = self.after_scheduler
        return (after is not None and self.last_step + 1 > self.warmup_steps
                and _needs_metric(after))

    def _set_hyperparameter(self, name: str, value: Any) -> None:
        super()._set_hyperparameter(name, value)
        # why: the after_scheduler was re-based to end_lr at construction; a new end_lr
        # re-bases it too, as a warm-up built with it (else the warm-up ramps to the new
        # end_lr and the after_scheduler then jumps back to the old one)
        if name == "end_lr" and self.after_scheduler is not None:
            self.after_scheduler._rebase(self.end_lr)

    def _lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.start_lr + (self.end_lr - self.start_lr) * t / self.warmup_steps
        after = self.after_scheduler
        if after is None:
            return self.end_lr
        if after._STARTS_FROM_CURRENT and self.warmup_steps:
            # why: stepped, it restarts from the warm-up's last rate (as in torch's
            # SequentialLR); the closed form took end_lr, so get_lr_at was not the run
            return after._lr_at_from(t - self.warmup_steps, self._lr_at(self.warmup_steps - 1))
        return after.get_lr_at(t - self.warmup_steps)

    def _extra_targets(self, t: int) -> list[tuple[Any, float]]:
        # why: after the warm-up, the after_scheduler's cycled momentum at its step, so that
        # load_state_dict and a restart set it as they set the learning rate
        after = self.after_scheduler
        if after is None or t < self.warmup_steps:
            return []
        return after._extra_targets(t - self.warmup_steps)

    def _reset_state(self) -> None:
        self._last_step = 0
        after = self.after_scheduler
        if after is not None:
            after._reset_state()
        if after is not None and self.warmup_steps == 0:
            self._last_lr = after.get_last_lr()
        else:
            self._last_lr = self._lr_at(0)

    def step(self, metric: float | None = None) -> None:  # type: ignore[override]
        """Advance one step; ``metric`` is forwarded to a metric-driven ``after_scheduler``
        (a metric that is not a number raises, and changes nothing, even when ignored)."""
        if metric is not None:
            _metric_value(metric)
        t = _check_step(self.last_step + 1)
        after = self.after_scheduler
        if after is None or t < self.warmup_steps:
            self._set_step(t)
            return
        if not _drive_child(after, t - self.warmup_steps, metric):
            return
        self._last_step = t
        self._last_lr = after.get_last_lr()

    def _advance(self, metric: float | None) -> None:
        self.step(metric)

    def _extra_state(self) -> dict[str, Any]:
        after = self.after_scheduler
        return {"after_scheduler": None if after is None else after.state_dict()}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        sub = state.get("after_scheduler")
        if (sub is None) != (self.after_scheduler is None):
            raise ValueError(
                "state_dict and scheduler disagree on the presence of an after_scheduler"
            )
        if self.after_scheduler is not None:
            _load_nested(self.after_scheduler, sub, "['after_scheduler']")
