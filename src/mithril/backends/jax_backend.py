"""JAX backend: gradients from ``jax.vjp``; with ``jit`` the forward and the
forward+VJP are each one ``jax.jit`` function (compiled once per input shape)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..compiler.interpret import outputs_of, run_forward
from ..models.context import M32, RunContext
from .backend import Backend, Evaluator
from .helpers import dtype_arg, refuse_device_mesh


def aval_getter(array_type: type) -> Any:
    """A function reading a JAX array's abstract value (shape, dtype): the ``aval``
    property's getter of ``array_type``, half the cost of ``x.aval`` (JAX shares one aval
    among the arrays of a shape and dtype, so callers compare them by identity)."""
    import operator

    return getattr(array_type.aval, "fget", None) or operator.attrgetter("aval")


class JaxBackend(Backend):
    """Arrays are ``jax.Array``. ``dtype="float64"`` turns on ``jax_enable_x64``."""

    name = "jax"
    int_dtype = "int32"

    def __init__(self, dtype: str | None = None, seed: int = 0, device: str | None = None, *,
                 precision: int | None = None, device_mesh: Any = None) -> None:
        """``dtype`` / ``precision`` and ``seed`` as :class:`~mithril.backends.Backend`;
        ``device``: a JAX platform (``"cpu"``, ``"gpu"``); ``device_mesh`` is refused (see
        :mod:`mithril.distributed`)."""
        refuse_device_mesh(device_mesh, "JaxBackend")
        import jax

        super().__init__(dtype, seed, precision=precision)
        self.native_type = jax.Array
        if self.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        # this process's own device: under jax.distributed, jax.devices() lists every
        # process's, and another's cannot be written from here
        self.device = jax.local_devices(backend=device)[0] if device else jax.local_devices()[0]

    is_manualgrad = False

    def _ns(self) -> Any:
        import jax.numpy as jnp

        return jnp

    def array(self, data: Any, dtype: Any = None, device_mesh: Any = None) -> Any:
        """``data`` as a ``jax.Array`` on the backend's device (floats in the backend dtype
        unless ``dtype``)."""
        refuse_device_mesh(device_mesh, "JaxBackend.array")
        import jax
        import jax.numpy as jnp

        dtype = dtype if dtype is None or isinstance(dtype, str) else dtype_arg(dtype)
        a = data if isinstance(data, jax.Array) else np.asarray(data)
        if dtype is None and (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
            dtype = self.dtype
        if isinstance(a, jax.Array):  # stays where it is
            return a if dtype is None else a.astype(dtype)
        return jax.device_put(jnp.asarray(a, dtype=dtype), self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def stop_gradient(self, input: Any) -> Any:
        import jax

        return jax.lax.stop_gradient(input)

    def to_device(self, data: Any, device: str, asynchronous: bool = True) -> Any:
        """``data`` on the first JAX device of kind ``device`` (``"cpu"``, ``"gpu"``)."""
        import jax

        out = jax.device_put(self._native(data), jax.local_devices(backend=device)[0])
        return out if asynchronous else out.block_until_ready()

    def block_until_ready(self, data: Any = None) -> Any:
        """Wait until ``data`` (an array or a pytree of them) is computed; returns it."""
        import jax

        return None if data is None else jax.block_until_ready(data)

    def native_dtype(self, name: str | None = None) -> Any:
        import jax.numpy as jnp

        return jnp.dtype(name or self.dtype)

    def evaluator(self, program: Any, jit: bool) -> Evaluator:
        return _JaxEvaluator(program, jit)


def _full_cotangents(out: Mapping[str, Any], cots: Mapping[str, Any]) -> dict[str, Any]:
    """A cotangent for every output, in that output's dtype (``jax.vjp`` wants them to match:
    a ``Cast`` to float32 in a float64 model has a float32 output), zeros where none is given."""
    import jax.numpy as jnp

    full = {}
    for k, v in out.items():
        if k not in cots:
            full[k] = jnp.zeros_like(v)
        elif cots[k].dtype != v.dtype and jnp.issubdtype(v.dtype, jnp.floating):
            full[k] = cots[k].astype(v.dtype)
        else:
            full[k] = cots[k]
    return full


class _JaxEvaluator(Evaluator):
    """Parameters travel as a tuple in program order: cheaper to flatten than a dict on
    every call, and the gradients come back in the order of ``get_parameters()``."""

    def __init__(self, prog: Any, jit: bool) -> None:
        import jax
        import jax.numpy as jnp

        self.names = names = tuple(prog.param_shapes)

        def fwd(ptuple, inputs):
            return outputs_of(prog, run_forward(prog, jnp, dict(zip(names, ptuple, strict=True)),
                                                inputs, shared_jit=jit))

        def fwd_vjp(ptuple, inputs, cots):
            out, pull = jax.vjp(lambda p: fwd(p, inputs), ptuple)
            full = _full_cotangents(out, cots)
            return out, pull(full)[0]

        self._fwd = jax.jit(fwd) if jit else fwd
        self._fwd_vjp = jax.jit(fwd_vjp) if jit else fwd_vjp

        # with context operators: the mode is static (one jitted function per mode); the seed
        # and step travel as one traced uint32 pair (no recompiling per step), the state as a dict
        def fwd_ctx(ptuple, inputs, rng, state, training):
            run = RunContext(training, rng[0], rng[1], state)
            out = outputs_of(prog, run_forward(prog, jnp, dict(zip(names, ptuple, strict=True)),
                                               inputs, run, shared_jit=jit))
            return out, run.new_state

        def fwd_vjp_ctx(ptuple, inputs, rng, state, cots, training):
            out, pull, new_state = jax.vjp(lambda p: fwd_ctx(p, inputs, rng, state, training),
                                           ptuple, has_aux=True)
            full = _full_cotangents(out, cots)
            return out, pull(full)[0], new_state

        static = {"static_argnames": ("training",)}
        self._fwd_ctx = jax.jit(fwd_ctx, **static) if jit else fwd_ctx
        self._fwd_vjp_ctx = jax.jit(fwd_vjp_ctx, **static) if jit else fwd_vjp_ctx

    @staticmethod
    def _rng(run: RunContext) -> Any:
        import jax.numpy as jnp

        def u32(v: Any) -> Any:
            return jnp.asarray(v).astype(jnp.uint32) if hasattr(v, "dtype") else np.uint32(int(v) & M32)

        return jnp.stack([u32(run.seed), u32(run.step)])

    def forward(self, params, inputs, run=None):
        ptuple = tuple(params[k] for k in self.names)
        if run is None:
            return self._fwd(ptuple, dict(inputs))
        out, run.new_state = self._fwd_ctx(ptuple, dict(inputs), self._rng(run), dict(run.state),
                                           training=run.training)
        return out

    def forward_vjp(self, params, inputs, cotangents, run=None):
        ptuple = tuple(params[k] for k in self.names)
        if run is None:
            out, grads = self._fwd_vjp(ptuple, dict(inputs), dict(cotangents))
        else:
            out, grads, run.new_state = self._fwd_vjp_ctx(
                ptuple, dict(inputs), self._rng(run), dict(run.state), dict(cotangents),
                training=run.training)
        return out, dict(zip(self.names, grads, strict=True))
