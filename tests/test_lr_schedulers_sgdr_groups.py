"""``sgdr_schedule`` per parameter group, as the other schedulers act per group (one lane for
the optimizer's own parameters, then one per ``param_groups[i]``): ``per_group=True``, a cycle
value as a list (one per lane), or one cycle list per lane. Side by side with optax: each
lane's rate is ``optax.sgdr_schedule(that lane's cycles)`` at every step (float64, relative
1e-12), and SGD with momentum through the groups is ``optax.multi_transform`` of one
``optax.sgd(sgdr_schedule(...), momentum)`` per label at every step; a mid-run state dict
round trip goes on as the unbroken run; bad input is named and changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from optimizer_parity import jax_float64, rel_err
from scheduler_parity import FakeOpt

import mithril.utils.optimizers as mo
from mithril.utils.lr_schedulers import sgdr_schedule

TOL = 1e-12
N = 130  # steps: past the end of every schedule below
SHAPES = {"w": (3, 4), "b": (4,), "e": (2, 2), "s": ()}
LABELS = {"w": "own", "s": "own", "b": "g0", "e": "g1"}  # w, s in no group
GROUPS = [{"params": "^b$"}, {"params": "^e$"}]

C_A = [dict(init_value=0.0, peak_value=0.1, warmup_steps=10, decay_steps=50, end_value=1e-3),
       dict(init_value=0.002, peak_value=0.05, warmup_steps=5, decay_steps=40, end_value=1e-4,
            exponent=2.0)]
C_B = [dict(init_value=0.01, peak_value=0.03, warmup_steps=0, decay_steps=30),
       dict(init_value=0.0, peak_value=0.2, warmup_steps=7, decay_steps=8, exponent=3.0),
       dict(init_value=0.05, peak_value=0.04, warmup_steps=4, decay_steps=60, end_value=0.01)]
C_C = [dict(init_value=0.3, peak_value=0.2, warmup_steps=3, decay_steps=100, exponent=0.5)]
#: values as lists, one per lane: each lane's cycles differ in every value
LISTED = [dict(init_value=[0.0, 0.01, 0.02], peak_value=[0.1, 0.02, 0.3],
               warmup_steps=[10, 0, 4], decay_steps=[50, 20, 33], end_value=1e-3),
          dict(init_value=0.002, peak_value=[0.05, 0.07, 0.01], warmup_steps=5,
               decay_steps=40, exponent=[2.0, 1.0, 0.7])]

#: name -> (cosine_kwargs, per_group, each lane's optax cycles)
CASES = {
    "per_group=True": (C_A, True, [C_A, C_A, C_A]),
    "listed values": (LISTED, False, [[{k: v[j] if isinstance(v, list) else v
                                        for k, v in c.items()} for c in LISTED]
                                      for j in range(3)]),
    "one list per lane": ([C_A, C_B, C_C], False, [C_A, C_B, C_C]),
}


def optax_rates(cycles: list[dict]) -> list[float]:
    """``optax.sgdr_schedule(cycles)`` at the counts 0 .. N, float64."""
    import jax.numpy as jnp
    import optax

    with jax_float64():
        f = optax.sgdr_schedule(cycles)
        return [float(f(jnp.asarray(t))) for t in range(N + 1)]


def group_rates(opt: mo.Optimizer) -> list[float]:
    """The rate each lane's parameters are updated with: the optimizer's, each group's."""
    return [opt.get_learning_rate(),
            *(opt.hyperparameter("learning_rate", group=i).get_learning_rate()
              for i in range(len(opt.param_groups)))]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300) if b else abs(a)


@pytest.mark.parametrize("case", list(CASES))
def test_every_lane_is_optax_sgdr_of_its_cycles(case):
    kwargs, per_group, lanes = CASES[case]
    want = [optax_rates(c) for c in lanes]
    opt = mo.SGD(0.7, param_groups=GROUPS)  # (its rate is not used: the cycles are absolute)
    sched = sgdr_schedule(opt, kwargs, per_group=per_group)
    assert sched.per_group
    for t in range(N + 1):
        if t:
            sched.step()
        for j, (got, eff) in enumerate(zip(sched.get_last_lrs(), group_rates(opt), strict=True)):
            assert rel(got, want[j][t]) <= TOL, (case, t, j, got, want[j][t])
            assert rel(eff, want[j][t]) <= TOL, (case, t, j, eff, want[j][t])
        assert sched.get_lrs_at(t) == sched.get_last_lrs()


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 3)) for k, s in SHAPES.items()}
             for t in range(N)]
    return p0, grads


def optax_params(lanes: list[list[dict]], p0: dict, grads: list, momentum: float) -> list:
    """``optax.multi_transform`` of ``optax.sgd(sgdr_schedule(lane cycles), momentum)`` per
    label, float64: the parameters after every update."""
    import jax.numpy as jnp
    import optax

    def at_int64(f):  # optax's step count is int32, and sgdr of an int32 count is float32
        return lambda count: f(count.astype(jnp.int64))  # (0.01000001 at count 1, not 0.01)

    with jax_float64():
        tx = optax.multi_transform(
            {lab: optax.sgd(at_int64(optax.sgdr_schedule(c)), momentum=momentum)
             for lab, c in zip(("own", "g0", "g1"), lanes)}, LABELS)
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        state = tx.init(params)
        out = []
        for g in grads:
            upd, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
            params = optax.apply_updates(params, upd)
            out.append({k: np.asarray(v) for k, v in params.items()})
        return out


@pytest.mark.parametrize("case", list(CASES))
def test_sgd_through_the_groups_is_optax_multi_transform(case):
    """Ours: SGD with momentum 0.9 through the groups, the scheduler stepped after each
    update; optax: one ``sgd(sgdr_schedule(lane cycles), momentum=0.9)`` per label (its
    ``trace`` sums the gradients and the rate scales it, as ours): the parameters at every
    one of the 130 updates."""
    kwargs, per_group, lanes = CASES[case]
    p0, grads = problem(1)
    want = optax_params(lanes, p0, grads, 0.9)
    opt = mo.SGD(0.7, momentum=0.9, param_groups=GROUPS)
    sched = sgdr_schedule(opt, kwargs, per_group=per_group)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for t, g in enumerate(grads):
        params, state = opt.update(params, g, state)
        sched.step()
        for k in SHAPES:
            err = rel_err(params[k], want[t][k])  # (elementwise, near-zero ones vs the scale)
            assert err <= TOL, (case, t, k, err)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("at", [7, 55, 100])
def test_state_dict_round_trip_mid_run(case, at):
    """``at`` steps, the scheduler's state dict; a new optimizer and a scheduler built with
    the same arguments load it (every lane) and go on as optax."""
    kwargs, per_group, lanes = CASES[case]
    want = [optax_rates(c) for c in lanes]
    opt = mo.SGD(0.7, param_groups=GROUPS)
    sched = sgdr_schedule(opt, kwargs, per_group=per_group)
    for _ in range(at):
        sched.step()
    sd = sched.state_dict()
    assert len(sd["groups"]) == 2
    opt2 = mo.SGD(0.3, param_groups=GROUPS)
    sched2 = sgdr_schedule(opt2, kwargs, per_group=per_group)
    sched2.load_state_dict(sd)
    assert sched2.get_last_lrs() == sched.get_last_lrs()
    assert group_rates(opt2) == group_rates(opt)
    for t in range(at + 1, N + 1):
        sched2.step()
        for j, eff in enumerate(group_rates(opt2)):
            assert rel(eff, want[j][t]) <= TOL, (case, at, t, j)


def test_one_lane_without_groups_is_the_plain_schedule():
    """An optimizer without param_groups has one lane: ``per_group=True`` is the plain
    schedule, step for step."""
    a, b = mo.SGD(0.7), mo.SGD(0.7)
    s1, s2 = sgdr_schedule(a, C_B), sgdr_schedule(b, C_B, per_group=True)
    want = optax_rates(C_B)
    for t in range(N + 1):
        if t:
            s1.step()
            s2.step()
        assert a.get_learning_rate() == b.get_learning_rate()
        assert rel(b.get_learning_rate(), want[t]) <= TOL


@pytest.mark.parametrize(("kwargs", "per_group", "err", "words"), [
    ([dict(C_A[0], peak_value=[0.1, 0.2])], False, ValueError,
     r"cosine_kwargs\[0\]\['peak_value'\] has 2 values; it needs one per parameter group, 3"),
    ([C_A, C_B], False, ValueError, "has 2 cycle lists; per group it needs one per"),
    ([C_A, [], C_C], False, ValueError, r"cosine_kwargs\[1\] must hold at least one cycle"),
    ([C_A, C_B, [dict(C_C[0], decay_steps=2)]], False, ValueError,
     r"cosine_kwargs\[2\]\[0\]\['decay_steps'\]"),
    ([dict(C_A[0], warmup_steps=[10, 60, 3])], False, ValueError,
     r"cosine_kwargs\[0\] \(lane 1\)\['decay_steps'\]"),
    ([dict(C_A[0], peak_value=[0.1, 0.2, -1.0])], False, ValueError, "peak_value"),
    (C_A, "yes", TypeError, "per_group must be a bool"),
])
def test_bad_input_is_named_and_changes_nothing(kwargs, per_group, err, words):
    opt = mo.SGD(0.7, param_groups=[dict(GROUPS[0], learning_rate=0.2), GROUPS[1]])
    before = group_rates(opt)
    with pytest.raises(err, match=words):
        sgdr_schedule(opt, kwargs, per_group=per_group)
    assert group_rates(opt) == before


def test_per_group_needs_a_mithril_optimizer():
    o = FakeOpt(0.5)
    with pytest.raises(TypeError, match="per_group needs a mithril optimizer"):
        sgdr_schedule(o, C_A, per_group=True)
    assert o.get_learning_rate() == 0.5


def test_checkpoint_with_the_scheduler_goes_on_as_optax(tmp_path):
    """``save_checkpoint`` of SGD (momentum) and a per-lane sgdr after 40 updates;
    ``load_checkpoint`` into a new optimizer and scheduler built with the same arguments: the
    remaining updates are optax ``multi_transform``'s, as the unbroken run's bit for bit."""
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    kwargs, per_group, lanes = CASES["one list per lane"]
    p0, grads = problem(2)
    want = optax_params(lanes, p0, grads, 0.9)
    opt = mo.SGD(0.7, momentum=0.9, param_groups=GROUPS)
    sched = sgdr_schedule(opt, kwargs, per_group=per_group)
    params, state = dict(p0), opt.init(dict(p0))
    for g in grads[:40]:
        params, state = opt.update(params, g, state)
        sched.step()
    save_checkpoint(tmp_path / "c.mtl", params, opt, state, scheduler=sched)
    opt2 = mo.SGD(0.1, momentum=0.9, param_groups=GROUPS)
    sched2 = sgdr_schedule(opt2, kwargs, per_group=per_group)
    got = load_checkpoint(tmp_path / "c.mtl", params, opt2, scheduler=sched2)
    assert group_rates(opt2) == group_rates(opt)
    p1, s1, p2, s2 = params, state, got["params"], got["state"]
    for t, g in enumerate(grads[40:], 40):
        p1, s1 = opt.update(p1, g, s1)
        sched.step()
        p2, s2 = opt2.update(p2, g, s2)
        sched2.step()
        for k in SHAPES:
            assert np.array_equal(p1[k], p2[k]), (t, k)
            assert rel_err(p2[k], want[t][k]) <= TOL, (t, k)
