"""Each average's update count, kept in the optimizer state (``state.averaged``): averaging
settings changed mid-run (``ema_start`` raised, lowered before the EMA's first update or
after it, per parameter group, ``swa_start`` raised, ``ema_decay`` changed) behave as a torch
loop ``if t >= start and t % every == 0: avg.update_parameters(model)`` over ONE
``AveragedModel`` made at the start (its ``n_averaged``: the first update copies, later ones
blend) with the new settings, side by side with torch (Adam, float64, relative error
<= 1e-12) on the NumPy, torch and JAX engines; the count survives a state dict, a
checkpoint, a ``torch_optimizer`` state dict and a sharded checkpoint round trip mid-run;
a state dict without it (an old one) still loads, the count inferred from the step; a bad
one is refused, naming it, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from optimizer_parity import host, init, natives, rel_err
from test_weight_averaging import SHAPES, Net, engine, problem, torch_float64
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import mithril.utils.optimizers as mo
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

TOL = 1e-12
LR = 1e-2
BACKENDS = ("numpy", "torch", "jax", "jax-jit", "torch-ops")
NAMES = list(SHAPES)

#: settings in force at step t (1-based): {group label: {ema_decay, ema_start, ema_every,
#: swa_start}}; the label "all" for an optimizer without groups
Plan = Callable[[int], dict[str, dict]]


def torch_rows(p0: dict, grads: list, plan: Plan, groups: dict[str, list[str]]) -> list:
    """torch Adam with, per group, one EMA ``AveragedModel`` and one SWA ``AveragedModel``
    made before the first step, each updated after step t when t >= its start in
    ``plan(t)`` and t is a multiple of its ``ema_every``, the EMA with ``plan(t)``'s decay.
    Per step: the parameters, the EMA and the SWA average by name."""
    with torch_float64():
        net = Net(p0)
        opt = torch.optim.Adam(net.ps.parameters(), lr=LR)
        subs = {g: torch.nn.ParameterList([p for n, p in zip(NAMES, net.ps) if n in ns])
                for g, ns in groups.items()}
        ema = {g: AveragedModel(s, multi_avg_fn=get_ema_multi_avg_fn(0.5)) for g, s in subs.items()}
        swa = {g: AveragedModel(s) for g, s in subs.items()}
        rows = []
        for t, g in enumerate(grads, 1):
            for p, v in zip(net.ps, g.values()):
                p.grad = torch.tensor(v)
            opt.step()
            row = [{k: p.detach().numpy().copy() for k, p in zip(NAMES, net.ps)}, {}, {}]
            for label, ns in groups.items():
                cfg = plan(t)[label]
                k = cfg.get("ema_every", 1)
                if t >= cfg["ema_start"] and t % k == 0:  # (the decay in force now)
                    ema[label].multi_avg_fn = get_ema_multi_avg_fn(cfg["ema_decay"])
                    ema[label].update_parameters(subs[label])
                if cfg.get("swa_start") is not None and t >= cfg["swa_start"] and t % k == 0:
                    swa[label].update_parameters(subs[label])
                for i, avg in ((1, ema), (2, swa)):
                    row[i].update(zip(ns, (q.detach().numpy().copy() for q in avg[label].module)))
            rows.append(row)
        return rows


def apply(opt: mo.Optimizer, cfg: dict[str, dict], groups: dict[str, list[str]]) -> None:
    """Set ``cfg`` on ``opt``: the optimizer's own settings ("all" or group 0's label
    "rest"), a group's through its hyperparameter handle."""
    for i, label in enumerate(groups):
        for key, v in cfg[label].items():
            if label in ("all", "rest"):
                setattr(opt, key, v)
            else:
                opt.hyperparameter(key, group=i - 1).set_learning_rate(v)


def make(groups: dict[str, list[str]], cfg: dict[str, dict]) -> mo.Adam:
    own = cfg["all" if "all" in groups else "rest"]
    pg = [{"params": [n for n in ns], **cfg[label]} for label, ns in groups.items()
          if label not in ("all", "rest")]
    return mo.Adam(LR, **own, **({"param_groups": pg} if pg else {}))


def ours_rows(backend: str, p0: dict, grads: list, plan: Plan, groups: dict[str, list[str]],
              round_trip: int | None = None) -> list:
    """Ours with ``plan(t)`` set before step t; with ``round_trip``, after that many steps
    the state dict is saved and a new optimizer loads it (the settings come with it)."""
    with engine(backend) as b:
        opt = make(groups, plan(1))
        params = natives(b, p0)
        state = opt.init(params) if backend.startswith("array-") else init(opt, b, params)
        rows = []
        for t, g in enumerate(grads, 1):
            if t == round_trip:
                sd = opt.state_dict(state)
                opt = make(groups, plan(1))
                state = opt.load_state_dict(sd, natives(b, {k: host(v) for k, v in params.items()}))
                params = natives(b, {k: host(v) for k, v in params.items()})
            apply(opt, plan(t), groups)
            params, state = opt.update(params, natives(b, g), state)
            rows.append([{k: host(v) for k, v in params.items()},
                         {k: host(v) for k, v in opt.ema_params(state).items()},
                         {k: host(v) for k, v in opt.swa_params(state).items()}])
        return rows


def listed(counts: dict) -> dict[str, list[int]]:
    """``state.averaged`` (int64 arrays, layout order) as lists."""
    return {k: np.asarray(v).tolist() for k, v in counts.items()}


def check(got: list, want: list, what: str) -> float:
    worst = 0.0
    for t, (g, w) in enumerate(zip(got, want, strict=True), 1):
        for i, part in enumerate(("params", "ema", "swa")):
            for k in NAMES:
                err = rel_err(g[i][k], w[i][k])
                worst = max(worst, err)
                assert err <= TOL, (what, part, t, k, err)
    return worst


ALL = {"all": NAMES}
GROUPS = {"rest": ["w", "big"], "late": ["b", "s"]}


def plan_of(changes: dict[int, dict], base: dict, groups: dict) -> Plan:
    """Settings from ``base`` (per label) changed from the step given on (``changes``:
    step -> {label: {key: value}})."""
    def plan(t: int) -> dict[str, dict]:
        out = {g: dict(base[g]) for g in groups}
        for at in sorted(changes):
            if t >= at:
                for g, kv in changes[at].items():
                    out[g].update(kv)
        return out
    return plan


BASE = {"ema_decay": 0.8, "ema_start": 9, "ema_every": 1, "swa_start": 12}
CASES = {
    # raised before the start: the EMA starts (a copy) at the new start
    "ema_start raised": {3: {"all": {"ema_start": 14}}},
    # lowered to a step already passed before the EMA's first update: the next step copies
    # (it blended the starting copy in: the defect this count fixes)
    "ema_start lowered before start": {5: {"all": {"ema_start": 2}}},
    # lowered once started: nothing changes
    "ema_start lowered after start": {11: {"all": {"ema_start": 2}}},
    # raised once started: the updates pause until it, then go on blending (no restart)
    "ema_start raised after start": {11: {"all": {"ema_start": 15}}},
    # swa_start raised once started: paused, then the mean goes on counting (n_averaged)
    "swa_start raised after start": {14: {"all": {"swa_start": 17}}},
    # swa_start lowered before its start, below the step: the next step is its first
    "swa_start lowered before start": {6: {"all": {"swa_start": 3}}},
    # a new decay weighs the updates from then on
    "ema_decay changed": {12: {"all": {"ema_decay": 0.5}}},
    # ema_every changed mid-run: which steps update, never how the count weighs
    "ema_every changed": {4: {"all": {"ema_every": 3, "ema_start": 2}}, 13: {"all": {"ema_every": 2}}},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_settings_changed_mid_run_are_torch_averaged_model(case, backend):
    """20 steps of Adam; the settings change as ``CASES[case]`` says: every step's
    parameters, EMA and SWA average are torch's loop over one ``AveragedModel`` each."""
    p0, grads = problem(seed=21, steps=20)
    plan = plan_of(CASES[case], {"all": BASE}, ALL)
    want = torch_rows(p0, grads, plan, ALL)
    check(ours_rows(backend, p0, grads, plan, ALL), want, f"{case} {backend}")


def test_lowering_before_start_was_the_defect():
    """The case the count fixes, by number: lowering ``ema_start`` from 9 to 2 at step 5
    (no update yet) makes step 5 a copy of the parameters; inferred from the step (as before
    the count was kept) step 5 would be the 4th update since step 2, blending the starting
    copy: 0.2·p₅ + 0.8·p₀ (far from torch's)."""
    p0, grads = problem(seed=21, steps=6)
    plan = plan_of(CASES["ema_start lowered before start"], {"all": BASE}, ALL)
    want = torch_rows(p0, grads, plan, ALL)
    got = ours_rows("numpy", p0, grads, plan, ALL)
    p5 = got[4][0]
    for k in NAMES:
        assert np.array_equal(got[4][1][k], p5[k]), k  # a copy, bit for bit
        assert rel_err(got[4][1][k], want[4][1][k]) <= TOL
        stale = 0.2 * p5[k] + 0.8 * p0[k]  # what the inference gave
        assert rel_err(stale, want[4][1][k]) > 1e-3


GROUP_CASES = {
    # one group's ema_start lowered before its start, the other's raised
    "per group": ({"rest": dict(BASE, ema_start=3), "late": dict(BASE, ema_start=10)},
                  {6: {"late": {"ema_start": 2}}, 4: {"rest": {"ema_start": 8}}}),
    # one group lowered after its start (no effect), the other lowered before
    "per group after": ({"rest": dict(BASE, ema_start=2), "late": dict(BASE, ema_start=12)},
                        {7: {"rest": {"ema_start": 1}, "late": {"ema_start": 3}}}),
}


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "jax-jit"])
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_per_group_settings_count_per_group(case, backend):
    """Groups with their own ``ema_start``, changed per group through their hyperparameter
    handles: torch with one ``AveragedModel`` per group."""
    p0, grads = problem(seed=22, steps=16)
    base, changes = GROUP_CASES[case]
    plan = plan_of(changes, base, GROUPS)
    want = torch_rows(p0, grads, plan, GROUPS)
    check(ours_rows(backend, p0, grads, plan, GROUPS), want, f"{case} {backend}")


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax-jit"])
@pytest.mark.parametrize(("case", "at"), [("ema_start lowered before start", 4),
                                          ("ema_start lowered before start", 7),
                                          ("swa_start raised after start", 16),
                                          ("ema_start raised after start", 13)])
def test_state_dict_round_trip_keeps_the_count(case, at, backend):
    """The same runs with a state dict saved after ``at − 1`` steps and loaded into a new
    optimizer (constructed with the first settings): the count comes back with it."""
    p0, grads = problem(seed=23, steps=20)
    plan = plan_of(CASES[case], {"all": BASE}, ALL)
    want = torch_rows(p0, grads, plan, ALL)
    check(ours_rows(backend, p0, grads, plan, ALL, round_trip=at), want, f"{case} {at}")


def test_per_group_round_trip():
    p0, grads = problem(seed=24, steps=16)
    base, changes = GROUP_CASES["per group"]
    plan = plan_of(changes, base, GROUPS)
    want = torch_rows(p0, grads, plan, GROUPS)
    check(ours_rows("numpy", p0, grads, plan, GROUPS, round_trip=8), want, "groups sd")


def test_old_state_dict_without_the_count_loads_inferred():
    """A state dict without ``"averaged"`` (saved before the count was kept) loads, the
    count inferred from its step and settings: the run goes on as the unbroken one (the
    settings never changed), bit for bit."""
    p0, grads = problem(seed=25, steps=16)
    opt = mo.Adam(LR, ema_decay=0.8, ema_start=3, ema_every=2, swa_start=6)
    params, state = dict(p0), opt.init(dict(p0))
    for g in grads[:9]:
        params, state = opt.update(params, g, state)
    sd = opt.state_dict(state)
    assert sd["averaged"] == {"ema": dict.fromkeys(NAMES, 3), "swa": dict.fromkeys(NAMES, 2)}
    old = {k: v for k, v in sd.items() if k != "averaged"}
    opt2 = mo.Adam(LR)
    state2 = opt2.load_state_dict(old, {k: v.copy() for k, v in params.items()})
    assert listed(state2.averaged) == {"ema": [3] * 4, "swa": [2] * 4}  # (steps 4, 6, 8; 6, 8)
    p2 = {k: v.copy() for k, v in params.items()}
    for g in grads[9:]:
        params, state = opt.update(params, g, state)
        p2, state2 = opt2.update(p2, g, state2)
    for avg in ("ema_params", "swa_params"):
        a, b = getattr(opt, avg)(state), getattr(opt2, avg)(state2)
        assert all(np.array_equal(a[k], b[k]) for k in NAMES), avg


def test_checkpoint_round_trip_keeps_the_count(tmp_path):
    """``save_checkpoint`` / ``load_checkpoint`` mid-run, after ``ema_start`` was lowered
    before the EMA's first update and the EMA took its first step: torch's numbers after."""
    p0, grads = problem(seed=26, steps=14)
    plan = plan_of(CASES["ema_start lowered before start"], {"all": BASE}, ALL)
    want = torch_rows(p0, grads, plan, ALL)
    opt = make(ALL, plan(1))
    params, state = dict(p0), opt.init(dict(p0))
    for t, g in enumerate(grads[:7], 1):
        apply(opt, plan(t), ALL)
        params, state = opt.update(params, g, state)
    save_checkpoint(tmp_path / "c.mtl", params, opt, state)
    opt2 = make(ALL, plan(1))
    got = load_checkpoint(tmp_path / "c.mtl", params, opt2)
    assert listed(got["state"].averaged) == {"ema": [3] * 4, "swa": [0] * 4}
    params, state = got["params"], got["state"]
    for t, g in enumerate(grads[7:], 8):
        apply(opt2, plan(t), ALL)
        params, state = opt2.update(params, g, state)
        for k in NAMES:
            assert rel_err(opt2.ema_params(state)[k], want[t - 1][1][k]) <= TOL, (t, k)
            assert rel_err(opt2.swa_params(state)[k], want[t - 1][2][k]) <= TOL, (t, k)


def test_torch_optimizer_state_dict_keeps_the_count():
    """A ``torch_optimizer``'s state dict carries the counts (per parameter, in order): a
    new wrapper loading it mid-run goes on as torch's AveragedModel after a lowered start."""
    from mithril.interop import torch_optimizer

    p0, grads = problem(seed=27, steps=12)
    plan = plan_of(CASES["ema_start lowered before start"], {"all": BASE}, ALL)
    want = torch_rows(p0, grads, plan, ALL)
    with torch_float64():
        net = Net(p0)
        opt = torch_optimizer(make(ALL, plan(1)), list(zip(NAMES, net.ps)))
        for t, g in enumerate(grads, 1):
            if t == 7:
                sd = opt.state_dict()
                net = Net({k: p.detach().numpy().copy() for k, p in zip(NAMES, net.ps)})
                opt = torch_optimizer(make(ALL, plan(1)), list(zip(NAMES, net.ps)))
                opt.load_state_dict(sd)
            opt.param_groups[0]["ema_start"] = plan(t)["all"]["ema_start"]
            for p, v in zip(net.ps, g.values()):
                p.grad = torch.tensor(v)
            opt.step()
        assert sd["mithril"]["averaged"] == {"ema": [2] * 4, "swa": [0] * 4}
        ema = opt._mithril.ema_params(opt._opt_state)
        for k in NAMES:
            assert rel_err(host(ema[k]), want[-1][1][k]) <= TOL, k


@pytest.mark.parametrize(("bad", "err", "words"), [
    ({"ema": dict.fromkeys(NAMES, -1), "swa": dict.fromkeys(NAMES, 0)}, ValueError, "non-negative"),
    ({"ema": dict.fromkeys(NAMES, 1.5), "swa": dict.fromkeys(NAMES, 0)}, ValueError, "'ema'"),
    ({"ema": dict.fromkeys(NAMES, 1)}, KeyError, "exactly the averages"),
    ({"ema": {"w": 1}, "swa": dict.fromkeys(NAMES, 0)}, KeyError, "exactly the parameters"),
    ([1, 2], ValueError, "'averaged'"),
])
def test_a_bad_count_is_named_and_changes_nothing(bad, err, words):
    p0, grads = problem(seed=28, steps=3)
    opt = mo.Adam(LR, ema_decay=0.8, swa_start=2)
    params, state = dict(p0), opt.init(dict(p0))
    for g in grads:
        params, state = opt.update(params, g, state)
    sd = {**opt.state_dict(state), "averaged": bad}
    opt2 = mo.Adam(LR, ema_decay=0.5)
    before = dict(vars(opt2))
    with pytest.raises(err, match=words):
        opt2.load_state_dict(sd, params)
    assert vars(opt2) == before


@pytest.mark.parametrize("make_opt", [
    lambda: mo.Adafactor(learning_rate=1e-2, ema_decay=0.8, ema_start=9, swa_start=12),
    lambda: mo.Muon(learning_rate=1e-2, ema_decay=0.8, ema_start=9, swa_start=12),
    lambda: mo.Lookahead(mo.Adam(LR, ema_decay=0.8, ema_start=9, swa_start=12), sync_period=3),
], ids=["adafactor", "muon", "lookahead"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_other_step_paths_count_too(make_opt, backend):
    """The tensorwise path (Adafactor's own kernels, Muon's per-tensor step) and a
    Lookahead: ``ema_start`` lowered from 9 to 2 at step 5 and ``swa_start`` raised from 12 to
    15 at step 13, their own parameters fed to torch's AveragedModels after each step: the
    EMA's first update (step 5) is a copy, the SWA mean pauses and goes on."""
    p0, grads = problem(seed=29, steps=18)
    opt = make_opt()
    with engine(backend) as b, torch_float64():
        params = natives(b, p0)
        state = init(opt, b, params)
        ema = AveragedModel(Net(p0), multi_avg_fn=get_ema_multi_avg_fn(0.8))
        swa = AveragedModel(Net(p0))
        for t, g in enumerate(grads, 1):
            if t == 5:
                opt.ema_start = 2
            if t == 13:
                opt.swa_start = 15
            params, state = opt.update(params, natives(b, g), state)
            net = Net({k: host(v) for k, v in params.items()})
            if t >= opt.ema_start:
                ema.update_parameters(net)
            if t >= opt.swa_start:
                swa.update_parameters(net)
            for got, avg in ((opt.ema_params(state), ema), (opt.swa_params(state), swa)):
                for k, q in zip(NAMES, avg.module.ps):
                    assert rel_err(host(got[k]), q.detach().numpy()) <= TOL, (t, k)
        assert listed(state.averaged) == {"ema": [14] * 4, "swa": [5] * 4}


@pytest.mark.parametrize("shard", [False, True])
def test_sharded_checkpoint_keeps_the_count(tmp_path, shard):
    """``save_sharded`` / ``load_sharded`` (one process) mid-run after ``swa_start`` was
    raised from 12 to 17 at step 14 (2 updates then) and saved after step 15: the loaded SWA
    mean goes on counting at step 17 (torch's ``n_averaged``) as the unbroken run, where a
    count inferred from the saved ``swa_start`` would restart it (a copy)."""
    from mithril.distributed import DataParallel, load_sharded, save_sharded

    p0, grads = problem(seed=30, steps=20)
    plan = plan_of(CASES["swa_start raised after start"], {"all": BASE}, ALL)
    want = torch_rows(p0, grads, plan, ALL)
    dp = DataParallel(make(ALL, plan(1)), shard_state=shard)
    params, st = dict(p0), dp.init(dict(p0))
    for t, g in enumerate(grads[:15], 1):
        apply(dp.optimizer, plan(t), ALL)
        params, st = dp.update(params, g, st)
    save_sharded(tmp_path, params, dp, st)
    dp2 = DataParallel(make(ALL, plan(1)), shard_state=shard)
    params, st2 = load_sharded(tmp_path, dp2)
    assert listed(st2.local.averaged) == listed(st.local.averaged)
    assert listed(st2.local.averaged)["swa"] == [2] * len(st2.local.averaged["swa"])
    for g in grads[15:]:  # (the settings stay those saved: swa_start 17)
        params, st2 = dp2.update(params, g, st2)
    for k in NAMES:
        assert rel_err(st2.slot("swa")[k], want[-1][2][k]) <= TOL, k
        assert rel_err(st2.slot("ema")[k], want[-1][1][k]) <= TOL, k
