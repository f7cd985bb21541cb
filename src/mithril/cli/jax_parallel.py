"""Data-parallel ``mithril train --backend jax``: ``--devices N`` (jax.sharding over N local
devices of this process) and ``--nprocs N`` (N processes joined by ``jax.distributed``, CPU
collectives over gloo), with ``--shard-state``.

The step is :class:`~mithril.distributed.jax_parallel.ShardedTrainStep`: one ``jax.jit``
program of the whole batch, split over the mesh by XLA, so the loss, the metric, the
gradient norm, BatchNorm's statistics and Dropout's masks are those of one device. Every
process draws the same batches and passes the global batch; each contributes the rows of
its devices. A batch whose size is not a multiple of the mesh's device count is computed
replicated (every device the whole batch: the same numbers, no speed-up).

Checkpoints: with ``--nprocs`` every process takes part in each save (the state gathered from
the mesh, ``multihost_utils.process_allgather`` for what is sharded over processes) and
process 0 writes it; ``--resume`` puts the loaded state back on the mesh.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import CLIError

#: seconds a dead or silent peer process is tolerated before the others stop
HEARTBEAT = 30.0


def refuse(args: Any, world: Any) -> None:
    """What data-parallel JAX cannot do (exit status 2, before anything starts)."""
    flag = "--devices" if world.size == 1 else "--nprocs"
    if world.launcher == "torchrun":
        raise CLIError("--backend jax under torchrun is not supported: use --nprocs N (it "
                       "starts the processes and joins them with jax.distributed), or "
                       "--backend numpy/torch under torchrun")
    if args.mixed_precision != "none":
        raise CLIError(f"--mixed-precision with {flag} on JAX is not supported: train in "
                       f"float32/float64, or on NumPy/torch (--nprocs)")
    if getattr(args, "ema", None) is not None:
        raise CLIError(f"--ema with {flag} on JAX is not supported (the average lives in the "
                       f"one-program optimizer state): leave one of them out")
    if getattr(args, "momentum_cycle", False):
        raise CLIError(f"--momentum-cycle with {flag} on JAX is not supported (the one-program "
                       f"step fixes every hyperparameter but the learning rate)")


def configure_devices(devices: int) -> None:
    """Make JAX see ``devices`` CPU devices in this process if it has not started yet
    (``jax_num_cpu_devices``; ``XLA_FLAGS=--xla_force_host_platform_device_count`` set by
    the user is left alone); then check that it does (:class:`CLIError` if not)."""
    import jax
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if not xla_bridge.backends_are_initialized() and \
            "xla_force_host_platform_device_count" not in flags and devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)
    from ..distributed.jax_parallel import DeviceCountError, device_mesh

    try:
        device_mesh(devices)
    except DeviceCountError as exc:
        raise CLIError(f"--devices {devices}: {exc}") from None


def join(world: Any) -> None:
    """This process's JAX: ``jax.distributed`` for several processes, and its devices."""
    devices = world.devices or 1
    if world.size > 1:
        from ..distributed.jax_parallel import init_jax
        from .parallel import TIMEOUT

        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = os.environ.get("MASTER_PORT")
        if not port:
            raise CLIError("--nprocs with JAX: MASTER_PORT is not set")
        try:
            init_jax(world.rank, world.size, f"{addr}:{port}", timeout=TIMEOUT,
                     heartbeat=HEARTBEAT, local_devices=devices)
        except (RuntimeError, ValueError) as exc:
            raise CLIError(f"--nprocs {world.size} with JAX: jax.distributed did not start "
                           f"({type(exc).__name__}: {str(exc)[:300]})") from None
    configure_devices(devices)


class JaxParallel:
    """The data-parallel side of a :class:`~mithril.cli.training.Run` on JAX."""

    def __init__(self, world: Any) -> None:
        self.world = world
        self.step_fn: Any = None
        self._global: dict[str, Any] | None = None  # the params on the mesh
        self._full: Any = None  # process 0: the state gathered for the save under way

    #: one process saves as one process does; several gather the state to process 0 first
    #: (every process takes part in each save: :meth:`gather`)
    can_checkpoint = True
    why_no_checkpoint = ""

    def gather(self, run: Any) -> None:
        """Every process's part of a save (``--nprocs``: the state on the mesh gathered,
        ``jax.experimental.multihost_utils.process_allgather`` for what is sharded over
        processes); process 0 keeps it for :meth:`optimizer_state`. Every process calls it at
        the same point."""
        if self.world.size > 1:
            full = self._gathered(run)
            self._full = full if self.world.rank == 0 else None

    def stop_agreement(self) -> tuple[Any, float]:
        """As :meth:`.parallel.Parallel.stop_agreement`, over ``jax.distributed``'s
        processes (one process: none)."""
        if self.world.size == 1:
            return None, 0.0
        import functools

        from .parallel import REPEAT_S
        from .stop_agreement import agree_stop, jax_all_reduce

        return functools.partial(agree_stop, all_reduce=jax_all_reduce), REPEAT_S

    def saver(self, run: Any) -> tuple[Any, int | None]:
        """As :meth:`.parallel.Parallel.saver`; with ``--nprocs`` every process's (each
        save gathers the state: a collective)."""
        import functools

        from .parallel import Parallel, _save_together

        save, every = Parallel.saver(self, run)  # type: ignore[arg-type]
        if self.world.size > 1 and self.world.out is not None \
                and self.world.flags is not None:
            from pathlib import Path

            from .train import save_progress

            save = functools.partial(_save_together, self, run, functools.partial(
                save_progress, run, Path(self.world.out), self.world.flags))
            every = self.world.every
        return save, every

    def _gathered(self, run: Any) -> Any:
        params = self._global if self._global is not None else run.params
        return self.step_fn.to_optimizer_state(run.state, params)

    def optimizer_state(self, run: Any) -> Any:
        """The state on the mesh as ``optimizer.init(params)`` holds it (gathered; with
        ``--nprocs`` by :meth:`gather`, on process 0)."""
        if self.world.size > 1:
            full, self._full = self._full, None
            return full
        return self._gathered(run)

    def load_state(self, run: Any, state: Any, extra: Any = None, flag: str = "--resume"
                   ) -> Any:
        """A loaded checkpoint's optimizer state (of ``run.params``) on the mesh."""
        self._global = None  # the next step places run.params
        try:
            return self.step_fn.from_optimizer_state(state)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--resume: the checkpoint's optimizer state does not fit the "
                           f"--devices step ({exc})") from None

    def init(self, run: Any) -> Any:
        from ..distributed.jax_parallel import make_sharded_train_step

        flag = "--devices" if self.world.size == 1 else "--nprocs"
        try:
            self.step_fn = make_sharded_train_step(run.compiled, run.optimizer, loss="loss",
                                                   devices=self.world.devices or 1,
                                                   shard_state=self.world.shard_state)
            return self.step_fn.init(run.params)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"{flag} with JAX: {exc}") from None

    @staticmethod
    def _local(tree: dict[str, Any]) -> dict[str, Any]:
        """The copy on this process's first device of replicated arrays (what evaluation and
        the outputs use: views, valid until the next step, which donates the arrays)."""
        return {k: v.addressable_data(0) for k, v in tree.items()}

    def eval_params(self, run: Any) -> dict[str, Any]:
        """A schedule-free optimizer's averaged x (replicated state: this process's copy);
        before the first step x is the initial weights."""
        if self._global is None:
            return dict(run.params)
        from ..interop import schedule_free_eval_params

        return self._local(schedule_free_eval_params(run.state, self._global))

    def step(self, run: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, bool]:
        """One update on the global batch ``(x, y)``, split over the mesh."""
        step = self.step_fn
        params = self._global if self._global is not None else run.params
        before = int(np.asarray(run.state.count))
        inputs = run.inputs(x, y)
        if run.model_state is not None:
            new, run.state, out, mstate = step(params, run.state, inputs,
                                               state=run.model_state)
            run.model_state = self._local(mstate)
        else:
            new, run.state, out = step(params, run.state, inputs)
        self._global = new
        run.params = self._local(new)
        skipped = int(np.asarray(run.state.count)) == before
        pred = np.asarray(out[run.spec.output])
        if run.metric == "acc":
            from .training import correct

            metric = float(np.mean(correct(pred, y)))
        else:
            metric = float(np.sqrt(np.mean((pred - y) ** 2))) * run.spec.target_scale
        return float(np.asarray(out["loss"])), metric, float(np.asarray(step.last_grad_norm)), \
            skipped
