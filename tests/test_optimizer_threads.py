"""Optimizer steps cut between threads give the same parameters and state as one thread."""

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

# big enough to be cut (parts hold >= MIN_PART elements), with a tensor cut in the middle,
# small tensors, an empty one and a scalar
SHAPES = {"big": (3 * threads.MIN_PART + 5,), "w": (300, 1000), "b": (7,), "empty": (0,),
          "s": (), "w2": (2, threads.MIN_PART // 2 + 3)}


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
    assert len(state.engine._plan().parts) == n_threads  # the step was really cut
    out = {k: host(v) for k, v in params.items()}
    slots = {s: {k: host(v) for k, v in state.slot(s).items()} for s in state.slots}
    return out, slots, state.last_grad_norm


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("opt_factory", [
    lambda: Adam(1e-2, weight_decay=0.1),
    lambda: SGD(1e-2, momentum=0.9, nesterov=True, clip_norm=1.0),
    lambda: AdamW(1e-2, clip_value=0.05, nonfinite="skip"),
], ids=["adam-l2", "sgd-nesterov-clipnorm", "adamw-clipvalue-skip"])
def test_threads_match_one_thread(restore_threads, opt_factory, backend):
    p1, s1, n1 = _run(opt_factory, backend, 1)
    p3, s3, n3 = _run(opt_factory, backend, 3)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p3[k], err_msg=k)
    for s in s1:
        for k in s1[s]:
            np.testing.assert_array_equal(s1[s][k], s3[s][k], err_msg=f"{s}/{k}")
    assert n3 == pytest.approx(n1, rel=1e-12)  # only the summation order differs


def test_plan_covers_every_element_once():
    sizes = np.array([5, 0, 3 * threads.MIN_PART + 7, 16, threads.MIN_PART], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) * 2  # padded layout
    plan = threads.Plan(offsets, sizes, 4)
    assert len(plan.parts) == 4
    covered = np.zeros(int(offsets[-1] + sizes[-1]), dtype=np.int64)
    for idx, first, off, size in plan.parts:
        for t, f, o, n in zip(idx, first, off, size):
            assert o == offsets[t] + f and f + n <= sizes[t]
            covered[o:o + n] += 1
    for o, n in zip(offsets, sizes):
        assert (covered[o:o + n] == 1).all()
    assert covered.sum() == sizes.sum()


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
            assert len(state.engine._plan().parts) == 2
            return state.last_grad_norm

        parent = step()  # starts the pool in the parent
        with mp.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(step).get(timeout=60)
        print(parent == child)
    """)
    assert out.strip().splitlines()[-1] == "True"
