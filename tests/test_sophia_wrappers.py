"""Sophia inside the optimizer wrappers, against optax's compositions side by side in the
same test (float64): ``Lookahead(Sophia)`` is ``optax.lookahead(sophia)`` (with and without
``reset_state``), ``ScheduleFree`` / ``Mechanize`` / ``SAM`` / ``DifferentiallyPrivate``
around Sophia are ``optax.contrib.schedule_free`` / ``mechanize`` / ``sam`` /
``chain(differentially_private_aggregate, sophia)``, an ``Accumulate`` around a Lookahead
is ``optax.MultiSteps(lookahead(...))``. optax's Sophia takes its estimate from its
``hessian_diagonal_fn`` at the params given to the inner update; here the wrapper's
``update_hessian`` folds the same function of the params given to ``update`` after the steps
its ``hessian_due`` names. Then optax's printed win rate against ``win_rate``, checkpoints
of a wrapped Sophia (resume bit for bit), and the refusals (named, nothing changed).
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import host, jax_float64, native, optimizer_engine

from mithril.errors import KeyMismatchError
from mithril.interop import optax_transformation
from mithril.utils.accumulation import Accumulate, AccumulateState
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.optimizers import (
    SAM,
    Adam,
    DifferentiallyPrivate,
    Lookahead,
    Mechanize,
    Muon,
    ScheduleFree,
    Sophia,
)

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
STEPS = 14


def problem(seed: int = 0, steps: int = STEPS) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.normal(size=s)) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.normal(size=s)) for k, s in SHAPES.items()}
             for _ in range(steps)]
    return p0, grads


def curvature(p: dict) -> dict:
    """The Hessian-diagonal 'estimate' both sides use: a fixed function of the params it is
    measured at (so a restarted optax state hands out the same one as ours)."""
    return {k: 0.5 + v * v for k, v in p.items()}


def optax_curvature() -> optax.GradientTransformation:
    """optax's ``hessian_diagonal_fn`` giving :func:`curvature` of the params it gets."""
    return optax.GradientTransformation(lambda p: optax.EmptyState(),
                                        lambda u, s, params=None, **kw: (curvature(params), s))


def optax_sophia(**kw) -> optax.GradientTransformation:
    """optax's sophia with ours' keywords (``beta2`` is its ``b2``)."""
    kw = {{"beta2": "b2"}.get(k, k): v for k, v in kw.items()}
    return optax.contrib.sophia(kw.pop("lr", 0.05), hessian_diagonal_fn=optax_curvature(),
                                **kw)


def jx(d: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in d.items()}


def folded_step(opt, p: dict, g: dict, state, engine: str = "numpy", **kw):
    """One update of the wrapper ``opt`` with the estimate folded in where it was due."""
    due = opt.hessian_due(state)
    h = curvature({k: host(v) for k, v in p.items()}) if due else None
    p, state = opt.update(p, {k: native(engine, v) for k, v in g.items()}, state, **kw)
    if due:
        state = opt.update_hessian(state, {k: native(engine, v) for k, v in h.items()})
    return p, state, due


def err(a: dict, b: dict) -> float:
    return max(float(np.abs(host(a[k]) - host(b[k])).max()) for k in a)


# -- Lookahead ---------------------------------------------------------------------------------
SOPHIA = {"update_interval": 2, "gamma": 0.05, "weight_decay": 0.01}


def optax_steps(tx, p0: dict, grads: list, lookahead: bool = False) -> list:
    """optax's params after each update of ``tx`` (float64; ``LookaheadParams`` with
    ``lookahead``)."""
    with jax_float64():
        p = optax.LookaheadParams.init_synced(jx(p0)) if lookahead else jx(p0)
        st, out = tx.init(p), []
        for g in grads:
            u, st = tx.update(jx(g), st, p)
            p = optax.apply_updates(p, u)
            out.append(p)
    return out


def optax_lookahead(reset: bool, p0: dict, grads: list) -> list:
    """(fast, slow) after each step of optax.lookahead(sophia, 3, 0.5)."""
    tx = optax.lookahead(optax_sophia(**SOPHIA), 3, 0.5, reset_state=reset)
    return [(p.fast, p.slow) for p in optax_steps(tx, p0, grads, lookahead=True)]


@pytest.mark.parametrize("engine", ["numpy", "torch", "jax-jit", "array-torch"])
@pytest.mark.parametrize("reset", [False, True])
def test_lookahead_sophia_equals_optax_lookahead(reset, engine):
    p0, grads = problem(1)
    theirs = optax_lookahead(reset, p0, grads)
    la = Lookahead(Sophia(0.05, **SOPHIA), sync_period=3, slow_step_size=0.5,
                   reset_state=reset)
    dues = []
    with optimizer_engine(engine), jax_float64():
        p = {k: native(engine, v) for k, v in p0.items()}
        state = la.init(p)
        for t, g in enumerate(grads, 1):
            p, state, due = folded_step(la, p, g, state, engine)
            dues.append(due)
            fast, slow = theirs[t - 1]
            assert err(p, fast) <= 1e-12, (t, err(p, fast))
            assert err(la.slow_params(state), slow) <= 1e-12, t
            assert state.kind == "Lookahead" and set(state.slots) == {"m", "nu", "slow"}
    # optax's inner count: every step, or restarted at each sync (whose estimate it drops)
    inner = [(t - 1) % 3 if reset else t - 1 for t in range(1, STEPS + 1)]
    want = [c % 2 == 0 and not (reset and t % 3 == 0) for t, c in enumerate(inner, 1)]
    assert dues == want and sum(want) >= 4


def test_lookahead_of_a_clipped_sophia_equals_optax_chain():
    """Lookahead(Sophia(clip_norm=c, clip_eps=0)): optax.lookahead(chain(
    clip_by_global_norm(c), sophia)), the clip acting on most steps."""
    p0, grads = problem(16)
    theirs = optax_steps(optax.lookahead(optax.chain(optax.clip_by_global_norm(0.5),
                                                     optax_sophia(**SOPHIA)), 4, 0.5),
                         p0, grads, lookahead=True)
    la = Lookahead(Sophia(0.05, clip_norm=0.5, clip_eps=0.0, **SOPHIA), 4, 0.5)
    p = {k: v.copy() for k, v in p0.items()}
    state, clipped = la.init(p), 0
    for g, pj in zip(grads, theirs):
        p, state, _ = folded_step(la, p, g, state)
        clipped += state.last_grad_norm > 0.5
        assert err(p, pj.fast) <= 1e-12 and err(la.slow_params(state), pj.slow) <= 1e-12
    assert clipped == STEPS


def test_lookahead_through_accumulate_equals_optax_multisteps():
    """Accumulate(Lookahead(Sophia, sync_period=2), 2): optax.lookahead(MultiSteps(sophia,
    2), sync_period=4); the Lookahead's hessian_due / update_hessian take the
    AccumulateState (returned as given)."""
    p0, grads = problem(2, steps=16)
    with jax_float64():  # (optax fixes the accumulator's dtype when it is made)
        tx = optax.lookahead(optax.MultiSteps(optax_sophia(**SOPHIA), 2,
                                              accumulator_dtype=jnp.float64), 4, 0.5)
    theirs = optax_steps(tx, p0, grads, lookahead=True)
    la = Lookahead(Sophia(0.05, **SOPHIA), 2, 0.5)
    acc = Accumulate(la, 2)
    p = {k: v.copy() for k, v in p0.items()}
    state, folds = acc.init(p), 0
    for g, pj in zip(grads, theirs):
        due, h = la.hessian_due(state), curvature(p)
        p, state = acc.update(p, g, state)
        if due and state.applied:
            assert la.update_hessian(state, h) is state
            folds += 1
        assert isinstance(state, AccumulateState)
        assert err(p, pj.fast) <= 1e-12 and err(la.slow_params(state), pj.slow) <= 1e-12
    assert folds == 4


def test_optax_transformation_of_lookahead_takes_the_estimate():
    """optax_transformation(Lookahead(Sophia, reset_state)) under jax.jit: the Lookahead's
    update_hessian on its OptaxState gives a new one; optax.lookahead(sophia)."""
    p0, grads = problem(3)
    theirs = optax_lookahead(True, p0, grads)
    la = Lookahead(Sophia(0.05, **SOPHIA), 3, 0.5, reset_state=True)
    with jax_float64():
        tx = optax_transformation(la)
        update = jax.jit(tx.update)
        p = jx(p0)
        st, folds = tx.init(p), 0
        for t, g in enumerate(grads):
            due = la.hessian_due(st)
            h = jx(curvature(p))
            u, st = update(jx(g), st, p)
            p = optax.apply_updates(p, u)
            if due:
                st = la.update_hessian(st, h)
                folds += 1
            assert err(p, theirs[t][0]) <= 1e-12, t
    assert folds == 5  # (steps 1, 4, 7, 10, 13: those of 3, 6, ... are dropped by the sync)
    with jax_float64():
        plain = optax_transformation(Sophia(0.05, **SOPHIA)).init(jx(p0))
    with pytest.raises(ValueError, match=r"Lookahead.update_hessian: this opt_state lacks "
                                         r"Lookahead's slots \['slow'\]"):
        la.update_hessian(plain, jx(curvature(p0)))


# -- the outer wrappers ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_schedule_free_sophia_equals_optax(engine):
    p0, grads = problem(4)
    theirs = optax_steps(optax.contrib.schedule_free(optax_sophia(**SOPHIA), 0.05, b1=0.9),
                         p0, grads)
    sf = ScheduleFree(Sophia(0.05, **SOPHIA), b1=0.9)
    with optimizer_engine(engine):
        p = {k: native(engine, v) for k, v in p0.items()}
        state, folds = sf.init(p), 0
        for t, g in enumerate(grads):
            p, state, due = folded_step(sf, p, g, state, engine)
            folds += due
            assert err(p, theirs[t]) <= 1e-12, t
    assert folds == STEPS // 2


def test_mechanize_sophia_equals_optax():
    p0, grads = problem(5)
    theirs = optax_steps(optax.contrib.mechanize(optax_sophia(lr=1.0, **SOPHIA)), p0, grads)
    mech = Mechanize(Sophia(1.0, **SOPHIA))
    p = {k: v.copy() for k, v in p0.items()}
    state = mech.init(p)
    for t, g in enumerate(grads):
        p, state, _ = folded_step(mech, p, g, state)
        assert err(p, theirs[t]) <= 1e-12, t
    assert err(p, p0) > 1e-5  # (Mechanic's scale starts at s_init = 1e-6)


def loss_grads(p: dict) -> dict:
    """The gradient of Σ 0.5·p² + 0.25·p⁴ (NumPy or JAX arrays)."""
    return {k: v + v * v * v if isinstance(v, jax.Array) else np.asarray(v + v * v * v)
            for k, v in p.items()}


def test_sam_sophia_equals_optax_opaque_sam():
    p0, grads = problem(6)
    with jax_float64():
        tx = optax.contrib.sam(optax_sophia(**SOPHIA),
                               optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
                               sync_period=2, opaque_mode=True)
        pj = jx(p0)
        st, theirs = tx.init(pj), []
        for _ in range(8):
            u, st = tx.update(loss_grads(pj), st, pj, grad_fn=lambda q, i: loss_grads(q))
            pj = optax.apply_updates(pj, u)
            theirs.append(pj)
    sam = SAM(Sophia(0.05, **SOPHIA), rho=0.05, eps=0.0)
    p = {k: v.copy() for k, v in p0.items()}
    state = sam.init(p)
    for t in range(8):
        p, state, _ = folded_step(sam, p, loss_grads(p), state,
                                  closure=lambda q: (None, loss_grads(q)))
        assert err(p, theirs[t]) <= 1e-12, t


def test_differentially_private_sophia_equals_optax_chain():
    """Without noise (its stream is optax's only at float32): the clipped mean of the
    per-example gradients into Sophia, chain(differentially_private_aggregate, sophia)."""
    rng = np.random.default_rng(7)
    p0 = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    batches = [{k: rng.normal(size=(5, *s)) for k, s in SHAPES.items()} for _ in range(8)]
    theirs = optax_steps(optax.chain(optax.contrib.differentially_private_aggregate(
        0.8, 0.0, key=0), optax_sophia(**SOPHIA)), p0, batches)
    dp = DifferentiallyPrivate(Sophia(0.05, **SOPHIA), l2_norm_clip=0.8, noise_multiplier=0.0)
    p = {k: v.copy() for k, v in p0.items()}
    state = dp.init(p)
    for t, g in enumerate(batches):
        p, state, _ = folded_step(dp, p, g, state)
        assert err(p, theirs[t]) <= 1e-12, t


# -- optax's win rate ----------------------------------------------------------------------------
WIN = {"update_interval": 2, "gamma": 0.2, "beta2": 0.5}  # (γ·ν near |m̂|: some clipped)


def printed_win_rates(capfd, wrap, p0: dict, grads: list, lookahead: bool) -> list[float]:
    """What optax's ``verbose`` sophia prints every step (``print_win_rate_every_n_steps=1``),
    inside ``wrap``."""
    capfd.readouterr()
    with jax_float64():
        tx = wrap(optax_sophia(**WIN, verbose=True, print_win_rate_every_n_steps=1))
        p = optax.LookaheadParams.init_synced(jx(p0)) if lookahead else jx(p0)
        st = tx.init(p)
        for g in grads:
            u, st = tx.update(jx(g), st, p)
            p = optax.apply_updates(p, u)
        jax.effects_barrier()
    out = capfd.readouterr().out
    return [float(x) for x in re.findall(r"Sophia optimizer win rate: (\S+)", out)]


@pytest.mark.parametrize("engine", ["numpy", "torch", "jax-jit"])
def test_win_rate_is_what_optax_prints(capfd, engine):
    """Sophia's and Lookahead(Sophia)'s win_rate after each update (before and after the
    fold: the same, the ν that step read) against optax's printed numbers, same run. With
    ``reset_state`` a sync step restarts the inner state (optax prints that step's rate
    before its re-init): its win rate is refused, the others' are optax's."""
    p0, grads = problem(8)
    for wrap, opt in ((lambda tx: tx, Sophia(0.05, **WIN)),
                      (lambda tx: optax.lookahead(tx, 3, 0.5),
                       Lookahead(Sophia(0.05, **WIN), 3, 0.5)),
                      (lambda tx: optax.lookahead(tx, 4, 0.5, reset_state=True),
                       Lookahead(Sophia(0.05, **WIN), 4, 0.5, reset_state=True))):
        theirs = printed_win_rates(capfd, wrap, p0, grads, isinstance(opt, Lookahead))
        ours = []
        with optimizer_engine(engine):
            p = {k: native(engine, v) for k, v in p0.items()}
            state = opt.init(p)
            for t, g in enumerate(grads, 1):
                due = opt.hessian_due(state)
                h = curvature({k: host(v) for k, v in p.items()})
                p, state = opt.update(p, {k: native(engine, v) for k, v in g.items()}, state)
                if getattr(opt, "reset_state", False) and t % 4 == 0:
                    with pytest.raises(ValueError, match="the last step restarted"):
                        opt.win_rate(state)
                    ours.append(theirs[t - 1])
                    continue
                before = opt.win_rate(state)
                if due:
                    state = opt.update_hessian(state, {k: native(engine, v)
                                                       for k, v in h.items()})
                assert opt.win_rate(state) == before
                ours.append(before)
        assert len(theirs) == STEPS
        assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-12, (ours, theirs)
        assert max(ours) < 1 and len(set(ours)) > 3 and sum(r > 0 for r in ours) >= 10


def test_optax_printing_arguments_point_to_win_rate():
    for kw in ({"verbose": True}, {"print_win_rate_every_n_steps": 10}):
        with pytest.raises(TypeError, match=r"is optax's, not taken here: .*win_rate\(state\)"):
            Sophia(**kw)


def test_win_rate_reads_each_group_and_is_refused_without_a_clip():
    """A group's gamma counts for its parameters (the share over all of them, from the
    state's m and ν by hand); a clip_threshold of None has no win rate."""
    p0, grads = problem(9, steps=3)
    opt = Sophia(0.05, **WIN, param_groups=[{"params": ["b"], "gamma": 0.5}])
    state = opt.init({k: v.copy() for k, v in p0.items()})
    p, state, _ = folded_step(opt, {k: v.copy() for k, v in p0.items()}, grads[0], state)
    p, state, _ = folded_step(opt, p, grads[1], state)
    m, nu = state.slot("m"), state.slot("nu")
    bc1 = 1 - opt.beta1 ** 2
    won = sum(int((np.abs(m[k] / bc1 / np.maximum(gam * nu[k], 1e-8)) < 1.0).sum())
              for k, gam in (("w", 0.2), ("s", 0.2), ("b", 0.5)))
    assert opt.win_rate(state) == won / 17
    with pytest.raises(ValueError, match="clip_threshold=None clips nothing"):
        Sophia(clip_threshold=None).win_rate(state)
    fresh = Sophia(0.05, **WIN)
    with pytest.raises(ValueError, match="win_rate: no step taken yet"):
        fresh.win_rate(fresh.init({k: v.copy() for k, v in p0.items()}))


# -- checkpoints ---------------------------------------------------------------------------------
def wrapped(kind: str):
    if kind == "lookahead":
        return Lookahead(Sophia(0.05, **SOPHIA), 3, 0.5, reset_state=True)
    if kind == "schedule_free":
        return ScheduleFree(Sophia(0.05, **SOPHIA))
    return Mechanize(Sophia(1.0, **SOPHIA))


@pytest.mark.parametrize("kind", ["lookahead", "schedule_free", "mechanize"])
def test_checkpoint_of_a_wrapped_sophia_resumes_bit_for_bit(tmp_path, kind):
    p0, grads = problem(10)
    opt = wrapped(kind)
    p, state, whole = {k: v.copy() for k, v in p0.items()}, None, []
    state = opt.init(p)
    for g in grads:
        p, state, _ = folded_step(opt, p, g, state)
        whole.append({k: v.copy() for k, v in p.items()})
    opt = wrapped(kind)
    p = {k: v.copy() for k, v in p0.items()}
    state = opt.init(p)
    for t, g in enumerate(grads):
        if t == 7:  # (after the fold of step 7: nu is not its start)
            assert np.abs(state.slots["nu"]).max() > 0
            save_checkpoint(tmp_path / "c.safetensors", p, opt, state)
            opt = wrapped(kind)
            got = load_checkpoint(tmp_path / "c.safetensors", p0, opt)
            p, state = got["params"], got["state"]
        p, state, _ = folded_step(opt, p, g, state)
        assert all(np.array_equal(p[k], whole[t][k]) for k in p), t


def test_checkpoint_mid_window_of_accumulate_lookahead_sophia(tmp_path):
    """Accumulate(Lookahead(Sophia), 3) saved after a micro-batch in the middle of a window
    (ν folded in, the buffered gradient kept) resumes bit for bit."""
    p0, grads = problem(17, steps=15)

    def run(p, state, acc, gs):
        la, out = acc.optimizer, []
        for g in gs:
            due, h = la.hessian_due(state), curvature(p)
            p, state = acc.update(p, g, state)
            if due and state.applied:
                la.update_hessian(state, h)
            out.append({k: v.copy() for k, v in p.items()})
        return p, state, out

    def make():
        return Accumulate(Lookahead(Sophia(0.05, **SOPHIA), 2, 0.5), 3)

    acc = make()
    _, _, whole = run({k: v.copy() for k, v in p0.items()}, acc.init(p0), acc, grads)
    acc = make()
    p, state, first = run({k: v.copy() for k, v in p0.items()}, acc.init(p0), acc, grads[:8])
    assert state.accumulator.count == 2 and np.abs(state.inner.slots["nu"]).max() > 0
    save_checkpoint(tmp_path / "c.safetensors", p, acc, state)
    acc = make()
    got = load_checkpoint(tmp_path / "c.safetensors", p0, acc)
    _, _, rest = run(got["params"], got["state"], acc, grads[8:])
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first + rest, whole) for k in a)


def test_state_dict_of_lookahead_sophia_resumes_bit_for_bit_on_torch():
    p0, grads = problem(11)
    la = Lookahead(Sophia(0.05, **SOPHIA), 3, 0.5)
    p = {k: torch.tensor(v) for k, v in p0.items()}
    state, whole = la.init(p), []
    for g in grads:
        p, state, _ = folded_step(la, p, g, state, "torch")
        whole.append({k: host(v) for k, v in p.items()})
    p = {k: torch.tensor(v) for k, v in p0.items()}
    state = la.init(p)
    for t, g in enumerate(grads):
        if t == 5:
            saved = copy.deepcopy(la.state_dict(state))
            la = Lookahead(Sophia(), 6, 0.1)
            p = {k: torch.tensor(host(v)) for k, v in p.items()}
            state = la.load_state_dict(saved, p)
        p, state, _ = folded_step(la, p, g, state, "torch")
        assert all(np.array_equal(host(p[k]), whole[t][k]) for k in p), t


# -- refusals ------------------------------------------------------------------------------------
def snapshot(state) -> tuple:
    return (state.kind, state.step, sorted(state.slots), dict(state.values),
            {k: host(v).copy() for k, v in state.slots.items()}, sorted(state.__dict__))


def same(a: tuple, b: tuple) -> bool:
    return a[:4] == b[:4] and a[5] == b[5] and all(
        np.array_equal(a[4][k], b[4][k], equal_nan=True) for k in a[4])


def stepped(opt, steps: int = 1):
    p0, grads = problem(12, steps=steps)
    p = {k: v.copy() for k, v in p0.items()}
    state = opt.init(p)
    for g in grads:
        p, state, _ = folded_step(opt, p, g, state)
    return p, state


def test_a_wrapper_holding_no_sophia_refuses_by_name():
    for opt, who, held in ((Lookahead(Adam(0.1)), "Lookahead", "inner Adam"),
                           (ScheduleFree(Adam(0.1, beta1=0.0)), "ScheduleFree",
                            "base_optimizer Adam")):
        p = {k: v.copy() for k, v in problem(0)[0].items()}
        state = opt.init(p)
        before = snapshot(state)
        for name, args in (("hessian_due", ()), ("win_rate", ()),
                           ("update_hessian", (curvature(p),))):
            with pytest.raises(TypeError, match=rf"{who}\.{name}: its {held} takes no Hessian"):
                getattr(opt, name)(state, *args)
        assert same(snapshot(state), before)
    with pytest.raises(TypeError, match="Muon cannot hold a Sophia"):
        Muon(0.01, fallback=Sophia())


def test_bad_calls_through_a_wrapper_change_nothing():
    la = Lookahead(Sophia(0.05, **SOPHIA), 3, 0.5, reset_state=True)
    p, state = stepped(la, 3)  # (step 3: a sync, which restarts the inner state)
    h = curvature(p)
    before = snapshot(state)
    with pytest.raises(ValueError, match="restarted the held optimizer's state"):
        la.update_hessian(state, h)
    with pytest.raises(ValueError, match="Lookahead.win_rate: the last step restarted"):
        la.win_rate(state)
    with pytest.raises(ValueError, match="made by a Lookahead, not by this Sophia"):
        la.inner.update_hessian(state, h)
    with pytest.raises(ValueError, match="ScheduleFree.update_hessian: state was made by "
                                         "Lookahead"):
        ScheduleFree(Sophia(0.05, **SOPHIA)).update_hessian(state, h)
    with pytest.raises(TypeError, match="Lookahead.hessian_due: state must be what "
                                        "Lookahead.init returned"):
        la.hessian_due({"nu": 1})
    assert same(snapshot(state), before)
    la = Lookahead(Sophia(0.05, **SOPHIA), 3, 0.5)
    p, state = stepped(la, 2)  # (step 2: not due; step 1's estimate folded in)
    before = snapshot(state)
    with pytest.raises(ValueError, match=r"step 2\) is not one that takes an estimate"):
        la.update_hessian(state, h)
    assert same(snapshot(state), before)
    p0, grads = problem(13, steps=1)
    state = la.init({k: v.copy() for k, v in p0.items()})
    p, state = la.update({k: v.copy() for k, v in p0.items()}, grads[0], state)
    before = snapshot(state)
    with pytest.raises(KeyMismatchError, match=r"missing \['b'\], unknown \['x'\]"):
        la.update_hessian(state, {"w": h["w"], "s": h["s"], "x": h["b"]})
    assert same(snapshot(state), before)
    assert la.update_hessian(state, curvature(p0)) is state
    before = snapshot(state)
    with pytest.raises(ValueError, match="step 1's estimate is already folded in"):
        la.update_hessian(state, h)
    assert same(snapshot(state), before)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_accumulate_of_sophia_takes_the_estimate_itself_as_optax_multisteps(engine):
    """Accumulate(Sophia, 3): optax.MultiSteps(sophia, 3). The Accumulate's own hessian_due /
    update_hessian (what a generic loop calls): due on the window's last call when the
    window's step is a due one, the estimate folded after it; refused after a call that
    only buffered, nothing changed."""
    p0, grads = problem(5, steps=18)
    with jax_float64():
        tx = optax.MultiSteps(optax_sophia(**SOPHIA), 3, accumulator_dtype=jnp.float64)
    theirs = optax_steps(tx, p0, grads)
    with optimizer_engine(engine):
        acc = Accumulate(Sophia(0.05, **SOPHIA), 3)
        p = {k: native(engine, v.copy()) for k, v in p0.items()}
        state, dues = acc.init(p), []
        for i, (g, pj) in enumerate(zip(grads, theirs)):
            due = acc.hessian_due(state)
            dues.append(due)
            h = {k: native(engine, v)
                 for k, v in curvature({k: host(v) for k, v in p.items()}).items()}
            p, state = acc.update(p, {k: native(engine, v) for k, v in g.items()}, state)
            if due:
                assert acc.update_hessian(state, h) is state
            elif not state.applied:
                nu = {k: host(v).copy() for k, v in state.inner.slot("nu").items()}
                with pytest.raises(ValueError, match=r"only buffered its micro-batch \(\d of 3"):
                    acc.update_hessian(state, h)
                assert err(state.inner.slot("nu"), nu) == 0
            assert err(p, pj) <= 1e-12, i
    # windows end on calls 3, 6, ...; Sophia's count 0, 2, 4 (update_interval 2) is due
    assert [i for i, d in enumerate(dues) if d] == [2, 8, 14]
    assert 0.0 <= acc.win_rate(state) <= 1.0
