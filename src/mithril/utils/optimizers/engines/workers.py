"""A warm team of worker threads for the kernels whose pieces threads share (:mod:`.threads`).

A pool thread that sleeps between steps joins a step late: the futex wake, then the GIL
(which the calling thread holds while numba unboxes the kernel's arguments) take tens of
microseconds, by when the calling thread of a 1M-parameter step (~0.1 ms) has claimed
nearly every piece. OpenMP teams (torch's) avoid this by spinning after their work.

Here each worker, after a job of a caller that spends less time between its jobs than in them
(a loop of optimizer steps), spins for twice that time (at most :data:`WARM_MAX`) in compiled
code that holds no GIL, watching a mailbox: a generation counter, the address of the new
job's ``sync`` array (:mod:`.atomics`), its number of pieces and how long to stay warm after
it. When a job is posted the worker waits, still spinning, until the calling thread has
arrived in the kernel (so the GIL is free), then takes the GIL at once (no
wake-up), starts the job and claims pieces. A worker whose spin runs out, or whose job came
alone (a training loop's step: the forward and backward passes between two), sleeps on a
condition until the next job.

Workers are optional by construction: the calling thread claims every piece no worker
claims, and waits only for pieces a worker has claimed (their "done" count); a job a worker
picks up late finds nothing left to claim. Jobs are callables ``job(spins)`` (each worker
may make its own scratch arrays). One mailbox for the process: a job posted while another
is running takes the team over; the earlier caller finishes alone.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: the longest a worker spins after a job, seconds. It spins only when the caller spends less
#: time between its jobs than in them (a loop of optimizer steps), for twice that time plus
#: :data:`WARM_MARGIN`: then the next job comes while it spins. Between a training loop's
#: steps (the forward and backward passes) it sleeps at once: spinning would take a core
#: from those passes' BLAS threads (a 300k-param MLP's train step was ~3% slower)
WARM_MAX = 1e-3
WARM_MARGIN = 50e-6
#: a sleeping worker is woken for a job only if the caller's previous one took longer than
#: this, seconds (waking takes tens of microseconds: a short job is done by then), or if it
#: is to stay warm
WAKE_WORTH = 200e-6
_last_end = -1.0  # when the caller's previous job ended, and how long it took
_last_took = 0.0
_pauses_per_s = 0.0  # measured once

_mailbox = np.zeros(8, dtype=np.int64)  # generation, the job's sync address, pieces, warm spins
_job: tuple[int, Callable[[int], Any]] | None = None
_cond = threading.Condition()
_sleeping = 0
_team: list[threading.Thread] = []


@functools.cache
def _compiled() -> tuple[Any, Any, Any]:
    from . import atomics, kernel_cache, streaming

    fetch_add, load_acquire, pause = atomics.fetch_add, atomics.load_acquire, atomics.spin_pause
    address = streaming.address

    @kernel_cache.jit(nogil=True)
    def post(mailbox, sync, pieces, warm):  # pragma: no cover - compiled
        mailbox[1] = address(sync)
        mailbox[2] = pieces
        mailbox[3] = warm
        return fetch_add(address(mailbox), 1) + 1  # (a full barrier: the fields first)

    @kernel_cache.jit(nogil=True)
    def await_job(mailbox, last, spins, claim_spins):  # pragma: no cover - compiled
        # the next generation once the calling thread arrived (negated: every piece is
        # done; 0: no job within ``spins``, or no arrival within ``claim_spins``)
        gen = load_acquire(address(mailbox))
        while gen == last:
            if spins == 0:
                return 0
            pause()
            spins -= 1
            gen = load_acquire(address(mailbox))
        arrived, pieces = mailbox[1], mailbox[2]  # (sync[0]; its done count 64 bytes on)
        while load_acquire(arrived) == 0:
            if claim_spins == 0:
                return 0
            pause()
            claim_spins -= 1
        return gen if load_acquire(arrived + 64) < pieces else -gen

    @kernel_cache.jit(nogil=True)
    def all_done(sync, pieces, spins):  # pragma: no cover - compiled
        done = address(sync) + 64
        while load_acquire(done) < pieces:
            if spins == 0:
                return False
            pause()
            spins -= 1
        return True

    global _pauses_per_s
    idle_box = np.zeros(8, dtype=np.int64)
    await_job(idle_box, 0, 1, 0)  # (loaded or compiled first)
    t0 = time.perf_counter()  # how fast ``pause`` spins here (3-50 ns by CPU)
    await_job(idle_box, 0, _CALIBRATE, 0)
    _pauses_per_s = _CALIBRATE / max(time.perf_counter() - t0, 1e-9)
    return post, await_job, all_done


#: ``pause``-spins a worker waits for a posted job's first claim (the caller is about to
#: make it; ~0.1-0.2 ms), and that the calibration of the spin's speed takes
_CLAIM_SPINS = _CALIBRATE = 1 << 12


def _serve() -> None:
    global _sleeping
    _, await_job, _ = _compiled()
    last = int(_mailbox[0])
    spins = 0
    while True:
        gen = await_job(_mailbox, last, spins, _CLAIM_SPINS)
        if gen == 0:  # cold: sleep until a job is posted
            with _cond:
                _sleeping += 1
                while int(_mailbox[0]) == last:
                    _cond.wait()
                _sleeping -= 1
            spins = 0
            continue
        last = abs(gen)  # (a later job, posted meanwhile, is the next one to wait for)
        spins = int(_mailbox[3])  # how long to stay warm: the caller's guess
        job = _job
        if gen > 0 and job is not None and job[0] == gen:
            try:
                job[1](0)
            except BaseException:  # noqa: BLE001 - the calling thread runs the same job and raises
                pass
        job = None  # (holds the job's arrays: the optimizer state's buffers)


def _ensure(workers: int) -> None:
    while len(_team) < workers:
        t = threading.Thread(target=_serve, name=f"mithril-opt-{len(_team)}", daemon=True)
        t.start()
        _team.append(t)


def share(job: Callable[[int], Any], sync: np.ndarray, pieces: int, workers: int,
          spins: int) -> Any:
    """``job(spins)`` on this thread and ``job(0)`` on up to ``workers`` team threads, all
    claiming the pieces of the job's ``sync`` array (:func:`.atomics.new_sync`);
    returns this thread's result once every piece is done. The job returns what its
    kernel's :func:`.atomics.all_done` said: 1.0 when every piece was done then."""
    global _job, _last_end, _last_took
    if workers <= 0:
        return job(spins)
    post, _, all_done = _compiled()
    _ensure(workers)
    start = time.perf_counter()
    idle = start - _last_end  # the caller's time since its previous job
    warm = int(min(2 * idle + WARM_MARGIN, WARM_MAX) * _pauses_per_s) if idle < _last_took else 0
    gen = int(_mailbox[0]) + 1
    _job = (gen, job)  # (before the generation moves: a worker that sees it finds the job)
    post(_mailbox, sync, pieces, warm)
    if _sleeping and (warm or _last_took > WAKE_WORTH):
        with _cond:
            _cond.notify_all()
    try:
        out = job(spins)
        if out != 1.0:  # a worker holds a piece (every kernel ends with atomics.all_done)
            while not all_done(sync, pieces, spins):  # let it finish
                time.sleep(0)
    finally:
        if _job is not None and _job[0] == gen:  # a late worker finds nothing; the job's
            _job = None  # arrays are not kept alive by the team
        _last_end = time.perf_counter()
        _last_took = _last_end - start
    return out


def _after_fork() -> None:
    """A forked child has none of the team's threads, and the condition may have been held."""
    global _cond, _sleeping, _team, _job
    _cond, _sleeping, _team, _job = threading.Condition(), 0, [], None


if hasattr(os, "register_at_fork"):  # (no fork elsewhere)
    os.register_at_fork(after_in_child=_after_fork)
