"""Muon review: optax's one ``eps`` and Muon's parameter groups against optax, torch's
parameter groups through ``torch_optimizer`` against ``torch.optim.Muon``, side by side.

* ``Muon(convention="optax")``'s default fallback takes Muon's ``epsilon`` (optax's one
  ``eps``): setting the fallback's own is refused, naming ``fallback.epsilon``, and changes
  nothing; Muon's epsilon set, scheduled, saved and loaded still moves both.
* A Muon parameter group under the optax convention is ``optax.partition`` over one
  ``optax.contrib.muon`` per group: its learning rate and ``eps`` reach the group's
  fallback tensors too (optax's ``adam_learning_rate`` defaults to Muon's, ``eps`` is one),
  its ``weight_decay`` and ``momentum`` stay Muon's (optax's ``adam_weight_decay`` and
  ``adam_b1`` are apart). float64, 12 steps, 1e-10 on NumPy, torch, JAX,
  ``optax_transformation`` (its ``"epsilon"`` traced too) and ``torch_optimizer``.
* ``torch_optimizer(Muon(fallback=None), torch's groups)`` with a per-group lr,
  weight_decay, adjust_lr_fn, ns_steps, momentum, nesterov and eps is ``torch.optim.Muon``
  to the bit over 20 steps in float32 and float64 under ``StepLR``, its state dict loaded
  into torch's mid-run and torch's into ours (it was refused: torch's groups repeat every
  Muon-wide value, such as ``convention``).
"""

from __future__ import annotations

import copy
import functools
import io

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import optax.contrib as oc  # noqa: E402
from conftest import jax_float64  # noqa: E402
from optimizer_parity import optax_trajectory  # noqa: E402

from mithril.interop import optax_transformation, torch_optimizer  # noqa: E402
from mithril.interop.optax_hyperparams import pair  # noqa: E402
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mithril.utils.lr_schedulers import StepLR  # noqa: E402
from mithril.utils.optimizers import Muon, NAdam  # noqa: E402
from mithril.utils.optimizers.engines import tensorwise_jit  # noqa: E402

TOL, STEPS, LR = 1e-10, 12, 0.02
SHAPES = {"l1.w": (4, 6), "l1.b": (6,), "l2.w": (6, 3), "l2.b": (3,)}
rng = np.random.default_rng(47)
P0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
GRADS = [{k: rng.standard_normal(s) * (1 + t % 3) for k, s in SHAPES.items()}
         for t in range(STEPS)]
L1 = ["l1.w", "l1.b"]
LABELS = {k: "g" if k in L1 else "rest" for k in SHAPES}


def _host(p: dict) -> dict:
    return {k: v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
            for k, v in p.items()}


def ours(opt: Muon, path: str, monkeypatch, grads=GRADS) -> dict:
    """``opt`` over ``grads`` from P0 on one path; the final params."""
    if path == "optax_transformation":
        return optax_trajectory(optax_transformation(opt), P0, grads)[-1]
    if path == "torch_optimizer":
        tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in P0.items()}
        topt = torch_optimizer(opt, list(tp.items()))
        for g in grads:
            for k, p in tp.items():
                p.grad = torch.tensor(g[k])
            topt.step()
        return _host(tp)
    monkeypatch.setattr(tensorwise_jit, "ENABLED", True)
    conv = {"numpy": np.asarray, "torch": torch.tensor, "jax": jnp.asarray}[path]
    p = {k: conv(v) for k, v in P0.items()}
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, {k: conv(v) for k, v in g.items()}, state)
    return _host(p)


def close(got: dict, want: dict, tol: float = TOL) -> None:
    for k in want:
        assert np.abs(want[k] - P0[k]).max() > 1e-2, k  # (it moved)
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)


# ---------------------------------------------------------------------------------------
# 1. optax's one eps: the following fallback's own epsilon is Muon's to set
# ---------------------------------------------------------------------------------------

def test_following_fallbacks_epsilon_set_there_is_refused_and_changes_nothing() -> None:
    """Set on the fallback (by attribute or the handle a scheduler drives) it would split
    optax's one eps silently: refused, naming ``fallback.epsilon`` and Muon's ``epsilon``,
    nothing changed, and the run is still optax's (eps 1e-8 on both branches)."""
    opt = Muon(LR, convention="optax")
    p = {k: v.copy() for k, v in P0.items()}
    state = opt.init(p)
    p, state = opt.update(p, GRADS[0], state)
    before = (copy.deepcopy(opt.hyperparameters()), opt.fallback.__dict__.get("_hyper_version"),
              opt.fallback.epsilon)
    handle = opt.fallback.hyperparameter("eps")
    for refused in (lambda: setattr(opt.fallback, "epsilon", 1e-3),
                    lambda: handle.set_learning_rate(1e-3),
                    lambda: opt.fallback.hyperparameter("epsilon").check(1e-3)):
        with pytest.raises(ValueError, match=r"fallback\.epsilon: .*set Muon's epsilon"):
            refused()
        assert (opt.hyperparameters(), opt.fallback.__dict__.get("_hyper_version"),
                opt.fallback.epsilon) == before
    for g in GRADS[1:]:
        p, state = opt.update(p, g, state)
    with jax_float64():
        close(p, optax_trajectory(oc.muon(LR), P0, GRADS)[-1])


def test_muons_epsilon_still_moves_both_through_every_way_in(tmp_path) -> None:
    """Muon's epsilon set, scheduled (a scheduler on its handle) and loaded from a state
    dict or a checkpoint reaches the fallback, which still refuses its own; a fallback
    given (not following) keeps its own, settable."""
    opt = Muon(LR, convention="optax")
    opt.epsilon = 1e-5
    assert opt.fallback.epsilon == 1e-5
    sched = StepLR(opt.hyperparameter("epsilon"), step_size=1, gamma=0.5)
    sched.step()
    assert opt.fallback.epsilon == opt.epsilon == 5e-6
    params = {k: v.copy() for k, v in P0.items()}
    state = opt.init(params)
    save_checkpoint(tmp_path / "m.safetensors", params, opt, state)
    loaded, from_file = Muon(convention="optax"), Muon(convention="optax")
    loaded.load_state_dict(opt.state_dict(state), params)
    load_checkpoint(tmp_path / "m.safetensors", params, from_file)
    for again in (loaded, from_file, copy.deepcopy(opt)):
        assert again.fallback.epsilon == 5e-6
        with pytest.raises(ValueError, match=r"fallback\.epsilon"):
            again.fallback.epsilon = 1.0
        again.epsilon = 2e-4
        assert again.fallback.epsilon == 2e-4 and opt.fallback.epsilon == 5e-6
    given = Muon(convention="optax", fallback=NAdam(convention="optax",
                                                    decoupled_weight_decay=True))
    given.fallback.epsilon = 1e-3  # (its own: Muon's is apart)
    assert given.fallback.epsilon == 1e-3 and given.epsilon == 1e-8


# ---------------------------------------------------------------------------------------
# 2. a Muon group under the optax convention: optax.partition over one muon per group
# ---------------------------------------------------------------------------------------

GROUP = {"learning_rate": 0.05, "epsilon": 1e-2, "weight_decay": 0.3, "momentum": 0.8}


def group_pair(fallback_lr_ratio: float | None) -> tuple[Muon, optax.GradientTransformation]:
    mine = Muon(LR, convention="optax", weight_decay=0.1, fallback_lr_ratio=fallback_lr_ratio,
                param_groups=[{"params": L1, **GROUP}])
    ratio = fallback_lr_ratio
    theirs = optax.partition({
        "g": oc.muon(0.05, eps=1e-2, weight_decay=0.3, beta=0.8,
                     adam_learning_rate=None if ratio is None else 0.05 * ratio),
        "rest": oc.muon(LR, weight_decay=0.1,
                        adam_learning_rate=None if ratio is None else LR * ratio)}, LABELS)
    return mine, theirs


@functools.cache
def partition_run(ratio: float | None) -> dict:
    with jax_float64():
        return optax_trajectory(group_pair(fallback_lr_ratio=ratio)[1], P0, GRADS)[-1]


@pytest.mark.parametrize("path, ratio", [
    ("numpy", None), ("numpy", 0.5), ("torch", None), pytest.param(
        "jax", None, marks=pytest.mark.slow), ("optax_transformation", 0.5),
    ("torch_optimizer", None)])
def test_a_groups_lr_and_eps_reach_its_fallback_tensors_as_optax_partition(
        path: str, ratio: float | None, monkeypatch) -> None:
    """optax has no groups: one ``muon`` per group under ``optax.partition`` is what a
    group means there. The group's bias ``l1.b`` takes its learning rate (times
    ``fallback_lr_ratio``) and its eps (it took Muon's: 0.3 off)."""
    mine = group_pair(fallback_lr_ratio=ratio)[0]
    with jax_float64():
        close(ours(mine, path, monkeypatch), partition_run(ratio))


def test_a_groups_eps_stays_when_muons_epsilon_is_traced() -> None:
    """``optax_transformation(traced_hyperparams=("epsilon",))``: the traced eps is Muon's
    and its following fallback's, but not a group's that has its own (matrices and fallback
    tensors alike), as ``partition({g: muon(eps=1e-2), rest: inject_hyperparams(muon)})``."""
    def eps(i: int) -> float:
        return 1e-2 / (1 + i) ** 2

    mine = Muon(LR, convention="optax", param_groups=[{"params": L1, "epsilon": 1e-3}])
    with jax_float64():
        tx = optax_transformation(mine, traced_hyperparams=("epsilon",))
        p = {k: jnp.asarray(v) for k, v in P0.items()}
        s = tx.init(p)
        step = jax.jit(lambda g, s, p, h: tx.update(g, s, p, new_params=True, hyper=h))
        for i, g in enumerate(GRADS):
            h = jnp.asarray(pair(eps(i), np.float64)[None])
            p, s = step({k: jnp.asarray(v) for k, v in g.items()}, s, p, h)
        theirs = optax.partition({"g": oc.muon(LR, eps=1e-3),
                                  "rest": optax.inject_hyperparams(oc.muon)(LR, eps=eps)},
                                 LABELS)
        want = optax_trajectory(theirs, P0, GRADS)[-1]
    close({k: np.asarray(v) for k, v in p.items()}, want)


def test_torch_conventions_groups_stay_muons_own() -> None:
    """Under torch's convention Muon's groups are ``torch.optim.Muon``'s (its matrices'),
    the fallback's groups AdamW's, as torch pairs them: a Muon group's lr and eps (the
    Newton-Schulz one) leave the fallback's tensors as they were."""
    a = Muon(LR, param_groups=[{"params": L1, "learning_rate": 0.5, "epsilon": 0.5}])
    b = Muon(LR)
    pa, _ = a.update(P0, GRADS[0], a.init(P0))
    pb, _ = b.update(P0, GRADS[0], b.init(P0))
    np.testing.assert_array_equal(pa["l1.b"], pb["l1.b"])
    assert np.abs(pa["l1.w"] - pb["l1.w"]).max() > 1e-2


# ---------------------------------------------------------------------------------------
# 3. torch's parameter groups through torch_optimizer against torch.optim.Muon
# ---------------------------------------------------------------------------------------

def _torch_groups(m: torch.nn.Sequential) -> list[dict]:
    return [{"params": [m[0].weight], "lr": 0.05, "weight_decay": 0.0,
             "adjust_lr_fn": "match_rms_adamw", "ns_steps": 3},
            {"params": [m[2].weight], "momentum": 0.8, "nesterov": False, "eps": 1e-3},
            {"params": [m[4].weight]}]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_groups_equal_torch_muon_with_a_scheduler_and_state_dicts_both_ways(
        dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    make = [torch.nn.Linear(5, 8, bias=False), torch.nn.Tanh(),
            torch.nn.Linear(8, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 3, bias=False)]
    ref_model = torch.nn.Sequential(*make).to(dtype)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x, y = torch.randn(32, 5, generator=gen, dtype=dtype), torch.randn(32, 3, generator=gen,
                                                                       dtype=dtype)

    def run(m, o, s, n):
        for _ in range(n):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            s.step()

    def sched(o):
        return torch.optim.lr_scheduler.StepLR(o, 4, 0.5)

    def same(a, b):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)

    models = [copy.deepcopy(ref_model) for _ in range(4)]
    theirs = torch.optim.Muon(_torch_groups(models[0]), lr=0.02, weight_decay=0.1)
    mine = torch_optimizer(Muon(0.02, weight_decay=0.1, fallback=None),
                           _torch_groups(models[1]))
    s_theirs, s_mine = sched(theirs), sched(mine)
    run(models[0], theirs, s_theirs, 10)
    run(models[1], mine, s_mine, 10)
    same(models[0], models[1])
    # mid-run: ours into a new torch.optim.Muon, torch's into a new wrapper
    for m, src in ((models[2], models[1]), (models[3], models[0])):
        with torch.no_grad():
            for p, q in zip(m.parameters(), src.parameters()):
                p.copy_(q)
    back = torch.optim.Muon(_torch_groups(models[2]), lr=0.02)
    buf = io.BytesIO()
    torch.save(mine.state_dict(), buf)
    back.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    fwd = torch_optimizer(Muon(0.02, fallback=None), _torch_groups(models[3]))
    fwd.load_state_dict(theirs.state_dict())
    s_back, s_fwd = sched(back), sched(fwd)
    s_back.load_state_dict(s_mine.state_dict())
    s_fwd.load_state_dict(s_theirs.state_dict())
    for m, o, s in zip(models, (theirs, mine, back, fwd), (s_theirs, s_mine, s_back, s_fwd)):
        run(m, o, s, 10)
    assert theirs.param_groups[0]["lr"] == mine.param_groups[0]["lr"] == 0.05 * 0.5 ** 5
    for m in models[1:]:
        same(models[0], m)
    # a Muon-wide value changed in one group: refused at the step, naming it; nothing moved
    before = [p.detach().clone() for p in models[1].parameters()]
    mine.param_groups[1]["ns_dtype"] = "float32"
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['ns_dtype'\]"):
        run(models[1], mine, s_mine, 1)
    for p, q in zip(models[1].parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_a_group_restating_muons_own_value_is_taken_and_one_changing_it_refused() -> None:
    """A group restating Muon's own value changes nothing (torch's groups repeat them all),
    one with another is refused, naming it."""
    same = Muon(fallback=None, param_groups=[{
        "params": ["a"], "convention": "torch", "fallback": None, "ns_dtype": "bfloat16",
        "exclude_layers": []}])
    assert "convention" not in same.param_groups[0]
    for k, v in (("ns_dtype", "float32"), ("fallback", None), ("fallback_lr_ratio", 2.0),
                 ("convention", "mlx")):
        with pytest.raises(ValueError, match=rf"param_groups\[0\].*{k}"):
            Muon(param_groups=[{"params": ["a"], k: v}])


def test_add_param_group_equals_torch_muons() -> None:
    """A group added mid-run (its own lr and ns_steps) through ``torch_optimizer`` of a
    Muon without fallback: ``torch.optim.Muon.add_param_group``'s steps, to the bit."""
    gen = torch.Generator().manual_seed(1)
    m1 = torch.nn.Sequential(torch.nn.Linear(5, 8, bias=False),
                             torch.nn.Linear(8, 3, bias=False)).double()
    m2 = copy.deepcopy(m1)
    x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    mine = torch_optimizer(Muon(0.02, fallback=None), [m1[0].weight])
    theirs = torch.optim.Muon([m2[0].weight], lr=0.02)

    def run(n):
        for m, o in ((m1, mine), (m2, theirs)):
            for _ in range(n):
                o.zero_grad()
                m(x).pow(2).mean().backward()
                o.step()

    run(3)
    start = m1[1].weight.detach().clone()
    mine.add_param_group({"params": [m1[1].weight], "lr": 0.05, "ns_steps": 3})
    theirs.add_param_group({"params": [m2[1].weight], "lr": 0.05, "ns_steps": 3})
    run(5)
    assert (m1[1].weight - start).abs().max() > 1e-3  # (the added group moved)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_following_fallbacks_own_state_dict_cannot_split_eps() -> None:
    opt = Muon(convention="optax")
    sd = opt.fallback.state_dict(None)
    sd["hyperparameters"]["epsilon"] = 1e-3
    with pytest.raises(ValueError, match=r"fallback\.epsilon"):
        opt.fallback.load_state_dict(sd)
    assert opt.fallback.epsilon == opt.epsilon == 1e-8  # nothing changed
    sd["hyperparameters"]["epsilon"] = 1e-8  # Muon's own value: taken
    opt.fallback.load_state_dict(sd)
    whole = opt.state_dict(None)  # Muon's own state dict moves both
    whole["hyperparameters"]["epsilon"] = 1e-4
    opt.load_state_dict(whole)
    assert opt.fallback.epsilon == opt.epsilon == 1e-4


@pytest.mark.parametrize("group, theirs", [
    ({"learning_rate": 0.05, "scale": 0.5}, {"learning_rate": 0.05, "scale": 0.5}),
    ({"beta1": 0.8, "epsilon": 1e-3}, {"learning_rate": LR, "base_optimizer": "adam"})])
def test_galore_groups_equal_optax_partition(group: dict, theirs: dict) -> None:
    """GaLore's groups (a matrix and a vector each) against ``optax.partition`` over one
    ``optax.contrib.galore`` per group (its ``scale_by_adam``'s b1 / eps), float64."""
    from mithril.utils.optimizers import GaLore

    if theirs.get("base_optimizer") == "adam":
        theirs = {**theirs, "base_optimizer": optax.scale_by_adam(b1=0.8, eps=1e-3)}
    shapes = {"l1.w": (8, 6), "l1.b": (6,), "l2.w": (6, 5), "l2.b": (5,)}
    r = np.random.default_rng(3)
    p0 = {k: r.standard_normal(s) for k, s in shapes.items()}
    grads = [{k: r.standard_normal(s) for k, s in shapes.items()} for _ in range(STEPS)]
    mine = GaLore(LR, rank=2, update_proj_gap=5, param_groups=[{"params": L1, **group}])
    tx = optax.partition({"g": oc.galore(rank=2, update_proj_gap=5, **theirs),
                          "rest": oc.galore(LR, rank=2, update_proj_gap=5)}, LABELS)
    p, state = dict(p0), mine.init(p0)
    for g in grads:
        p, state = mine.update(p, g, state)
    with jax_float64():
        want = optax_trajectory(tx, p0, grads)[-1]
    for k in want:
        np.testing.assert_allclose(p[k], want[k], rtol=TOL, atol=TOL, err_msg=k)
        assert np.abs(want[k] - p0[k]).max() > 1e-2, k


def test_galore_takes_torchs_groups_as_optax_partition() -> None:
    """``torch_optimizer(GaLore(...), torch's groups)``: it was refused (torch's groups
    repeat ``rank`` and ``weight_dimension_numbers``); a group's lr against
    ``optax.partition`` over one galore per group, float64."""
    from mithril.utils.optimizers import GaLore

    r = np.random.default_rng(4)
    p0 = {"l1.w": r.standard_normal((8, 6)), "l1.b": r.standard_normal(6),
          "l2.w": r.standard_normal((6, 5)), "l2.b": r.standard_normal(5)}
    grads = [{k: r.standard_normal(v.shape) for k, v in p0.items()} for _ in range(STEPS)]
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    topt = torch_optimizer(GaLore(LR, rank=2, update_proj_gap=5), [
        {"params": [tp["l1.w"], tp["l1.b"]], "lr": 0.05}, {"params": [tp["l2.w"], tp["l2.b"]]}])
    for g in grads:
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        topt.step()
    tx = optax.partition({"g": oc.galore(0.05, rank=2, update_proj_gap=5),
                          "rest": oc.galore(LR, rank=2, update_proj_gap=5)}, LABELS)
    with jax_float64():
        want = optax_trajectory(tx, p0, grads)[-1]
    for k in want:
        np.testing.assert_allclose(tp[k].detach().numpy(), want[k], rtol=TOL, atol=TOL,
                                   err_msg=k)
