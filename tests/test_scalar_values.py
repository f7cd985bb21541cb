"""``Optimizer.scalar_values``: the state values an optimizer's ``scalars`` reads are passed
to it as keyword arguments (Prodigy's ``d``), by every engine and the optax transformation,
so that an update never changes the optimizer instance: one instance steps several states,
alternately or from several threads, exactly as each state's own instance would."""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
from conftest import host, native, optimizer_engine

from mithril.utils.optimizers import Optimizer, Prodigy

KINDS = ["numpy", "torch", "array-torch", "jax-jit"]
SHAPES = {"w": (4, 3), "b": (3,), "s": ()}


class DelayedAdaGradNorm(Optimizer):
    """p ← p − lr / √(1 + total) · g, total: Σ ‖g‖² of the steps before (docs/optimizers.md)."""

    reductions = 1
    state_values = ("total",)
    scalar_values = ("total",)

    def scalars(self, step, total=0.0):
        return (self.learning_rate / math.sqrt(1.0 + total),)

    @staticmethod
    def reduce(p, g, step_size):
        return (g * g,)

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):
        return (), tensors, {"total": values["total"] + sums[0].sum()}

    @staticmethod
    def math(p, g, step_size):
        return (p - step_size * g,)


def problem(seed: int, steps: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    # mostly a constant drift, so that Prodigy's d grows from the fourth step on
    grads = [{k: 0.1 * rng.standard_normal(s) + 1.0 for k, s in SHAPES.items()}
             for _ in range(steps)]
    return p0, grads


def make_prodigy() -> Prodigy:
    return Prodigy(1.0, estim_lr0=1e-3, weight_decay=1e-2,
                   param_groups=[{"params": "b", "learning_rate": 0.5}])


class Run:
    """One state's run: its params and state, stepped one gradient at a time."""

    def __init__(self, opt: Optimizer, kind: str, seed: int, steps: int) -> None:
        p0, self.grads = problem(seed, steps)
        self.opt, self.kind, self.t = opt, kind, 0
        self.params = {k: native(kind, v) for k, v in p0.items()}
        self.state = opt.init(self.params)

    def step(self) -> None:
        g = {k: native(self.kind, v) for k, v in self.grads[self.t].items()}
        self.params, self.state = self.opt.update(self.params, g, self.state)
        self.t += 1

    def result(self) -> tuple[dict, dict, dict]:
        return ({k: host(v) for k, v in self.params.items()},
                {s: {k: host(v) for k, v in self.state.slot(s).items()}
                 for s in self.state.slots},
                dict(self.state.values))


def assert_same(a: tuple, b: tuple) -> None:
    pa, sa, va = a
    pb, sb, vb = b
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    for s in sa:
        for k in sa[s]:
            np.testing.assert_array_equal(sa[s][k], sb[s][k])
    assert va == vb


def snapshot(opt: Optimizer) -> dict:
    return {k: copy.deepcopy(v) if isinstance(v, (dict, list, tuple)) else v
            for k, v in vars(opt).items() if k != "_backend"}


@pytest.mark.parametrize("kind", KINDS)
def test_update_leaves_the_instance_alone(kind, monkeypatch):
    """No attribute appears on the instance during an update (``scalars`` is called with
    the state's d), and after the first step (which caches the groups' matching) the
    instance is the same before and after each update."""
    seen = []
    plain = Prodigy.scalars

    def spy(self, step, d=None):
        if isinstance(self, Prodigy):  # (the jitted engine's program calls it on a stand-in)
            seen.append((set(vars(self)), d))
        return plain(self, step, d)

    monkeypatch.setattr(Prodigy, "scalars", spy)
    with optimizer_engine(kind):
        opt = make_prodigy()
        run = Run(opt, kind, 0, 8)
        run.step()
        keys = set(vars(opt))
        before = snapshot(opt)
        for _ in range(7):
            run.step()
            assert snapshot(opt).keys() == before.keys()
            for k, v in snapshot(opt).items():
                assert v is before[k] or v == before[k], k
    assert seen and all(k <= keys for k, _ in seen)
    assert not any("_d" in k for k, _ in seen)
    ds = [d for _, d in seen]
    if kind == "jax-jit":  # the program makes the scalars of the state's d: the host's
        assert set(ds) == {1e-3}, ds  # table holds them for the initial d (none read back)
    else:
        assert ds[0] == 1e-3 and len(set(ds)) > 2, ds  # the state's d, growing
    assert run.state.values["d"] > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make", [make_prodigy, lambda: DelayedAdaGradNorm(0.1)],
                         ids=["prodigy", "custom"])
def test_one_instance_two_states_alternately(kind, make):
    """Two states stepped alternately by one instance equal each one's own run."""
    steps = 8
    with optimizer_engine(kind):
        shared = make()
        a, b = Run(shared, kind, 1, steps), Run(shared, kind, 2, steps)
        for _ in range(steps):
            a.step()
            b.step()
        alone = []
        for seed in (1, 2):
            r = Run(make(), kind, seed, steps)
            for _ in range(steps):
                r.step()
            alone.append(r.result())
    assert a.state.values != b.state.values
    assert_same(a.result(), alone[0])
    assert_same(b.result(), alone[1])


def test_one_instance_two_states_from_two_threads():
    """The same from two threads at once (NumPy engine, one thread each)."""
    from mithril.utils.optimizers.engines import threads

    steps = 20
    shared = make_prodigy()
    runs = [Run(shared, "numpy", s, steps) for s in (3, 4)]
    barrier = threading.Barrier(2)
    errors = []

    def go(r: Run) -> None:
        try:
            barrier.wait()
            for _ in range(steps):
                r.step()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    before = threads._threads
    try:
        threads._threads = 1
        workers = [threading.Thread(target=go, args=(r,)) for r in runs]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        threads._threads = before
    assert not errors, errors
    for r, seed in zip(runs, (3, 4)):
        alone = Run(make_prodigy(), "numpy", seed, steps)
        for _ in range(steps):
            alone.step()
        assert_same(r.result(), alone.result())


def test_scalars_get_the_values_or_their_initial_ones():
    opt = Prodigy(estim_lr0=1e-4)
    assert Prodigy.scalar_values == ("d",)
    assert opt.scalars(3) == opt.scalars(3, d=1e-4) == opt.full_scalars(3)
    assert opt.full_scalars(3, {"d": 0.5, "numerator": 1.0}) == opt.scalars(3, d=0.5)
    assert opt.full_scalars(3, {}) == opt.scalars(3)  # a value missing: its initial one
    assert opt.scalars(3, d=0.5)[1:3] != opt.scalars(3)[1:3]
    sgd = DelayedAdaGradNorm(0.1, ema_decay=0.9)
    assert sgd.full_scalars(1, {"total": 3.0}) == (0.05, 1.0)
    assert Optimizer.scalar_values == ()
    assert not hasattr(Prodigy, "_update") and "update" not in vars(Prodigy)


def test_scalar_values_must_be_state_values():
    with pytest.raises(TypeError, match=r"Bad.scalar_values \['x'\] are not among its "
                                        r"state_values \('y',\)"):
        class Bad(Optimizer):
            state_values = ("y",)
            scalar_values = ("x",)


@pytest.mark.parametrize("scalars", ["auto", "host"])
@pytest.mark.parametrize("make", [make_prodigy, lambda: DelayedAdaGradNorm(0.1)],
                         ids=["prodigy", "custom"])
def test_optax_transformation_passes_the_values(make, scalars):
    """The optax transformation passes the state's values to ``scalars`` (traced under
    "auto", else to the host callback): the optimizer's numbers, the instance unchanged."""
    from mithril.interop.optax_transform import scalars_on_host

    assert scalars_on_host(make()) is None  # traced, the state's values with it
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    from mithril.interop import optax_transformation

    steps = 8
    opt = make()
    before = snapshot(opt)
    tx = optax_transformation(opt, scalars=scalars)
    p0, grads = problem(5, steps)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in p0.items()}
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for g in grads:
        updates, state = step(params, state, {k: jnp.asarray(v, jnp.float32)
                                              for k, v in g.items()})
        params = optax.apply_updates(params, updates)
    assert snapshot(opt).keys() == before.keys()
    ours = Run(make(), "numpy", 5, steps)
    for _ in range(steps):
        ours.step()
    want, _, values = ours.result()
    for k in want:
        np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=2e-4, atol=1e-6)
    for k, v in values.items():
        assert float(state.values[k]) == pytest.approx(v, rel=1e-4), k


def test_lookahead_passes_scalar_values_through():
    """Lookahead composes a two-pass inner optimizer (its sums, tensor_scalars and values;
    ``scalars(step, total=...)`` reads the state's): before the first sync its steps are
    the inner's, values included. Prodigy (its own init) stays refused."""
    from mithril.utils.optimizers import Lookahead

    with pytest.raises(TypeError, match="inner: Prodigy overrides init/update"):
        Lookahead(Prodigy())
    p0, grads = problem(0, 3)
    la, bare = Lookahead(DelayedAdaGradNorm(0.1), sync_period=5), DelayedAdaGradNorm(0.1)
    p = {k: np.array(v, dtype=np.float64) for k, v in p0.items()}
    q = {k: v.copy() for k, v in p.items()}
    s, t = la.init(p), bare.init(q)
    for g in ({k: np.asarray(v, dtype=np.float64) for k, v in g.items()} for g in grads):
        p, s = la.update(p, g, s)
        q, t = bare.update(q, g, t)
    assert s.values["total"] == t.values["total"] > 0
    for k in p0:
        np.testing.assert_array_equal(p[k], q[k])
