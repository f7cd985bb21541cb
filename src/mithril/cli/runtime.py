"""What surrounds the training loop of :mod:`.training`: the thread limit, the stand-in for a
progress bar, where the loop stands (:class:`Position`, what ``--resume`` continues from) and
Ctrl-C held back to the end of the step it lands in."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
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
    left alone); elsewhere Ctrl-C interrupts as usual."""

    def __init__(self, enabled: bool = True) -> None:
        """``enabled`` False: Ctrl-C interrupts at once (processes of a data-parallel run: one
        stopping a step after another would leave that one waiting in the next all-reduce)."""
        self.requested = False
        #: the signal that asked to stop (``signal.SIGINT`` or ``signal.SIGTERM``), or None
        self.signum: int | None = None
        self._before: dict[int, Any] = {}
        self.enabled = enabled

    def __enter__(self) -> HeldInterrupt:
        if not (self.enabled and threading.current_thread() is threading.main_thread()):
            return self
        default = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for sig in HELD_SIGNALS:
            if signal.getsignal(sig) is default[sig]:
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second signal: now
            raise Aborted(signum)
        self.requested, self.signum = True, signum

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came during the step just done."""
        if self.requested:
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
