"""Parameter groups in one optimizer and one fused pass (issue #15, point 1), against torch's
``param_groups``: float64, every engine, relative error ≤ 1e-10 (measure: ``rel_err`` of
``optimizer_parity``), learning-rate changes mid-run included. Then the shortcuts
(``weight_decay_mask``, ``exclude_from_weight_decay``), per-group learning rates, state dicts
and checkpoints, the bad-input rules, and that neither many groups nor changing a group's
hyperparameters compiles anything anew.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import run_python
from optimizer_parity import ALL, host, init, natives, on, rel_err

import mithril.utils.optimizers as mo
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.optimizers.engines.kernels import update_kernel

SHAPES = {"embed.weight": (6, 3), "layer1.weight": (4, 3), "layer1.bias": (4,),
          "norm.weight": (4,), "norm.bias": (4,), "head.weight": (2, 4), "head.bias": (2,)}
STEPS = 60
LR_CHANGES = {20: 0.5, 40: 2.0}  # factor of the initial lr, set before that step
TOL = 1e-10


def problem(seed: int = 3, steps: int = STEPS):
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) * (1 + t % 3) for k, s in SHAPES.items()}
             for t in range(steps)]
    return p0, grads


# (mithril class, kwargs with param_groups, torch class, torch default kwargs, torch groups:
#  [(names, overrides)] in the order torch gets them; names not listed form torch's default group)
CASES = {
    "adamw_no_decay_on_bias_and_norm": (
        mo.AdamW, {"learning_rate": 1e-2, "weight_decay": 0.1,
                   "param_groups": [{"params": r"bias|norm", "weight_decay": 0.0}]},
        torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1},
        [(["layer1.bias", "norm.weight", "norm.bias", "head.bias"], {"weight_decay": 0.0})]),
    "sgd_lower_lr_for_one_layer": (
        mo.SGD, {"learning_rate": 0.1, "momentum": 0.9,
                 "param_groups": [{"params": ["embed.weight"], "learning_rate": 0.01}]},
        torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
        [(["embed.weight"], {"lr": 0.01})]),
    "rmsprop_per_group_momentum": (
        mo.RMSProp, {"learning_rate": 1e-2, "momentum": 0.9, "decay": 0.99,
                     "param_groups": [{"params": lambda n: n.startswith("head"), "momentum": 0.5,
                                       "epsilon": 1e-6},
                                      {"params": r"^norm", "learning_rate": 3e-3}]},
        torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.9, "alpha": 0.99},
        [(["head.weight", "head.bias"], {"momentum": 0.5, "eps": 1e-6}),
         (["norm.weight", "norm.bias"], {"lr": 3e-3})]),
    "adam_groups_and_coupled_decay": (
        mo.Adam, {"learning_rate": 1e-2, "weight_decay": 0.01, "beta2": 0.99,
                  "param_groups": [{"params": r"embed", "beta1": 0.5, "weight_decay": 0.0},
                                   {"params": r"head", "learning_rate": 5e-3, "beta2": 0.9}]},
        torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.01, "betas": (0.9, 0.99)},
        [(["embed.weight"], {"betas": (0.5, 0.99), "weight_decay": 0.0}),
         (["head.weight", "head.bias"], {"lr": 5e-3, "betas": (0.9, 0.9)})]),
}


def torch_groups(tparams: dict, default_kw: dict, groups: list) -> list[dict]:
    listed = {n for names, _ in groups for n in names}
    out = [{"params": [tparams[n] for n in SHAPES if n not in listed]}]
    out += [{"params": [tparams[n] for n in names], **over} for names, over in groups]
    return out


def run_side_by_side(case: str, backend: str) -> float:
    cls, kw, tcls, tkw, tgroups = CASES[case]
    p0, grads = problem()
    with on(backend, "float64"):
        opt = cls(**kw)
        params = natives(backend, p0)
        state = init(opt, backend, params)
        tparams = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
        topt = tcls(torch_groups(tparams, tkw, tgroups), **tkw)
        base = [g["lr"] for g in topt.param_groups]
        lr0 = opt.get_learning_rate()
        err = 0.0
        for t in range(STEPS):
            if t in LR_CHANGES:  # every group in proportion, as a torch scheduler moves them
                opt.set_learning_rate(lr0 * LR_CHANGES[t])
                for g, b in zip(topt.param_groups, base):
                    g["lr"] = b * LR_CHANGES[t]
            params, state = opt.update(params, natives(backend, grads[t]), state)
            for k, p in tparams.items():
                p.grad = torch.tensor(grads[t][k])
            topt.step()
            err = max(err, *(rel_err(host(params[k]), tparams[k].detach().numpy()) for k in SHAPES))
        return err


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", CASES)
def test_groups_match_torch_param_groups(case, backend):
    err = run_side_by_side(case, backend)
    assert err <= TOL, (case, backend, err)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_tensor_op_engine_groups(backend):
    """float16 runs on the tensor-op engine: groups there give the fused engine's numbers
    (per-element scalars), within float16 rounding of a float32 run."""
    p0, grads = problem(steps=10)
    kw = CASES["adam_groups_and_coupled_decay"][1]
    runs = {}
    for dtype in ("float16", "float32"):
        opt = mo.Adam(**{**kw, "epsilon": 1e-4})
        params = natives(backend, {k: v.astype(dtype) for k, v in p0.items()})
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, natives(backend, {k: v.astype(dtype)
                                                                 for k, v in g.items()}), state)
        runs[dtype] = {k: host(v).astype(np.float64) for k, v in params.items()}
        assert type(state.engine).__name__ == ("ArrayEngine" if dtype == "float16" else "NumbaEngine")
    for k in SHAPES:
        np.testing.assert_allclose(runs["float16"][k], runs["float32"][k], atol=2e-2)


def _final(opt, p0, grads):
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return params


def test_weight_decay_mask_and_exclude_equal_a_group():
    p0, grads = problem(steps=15)
    as_group = _final(mo.AdamW(1e-2, weight_decay=0.2, param_groups=[
        {"params": r"bias|norm", "weight_decay": 0.0}]), p0, grads)
    masked = _final(mo.AdamW(1e-2, weight_decay=0.2,
                             weight_decay_mask=lambda n: not ("bias" in n or "norm" in n)), p0, grads)
    excluded = mo.AdamW(1e-2, weight_decay=0.2)
    excluded.exclude_from_weight_decay(names=["layer1.bias", "head.bias"], regex=r"^norm")
    excluded = _final(excluded, p0, grads)
    for k in SHAPES:
        np.testing.assert_array_equal(masked[k], as_group[k])
        np.testing.assert_array_equal(excluded[k], as_group[k])
    plain = _final(mo.AdamW(1e-2, weight_decay=0.2), p0, grads)
    assert not np.array_equal(plain["layer1.bias"], as_group["layer1.bias"])  # decay mattered
    np.testing.assert_array_equal(plain["layer1.weight"], as_group["layer1.weight"])


def test_mask_inside_a_group():
    """The mask turns decay off in whatever group a name is: group lr and no decay at once."""
    p0, grads = problem(steps=10)
    both = _final(mo.AdamW(1e-2, weight_decay=0.3, weight_decay_mask=r"weight$",
                           param_groups=[{"params": r"^head", "learning_rate": 1e-3}]), p0, grads)
    explicit = _final(mo.AdamW(1e-2, weight_decay=0.3, param_groups=[
        {"params": ["head.bias"], "learning_rate": 1e-3, "weight_decay": 0.0},
        {"params": ["head.weight"], "learning_rate": 1e-3},
        {"params": r"bias$", "weight_decay": 0.0}]), p0, grads)
    for k in SHAPES:
        np.testing.assert_allclose(both[k], explicit[k], rtol=1e-15, atol=0)


def test_group_learning_rates():
    opt = mo.SGD(0.1, param_groups=[{"params": ["head.bias"], "learning_rate": 0.02},
                                    {"params": ["norm.bias"], "lr_scale": 3.0}])
    assert opt.get_learning_rate() == 0.1
    assert opt.get_learning_rate(0) == pytest.approx(0.02, rel=1e-15)
    assert opt.get_learning_rate(1) == pytest.approx(0.3, rel=1e-15)
    opt.set_learning_rate(0.05)  # every group in proportion
    assert opt.get_learning_rate(0) == pytest.approx(0.01, rel=1e-15)
    opt.set_learning_rate(0.5, group=1)  # one group only
    assert opt.get_learning_rate(1) == pytest.approx(0.5, rel=1e-15)
    assert opt.get_learning_rate() == 0.05 and opt.get_learning_rate(0) == pytest.approx(0.01)
    p = {"head.bias": np.ones(2), "norm.bias": np.ones(2), "other": np.ones(2)}
    out, _ = opt.update({k: v.copy() for k, v in p.items()}, {k: np.ones(2) for k in p}, opt.init(p))
    np.testing.assert_allclose(out["head.bias"], 1 - 0.01)
    np.testing.assert_allclose(out["norm.bias"], 1 - 0.5)
    np.testing.assert_allclose(out["other"], 1 - 0.05)
    with pytest.raises(KeyError, match="no group 2"):
        opt.get_learning_rate(2)
    with pytest.raises(TypeError, match="index"):
        opt.set_learning_rate(0.1, group="head")
    with pytest.raises(ValueError, match="learning_rate"):
        opt.set_learning_rate(-1.0, group=0)
    assert opt.get_learning_rate(1) == pytest.approx(0.5)  # the refused call changed nothing


def test_a_group_set_as_a_dict_is_refused_naming_the_call():
    """torch's idiom ``param_groups[i]["beta1"] = x`` would bypass the check and the count
    of changes the step's caches compare (the step used the old value while the dict
    showed the new): it is refused, naming the call that sets it, and changes nothing."""
    import copy
    import re

    opt = mo.Adam(1e-2, param_groups=[{"params": ["b"], "beta1": 0.9}])
    p = {"b": np.ones(3), "w": np.ones(3)}
    g = opt.param_groups[0]
    for mutate, call in [(lambda: g.__setitem__("beta1", 0.0), "hyperparameter('beta1', "
                                                               "group=0).set"),
                         (lambda: g.update(beta2=0.5), "hyperparameter('beta2', group=0)"),
                         (lambda: g.__setitem__("lr", 1e-3), "set_learning_rate(lr, group=0)"),
                         (lambda: g.pop("beta1"), "hyperparameter('beta1'"),
                         (lambda: g.clear(), "read-only")]:
        with pytest.raises(TypeError, match=re.escape(call)):
            mutate()
    assert opt.param_groups == [{"params": ["b"], "beta1": 0.9}]
    for other in (copy.copy(opt), copy.deepcopy(opt)):  # copies keep it a group
        assert other.param_groups == opt.param_groups
        with pytest.raises(TypeError, match="read-only"):
            other.param_groups[0]["beta1"] = 0.0
    # adding a group (torch's add_param_group) would be ignored as well
    for add in (lambda: opt.param_groups.append({"params": ["w"], "beta1": 0.0}),
                lambda: opt.param_groups.extend([{"params": ["w"]}]),
                lambda: opt.param_groups.pop()):
        with pytest.raises(TypeError, match="param_groups are fixed when the optimizer is made"):
            add()
    assert len(opt.param_groups) == 1
    # the checked call reaches the step (and only the group's tensors)
    g1 = {"b": np.full(3, 0.1), "w": np.full(3, 0.1)}
    g2 = {"b": np.full(3, -0.3), "w": np.full(3, -0.3)}
    got = {}
    for change in (False, True):
        o = mo.Adam(1e-2, param_groups=[{"params": ["b"], "beta1": 0.9}])
        out, st = o.update({k: v.copy() for k, v in p.items()}, g1, o.init(p))
        if change:
            o.hyperparameter("beta1", group=0).set(0.0)
            assert o.param_groups[0]["beta1"] == 0.0
        got[change], _ = o.update(out, g2, st)
    assert abs(got[True]["b"][0] - got[False]["b"][0]) > 1e-3
    assert got[True]["w"][0] == got[False]["w"][0]


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_state_dict_and_checkpoint_keep_groups(backend, tmp_path):
    """Saved mid-run and loaded into a fresh optimizer built without groups: the groups come
    back by name (a callable one as the names it matched) and the run continues bitwise."""
    p0, grads = problem(steps=12)
    p0 = {k: v.astype(np.float32) for k, v in p0.items()}
    grads = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads]

    def make():
        return mo.AdamW(1e-2, weight_decay=0.1, param_groups=[
            {"params": lambda n: n.endswith("bias"), "weight_decay": 0.0},
            {"params": ["embed.weight"], "learning_rate": 1e-3, "beta1": 0.8}])

    ref = make()
    params = natives(backend, p0)
    state = ref.init(params)
    for t in range(6):
        params, state = ref.update(params, natives(backend, grads[t]), state)
    sd = ref.state_dict(state)
    assert sd["hyperparameters"]["param_groups"][0]["params"] == ["layer1.bias", "norm.bias",
                                                                   "head.bias"]
    save_checkpoint(tmp_path / "c.safetensors", params, ref, state)
    saved = {k: host(v) for k, v in params.items()}
    for t in range(6, 12):
        params, state = ref.update(params, natives(backend, grads[t]), state)
    want = {k: host(v) for k, v in params.items()}

    for how in ("state_dict", "checkpoint"):
        fresh = mo.AdamW(0.5)  # no groups, another lr: both restored
        if how == "state_dict":
            s2 = fresh.load_state_dict(sd, natives(backend, saved))
            p2 = natives(backend, saved)
        else:
            ck = load_checkpoint(tmp_path / "c.safetensors", params_template=natives(backend, saved),
                                 optimizer=fresh)
            p2, s2 = ck["params"], ck["state"]
        assert len(fresh.param_groups) == 2 and fresh.get_learning_rate(1) == pytest.approx(1e-3)
        for t in range(6, 12):
            p2, s2 = fresh.update(p2, natives(backend, grads[t]), s2)
        for k in SHAPES:
            np.testing.assert_array_equal(host(p2[k]), want[k], err_msg=f"{how}: {k}")


def test_first_group_wins_and_unmatched_groups():
    opt = mo.SGD(0.1, param_groups=[{"params": r"bias", "learning_rate": 0.01},
                                    {"params": r"head", "learning_rate": 0.5},
                                    {"params": ["nothing.here"], "learning_rate": 0.2}])
    p = {"head.bias": np.ones(2), "head.weight": np.ones(2)}
    with pytest.warns(UserWarning, match=r"param_groups\[2\] matches no parameter \(unknown names "
                                         r"\['nothing.here'\]\)"):
        state = opt.init(p)
        out, _ = opt.update({k: v.copy() for k, v in p.items()}, {k: np.ones(2) for k in p}, state)
    np.testing.assert_allclose(out["head.bias"], 1 - 0.01)  # group 0 claimed it first
    np.testing.assert_allclose(out["head.weight"], 1 - 0.5)
    strict = mo.SGD(0.1, strict=True, param_groups=[{"params": r"^nothing", "weight_decay": 0.1}])
    st = strict.init(p)
    with pytest.raises(ValueError, match=r"param_groups\[0\] matches no parameter"):
        strict.update(p, {k: np.ones(2) for k in p}, st)
    np.testing.assert_array_equal(p["head.bias"], np.ones(2))


_KERAS_EXCLUDE = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import keras
import numpy as np
keras.config.set_floatx("float64")
names = ["dense.kernel", "dense.bias", "norm.scale", "head.bias"]
rng = np.random.default_rng(0)
p0 = {n: rng.standard_normal(3) for n in names}
grads = [{n: rng.standard_normal(3) for n in names} for _ in range(4)]
opt = keras.optimizers.SGD(0.1, weight_decay=0.5)
opt.exclude_from_weight_decay(var_names=["bias", "no.m"])
vs = [keras.Variable(p0[n], name=n, dtype="float64") for n in names]
for g in grads:
    opt.apply([jnp.asarray(g[n]) for n in names], vs)
print(json.dumps({"p0": {n: p0[n].tolist() for n in names},
                  "grads": [{n: g[n].tolist() for n in names} for g in grads],
                  "keras": {n: np.array(v.value).tolist() for n, v in zip(names, vs)}}))
"""


def test_exclude_var_names_equals_keras_and_unknown_names_warn():
    """``var_names=`` is Keras' rule (one regex of the strings, searched: "no.m" matches
    "norm"), equal to Keras' SGD with ``weight_decay`` (decoupled there; coupled SGD here,
    the same step) run side by side; ``names=`` are exact names, and one that names no
    parameter warns (raises with ``strict``, changing nothing), as a group matching nothing."""
    ref = json.loads(run_python(_KERAS_EXCLUDE, timeout=300).strip().splitlines()[-1])
    p0 = {k: np.array(v) for k, v in ref["p0"].items()}
    opt = mo.SGD(0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_names=["bias", "no.m"])
    params, state = {k: v.copy() for k, v in p0.items()}, opt.init(p0)
    for g in ref["grads"]:
        params, state = opt.update(params, {k: np.array(v) for k, v in g.items()}, state)
    for k, v in ref["keras"].items():
        np.testing.assert_allclose(params[k], v, rtol=1e-13, atol=1e-15, err_msg=k)
    keras_user = mo.SGD(0.1, weight_decay=0.5)
    keras_user.exclude_from_weight_decay(names=["bias"])
    with pytest.warns(UserWarning, match=r"exclude_from_weight_decay entry 0 names unknown "
                                         r"parameters \['bias'\]"):
        keras_user.update({k: v.copy() for k, v in p0.items()},
                          {k: np.zeros(3) for k in p0}, keras_user.init(p0))
    strict = mo.SGD(0.1, weight_decay=0.5, strict=True)
    strict.exclude_from_weight_decay(regex=r"^nothing")
    before = {k: v.copy() for k, v in p0.items()}
    st = strict.init(before)
    with pytest.raises(ValueError, match=r"entry 0 \('\^nothing'\) matches no parameter"):
        strict.update(before, {k: np.ones(3) for k in p0}, st)
    for k in p0:
        np.testing.assert_array_equal(before[k], p0[k])
    assert st.step == 0
    with pytest.raises(TypeError, match="var_names must be a list of strings"):
        opt.exclude_from_weight_decay(var_names="bias")


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"param_groups": [{"params": "x", "nonsense": 1.0}]}, KeyError, r"\['nonsense'\] are not "),
    ({"param_groups": [{"params": "x", "beta1": 1.5}]}, ValueError, r"param_groups\[0\]: beta1"),
    ({"param_groups": [{"params": "x", "learning_rate": 10**400}]}, ValueError, "learning_rate"),
    ({"param_groups": [{"params": "x", "amsgrad": True}]}, ValueError,
     r"amsgrad=True changes Adam's state slots or update rule"),
    ({"param_groups": [{"params": "x", "clip_norm": 1.0}]}, ValueError, "whole step"),
    ({"param_groups": [{"learning_rate": 0.1}]}, KeyError, "no 'params'"),
    ({"param_groups": [{"params": 3}]}, TypeError, "regex string, a list of names or a callable"),
    ({"param_groups": [{"params": "("}]}, ValueError, "not a valid regular expression"),
    ({"param_groups": {"params": "x"}}, TypeError, "list of dicts"),
    ({"param_groups": ["x"]}, TypeError, r"param_groups\[0\] must be a dict"),
    ({"param_groups": [{"params": "x", "learning_rate": 0.1, "lr_scale": 2.0}]}, TypeError,
     "not both"),
    ({"weight_decay_mask": 5}, TypeError, "weight_decay_mask"),
])
def test_bad_groups_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mo.Adam(1e-3, **kwargs)


def test_callable_that_raises_or_returns_non_bool_is_named():
    p = {"w": np.ones(2)}
    bad = mo.SGD(0.1, param_groups=[{"params": lambda n: 1 / 0, "learning_rate": 0.5}])
    st = bad.init(p)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]: the callable raised on "
                                         r"parameter 'w'"):
        bad.update(p, {"w": np.ones(2)}, st)
    np.testing.assert_array_equal(p["w"], np.ones(2))
    odd = mo.SGD(0.1, param_groups=[{"params": lambda n: "yes", "learning_rate": 0.5}])
    with pytest.raises(TypeError, match="must return a bool"):
        odd.update(p, {"w": np.ones(2)}, odd.init(p))


def test_many_groups_one_pass_and_no_recompiles():
    """50 groups: one kernel call per step, equal to 50 separate optimizers; changing group
    learning rates and weight decays compiles nothing new."""
    rng = np.random.default_rng(0)
    names = [f"t{i}" for i in range(100)]
    p0 = {n: rng.standard_normal(7) for n in names}
    grads = [{n: rng.standard_normal(7) for n in names} for _ in range(5)]
    groups = [{"params": [f"t{2 * i}", f"t{2 * i + 1}"], "learning_rate": 1e-3 * (i + 1),
               "weight_decay": 0.01 * (i % 3)} for i in range(50)]
    opt = mo.Adam(1e-2, param_groups=groups)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    compiled = update_kernel.cache_info().currsize
    opt.set_learning_rate(5e-3)
    opt.set_learning_rate(2e-3, group=7)
    for g in grads[1:]:
        params, state = opt.update(params, g, state)
    assert update_kernel.cache_info().currsize == compiled
    for i, grp in enumerate(groups):  # each group as its own optimizer
        sub = {n: p0[n].copy() for n in grp["params"]}
        alone = mo.Adam(grp["learning_rate"], weight_decay=grp["weight_decay"])
        s = alone.init(sub)
        sub, s = alone.update(sub, {n: grads[0][n] for n in sub}, s)
        alone.set_learning_rate(2e-3 if i == 7 else grp["learning_rate"] * 0.5)
        for g in grads[1:]:
            sub, s = alone.update(sub, {n: g[n] for n in sub}, s)
        for n in sub:
            np.testing.assert_allclose(params[n], sub[n], rtol=1e-13, atol=1e-15)


def test_refused_update_with_groups_changes_nothing():
    p0, grads = problem(steps=2)
    opt = mo.AdamW(1e-2, nonfinite="raise", param_groups=[{"params": r"bias", "weight_decay": 0.0}])
    params = {k: v.copy() for k, v in p0.items()}
    params, state = opt.update(params, grads[0], opt.init(params))
    before = {k: v.copy() for k, v in params.items()}
    slots = {s: {k: v.copy() for k, v in state.slot(s).items()} for s in state.slots}
    bad = {**grads[1], "head.bias": np.array([np.nan, 0.0])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match="head.bias"):
            opt.update(params, bad, state)
    for k in SHAPES:
        np.testing.assert_array_equal(params[k], before[k])
        for s in state.slots:
            np.testing.assert_array_equal(state.slot(s)[k], slots[s][k])


def test_a_group_matching_nothing_warns_once_not_at_every_group_change():
    """The rows are resolved anew whenever a group's value changes: a per-group scheduler
    made a group matching no parameter warn at every step."""
    opt = mo.Adam(learning_rate=0.1, param_groups=[{"params": ["absent"], "learning_rate": 0.2}])
    p = {"a": np.ones(3)}
    st = opt.init(p)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(4):
            opt.set_learning_rate(0.2 + 0.01 * i, group=0)
            p, st = opt.update(p, {"a": np.ones(3)}, st)
    assert [str(w.message) for w in seen] == [
        "Adam: param_groups[0] matches no parameter (unknown names ['absent'])"]
