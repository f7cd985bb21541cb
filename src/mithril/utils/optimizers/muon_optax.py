"""Muon's ``convention="optax"``: ``optax.contrib.muon``'s options checked, its default
fallback (optax's ``adamw`` on the tensors that are not matrices), its Newton–Schulz
iteration (``orthogonalize_via_newton_schulz``: the four preconditionings, one row of
coefficients per step) and its per-tensor step."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import dimension_numbers as _dn
from .checks import check_flag, check_positive, check_unit, describe, to_float

if TYPE_CHECKING:
    from .muon import Muon
    from .tensorwise import NumpyOps

#: optax's ``preconditioning`` choices (the first its default)
PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")
#: optax's ``ns_coeffs`` presets
PRESETS = {"standard": ((3.4445, -4.7750, 2.0315),),
           "dion": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377),
                    (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
                    (2.8366, -3.0525, 1.2012))}
#: optax's 2-D weight, (in, out): ``weight_dimension_numbers=None``'s matrix axes
OPTAX_2D = _dn.Axes((), (0,), (1,))
#: the ``adam_*`` arguments (optax's ``adam_b1`` … under our names) and their defaults
ADAM_ARGS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps_root": 0.0,
             "adam_weight_decay": 0.0}
#: optax.contrib.muon's names that are not ours
OPTAX_NAMES = {"adam_b1": "ours is adam_beta1", "adam_b2": "ours is adam_beta2",
               "beta": "ours is momentum", "ns_coeffs": "ours is ns_coefficients",
               "consistent_rms": "ours is adjust_lr_fn=<the number> ('match_rms_adamw' is "
                                 "0.2)",
               "muon_weight_dimension_numbers": "ours is weight_dimension_numbers",
               "adam_learning_rate": "ours is fallback_lr_ratio (adam_learning_rate / "
                                     "learning_rate)",
               "mu_dtype": "not offered: slots are in the parameters' dtype"}


#: a fallback that takes Muon's ``epsilon`` (optax's one ``eps``: the default fallback of
#: ``convention="optax"``) has this mark, and its state dict form this key set to True
MARK, FOLLOWS = "_follows_epsilon", "follows_epsilon"


def follows(fallback: Any) -> bool:
    """Whether ``fallback`` (a Muon's, or None) takes its Muon's ``epsilon``."""
    return fallback is not None and MARK in fallback.__dict__


def follow_epsilon(opt: Muon, default: bool) -> None:
    """Mark ``opt``'s default fallback as taking its ``epsilon``; a fallback that does (the
    default, or one whose state dict form says so) takes its value now. One given stays
    apart."""
    fb = opt.fallback
    if default:
        fb.__dict__[MARK] = True
    if follows(fb):
        if "epsilon" not in fb.hyperparameters():
            raise ValueError(f"fallback: {FOLLOWS}=True, but {type(fb).__name__} has no "
                             f"epsilon to take Muon's")
        fb.__dict__["epsilon"] = opt.epsilon
        # (why setting it there is refused: .hyperparameter_access's _followed)
        fb.__dict__[MARK] = (
            f"fallback.epsilon: this {type(fb).__name__} is a Muon(convention='optax')'s "
            f"default fallback, whose epsilon is Muon's (optax's one eps): set Muon's "
            f"epsilon (it moves both), or give Muon a fallback of your own")


def loaded_epsilon(opt: Muon) -> None:
    """After ``load_state_dict``: an ``epsilon`` loaded alone (torch's ``param_groups[0]
    ["eps"]`` set on ``torch_optimizer``'s) reaches a fallback that follows it, on a copy
    (copies of ``opt`` share its fallback)."""
    fb = opt.fallback
    if follows(fb) and fb.epsilon != opt.epsilon:
        fb = copy.copy(fb)
        fb.__dict__["epsilon"] = opt.epsilon
        opt.__dict__["fallback"] = fb


def check_coefficients(value: Any, optax: bool) -> tuple:
    """``ns_coefficients``: three numbers (a, b, c); with ``optax`` also an optax preset
    name (``"standard"``, ``"dion"``) or rows of three, one per iteration (kept as a tuple
    of tuples)."""
    if optax and isinstance(value, str) and value in PRESETS:
        value = PRESETS[value]
    rows = (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value
            and all(isinstance(r, Sequence) and not isinstance(r, (str, bytes))
                    for r in value))
    if rows and optax:
        if len(value) == 1:
            value = value[0]
        else:
            return tuple(check_coefficients(r, False) for r in value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        more = (" (or, convention='optax', a preset 'standard' / 'dion' or rows of three)"
                if not optax else f" or rows of three, or one of {sorted(PRESETS)}")
        raise TypeError(f"ns_coefficients must be three numbers (a, b, c){more}, got "
                        f"{describe(value)}")
    out = tuple(to_float(f"ns_coefficients[{i}]", x) for i, x in enumerate(value))
    if not all(map(math.isfinite, out)):
        raise ValueError(f"ns_coefficients must be finite, got {out}")
    return out


def check_options(opt: Muon, optax: bool, preconditioning: Any, adaptive: Any,
                  adam: dict[str, Any], fallback_given: bool) -> None:
    """optax's own options: refused, by name, under another convention; checked under
    optax's (with the rows of ``ns_coefficients``: no more rows than ``ns_steps``)."""
    conv = opt.convention
    if not optax:
        given = [k for k, v in (("preconditioning", preconditioning), *adam.items())
                 if v is not None] + (["adaptive"] if adaptive else [])
        if given:
            raise ValueError(f"{given[0]}=: only optax's Muon has it (convention='optax'), "
                             f"not {conv!r}")
        opt.preconditioning, opt.adaptive = None, False
        return
    if preconditioning is None:
        preconditioning = "frobenius"
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got "
                         f"{describe(preconditioning)}")
    opt.preconditioning, opt.adaptive = preconditioning, check_flag("adaptive", adaptive)
    if isinstance(opt.ns_coefficients[0], tuple) and len(opt.ns_coefficients) > opt.ns_steps:
        raise ValueError(f"ns_coefficients: {len(opt.ns_coefficients)} rows for ns_steps="
                         f"{opt.ns_steps} (optax: not enough coeffs; each row is one step)")
    if opt.adjust_lr_fn == "none":
        raise ValueError("adjust_lr_fn='none': optax scales by √max(1, fan_out/fan_in) "
                         "(None) or consistent_rms (a number; 'match_rms_adamw' is 0.2)")
    if opt.ns_dtype is not None:
        raise ValueError(f"ns_dtype={opt.ns_dtype!r}: optax iterates in the momentum's dtype "
                         f"(convention='optax' takes None)")
    if fallback_given and any(v is not None for v in adam.values()):
        raise ValueError("adam_beta1 / adam_beta2 / adam_eps_root / adam_weight_decay build "
                         "the default fallback: give them to the fallback you give instead")


def default_fallback(learning_rate: float, epsilon: float, nesterov: bool,
                     adam: dict[str, Any]) -> Any:
    """optax's ``adamw(learning_rate, b1, b2, eps=Muon's eps, eps_root, weight_decay,
    nesterov=Muon's nesterov)``: :class:`.NAdam` (optax's, decoupled: ``nadamw``) with
    Nesterov, :class:`.AdamW` (optax's) without."""
    from . import AdamW, NAdam

    kw = {k: ADAM_ARGS[k] if v is None else v for k, v in adam.items()}
    for k in ("adam_beta1", "adam_beta2"):  # (checked here to name ours)
        kw[k] = check_unit(k, kw[k])
    for k in ("adam_eps_root", "adam_weight_decay"):
        kw[k] = check_positive(k, kw[k])
    common = dict(beta1=kw["adam_beta1"], beta2=kw["adam_beta2"], epsilon=epsilon,
                  weight_decay=kw["adam_weight_decay"], convention="optax")
    if nesterov:
        return NAdam(learning_rate, decoupled_weight_decay=True,
                     eps_root=kw["adam_eps_root"], **common)
    if kw["adam_eps_root"] != 0:
        raise ValueError("adam_eps_root: our optax-convention AdamW has no eps_root (it is "
                         "NAdam's, nesterov=True)")
    return AdamW(learning_rate, **common)


def _first_step(xp: NumpyOps, X: Any, A: Any, preconditioning: str) -> tuple[Any, Any]:
    """optax's AOL / Schatten-4 rescaling of the first iteration's ``X`` and ``A = X·Xᵀ``
    (its eps 1e-8, fixed)."""
    if preconditioning == "aol":  # each row by 1/√(Σⱼ|Aᵢⱼ|)
        s = xp.rsqrt(xp.clamp_min(abs(A).sum(-1), 1e-8))[:, None]
        return X * s, A * s * xp.T(s)
    s = xp.rsqrt(xp.clamp_min(xp.norm0(A), 1e-8))  # Schatten-4: by ‖A‖_F^(-1/2)
    return X * s, A * (s * s)


def _spectral(xp: NumpyOps, X: Any) -> Any:
    if xp.name == "torch":
        return xp.m.linalg.matrix_norm(X, 2)
    return xp.m.linalg.norm(X, 2)


def newton_schulz_optax(xp: NumpyOps, G: Any, coefficients: tuple, steps: int, eps: float,
                        preconditioning: str) -> Any:
    """optax's ``orthogonalize_via_newton_schulz`` of one matrix, in ``G``'s dtype: a tall
    ``G`` transposed, divided by ``‖G‖_F + eps`` (``"frobenius"``) or ``‖G‖₂ + eps``
    (``"spectral"``), then ``X ← a·X + (b·A + c·A·A)·X`` with ``A = X·Xᵀ``, ``steps``
    times (or once per row of coefficients), the first of them rescaled under ``"aol"`` /
    ``"schatten"``."""
    rows = coefficients if isinstance(coefficients[0], tuple) else (coefficients,) * steps
    tall = G.shape[0] > G.shape[1]
    X = xp.T(G) if tall else G
    if preconditioning == "frobenius":
        X = X / (xp.norm0(X) + eps)
    elif preconditioning == "spectral":
        X = X / (_spectral(xp, X) + eps)
    # (torch lays a new array out by its axes' order: a 1-wide matrix's own strides, kept
    # in place, could route a product to another BLAS kernel)
    if xp.name == "numpy" and min(G.shape) > 0 or xp.name == "torch" and min(G.shape) > 1:
        X = _iterate_in_place(xp, X, rows, preconditioning)
    else:
        for i, (a, b, c) in enumerate(rows):
            A = X @ xp.T(X)
            if i == 0 and preconditioning in ("aol", "schatten"):
                X, A = _first_step(xp, X, A, preconditioning)
            X = a * X + (b * A + c * (A @ A)) @ X
    return xp.T(X) if tall else X


def _iterate_in_place(xp: NumpyOps, X: Any, rows: Sequence[tuple], preconditioning: str
                      ) -> Any:
    """:func:`newton_schulz_optax`'s iterations on NumPy / torch: the very operations on
    arrays of the very layouts (the same bits), the products written into this thread's
    scratch buffers and the elementwise steps in place, instead of 8 new arrays each.
    ``X`` is the normalised copy (or ``G``, which AOL / Schatten replace at once); the
    result is a new array, not a scratch buffer."""
    from .muon_newton_schulz import _buffers

    m, torch = xp.m, xp.name == "torch"
    mm = m.mm if torch else m.matmul
    dev = X.device if torch else None
    A0, AA = _buffers(m, "optax_A", (X.shape[0],) * 2, X.dtype, 2, dev)
    Y = _buffers(m, "optax_Y", tuple(X.shape), X.dtype, 1, dev)[0] if torch else None
    for i, (a, b, c) in enumerate(rows):
        A = mm(X, xp.T(X), out=A0)
        if i == 0 and preconditioning in ("aol", "schatten"):
            X, A = _first_step(xp, X, A, preconditioning)  # (new arrays)
        mm(A, A, out=AA)
        AA *= c
        A *= b
        A += AA  # b·A + c·A·A
        if Y is None:  # (NumPy's a·X + B·X is C-ordered, whatever X's order)
            Y = m.empty(X.shape, X.dtype)
        mm(A, X, out=Y)
        X *= a
        if torch:  # (torch's a·X + B·X takes a·X's layout: X's, kept)
            X += Y
        else:
            m.add(X, Y, out=Y)
            X, Y = Y, (X if X.flags.c_contiguous else None)
    return X


def optax_scalars(opt: Muon, step: Any) -> tuple[Any, ...]:
    """The learning rate and optax's bias corrections ``1 − βᵗ``, ``1 − βᵗ⁺¹``."""
    b = opt.momentum
    return opt.learning_rate, 1 - b**step, 1 - b ** (step + 1)


def optax_update(opt: Muon, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                 scalars: tuple[Any, ...], name: str, axes: _dn.Axes
                 ) -> tuple[Any, dict[str, Any]]:
    """``scale_by_muon`` then ``scale_by_shape`` on one tensor (the decoupled weight decay
    is already in ``p``): the momentum bias-corrected (Nesterov:
    ``β·B/(1−βᵗ⁺¹) + (1−β)·g/(1−βᵗ)``), orthogonalised per (fan_in, fan_out) matrix,
    optionally scaled by ``⟨U, O⟩`` (``adaptive``) and by the width factor."""
    lr, c1, c2 = scalars
    b = opt.momentum
    buf = xp.lerp(slots["momentum_buffer"], g, 1 - b)
    u = (b / c2) * buf + ((1 - b) / c1) * g if opt.nesterov else buf / c1
    args = (opt.ns_coefficients, opt.ns_steps, opt.epsilon, opt.preconditioning)
    if axes == OPTAX_2D:
        o = newton_schulz_optax(xp, u, *args)
    else:  # (B, fan_in, fan_out): each matrix alone, as optax's vmap
        mats = _dn.to_matrices(xp, u, axes)
        o = _dn.from_matrices(xp, xp.m.stack([newton_schulz_optax(xp, mats[i], *args)
                                              for i in range(mats.shape[0])]),
                              axes, tuple(u.shape))
    if opt.adaptive:  # the dual norm of the update
        o = (u * o).sum() * o
    _, fan_in, fan_out = _dn.matrix_shape(tuple(p.shape), axes)
    r = opt.adjust_lr_fn
    rate = 0.2 if r == "match_rms_adamw" else r
    scale = (math.sqrt(max(1, fan_out / fan_in)) if rate in (None, "original")
             else math.sqrt(max(fan_in, fan_out)) * rate)
    return xp.add_scaled(p, o, -(lr * scale)), {"momentum_buffer": buf}
