"""Muon (Jordan et al., 2024) as torch.optim.Muon, with a fallback optimizer (AdamW by
default, as Keras) for the parameters that are not matrices; MLX's on request."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import ShapeError
from . import dimension_numbers as _dn
from . import groups as _groups
from . import muon_optax as _mo
from .base import Optimizer
from .checks import check_flag, check_int, check_positive, describe
from .engines import muon_kernels as _mk
from .muon_newton_schulz import (  # noqa: F401  (_TORCH, _buffers: read from here too)
    _TORCH,
    _add_scaled_scratch,
    _buffers,
    _lerp_scratch,
    _newton_schulz,
    _newton_schulz_torch,
    _torch_for_numpy,
    newton_schulz,
    newton_schulz_axes,
)
from .muon_rows import (  # noqa: F401 (read from here too)
    PREFIX,
    _FallbackRow,
    _mlx_update,
    group_wide_rows,
    optax_group_rows,
)
from .sgd import BY_CONVENTION, check_convention
from .state import OptimizerState
from .tensorwise import NumpyOps, TensorwiseOptimizer, ops_for

#: torch's (Keller Jordan's) quintic Newton–Schulz coefficients, steps and epsilon
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = ("bfloat16", "float32", "float64", None)
ADJUST_LR = (None, "original", "match_rms_adamw", "none")
#: ``exclude_embeddings``: the parameters of an ``Embedding`` / ``PositionalEmbedding``
#: block, by the names the compiler gives them (the block's class in snake_case, ``_i`` when
#: its parent holds several: ``embedding.weight``, ``encoder.embedding_1.weight``,
#: ``positional_embedding.weight``); the optimizer sees names only
EMBEDDING = re.compile(r"(?:^|\.)(?:positional_)?embedding(?:_\d+)?\.weight$")


class _Default:
    def __repr__(self) -> str:
        return "AdamW()"


#: ``fallback``'s default: a new ``AdamW()`` with torch's defaults
DEFAULT_FALLBACK: Any = _Default()
#: torch's 2-D weight, (out, in): ``weight_dimension_numbers=None``'s matrix axes
_TORCH_2D = _dn.Axes((), (1,), (0,))


def adjusted_lr(lr: float, adjust_lr_fn: str | float | None, shape: Sequence[int]) -> float:
    """torch's ``_adjust_lr``: ``"original"`` (None) scales by √max(1, A/B),
    ``"match_rms_adamw"`` by 0.2·√max(A, B); Keras's ``rms_rate``: a number r by
    r·√max(A, B), ``"none"`` not at all."""
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, A / B))
    if adjust_lr_fn == "none":
        return lr
    rate = 0.2 if adjust_lr_fn == "match_rms_adamw" else adjust_lr_fn
    return lr * (rate * math.sqrt(max(A, B)))


def _build(spec: Any) -> Optimizer | None:
    """The fallback optimizer from what the constructor was given: an optimizer (copied),
    None, the default, or a state dict's ``{"optimizer": name, "hyperparameters": ...}``."""
    from . import AdamW

    if spec is None:
        return None
    if spec is DEFAULT_FALLBACK:
        return AdamW()
    follows = False  # (a fallback given is Muon's copy, independent of Muon's epsilon)
    if isinstance(spec, Mapping):
        from .. import optimizers

        if not {"optimizer", "hyperparameters"} <= set(spec) <= {
                "optimizer", "hyperparameters", _mo.FOLLOWS}:
            raise TypeError(f"fallback given as a dict must have exactly 'optimizer' (a class "
                            f"name) and 'hyperparameters' (and may have {_mo.FOLLOWS!r})")
        follows = check_flag(f"fallback[{_mo.FOLLOWS!r}]", spec.get(_mo.FOLLOWS, False))
        cls = getattr(optimizers, str(spec["optimizer"]), None)
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            raise ValueError(f"fallback: {spec['optimizer']!r} is not a mithril optimizer")
        spec = cls(**spec["hyperparameters"])
    if not isinstance(spec, Optimizer):
        raise TypeError(f"fallback must be a mithril optimizer (AdamW()) or None, got {describe(spec)}")
    name, cls = type(spec).__name__, type(spec)
    if (isinstance(spec, TensorwiseOptimizer) or cls.init is not Optimizer.init
            or cls.update is not Optimizer.update or spec.two_pass()
            or (cls.kernel_math is Optimizer.kernel_math and cls.math is Optimizer.math)):
        raise TypeError(f"fallback: {name} is not an elementwise optimizer (one pass, its own "
                        f"math); use e.g. AdamW, Adam, SGD, Lion")
    if hasattr(spec, "update_hessian"):  # (its nu would stay 0: sign descent, silently)
        raise TypeError(f"fallback: Muon cannot hold a {name} (its Hessian estimate); use AdamW")
    own = {"clip_norm": None, "clip_value": None, "nonfinite": "propagate", "ema_decay": None,
           "swa_start": None}
    for k, v in own.items():
        if getattr(spec, k) != v:
            raise ValueError(f"fallback: {k}={getattr(spec, k)!r} holds for the whole step: "
                             f"give it to Muon, not to its fallback")
    out = copy.copy(spec)
    out.__dict__.pop(_mo.MARK, None)
    if follows:
        out.__dict__[_mo.MARK] = True
    return out


def _same_setting(a: Any, b: Any) -> bool:
    """Whether a group's Muon-wide value ``a`` is Muon's ``b`` (a fallback: of the same
    class and hyperparameters)."""
    if isinstance(a, Optimizer) and isinstance(b, Optimizer):
        return type(a) is type(b) and a.hyperparameters() == b.hyperparameters()
    return not _groups.differs(a, b)


#: keras.optimizers.Muon's names that are not ours
_KERAS_NAMES = {**{f"adam_{k}": f"give fallback=AdamW({v}=...)" for k, v in (
    ("beta_1", "beta1"), ("beta_2", "beta2"), ("weight_decay", "weight_decay"))},
    "adam_lr_ratio": "ours is fallback_lr_ratio", "rms_rate": "ours is adjust_lr_fn=rms_rate "
    "('match_rms_adamw' is its 0.2, 'none' its None)", **{f"muon_{c}": "ours is ns_coefficients=(a, b, c)" for c in "abc"}}


class Muon(TensorwiseOptimizer):
    """Muon as ``torch.optim.Muon`` (same hyperparameters and defaults: ``lr=1e-3``,
    ``weight_decay=0.1``, ``momentum=0.95``, ``nesterov=True``, torch's Newton–Schulz
    coefficients, ``eps=1e-7``, ``ns_steps=5``, ``adjust_lr_fn=None``) for 2-D parameters::

        B ← μ·B + (1−μ)·g            (torch: B.lerp_(g, 1−μ); slot "momentum_buffer")
        U = g + μ·(B − g) if nesterov else B
        O = NS(U)                    (ns_steps quintic iterations; a tall U transposed)
        p ← p·(1 − lr·wd) − adjusted_lr·O

    ``adjust_lr_fn``: None / ``"original"`` gives ``lr·√max(1, rows/cols)``,
    ``"match_rms_adamw"`` ``0.2·lr·√max(rows, cols)`` (Moonshot's, to reuse AdamW's lr and
    weight decay); Keras's ``rms_rate``: a number r gives ``r·lr·√max(rows, cols)``,
    ``"none"`` ``lr`` itself (``rms_rate=None``). ``ns_dtype``: the Newton–Schulz
    iteration's precision; ``"bfloat16"`` as torch (on torch the very same operations; on
    NumPy too, through zero-copy torch views, where torch is installed; else, and on JAX,
    emulated: float32 arithmetic, each result rounded to bfloat16, which agrees with
    torch's to bfloat16 rounding), or ``"float32"``, ``"float64"``, None (the parameters'
    dtype, as Keras).

    Every parameter that is not a matrix (biases, norms, scalars, conv kernels) is updated
    by ``fallback``, an elementwise optimizer (default ``AdamW()`` with torch's defaults, as
    Keras' Muon uses AdamW for them; torch.optim.Muon refuses them and is paired with
    AdamW). Its learning rate is kept as its ratio to Muon's, ``fallback_lr_ratio``
    (default: the ratio of the two learning rates given), so ``set_learning_rate`` and
    every scheduler driving Muon move both (``muon.fallback.learning_rate`` reads it;
    setting it there is refused: set ``fallback_lr_ratio``). Its own ``param_groups`` /
    ``weight_decay_mask`` apply to the parameters it updates; clipping, ``nonfinite``,
    weight averaging and Muon's own ``weight_decay_mask`` / ``exclude_from_weight_decay``
    (as Keras's Muon's) hold for every parameter. Its slots are Muon's with the prefix
    ``"fallback_"`` (AdamW: ``"fallback_m"``, ``"fallback_v"``); a slot has shape ``(0,)``
    for the parameters it does not serve. ``fallback=None``: 2-D parameters only (a
    parameter of another rank is refused by ``init``, naming it), as torch.

    Keras's ``exclude_layers`` and ``exclude_embeddings`` send matrices to the fallback too:
    those whose name a regex of ``exclude_layers`` is found in (``re.search``, Keras's rule
    on its variable paths; ours are dotted, ``"head.weight"``), and with
    ``exclude_embeddings=True`` (Keras's default; ours False, as torch) the tables of our
    ``Embedding`` and ``PositionalEmbedding`` blocks, recognised by the names the compiler
    gives them (:data:`EMBEDDING`: ``embedding.weight``, ``enc.embedding_1.weight``,
    ``positional_embedding.weight``; Keras takes any path with "embedding" in it). Both
    need a fallback and are fixed at construction (the state's slots are laid out by them,
    ``slot_shape`` given each parameter's name: the optax transformation and the JAX
    ``make_train_step`` built on it too).

    ``weight_dimension_numbers`` is optax's ``muon_weight_dimension_numbers``: which axes of
    a parameter are the matrix's rows (``reduction_axis``, fan-in) and columns
    (``output_axis``, fan-out), a :class:`~.dimension_numbers.DimensionNumbers` (or
    optax's ``MuonDimensionNumbers``). The axes in neither are batch axes: the momentum
    ``U`` is transposed to (batch…, reduction…, output…), reshaped to (B, fan_in, fan_out),
    each of the B matrices orthogonalised alone, and put back; the lr is scaled as above
    with rows/cols read as fan_out/fan_in (torch's 2-D weight is (out, in): None is
    ``DimensionNumbers(1, 0)`` for every 2-D tensor; optax's default ``(0, 1)`` is the
    transpose, with cols/rows). It takes None (2-D tensors, as torch), one spec (every
    tensor of 2+ axes; vectors go to the fallback), a dict ``{name: spec or None}`` naming
    every parameter (None: the fallback), or a callable called with ``{name: array}`` for
    each parameter alone that returns such a dict. An axis out of range, one in both, or a
    spec on a vector is refused, naming the parameter; it is fixed at construction (it
    routes tensors to the fallback) and refused with ``convention="mlx"``.

    ``convention="mlx"`` (``mlx.optimizers.Muon(lr)``; default ``weight_decay=0.01``,
    ``ns_dtype=None``, no fallback): MLX's Muon updates every parameter itself. Its weight
    decay is **coupled** (``g ← g + wd·p`` first, as MLX's), its normalisation divides by
    ``‖U‖ + eps`` (torch: ``max(‖U‖, eps)``), a parameter of more than two axes is
    orthogonalised as ``U.reshape(shape[0], -1)`` and its lr scaled by
    ``√max(1, shape[-2]/shape[-1])`` of its *own* last two axes (MLX's rule), and a vector
    or scalar takes the momentum step ``p ← p − lr·U`` (no Newton–Schulz). With a fallback
    given, the tensors that are not matrices go to it, as torch's convention (MLX's
    ``MultiOptimizer([Muon, AdamW], [filter])``). The momentum and Nesterov step are
    torch's (equal to MLX's to rounding); ``c`` of ``ns_coefficients`` is rounded to float32,
    as MLX's ``addmm(alpha=c)`` takes it. MLX's lr is a float32 ``mx.array`` unless given
    as one of another dtype; ours is taken as given.

    ``convention="optax"`` is ``optax.contrib.muon(lr)`` (its defaults: ``weight_decay=0``,
    ``epsilon=1e-8``, ``ns_dtype=None``): the Nesterov mix bias-corrected,
    ``U = β·B/(1−βᵗ⁺¹) + (1−β)·g/(1−βᵗ)`` (else ``B/(1−βᵗ)``), ``U`` divided by ``‖U‖ + eps``
    (``preconditioning="frobenius"``; ``"spectral"``: ``‖U‖₂ + eps``; ``"aol"`` /
    ``"schatten"`` rescale the first iteration), a 2-D weight read as (in, out) (None is
    ``DimensionNumbers(0, 1)``: the factor ``√max(1, fan_out/fan_in)``), ``adaptive``
    scaling ``O`` by ``⟨U, O⟩``; ``ns_coefficients`` may be optax's rows (one per step) or
    preset (``"standard"``, ``"dion"``). The default fallback is optax's ``adamw`` with
    Muon's ``epsilon`` (optax's one ``eps``: it follows Muon's set, scheduled or traced;
    its state dict form says ``"follows_epsilon": True``; set on it alone, refused) and
    ``nesterov`` (``NAdam(convention="optax", decoupled_weight_decay=True)``;
    ``AdamW(convention="optax")`` without Nesterov), built from ``adam_beta1``,
    ``adam_beta2``, ``adam_eps_root``, ``adam_weight_decay`` (optax's ``adam_b1`` …);
    ``adam_learning_rate`` is ``fallback_lr_ratio`` times ``lr``, and ``weight_decay_mask``
    is Muon's tensors' only, as optax's. A group is ``optax.partition`` over one muon per
    group: its lr and eps reach its fallback tensors too
    (:func:`~.muon_rows.optax_group_rows`; torch's convention: its matrices only). The
    state differs in layout only: optax's ``mu`` is our ``"momentum_buffer"`` (shape
    ``(0,)`` for the fallback's tensors), its Adam ``mu`` / ``nu`` our ``"fallback_m"`` /
    ``"fallback_v"``, and one step count serves both (optax counts each branch; equal unless a tensor misses steps).
    ``mu_dtype`` is not offered (slots are in the parameters' dtype).

    ``keras.optimizers.Muon(lr)`` is ``Muon(lr, weight_decay=0.004, adjust_lr_fn=
    "match_rms_adamw", ns_dtype=None, fallback=AdamW(lr·adam_lr_ratio, weight_decay=
    0.004/adam_lr_ratio, epsilon=1e-7, convention="keras"), exclude_embeddings=True)``
    (Keras decays the AdamW tensors by ``lr·adam_weight_decay``, without the ratio;
    ``adjust_lr_fn=rms_rate`` where that is not 0.2; ``exclude_layers`` the same): Keras's
    buffer ``μ·B + g`` is ours over (1−μ), which the Newton–Schulz normalisation takes out
    (to ~1e-8: Keras adds 1e-7 to ‖U‖, in float32).
    """

    slots = ("momentum_buffer",)
    traced_in_update = ("momentum", "epsilon")  # (a momentum warm-up compiles once)

    def __init__(self, learning_rate: float = 1e-3, weight_decay: float = BY_CONVENTION,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: Sequence[Any] | str = NS_COEFFICIENTS,
                 epsilon: float = BY_CONVENTION,
                 ns_steps: int = 5, adjust_lr_fn: str | float | None = None,
                 ns_dtype: str | None = BY_CONVENTION, fallback: Any = DEFAULT_FALLBACK,
                 fallback_lr_ratio: float | None = None,
                 exclude_layers: Sequence[str] | None = None, exclude_embeddings: bool = False,
                 convention: str = "torch", weight_dimension_numbers: _dn.Spec = None,
                 preconditioning: str | None = None, adaptive: bool = False,
                 **options: Any) -> None:
        for who, names in (("Keras", _KERAS_NAMES), ("optax", _mo.OPTAX_NAMES)):
            other = [k for k in names if k in options
                     and not (convention == "optax" and k in _mo.ADAM_ARGS)]
            if other:  # (the generic hint knows no Muon names of Keras's / optax's)
                raise TypeError(f"Muon() got {who}'s {other[0]}=: {names[other[0]]} (see "
                                f"Muon's docstring)")
        adam = {k: options.pop(k, None) for k in _mo.ADAM_ARGS}  # (build the fallback)
        mlx = check_convention(convention, ("torch", "mlx", "optax")) == "mlx"
        optax = convention == "optax"
        if weight_decay is BY_CONVENTION:  # MLX's 0.01, optax's 0, torch's 0.1
            weight_decay = 0.01 if mlx else 0.0 if optax else 0.1
        if ns_dtype is BY_CONVENTION:  # MLX and optax iterate in the parameters' dtype
            ns_dtype = None if mlx or optax else "bfloat16"
        if epsilon is BY_CONVENTION:
            epsilon = 1e-8 if optax else 1e-7
        if fallback is DEFAULT_FALLBACK and mlx:  # MLX's Muon updates every tensor itself
            fallback = None
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.convention = convention
        self.momentum = check_positive("momentum", momentum)
        self.nesterov = check_flag("nesterov", nesterov)
        self.ns_coefficients = _mo.check_coefficients(ns_coefficients, optax)
        self.epsilon = check_positive("epsilon", epsilon)
        self.ns_steps = check_int("ns_steps", ns_steps, maximum=99)  # torch: < 100
        if not isinstance(adjust_lr_fn, (str, type(None))):  # Keras's rms_rate
            adjust_lr_fn = check_positive("adjust_lr_fn", adjust_lr_fn)
        elif adjust_lr_fn not in ADJUST_LR:
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR} or a number > 0, got "
                             f"{describe(adjust_lr_fn)}")
        if mlx and adjust_lr_fn not in (None, "original"):
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: MLX's Muon scales its lr by "
                             f"√max(1, rows/cols) only (convention='mlx': None)")
        self.adjust_lr_fn = adjust_lr_fn
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {describe(ns_dtype)}")
        self.ns_dtype = ns_dtype
        _mo.check_options(self, optax, preconditioning, adaptive, adam,
                          fallback is not DEFAULT_FALLBACK)
        default = optax and fallback is DEFAULT_FALLBACK
        if default:  # optax's adamw, Muon's eps (one hyperparameter) and nesterov
            fallback = _mo.default_fallback(self.learning_rate, self.epsilon, self.nesterov,
                                            adam)
        self.fallback = _build(fallback)
        _mo.follow_epsilon(self, default)
        layers, embeddings = _check_layers(exclude_layers), check_flag(
            "exclude_embeddings", exclude_embeddings)
        if self.fallback is None and (layers or embeddings):
            raise ValueError("exclude_layers / exclude_embeddings give matrices to the "
                             "fallback: Muon(fallback=None) has none (give e.g. "
                             "fallback=AdamW(...))")
        # (set once: the state's slots are laid out by them, see __setattr__)
        self.__dict__["exclude_layers"], self.__dict__["exclude_embeddings"] = layers, embeddings
        dims = _dn.check_dimension_numbers(weight_dimension_numbers)
        if mlx and dims is not None:
            raise ValueError("weight_dimension_numbers: MLX's Muon reshapes a tensor as "
                             "(shape[0], -1) (convention='mlx' takes None)")
        self.__dict__["weight_dimension_numbers"], self.__dict__["_dims_seen"] = dims, {}
        if self.fallback is None:
            self.fallback_lr_ratio = None
            return
        if fallback_lr_ratio is None:
            if self.learning_rate == 0:
                raise ValueError("with learning_rate=0 the fallback's learning rate cannot be "
                                 "kept as a ratio to it: give fallback_lr_ratio")
            fallback_lr_ratio = self.fallback.learning_rate / self.learning_rate
        self.fallback_lr_ratio = check_positive("fallback_lr_ratio", fallback_lr_ratio)
        # (Muon keeps it: set on the fallback, it would be what no step reads)
        self.fallback.__dict__["_lr_follows"] = (
            f"{type(self.fallback).__name__} is a Muon's fallback: its learning rate is "
            f"Muon's times fallback_lr_ratio. Set Muon's learning rate (it moves both) or "
            f"fallback_lr_ratio, or give a group of the fallback a learning rate of its own")

    @property
    def decoupled_weight_decay(self) -> bool:  # type: ignore[override]
        return self.__dict__.get("convention") != "mlx"  # (MLX's is coupled: g ← g + wd·p)

    def owns_all(self) -> bool:
        """Whether Muon updates every tensor itself, whatever its rank (MLX's, without a
        fallback)."""
        return self.__dict__.get("convention") == "mlx" and self.fallback is None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("exclude_layers", "exclude_embeddings", "weight_dimension_numbers") \
                and name in self.__dict__:
            if value == self.__dict__[name]:  # (setting what it is changes nothing)
                return
            raise AttributeError(f"Muon's {name} is fixed at construction (a state's slots "
                                 f"are laid out by it): build another Muon")
        follow = name in ("learning_rate", "fallback_lr_ratio") and \
            self.__dict__.get("fallback") is not None and "fallback_lr_ratio" in (
                name, *self.__dict__)
        if follow:  # the fallback's rate first: a value it cannot take changes nothing
            fb_lr = _fallback_rate(name, value, self.__dict__)
        super().__setattr__(name, value)
        if follow:  # (the fallback's reads as it is: Muon's times the ratio)
            self.fallback.__dict__["learning_rate"] = fb_lr
        if name == "epsilon" and _mo.follows(self.__dict__.get("fallback")):
            # (optax's one eps: counted as its change; refused if set there alone)
            self.fallback._set_counted("epsilon", self.epsilon)

    def _finish_groups(self) -> None:
        super()._finish_groups()
        for i, g in enumerate(self._groups):
            wide = set(g) & {"fallback", "fallback_lr_ratio", "ns_dtype", "exclude_layers",
                             "exclude_embeddings", "convention", "weight_dimension_numbers",
                             "preconditioning", "adaptive"}
            for k in wide:  # (torch_optimizer's groups repeat every value: no change)
                if _same_setting(g[k], getattr(self, k)):
                    g._drop(k)
            bad = sorted(set(g) & wide)
            if bad:
                raise ValueError(f"param_groups[{i}]: {bad} configure Muon as a whole, not a "
                                 f"group (the fallback takes param_groups of its own)")

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        fb = out.get("fallback")
        if isinstance(fb, Optimizer):
            out["fallback"] = {"optimizer": type(fb).__name__,
                               "hyperparameters": fb.hyperparameters(),
                               **({_mo.FOLLOWS: True} if _mo.follows(fb) else {})}
        dims = self.weight_dimension_numbers  # (a callable: as the specs it gave)
        out["weight_dimension_numbers"] = _dn.plain(
            dict(self._dims_seen) if callable(dims) and self._dims_seen else dims)
        return out

    def load_state_dict(self, d: Mapping[str, Any], params: Mapping[str, Any] | None = None
                        ) -> OptimizerState | None:
        state = super().load_state_dict(d, params)
        _mo.loaded_epsilon(self)  # (an epsilon loaded alone: a following fallback's too)
        return state

    def hyper_children(self) -> dict[str, Any]:
        return {} if self.fallback is None else {PREFIX[:-1] + ".": self.fallback}

    def slot_names(self) -> tuple[str, ...]:
        fb = () if self.fallback is None else self.fallback.slot_names()
        return (*self.slots, *(PREFIX + s for s in fb))

    def update_slots(self) -> tuple[str, ...]:
        return self.slots

    def slot_init(self, slot: str) -> float:
        if slot.startswith(PREFIX):
            return self.fallback.slot_init(slot[len(PREFIX):])
        return 0.0

    def excluded(self, name: str) -> bool:
        """Whether ``exclude_layers`` / ``exclude_embeddings`` give the matrix ``name`` to
        the fallback."""
        # (read from exclude_layers each time, not compiled once: load_state_dict may set
        # another list, and re caches the patterns)
        return (self.exclude_embeddings and EMBEDDING.search(name) is not None) or any(
            re.search(e, name) for e in self.exclude_layers)

    def matrix_axes(self, name: str, shape: Sequence[int]) -> _dn.Axes | None:
        """The parameter's matrix axes under ``weight_dimension_numbers`` (None: not a
        matrix); torch's 2-D weight is (out, in)."""
        dims = self.weight_dimension_numbers
        two = _mo.OPTAX_2D if self.convention == "optax" else _TORCH_2D
        axes = _dn.resolve(dims, name, shape, two, cache=self.__dict__.setdefault(
            "_dims_cache", {}))
        if callable(dims):  # (hyperparameters lists them)
            self._dims_seen[name] = None if axes is None else _dn.DimensionNumbers(
                axes.reduction, axes.output)
        return axes

    def to_fallback(self, name: str, shape: Sequence[int]) -> bool:
        """Whether the fallback updates the parameter ``name`` of ``shape`` (Keras's
        ``_should_use_adamw``): not a matrix, or a matrix :meth:`excluded`."""
        return not self.owns_all() and (self.matrix_axes(name, shape) is None or (
            self.fallback is not None and self.excluded(name)))

    def slot_shape(self, slot: str, shape: tuple[int, ...], name: str | None = None
                   ) -> tuple[int, ...]:
        """As :meth:`.Optimizer.slot_shape`; with exclusions a matrix's depend on its
        ``name`` (a caller that gives none is refused)."""
        if name is None and ((len(shape) == 2 and (self.exclude_layers or self.exclude_embeddings))
                             or self.weight_dimension_numbers is not None) \
                and not self.__dict__.get("_shapes_alone") and slot in self.slot_names():
            raise ValueError(f"Muon with exclude_layers / exclude_embeddings / "
                             f"weight_dimension_numbers routes tensors by name: slot {slot!r} "
                             f"of a {shape} parameter was asked by shape alone (this path "
                             f"does not take them)")
        fb = self.to_fallback(name, shape) if name is not None else (
            len(shape) != 2 and not self.owns_all())
        if slot == "momentum_buffer":
            return (0,) if fb else shape
        if slot.startswith(PREFIX):
            return shape if fb else (0,)
        return shape  # weight averages

    def scalars(self, step: int) -> tuple[float, ...]:
        if self.__dict__.get("convention") == "optax":  # (and optax's bias corrections)
            return _mo.optax_scalars(self, step)
        return super().scalars(step)

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[float, ...], name: str) -> tuple[Any, dict[str, Any]]:
        if self.convention == "mlx":
            return _mlx_update(self, xp, p, g, slots, scalars[0])
        axes = self.matrix_axes(name, tuple(g.shape))
        if axes is None:
            raise ShapeError(f"Muon's matrix path takes 2-D parameters (or those "
                             f"weight_dimension_numbers gives axes); '{name}' has shape "
                             f"{tuple(g.shape)}")
        if self.convention == "optax":
            return _mo.optax_update(self, xp, p, g, slots, scalars, name, axes)
        tops = (_torch_for_numpy() if xp.name == "numpy" and self.ns_dtype == "bfloat16"
                and p.dtype.char in "fd" else None)
        if tops is not None:  # torch's operations on zero-copy views (_torch_for_numpy)
            def view(a: Any) -> Any:
                return tops.m.from_numpy(np.require(a, requirements=("C", "W")))

            new_p, new = self.tensor_update(tops, view(p), view(g), {
                k: view(v) for k, v in slots.items()}, scalars, name)
            return new_p.numpy(), {k: v.numpy() for k, v in new.items()}
        buf = xp.lerp(slots["momentum_buffer"], g, 1 - self.momentum)
        if self.weight_dimension_numbers is not None:  # (B, fan_in, fan_out) matrices
            u = xp.lerp(g, buf, self.momentum) if self.nesterov else buf
            _, fan_in, fan_out = _dn.matrix_shape(tuple(p.shape), axes)
            lr = adjusted_lr(scalars[0], self.adjust_lr_fn, (fan_out, fan_in))
            o = newton_schulz_axes(xp, u, axes, self.ns_coefficients, self.ns_steps,
                                   self.epsilon, self.ns_dtype)
            return xp.add_scaled(p, o, -lr), {"momentum_buffer": buf}
        u = _lerp_scratch(xp, g, buf, self.momentum) if self.nesterov else buf
        args = (xp, u, self.ns_coefficients, self.ns_steps, self.epsilon, self.ns_dtype)
        o = _newton_schulz(*args)  # a scratch buffer, used at once
        lr = adjusted_lr(scalars[0], self.adjust_lr_fn, tuple(p.shape))
        if o is None:
            return xp.add_scaled(p, newton_schulz(*args), -lr), {"momentum_buffer": buf}
        return _add_scaled_scratch(xp, p, o, -lr), {"momentum_buffer": buf}

    def fused_step(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                   state: OptimizerState, prepared: Any, ours: bool
                   ) -> tuple[dict[str, Any], bool, float, bool] | None:
        """torch.optim.Muon's own in-place step (the same operations, so the same bits as
        the per-tensor path, without its copies) where nothing needs the whole step
        computed before it is written: on torch (or on NumPy with the bfloat16 iteration,
        through zero-copy torch views: :func:`_torch_for_numpy`), params the state's own
        (``ours``), ``nonfinite="propagate"``, no clipping, no weight averaging, no
        ``weight_dimension_numbers``, every parameter a matrix with a gradient. Else None (the per-tensor path)."""
        lay = state.layout
        xp = ops_for(state.engine.backend)
        on_numpy = xp.name == "numpy" and self.ns_dtype == "bfloat16"
        if on_numpy:
            xp = _torch_for_numpy() or xp
        if (xp.name != "torch" or not ours or state.param_views is None
                or self.convention != "torch" or self.weight_dimension_numbers is not None
                or self.nonfinite in ("skip", "raise") or self.clip_norm is not None
                or len(self.full_slot_names()) != len(self.slot_names())
                or set(gradients) != set(lay.names)
                or any(len(s) != 2 or 0 in s for s in lay.shapes)
                or any(map(self.excluded, lay.names))):
            return None
        rows = self.tensor_rows(state)
        if any(not isinstance(r, Muon) or r.clip_value or r.clip_tensor_norm is not None
               or r.clip_block_rms is not None or r.adaptive_clip is not None
               or (r.weight_decay and r.weight_decay_in_math) for r in rows):
            return None
        cpu = on_numpy or state.params_flat.device.type == "cpu"
        if cpu and lay.dtype not in ("float32", "float64"):  # (the CPU passes read the
            return None  # memory by numba, NumPy by torch.from_numpy: no half precision)
        torch, t = xp.m, state.step + 1

        def view(a: Any) -> Any:  # NumPy: a torch view of the same memory
            return torch.from_numpy(np.require(a, requirements=("C", "W"))) if on_numpy else a

        top = torch.finfo(getattr(torch, np.dtype(lay.dtype).name)).max
        lrs = [adjusted_lr(r.scalars(_groups.row_step(r, t))[0], r.adjust_lr_fn, s) for r, s in zip(rows, lay.shapes)]
        if any(abs(lr) > top for lr in lrs):  # torch's add_ would refuse it midway
            return None
        bufs = state.slot_layout("momentum_buffer").unflatten(state.slots["momentum_buffer"])
        passes = cpu and lay.dtype == "float32" and self.ns_dtype == "bfloat16"
        sumsq, finite = 0.0, True
        with torch.no_grad():
            for row, name, lr in zip(rows, lay.names, lrs):
                p, g, buf = view(params[name]), view(gradients[name]), view(bufs[name])
                if passes:  # the elementwise work in two numba passes (muon_kernels)
                    s, ok = _mk.step_matrix(xp, p, g, buf, row, lr, _newton_schulz_torch)
                    sumsq, finite = sumsq + s, finite and ok
                    continue
                sumsq += _mk.grad_sumsq(torch, g)  # each tensor's passes while it is in cache
                buf.lerp_(g, 1 - row.momentum)
                u = _lerp_scratch(xp, g, buf, row.momentum) if row.nesterov else buf
                o = _newton_schulz(xp, u, row.ns_coefficients, row.ns_steps, row.epsilon,
                                   self.ns_dtype)
                if row.weight_decay:  # decoupled, as the per-tensor path
                    p.mul_(1.0 - row.learning_rate * row.weight_decay)
                p.add_(o, alpha=-lr)
                if cpu:
                    finite = finite and _mk.finite(p) and _mk.finite(buf)
            if not cpu:  # every parameter and momentum buffer is new: the flat buffers
                finite = (xp.all_finite(state.params_flat)
                          and xp.all_finite(state.slots["momentum_buffer"]))
        return dict(params), True, math.sqrt(sumsq), finite

    def tensor_rows(self, state: OptimizerState) -> list[Any]:
        rows = super().tensor_rows(state)
        fb = self.fallback
        if fb is None:
            return rows
        lay = state.layout
        others = [n for n, s in zip(lay.names, lay.shapes) if self.to_fallback(n, s)]
        key = (id(fb._groups), fb._groups_version, id(fb._wd_exclude), tuple(others),
               self._groups_version, id(self._wd_exclude), id(self.weight_decay_mask),
               id(getattr(state, "slot_layouts", {}).get("momentum_buffer")))
        cached = self.__dict__.get("_fallback_rows")
        if cached is None or cached[0] != key:
            _check_routing(self, state, set(others))
            cached = self.__dict__["_fallback_rows"] = (
                key, *_groups.resolve(fb, others, self._undecayed(others)))
        base = copy.copy(fb)
        base.assign({"learning_rate": self.learning_rate * self.fallback_lr_ratio})
        views = [_FallbackRow(v, self, o, r) for v, o, r in
                 zip(_groups.views(base, cached[2]), cached[3], cached[2])]
        where = dict(zip(others, cached[1]))
        out = [views[where[n]] if n in where else r for n, r in zip(lay.names, rows)]
        if self.convention == "optax":  # (a Muon group's lr and eps: optax.partition's)
            out = optax_group_rows(self, rows, out, where, lay.names)
        out = group_wide_rows(self, rows, out, where, lay.names)  # (its clipping, averages)
        late: dict[tuple, Any] = {}
        _, g_index, g_rows = state.groups  # (resolved by super().tensor_rows: the groups'
        offsets = [int(r.get("step_offset", 0)) for r in g_rows]  # own offsets, not own
        for i, n in enumerate(lay.names if any(offsets) else ()):  # rows' raised by missed
            k = offsets[g_index[i]]  # steps) a Muon group joining late: its fallback
            if k and n in where:  # tensors join with it
                if (id(out[i]), k) not in late:
                    late[id(out[i]), k] = copy.copy(out[i])
                    late[id(out[i]), k]._step_offset = k
                out[i] = late[id(out[i]), k]
        missed = getattr(state, "missed", None)
        if missed is not None:  # (a tensor that missed steps counts its own: .groups)
            for i in np.flatnonzero(missed):
                if lay.names[i] in where:
                    out[i] = copy.copy(out[i])
                    out[i].missed = int(missed[i])
        return self.own_rows_if_asked(out)


    def _undecayed(self, names: Sequence[str]) -> set[str]:
        """Those of ``names`` that Muon's own ``weight_decay_mask`` / exclusions keep from
        decaying: they hold for the fallback's tensors too (as Keras's Muon's
        ``exclude_from_weight_decay``); the fallback's own add to them."""
        what = "exclude_from_weight_decay"
        excl = [_groups._matcher(e, what) for e in self.exclude_weight_decay]
        # (optax's weight_decay_mask is its Muon branch's only)
        mask = None if self.convention == "optax" else self.weight_decay_mask
        mask = None if mask is None else _groups._matcher(mask, "weight_decay_mask")
        return {n for n in names if any(_groups._matches(m, n, what) for m in excl)
                or (mask is not None and not _groups._matches(mask, n, "weight_decay_mask"))}


from .muon_routing import _check_layers, _check_routing, _fallback_rate, _init  # noqa: E402

# assigned after the class, so that Optimizer.__init_subclass__ does not wrap it (the
# wrapper binds the backend first; a refused init must keep nothing)
Muon.init = _init  # type: ignore[method-assign]
