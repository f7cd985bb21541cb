"""Data-parallel ``mithril train``: ``--nprocs N [--shard-state]``, or under ``torchrun``.

``mithril train --nprocs N`` checks every setting, then starts N copies of the same command
line on this machine (``python -m mithril train ...``) that join one process group on loopback
(gloo, a free port). Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) each process joins the group itself.

Every rank builds the same model from the same seed, draws the same batches, and takes its
slice of each global batch (rank r: rows ``[r·B/N, (r+1)·B/N)``). The loss is a mean over the
rows, so rank r scales its loss's cotangent by ``N·n_r/B``: the average that
:class:`~mithril.distributed.DataParallel` takes is then exactly the gradient of the mean over
the whole batch, even when B is not a multiple of N (a rank with no rows sends zeros). The
batch loss and accuracy of metrics.csv are summed over the ranks (one small all-reduce), so
the files equal those of one process to rounding. Rank 0 alone prints, shows the progress bar
and writes the outputs.

Preemption: a SIGTERM (or Ctrl-C) to the launcher or to any rank stops every rank after
the same step (:mod:`.stop_agreement`: one all-reduce of the ranks' requests after each
step); rank 0 then saves the checkpoint (``checkpoint.safetensors``, as one process does:
the whole optimizer state, atomically) and prints the resume command, and the launcher
exits ``128 + signal``. ``--checkpoint-every N`` has rank 0 save every N steps. With
``--shard-state`` or mixed precision every rank takes part in each save
(:mod:`.parallel_checkpoint`: the shards gathered to rank 0; the replicated masters and loss
scale checked alike), and the file is the same at every world size.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .argtypes import bounded_int
from .errors import CLIError

#: set in the environment of the processes ``--nprocs`` starts
CHILD_ENV = "MITHRIL_NPROCS_CHILD"
#: seconds a collective waits for a peer (a dead peer is noticed at once; this bounds a hang)
TIMEOUT = 300.0
MAX_NPROCS = 64
#: a rank that receives the signal it is stopping for again within this many seconds takes it
#: for the same one (the process group's copy and the launcher's forwarded one), not an abort
REPEAT_S = 2.0
#: seconds the launcher waits for the other ranks once one has failed (they notice it)
GRACE_S = 10.0


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data parallel (several processes; see docs/distributed.md)")
    g.add_argument("--nprocs", type=bounded_int(1, MAX_NPROCS), metavar="N",
                   help="train in N processes on this machine (torch.distributed, gloo on "
                        "loopback), each on 1/N of every batch, the gradients averaged: the "
                        "same result as one process. Not under torchrun, which starts them")
    g.add_argument("--devices", type=bounded_int(1, MAX_NPROCS), metavar="N",
                   help="--backend jax: split every batch over N local devices of each process "
                        "(jax.sharding; on CPU JAX is given N devices). The same result as "
                        "one device")
    g.add_argument("--shard-state", action=argparse.BooleanOptionalAction, default=False,
                   help="with --nprocs or --devices (or torchrun): each process (device) keeps "
                        "the optimizer state of 1/N of the parameters (ZeRO) instead of all "
                        "of it (--no-shard-state: a --resume of a sharded run keeps all of it)")


@dataclass
class World:
    """The processes a run trains in."""

    size: int
    rank: int
    shard_state: bool
    #: "mithril" (--nprocs) or "torchrun" (any launcher that sets WORLD_SIZE)
    launcher: str
    #: whether this process is one of the ranks (False: the --nprocs parent, which starts them)
    member: bool
    #: JAX: devices per process (--devices; None: JAX's data parallelism is not in use)
    devices: int | None = None
    #: "jax" (jax.sharding / jax.distributed) or "torch" (torch.distributed)
    engine: str = "torch"
    #: the run folder (rank 0 writes there; the launcher passes it to the ranks)
    out: str | None = None
    #: the command's flags as a checkpoint keeps them (:func:`.resume.snapshot`)
    flags: dict[str, Any] | None = None
    #: ``--checkpoint-every N`` (rank 0 saves every N steps), or None
    every: int | None = None
    #: ``--resume``: the checkpoint (:func:`.resume.resumed_args`), or None
    resumed: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        out = {"nprocs": self.size, "shard_state": self.shard_state,
               "launcher": self.launcher}
        if self.engine == "jax":
            out["devices"] = self.devices or 1
        return out


def one_process_mesh(world: Any) -> bool:
    """Whether ``world`` is one JAX process over its local devices (``--devices N``): its
    sharded step computes DP-SGD's per-example gradients on the mesh, one batch as one
    process's."""
    return getattr(world, "engine", None) == "jax" and world.size == 1


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "0")
    try:
        return int(raw)
    except ValueError:
        raise CLIError(f"environment variable {name}={raw!r} is not an integer") from None


def world_of(args: argparse.Namespace) -> World | None:
    """The world the flags and the environment ask for (None: one process, as always);
    refuses the combinations that cannot work (exit status 2)."""
    nprocs, shard = getattr(args, "nprocs", None), getattr(args, "shard_state", False)
    devices = getattr(args, "devices", None)
    jax = args.backend == "jax"
    if devices is not None and not jax:
        raise CLIError(f"--devices {devices} splits batches over JAX devices: it needs "
                       f"--backend jax (NumPy and torch: --nprocs N)")
    launched = "WORLD_SIZE" in os.environ
    if os.environ.get(CHILD_ENV) == "1" and launched:  # started by --nprocs
        world = World(_env_int("WORLD_SIZE"), _env_int("RANK"), shard, "mithril", True)
    elif launched:
        if nprocs is not None:
            raise CLIError(f"--nprocs {nprocs} starts its own processes; under torchrun "
                           f"(WORLD_SIZE={os.environ['WORLD_SIZE']} is set) leave it out")
        world = World(_env_int("WORLD_SIZE"), _env_int("RANK"), shard, "torchrun", True)
    elif nprocs is None and devices is None:
        if shard:
            raise CLIError("--shard-state needs --nprocs N (or --devices N with --backend "
                           "jax, or a launcher such as torchrun)")
        return None
    elif nprocs is None:  # --devices: one process
        world = World(1, 0, shard, "mithril", True)
    else:
        world = World(nprocs, 0, shard, "mithril", nprocs == 1)
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise CLIError(f"rank {world.rank} in a world of {world.size} processes")
    _settle_out(args, world)
    if jax:
        from .jax_parallel import refuse

        world.devices, world.engine = devices, "jax"
        world.member = world.member or world.size == 1
        refuse(args, world)
        return world
    return world


def _settle_out(args: argparse.Namespace, world: World) -> None:
    """Fix the run folder now (``args.out``): without ``--out`` or ``--name`` it is
    ``runs/train-<time>``, which the launcher and its rank 0 computed apart (the launcher's
    folder then existed: rank 0 wrote into ``...-2``); the launcher passes it on."""
    if args.out is None:
        from .report import default_out_dir

        args.out = str(default_out_dir("train", args.name))
    world.out = args.out
    world.flags = getattr(args, "snapshot", None)
    world.every = getattr(args, "checkpoint_every", None)
    world.resumed = getattr(args, "resumed_checkpoint", None)


def check(world: World, run: Any) -> None:
    """What a data-parallel run cannot do with this model or these flags; on the check copy
    of the run (the ``--nprocs`` launcher's, ``--dry-run``'s: no :class:`Parallel`), whether
    ``--resume`` can continue it (before any rank starts: one error, not one per rank)."""
    if world.resumed is not None and run is not None and getattr(run, "parallel", 1) is None:
        from .resume import restore

        # (this Run is the launcher's check copy; the header it prints names the resume)
        run.resumed_line = restore(run, world.resumed)
    if world.engine == "jax":  # one program of the whole batch: model state is kept
        if world.size == 1:
            from .jax_parallel import configure_devices

            configure_devices(world.devices or 1)
        return
    if run.model_state is not None:
        raise CLIError("data-parallel training does not keep model state (BatchNorm's running "
                       "statistics would differ between the processes): train this model "
                       "without it (e.g. --no-batchnorm) or in one process")
    if run.cfg.mixed_precision != "none":
        rows = getattr(run.batches, "rows", None)
        size = getattr(run.batches, "batch_size", None)
        if rows is None or size is None:
            raise CLIError("--mixed-precision with data-parallel training needs batches of a "
                           "known size (this job's are not): train in one process")
        smallest = min(size, rows % size or size)
        if smallest < world.size:
            raise CLIError(f"--mixed-precision with --nprocs {world.size}: a batch of "
                           f"{smallest} row(s) leaves a process without rows; use a batch "
                           f"size (and a last batch) of at least {world.size} rows")
    if world.shard_state and run.cfg.ema is not None:
        raise CLIError("--ema with --shard-state: each process keeps the average of its own "
                       "share of the weights only; leave one of them out")
    if world.shard_state and hasattr(getattr(run, "optimizer", None), "eval_params"):
        # (it ran, evaluating and saving the gradient point y where one process measures
        # and saves the averaged x: other final metrics, another model.safetensors)
        raise CLIError(f"--optimizer {run.cfg.optimizer} with --shard-state: the run is "
                       f"evaluated and saved at the schedule-free averaged weights x, which "
                       f"need every process's share of its state z; leave --shard-state out")


def describe(world: World, batch_size: int) -> str:
    mode = "optimizer state sharded (ZeRO)" if world.shard_state else \
        "optimizer state replicated"
    if world.engine == "jax":
        d = world.devices or 1
        where = f"{d} device(s) (jax.sharding)" if world.size == 1 else \
            f"{world.size} processes x {d} device(s) (jax.distributed, gloo)"
        return (f"  data parallel: {where}, each on 1/{world.size * d} of every batch of "
                f"{batch_size} (a batch of another size than a multiple of {world.size * d}: "
                f"computed whole on every device); {mode}")
    if world.size == 1:
        return f"  data parallel: 1 process (DataParallel); {mode}"
    how = "torchrun" if world.launcher == "torchrun" else "gloo on loopback"
    return (f"  data parallel: {world.size} processes ({how}), each on 1/{world.size} of "
            f"every batch of {batch_size}; {mode}")


# -- in each rank ----------------------------------------------------------------------------

def join(world: World) -> None:
    """Join the process group (torch.distributed, gloo; JAX: jax.distributed and the
    devices); a no-op for one process."""
    if world.engine == "jax":
        from .jax_parallel import join as join_jax

        join_jax(world)
        return
    if world.size > 1:
        from .. import distributed as dist

        dist.init(world.rank, world.size, timeout=TIMEOUT)


def leave() -> None:
    from .. import distributed as dist

    dist.shutdown()


class Parallel:
    """The data-parallel side of a :class:`~mithril.cli.training.Run`: the optimizer wrapped
    in :class:`~mithril.distributed.DataParallel`, and the step on this rank's rows. On JAX
    (``world.engine == "jax"``) it is a :class:`~mithril.cli.jax_parallel.JaxParallel`."""

    def __new__(cls, world: World) -> Any:
        if world.engine == "jax":
            from .jax_parallel import JaxParallel

            return JaxParallel(world)
        return super().__new__(cls)

    def __init__(self, world: World) -> None:
        self.world = world
        self.dp: Any = None
        self._trainer: Any = None  # mixed precision's (its masters, scaler)
        self._agreement: Any = None  # the loop's StepAgreement (several processes)
        self._full: Any = None  # rank 0: the state gathered for the save under way

    #: rank 0 saves the whole state (gathered from the shards with ``--shard-state``)
    can_checkpoint = True
    why_no_checkpoint = ""

    def gather(self, run: Any) -> None:
        """Every rank's part of a save (a collective with ``--shard-state`` or mixed
        precision, else nothing): rank 0 then holds the whole optimizer state for
        :meth:`optimizer_state`. Every rank calls it at the same point."""
        from .parallel_checkpoint import collective, gather

        if collective(self):
            self._full = gather(self, run)

    def stop_agreement(self) -> tuple[Any, float]:
        """The collective the loop's :class:`~.runtime.HeldInterrupt` settles each stop
        with, and the seconds a repeated signal is the same one (one process: none)."""
        if self.world.size == 1:
            return None, 0.0
        from .stop_agreement import StepAgreement, torch_all_reduce

        self._agreement = StepAgreement(torch_all_reduce)  # (the vote rides on step's sums)
        return self._agreement, REPEAT_S

    def saver(self, run: Any) -> tuple[Any, int | None]:
        """``(saver, every)`` for :attr:`.training.Run.saver` (the checkpoint of the run
        under way, as one process saves it): rank 0's; with ``--shard-state`` or mixed
        precision every rank's (each save a collective); ``(None, None)`` on the others."""
        if self.world.out is None or self.world.flags is None or not self.can_checkpoint:
            return None, None
        from .parallel_checkpoint import collective
        from .train import save_progress

        save = functools.partial(save_progress, run, Path(self.world.out), self.world.flags)
        if isinstance(self, Parallel) and collective(self):  # (JaxParallel borrows this)
            return functools.partial(_save_together, self, run, save), self.world.every
        if self.world.rank != 0:
            return None, None
        return save, self.world.every

    def optimizer_state(self, run: Any) -> Any:
        """The optimizer's state as one process holds it (what a checkpoint saves): after
        :meth:`gather` on rank 0; None where it was not gathered."""
        if self._full is not None:
            full, self._full = self._full, None
            return full
        if self.world.shard_state and self.world.size > 1:
            return None
        from ..distributed.full_state import gather_state
        from .parallel_checkpoint import masters

        return gather_state(self.dp, run.state, masters(run))  # (no collective here)

    def load_state(self, run: Any, state: Any, extra: dict[str, Any] | None = None,
                   flag: str = "--resume") -> Any:
        """``state`` (a loaded checkpoint's whole state, of ``run.params``) as this rank's
        state at this world size (its share with ``--shard-state``; mixed precision: a new
        trainer, the saved loss scale): every rank loads the same file and calls this at the
        same point (collectives)."""
        from .parallel_checkpoint import load

        return load(self, run, state, extra or {}, flag)

    def init(self, run: Any) -> Any:
        """The wrapped optimizer's state (after :func:`check`)."""
        from ..distributed import DataParallel

        check(self.world, run)
        if self.world.rank:  # other Dropout masks than rank 0's (the params are rank 0's)
            run.compiled.seed = int(run.compiled.seed) + 7919 * self.world.rank
        try:  # (DataParallel refuses what it cannot shard: a CLI error, not a traceback)
            self.dp = DataParallel(run.optimizer, shard_state=self.world.shard_state)
            if run.cfg.mixed_precision != "none":  # float32 masters, the overflow agreed on
                from ..utils.mixed_precision import MixedPrecisionTrainer

                run.trainer = self._trainer = MixedPrecisionTrainer(
                    run.compiled, self.dp, run.params, loss_scale=run.cfg.loss_scale,
                    dynamic_loss_scaling=True)
                return run.trainer.optimizer_state
            return self.dp.init(run.params)
        except (ValueError, NotImplementedError) as exc:
            raise CLIError(f"{'--shard-state' if self.world.shard_state else '--nprocs'}: "
                           f"{exc}") from None

    def step(self, run: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, bool]:
        """One update on this rank's rows of the global batch ``(x, y)``; the loss and the
        metric of the whole batch (summed over the ranks)."""
        from ..distributed import process_group as pg

        be, size, me = run.backend, self.world.size, self.world.rank
        n = len(y)
        lo, hi = n * me // size, n * (me + 1) // size
        sums = np.zeros(4)  # loss·rows, metric sum (right answers or squared errors), rows, y.size
        grads: dict[str, Any] = {}
        if run.trainer is not None:  # mixed precision (check: every rank has rows)
            xs, ys = x[lo:hi], y[lo:hi]
            out = run.trainer.forward(run.inputs(xs, ys))
            run.params, run.state, _ = run.trainer.backward_and_update(
                {"loss": size * (hi - lo) / n})
        elif hi > lo:
            xs, ys = x[lo:hi], y[lo:hi]
            out, grads = run.compiled.evaluate(run.params, run.inputs(xs, ys),
                                               output_gradients={"loss": size * (hi - lo) / n})
        if hi > lo:
            pred = be.to_numpy(out[run.spec.output])
            if run.metric == "acc":
                from .training import correct

                right = float(np.sum(correct(pred, ys)))
            else:
                right = float(np.sum((pred - ys) ** 2))
            sums[:] = (float(be.to_numpy(out["loss"])) * (hi - lo), right, hi - lo, ys.size)
        if run.trainer is None:  # (a loss-aware optimizer: this rank's loss, scaled as its
            # gradients, so that the ranks' mean is the batch's loss)
            kw = {"loss": float(be.to_numpy(out["loss"])) * size * (hi - lo) / n
                  if hi > lo else 0.0} if self.dp.needs_loss else {}
            run.params, run.state = self.dp.update(run.params, grads, run.state, **kw)
        agreement = self._agreement
        if agreement is not None:  # this rank's stop vote, summed with the rest
            sums = np.concatenate([sums, agreement.ballot()])
        pg.all_reduce(sums)
        if agreement is not None:
            agreement.counted(sums[4:])
        loss = float(sums[0] / sums[2])
        metric = float(sums[1] / sums[3]) if run.metric == "acc" else \
            float(np.sqrt(sums[1] / sums[3])) * run.spec.target_scale
        skipped = bool(run.state.last_step_skipped)
        norm = run.state.last_grad_norm
        if norm is None or (skipped and run.trainer is not None):  # overflow: not averaged
            norm = float("nan")
        return loss, metric, float(norm), skipped


def _save_together(par: Any, run: Any, save: Any, steps: list[dict[str, Any]],
                   epochs: list[dict[str, Any]]) -> None:
    """A save every rank takes part in (:meth:`Parallel.gather`); rank 0 writes."""
    par.gather(run)
    if par.world.rank == 0:
        save(steps, epochs)


# -- the --nprocs parent -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: World, argv: list[str]) -> int:
    """Run ``mithril argv`` in ``world.size`` processes (in the run folder ``world.out``);
    their exit status: a failure's (the first seen; rank 0's first among those seen
    together), else a stop's (``128 + signal``), else 0. A rank that fails stops the others
    after :data:`GRACE_S` (in which they notice it themselves). A SIGTERM or SIGINT to the
    launcher is forwarded to every rank (they stop after the same step, rank 0 saves the
    checkpoint and prints the resume command); a rank that gets the same signal from the
    terminal or the process group too takes the two for one (:data:`REPEAT_S`)."""
    env = {**os.environ, CHILD_ENV: "1", "WORLD_SIZE": str(world.size),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "LOCAL_WORLD_SIZE": str(world.size)}
    out = [] if world.out is None else ["--out", world.out]  # (one folder: the launcher's)
    cmd = [sys.executable, "-m", "mithril", *argv, *out]
    procs: list[subprocess.Popen] = []

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    default = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    before = {s: signal.signal(s, forward) for s, h in default.items()
              if signal.getsignal(s) is h}  # (a handler the caller set is left alone)
    try:
        procs += [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                  for r in range(world.size)]
        codes = _wait(procs)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    return exit_code(codes)


def stopped(code: int | None) -> bool:
    """Whether ``code`` is a rank's exit status after a held signal (``128 + signal``)."""
    return code is not None and code - 128 in (signal.SIGINT, signal.SIGTERM)


def exit_code(codes: list[int]) -> int:
    """The launcher's status from its ranks' (in the order they were seen to end): the first
    failure, else the first stop (``128 + signal``), else 0. A rank killed by a signal s
    (status -s) counts as ``128 + s``, as a shell reports it: a stop for SIGTERM or SIGINT
    (one that landed before or after its loop), a failure for any other (SIGKILL: 137)."""
    codes = [128 - c if c < 0 else c for c in codes]
    failed = [c for c in codes if c and not stopped(c)]
    rc = failed[0] if failed else next((c for c in codes if c), 0)
    return int(rc)


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    """The ranks' exit statuses, in the order they were seen to end. After a failure the
    others get :data:`GRACE_S` seconds; after a stop (``128 + signal``), :data:`TIMEOUT`
    (rank 0 is saving and writing the results)."""
    seen: list[int] = []
    done: set[int] = set()
    deadline: float | None = None
    while len(done) < len(procs):
        try:
            ended = [(i, p.poll()) for i, p in enumerate(procs)]
            new = [c for i, c in ended if c is not None and i not in done]
            done |= {i for i, c in ended if c is not None}
            # rank 0 first among those seen together
            seen += new
            if any(c and not stopped(c) for c in new):
                limit = time.monotonic() + GRACE_S
                deadline = limit if deadline is None else min(deadline, limit)
            elif any(stopped(c) for c in new) and deadline is None:
                deadline = time.monotonic() + TIMEOUT
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        except KeyboardInterrupt:  # (a caller's SIGINT handler: the ranks got it too)
            continue
    return seen
