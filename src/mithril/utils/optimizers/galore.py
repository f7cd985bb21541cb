"""GaLore (Zhao et al., 2024): Adam on low-rank projections of the gradients of matrices,
as optax.contrib.galore."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .checks import check_int, check_positive, check_unit, describe, to_float
from .state import OptimizerState
from .tensorwise import NumpyOps, TensorwiseOptimizer

#: a saved projector's columns are orthonormal to float32 rounding (the SVD runs in
#: float32): one further off than this is refused on loading
ORTHONORMAL_TOL = 1e-3


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
    gradient, without ``scale`` (optax's default ``weight_dimension_numbers=None``; a
    tensor of higher rank is not reshaped into a matrix here). The moments are not reset
    when P changes (as optax): they carry over into the new subspace. ``weight_decay`` is
    optax's ``add_decayed_weights`` after the projection, i.e. decoupled,
    ``p ← p·(1 − lr·wd) − lr·u`` (its ``mask``: ``weight_decay_mask``).

    Slots: ``projector`` (P, (m, r) or (n, r); ``(0,)`` for a non-matrix), ``m`` and ``v``
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
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.__dict__["rank"] = check_int("rank", rank, minimum=1)  # (fixed: __setattr__)
        self.update_proj_gap = check_int("update_proj_gap", update_proj_gap, minimum=1)
        self.scale = to_float("scale", scale)
        if not np.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {describe(scale)}")
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon)
        self.eps_root = check_positive("eps_root", eps_root)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "rank" and "rank" in self.__dict__ and value != self.rank:
            raise AttributeError("GaLore's rank is fixed at construction (a state's slots "
                                 "are laid out by it): build another GaLore")
        super().__setattr__(name, value)

    def _finish_groups(self) -> None:
        super()._finish_groups()
        for i, g in enumerate(self._groups or ()):
            if "rank" in g:
                raise ValueError(f"param_groups[{i}]: rank lays out the state's slots: it "
                                 f"configures GaLore as a whole, not a group")

    def slot_shape(self, slot: str, shape: tuple[int, ...], name: str | None = None
                   ) -> tuple[int, ...]:
        """By shape alone: P and the low-rank moments of a matrix (see the class docs)."""
        if slot not in self.slots or len(shape) != 2:
            return (0,) if slot == "projector" else shape
        m, n = shape
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
        left = len(g.shape) == 2 and g.shape[0] >= g.shape[1]
        out = {"projector": P}
        if len(g.shape) == 2:
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
        if len(p.shape) == 2:
            u = self.scale * (P @ u if left else u @ xp.T(P))
        out.update(m=m, v=v)
        return p - lr * u, out

    @staticmethod
    def _loaded_state(trial: Any, d: Mapping[str, Any], params: Mapping[str, Any],
                      started: tuple[str, ...] = ()) -> OptimizerState:
        """As the base class's, and each saved projector one a step could give: zeros
        before the first step (or before its tensor's first gradient), else orthonormal
        columns (to :data:`ORTHONORMAL_TOL`; NaN passes, a diverged run's)."""
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
            if off > ORTHONORMAL_TOL:
                raise ValueError(f"{where} must have orthonormal columns (an SVD's), off by "
                                 f"{off:.3g}")
        return state
