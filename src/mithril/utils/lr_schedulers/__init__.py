"""Backend-agnostic learning-rate schedulers.

Every scheduler drives a duck-typed optimizer that exposes exactly two methods::

    optimizer.get_learning_rate() -> float
    optimizer.set_learning_rate(lr: float) -> None

Setting the learning rate is assumed to be cheap (the optimizer just stores a float), so a
scheduler may call ``set_learning_rate`` on every step.

Conventions (shared by all schedulers, identical to ``torch.optim.lr_scheduler``):

* The step counter ``t`` (attribute ``last_step``, read-only: torch's ``last_epoch``; jump to a
  saved step with ``load_state_dict``) starts at ``0``, or at ``n`` given ``last_step=n`` (torch's
  ``last_epoch=n - 1``) to any constructor: see :mod:`.start`. Constructing a scheduler puts
  the optimizer at the value of step ``0``; each call to :meth:`LRScheduler.step` advances ``t``
  by one and sets the optimizer's learning rate to the value of the new step. Call ``step()``
  *after* the optimizer update, as in PyTorch.
* ``base_lr`` is the optimizer's learning rate when the scheduler is constructed (a few
  schedulers re-base it explicitly; see :class:`LinearWarmupScheduler`, :class:`OneCycleLR` and
  :class:`SequentialLR`), or the ``base_lr=`` keyword a closed form takes (kept by parents:
  each optax schedule's own ``init_value``; see :class:`LRScheduler`). Built after another
  scheduler moved the rate, a scheduler starts from the rate it finds, as torch's chainable
  ones do in effect; torch's :class:`LambdaLR` and :class:`CosineAnnealingWarmRestarts` instead
  take the group's first ``initial_lr`` (the rate before the first scheduler: pass it as
  ``base_lr=`` for theirs), its :class:`CosineAnnealingLR` mixes that in after ``T_max`` and its
  :class:`CyclicLR`'s step 0 is it.
* Apart from :class:`ReduceLROnPlateau` (which depends on the observed metric), every schedule is
  a *closed form*: :meth:`LRScheduler.get_lr_at` is a pure function of the integer step ``t`` and
  the hyper-parameters. PyTorch evaluates several schedules recursively (``lr_t = lr_{t-1} *
  ratio``); the values agree with PyTorch up to the floating-point rounding of that recursion
  (below ``1e-12`` relative over a few hundred steps; the recursion's error grows with the step
  count) and exactly where PyTorch itself uses a closed form or plain comparisons
  (:class:`OneCycleLR`, :class:`CosineAnnealingWarmRestarts`, :class:`ReduceLROnPlateau`).
* :meth:`LRScheduler.state_dict` returns a plain, strictly JSON-serialisable ``dict`` (numbers,
  strings, booleans, ``None``, lists and nested dicts; non-finite floats are encoded as the
  strings ``"inf"``, ``"-inf"`` and ``"nan"``), so it survives ``json.dumps(...,
  allow_nan=False)`` and can be stored as checkpoint metadata without pickle.

Any hyperparameter, per group: ``optimizer.hyperparameter(name, group=None)`` is a handle with the
same two methods on any numeric hyperparameter of a mithril optimizer or of one of its parameter
groups (a weight-decay or beta1 schedule); ``per_group=True`` (or a list where torch takes one,
such as :class:`OneCycleLR`'s ``max_lr``) makes a closed-form scheduler act on every parameter
group from its own base value, as torch's do; :class:`OneCycleLR` and :class:`CyclicLR` cycle the
momentum (or beta1) with ``cycle_momentum=True``. See :class:`LRScheduler`.

Intended differences from PyTorch: without ``per_group`` a scheduler drives one learning rate
(the optimizer's; its parameter groups follow in proportion); ``cycle_momentum`` defaults to
``False``; a composite acts per group when its children do (``per_group=True`` on each); no
deprecated ``epoch`` argument to ``step`` (count the schedule in updates: torch's
``CosineAnnealingWarmRestarts.step(epoch + i / iters)`` is ``T_0 = epochs * iters`` stepped
once per update) and no ``verbose=`` (a ``TypeError`` saying what to use); ``last_epoch=k`` is
the uninterrupted run's step ``k + 1`` for every scheduler (torch's ``SequentialLR`` and
``SWALR`` ignore it for the rate, its ``CosineAnnealingWarmRestarts`` past the first cycle with
``T_mult > 1`` miscounts it; refused for ``ReduceLROnPlateau``);
:class:`SequentialLR` and :class:`LinearWarmupScheduler` accept a :class:`ReduceLROnPlateau`
child; two schedulers stepped back to back on one optimizer (torch's "chaining") are refused
(``RuntimeError``) at the step that would discard the other's change: combine them with
:class:`ChainedScheduler`; stricter hyper-parameter validation (degenerate settings raise
:class:`ValueError` instead of producing division by zero or silently odd schedules).

Layout (every name is re-exported here, so ``from mithril.utils.lr_schedulers import X`` keeps
working):

* :mod:`.base` -- :class:`LRScheduler`, :class:`SupportsLearningRate` and the shared
  validation / serialisation helpers;
* :mod:`.per_group` -- the constructor wrapper every scheduler class gets (per-group lanes)
  and :func:`~.per_group._apply` (setting several values all or nothing);
* :mod:`.start` -- building a scheduler at a given step (``last_step=`` / ``last_epoch=``);
* :mod:`.step` -- :class:`StepLR`, :class:`MultiStepLR`, :class:`ExponentialLR`;
* :mod:`.cosine` -- :class:`CosineAnnealingLR`, :class:`CosineAnnealingWarmRestarts`;
* :mod:`.plateau` -- :class:`ReduceLROnPlateau`;
* :mod:`.warmup` -- :class:`LinearWarmupScheduler`;
* :mod:`.one_cycle` -- :class:`OneCycleLR`;
* :mod:`.sequential` -- :class:`SequentialLR`;
* :mod:`.lambda_lr` -- :class:`LambdaLR`, :class:`MultiplicativeLR`;
* :mod:`.linear` -- :class:`ConstantLR`, :class:`LinearLR`, :class:`PolynomialLR`;
* :mod:`.cyclic` -- :class:`CyclicLR`;
* :mod:`.chained` -- :class:`ChainedScheduler`;
* :mod:`.join` -- :class:`JoinSchedules` (optax's ``join_schedules``);
* :mod:`.wsd` -- :class:`WSD` (warmup-stable-decay);
* :mod:`.inverse_sqrt` -- :class:`InverseSqrt`;
* :mod:`.piecewise` -- :class:`PiecewiseConstant`, :class:`PiecewiseInterpolate` (optax, Keras);
* :mod:`.cosine_restarts` -- :class:`CosineDecayRestarts` (Keras);
* :mod:`.decays` -- :class:`ExponentialDecay`, :class:`PolynomialDecay` (optax, Keras),
  :class:`InverseTimeDecay` (Keras);
* :mod:`.sgdr` -- :func:`sgdr_schedule` (optax's, each cycle with its own peak);
* :mod:`.swa` -- :class:`SWALR`, :func:`update_bn` and :func:`average_state` (torch's
  ``swa_utils``, for weight averaging).
"""

from __future__ import annotations

from .base import LRScheduler, SupportsLearningRate
from .base import _check_child as _check_child
from .base import _check_choice as _check_choice
from .base import _check_int as _check_int
from .base import _check_milestones as _check_milestones
from .base import _check_optimizer as _check_optimizer
from .base import _check_real as _check_real
from .base import _check_step as _check_step
from .base import _decode_float as _decode_float
from .base import _encode_float as _encode_float
from .chained import ChainedScheduler
from .cosine import CosineAnnealingLR, CosineAnnealingWarmRestarts
from .cosine_restarts import CosineDecayRestarts
from .cyclic import CyclicLR
from .decays import ExponentialDecay, InverseTimeDecay, PolynomialDecay
from .inverse_sqrt import InverseSqrt
from .join import JoinSchedules
from .lambda_lr import LambdaLR, MultiplicativeLR
from .linear import ConstantLR, LinearLR, PolynomialLR
from .one_cycle import OneCycleLR
from .piecewise import PiecewiseConstant, PiecewiseInterpolate
from .plateau import ReduceLROnPlateau
from .plateau import _warn_no_metric as _warn_no_metric
from .sequential import SequentialLR
from .sgdr import sgdr_schedule
from .step import ExponentialLR, MultiStepLR, StepLR
from .swa import SWALR, average_state, update_bn
from .warmup import LinearWarmupScheduler
from .wsd import WSD

__all__ = [
    "SWALR",
    "WSD",
    "ChainedScheduler",
    "ConstantLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CosineDecayRestarts",
    "CyclicLR",
    "ExponentialDecay",
    "ExponentialLR",
    "InverseSqrt",
    "InverseTimeDecay",
    "JoinSchedules",
    "LRScheduler",
    "LambdaLR",
    "LinearLR",
    "LinearWarmupScheduler",
    "MultiStepLR",
    "MultiplicativeLR",
    "OneCycleLR",
    "PiecewiseConstant",
    "PiecewiseInterpolate",
    "PolynomialDecay",
    "PolynomialLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "StepLR",
    "SupportsLearningRate",
    "average_state",
    "sgdr_schedule",
    "update_bn",
]
