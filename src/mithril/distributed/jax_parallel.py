"""Data-parallel training and sharded optimizer state on JAX, with JAX's own machinery:
``jax.sharding`` for the devices of one process and ``jax.distributed`` for several
processes. No collective of ours: the train step is one ``jax.jit`` program (that of
:func:`mithril.utils.training.make_train_step`) whose inputs and outputs carry shardings,
and XLA inserts the collectives.

::

    step = make_sharded_train_step(compiled, Adam(1e-3, clip_norm=1.0), loss="loss",
                                   devices=2, shard_state=True)
    opt_state = step.init(params)
    params, opt_state, outputs = step(params, opt_state, {"input": x, "target": y})

* **The mesh** (:func:`device_mesh`): one axis, ``"data"``, over ``devices`` devices (on
  CPU, more than one needs ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or
  ``jax.config.update("jax_num_cpu_devices", N)`` before JAX's first use; a mesh larger
  than what JAX sees is a :class:`DeviceCountError`).
* **The batch** (every input given in ``data``) is split over ``"data"`` along its first
  axis (``NamedSharding(mesh, P("data"))``) when all inputs share a first dimension that is
  a multiple of the device count; otherwise that call runs *replicated* (every device
  computes the whole batch: the same result, no speed-up; ``step.last_batch_sharded`` says
  which). The program is written for the whole batch, so the loss's mean, BatchNorm's batch
  statistics and Dropout's masks (``jax_threefry_partitionable``) are those of one device.
* **Parameters** are replicated; **optimizer state** is replicated (``shard_state=False``)
  or, ZeRO-1 in the XLA sense (``shard_state=True``), every slot of every parameter is kept
  as a flat vector padded to a multiple of N and split over ``"data"``: each device holds
  1/N of it. Inside the program it is sliced back to the parameter's shape; the per-step
  scalars, the count and the per-tensor scalars stay replicated. How the update is
  partitioned (where to reduce-scatter, all-gather) is XLA's choice.
* **Parameters the loss does not reach** (``compiled.reached_parameters(loss)``) are left
  out of the update, as on one device (:mod:`~mithril.utils.train_step_jax`'s
  ``update_reached``) and as torch.optim skips a ``.grad`` None: no weight decay, no
  momentum, their slots untouched, and each parameter counts its own steps (the state's
  ``hyperparams["missed"]``, replicated: per parameter, the applied steps it missed;
  ``to_optimizer_state`` carries them into a checkpoint, ``from_optimizer_state`` back). A
  loss that reaches every parameter runs the very program it ran before (``init`` keeps
  no count). Muon and Adafactor count them too (each tensor its own row of scalars:
  :mod:`~mithril.utils.train_step_own_counts`), weight averages and a group's
  ``step_offset`` read the optimizer's count, a Lookahead gives each row its tensor's missed
  steps beside the group's count (with ``reset_state``, the group's count for all: it
  counts no missed step), as the one-device step does.
* **Several processes** (:func:`init_jax`): ``jax.distributed`` with CPU collectives (gloo);
  the mesh then spans every process's devices, and every process passes the *same global*
  batch (each contributes the rows of its own devices).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from ..utils.train_step_jax import step_body
from ..utils.train_step_states import with_missed
from ..utils.training import TrainStep

__all__ = ["DeviceCountError", "ShardedTrainStep", "device_mesh", "init_jax",
           "make_sharded_train_step", "state_bytes_per_device"]

AXIS = "data"


class DeviceCountError(ValueError):
    """More devices were asked for than JAX sees (or a device count that is not >= 1)."""


def _cpu_hint(n: int) -> str:
    return (f"on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} (or "
            f"jax.config.update('jax_num_cpu_devices', {n})) before JAX's first use")


def device_mesh(devices: int | Sequence[Any] | None = None) -> Any:
    """A one-axis ``jax.sharding.Mesh`` (axis ``"data"``). ``devices``: ``None`` (every
    device of every process), a number N (the first N devices of each process), or a list
    of devices."""
    import jax
    from jax.sharding import Mesh

    if devices is None:
        chosen = list(jax.devices())
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n = int(devices)
        if n < 1:
            raise DeviceCountError(f"devices must be >= 1, got {n}")
        local = jax.local_device_count()
        if n > local:
            kind = jax.local_devices()[0].platform
            raise DeviceCountError(
                f"devices={n}, but JAX sees {local} {kind} device(s) in this process"
                + (f"; {_cpu_hint(n)}" if kind == "cpu" else ""))
        per: dict[int, list[Any]] = {}
        for d in jax.devices():
            per.setdefault(d.process_index, []).append(d)
        chosen = [d for p in sorted(per) for d in per[p][:n]]
    elif isinstance(devices, Sequence) and devices:
        chosen = list(devices)
    else:
        raise TypeError(f"devices must be None, a number >= 1 or a list of devices, got "
                        f"{devices!r}")
    return Mesh(np.array(chosen), (AXIS,))


def init_jax(process_id: int, num_processes: int, coordinator: str, *, timeout: float = 60.0,
             heartbeat: float | None = None, local_devices: int | None = None) -> None:
    """Join ``num_processes`` JAX processes (``jax.distributed.initialize``) with CPU
    collectives over gloo; ``coordinator``: ``"host:port"`` where process 0 listens.
    ``timeout`` (seconds) bounds the wait for the others at start-up; ``heartbeat``
    (default ``timeout``) how long a dead or silent peer is tolerated: then JAX's
    coordination service stops every other process (it aborts them: exit status 134, with
    "Terminating process because the JAX distributed service detected fatal errors"),
    rather than letting them hang. ``local_devices``: CPU devices of this process
    (``jax_num_cpu_devices``). Must run before JAX's first use of its devices."""
    import jax

    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process {process_id} of {num_processes} processes")
    heartbeat = timeout if heartbeat is None else heartbeat
    if not (timeout > 0 and heartbeat > 0):
        raise ValueError(f"timeout and heartbeat must be > 0 seconds, got {timeout!r}, "
                         f"{heartbeat!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    if num_processes == 1:
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=max(1, int(math.ceil(timeout))),
                               heartbeat_timeout_seconds=max(2, int(math.ceil(heartbeat))),
                               shutdown_timeout_seconds=max(1, int(math.ceil(timeout))))


def _put(x: Any, sharding: Any) -> Any:
    """``x`` (host or device array) with ``sharding``; across processes every process must
    pass the same global value."""
    import jax

    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def state_bytes_per_device(opt_state: Any) -> dict[str, int]:
    """Bytes of the optimizer state held on each of this process's devices
    (``str(device)`` -> bytes), from the arrays' addressable shards."""
    import jax

    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(opt_state):
        for shard in getattr(leaf, "addressable_shards", ()):
            key = str(shard.device)
            out[key] = out.get(key, 0) + int(shard.data.nbytes)
    return out


def is_outer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a Mechanize, ScheduleFree or DP-SGD (optax_outer's)."""
    from ..interop.optax_outer import is_outer as outer

    return outer(optimizer)


def _second_gradients(optimizer: Any) -> bool:
    """Whether ``optimizer`` is or wraps a SAM or a DP-SGD (gradients of its own)."""
    from ..interop.optax_outer import wrappers
    from ..utils.optimizers import SAM, DifferentiallyPrivate

    return any(isinstance(w, (SAM, DifferentiallyPrivate)) for w in wrappers(optimizer))


class ShardedTrainStep(TrainStep):
    """What :func:`make_sharded_train_step` returns (see the module docs): the fused JAX
    train step of :class:`~mithril.utils.training.TrainStep` on a device mesh."""

    def __init__(self, compiled: Any, optimizer: Any, loss: str = "final_cost",
                 devices: int | Sequence[Any] | None = None, shard_state: bool = False) -> None:
        if getattr(getattr(compiled, "backend", None), "name", None) != "jax":
            raise TypeError("make_sharded_train_step needs a model compiled for the JAX "
                            "backend (NumPy and torch: mithril.distributed.DataParallel)")
        if not isinstance(shard_state, bool):
            raise TypeError(f"shard_state must be True or False, got {shard_state!r}")
        super().__init__(compiled, optimizer, loss)
        del self.__dict__["_made"]  # (this constructor still sets its own fixed parts)
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        self.mesh = device_mesh(devices)
        self.num_devices = int(self.mesh.size)
        self.shard_state = shard_state
        self._rep = NamedSharding(self.mesh, P())
        self._rows = NamedSharding(self.mesh, P(AXIS))
        self._shapes = {n: tuple(int(d) for d in s)
                        for n, s in compiled.program.param_shapes.items()}
        #: whether the last call split its batch over the devices (else: replicated)
        self.last_batch_sharded: bool | None = None
        self._data_keys: tuple[str, ...] = ()
        self._tx = None
        self._slots_of: Any = None  # the transformation _slot_cache was made for
        self._slot_cache: dict[str, dict[str, tuple[int, ...]]] = {}
        if not self._fused and (_second_gradients(optimizer) or is_outer(optimizer)):
            raise TypeError(  # (the plain step: the separate calls)
                f"make_sharded_train_step: {type(optimizer).__name__}'s step cannot be one "
                f"program here (a SAM on a model with Dropout / BatchNorm, a wrapper "
                f"around a loss-aware base it hands no loss, a DP-SGD under another "
                f"wrapper): use make_train_step "
                f"with optimizer.init's state, or mithril.distributed.DataParallel")
        self._transformation()  # refuses what cannot be one program (LBFGS, 'raise') now
        self._made = True

    _FIXED = (*TrainStep._FIXED, "mesh", "num_devices", "shard_state")
    _MAKER = "make_sharded_train_step(compiled, optimizer, loss=..., devices=..., shard_state=...)"

    # -- the state layout ----------------------------------------------------------------
    def _slot_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Every slot's shape per parameter, from the transformation's abstract ``init``.
        (Why: a slot need not have its parameter's shape - Adafactor's factored row and
        column slots, Muon's empty slots of the parameters the other rule updates - so each
        is padded and sliced back by its own size, not the parameter's.)"""
        tx = self._transformation()
        if self._slots_of is not tx:
            import jax

            dt = self.compiled.backend.native_dtype()
            st = jax.eval_shape(tx.init, {n: jax.ShapeDtypeStruct(s, dt)
                                          for n, s in self._shapes.items()})
            self._slot_cache = {s: {n: tuple(int(d) for d in v.shape) for n, v in per.items()}
                                for s, per in st.slots.items()}
            self._slots_of = tx
        return self._slot_cache

    def _pack(self, st: Any) -> Any:
        """Slots as flat vectors padded to a multiple of the device count (sharded mode)."""
        if not self.shard_state:
            return st
        import jax.numpy as jnp

        n = self.num_devices
        slots = {s: {k: jnp.pad(jnp.ravel(v), (0, -(-v.size // n) * n - v.size))
                     for k, v in per.items()} for s, per in st.slots.items()}
        return st._replace(slots=slots)

    def _unpack(self, st: Any) -> Any:
        if not self.shard_state:
            return st
        shapes = self._slot_shapes()
        # (a slot or parameter this optimizer does not have is left as it is: the
        # transformation's update refuses it, naming them)
        slots = {s: {n: v[:math.prod(shapes[s][n])].reshape(shapes[s][n])
                     if n in shapes.get(s, {}) else v for n, v in per.items()}
                 for s, per in st.slots.items()}
        return st._replace(slots=slots)

    def _check_layout(self, st: Any) -> None:
        """With ``shard_state``: every slot of ``st`` is the flat vector, padded to a
        multiple of the device count, that this step keeps (why: a replicated state, or one
        of a step on another number of devices, failed inside JAX with an
        ``IndivisibleError`` naming neither the slot nor the parameter, or ran when the
        sizes happened to divide)."""
        if not self.shard_state:
            return  # (the transformation checks the slots' shapes itself)
        shapes, n = self._slot_shapes(), self.num_devices
        for s, per in st.slots.items():
            for k, v in per.items():
                want = shapes.get(s, {}).get(k)
                if want is None:
                    continue  # (another optimizer's or model's: the update names it)
                flat = (-(-math.prod(want) // n) * n,)
                if tuple(getattr(v, "shape", ())) != flat:
                    raise ShapeError(
                        f"opt_state's slot '{s}' for '{k}' has shape {tuple(v.shape)}; with "
                        f"shard_state on {n} device(s) this step keeps it as {flat} (a flat "
                        f"vector padded to a multiple of {n}): pass a state of this step's "
                        f"init or from_optimizer_state (another step's: "
                        f"step.from_optimizer_state(other.to_optimizer_state(state, params)))")

    def state_shardings(self, st: Any) -> Any:
        """The sharding of every array of the state ``st`` (a pytree like it)."""
        import jax

        rep = self._rep
        slot = self._rows if self.shard_state else rep
        return st._replace(count=rep, slots={s: {n: slot for n in per}
                                             for s, per in st.slots.items()},
                           tensor_slots=jax.tree.map(lambda _: rep, st.tensor_slots),
                           values=jax.tree.map(lambda _: rep, st.values),
                           hyperparams=jax.tree.map(lambda _: rep, st.hyperparams))

    def _place_state(self, st: Any) -> Any:
        import jax

        return jax.tree.map(_put, st, self.state_shardings(st))

    def init(self, params: Mapping[str, Any]) -> Any:
        """The optimizer state on the mesh (an ``OptaxState``; with ``shard_state`` its
        slots are flat, padded and split over the devices)."""
        import jax.numpy as jnp

        host = {n: jnp.asarray(np.asarray(v)) for n, v in params.items()}
        # (_counted: with nonfinite="skip" the state counts the skipped steps, as
        # TrainStep.init's does; without it to_optimizer_state's num_skipped stayed 0;
        # with_missed: each parameter's missed steps, where the loss leaves some out)
        return self._place_state(self._pack(with_missed(
            self, self._counted(self._transformation().init(host), 0), None)))

    def gather_state(self, opt_state: Any) -> Any:
        """``opt_state`` as the plain ``OptaxState`` of :class:`TrainStep` (slots in the
        parameters' shapes), as host arrays (gathered from every process)."""
        import jax

        def fetch(x: Any) -> np.ndarray:
            if jax.process_count() > 1 and not x.is_fully_addressable \
                    and not x.is_fully_replicated:
                from jax.experimental import multihost_utils

                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return np.asarray(x)

        return self._unpack(jax.tree.map(fetch, opt_state))

    def to_optimizer_state(self, opt_state: Any, params: Mapping[str, Any]) -> Any:
        """The state as ``optimizer.init(params)`` would hold it (e.g. to checkpoint)."""
        import jax.numpy as jnp

        # (JAX arrays, as TrainStep.to_optimizer_state is given: optimizer.init of host
        # arrays made a NumPy state, which update refused with the model's JAX params)
        host = {n: jnp.asarray(np.asarray(v)) for n, v in params.items()}
        return super().to_optimizer_state(self.gather_state(opt_state), host)

    def from_optimizer_state(self, state: Any) -> Any:
        """An :class:`~mithril.utils.optimizers.state.OptimizerState` (e.g. a loaded
        checkpoint) as this step's state on the mesh."""
        return self._place_state(self._pack(super().from_optimizer_state(state)))

    # -- the program -----------------------------------------------------------------------
    def _build(self) -> Any:
        import jax

        from ..utils.optimizers.engines.jax_engine import scaled_norm

        c, tx, loss = self.compiled, self._transformation(), self.loss
        ev = c._eval
        with_ctx = c.program.has_context
        rep = self._rep
        pack, unpack, shardings = self._pack, self._unpack, self.state_shardings
        unreached = self._unreached
        sam, private = self._program_gradients()  # (SAM's, DP-SGD's: as the plain step's)

        def program(ptuple: tuple, opt_state: Any, inputs: dict, rng: Any, mstate: dict,
                    lr: Any, hyper: Any, training: bool) -> tuple:
            new, new_state, out, new_mstate, grads = step_body(
                ev, tx, loss, with_ctx, ptuple, unpack(opt_state), inputs, rng, mstate, training,
                lr, hyper, unreached, sam, private)
            new_state = pack(new_state)
            con = jax.lax.with_sharding_constraint
            new = con(new, jax.tree.map(lambda _: rep, new))
            new_state = con(new_state, shardings(new_state))
            out = con(out, jax.tree.map(lambda _: rep, out))
            new_mstate = con(new_mstate, jax.tree.map(lambda _: rep, new_mstate))
            return new, new_state, out, new_mstate, scaled_norm(list(grads))

        jitted = jax.jit(program, donate_argnums=(0, 1), static_argnames=("training",))

        def call(ptuple: tuple, opt_state: Any, ins: dict, rng: Any, mstate: dict,
                 lr: Any, hyper: Any, training: bool) -> tuple:
            ptuple = tuple(_put(p, rep) for p in ptuple)
            opt_state = jax.tree.map(_put, opt_state, shardings(opt_state))
            ins = self._place_inputs(ins)
            rng = None if rng is None else _put(rng, rep)
            mstate = {k: _put(v, rep) for k, v in mstate.items()}
            hyper = None if hyper is None else _put(hyper, rep)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                return jitted(ptuple, opt_state, ins, rng, mstate, lr, hyper, training=training)

        call._cache_size = jitted._cache_size  # type: ignore[attr-defined] - its compiles
        return call

    def _place_inputs(self, ins: dict[str, Any]) -> dict[str, Any]:
        """The batch split over the devices (when its size allows), the rest replicated."""
        batch = [k for k in ins if k in self._data_keys]
        firsts = {int(ins[k].shape[0]) if getattr(ins[k], "ndim", 0) else -1 for k in batch}
        split = bool(batch) and len(firsts) == 1 and min(firsts) > 0 and \
            min(firsts) % self.num_devices == 0
        self.last_batch_sharded = split
        return {k: _put(v, self._rows if split and k in self._data_keys else self._rep)
                for k, v in ins.items()}

    def __call__(self, params: Mapping[str, Any], opt_state: Any, data: Mapping[str, Any], *,
                 state: Mapping[str, Any] | None = None) -> tuple:
        """``(params, opt_state, outputs)`` (``state=``: also the model's state), as
        :class:`~mithril.utils.training.TrainStep`, on the mesh. ``opt_state`` must be
        this step's (:meth:`init` / :meth:`from_optimizer_state`)."""
        from ..interop.optax_transform import OptaxState

        if not isinstance(opt_state, OptaxState):
            raise TypeError(f"opt_state must come from this step's init (an OptaxState on "
                            f"the mesh), got {type(opt_state).__name__}")
        if opt_state is not self._returned_state:
            self._check_layout(opt_state)
        if isinstance(data, Mapping):
            self._data_keys = tuple(data)
        return self._fused_step(params, opt_state, data, state)

    @property
    def fused(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (f"ShardedTrainStep({type(self.optimizer).__name__}, {self.num_devices} "
                f"device(s), state {'sharded' if self.shard_state else 'replicated'})")


def make_sharded_train_step(compiled_model: Any, optimizer: Any, loss: str = "final_cost", *,
                            devices: int | Sequence[Any] | None = None,
                            shard_state: bool = False) -> ShardedTrainStep:
    """:func:`~mithril.utils.training.make_train_step` for JAX, data-parallel over the
    devices of ``devices`` (:func:`device_mesh`), the optimizer state replicated or
    (``shard_state``) split over them. See :mod:`mithril.distributed.jax_parallel`."""
    return ShardedTrainStep(compiled_model, optimizer, loss, devices, shard_state)
