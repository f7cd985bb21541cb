"""Pieces every engine shares: the base class, the prologue scalars and the non-finite policy."""

from __future__ import annotations

import math
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np


class Unfit(Exception):
    """Raised while JAX traces a jitted pass for arrays of other shapes or dtypes than the
    layout's: never compiled. The repeated step (:func:`.fast_step.run_jax`) passes the
    arrays unchecked and takes the full path on this, whose checks name the fault."""


def scalar_table(opt: Any, state: Any, t: int, norm: float | None, state_values: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, bool]:
    """The per-step scalars of every parameter group: a float64 table with one row per
    group (:func:`prologue`'s four values, then ``full_scalars(t, state.values)``: the
    optimizer's scalars, given the state's values it reads (``scalar_values``), and any
    averaging weights), each tensor's row, and whether any group clips by value (a group
    that does not then gets an infinite bound). ``state_values`` False: each value's
    ``state_value_init`` instead of the state's (a table whose value-dependent columns the
    jitted JAX engine's program replaces: nothing is read back for it)."""
    index, views = opt.group_rows(state)
    values = getattr(state, "values", None) if state_values else None
    from ..averaging import row_counts  # (averaging imports state, which imports this)

    counts = row_counts(opt, state, index, len(views))  # (each average's updates so far)
    if len(views) == 1:  # no groups: one row (its clip bound is its own), built directly
        v = views[0]
        scal = v.full_scalars(t, values, counts[0])
        row = (*prologue(v, norm, scal[0]), *scal)
        return np.array([row], dtype=np.float64), index, row[1] > 0
    rows = []
    for v, c in zip(views, counts):
        scal = v.full_scalars(t, values, c)
        rows.append((*prologue(v, norm, scal[0]), *scal))
    table = np.array(rows, dtype=np.float64)
    clip = any(r[1] > 0 for r in rows)  # (Python: NumPy's any on a few values costs ~1.5 us)
    if clip:
        table[table[:, 1] == 0, 1] = np.inf
    return table, index, clip


def norm_scale(clip_norm: Any, norm: Any, eps: Any = 1e-6) -> Any:
    """The global-norm clip's scale ``min(1, clip_norm / (norm + eps))``: torch's
    ``clip_grad_norm_`` with ``eps=1e-6``, optax's ``clip_by_global_norm`` with 0. Python
    numbers: 1 where ``norm + eps`` is 0 or NaN (no division by zero; ``min(1, c/nan)`` is
    1 too); arrays (torch, traced JAX): ``c/0`` is inf there, which the minimum makes 1."""
    if isinstance(norm, (float, int)):  # (np.float64 too) the host's common case first
        return min(1.0, clip_norm / (norm + eps)) if norm + eps > 0 else 1.0
    mod = type(norm).__module__.split(".", 1)[0]
    if mod == "torch":
        return (clip_norm / (norm + eps)).clamp_max(1.0)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.minimum(1.0, clip_norm / (norm + eps))
    norm = float(norm)
    return min(1.0, clip_norm / (norm + eps)) if norm + eps > 0 else 1.0


def prologue(opt: Any, norm: float | None, lr: float) -> tuple[float, float, float, float]:
    """(gscale, clip_value or 0, coupled L2 factor, decoupled keep factor) for one step.

    gscale: min(1, max_norm / (norm + clip_eps)) (:func:`norm_scale`).
    """
    gscale = 1.0
    if opt.clip_norm is not None and norm is not None:
        gscale = norm_scale(opt.clip_norm, norm, opt.clip_eps)
    cv = opt.clip_value or 0.0
    if opt.weight_decay_in_math:  # the optimizer's own scalars carry it
        return gscale, cv, 0.0, 1.0
    if opt.decoupled_weight_decay:
        return gscale, cv, 0.0, 1.0 - lr * opt.weight_decay
    return gscale, cv, opt.weight_decay, 1.0


def nonfinite_error(opt: Any, bad: list[str], norm: float) -> FloatingPointError:
    what = (f"non-finite gradient(s) for {bad}" if bad else
            "finite gradients whose sum of squares overflows float64 (|g| > ~1e154)")
    return FloatingPointError(f"{type(opt).__name__}: {what} (global norm {norm}); params and "
                              f"state left unchanged")


def nonfinite_result_error(opt: Any, bad: list[str]) -> FloatingPointError:
    where = f"for {bad}" if bad else "for some parameters"
    return FloatingPointError(
        f"{type(opt).__name__}: finite gradients, but the step would give non-finite params or "
        f"optimizer state {where} (a learning rate or other hyperparameter too large for the "
        f"dtype, or values that already were inf/NaN?); params and state left unchanged")


def all_finite(isfinite: Any, arrays: list) -> Any:
    """Per element: every one of ``arrays`` finite there (the new param and slots)."""
    out = isfinite(arrays[0])
    for x in arrays[1:]:
        out = out & isfinite(x)
    return out


def nonfinite_results(opt: Any, flat: Any, slots: dict[str, Any], grads: Any, to_numpy: Any,
                      layout: Any, table: np.ndarray, index: np.ndarray) -> list[str]:
    """The parameters whose step gives a non-finite param or slot value, recomputed with
    NumPy on host copies (only to name them in an error: the rare path)."""
    dt = np.dtype(layout.dtype).type
    bad = []
    with np.errstate(all="ignore"):
        for i, (name, a, b, _) in enumerate(layout.spans()):
            if name not in grads:
                continue
            row = [dt(x) for x in table[index[i]]]
            gscale, cv, l2, keep = row[:4]
            scal = tuple(row[4:])
            g = np.asarray(to_numpy(grads[name]), dtype=dt).reshape(-1) * gscale
            if cv > 0:
                g = np.clip(g, -cv, cv)
            p = np.asarray(flat[a:b])
            g = g + l2 * p
            out = opt.full_kernel_math(len(scal))(p * keep, g, *(
                np.asarray(slots[s][a:b]) for s in opt.full_slot_names()), *scal)
            if not all_finite(np.isfinite, list(out)).all():
                bad.append(name)
    return bad


def refuses(opt: Any) -> bool:
    """Whether ``opt``'s policy refuses a non-finite step (``"skip"``, ``"raise"``: computed
    before anything is written) rather than applying it (``"propagate"``, ``"unchecked"``)."""
    return opt.nonfinite in ("skip", "raise")


def must_skip(opt: Any, norm: float, grads: Any, to_numpy: Any) -> bool:
    """Apply the ``skip``/``raise`` policy to a norm measured before any write."""
    if is_finite(norm) or not refuses(opt):
        return False
    if opt.nonfinite == "raise":
        raise nonfinite_error(opt, [n for n, g in grads.items()
                                    if not np.isfinite(to_numpy(g)).all()], norm)
    return True


def host_norm(grads: Any, to_numpy: Any) -> float:
    """‖g‖₂ of ``grads`` summed in float64 on host copies (a rare path's report)."""
    return math.sqrt(sum(float(np.sum(np.square(to_numpy(g), dtype=np.float64)))
                         for g in grads.values()))


def is_finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


class Engine:
    """What every engine gives the :class:`~mithril.utils.optimizers.Optimizer` base class.

    Subclasses set ``backend``, ``layout``, ``array_type`` (the concrete array class) and
    ``native_dtype``, and implement ``full``, ``to_numpy``, ``from_numpy`` and ``step``.
    """

    backend: Any
    layout: Any
    array_type: Any
    native_dtype: Any

    _keys: list | None = None  # the gradient keys that last matched (see ordered)
    _take: Any = None  # itemgetter from that key order to the layout's (None: the same)

    def ordered(self, gradients: Any) -> list | None:
        """The values of ``gradients`` in layout order if it has exactly the parameters'
        names, else None. Its keys may come in another order (a ``jax.jit`` returns a dict
        with its keys sorted): the last order that matched is kept with the permutation to
        the layout's, and its key objects, so that the next comparison goes by identity
        instead of comparing strings."""
        keys = list(gradients)
        if keys == self._keys:
            vals = list(gradients.values())
            return vals if self._take is None else list(self._take(vals))
        names = self.layout.name_list
        if keys == names:
            self._keys, self._take = keys, None
            return list(gradients.values())
        if len(keys) != len(names) or self.layout.index.keys() != set(keys):
            return None
        where = {k: i for i, k in enumerate(keys)}
        self._keys, self._take = keys, itemgetter(*[where[n] for n in names])  # (2+ names)
        return list(self._take(list(gradients.values())))

    def well_typed(self, vals: list) -> bool:
        """Whether ``vals`` (in layout order) have the parameters' shapes and dtype."""
        return [g.shape for g in vals] == self.layout.shape_list and {g.dtype for g in vals} == {
            self.native_dtype}

    def read_params(self, params: Any, views: dict, flat: Any) -> list[tuple[str, Any]]:
        """(name, array) for the given parameters that are not the arrays the last update
        returned (``views``), all read before anything is written: one that cannot be read
        is named, and nothing has changed. One that shares memory with ``flat`` (a returned
        array passed under another name, or a slice of one) is copied: writing ``flat``
        would change it under our feet."""
        out = []
        for name, p in params.items():
            if name in views and p is views[name]:
                continue
            try:
                x = self.readable(p)
                out.append((name, x if flat is None else self.unaliased_copy(x, flat)))
            except Exception as e:  # noqa: BLE001 - sparse, meta, deleted, ...
                raise TypeError(f"params['{name}'] cannot be read as a dense array: {e}") from e
        return out

    def fast_step(self, opt: Any, state: Any, params: Any, grads: Any) -> Any:
        """The step by ``state.fast`` (the recipe a plain step left), as ``step`` returns it
        (new params, applied, norm, finite), or None: take the full path."""
        return None

    def fuses_adaptive_clip(self, opt: Any, state: Any) -> bool:
        """Whether this engine applies ``opt``'s adaptive clipping inside its step (else the
        base class hands it clipped copies of the gradients)."""
        return False

    def centralized(self, grads: Any) -> dict[str, Any] | None:
        """``grads`` (each of 2+ axes) centralized by this engine into memory of its own
        (:mod:`.centralize_kernel`), or None: the base class makes new arrays."""
        return None

    def fuses_normalize(self, opt: Any, state: Any) -> bool:
        """Whether this engine applies ``opt``'s ``normalize_grad`` inside its step (else the
        base class hands it normalized copies of the gradients)."""
        return False

    def readable(self, p: Any) -> Any:
        """``p`` as an array the engine can copy into its flat buffer."""
        raise NotImplementedError

    def unaliased_copy(self, x: Any, flat: Any) -> Any:
        """``x``, or a copy of it if it shares memory with ``flat``."""
        raise NotImplementedError

    def prepare(self, gradients: Any) -> Any:
        """What :meth:`step` needs from a full, well-typed gradient dict (its values in
        layout order, whatever the order of its keys: :meth:`ordered`), found with
        C-speed passes (per-tensor Python work is what remains once the kernel is fused);
        None when the gradients need the per-key checks (and their error messages)."""
        vals = self.ordered(gradients)  # (also the count)
        if vals is None:
            return None
        if not all(map(isinstance, vals, repeat(self.array_type))):
            return None
        return vals if self.well_typed(vals) else None


def two_pass_table(opt: Any, state: Any, t: int, table: np.ndarray, index: np.ndarray,
                   sums: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The second pass's scalar table of an optimizer with :meth:`tensor_scalars`: one row
    per tensor, the extra scalars inserted after the optimizer's own (before any averaging
    weights). ``sums``: the first pass's per-tensor sums, shape (tensors, k), float64;
    ``present``: which tensors have a gradient (the others keep their tensor slots). What
    the step would commit (tensor slots, values) is left in ``state.pending``, which the
    base class calls once the step is applied."""
    n = len(state.layout.names)
    rows = table[index]
    n_avg = len(opt.full_slot_names()) - len(opt.slot_names())
    own_end = rows.shape[1] - n_avg
    host = state.engine.to_numpy
    tensors = {s: np.asarray(host(state.slots[s]), dtype=np.float64) for s in opt.tensor_slots}
    steps = [v.row_step(t) for v in opt.group_rows(state)[1]]  # (also checks the offsets)
    # groups that joined later: each tensor's own t, unless the optimizer-wide values read t
    if getattr(opt, "tensor_scalars_step", "tensor") == "tensor" and any(s != t for s in steps):
        t = np.array(steps, dtype=np.float64)[index]
    with np.errstate(all="ignore"):  # inf/NaN are found by the second pass's probe
        extra, new_tensors, values = opt.tensor_scalars(
            t, tuple(sums[:, k] for k in range(sums.shape[1])),
            tuple(rows[:, j] for j in range(4, own_end)), dict(tensors), dict(state.values),
            state.layout.sizes)
    # the extra columns (arrays of one value per tensor, or numbers) between the own
    # scalars and the averaging weights: written into one table (no broadcast, stack and
    # concatenate of small arrays: ~15 us of a small LAMB step)
    out = np.empty((n, rows.shape[1] + len(extra)))
    out[:, :own_end] = rows[:, :own_end]
    for j, e in enumerate(extra, own_end):
        out[:, j] = e
    out[:, own_end + len(extra):] = rows[:, own_end:]
    if set(new_tensors) != set(opt.tensor_slots) or set(values) != set(opt.state_values):
        raise RuntimeError(f"{type(opt).__name__}.tensor_scalars must return every tensor slot "
                           f"{sorted(opt.tensor_slots)} and value {sorted(opt.state_values)}")
    kept = {s: np.where(present, np.asarray(new, dtype=np.float64), tensors[s])
            for s, new in new_tensors.items()}
    values = {k: float(v) for k, v in values.items()}
    bad = [] if opt.nonfinite == "unchecked" else nonfinite_state(
        {s: k[present] for s, k in kept.items()}, values, state.layout, present)
    # inf/NaN tensor slots or values (DoG's Σ‖g‖² past float32's range from finite
    # gradients): the kernel's probe may not see them (DoG's step size is then 0), so the
    # policy is applied before anything is written
    if bad and refuses(opt):
        raise NonfiniteState(bad)

    def commit() -> None:
        eng = state.engine
        for s, k in kept.items():  # (from_numpy rounds to the parameters' dtype)
            state.slots[s] = eng.from_numpy(k)
        state.values = values

    commit.nonfinite = bad  # type: ignore[attr-defined]  # (read by Optimizer.update)
    state.pending = commit
    return out, np.arange(n, dtype=np.int64)


class NonfiniteState(Exception):
    """A two-pass step whose finite inputs give inf/NaN tensor slots or state values, under
    ``"skip"`` / ``"raise"``: raised before any write; :meth:`Optimizer.update` applies the
    policy. ``names``: what would be non-finite."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


def nonfinite_state(tensors: dict[str, np.ndarray], values: dict[str, float], layout: Any,
                    present: np.ndarray) -> list[str]:
    """What of a step's new tensor slots (the rows of the tensors with a gradient, in the
    parameters' dtype, as they would be stored) and state values is inf/NaN, named."""
    bad = [f"state value '{k}'" for k, v in values.items() if not math.isfinite(v)]
    if not tensors:
        return bad
    try:
        dt = np.dtype(layout.dtype)
    except TypeError:  # bfloat16 without ml_dtypes: float32's range
        dt = np.dtype(np.float32)
    for s, rows in tensors.items():
        with np.errstate(over="ignore", invalid="ignore"):
            ok = np.isfinite(rows.astype(dt))
        if not ok.all():  # (the names only then: a list of thousands costs a step ~50 us)
            names = [n for n, p in zip(layout.name_list, present) if p]
            bad += [f"tensor slot '{s}' of '{n}'" for n, f in zip(names, ok) if not f]
    return bad


def tensor_clipping(opt: Any, state: Any, normalize: bool = False) -> bool:
    """Whether any tensor is clipped by its own norm or RMS (``clip_tensor_norm`` /
    ``clip_block_rms``, which parameter groups may set or turn off); ``normalize``: or
    normalized (``normalize_grad``), where the engine fuses it (:func:`clipped_table`)."""
    _, views = opt.group_rows(state)
    return any(getattr(v, "clip_tensor_norm", None) is not None
               or getattr(v, "clip_block_rms", None) is not None
               or normalize and getattr(v, "normalize_grad", None) is not None for v in views)


def normalize_factor(scale: Any, norm: Any, eps: Any) -> Any:
    """The normalization's factor ``s / (‖g‖ + ε)``: optax ``normalize_by_update_norm(s, ε)``,
    and ``optax.contrib.normalize()`` with ``s=1, ε=0``. Where ``‖g‖ + ε`` is 0 (an all-zero
    gradient with ``ε=0``) or NaN the factor is 1: the gradient stays zero (optax's 0/0 gives
    NaN), a NaN one NaN. Python numbers, torch tensors or traced JAX arrays."""
    if isinstance(norm, (float, int)):
        return scale / (norm + eps) if norm + eps > 0 else 1.0
    from ..elementwise import where

    d = norm + eps
    return where(d > 0, scale / where(d > 0, d, 1.0), 1.0)


def _normalized(views: list, index: np.ndarray, sumsq: np.ndarray) -> np.ndarray:
    """Each tensor's normalization factor (1 where its row does not normalize), the norm
    that of the normalizing tensors together (:func:`normalize_factor`)."""
    on = np.array([getattr(v, "normalize_grad", None) is not None for v in views])[index]
    f = np.ones(len(index))
    if on.any():
        norm = math.sqrt(float(sumsq[on].sum()))
        rows = [normalize_factor(v.normalize_grad, norm, v.normalize_eps)
                if getattr(v, "normalize_grad", None) is not None else 1.0 for v in views]
        f[on] = np.asarray(rows, dtype=np.float64)[index][on]
    return f


def clipped_table(opt: Any, state: Any, t: int, sumsq: np.ndarray, normalize: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, bool, float]:
    """:func:`scalar_table` with each tensor's gradient clipped by its own norm first:
    ``sumsq`` holds each tensor's Σ g² (float64). Keras ``clipnorm`` scales a tensor by
    ``c / max(‖g‖, c)``, optax ``clip_by_block_rms`` by ``1 / max(1, rms(g) / c)``; then
    ``clip_norm`` (global) sees the clipped gradients' norm. ``normalize``: before those,
    ``normalize_grad``'s factor (the engine fuses it; else the gradients came normalized).
    Returns the per-tensor table, its row index (one row per tensor), the clip-by-value flag
    and the global norm before the clips (after the normalization)."""
    index, views = opt.group_rows(state)
    sizes = state.layout.sizes.astype(np.float64)
    f = np.ones(len(sizes))
    with np.errstate(all="ignore"):  # inf/NaN gradients: found by the policies
        if normalize:  # (the clips below measure the normalized gradients: s·f²)
            f = _normalized(views, index, sumsq)
        raw = float(np.sqrt(np.sum(sumsq * f * f)))
        for c_norm, c_rms, rows in _clip_specs(views, index):
            s = sumsq[rows] * f[rows] ** 2
            if c_norm is not None:
                n = np.sqrt(s)
                f[rows] *= c_norm / np.maximum(n, c_norm)
                s = sumsq[rows] * f[rows] ** 2
            if c_rms is not None:
                rms = np.sqrt(s / np.maximum(sizes[rows], 1.0))
                f[rows] /= np.maximum(1.0, rms / c_rms)
        clipped = float(np.sqrt(np.sum(sumsq * f * f)))
    table, rows_of, clip = scalar_table(opt, state, t, clipped)
    out = table[rows_of].copy()
    out[:, 0] *= f
    return out, np.arange(len(sizes), dtype=np.int64), clip, raw


def _clip_specs(views: list, index: np.ndarray) -> Any:
    for r, v in enumerate(views):
        c_norm, c_rms = getattr(v, "clip_tensor_norm", None), getattr(v, "clip_block_rms", None)
        if c_norm is not None or c_rms is not None:
            yield c_norm, c_rms, np.flatnonzero(index == r)
