"""A warm team of worker threads for the kernels whose pieces threads share (:mod:`.threads`).

A pool thread that sleeps between steps joins a step late: the futex wake, then the GIL
(which the calling thread holds while numba unboxes the kernel's arguments) take tens of
microseconds, by when the calling thread of a 1M-parameter step (~0.1 ms) has claimed
nearly every piece. OpenMP teams (torch's) avoid this by spinning after their work.

Here each worker, after a job that came soon after the previous one, spins for a while
(:data:`WARM_SPINS` ``pause``\\ s, ~0.1-0.2 ms) in compiled code that holds no GIL, watching a
mailbox: a generation counter, the address of the new job's claim counter and its number of
pieces. When a job is posted it waits, still spinning, until the calling thread has claimed
the first piece (so it is inside the kernel and the GIL is free), then takes the GIL at once
(no wake-up), starts the job and claims pieces. A worker whose spin runs out, or whose job
came alone (a training loop's step), sleeps on a condition until the next job.

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

#: ``pause``-spins of a worker after its job before it sleeps (~0.1-0.2 ms by CPU), when
#: jobs come in a row (the previous one posted less than :data:`WARM_GAP` seconds before):
#: then the next is likely within that time. After a job that came alone (a training loop's
#: step, the forward and backward passes between two) it sleeps at once: spinning would
#: take a core from those passes' BLAS threads (a 300k-param MLP's step was ~3% slower)
WARM_SPINS = 1 << 12
WARM_GAP = 1e-3
_last_post = -1.0

_mailbox = np.zeros(8, dtype=np.int64)  # [0] generation, [1] claim counter's address, [2] pieces
_job: tuple[int, Callable[[int], Any]] | None = None
_cond = threading.Condition()
_sleeping = 0
_team: list[threading.Thread] = []
_team_pid = 0


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
        # the next generation once its first piece is claimed (negated: nothing left to
        # claim; 0: no job within ``spins``, or its first claim not within ``claim_spins``)
        gen = load_acquire(address(mailbox))
        while gen == last:
            if spins == 0:
                return 0
            pause()
            spins -= 1
            gen = load_acquire(address(mailbox))
        claimed, pieces = mailbox[1], mailbox[2]
        while load_acquire(claimed) == 0:
            if claim_spins == 0:
                return 0
            pause()
            claim_spins -= 1
        return gen if load_acquire(claimed) < pieces else -gen

    @kernel_cache.jit(nogil=True)
    def all_done(sync, pieces, spins):  # pragma: no cover - compiled
        done = address(sync) + 64
        while load_acquire(done) < pieces:
            if spins == 0:
                return False
            pause()
            spins -= 1
        return True

    return post, await_job, all_done


def _serve() -> None:
    global _sleeping
    _, await_job, _ = _compiled()
    last = int(_mailbox[0])
    spins = 0
    while True:
        gen = await_job(_mailbox, last, spins, WARM_SPINS)
        if gen == 0:  # cold: sleep until a job is posted
            with _cond:
                _sleeping += 1
                while int(_mailbox[0]) == last:
                    _cond.wait()
                _sleeping -= 1
            spins = 0
            continue
        last = abs(gen)  # (a later job, posted meanwhile, is the next one to wait for)
        spins = WARM_SPINS if _mailbox[3] else 0  # stay warm only while jobs come in a row
        job = _job
        if gen > 0 and job is not None and job[0] == gen:
            try:
                job[1](0)
            except BaseException:  # noqa: BLE001 - the calling thread runs the same job and raises
                pass
        job = None  # (holds the job's arrays: the optimizer state's buffers)


def _ensure(workers: int) -> None:
    global _team, _team_pid
    if _team_pid != os.getpid():  # a forked child has the list but not the threads
        _team, _team_pid = [], os.getpid()
    while len(_team) < workers:
        t = threading.Thread(target=_serve, name=f"mithril-opt-{len(_team)}", daemon=True)
        t.start()
        _team.append(t)


def share(job: Callable[[int], Any], sync: np.ndarray, pieces: int, workers: int,
          spins: int) -> Any:
    """``job(spins)`` on this thread and ``job(0)`` on up to ``workers`` team threads, all
    claiming the pieces of the claim counter ``sync`` (its "done" count 64 bytes on);
    returns this thread's result once every piece is done."""
    global _job, _last_post
    if workers <= 0:
        return job(spins)
    post, _, all_done = _compiled()
    _ensure(workers)
    now = time.perf_counter()
    warm, _last_post = now - _last_post < WARM_GAP, now
    gen = int(_mailbox[0]) + 1
    _job = (gen, job)  # (before the generation moves: a worker that sees it finds the job)
    post(_mailbox, sync, pieces, 1 if warm else 0)
    if _sleeping:
        with _cond:
            _cond.notify_all()
    try:
        out = job(spins)
        while not all_done(sync, pieces, spins):  # a worker holds a piece: let it finish
            time.sleep(0)
    finally:
        if _job is not None and _job[0] == gen:  # a late worker finds nothing; the job's
            _job = None  # arrays are not kept alive by the team
    return out


def _after_fork() -> None:
    """A forked child has none of the team's threads, and the condition may have been held."""
    global _cond, _sleeping, _team, _job
    _cond, _sleeping, _team, _job = threading.Condition(), 0, [], None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
