"""JAX backend: gradients from ``jax.vjp``; with ``jit`` the forward and the
forward+VJP are each one ``jax.jit`` function (compiled once per input shape)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..compiler.interpret import outputs_of, run_forward
from ..models.context import M32, RunContext
from .backend import Backend, Evaluator
from .helpers import dtype_arg, host_array, refuse_device_mesh


def aval_getter(array_type: type) -> Any:
    """A function reading a JAX array's abstract value (shape, dtype): the ``aval``
    property's getter of ``array_type``, half the cost of ``x.aval`` (JAX shares one aval
    among the arrays of a shape and dtype, so callers compare them by identity)."""
    import operator

    return getattr(array_type.aval, "fget", None) or operator.attrgetter("aval")


def _is_tracer(x: Any) -> bool:
    import jax

    return isinstance(x, jax.core.Tracer)


def key_seed(seed: Any) -> Any:
    """``seed`` as an int where it is a JAX PRNG key (``jax.random.PRNGKey(s)``, a raw
    ``uint32[2]``, or ``jax.random.key(s)``, threefry's two words): ``hi << 32 | lo``, which
    is ``s`` again for the key of ``s``; anything else as it is. Dropout masks hash the
    seed's low 32 bits with the step (:mod:`mithril.models.context`), the same on every
    backend, so a key stands for its seed: keys of other implementations are refused."""
    import jax

    if not isinstance(seed, jax.Array):
        return seed
    typed = jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)
    if typed and seed.shape != ():
        raise TypeError(f"seed: one JAX PRNG key, got a batch of keys of shape "
                        f"{list(seed.shape)}")
    words = np.asarray(jax.random.key_data(seed)) if typed else np.asarray(seed)
    if not typed and (words.dtype != np.uint32 or words.shape != (2,)) and words.ndim != 0:
        raise TypeError(f"seed: an int or a JAX PRNG key (uint32[2]), got an array of "
                        f"{words.dtype}{list(words.shape)}")
    if words.ndim == 0:
        return seed
    if words.shape != (2,):
        raise TypeError(f"seed: a JAX PRNG key of threefry's two uint32 words, got key data "
                        f"of shape {list(words.shape)} (another PRNG implementation): pass "
                        f"an int seed")
    return int(words[0]) << 32 | int(words[1])


def jax_device(platform: str, who: str) -> Any:
    """This process's first device of ``platform`` (``"cpu"``, ``"gpu"``, ``"cuda"``), else a
    ``ValueError`` naming it and the platforms present (JAX's own is a ``RuntimeError``)."""
    import jax

    try:
        return jax.local_devices(backend=platform)[0]
    except (RuntimeError, ValueError, IndexError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        present = sorted({d.platform for d in jax.local_devices()})
        raise ValueError(f"{who}(device={platform!r}): no such JAX platform here ({why}); "
                         f"platforms present: {present}") from None


class JaxBackend(Backend):
    """Arrays are ``jax.Array``. ``dtype="float64"`` turns on ``jax_enable_x64``. ``seed``
    may be a JAX PRNG key (``jax.random.PRNGKey(7)`` is seed 7: :func:`key_seed`)."""

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
        self.device = jax_device(device, "JaxBackend") if device else jax.local_devices()[0]
        # arrays are committed only to a device named (here or by jax_default_device): on
        # JAX's default device they stay uncommitted, as jnp's own, so they follow arrays
        # placed elsewhere (on a mesh) and a jitted function taking them with the
        # (uncommitted) scalars of optax's init compiles once, not again at its second call
        self._commit = bool(device) or jax.config.jax_default_device is not None

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and ``pickle`` (an optimizer or its state holds its
        backend): the settings and the generator's state, the device as (platform, id)."""
        state = {k: v for k, v in self.__dict__.items() if k != "native_type"}
        state["device"] = (self.device.platform, self.device.id)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import jax

        platform, index = state["device"]
        self.__dict__.update(state)
        self.native_type = jax.Array
        if self.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        jax_device(platform, "JaxBackend")  # (a platform not here: the ValueError naming it)
        self.device = next((d for d in jax.local_devices(backend=platform) if d.id == index),
                           jax.local_devices(backend=platform)[0])

    is_manualgrad = False

    def set_seed(self, seed: Any) -> None:
        """As :meth:`Backend.set_seed`; a JAX PRNG key is taken as its seed (:func:`key_seed`)."""
        super().set_seed(key_seed(seed))

    def _key(self, key: Any) -> int:
        """A helper's ``key=``: an int, or a JAX PRNG key taken as its seed (as ``set_seed``)."""
        return super()._key(key_seed(key))

    def _ns(self) -> Any:
        import jax.numpy as jnp

        return jnp

    def array(self, data: Any, dtype: Any = None, device_mesh: Any = None) -> Any:
        """``data`` as a ``jax.Array`` on the backend's device (floats in the backend dtype
        unless ``dtype``): committed to it where the backend was given a ``device``, else
        uncommitted on JAX's default device, as ``jnp.asarray`` makes it."""
        refuse_device_mesh(device_mesh, "JaxBackend.array")
        import jax
        import jax.numpy as jnp

        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            refuse_x64_off()
        dtype = dtype if dtype is None or isinstance(dtype, str) else dtype_arg(dtype)
        a = data if isinstance(data, jax.Array) else host_array(data)
        if dtype is None and (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
            dtype = self.dtype
        if isinstance(a, jax.Array):  # stays where it is
            return a if dtype is None else a.astype(dtype)
        x = jnp.asarray(a, dtype=dtype)
        if _aliases(x, a):  # (a jax.Array must not change when the caller writes into ``a``)
            x = jnp.array(x, copy=True)
        return jax.device_put(x, self.device) if self._commit else x

    def to_numpy(self, x: Any) -> np.ndarray:
        return host_array(x)

    def stop_gradient(self, input: Any) -> Any:
        import jax

        return jax.lax.stop_gradient(input)

    def to_device(self, data: Any, device: str, asynchronous: bool = True) -> Any:
        """``data`` on the first JAX device of kind ``device`` (``"cpu"``, ``"gpu"``)."""
        import jax

        out = jax.device_put(self._native(data), jax_device(device, "JaxBackend.to_device"))
        return out if asynchronous else out.block_until_ready()

    def block_until_ready(self, data: Any = None) -> Any:
        """Wait until ``data`` (an array or a pytree of them) is computed; returns it."""
        import jax

        return None if data is None else jax.block_until_ready(data)

    def native_dtype(self, name: str | None = None) -> Any:
        import jax.numpy as jnp

        return jnp.dtype(name or self.dtype)

    def evaluator(self, program: Any, jit: bool) -> Evaluator:
        return _JaxEvaluator(program, jit, x64=self.dtype == "float64")


def _aliases(x: Any, a: np.ndarray) -> bool:
    """Whether the ``jax.Array`` ``x`` is ``a``'s own host memory: ``jnp.asarray(a, dtype)``
    on the CPU takes a 64-byte aligned buffer (a torch tensor's, a large NumPy array's)
    without a copy, so writing into ``a`` afterwards would change the immutable ``x``."""
    if a.size == 0:
        return False
    try:
        return bool(x.unsafe_buffer_pointer() == a.ctypes.data)
    except Exception:  # (an array of several devices has no one pointer: not aliased here)
        return False


def refuse_x64_off() -> None:
    """A ``DTypeError`` where ``jax_enable_x64`` is off (turned off after a float64 backend
    turned it on, or inside ``jax.enable_x64(False)``): JAX would truncate every float64
    array to float32, with a warning per call, and the float64 model would run in float32."""
    import jax

    if not jax.config.jax_enable_x64:
        from ..errors import DTypeError

        raise DTypeError("JaxBackend(dtype='float64') computes in float64, which needs "
                         "jax_enable_x64, now off (turned off after the backend turned it on, "
                         "or inside jax.enable_x64(False)): JAX would truncate the model's "
                         "arrays to float32; turn it back on (jax.config.update("
                         "'jax_enable_x64', True))")


def mesh_placement(tree: Any) -> Any:
    """The replicated sharding (``NamedSharding(mesh, P())``) of the one mesh that the
    multi-device arrays of ``tree`` span (params returned by a data-parallel step, a batch
    or params ``jax.device_put`` on a mesh), or None: none does, or several do, or one
    spans its devices without a mesh (JAX's error then stands)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = None
    for leaf in jax.tree_util.tree_leaves(tree):
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
            continue
        s = leaf.sharding
        if len(s.device_set) > 1:
            if not isinstance(s, NamedSharding) or (mesh is not None and s.mesh != mesh):
                return None
            mesh = s.mesh
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def follow_mesh(tree: Any) -> Any:
    """``tree`` with its arrays committed to one device (what ``JaxBackend.array`` makes:
    data given as NumPy, constants, a loss's cotangent, ``get_parameters()``) replicated
    on the mesh its other arrays span, as JAX places an uncommitted array beside sharded
    ones; None where there is no such mesh or nothing to move."""
    import jax

    rep = mesh_placement(tree)
    if rep is None:
        return None
    devices, moved = rep.device_set, [False]

    def put(a: Any) -> Any:
        if (isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and a.committed
                and a.sharding.device_set != devices and len(a.sharding.device_set) == 1):
            moved[0] = True
            return jax.device_put(a, rep)
        return a

    out = jax.tree_util.tree_map(put, tree)
    return out if moved[0] else None


def _placed_call(fn: Any, *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``; where JAX refuses its arguments as placed on incompatible
    devices (before anything runs), again with the single-device ones following the mesh
    of the others (:func:`follow_mesh`): evaluating params that a data-parallel step
    returned, or a batch sharded on a mesh, with host data or ``get_parameters()``."""
    try:
        return fn(*args, **kw)
    except ValueError:
        moved = follow_mesh(args)
        if moved is None:
            raise
    return fn(*moved, **kw)


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


def _small_integer(v: Any) -> bool:
    """An integer (or bool) constant of at most 64 elements, 0-d or 1-d."""
    a = np.asarray(v)
    return a.dtype.kind in "biu" and a.ndim <= 1 and a.size <= 64


class _JaxEvaluator(Evaluator):
    """Parameters travel as a tuple in program order: cheaper to flatten than a dict on
    every call, and the gradients come back in the order of ``get_parameters()``."""

    def __init__(self, prog: Any, jit: bool, x64: bool = False) -> None:
        import jax
        import jax.numpy as jnp

        self.names = names = tuple(prog.param_shapes)
        # (a float64 model: refused while x64 is off, see refuse_x64_off)
        self._x64, self._config = x64, jax.config
        #: small integer constants, held by the jitted functions as NumPy values (known when
        #: tracing) instead of traced arguments: a block may read one for its value (a
        #: Reshape's size, an Arange's end, a reduction's axis given by constant_keys)
        self._static = static_consts = {k: np.asarray(v) for k, v in prog.constants.items()
                                        if _small_integer(v)} if jit else {}

        def fwd(ptuple, inputs):
            inputs = {**inputs, **static_consts}
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
            inputs = {**inputs, **static_consts}
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

    def _traced(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs the jitted functions take as arguments (not the constants they hold)."""
        static = self._static
        return {k: v for k, v in inputs.items() if k not in static} if static else dict(inputs)

    @staticmethod
    def _rng(run: RunContext) -> Any:
        import jax.numpy as jnp

        def u32(v: Any, what: str) -> Any:
            if not hasattr(v, "dtype"):
                return np.uint32(int(v) & M32)
            if not jnp.issubdtype(v.dtype, jnp.integer) or jnp.ndim(v) != 0:
                # (a float would be truncated, a key's words taken as a shape (2,) step)
                raise TypeError(
                    f"{what} must be an int or an integer scalar (it may be traced in your "
                    f"jax.jit), got an array of {v.dtype}{list(jnp.shape(v))}: Dropout masks "
                    f"are a hash of (seed, step), a counter; a JAX PRNG key is taken as a "
                    f"seed (JaxBackend(seed=key), compiled.seed = key), not as a step")
            return jnp.asarray(v).astype(jnp.uint32)

        seed = run.seed
        if hasattr(seed, "dtype") and not _is_tracer(seed):
            seed = key_seed(seed)  # (compiled.seed = jax.random.PRNGKey(s): seed s)
        return jnp.stack([u32(seed, "compiled.seed"), u32(run.step, "evaluate(step=...)")])

    def forward(self, params, inputs, run=None):
        if self._x64 and not self._config.jax_enable_x64:
            refuse_x64_off()
        ptuple, inputs = tuple(params[k] for k in self.names), self._traced(inputs)
        if run is None:
            return _placed_call(self._fwd, ptuple, inputs)
        out, run.new_state = _placed_call(self._fwd_ctx, ptuple, inputs, self._rng(run),
                                          dict(run.state), training=run.training)
        return out

    def forward_vjp(self, params, inputs, cotangents, run=None):
        if self._x64 and not self._config.jax_enable_x64:
            refuse_x64_off()
        ptuple, inputs = tuple(params[k] for k in self.names), self._traced(inputs)
        if run is None:
            out, grads = _placed_call(self._fwd_vjp, ptuple, inputs, dict(cotangents))
        else:
            out, grads, run.new_state = _placed_call(
                self._fwd_vjp_ctx, ptuple, inputs, self._rng(run), dict(run.state),
                dict(cotangents), training=run.training)
        return out, dict(zip(self.names, grads, strict=True))
