"""``optax_transformation(opt, traced_hyperparams=...)``: float hyperparameters read at every
update (``update(..., hyper=pairs)``) instead of baked in, so a per-step schedule of them
compiles once: against torch.optim changing the same hyperparameters in its param_groups
(float64) at every step, with the precision of ``1 − β`` kept in float32; and the refusals
of what cannot be traced."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import set_traced

import mithril.utils.optimizers as catalog
from mithril.interop import optax_transformation
from mithril.interop.optax_hyperparams import floats, pair, value
from mithril.interop.optax_special import classify
from mithril.utils.optimizers import SGD, Adam, AdamW, Muon
from mithril.utils.optimizers.base import Optimizer

STEPS = 6


def data() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((5, 4)), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


def ours(opt: Any, traced: tuple[str, ...], change: Any, problem: tuple | None = None,
         scalars: str = "auto") -> tuple[dict[str, np.ndarray], int]:
    """STEPS jitted updates in float32, ``change(opt, i)`` before step i (its values passed
    as ``hyper``); the final params and how many programs were compiled. ``problem``:
    (params, gradients), :func:`data`'s by default."""
    params, grads = problem or data()
    tx = optax_transformation(opt, traced_hyperparams=traced, scalars=scalars)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(p)
    upd = jax.jit(lambda g, s, p, h: tx.update(g, s, p, new_params=True, hyper=h))
    for i in range(STEPS):
        change(opt, i)
        h = jnp.asarray(np.stack([pair(value(opt, k), np.float32) for k in sorted(traced)])
                        ) if traced else None
        p, state = upd({k: jnp.asarray(v, jnp.float32) for k, v in grads[i].items()},
                       state, p, h)
    return {k: np.asarray(v, np.float64) for k, v in p.items()}, upd._cache_size()


def torch_run(make: Any, change: Any) -> dict[str, np.ndarray]:
    """The same steps with torch.optim in float64, ``change(groups, i)`` on its groups."""
    params, grads = data()
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = make(tp)
    for i in range(STEPS):
        change(opt.param_groups, i)
        for k, t in tp.items():
            t.grad = torch.tensor(grads[i][k])
        opt.step()
    return {k: t.detach().numpy() for k, t in tp.items()}


def close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-7, err_msg=k)


def test_betas_and_decay_every_step_against_torch() -> None:
    """AdamW with β₁, β₂ (0.999 and below: 1 − β₂ is where float32 would lose 1e-5) and the
    weight decay changed at every step, one program for all of them."""
    def betas(i: int) -> tuple[float, float]:
        return 0.9 - 0.03 * i, 0.999 - 0.0005 * i

    def mine(opt: Any, i: int) -> None:
        opt.beta1, opt.beta2 = betas(i)
        opt.weight_decay = 0.01 * (i + 1)

    def theirs(groups: list, i: int) -> None:
        for g in groups:
            g["betas"], g["weight_decay"] = betas(i), 0.01 * (i + 1)

    got, programs = ours(AdamW(1e-2), ("beta1", "beta2", "weight_decay"), mine)
    want = torch_run(lambda p: torch.optim.AdamW(list(p.values()), lr=1e-2), theirs)
    close(got, want)
    assert programs == 1


def test_a_groups_learning_rate_every_step_against_torch() -> None:
    """A torch-style per-group schedule: group 0's learning rate (its lr_scale) and the
    optimizer's momentum changed at every step."""
    def mine(opt: Any, i: int) -> None:
        opt.set_learning_rate(0.05 / (i + 1), group=0)
        opt.momentum = 0.9 - 0.1 * i

    def theirs(groups: list, i: int) -> None:  # (torch's group 1 holds "b")
        groups[1]["lr"] = 0.05 / (i + 1)
        for g in groups:
            g["momentum"] = 0.9 - 0.1 * i

    opt = SGD(1e-2, momentum=0.9, param_groups=[{"params": ["b"]}])
    got, programs = ours(opt, ("momentum", "param_groups[0].lr_scale"), mine)
    want = torch_run(lambda p: torch.optim.SGD(
        [{"params": [p["w"]]}, {"params": [p["b"]]}], lr=1e-2, momentum=0.9), theirs)
    close(got, want)
    assert programs == 1


def elementwise_catalog() -> list[str]:
    out = []
    for n in catalog.__all__:
        c = getattr(catalog, n)
        if isinstance(c, type) and issubclass(c, Optimizer) and c is not Optimizer \
                and n not in ("LBFGS", "PolyakSGD", "Momo", "MomoAdam", "SAM", "Mechanize", "ScheduleFree",
                              "DPSGD", "DifferentiallyPrivate") \
                and classify(make(n)) == "elementwise":  # (the loss-aware: their own tests;
            # SAM, Mechanize: no transformation, tests/test_optimizers_mechanize_sam.py)
            out.append(n)
    return out


def make(name: str, **kw: Any) -> Any:
    cls = getattr(catalog, name)
    if name == "Lookahead":
        return cls(Adam(learning_rate=1e-2, **kw), sync_period=3)
    return cls(learning_rate=1e-2, **kw)


@pytest.mark.parametrize("name", elementwise_catalog())
def test_every_float_traced_gives_the_baked_steps(name: str) -> None:
    """What make_train_step's program does from the first change of any hyperparameter:
    every float one of the optimizer traced (:func:`floats`) gives the steps of the same
    transformation with them baked in, for every elementwise optimizer of the catalog (with
    weight decay and clipping where it takes them), and each is read."""
    try:
        opt = make(name, weight_decay=0.02, clip_norm=2.0)
    except TypeError:
        opt = make(name)
    names = floats(opt)
    assert names or name in ("Rprop", "SGD")
    assert name != "Lookahead" or {"beta1", "slow_step_size"} <= set(names)
    every_float_read(opt)


#: configurations whose per-step scalars took a host callback once their floats were traced
#: (a branch on the step or on a momentum, an ln of a traced β₂), or at all (Lookahead's)
IN_THE_PROGRAM = {
    "SGD-momentum": lambda: SGD(1e-2, momentum=0.9),
    "SGD-nesterov": lambda: SGD(1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
    "SGD-dampening": lambda: SGD(1e-2, momentum=0.9, dampening=0.1),
    "RMSProp-momentum-centered": lambda: catalog.RMSProp(1e-2, momentum=0.9, centered=True),
    "RAdam": lambda: catalog.RAdam(1e-2, weight_decay=0.01),
    "ADOPT": lambda: catalog.ADOPT(1e-2),
    "Lookahead-Adam-reset": lambda: catalog.Lookahead(Adam(1e-2), sync_period=2,
                                                      reset_state=True),
    "Lookahead-SGD": lambda: catalog.Lookahead(SGD(1e-2, momentum=0.9), sync_period=3),
}


@pytest.mark.parametrize("name", list(IN_THE_PROGRAM))
def test_traced_floats_keep_the_scalars_in_the_program(name: str) -> None:
    """With every float traced, these optimizers' per-step scalars are computed in the
    program (``scalars="traced"`` refuses a host callback), equal to the baked steps and,
    each float changed from step 3, to the optimizer's own steps."""
    opt = IN_THE_PROGRAM[name]()
    assert floats(opt)
    every_float_read(opt, scalars="traced")


def every_float_read(opt: Any, scalars: str = "auto") -> None:
    """``opt``'s floats (:func:`floats`) traced give the baked steps, and changed from step
    3 (through the optimizer's handles: a Lookahead's reach its inner's), its own."""
    names = floats(opt)
    assert all(value(opt, k) != 0 for k in names)
    want, _ = ours(opt, (), lambda o, i: None)
    got, programs = ours(opt, names, lambda o, i: None, scalars=scalars)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-6, err_msg=k)
    assert programs == 1
    # and each is read: all of them changed from step 3 on, against the optimizer's own steps
    start = {k: value(opt, k) for k in names}

    def change(o: Any, i: int) -> None:
        for k in names:
            o.hyperparameter(k).set(start[k] * (0.97 if i >= 3 else 1.0))

    got, programs = ours(opt, names, change, scalars=scalars)
    for k in names:
        opt.hyperparameter(k).set(start[k])
    params, grads = data()
    state = opt.init(params)
    for i in range(STEPS):
        change(opt, i)
        params, state = opt.update(params, grads[i], state)
    for k in params:
        np.testing.assert_allclose(got[k], params[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert programs == 1


def muon_excluding(**kw: Any) -> Muon:
    opt = Muon(1e-2, ns_dtype="float32", weight_decay=0.1, **kw)
    opt.exclude_from_weight_decay(["w"])
    return opt


@pytest.mark.parametrize("make", [
    lambda: Muon(1e-2, ns_dtype="float32", clip_norm=5.0, clip_value=1.0),
    lambda: Muon(1e-2, ns_dtype="float32", nesterov=False, fallback=None),
    lambda: Muon(1e-2, ns_dtype="float32", fallback=catalog.SGD(
        1e-2, momentum=0.9, weight_decay=1e-3, param_groups=[
            {"params": ["b"], "momentum": 0.5, "learning_rate": 3e-2}])),
    lambda: Muon(1e-2, ns_dtype="float32", param_groups=[{"params": ["w"], "momentum": 0.5}]),
    lambda: muon_excluding(fallback=catalog.AdamW(1e-3, weight_decay=0.05)),
    lambda: catalog.Adafactor(1e-2, clip_norm=3.0, weight_decay=0.05)],
    ids=["muon", "muon-plain", "muon-fallback-groups", "muon-group", "muon-excluding",
         "adafactor"])
def test_a_per_tensor_optimizers_floats_every_step(make: Any) -> None:
    """Muon's momentum (a warm-up) and ε, its fallback's hyperparameters (its groups' too)
    and ``fallback_lr_ratio``, Adafactor's β₂ decay and d, the clipping's bounds and the
    decoupled weight decay, all changed at every step: one program, the steps of the
    optimizer's own update with the same changes. A group's own value, and the 0 of a
    tensor excluded from weight decay, stay theirs."""
    opt = make()
    names = floats(opt)
    assert {"momentum", "epsilon"} <= set(names) or {"beta2_decay", "d",
                                                      "weight_decay"} <= set(names)
    if getattr(opt, "fallback", None) is not None:
        assert {"fallback_lr_ratio", "fallback.weight_decay"} <= set(names)
    start = {k: value(opt, k) for k in names}

    def change(o: Any, i: int) -> None:
        for k in names:
            set_traced(o, k, start[k] * (1 - 0.03 * i))

    params, grads = data()
    if getattr(opt, "fallback", 1) is None:  # (matrices only)
        params, grads = {"w": params["w"]}, [{"w": g["w"]} for g in grads]
    got, programs = ours(opt, names, change, (params, grads))
    eager = make()
    p = {k: v.astype(np.float32) for k, v in params.items()}
    state = eager.init(p)
    for i in range(STEPS):
        change(eager, i)
        p, state = eager.update(p, {k: v.astype(np.float32) for k, v in grads[i].items()}, state)
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=1e-5, atol=2e-6, err_msg=k)
    assert programs == 1
    baked, _ = ours(make(), (), lambda o, i: None, (params, grads))
    assert max(float(np.max(np.abs(baked[k] - got[k]))) for k in got) > 1e-4


def test_floats_leaves_out_zeros_and_what_is_not_a_float() -> None:
    opt = AdamW(1e-2, weight_decay=0.0, clip_norm=1.0, param_groups=[
        {"params": ["b"], "beta1": 0.8}, {"params": ["w"], "learning_rate": 2e-2}])
    assert floats(opt) == ("beta1", "beta2", "clip_norm", "epsilon",
                           "param_groups[0].beta1", "param_groups[0].beta2",
                           "param_groups[0].epsilon", "param_groups[0].lr_scale",
                           "param_groups[1].beta1", "param_groups[1].beta2",
                           "param_groups[1].epsilon", "param_groups[1].lr_scale")
    # Ftrl's learning_rate_power of -0.5 picks a square root: not traced (at another, it is)
    assert floats(catalog.Ftrl(1e-2)) == ("initial_accumulator_value",)
    assert "learning_rate_power" in floats(catalog.Ftrl(1e-2, learning_rate_power=-0.6))


def test_the_pair_keeps_float64() -> None:
    hi, lo = pair(0.999, np.float32)
    assert hi.dtype == np.float32 and float(hi) != 0.999
    assert abs(float(hi) + float(lo) - 0.999) < 1e-15


@pytest.mark.parametrize("opt, names, error, match", [
    (Adam(1e-2), ("beta3",), KeyError, "no hyperparameter 'beta3'"),
    (Adam(1e-2), ("learning_rate",), ValueError, "the state's own"),
    (Adam(1e-2), ("clip_norm",), TypeError, "clip_norm=None is not a number"),
    (Adam(1e-2, ema_decay=0.99, ema_every=2), ("ema_every",), TypeError, "ema_every=2"),
    (Adam(1e-2), ("param_groups[0].beta1",), KeyError, "no group 0"),
    (Adam(1e-2, param_groups=[{"params": ["b"]}]), ("param_groups[0].clip_norm",), ValueError,
     "cannot differ per group"),
    (Adam(1e-2), "beta1", TypeError, "a sequence of names"),
    (Muon(1e-2), ("ns_steps",), TypeError, "per-tensor update bakes 'ns_steps'"),
    (Muon(1e-2), ("fallback.amsgrad",), TypeError, "Muon's 'fallback.amsgrad': AdamW: amsgrad"),
    (Muon(1e-2), ("fallback.beta3",), KeyError, "'fallback.beta3': AdamW has no hyperparameter"),
    (Muon(1e-2, fallback=None), ("fallback_lr_ratio",), TypeError, "ratio=None is not a number"),
    (Muon(1e-2, param_groups=[{"params": ["b"], "momentum": 0.9}]),
     ("param_groups[0].momentum",), TypeError, "optimizer-wide"),
    (catalog.Adafactor(1e-2, weight_decay=0.1), ("clip_tensor_norm",), ValueError,
     "cannot be traced"),
    (Adam(1e-2, clip_tensor_norm=1.0), ("clip_tensor_norm",), ValueError, "cannot be traced"),
    (Adam(1e-2, adaptive_clip=0.1), ("adaptive_clip_eps",), ValueError, "cannot be traced"),
    (catalog.Ftrl(1e-2), ("learning_rate_power",), ValueError, "-0.5 picks its update rule"),
    (SGD(1e-2, momentum=0.0), ("momentum",), ValueError, "momentum=0.0 picks its update rule"),
])
def test_what_cannot_be_traced_is_refused(opt: Any, names: Any, error: type,
                                          match: str) -> None:
    with pytest.raises(error, match=match):
        optax_transformation(opt, traced_hyperparams=names)


def test_hyper_must_match_the_names() -> None:
    tx = optax_transformation(Adam(1e-2), traced_hyperparams=("beta1",))
    p = {"w": jnp.ones(3)}
    state = tx.init(p)
    with pytest.raises(ValueError, match=r"\['beta1'\] \(shape \(1, 2\)\), got shape \(0, 2\)"):
        tx.update(p, state, p)
