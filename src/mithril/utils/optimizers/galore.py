"""GaLore (Zhao et al., 2024): Adam on low-rank projections of the gradients of matrices,
as optax.contrib.galore."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import dimension_numbers as _dn
from .checks import check_int, check_positive, check_unit, describe, to_float
from .groups import differs
from .state import OptimizerState
from .tensorwise import NumpyOps, TensorwiseOptimizer

#: G of a 2-D tensor without ``weight_dimension_numbers``: the tensor itself
_PLAIN_2D = _dn.Axes((), (0,), (1,))
#: a saved projector's columns are orthonormal to float32 rounding (the SVD runs in
#: float32): one further off than this is refused on loading (a projector held in
#: float16 / bfloat16, its parameter's dtype, is as far off as that dtype's rounding:
#: up to its machine epsilon, and 4 of them are allowed: :func:`_orthonormal_tol`)
ORTHONORMAL_TOL = 1e-3


def _orthonormal_tol(dtype_name: str) -> float:
    """How far a saved projector of a parameter of ``dtype_name`` may be from orthonormal
    columns: its columns, unit vectors rounded elementwise to the dtype (relative error at
    most eps/2 each), have inner products off by at most eps."""
    import ml_dtypes

    try:
        eps = float(ml_dtypes.finfo(dtype_name).eps)
    except (TypeError, ValueError):  # (not a float dtype's name: float32's)
        eps = 0.0
    return max(ORTHONORMAL_TOL, 4 * eps)


def _svd_float32(xp: NumpyOps, g: Any) -> tuple[Any, Any]:
    """(U, Vᵀ) of the reduced SVD of ``g`` computed in float32, as optax (it casts the
    gradient to float32 first): on JAX ``jnp.linalg.svd``; on NumPy and torch-CPU LAPACK's
    gesdd through SciPy, the very routine jaxlib calls on CPU (its LAPACK is SciPy's), so
    that the vectors, signs included, are optax's to the bit; on CUDA torch's own
    (cuSOLVER, as JAX on GPU: other rounding and signs than on CPU)."""
    if xp.name == "jax":
        u, _, vt = xp.m.linalg.svd(g.astype(xp.m.float32), full_matrices=False)
        return u, vt
    if xp.name == "torch" and g.device.type != "cpu":
        u, _, vt = xp.m.linalg.svd(g.float(), full_matrices=False)
        return u, vt
    a = (g.detach().to("cpu", xp.m.float32).numpy() if xp.name == "torch"
         else np.asarray(g, dtype=np.float32))
    if not np.isfinite(a).all():  # (LAPACK's answer is undefined: JAX's is NaN)
        u, vt = np.full((a.shape[0], min(a.shape)), np.nan, np.float32), np.full(
            (min(a.shape), a.shape[1]), np.nan, np.float32)
    else:
        try:
            from scipy.linalg import svd
        except ImportError:  # (NumPy's gesdd: its own LAPACK, equal to rounding, signs aside)
            u, _, vt = np.linalg.svd(a, full_matrices=False)
        else:
            u, _, vt = svd(a, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    if xp.name == "torch":
        return xp.m.from_numpy(u).to(g.device), xp.m.from_numpy(vt).to(g.device)
    return u, vt


class GaLore(TensorwiseOptimizer):
    """GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient
    Low-Rank Projection") as ``optax.contrib.galore`` with its default base optimizer
    (``scale_by_adam``), same hyperparameters and defaults (``rank=128``,
    ``update_proj_gap=200``, ``scale=1``, ``b1=0.9``, ``b2=0.999``, ``eps=1e-8``,
    ``eps_root=0``; optax has no default learning rate: 1e-3 here). For a matrix
    ``G`` (m × n) at step t, with r = min(rank, m, n)::

        if (t − 1) mod update_proj_gap = 0:               (t = 1, 1 + gap, …)
            P ← U[:, :r] of svd(G) if m ≥ n else V[:, :r]  (SVD in float32, as optax)
        R = Pᵀ·G (r × n) if m ≥ n else G·P (m × r)
        m ← β₁·m + (1−β₁)·R     v ← β₂·v + (1−β₂)·R²     (on R's shape)
        N = (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ) + eps_root) + eps)
        p ← p − lr·scale·(P·N if m ≥ n else N·Pᵀ)

    Parameters that are not matrices (biases, norms, conv kernels) get Adam on their full
    gradient, without ``scale`` (optax's default ``weight_dimension_numbers=None``).

    ``weight_dimension_numbers`` (optax's): which axes of a parameter are G's rows
    (``reduction_axis``) and its columns (``output_axis``), a
    :class:`~.dimension_numbers.DimensionNumbers` (or optax's ``GaLoreDimensionNumbers``):
    G is the tensor transposed to (reduction…, output…) and reshaped to
    (fan_in, fan_out), and the update is reshaped back (e.g. an attention weight
    (embed, heads, head_dim) with ``DimensionNumbers(0, (1, 2))``: G is
    embed × heads·head_dim). Every axis must be named (no batch axes, as optax). It takes
    None (2-D tensors as they are), one spec (every tensor of 2+ axes; vectors get plain
    Adam), a dict ``{name: spec or None}`` naming every parameter (None: plain Adam on the
    whole gradient, no ``scale``), or a callable called with ``{name: array}`` for each
    parameter alone that returns such a dict. An axis out of range, one in both, one in
    neither, or a spec on a vector is refused by ``init``, naming the parameter (a dict
    naming a parameter there is not: by the first step); it lays the slots out (from G's
    shape), so it is fixed at construction.

    The moments are not reset when P changes (as optax): they carry over into the new
    subspace. ``weight_decay`` is optax's ``add_decayed_weights`` after the projection, i.e.
    decoupled,
    ``p ← p·(1 − lr·wd) − lr·u`` (its ``mask``: ``weight_decay_mask``).

    Slots: ``projector`` (P, (m, r) or (n, r) of G; ``(0,)`` for a non-matrix), ``m`` and ``v``
    (R's shape for a matrix, the parameter's otherwise): optax's ``projector`` and its
    ``scale_by_adam``'s ``mu``/``nu``. ``rank`` lays the slots out and is fixed at
    construction. The SVD (:func:`_svd_float32`) is optax's routine on CPU (equal
    projectors, signs included: the result depends on them, since the moments carry over
    a refresh); on a GPU it is cuSOLVER's, as JAX's there.
    """

    slots = ("projector", "m", "v")
    decoupled_weight_decay = True
    # (β₁, β₂ reach the math through scalars: 1 − β computed on the host in float64, as
    # optax's Python-float decay, not in the program's float32)
    traced_in_update = ("epsilon", "eps_root", "scale")
    loaded_domains = {"v": "nonnegative"}

    def __init__(self, learning_rate: float = 1e-3, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 1.0, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 0.0,
                 weight_dimension_numbers: _dn.Spec = None, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.__dict__["rank"] = check_int("rank", rank, minimum=1)  # (fixed: __setattr__)
        self.__dict__["weight_dimension_numbers"] = _dn.check_dimension_numbers(
            weight_dimension_numbers)
        self.__dict__["_dims_seen"] = {}
        self.update_proj_gap = check_int("update_proj_gap", update_proj_gap, minimum=1)
        self.scale = to_float("scale", scale)
        if not np.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {describe(scale)}")
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon)
        self.eps_root = check_positive("eps_root", eps_root)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("rank", "weight_dimension_numbers") and name in self.__dict__ and \
                value != self.__dict__[name]:
            raise AttributeError(f"GaLore's {name} is fixed at construction (a state's slots "
                                 f"are laid out by it): build another GaLore")
        super().__setattr__(name, value)

    def _finish_groups(self) -> None:
        super()._finish_groups()
        for i, g in enumerate(self._groups or ()):
            for k in {"rank", "weight_dimension_numbers"} & set(g):
                if not differs(g[k], getattr(self, k)):  # (torch_optimizer's groups
                    g._drop(k)  # repeat every value: no change)
            bad = sorted({"rank", "weight_dimension_numbers"} & set(g))
            if bad:
                raise ValueError(f"param_groups[{i}]: {bad} lay out the state's slots: they "
                                 f"configure GaLore as a whole, not a group")

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        dims = self.weight_dimension_numbers  # (a callable: as the specs it gave)
        out["weight_dimension_numbers"] = _dn.plain(
            dict(self._dims_seen) if callable(dims) and self._dims_seen else dims)
        return out

    def matrix_axes(self, name: str | None, shape: tuple[int, ...]) -> _dn.Axes | None:
        """The parameter's axes as G's under ``weight_dimension_numbers`` (None: plain
        Adam)."""
        dims = self.weight_dimension_numbers
        if dims is not None and name is None:
            raise ValueError(f"GaLore with weight_dimension_numbers lays slots out by name: "
                             f"a {shape} parameter was asked by shape alone")
        axes = _dn.resolve(dims, name or "", shape, _PLAIN_2D, batch=False,
                           cache=self.__dict__.setdefault("_dims_cache", {}))
        if callable(dims):  # (hyperparameters lists them)
            self._dims_seen[name] = None if axes is None else _dn.DimensionNumbers(
                axes.reduction, axes.output)
        return axes

    def tensor_rows(self, state: OptimizerState) -> list[Any]:
        # a dict naming a parameter there is not: refused before the first step (init
        # checks the others, each as its slots are laid out)
        _dn.check_names(self.weight_dimension_numbers, state.layout.names)
        return super().tensor_rows(state)

    def slot_shape(self, slot: str, shape: tuple[int, ...], name: str | None = None
                   ) -> tuple[int, ...]:
        """P and the low-rank moments of G (see the class docs), by shape alone without
        ``weight_dimension_numbers``."""
        axes = self.matrix_axes(name, shape) if slot in self.slots else None
        if axes is None:
            return (0,) if slot == "projector" else shape
        _, m, n = _dn.matrix_shape(shape, axes)
        r = min(self.rank, m, n)
        if slot == "projector":
            return (m, r) if m >= n else (n, r)
        return (r, n) if m >= n else (m, r)

    def scalars(self, step: int) -> tuple[Any, ...]:
        """(lr, β₁, 1 − β₁, β₂, 1 − β₂, 1 − β₁ᵗ, 1 − β₂ᵗ, whether P is recomputed at step
        ``t``)."""
        refresh = (step - 1) % self.update_proj_gap == 0
        if isinstance(step, (int, np.integer)):
            refresh = bool(refresh)
        b1, b2 = self.beta1, self.beta2
        return (self.learning_rate, b1, 1 - b1, b2, 1 - b2, 1 - b1 ** step, 1 - b2 ** step,
                refresh)

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[Any, ...], name: str) -> tuple[Any, dict[str, Any]]:
        lr, b1, b1c, b2, b2c, bc1, bc2, refresh = scalars
        P, m, v = slots["projector"], slots["m"], slots["v"]
        axes, shape = self.matrix_axes(name, tuple(g.shape)), tuple(g.shape)
        reshaped = axes is not None and axes != _PLAIN_2D
        if reshaped:  # G: (fan_in, fan_out)
            g = _dn.to_matrices(xp, g, axes)[0]
        left = axes is not None and g.shape[0] >= g.shape[1]
        out = {"projector": P}
        if axes is not None:
            r = min(self.rank, *g.shape)

            def fresh() -> Any:  # U's first r columns, or V's (Vᵀ's first r rows)
                u, vt = _svd_float32(xp, g)
                P = u[:, :r] if left else xp.T(vt[:r, :])
                return P.to(g.dtype) if xp.name == "torch" else P.astype(g.dtype)

            if isinstance(refresh, (bool, int, float, np.number)):
                P = fresh() if refresh else P
            else:  # a traced step (an optax transformation's program): as optax, a cond
                import jax

                P = jax.lax.cond(refresh != 0, fresh, lambda: P)
            out["projector"] = P
            g = xp.T(P) @ g if left else g @ P
        m = b1c * g + b1 * m  # optax's update_moment
        v = b2c * g**2 + b2 * v
        u = (m / bc1) / (xp.m.sqrt(v / bc2 + self.eps_root) + self.epsilon)
        if axes is not None:
            u = self.scale * (P @ u if left else u @ xp.T(P))
            if reshaped:
                u = _dn.from_matrices(xp, u[None], axes, shape)
        out.update(m=m, v=v)
        return p - lr * u, out

    @staticmethod
    def _loaded_state(trial: Any, d: Mapping[str, Any], params: Mapping[str, Any],
                      started: tuple[str, ...] = ()) -> OptimizerState:
        """As the base class's, and each saved projector one a step could give: zeros
        before the first step (or before its tensor's first gradient), else orthonormal
        columns (to :data:`ORTHONORMAL_TOL`, or the rounding of a half-precision
        parameter's dtype, which the projector is held in; NaN passes, a diverged run's)."""
        state = TensorwiseOptimizer._loaded_state(trial, d, params, started)
        saved = state.slot_layout("projector").unflatten(state.slots["projector"])
        for name, P in saved.items():
            a = np.asarray(state.engine.to_numpy(P), dtype=np.float64)
            if a.size == 0 or not np.isfinite(a).all() or not a.any():
                continue
            where = f"state dict slot 'projector' of '{name}'"
            if state.step == 0:
                raise ValueError(f"{where} must be zeros at step 0 (no SVD has run)")
            off = float(np.abs(a.T @ a - np.eye(a.shape[1])).max())
            if off > _orthonormal_tol(str(params[name].dtype).removeprefix("torch.")):
                raise ValueError(f"{where} must have orthonormal columns (an SVD's), off by "
                                 f"{off:.3g}")
        return state
