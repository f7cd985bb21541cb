"""What surrounds the training loop of :mod:`.training`: the thread limit, the stand-in for a
progress bar, where the loop stands (:class:`Position`, what ``--resume`` continues from) and
Ctrl-C held back to the end of the step it lands in."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@contextlib.contextmanager
def thread_limit(threads: int, backend: str) -> Iterator[None]:
    """At most ``threads`` BLAS/OpenMP threads, optimizer threads (``set_num_threads``) and
    torch intra-op threads inside."""
    from threadpoolctl import threadpool_limits

    from ..utils.optimizers.engines import threads as opt_threads

    before_opt = opt_threads._threads
    opt_threads.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            if backend != "torch":
                yield
                return
            import torch

            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                yield
            finally:
                torch.set_num_threads(before)
    finally:
        opt_threads._threads = before_opt


class NoBar:
    """What the loop needs of a tqdm bar, without tqdm (``--no-progress``)."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Position:
    """Where a training loop stands between two steps: what a checkpoint saves and
    ``--resume`` continues from."""

    #: the epoch under way (1-based; one past the last when the run is complete)
    epoch: int
    #: its batches done
    batch: int
    #: the data-order generator's ``bit_generator.state`` at the start of that epoch (its
    #: batches are drawn again, and those done skipped)
    rng_state: dict[str, Any]
    #: the epoch's sums so far: loss × rows, metric × rows, rows
    sums: tuple[float, float, int]


class Aborted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM while a step ran: stop at once, writing nothing (the last
    checkpoint written stands). ``signum``: the signal; the exit status is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: the signals held back to the end of a step: Ctrl-C, and the SIGTERM a preemptible
#: machine, a scheduler (SLURM, Kubernetes) or torchrun's elastic agent sends before it kills
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class HeldInterrupt:
    """Ctrl-C (SIGINT) and SIGTERM held back while a step runs: the first one sets
    :attr:`requested` (and :attr:`signum`) and the loop stops after the step (its parameters,
    optimizer state and logs agree, so a checkpoint can be written); a second one raises
    :class:`Aborted` at once. Only in the main thread (signal handlers can be set there only),
    and only for a signal whose handler is the default one (a handler the caller installed is
    left alone); elsewhere Ctrl-C interrupts as usual.

    In a data-parallel run every process calls :meth:`settle` at the same points (after each
    step, after each epoch): ``agree`` (a collective over the ranks, see
    :mod:`.stop_agreement`) turns the ranks' requests into one decision, so that all stop
    after the same step even when the signal reached only some of them, or reached them
    during different steps. ``repeat_s``: a second delivery of the same signal within this
    many seconds of the first is the same request (a scheduler signals the whole process
    group and the ``--nprocs`` launcher forwards it too), not an abort."""

    def __init__(self, enabled: bool = True,
                 agree: Callable[[int | None], int | None] | None = None,
                 repeat_s: float = 0.0) -> None:
        self.requested = False
        #: the signal that asked to stop (``signal.SIGINT`` or ``signal.SIGTERM``), or None
        self.signum: int | None = None
        #: whether the loop stops at the point last settled (every rank alike)
        self.stop = False
        self._before: dict[int, Any] = {}
        self.enabled = enabled
        self.agree = agree
        self.repeat_s = repeat_s
        self._at = 0.0  # when the request came (or was agreed on)

    def __enter__(self) -> HeldInterrupt:
        if not (self.enabled and threading.current_thread() is threading.main_thread()):
            return self
        default = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for sig in HELD_SIGNALS:
            if signal.getsignal(sig) is default[sig]:
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second signal: now (unless it is the first one again)
            if signum == self.signum and time.monotonic() - self._at < self.repeat_s:
                return
            raise Aborted(signum)
        self.requested, self.signum, self._at = True, signum, time.monotonic()

    def ballot(self) -> int | None:
        """What this process votes now: the signal it received, or None."""
        return self.signum if self.requested else None

    def settle(self) -> bool:
        """Whether the loop stops here (:attr:`stop`): this process's request, or with
        ``agree`` the ranks' common decision (every rank must call it at the same point)."""
        if self.agree is None:
            self.stop = self.requested
            return self.stop
        agreed = self.agree(self.ballot())
        if agreed is not None:  # (another rank's signal: ours too; one status for all)
            if not self.requested:
                self.requested, self._at = True, time.monotonic()
            self.signum = agreed
        self.stop = agreed is not None
        return self.stop

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came during the step just done (the decision
        of the last :meth:`settle` where there is ``agree``)."""
        if self.stop if self.agree is not None else self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, before in self._before.items():
            signal.signal(sig, before)
        self._before = {}


def exit_status(signum: int | None) -> int:
    """The status of a run a signal stopped: ``128 + signum`` (the shell's convention: 130
    for Ctrl-C, 143 for SIGTERM), so a scheduler can tell a preempted run from a failed one
    (1) or a finished one (0)."""
    return 128 + int(signal.SIGINT if signum is None else signum)
