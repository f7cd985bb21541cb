"""``mithril.interop.optax_transformation`` for the optimizers that override ``init`` /
``update``: schedule-free SGD / AdamW and Prodigy (elementwise, with a ``tensor_scalars``
computed on the host), Muon and Adafactor (tensorwise); LBFGS refused. Each is run 20
steps under ``jax.jit`` in float32 against our optimizer on the JAX backend."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from test_interop_optax import (  # noqa: E402
    P0,
    SHAPES,
    STEPS,
    TOL,
    flat_of,
    grads,
    nested,
    rel_error,
)

from mithril.errors import ShapeError  # noqa: E402
from mithril.interop import OptaxState, optax_transformation  # noqa: E402
from mithril.interop.optax_transform import (  # noqa: E402
    scalars_on_host,
    schedule_free_eval_params,
)
from mithril.utils.optimizers import (  # noqa: E402
    ADOPT,
    LBFGS,
    SGD,
    Adafactor,
    Adan,
    Muon,
    Prodigy,
    RAdam,
    ScheduleFreeAdamW,
    ScheduleFreeSGD,
    engines,
)


@pytest.fixture(autouse=True)
def _jitted_engine(monkeypatch):
    monkeypatch.setattr(engines, "JAX_ENGINE", "jit")


CONFIGS = {
    "sf-sgd": lambda: ScheduleFreeSGD(1e-2, weight_decay=1e-2),
    # a group with its own beta1 keeps it; the others take state.hyperparams["beta1"]
    "sf-adamw-groups": lambda: ScheduleFreeAdamW(1e-2, param_groups=[
        {"params": "layer/b", "learning_rate": 2e-2, "beta1": 0.8}]),
    # the warm-up (its branch on the step: traced, or on the host in float64)
    "sf-sgd-warmup": lambda: ScheduleFreeSGD(1e-1, warmup_steps=5),
    "prodigy": lambda: Prodigy(1.0, estim_lr0=1e-3, weight_decay=1e-2),
    "prodigy-groups": lambda: Prodigy(1.0, estim_lr0=1e-3, safeguard_warmup=True,
                                      param_groups=[{"params": "^out/", "learning_rate": 0.5}]),
    "muon": lambda: Muon(1e-2),  # bfloat16 Newton-Schulz, AdamW for the vectors
    "muon-fallback-sgd": lambda: Muon(1e-2, nesterov=False, adjust_lr_fn="match_rms_adamw",
                                      clip_norm=1.0, ema_decay=0.9, ns_dtype="float32",
                                      fallback=SGD(1e-2, momentum=0.9, param_groups=[
                                          {"params": "out/0", "learning_rate": 5e-3}])),
    "adafactor": lambda: Adafactor(1e-2, weight_decay=1e-2, clip_value=1.0),
    # adaptive clipping first (each tensor with Muon's own group's, the fallback's too)
    "muon-adaptive-clip": lambda: Muon(1e-2, ns_dtype="float32", adaptive_clip=0.02,
                                       param_groups=[{"params": "out/0",
                                                      "adaptive_clip": 0.5}]),
    "adafactor-adaptive-clip": lambda: Adafactor(1e-2, adaptive_clip=0.05, clip_norm=1.0),
}
#: each learning rate as a multiple of the optimizer's, set at these steps (between them)
LR_AT = {7: 0.3, 12: 2.0}


def run_ours(opt, bad_step=None):
    params = {k: jnp.asarray(v) for k, v in P0.items()}
    state = opt.init(params)
    lr0 = opt.learning_rate
    for t in range(STEPS):
        if t in LR_AT:
            opt.set_learning_rate(lr0 * LR_AT[t])
        g = grads(t, params)
        if t == bad_step:
            g["layer/b"] = g["layer/b"].at[0].set(jnp.nan)
        with np.errstate(all="ignore"):
            params, state = opt.update(params, g, state)
    return {k: np.array(v) for k, v in params.items()}, state, params


def run_optax(tx, lr0, bad_step=None, pure_at=3):
    """20 jitted steps, the learning rate changed in the state at LR_AT; at ``pure_at`` the
    same step runs twice on the same inputs first (the same results: pure)."""
    params = nested({k: jnp.asarray(v) for k, v in P0.items()})
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, t, poison):
        traces.append(t)
        g = nested(grads(t, flat_of(params)))
        g["layer"]["b"] = jnp.where(poison, g["layer"]["b"].at[0].set(jnp.nan), g["layer"]["b"])
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(STEPS):
        if t in LR_AT:
            mine = state if isinstance(state, OptaxState) else state[-1]  # last in a chain
            mine.hyperparams["learning_rate"] = lr0 * LR_AT[t]
        if t == pure_at:
            before = [np.array(x) for x in jax.tree.leaves(state)]
            first, again = step(params, state, t, False), step(params, state, t, False)
            for a, b in zip(*map(jax.tree.leaves, (first, again))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(before, jax.tree.leaves(state)):  # the state given is untouched
                np.testing.assert_array_equal(a, np.asarray(b))
        params, state = step(params, state, t, t == bad_step)
    return {k: np.array(v) for k, v in flat_of(params).items()}, state, len(traces), params


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_our_optimizer(config):
    """The optimizer's numbers; pure; the learning rate from the state, no retrace."""
    opt = CONFIGS[config]()
    theirs, state, traces, _ = run_optax(optax_transformation(opt), opt.learning_rate)
    ours, our_state, _ = run_ours(CONFIGS[config]())
    assert isinstance(state, OptaxState) and int(state.count) == STEPS
    assert traces == 1
    assert rel_error(ours, theirs) < TOL, rel_error(ours, theirs)
    for k, v in our_state.values.items():  # Prodigy's d and numerator, schedule-free's sums
        assert abs(float(state.values[k]) - v) <= 1e-5 * abs(v), (k, float(state.values[k]), v)


def test_slot_shapes_are_the_optimizers():
    """Adafactor's factored statistics, Muon's (0,) parts, the copies of the params."""
    params = nested(P0)
    ada = optax_transformation(Adafactor()).init(params)
    assert ada.slots["row_var"]["layer"]["w"].shape == (5, 1)
    assert ada.slots["col_var"]["layer"]["w"].shape == (1, 3)
    assert ada.slots["variance"]["layer"]["w"].shape == (0,)
    assert ada.slots["variance"]["out"][0].shape == SHAPES["out/0"]
    muon = jax.eval_shape(optax_transformation(Muon()).init, params)  # init traces too
    assert muon.slots["momentum_buffer"]["layer"]["b"].shape == (0,)
    assert muon.slots["fallback_m"]["layer"]["w"].shape == (0,)
    sf = optax_transformation(ScheduleFreeSGD()).init(params)
    np.testing.assert_array_equal(sf.slots["z"]["layer"]["w"], P0["layer/w"])
    pr = optax_transformation(Prodigy()).init(params)
    np.testing.assert_array_equal(pr.slots["x0"]["out"][0], P0["out/0"])
    assert float(pr.values["d"]) == pytest.approx(1e-6)


def test_schedule_free_eval_params():
    """schedule_free_eval_params(state, params): eval_params of our optimizer's state, also
    for a chained state, jitted; the state's beta1 drives the update."""
    make = lambda: ScheduleFreeAdamW(1e-2, weight_decay=1e-2)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax_transformation(make()))
    _, state, _, params = run_optax(tx, 1e-2)
    assert float(state[1].hyperparams["beta1"]) == pytest.approx(0.9)
    x = jax.jit(schedule_free_eval_params)(state, params)
    opt = make()
    _, our_state, our_params = run_ours(opt)
    want = opt.eval_params(our_state, our_params)
    assert rel_error({k: np.asarray(v) for k, v in want.items()},
                     {k: np.asarray(v) for k, v in flat_of(x).items()}) < TOL
    with pytest.raises(ValueError, match="schedule-free"):
        schedule_free_eval_params(optax_transformation(Prodigy()).init(params), params)


def test_which_parts_run_on_the_host():
    assert scalars_on_host(Prodigy()) is None  # the state's d traced into its scalars
    assert scalars_on_host(Muon()) is None
    # a branch on the step as a where, or on the step's type (the host's int: as before)
    for opt in (Adafactor(), ADOPT(), Adan()):
        assert scalars_on_host(opt) is None, type(opt).__name__
    # RAdam's rectifier: its branch on ρₜ a where, ρₜ without torch's formula's cancellation
    assert scalars_on_host(RAdam()) is None
    params = nested(P0)
    # Prodigy's and schedule-free's tensor_scalars trace (arithmetic, no branch on values;
    # the warm-up's branch on the step is a traced where)
    for opt in (Prodigy(), ScheduleFreeSGD(), ScheduleFreeSGD(warmup_steps=3)):
        tx = optax_transformation(opt, scalars="traced")
        jax.jit(tx.update)(params, tx.init(params), params)

    class StepAsInt(ScheduleFreeSGD):
        def tensor_scalars(self, step, *args):
            return super().tensor_scalars(int(step), *args)

    # one that reads its step as a Python int: a host callback, refused when forced traced
    tx = optax_transformation(StepAsInt(), scalars="traced")
    with pytest.raises(TypeError, match="StepAsInt.tensor_scalars does not run on traced"):
        jax.jit(tx.update)(params, tx.init(params), params)


def test_nonfinite_skip_tensorwise():
    make = lambda: Muon(1e-2, nonfinite="skip")  # noqa: E731
    theirs, state, _, _ = run_optax(optax_transformation(make()), 1e-2, bad_step=4)
    assert int(state.count) == STEPS - 1
    with pytest.warns(RuntimeWarning):
        ours, _, _ = run_ours(make(), bad_step=4)
    assert rel_error(ours, theirs) < TOL


def test_refusals():
    with pytest.raises(TypeError, match="LBFGS cannot be an optax transformation.*closure"
                                        ".*optax.lbfgs.*differs"):
        optax_transformation(LBFGS())

    class Custom(Prodigy):
        def update(self, params, gradients, state):
            return super().update(params, gradients, state)

    with pytest.raises(TypeError, match="Custom overrides update"):
        optax_transformation(Custom())
    tx = optax_transformation(Muon(fallback=None))
    with pytest.raises(ShapeError, match=r"params\['layer/b'\] has shape \(3,\)"):
        tx.init(nested(P0))


@pytest.mark.parametrize("make", [lambda: Prodigy(1.0, estim_lr0=1e-3), lambda: Muon(1e-2),
                                  lambda: SGD(1e-1, momentum=0.9, nonfinite="skip")],
                         ids=["elementwise", "tensorwise", "skip"])
def test_update_can_return_the_new_params(make):
    """``update(..., new_params=True)`` (what ``make_train_step``'s program takes) gives the
    new params themselves and the same state: ``params + updates`` to rounding, without
    that round trip."""
    tx = optax_transformation(make())
    params = nested({k: jnp.asarray(v) for k, v in P0.items()})
    state = tx.init(params)
    for t in range(3):
        g = nested(grads(t, flat_of(params)))
        updates, s_upd = jax.jit(tx.update)(g, state, params)
        new, s_new = jax.jit(lambda g, s, p: tx.update(g, s, p, new_params=True))(
            g, state, params)
        applied = optax.apply_updates(params, updates)
        for k, v in flat_of(new).items():
            np.testing.assert_allclose(v, flat_of(applied)[k], rtol=1e-6, atol=1e-7)
        for a, b in zip(jax.tree_util.tree_leaves(s_upd), jax.tree_util.tree_leaves(s_new),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        params, state = new, s_new


def _configs():
    """Each known-traceable built-in in several configurations (its flags, weight decay,
    a parameter group with its own learning rate and betas)."""
    import inspect

    from mithril.interop.optax_scalars import _known_traceable
    from mithril.utils import optimizers as O

    flags = {"amsgrad": True, "nesterov": True, "momentum": 0.9, "centered": True,
             "weight_decay": 1e-2, "maximize": True, "bias_correction": False,
             "decoupled_weight_decay": True, "lr_power": -0.5, "trust_clip": True,
             "adaptive": True, "grad_averaging": True, "dampening": 0.1,
             "convention": "keras"}
    for name in O.__all__:
        cls = getattr(O, name)
        if not inspect.isclass(cls) or cls.__dict__.get("scalars") not in _known_traceable():
            continue
        accepted = inspect.signature(cls).parameters
        yield name, lambda cls=cls: cls(1e-2)
        for k, v in flags.items():
            if k in accepted:
                kw = {k: v, **({"momentum": 0.9} if k in ("nesterov", "dampening", "convention")
                               and "momentum" in accepted else {})}
                try:
                    cls(1e-2, **kw)
                except (TypeError, ValueError):  # a flag this class spells otherwise
                    continue
                yield f"{name}-{k}", lambda cls=cls, kw=kw: cls(1e-2, **kw)
        yield f"{name}-group", lambda cls=cls: cls(1e-2, param_groups=[
            {"params": "layer/b", "learning_rate": 3e-2, "weight_decay": 0.1}])


CONFIGS_KNOWN = dict(_configs())


def test_every_known_traceable_class_is_covered():
    from mithril.interop.optax_scalars import _known_traceable

    assert len({k.split("-")[0] for k in CONFIGS_KNOWN}) == len(_known_traceable())


@pytest.mark.parametrize("name", sorted(CONFIGS_KNOWN))
def test_known_traceable_scalars_pass_the_probe(name):
    """The classes whose probe is skipped (a compile saved on a first run) would pass it:
    traced scalars equal the host's at steps 1, 2, 3, 10 and 1000."""
    from types import SimpleNamespace

    from mithril.interop.optax_scalars import _needs_no_probe, _probe

    opt = CONFIGS_KNOWN[name]()
    holder = SimpleNamespace(groups=None, layout=SimpleNamespace(name_list=list(SHAPES)))
    index, views = opt.group_rows(holder)
    rows = holder.groups[2] if holder.groups is not None else [{}] * len(views)
    scales = [float(r.get("lr_scale", 1.0)) for r in rows]
    assert _needs_no_probe(views)
    assert _probe(views, scales, trust_known=False) is None


def test_averaging_or_an_override_is_probed():
    from mithril.interop.optax_scalars import _needs_no_probe
    from mithril.utils.optimizers import Adam

    class Mine(Adam):
        def scalars(self, step):
            return super().scalars(step)

    assert not _needs_no_probe([Adam(1e-2, ema_decay=0.99)])
    assert not _needs_no_probe([Mine(1e-2)])
    assert _needs_no_probe([Adam(1e-2)])
