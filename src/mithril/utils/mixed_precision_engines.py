"""The numerics :class:`~mithril.utils.mixed_precision.MixedPrecisionTrainer` runs per backend:
casting between the compute and master dtypes, a forward pass that keeps what the backward
pass needs (every wire's value on NumPy, the autograd graph on torch, the VJP residuals on
JAX), and the scaled backward pass with its unscaling and finiteness check."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..compiler.interpret import numpy_backward, outputs_of, run_forward
from ..models.context import RunContext


class Engine:
    """Casting, forward with a kept tape, and scaled backward + unscale + finiteness check."""

    def __init__(self, model: Any, compute: str, master: str) -> None:
        self.model, self.prog, self.backend = model, model.program, model.backend
        self.compute, self.master = compute, master
        self.cdt = self.backend.native_dtype(compute)
        self.mdt = self.backend.native_dtype(master)
        self._saved: Any = None

    def cast_tree(self, tree: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
        raise NotImplementedError

    def to_master(self, tree: Mapping[str, Any]) -> dict[str, Any]:
        """Independent master-dtype copies."""
        return self.cast_tree(tree, self.mdt)

    def cotangent(self, c: Any) -> Any:
        """A user loss gradient as a native array (any float dtype; scalars allowed)."""
        b = self.backend
        if b.is_native(c):
            return c
        return b.array(np.asarray(c, dtype=np.float64), self.master)

    def clear(self) -> None:
        self._saved = None


def inv_scale(scale: float) -> np.float32:
    """``1/scale`` as ``torch.amp.GradScaler`` unscales by it: the float64 reciprocal rounded
    to float32 (``scale.double().reciprocal().float()``); inf at a scale backed off to 0."""
    s = float(scale)
    return np.float32(1.0 / s) if s else np.float32(np.inf)


class NumpyEngine(Engine):
    def cast_tree(self, tree, dtype):
        return {k: np.array(v, dtype=dtype) for k, v in tree.items()}

    def forward(self, params, inputs, run=None):
        from ..backends.numpy_backend import _cast

        with np.errstate(all="ignore"):
            env = run_forward(self.prog, np, params, inputs, run)
            out = _cast(outputs_of(self.prog, env), self.cdt)
        self._saved = (params, env)
        return out

    def backward(self, cots, scale):
        from ..backends.numpy_backend import _cast

        params, env = self._saved
        # the loss gradients scaled in float32, or in the compute dtype if wider (float64: as
        # GradScaler.scale, in the outputs' dtype), then cast to the compute dtype
        wide = np.promote_types(self.cdt, np.float32)
        s, inv = wide.type(np.float32(scale)), inv_scale(scale)
        with np.errstate(all="ignore"):
            sc = {k: (np.asarray(c, dtype=wide) * s).astype(self.cdt) for k, c in cots.items()}
            grads = _cast(numpy_backward(self.prog, env, params, sc), self.cdt)
            g32 = {k: g.astype(self.mdt) * inv.astype(self.mdt) for k, g in grads.items()}
            finite = all(bool(np.isfinite(g).all()) for g in g32.values())
        return g32, finite


class TorchEngine(Engine):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import torch

        self.t = torch

    def cast_tree(self, tree, dtype):
        return {k: v.detach().to(dtype=dtype, copy=True) for k, v in tree.items()}

    def forward(self, params, inputs, run=None):
        torch = self.t
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            out = outputs_of(self.prog, run_forward(self.prog, self.backend._xp, leaves, inputs,
                                                    run))
        self._saved = (leaves, out)
        return {k: v.detach() for k, v in out.items()}

    def backward(self, cots, scale):
        torch = self.t
        leaves, out = self._saved
        names = [k for k in cots if out[k].requires_grad]
        sc = [(cots[k].to(device=out[k].device,
                          dtype=torch.promote_types(out[k].dtype, torch.float32)) * scale
               ).to(out[k].dtype) for k in names]  # (scaled as in NumpyEngine.backward)
        grads = torch.autograd.grad([out[k] for k in names], list(leaves.values()), sc,
                                    allow_unused=True) if names else [None] * len(leaves)
        inv = float(inv_scale(scale))  # (torch's float32 inv_scale, exactly)
        g32 = {k: (g.to(self.mdt) * inv) if g is not None else torch.zeros_like(p, dtype=self.mdt)
               for (k, p), g in zip(leaves.items(), grads, strict=True)}
        finite = bool(torch.stack([torch.isfinite(g).all() for g in g32.values()]).all()) \
            if g32 else True
        return g32, finite


class JaxEngine(Engine):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import jax
        import jax.numpy as jnp

        self.jnp = jnp
        prog, mdt = self.prog, self.mdt
        names = self.names = tuple(prog.param_shapes)

        def fwd(ptuple, inputs, rng, training):
            def f(p):
                # the mode is static; the seed and step a traced pair (no recompiling per step)
                run = RunContext(training, rng[0], rng[1]) if prog.has_context else None
                return outputs_of(prog, run_forward(prog, jnp, dict(zip(names, p, strict=True)),
                                                    inputs, run))

            return jax.vjp(f, ptuple)

        def bwd(pull, out, cots, scale, inv):
            # (scaled as in NumpyEngine.backward; inv: inv_scale's float32)
            full = {k: (cots[k].astype(jnp.promote_types(v.dtype, jnp.float32))
                        * scale).astype(v.dtype) if k in cots
                    else jnp.zeros_like(v) for k, v in out.items()}
            grads = pull(full)[0]
            inv = inv.astype(mdt)
            g32 = {k: g.astype(mdt) * inv for k, g in zip(names, grads, strict=True)}
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in g32.values()])) \
                if g32 else jnp.bool_(True)
            return g32, finite

        def cast(tree, dtype):
            return {k: v.astype(dtype) for k, v in tree.items()}

        wrap = jax.jit if getattr(self.model, "jit", True) else (lambda f, **kw: f)
        self._fwd, self._bwd = wrap(fwd, static_argnames=("training",)), wrap(bwd)
        self._cast = wrap(cast, static_argnums=1)

    def cast_tree(self, tree, dtype):
        return self._cast(dict(tree), self.jnp.dtype(dtype))

    def to_master(self, tree):
        # real copies: jit may forward an unchanged input, and on CPU the optimizers update
        # their JAX param arrays in place (aliased host buffers)
        return {k: self.jnp.array(v, dtype=self.mdt, copy=True) for k, v in tree.items()}

    def forward(self, params, inputs, run=None):
        from ..models.context import M32

        seed, step = (0, 0) if run is None else (run.seed, run.step)
        rng = self.jnp.asarray([int(seed) & M32, int(step) & M32], dtype=self.jnp.uint32)
        out, pull = self._fwd(tuple(params[k] for k in self.names), dict(inputs), rng,
                              training=True if run is None else run.training)
        self._saved = (pull, out)
        return dict(out)

    def backward(self, cots, scale):
        pull, out = self._saved
        g32, finite = self._bwd(pull, out, dict(cots), np.float32(scale), inv_scale(scale))
        return dict(g32), bool(np.asarray(finite))  # (bool() of a JAX array: ~25 us)


ENGINES = {"numpy": NumpyEngine, "torch": TorchEngine, "jax": JaxEngine}
