"""Optimizer steps shared between threads give exactly the parameters, state and gradient
norm of one thread (pieces are claimed dynamically, so any thread may run any piece)."""

import numpy as np
import pytest
from conftest import run_python

from mithril.utils.optimizers import SGD, Adam, AdamW, get_num_threads, set_num_threads
from mithril.utils.optimizers.engines import threads


def natives(backend, d):
    if backend == "torch":
        import torch

        return {k: torch.tensor(v) for k, v in d.items()}
    if backend == "jax":
        import jax.numpy as jnp

        return {k: jnp.asarray(v) for k, v in d.items()}
    return {k: np.array(v) for k, v in d.items()}

#: the pieces of these tests (smaller than the default: more pieces than threads, at less
#: memory and time)
PIECE = 1 << 16
# big enough to be shared (>= MIN_PARALLEL elements), with tensors cut into several pieces,
# small tensors, an empty one and a scalar
SHAPES = {"big": (3 * PIECE + 5,), "w": (300, 1000), "b": (7,), "empty": (0,),
          "s": (), "w2": (2, PIECE // 2 + 3)}


@pytest.fixture(autouse=True)
def _pieces(monkeypatch):
    monkeypatch.setattr(threads, "PIECE", PIECE)


def host(x):
    return x.numpy().copy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.array(x)


@pytest.fixture
def restore_threads():
    before = threads._threads
    yield
    threads._threads = before


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    p = {k: np.asarray(rng.standard_normal(s), dtype=np.float32) for k, s in SHAPES.items()}
    gs = [{k: np.asarray(rng.standard_normal(s) * 0.1, dtype=np.float32) for k, s in SHAPES.items()}
          for _ in range(3)]
    del gs[1]["w"]  # a step with a missing gradient: that parameter passes through
    return p, gs


def _run(opt_factory, backend, n_threads):
    set_num_threads(n_threads)
    p, gs = _problem()
    opt = opt_factory()
    params = natives(backend, p)
    state = opt.init(params)
    for g in gs:
        params, state = opt.update(params, natives(backend, g), state)
    plan = state.engine._plan
    assert plan.pieces >= 8 and plan.total >= threads.MIN_PARALLEL  # pool threads are used
    out = {k: host(v) for k, v in params.items()}
    slots = {s: {k: host(v) for k, v in state.slot(s).items()} for s in state.slots}
    return out, slots, state.last_grad_norm


@pytest.mark.parametrize("spins", [threads.SPINS, 0])  # 0: sleeping for other threads too
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("opt_factory", [
    lambda: Adam(1e-2, weight_decay=0.1),
    lambda: SGD(1e-2, momentum=0.9, nesterov=True, clip_norm=1.0),
    lambda: AdamW(1e-2, clip_value=0.05, nonfinite="skip"),
], ids=["adam-l2", "sgd-nesterov-clipnorm", "adamw-clipvalue-skip"])
def test_threads_match_one_thread(restore_threads, monkeypatch, opt_factory, backend, spins):
    monkeypatch.setattr(threads, "SPINS", spins)
    p1, s1, n1 = _run(opt_factory, backend, 1)
    for n in (3, 8):
        pn, sn, nn = _run(opt_factory, backend, n)
        for k in p1:
            np.testing.assert_array_equal(p1[k], pn[k], err_msg=k)
        for s in s1:
            for k in s1[s]:
                np.testing.assert_array_equal(s1[s][k], sn[s][k], err_msg=f"{s}/{k}")
        assert nn == n1  # per-piece sums, added in piece order


def test_plan_covers_every_element_once():
    P = threads.PIECE
    sizes = np.array([5, 0, 3 * P + 7, 16, P, 1, P - 3, 2 * P], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) * 2  # padded layout
    plan = threads.Plan(offsets, sizes)
    covered = np.zeros(int(offsets[-1] + sizes[-1]), dtype=np.int64)
    for t, f, o, n in zip(plan.seg_t, plan.seg_first, plan.seg_off, plan.seg_size):
        assert o == offsets[t] + f and f + n <= sizes[t] and 0 < n <= P
        assert f % 16 == 0  # cuts keep vector loops aligned
        covered[o:o + n] += 1
    for o, n in zip(offsets, sizes):
        assert (covered[o:o + n] == 1).all()
    assert covered.sum() == sizes.sum()
    b = plan.bounds
    assert b[0] == 0 and b[-1] == len(plan.seg_t) and (np.diff(b) > 0).all() and plan.pieces == len(b) - 1
    per_piece = [int(plan.seg_size[b[k]:b[k + 1]].sum()) for k in range(plan.pieces)]
    assert max(per_piece) <= 2 * P and plan.pieces >= sizes.sum() // (2 * P)


def _counting_kernel():
    """A kernel of the pieces protocol that counts each piece's runs and records the order
    in which the thread of slot ``who`` claimed."""
    import numba

    from mithril.utils.optimizers.engines import atomics

    @numba.njit(nogil=True)
    def count(hits, order, who, gptr, seg_t, seg_first, seg_off, seg_size, bounds, sync, acc,
              spins):
        pieces = bounds.shape[0] - 1
        slot = atomics.arrive(sync)
        k = atomics.claim(sync, slot)
        i = 0
        while k < pieces:
            hits[k] += 1
            acc[k] = k
            if slot == who:
                order[i] = k
                i += 1
            atomics.piece_done(sync)
            k = atomics.claim(sync, slot)
        return atomics.all_done(sync, pieces, spins)

    return count


def test_run_claims_every_piece_once():
    """However many threads take part, each piece is run once: a kernel that counts."""
    count = _counting_kernel()
    sizes = np.full(64, threads.PIECE, dtype=np.int64)
    plan = threads.Plan(np.arange(64, dtype=np.int64) * threads.PIECE, sizes)
    before = threads._threads
    try:
        for n in (1, 2, 8):
            set_num_threads(n)
            hits = np.zeros(plan.pieces, dtype=np.int64)
            order = np.full(plan.pieces, -1, dtype=np.int64)
            total = plan.run(count, (hits, order, 0), np.zeros(64, dtype=np.int64), ())
            assert (hits == 1).all() and total == sum(range(plan.pieces))
            if n == 1:  # alone: the pieces in order
                np.testing.assert_array_equal(order, np.arange(plan.pieces))
    finally:
        threads._threads = before


def _claim_all(sync, pieces, who=0, hits=None):
    count = _counting_kernel()
    z = np.zeros(pieces, dtype=np.int64)
    hits = np.zeros(pieces, dtype=np.int64) if hits is None else hits
    order = np.full(pieces, -1, dtype=np.int64)
    assert count(hits, order, who, z, z, z, z, z, np.arange(pieces + 1, dtype=np.int64), sync,
                 np.zeros(pieces), 0) == 1.0
    return hits, order[order >= 0].tolist()


def test_claims_own_range_then_steals_from_the_back():
    """A thread claims its own range front to back, then the others' from their back ends;
    with one range (a queue) every thread takes the front."""
    from mithril.utils.optimizers.engines import atomics

    # alone with three ranges, [0, 3), [3, 6), [6, 10): the two other threads never come
    hits, order = _claim_all(atomics.new_sync(10, 3), 10)
    assert (hits == 1).all() and order == [0, 1, 2, 5, 4, 3, 9, 8, 7, 6]
    hits, order = _claim_all(atomics.new_sync(10, 1), 10)
    assert (hits == 1).all() and order == list(range(10))
    # the second thread to arrive (slot 1), after the first took [0, 3) from range 0's front
    # and piece 9 from range 2's back: its own range [3, 6) from the front, then [6, 9) from
    # the back, each piece once in all
    sync = atomics.new_sync(10, 3)
    sync[0], sync[8], sync[16], sync[18] = 1, 4, 3, 1 << 32  # (and done those 4)
    hits = np.zeros(10, dtype=np.int64)
    hits[[0, 1, 2, 9]] = 1
    hits, order = _claim_all(sync, 10, who=1, hits=hits)
    assert (hits == 1).all() and order == [3, 4, 5, 8, 7, 6]


def test_set_num_threads_validates(restore_threads):
    set_num_threads(2)
    assert get_num_threads() == 2
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive int"):
            set_num_threads(bad)
    assert get_num_threads() == 2


def test_threads_work_in_a_forked_child():
    """A child forked after the pool started gets a pool of its own (no deadlock). Run in a
    fresh interpreter: forking a process that has started JAX's threads is unsafe."""
    out = run_python("""
        import multiprocessing as mp
        import numpy as np
        from mithril.utils.optimizers import Adam, set_num_threads

        set_num_threads(2)

        def step():
            rng = np.random.default_rng(0)
            p = {"w": rng.standard_normal(1 << 20).astype(np.float32)}
            opt = Adam(1e-2)
            _, state = opt.update(dict(p), {"w": p["w"] * 0.5}, opt.init(p))
            assert state.engine._plan.pieces > 1
            return state.last_grad_norm

        parent = step()  # starts the pool in the parent
        with mp.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(step).get(timeout=60)
        print(parent == child)
    """)
    assert out.strip().splitlines()[-1] == "True"


def _slow_counting_kernel():
    """A piece-claiming kernel whose pieces each take ~20 us, recording which kind of thread
    ran each: 1 the calling thread (it spins for the others), 2 a team thread (spins 0)."""
    import numba

    from mithril.utils.optimizers.engines import atomics

    @numba.njit(nogil=True)
    def kernel(who, sync, pieces, spins):
        slot = atomics.arrive(sync)
        k = atomics.claim(sync, slot)
        while k < pieces:
            x = 0.0
            for i in range(20000):  # ~20 us of work
                x += i * 1e-9
            who[k] = 1 if spins else 2
            if x < 0:
                who[k] = 0
            atomics.piece_done(sync)
            k = atomics.claim(sync, slot)
        return atomics.all_done(sync, pieces, spins)

    return kernel


def test_a_warm_team_thread_takes_pieces(restore_threads):
    """Back-to-back jobs: a team thread, spinning between them, claims some of the pieces
    (every piece is run exactly once either way)."""
    from mithril.utils.optimizers.engines import atomics, workers

    kernel = _slow_counting_kernel()
    set_num_threads(2)
    helped = False
    for _ in range(40):
        who = np.zeros(64, dtype=np.int64)
        sync = atomics.new_sync(64, 2)
        workers.share(lambda spins, who=who, sync=sync: kernel(who, sync, 64, spins), sync, 64,
                      1, threads.SPINS)
        assert set(who.tolist()) <= {1, 2} and (who > 0).all()
        helped = helped or bool((who == 2).any())
    assert helped


def test_the_team_keeps_no_finished_job_alive(restore_threads):
    import gc
    import time
    import weakref

    from mithril.utils.optimizers.engines import atomics, workers

    kernel = _slow_counting_kernel()
    set_num_threads(2)
    who = np.zeros(8, dtype=np.int64)
    sync = atomics.new_sync(8, 2)
    ref = weakref.ref(who)
    workers.share(lambda spins, who=who: kernel(who, sync, 8, spins), sync, 8, 1, threads.SPINS)
    del who
    for _ in range(200):  # a late team thread drops it once it sees nothing left to claim
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.005)
    assert ref() is None


def test_the_cli_thread_limit_covers_the_optimizer(restore_threads):
    """``mithril train --threads N`` limits the optimizer's threads too, for the run only."""
    from mithril.cli.training import thread_limit

    set_num_threads(2)
    with thread_limit(1, "numpy"):
        assert get_num_threads() == 1
    assert get_num_threads() == 2


def test_the_environment_is_read_once_and_anew_in_a_forked_child():
    """``MITHRIL_NUM_THREADS`` is read at the first step, as torch and numba read theirs; a
    later change does not reach this process, but a child forked after it reads it anew."""
    out = run_python("""
        import os
        os.environ["MITHRIL_NUM_THREADS"] = "3"
        from mithril.utils.optimizers import get_num_threads, set_num_threads
        assert get_num_threads() == 3
        os.environ["MITHRIL_NUM_THREADS"] = "5"
        assert get_num_threads() == 3
        set_num_threads(2)
        assert get_num_threads() == 2
        from mithril.utils.optimizers.engines import threads
        threads._threads = None
        assert get_num_threads() == 3
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, str(get_num_threads()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print("child", os.read(r, 8).decode())
    """)
    assert out.strip().splitlines()[-1] == "child 5"


def test_the_pieces_sums_are_added_in_order(restore_threads):
    """The reported norm is the pieces' Σ g² added one after another in piece order (not
    numpy's pairwise sum, which differs from 8 terms on); that the pieces' values do not
    depend on the thread count is test_threads_match_one_thread's."""
    values = [1.0] + [1e-16] * 36  # (in order each small term is lost: numpy keeps them)
    order = 0.0
    for v in values:
        order += v
    assert order == 1.0 and float(np.sum(values)) > 1.0

    def kernel(gptr, seg_t, seg_first, seg_off, seg_size, bounds, sync, acc, spins):
        acc[:] = values  # (each piece's Σ g², as the update kernels leave them)
        return 1.0

    plan = threads.Plan(np.array([0]), np.array([37 * PIECE]))
    assert plan.pieces == 37
    set_num_threads(1)
    assert plan.run(kernel, (), np.zeros(1, np.int64), ()) == order


def test_inside_counts_addresses_in_the_spans():
    from mithril.utils.optimizers.engines.kernels import inside

    spans = np.array([[100, 200], [1000, 1004]], dtype=np.int64)
    assert inside(np.array([0, 99, 200, 1004, 5000], dtype=np.int64), spans) == 0
    assert inside(np.array([0, 100, 199, 1003], dtype=np.int64), spans) == 3
    assert inside(np.array([], dtype=np.int64), spans) == 0
