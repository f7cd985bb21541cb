"""An optax power user's composed optimizers, Mithril's way and optax's way side by side
(float64, 12+ steps, NumPy, torch and JAX): ``chain(clip_by_global_norm, scale_by_adam,
add_decayed_weights, scale_by_learning_rate)`` as ``AdamW(clip_norm=c, clip_eps=0.0)``,
``MultiSteps`` as ``Accumulate``, wrappers two deep (``lookahead`` of ``MultiSteps``,
``MultiSteps`` of ``apply_if_finite`` with a NaN micro-batch, ``MultiSteps`` of
``contrib.sam``), a schedule and an inner hyperparameter changed mid-run through two
wrappers, state dicts of nested wrappers mid-window, our transformation inside the user's
``optax.chain``, ``zero_nans``; and the torch user's accumulation by hand with
``clip_grad_norm_`` / ``clip_grad_value_``."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib as oc
import pytest
import torch
from conftest import jax_float64

from mithril.interop import optax_transformation
from mithril.utils.accumulation import Accumulate
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.optimizers import SAM, Adam, AdamW, Lookahead, ScheduleFree, ScheduleFreeAdamW
from mithril.utils.optimizers.clipping import zero_nans

BACKENDS = ("numpy", "torch", "jax")
LR, WD, C, K = 0.05, 0.1, 1.0, 3
TOL = 1e-12
P0 = {"w": np.random.default_rng(0).standard_normal((4, 3)),
      "b": np.random.default_rng(1).standard_normal(3)}


def grad(p: dict, t: Any, xp: Any = np) -> dict:
    """A gradient of the params (NumPy, or traced ``jnp`` with ``xp=jnp``), some steps large
    enough for the clip to act."""
    f = xp.where(t % 3 == 0, 3.0, 0.2) if xp is jnp else (3.0 if t % 3 == 0 else 0.2)
    return {k: xp.sin(3 * v + t) * f + 0.1 * v ** 3 for k, v in p.items()}


def to(x: Any, kind: str) -> Any:
    if kind == "torch":
        return torch.tensor(np.array(x))
    if kind == "jax":
        return jnp.asarray(np.array(x))
    return np.array(x)


def host(x: Any) -> np.ndarray:
    return x.detach().numpy().copy() if hasattr(x, "detach") else np.array(x)


def ours(opt: Any, kind: str, steps: int, bad: int | None = None, each: Any = None,
         closure: bool = False) -> tuple[list, Any]:
    """The params after each of ``steps`` updates of ``opt`` (``bad``: a NaN in that step's
    gradient; ``each(t, state)`` after each update; ``closure``: SAM's, the same gradient)."""
    p = {k: to(v, kind) for k, v in P0.items()}
    state, out = opt.init(p), []
    for t in range(steps):
        g = grad({k: host(v) for k, v in p.items()}, t)
        if t == bad:
            g["w"][1, 1] = np.nan
        kw = {}
        if closure:
            kw["closure"] = lambda q, t=t: (None, {k: to(v, kind) for k, v in grad(
                {n: host(a) for n, a in q.items()}, t).items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (the NaN step's report)
            p, state = opt.update(p, {k: to(v, kind) for k, v in g.items()}, state, **kw)
        if each is not None:
            each(t, state)
        out.append({k: host(v) for k, v in p.items()})
    return out, state


_REFS: dict[Any, tuple[list, Any]] = {}


def theirs(tx: Any, steps: int, bad: int | None = None, each: Any = None,
           lookahead: bool = False, grad_fn: bool = False, key: Any = None
           ) -> tuple[list, Any]:
    """optax's trajectory of ``tx`` on the same gradients, its update jitted
    (``each(t, state) -> state`` before each update; ``lookahead``: params as
    ``LookaheadParams``, the fast ones compared; ``grad_fn``: SAM's, the same gradient).
    ``key``: computed once per module under it (the backends' tests share it)."""
    if key is not None and key in _REFS:
        return _REFS[key]
    p = {k: jnp.asarray(v) for k, v in P0.items()}
    if lookahead:
        p = optax.LookaheadParams.init_synced(p)

    @jax.jit
    def step(g: Any, state: Any, p: Any, t: Any) -> Any:
        kw = {"grad_fn": lambda q, _: grad(q, t, jnp)} if grad_fn else {}
        u, state = tx.update(g, state, p, **kw)
        return optax.apply_updates(p, u), state

    state, out = tx.init(p), []
    for t in range(steps):
        if each is not None:
            state = each(t, state)
        fast = p.fast if lookahead else p
        g = grad({k: np.asarray(v) for k, v in fast.items()}, t)
        if t == bad:
            g["w"][1, 1] = np.nan
        p, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p, t)
        out.append({k: np.asarray(v) for k, v in (p.fast if lookahead else p).items()})
    if key is not None:
        _REFS[key] = out, state
    return out, state


def gap(a: list, b: list) -> float:
    """The largest |a − b| over every step and tensor (NaN where the NaNs differ)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for k in x:
            if not np.array_equal(np.isnan(x[k]), np.isnan(y[k])):
                return float("nan")
            d = np.abs(x[k] - y[k])[~np.isnan(x[k])]
            worst = max(worst, float(d.max()) if d.size else 0.0)
    return worst


def users_chain(lr: Any = LR) -> Any:
    return optax.chain(optax.clip_by_global_norm(C), optax.scale_by_adam(),
                       optax.add_decayed_weights(WD), optax.scale_by_learning_rate(lr))


def adamw(**kw: Any) -> AdamW:
    return AdamW(learning_rate=LR, weight_decay=WD, clip_norm=C, clip_eps=0.0, **kw)


def multisteps(inner: Any, k: int = K) -> Any:
    """``MultiSteps`` accumulating in float64, as ours keeps the gradients' dtype."""
    return optax.MultiSteps(inner, k, accumulator_dtype=jnp.float64)


# -- the user's chain and MultiSteps --------------------------------------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_the_users_chain_and_its_multisteps(kind):
    with jax_float64():
        ref, _ = theirs(users_chain(), 12, key="chain")
        assert gap(ours(adamw(), kind, 12)[0], ref) <= TOL
        ref, _ = theirs(multisteps(users_chain()), 12, key="multisteps")
        got, state = ours(Accumulate(adamw(), K), kind, 12)
        assert gap(got, ref) <= TOL and (state.windows, state.step) == (4, 4)
        # MultiSteps' own default accumulates float64 gradients in float32: ~1e-9 off
        ref32, _ = theirs(optax.MultiSteps(users_chain(), K), 12, key="multisteps32")
        assert 1e-11 < gap(got, ref32) < 1e-6


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_whole_clipping_chain_under_multisteps(kind):
    """``MultiSteps(chain(centralize, adaptive_grad_clip, clip_by_global_norm, clip,
    scale_by_adam, add_decayed_weights, scale_by_learning_rate))``: one AdamW's options, in
    optax's order, accumulated."""
    with jax_float64():
        tx = multisteps(optax.chain(
            optax.centralize(), optax.adaptive_grad_clip(0.05), optax.clip_by_global_norm(C),
            optax.clip(0.4), optax.scale_by_adam(), optax.add_decayed_weights(WD),
            optax.scale_by_learning_rate(LR)))
        ref, _ = theirs(tx, 12, key="clips")
        got, _ = ours(Accumulate(adamw(centralize=True, adaptive_clip=0.05, clip_value=0.4),
                                 K), kind, 12)
    assert gap(got, ref) <= TOL


# -- two deep: lookahead of MultiSteps -------------------------------------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_lookahead_of_multisteps_is_accumulate_of_lookahead(kind):
    """optax syncs its lookahead every ``k·s`` calls, mini-steps counted: the ``s``-th
    window's step, as ``Accumulate(Lookahead(opt, s), k)`` syncs."""
    s = 2
    for reset in (False, True):  # (optax's reset clears MultiSteps' state and Adam's count)
        with jax_float64():
            tx = optax.lookahead(multisteps(users_chain()).gradient_transformation(),
                                 sync_period=K * s, slow_step_size=0.5, reset_state=reset)
            ref, _ = theirs(tx, 14, lookahead=True, key=("lookahead", reset))
            got, _ = ours(Accumulate(Lookahead(adamw(), sync_period=s, slow_step_size=0.5,
                                               reset_state=reset), K), kind, 14)
        assert gap(got, ref) <= TOL, reset
    with pytest.raises(TypeError, match=r"Accumulate\(Lookahead\(opt, sync_period=s\), k\)"):
        Lookahead(Accumulate(adamw(), K))


def test_our_lookahead_transformation_in_multisteps_and_tree_set_through_it():
    """``MultiSteps(optax_transformation(Lookahead(opt, s)), k)``: optax's lookahead of
    ``MultiSteps`` (our state moves on emitted windows only); ``optax.tree_utils.tree_set(
    state, learning_rate=...)`` mid-run reaches our rate through ``MultiSteps`` and the
    user's chain as it reaches ``inject_hyperparams(adamw)``'s."""
    with jax_float64():
        ref, _ = theirs(optax.lookahead(multisteps(users_chain()).gradient_transformation(),
                                        sync_period=K * 2, slow_step_size=0.5), 14,
                        lookahead=True, key=("lookahead", False))
        mine = multisteps(optax_transformation(Lookahead(adamw(), sync_period=2,
                                                         slow_step_size=0.5)))
        assert gap(theirs(mine, 14)[0], ref) <= TOL

        def each(t: int, state: Any) -> Any:
            if t == 5:
                return optax.tree_utils.tree_set(state, learning_rate=jnp.float64(0.01))
            return state

        clip = optax.clip_by_global_norm(C)
        a, sa = theirs(multisteps(optax.chain(clip, optax_transformation(
            AdamW(LR, weight_decay=WD)))), 12, each=each)
        b, _ = theirs(multisteps(optax.chain(clip, optax.inject_hyperparams(
            optax.adamw, hyperparam_dtype=jnp.float64)(LR, weight_decay=WD))), 12, each=each)
        assert gap(a, b) <= TOL and float(optax.tree_utils.tree_get(sa, "learning_rate")) == 0.01


# -- a NaN micro-batch: MultiSteps of apply_if_finite ---------------------------------------
def _clear_after_emit(t: int, state: Any) -> Any:
    """optax's state with its accumulator zeroed where a window was just emitted (what
    ours does: a window is emptied after its step, whatever it held)."""
    if t % K == 0 and t:
        return state._replace(acc_grads=jax.tree.map(jnp.zeros_like, state.acc_grads))
    return state


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_nan_micro_batch_skips_its_window_only(kind):
    """NaN in call 4 (window 2): optax's ``MultiSteps(apply_if_finite(chain, 2), 3)`` and
    ``Accumulate(AdamW(nonfinite="skip", max_consecutive_skips=2), 3)`` both skip that
    window. optax clears its accumulator by ``0·acc``, so the NaN stays: every later window
    is skipped, and after two a NaN step is applied (on a mini-step, ``emit·update``); ours
    goes on, as optax does with its accumulator cleared."""
    bad, n = 4, 15
    opt = Accumulate(adamw(nonfinite="skip", max_consecutive_skips=2), K)
    with jax_float64():
        got, state = ours(opt, kind, n, bad=bad)
        ref, rs = theirs(multisteps(optax.apply_if_finite(users_chain(), 2)), n, bad=bad,
                         key="nan")
        fixed, _ = theirs(multisteps(optax.apply_if_finite(users_chain(), 2)), n, bad=bad,
                          each=_clear_after_emit, key="nan_cleared")
    assert gap(got[:8], ref[:8]) <= TOL  # (up to the window after the NaN one)
    assert np.isnan(ref[-1]["w"]).all() and np.isnan(rs.acc_grads["w"]).all()
    assert int(rs.inner_opt_state.total_notfinite) == 4
    assert gap(got, fixed) <= TOL and not np.isnan(got[-1]["w"]).any()
    assert (state.windows, state.step, state.num_skipped) == (5, 4, 1)


def test_our_transformation_in_the_users_multisteps_of_apply_if_finite():
    """``optax_transformation(AdamW(clip_norm=c, clip_eps=0.0))`` in the user's optax
    wrappers, jitted: optax's own chain's numbers, the NaN window skipped alike."""
    with jax_float64():
        a, sa = theirs(multisteps(optax.apply_if_finite(optax_transformation(
            adamw(nonfinite="skip")), 5)), 12, bad=4)
        b, _ = theirs(multisteps(optax.apply_if_finite(users_chain(), 5)), 12, bad=4)
    assert gap(a, b) <= TOL and int(sa.inner_opt_state.total_notfinite) == 3


# -- a schedule and an inner hyperparameter through two wrappers ----------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_a_schedule_and_beta1_changed_mid_run_through_two_wrappers(kind):
    """``StepLR`` on ``Accumulate(Lookahead(AdamW))``, stepped after applied windows, and
    ``beta1`` set on the accumulating wrapper's optimizer mid-run: optax's
    ``lookahead(MultiSteps(chain(clip, inject_hyperparams(adamw)(schedule))))`` with its
    ``b1`` written into the state."""
    changes, n = {9: 0.5, 15: 0.7}, 24
    # (optax.exponential_decay(LR, 2, 0.5, staircase=True) is float32 from its int32 count
    # whatever hyperparam_dtype says, 1e-9 off: the same schedule in float64)
    sched = lambda count: jnp.float64(LR) * jnp.float64(0.5) ** (count // 2)  # noqa: E731

    def set_b1(t: int, state: Any) -> Any:
        if t in changes:
            hp = state.fast_state.inner_opt_state[1].hyperparams
            hp["b1"] = jnp.asarray(changes[t], jnp.float64)
        return state

    with jax_float64():
        inner = optax.chain(optax.clip_by_global_norm(C), optax.inject_hyperparams(
            optax.adamw, hyperparam_dtype=jnp.float64)(learning_rate=sched, weight_decay=WD))
        tx = optax.lookahead(multisteps(inner).gradient_transformation(), sync_period=K * 2,
                             slow_step_size=0.5)
        ref, _ = theirs(tx, n, each=set_b1, lookahead=True, key="schedule")
        acc = Accumulate(Lookahead(adamw(), sync_period=2, slow_step_size=0.5), K)
        scheduler = StepLR(acc, step_size=2, gamma=0.5)

        def each(t: int, state: Any) -> None:
            if state.applied and not state.last_step_skipped:
                scheduler.step()
            if t + 1 in changes:
                acc.optimizer.beta1 = changes[t + 1]

        got, _ = ours(acc, kind, n, each=each)
    assert gap(got, ref) <= TOL
    assert acc.beta1 == 0.7 and acc.get_learning_rate() == LR * 0.5 ** 4


def test_an_inner_hyperparameter_set_on_the_accumulating_wrapper():
    """``acc.beta1 = x`` around a Lookahead (or SAM) was kept on the Accumulate, changing no
    step, and ``acc.beta1`` raised: now it is read from the wrapped optimizer's inner one
    and setting it is refused, naming where it goes, with nothing changed."""
    for wrapped in (Lookahead(adamw()), SAM(Adam(LR))):
        acc = Accumulate(wrapped, K)
        assert acc.beta1 == 0.9
        with pytest.raises(AttributeError, match=r"acc\.optimizer\.beta1 = "):
            acc.beta1 = 0.5
        assert "beta1" not in vars(acc) and acc.beta1 == 0.9
    assert acc.rho == 0.05


@pytest.mark.parametrize("kind", BACKENDS)
def test_sam_reaches_its_base_hyperparameters(kind):
    """``sam.beta1`` is the base's (was an AttributeError; setting it was refused as a name
    no step reads): set mid-run, optax's ``contrib.sam(inject_hyperparams(adam))`` with its
    ``b1`` written into the state; a bad value refused by the base, nothing changed."""
    with jax_float64():
        outer = optax.inject_hyperparams(optax.adam)(learning_rate=LR, b1=0.9)
        adv = optax.chain(oc.normalize(), optax.sgd(0.3))
        tx = oc.sam(outer, adv, sync_period=2, opaque_mode=True)

        def set_b1(t: int, state: Any) -> Any:
            if t == 5:
                state.opt_state.hyperparams["b1"] = jnp.asarray(0.6, jnp.float64)
            return state

        ref, _ = theirs(tx, 10, each=set_b1, grad_fn=True, key="sam_b1")
        sam = SAM(Adam(LR), rho=0.3, eps=0.0)

        def each(t: int, state: Any) -> None:
            if t == 4:
                sam.beta1 = 0.6

        got, _ = ours(sam, kind, 10, each=each, closure=True)
    assert gap(got, ref) <= TOL
    assert sam.beta1 == sam.base_optimizer.beta1 == 0.6 and "beta1" not in vars(sam)
    with pytest.raises(TypeError, match="beta1"):
        sam.beta1 = "x"
    assert sam.beta1 == 0.6
    sf = ScheduleFree(Adam(LR, beta1=0.0))
    sf.beta2 = 0.99
    assert sf.base_optimizer.beta2 == 0.99 and sf.b1 == 0.9


@pytest.mark.parametrize("kind", BACKENDS)
def test_schedule_free_under_multisteps_and_its_eval_params(kind):
    """``MultiSteps(contrib.schedule_free(adam(b1=0)))`` and ``MultiSteps(contrib.
    schedule_free_adamw)``: ``Accumulate`` of ours, and ``schedule_free_eval_params`` of the
    inner state is ``acc.eval_params(state, params)`` (optax's warm-up schedule is float32
    from its int32 count, 1e-9 off in float64: no warm-up here)."""
    cases = {"wrapper": (lambda: oc.schedule_free(optax.adam(LR, b1=0.0), LR, b1=0.8),
                         lambda: ScheduleFree(Adam(LR, beta1=0.0), b1=0.8)),
             "adamw": (lambda: oc.schedule_free_adamw(LR, weight_decay=0.01),
                       lambda: ScheduleFreeAdamW(LR, weight_decay=0.01, convention="optax"))}
    for name, (tx, opt) in cases.items():
        with jax_float64():
            ref, rs = theirs(multisteps(tx()), 12, key=f"sf_{name}")
            acc = Accumulate(opt(), K)
            got, state = ours(acc, kind, 12)
            last = {k: jnp.asarray(v) for k, v in got[-1].items()}
            want = oc.schedule_free_eval_params(rs.inner_opt_state, last)
            have = acc.eval_params(state, {k: to(v, kind) for k, v in got[-1].items()})
        assert gap(got, ref) <= TOL, name
        assert gap([{k: host(v) for k, v in have.items()}],
                   [{k: np.asarray(v) for k, v in want.items()}]) <= TOL, name


# -- MultiSteps of SAM --------------------------------------------------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_accumulate_of_sam_is_multisteps_of_sam(kind):
    """``Accumulate(SAM(Adam), k)`` takes ``closure=`` (was a bare TypeError), used on the
    window's call: ``MultiSteps(contrib.sam(adam, opaque_mode=True), k)`` with ``grad_fn``."""
    with jax_float64():
        adv = optax.chain(oc.normalize(), optax.sgd(0.3))
        tx = multisteps(oc.sam(optax.adam(LR), adv, sync_period=2,
                                          opaque_mode=True))
        ref, _ = theirs(tx, 12, grad_fn=True, key="multisteps_sam")
        got, state = ours(Accumulate(SAM(Adam(LR), rho=0.3, eps=0.0), K), kind, 12,
                          closure=True)
    assert gap(got, ref) <= TOL and state.step == 4


def test_accumulate_closure_refusals_change_nothing():
    p = {k: v.copy() for k, v in P0.items()}
    acc = Accumulate(SAM(Adam(LR)), 2)
    state = acc.init(p)
    p, state = acc.update(p, grad(p, 0), state)  # (no closure needed mid-window)
    before = {k: v.copy() for k, v in state.accumulator.sum().items()}
    with pytest.raises(TypeError, match="SAM needs closure= on the window's last call"):
        acc.update(p, grad(p, 1), state)
    with pytest.raises(TypeError, match="closure must be callable"):
        acc.update(p, grad(p, 1), state, closure=3)
    assert state.micro_step == 1 and state.windows == 0
    assert all(np.array_equal(before[k], v) for k, v in state.accumulator.sum().items())
    plain = Accumulate(Adam(LR), 2)
    with pytest.raises(TypeError, match="Adam's update takes no closure="):
        plain.update(p, grad(p, 1), plain.init(p), closure=lambda q: None)


# -- state dicts of nested wrappers, mid-window ---------------------------------------------
NESTED = {
    "lookahead": (lambda: Accumulate(Lookahead(adamw(), sync_period=2), K),
                  lambda: Accumulate(Lookahead(AdamW(0.9), sync_period=5), 7)),
    "sam": (lambda: Accumulate(SAM(Adam(LR), rho=0.2), K),
            lambda: Accumulate(SAM(Adam(0.9), rho=0.7), 7)),
    "schedule_free": (lambda: Accumulate(ScheduleFree(Adam(LR, beta1=0.0), b1=0.8), K),
                      lambda: Accumulate(ScheduleFree(Adam(0.9, beta1=0.0)), 7)),
}


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
@pytest.mark.parametrize("name", sorted(NESTED))
def test_nested_wrappers_resume_mid_window_bit_exactly(name, arrays):
    make, other = NESTED[name]
    closure = name == "sam"
    full, _ = ours(make(), "numpy", 11, closure=closure)
    saved = {}

    def keep(t: int, state: Any) -> None:
        if t == 6:  # (a window of 3 holds one micro-batch)
            saved["sd"] = acc.state_dict(state, arrays=arrays)

    acc = make()
    part, _ = ours(acc, "numpy", 7, closure=closure, each=keep)
    fresh = other()
    p = {k: v.copy() for k, v in part[-1].items()}
    state = fresh.load_state_dict(saved["sd"], p)
    assert state.micro_step == 1 and fresh.k == K
    for t in range(7, 11):
        g = grad(p, t)
        kw = {"closure": lambda q, t=t: (None, grad(q, t))} if closure else {}
        p, state = fresh.update(p, g, state, **kw)
    assert all(np.array_equal(p[k], full[-1][k]) for k in p)


# -- our transformations' refusals name optax's composition ---------------------------------
def test_optax_transformation_of_a_wrapper_names_optaxs_composition():
    for wrapper, says in ((Accumulate(adamw(), K), "optax.MultiSteps(optax_transformation"),
                          (SAM(Adam()), "optax.contrib.sam(optax_transformation"),
                          (ScheduleFree(Adam(beta1=0.0)), "optax.contrib.schedule_free")):
        with pytest.raises(TypeError, match=f"overrides update.*{says.replace('(', '.')}"):
            optax_transformation(wrapper)
    with jax_float64():  # (and what it names is the wrapper's trajectory)
        ref, _ = theirs(multisteps(optax_transformation(adamw())), 12)
        assert gap(ours(Accumulate(adamw(), K), "numpy", 12)[0], ref) <= TOL


# -- zero_nans -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_zero_nans_is_optaxs(kind):
    g = {"w": np.array([[1.0, np.nan], [np.inf, -2.0]]), "b": np.array(0.5)}
    with jax_float64():
        u, s = optax.zero_nans().update({k: jnp.asarray(v) for k, v in g.items()},
                                        optax.zero_nans().init(g))
        given = {k: to(v, kind) for k, v in g.items()}
        out, found = zero_nans(given)
    assert all(np.array_equal(host(out[k]), np.asarray(u[k])) for k in g)
    assert found == {k: bool(v) for k, v in s.found_nan.items()} == {"w": True, "b": False}
    assert np.isnan(host(given["w"])[0, 1])  # (the arrays given are untouched)
    with pytest.raises(TypeError, match=r"zero_nans: gradients\['b'\] is a list"):
        zero_nans({"w": given["w"], "b": [1.0]})


# -- torch: accumulation by hand, clip_grad_norm_ and clip_grad_value_ ------------------------
def test_torch_accumulation_by_hand_with_clip_grad_norm_and_value():
    """A torch loop: ``(loss / k).backward()`` per micro-batch, then ``clip_grad_norm_(c)``,
    ``clip_grad_value_(v)`` and ``AdamW(foreach=True).step()``: ``Accumulate(AdamW(clip_norm=c,
    clip_value=v), k)`` (torch's 1e-6 in the norm is our default ``clip_eps``)."""
    ps = [torch.tensor(P0[k], requires_grad=True) for k in ("w", "b")]
    opt = torch.optim.AdamW(ps, lr=LR, weight_decay=WD, foreach=True)
    ref, norms = [], []
    for t in range(12):
        g = grad({"w": ps[0].detach().numpy(), "b": ps[1].detach().numpy()}, t)
        (sum((p * torch.tensor(g[k])).sum() for p, k in zip(ps, ("w", "b"))) / K).backward()
        if (t + 1) % K == 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(ps, C, foreach=True)))
            torch.nn.utils.clip_grad_value_(ps, 0.3, foreach=True)
            opt.step()
            opt.zero_grad()
        ref.append({"w": ps[0].detach().numpy().copy(), "b": ps[1].detach().numpy().copy()})
    seen = []  # (the window's pre-clip norm, as clip_grad_norm_ returns it)
    got, _ = ours(Accumulate(AdamW(learning_rate=LR, weight_decay=WD, clip_norm=C,
                                   clip_value=0.3), K), "torch", 12,
                  each=lambda t, s: s.applied and seen.append(float(s.last_grad_norm)))
    assert gap(got, ref) <= TOL
    np.testing.assert_allclose(seen, norms, rtol=1e-14, atol=0)


# -- Keras: clipping, weight decay and accumulation all set -----------------------------------
@pytest.mark.parametrize("clip", ["global_clipnorm", pytest.param("clipnorm", marks=pytest.mark.slow),
                                  pytest.param("clipvalue", marks=pytest.mark.slow)])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (Keras's own __array__ use)
def test_keras_clip_weight_decay_and_accumulation_together(clip, monkeypatch):
    """``keras.optimizers.AdamW(weight_decay, <clip>, gradient_accumulation_steps=3)``: Keras
    takes the window's mean, clips it, decays the weights, then steps; the same as
    ``Accumulate(AdamW(..., convention="keras", <our clip>), 3)`` (a learning rate and decay
    exact in float32: Keras keeps its learning rate in a float32 variable)."""
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    ours_clip = {"clipnorm": {"clip_tensor_norm": 0.5}, "clipvalue": {"clip_value": 0.5},
                 "global_clipnorm": {"clip_norm": 0.5, "clip_eps": 0.0}}[clip]
    with jax_float64():
        vs = [keras.Variable(P0[k], dtype="float64") for k in ("w", "b")]
        opt = keras.optimizers.AdamW(learning_rate=0.0625, weight_decay=0.125, epsilon=1e-7,
                                     gradient_accumulation_steps=K, **{clip: 0.5})
        opt.build(vs)
        ref = []
        for t in range(12):
            now = {k: np.array(keras.ops.convert_to_numpy(v)) for k, v in zip(("w", "b"), vs)}
            g = grad(now, t)
            opt.apply_gradients([(keras.ops.convert_to_tensor(g[k], "float64"), v)
                                 for k, v in zip(("w", "b"), vs)])
            ref.append({k: np.array(keras.ops.convert_to_numpy(v)) for k, v in zip(("w", "b"), vs)})
    acc = Accumulate(AdamW(learning_rate=0.0625, weight_decay=0.125, epsilon=1e-7,
                           convention="keras", **ours_clip), K)
    assert gap(ours(acc, "numpy", 12)[0], ref) <= TOL
