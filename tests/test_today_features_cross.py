"""Today's features crossed with the others, side by side with the peers (optax 0.2.8,
torch 2.x) in float64.

Parameter groups x two-pass optimizers: a hyperparameter that the step reads between the
two passes (``tensor_scalars``) must be the group's own, as ``optax.multi_transform`` with
one transformation per group gives it; one that enters the single optimizer-wide step size
(DoG's / DoWG's ε and initial estimate, Prodigy's d settings) cannot differ per group and is
refused by name (it was silently the optimizer's).

float64 needs JAX's process-global x64 switch: the comparisons run in one fresh interpreter
(:func:`conftest.run_python`), ours on the NumPy, torch and jitted-JAX engines.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from conftest import run_python

from mithril.utils.optimizers import DoG, DoWG, Prodigy

TOL64 = 1e-12

_SCRIPT = r"""
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import torch
import mithril.utils.optimizers.engines as engines
from mithril.interop import optax_transformation
from mithril.utils.optimizers import Fromage, Novograd

rng = np.random.default_rng(7)
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
p0 = {k: rng.normal(size=s) for k, s in SHAPES.items()}
# gradients of a few sizes, so that min_norm and ε matter for some tensors and steps
grads = [{k: rng.normal(size=s) * 10.0 ** rng.integers(-4, 2) for k, s in SHAPES.items()}
         for _ in range(25)]
labels = {"w": "rest", "b": "group", "s": "rest"}


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def run_optax(tx):
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    s = tx.init(params)
    out = []
    for g in grads:
        u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, params)
        params = optax.apply_updates(params, u)
        out.append({k: np.array(v) for k, v in params.items()})
    return out


def run_ours(make, engine):
    engines.JAX_ENGINE = "jit" if engine == "jax-jit" else "auto"
    conv = {"numpy": np.array, "torch": torch.tensor, "jax-jit": jnp.asarray}[engine]
    opt = make()
    params = {k: conv(v) for k, v in p0.items()}
    state = opt.init(params)
    out = []
    for g in grads:
        params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
        out.append({k: np.array(v) for k, v in params.items()})
    return out


CASES = {
    "fromage_min_norm": (
        lambda: Fromage(0.05, min_norm=1e-6, param_groups=[{"params": ["b"], "min_norm": 3.0}]),
        optax.multi_transform({"rest": optax.fromage(0.05, 1e-6),
                               "group": optax.fromage(0.05, 3.0)}, labels)),
    "novograd_beta2_eps": (
        lambda: Novograd(0.01, param_groups=[{"params": ["b"], "beta2": 0.9, "epsilon": 0.5,
                                              "eps_root": 1e-3}]),
        optax.multi_transform({"rest": optax.novograd(0.01),
                               "group": optax.novograd(0.01, b2=0.9, eps=0.5, eps_root=1e-3)},
                              labels)),
}
tx_plain = {"fromage_min_norm": optax.fromage(0.05, 1e-6),
            "novograd_beta2_eps": optax.novograd(0.01)}
out = {}
for name, (make, tx) in CASES.items():
    ref = run_optax(tx)
    for engine in ("numpy", "torch", "jax-jit", "optax_transformation"):
        mine = (run_optax(optax_transformation(make())) if engine == "optax_transformation"
                else run_ours(make, engine))
        out[f"{name}/{engine}"] = max(rel(m[k], r[k]) for m, r in zip(mine, ref) for k in SHAPES)
    # the group's own value matters: the optimizer's value everywhere is far from it
    plain = run_optax(tx_plain[name])
    out[f"{name}/effect"] = max(rel(a[k], r[k]) for a, r in zip(plain, ref) for k in SHAPES)
print(json.dumps(out))
"""


@functools.cache
def _reference() -> dict:
    return json.loads(run_python(_SCRIPT, timeout=600).strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fromage_min_norm", "novograd_beta2_eps"])
@pytest.mark.parametrize("engine", ["numpy", "torch", "jax-jit", "optax_transformation"])
def test_a_groups_own_setting_read_between_the_passes_is_used(case, engine):
    """Fromage's ``min_norm`` and Novograd's ``beta2`` / ``epsilon`` / ``eps_root`` of a
    parameter group equal optax.multi_transform with that group's own transformation in
    float64 (before: the optimizer's values were used for every tensor, ~1e-1 off)."""
    ref = _reference()
    assert ref[f"{case}/effect"] > 1e-3, ref  # (the group's value changes the run)
    err = ref[f"{case}/{engine}"]
    assert err <= TOL64, (case, engine, err)


@pytest.mark.parametrize("cls, key, value", [
    (DoG, "epsilon", 1e-2), (DoG, "init_step", ("distance", 0.5)),
    (DoWG, "epsilon", 1e-2), (DoWG, "init_estim_sq_dist", 1.0),
    (Prodigy, "epsilon", 1e-6), (Prodigy, "estim_lr0", 1e-3), (Prodigy, "beta3", 0.5),
    (Prodigy, "estim_lr_coef", 2.0),
])
def test_a_setting_of_the_one_step_size_is_refused_per_group(cls, key, value):
    """DoG / DoWG / Prodigy take one step size for every parameter from optimizer-wide sums;
    the settings of that step size were taken per group and silently unused (a group's
    ``epsilon=1e-2`` gave bit for bit the run without it). Refused by name, at the
    constructor and through a group's hyperparameter handle; the optimizer is unchanged."""
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: \['{key}'\] hold for the whole "
                                         r"step and cannot differ per group"):
        cls(param_groups=[{"params": ["b"], key: value}])
    opt = cls(param_groups=[{"params": ["b"], "weight_decay": 0.1}])
    before = (opt.hyperparameters(), [dict(g) for g in opt.param_groups])
    if not isinstance(value, tuple):
        with pytest.raises(ValueError, match=f"{key} holds for the whole step"):
            opt.hyperparameter(key, group=0).set_learning_rate(value)
    assert (opt.hyperparameters(), [dict(g) for g in opt.param_groups]) == before
    # the optimizer-wide value itself is still a setting (one value for the whole step)
    state = opt.init({"w": np.ones(3), "b": np.ones(2)})
    params, state = opt.update({"w": np.ones(3), "b": np.ones(2)},
                               {"w": np.full(3, 0.5), "b": np.full(2, -0.5)}, state)
    assert state.step == 1 and np.all(np.isfinite(params["w"]))


# ---------------------------------------------------------------------------------------------
# ema_start / ema_every / swa_start and resuming, against torch's AveragedModel
# ---------------------------------------------------------------------------------------------

def _torch_averages(traj, ema_decay, ema_start, ema_every, swa_start):
    """torch's AveragedModel fed the parameter trajectory ``traj`` (traj[t]: after step t,
    traj[0] the start): the EMA one created after step ema_start − 1, the SWA one after
    swa_start − 1, each updated after every later step that is a multiple of ema_every.
    Returns {step: (ema, swa)} for the steps where each exists (None where not)."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def module(v):
        m = torch.nn.Module()
        m.w = torch.nn.Parameter(torch.tensor(v, dtype=torch.float64))
        return m

    model, ema, swa, out = module(traj[0]), None, None, {}
    for t in range(1, len(traj)):
        with torch.no_grad():
            model.w.copy_(torch.tensor(traj[t]))
        if ema is None and t >= ema_start:  # (created after step ema_start − 1: a copy)
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
        if swa_start is not None and swa is None and t >= swa_start:
            swa = AveragedModel(model)
        if t % ema_every == 0:
            for avg in (ema, swa):
                if avg is not None:
                    avg.update_parameters(model)
        out[t] = tuple(None if a is None or int(a.n_averaged) == 0 else
                       a.module.w.detach().numpy().copy() for a in (ema, swa))
    return out


def _mithril_run(steps, resume, with_averages_saved, **avg):
    """SGD with momentum (float64, NumPy) and the averages ``avg``; with ``resume`` = r, the
    optimizer is rebuilt after step r from a state dict saved by an optimizer with (or
    without) the same averages. Returns the parameter trajectory and {step: (ema, swa)}."""
    from mithril.utils.optimizers import SGD

    rng = np.random.default_rng(11)
    grads = [rng.normal(size=5) for _ in range(steps)]
    p = {"w": rng.normal(size=5)}
    make = lambda averaged: SGD(0.05, momentum=0.9, **(avg if averaged else {}))  # noqa: E731
    opt = make(resume is None or with_averages_saved)
    state = opt.init(p)
    traj, got = [p["w"].copy()], {}
    for t in range(1, steps + 1):
        if t - 1 == resume:
            d = opt.state_dict(state)
            opt = make(True)
            state = opt.load_state_dict(d, {"w": p["w"].copy()})
        p, state = opt.update(p, {"w": grads[t - 1]}, state)
        traj.append(p["w"].copy())
        got[t] = (opt.ema_params(state)["w"].copy() if avg.get("ema_decay") is not None
                  and (resume is None or with_averages_saved or t > resume) else None,
                  opt.swa_params(state)["w"].copy() if avg.get("swa_start") is not None
                  and (resume is None or with_averages_saved or t > resume) else None)
    return traj, got


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(ema_start=st.integers(1, 8), ema_every=st.integers(1, 3),
       swa_start=st.one_of(st.none(), st.integers(1, 8)), resume=st.one_of(
           st.none(), st.integers(1, 10)), saved_with=st.booleans())
def test_averages_and_resume_equal_torch_averaged_model(ema_start, ema_every, swa_start,
                                                        resume, saved_with):
    """Every (ema_start, ema_every, swa_start, resume step): the EMA and SWA after every
    step equal torch's AveragedModel created at the right step in float64 (≤ 1e-13).
    Resuming from a state dict without the averages starts them at the resume (torch: an
    AveragedModel created then); one with them restores them exactly."""
    steps = 14
    avg = dict(ema_decay=0.8, ema_start=ema_start, ema_every=ema_every, swa_start=swa_start)
    traj, got = _mithril_run(steps, resume, saved_with, **avg)
    late = resume is not None and not saved_with  # (the averages start at the resume)
    start = max(ema_start, resume + 1) if late else ema_start
    swa_at = None if swa_start is None else (max(swa_start, resume + 1) if late else swa_start)
    want = _torch_averages(traj, 0.8, start, ema_every, swa_at)
    for t in range(1, steps + 1):
        for i, (mine, theirs) in enumerate(zip(got[t], want[t])):
            if theirs is None:
                continue  # (no average yet: ours holds its starting copy)
            assert mine is not None, (t, i)
            np.testing.assert_allclose(mine, theirs, rtol=1e-13, atol=1e-15, err_msg=f"{t}/{i}")


# ---------------------------------------------------------------------------------------------
# load_sharded (one process) and the averages, as load_state_dict / load_checkpoint
# ---------------------------------------------------------------------------------------------

def _dp_run(tmp_path, saved_avg, loaded_avg, steps=12, resume=5):
    from mithril.distributed import DataParallel, load_sharded, save_sharded
    from mithril.utils.optimizers import OptimisticAdam

    rng = np.random.default_rng(3)
    grads = [{"w": rng.normal(size=(2, 3))} for _ in range(steps)]
    p = {"w": rng.normal(size=(2, 3))}
    dp = DataParallel(OptimisticAdam(0.05, **saved_avg))
    st = dp.init(p)
    traj = [p["w"].copy()]
    for t in range(resume):
        p, st = dp.update(p, grads[t], st)
        traj.append(p["w"].copy())
    save_sharded(str(tmp_path), p, dp, st)
    dp = DataParallel(OptimisticAdam(0.05, **loaded_avg))
    p, st = load_sharded(str(tmp_path), dp)
    got = {}
    for t in range(resume, steps):
        p, st = dp.update(p, grads[t], st)
        traj.append(p["w"].copy())
        got[t + 1] = tuple(f(st.local)["w"].copy() if k in loaded_avg else None
                           for f, k in ((dp.optimizer.ema_params, "ema_decay"),
                                        (dp.optimizer.swa_params, "swa_start")))
    return traj, got, dp


def test_load_sharded_starts_an_average_the_checkpoint_lacks_at_the_resume(tmp_path):
    """An optimizer with an EMA and SWA loading a sharded checkpoint saved without them
    starts them at the resume, as load_state_dict and load_checkpoint (was: refused, 'the
    checkpoint has slots [...]'); equal to torch's AveragedModel created at the resume in
    float64 after every later step."""
    traj, got, dp = _dp_run(tmp_path, {}, dict(ema_decay=0.8, ema_start=2, swa_start=3))
    assert (dp.optimizer.ema_start, dp.optimizer.swa_start) == (6, 6)
    want = _torch_averages(traj, 0.8, 6, 1, 6)
    for t, (ema, swa) in got.items():
        np.testing.assert_allclose(ema, want[t][0], rtol=1e-13, atol=1e-15, err_msg=f"ema {t}")
        np.testing.assert_allclose(swa, want[t][1], rtol=1e-13, atol=1e-15, err_msg=f"swa {t}")


def test_load_sharded_keeps_the_checkpoints_average_settings(tmp_path):
    """A checkpoint whose EMA had not started (ema_start 10, saved at step 5: its slot is
    the starting copy) loaded by an optimizer built with ema_start 2: the slot means what
    the saving run made it, so the checkpoint's settings are restored (as load_state_dict
    restores them). Was: the optimizer's ema_start 2 blended the stale starting copy into
    the EMA at step 6 (torch's AveragedModel copies at its first update)."""
    traj, got, dp = _dp_run(tmp_path, dict(ema_decay=0.9, ema_start=10),
                            dict(ema_decay=0.5, ema_start=2))
    assert (dp.optimizer.ema_decay, dp.optimizer.ema_start) == (0.9, 10)
    want = _torch_averages(traj, 0.9, 10, 1, None)
    for t, (ema, _) in got.items():
        if want[t][0] is not None:
            np.testing.assert_allclose(ema, want[t][0], rtol=1e-13, atol=1e-15, err_msg=str(t))
    assert got[10][0] is not None and np.array_equal(got[10][0], traj[10])


def test_a_refused_load_sharded_changes_nothing(tmp_path):
    from mithril.distributed import DataParallel, load_sharded, save_sharded
    from mithril.errors import CheckpointError
    from mithril.utils.optimizers import Adam, OptimisticAdam

    p = {"w": np.ones(3)}
    dp = DataParallel(Adam(0.1))
    save_sharded(str(tmp_path), p, dp, dp.init(p))
    other = DataParallel(OptimisticAdam(0.1, ema_decay=0.9, ema_start=7))
    with pytest.raises(CheckpointError, match="of Adam, not OptimisticAdam"):
        load_sharded(str(tmp_path), other)
    assert other.optimizer.ema_start == 7 and other.optimizer.ema_decay == 0.9


# ---------------------------------------------------------------------------------------------
# base_lr= through a state dict: a resumed scheduler re-based as the saved one
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("given_saved, given_loaded", [(True, False), (False, True)])
def test_a_given_base_lr_survives_the_state_dict(given_saved, given_loaded):
    """A warm-up's after_scheduler built with ``base_lr=0.2`` keeps it when the warm-up's
    ``end_lr`` changes (a parent's re-base); resumed from a state dict into one built
    without it (or the other way round), it behaves as the saved one. Before: the state
    dict did not say the base was given, so the resumed run followed the re-base (0.6 vs
    0.2 after the warm-up). Checked against optax.join_schedules in float64."""
    import json as _json

    from scheduler_parity import peer_schedules

    from mithril.utils.lr_schedulers import LinearWarmupScheduler, StepLR
    from mithril.utils.optimizers import SGD

    def make(o, given):
        return LinearWarmupScheduler(o, 3, 0.0, 0.5, StepLR(
            o, 3, 0.5, **({"base_lr": 0.2} if given else {})))

    o = SGD(0.7)
    w = make(o, given_saved)
    for _ in range(5):
        w.step()
    o2 = SGD(0.7)
    w2 = make(o2, given_loaded)
    w2.load_state_dict(_json.loads(_json.dumps(w.state_dict())))
    w.end_lr = w2.end_lr = 0.6  # the parent re-bases the children that took its base
    base = 0.2 if given_saved else 0.6
    ref = peer_schedules({"s": f"optax.join_schedules([optax.linear_schedule(0.0, 0.6, 3), "
                               f"optax.exponential_decay({base}, 3, 0.5, staircase=True)], [3])"},
                         12)["s"]
    for sched in (w, w2):
        got = [sched.get_lr_at(t) for t in range(12)]
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    assert o2.get_learning_rate() == o.get_learning_rate()


def test_a_bad_base_lr_given_flag_is_refused_and_changes_nothing():
    from mithril.utils.lr_schedulers import StepLR
    from mithril.utils.optimizers import SGD

    o = SGD(0.7)
    s = StepLR(o, 3, 0.5, base_lr=0.2)
    s.step()
    d = s.state_dict()
    assert d["base_lr_given"] is True
    before = (s.state_dict(), o.get_learning_rate())
    with pytest.raises(ValueError, match="base_lr_given"):
        StepLR(SGD(0.7), 3, 0.5).load_state_dict({**d, "base_lr_given": "yes"})
    with pytest.raises(ValueError, match="base_lr_given"):
        s.load_state_dict({**d, "base_lr_given": 1, "last_step": 2})
    assert (s.state_dict(), o.get_learning_rate()) == before
