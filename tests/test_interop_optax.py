"""``mithril.interop.optax_transformation``: any mithril optimizer but LBFGS as a pure,
jittable ``optax.GradientTransformation`` giving the optimizer's own numbers (schedule-free,
Prodigy, Muon, Adafactor in detail: tests/test_interop_optax_more.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from conftest import run_python  # noqa: E402

import mithril.utils.optimizers as catalog  # noqa: E402
from mithril.interop import OptaxState, optax_transformation  # noqa: E402
from mithril.interop.optax_transform import scalars_on_host  # noqa: E402
from mithril.utils.optimizers import (  # noqa: E402
    LAMB,
    LBFGS,
    SGD,
    Adam,
    AdamW,
    Muon,
    NAdam,
    Optimizer,
    RAdam,
    RMSProp,
    engines,
)

STEPS = 20
SHAPES = {"layer/w": (5, 3), "layer/b": (3,), "out/0": (4,)}
RNG = np.random.default_rng(0)
P0 = {k: RNG.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
NOISE = [{k: RNG.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
         for _ in range(STEPS)]
STACKED = {k: np.stack([n[k] for n in NOISE]) for k in SHAPES}
#: relative to each tensor's largest value: float32 rounding of the per-leaf math against
#: the engine's flat buffer (measured up to 2.4e-7; our JAX and numba engines differ by up to
#: 4.7e-7 between themselves) and of the traced per-step scalars against its float64 ones
TOL = 1e-6


@pytest.fixture(autouse=True)
def _jitted_engine(monkeypatch):
    """Our reference runs through the JAX engine's jitted step (what runs on accelerators;
    on CPU the default is the numba kernel, whose compilation would dominate the run)."""
    monkeypatch.setattr(engines, "JAX_ENGINE", "jit")


def nested(flat):
    """A Flax-style pytree: nested dicts and a list, key paths "layer/w", ..., "out/0"."""
    return {"layer": {"w": flat["layer/w"], "b": flat["layer/b"]}, "out": [flat["out/0"]]}


def flat_of(tree):
    return {"layer/w": tree["layer"]["w"], "layer/b": tree["layer"]["b"],
            "out/0": tree["out"][0]}


def grads(t, flat):
    """The gradient of step ``t`` (an int, or traced) at ``flat``: noise plus a quadratic's
    pull, computed alike in both runs."""
    return {k: jnp.asarray(STACKED[k])[t] + 0.5 * v for k, v in flat.items()}


def run_ours(opt, steps=STEPS, lr_at=None, bad_step=None):
    params = {k: jnp.asarray(v) for k, v in P0.items()}
    state = opt.init(params)
    for t in range(steps):
        if lr_at and t in lr_at:
            opt.set_learning_rate(lr_at[t])
        g = grads(t, params)
        if t == bad_step:
            g["layer/b"] = g["layer/b"].at[0].set(jnp.nan)
        with np.errstate(all="ignore"):
            params, state = opt.update(params, g, state)
    return {k: np.array(v) for k, v in params.items()}


def run_optax(tx, steps=STEPS, lr_at=None, bad_step=None, start=None):
    params = nested({k: jnp.asarray(v) for k, v in (start or P0).items()})
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, t, poison):
        traces.append(t)  # once per trace, hence per compilation
        g = nested(grads(t, flat_of(params)))
        g["layer"]["b"] = jnp.where(poison, g["layer"]["b"].at[0].set(jnp.nan), g["layer"]["b"])
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        if lr_at and t in lr_at:
            state.hyperparams["learning_rate"] = lr_at[t]
        params, state = step(params, state, t, t == bad_step)
    return {k: np.array(v) for k, v in flat_of(params).items()}, state, len(traces)


def rel_error(ours, theirs):
    return max(float(np.max(np.abs(ours[k] - theirs[k]))) / float(np.max(np.abs(ours[k])))
               for k in ours)


# -- every elementwise optimizer of the catalog ----------------------------------------------
def catalog_optimizers():
    # (the loss-aware PolyakSGD, Momo, MomoAdam take update(..., value=loss):
    # tests/test_optimizers_loss_aware.py)
    return [n for n in catalog.__all__ if isinstance(getattr(catalog, n), type)
            and issubclass(getattr(catalog, n), Optimizer) and getattr(catalog, n) is not Optimizer
            and n not in ("PolyakSGD", "Momo", "MomoAdam")]


def build(name):
    cls = getattr(catalog, name)
    if name == "Lookahead":  # a wrapper: around Adam
        return cls(Adam(learning_rate=1e-2), sync_period=3)
    if name in ("SAM", "Mechanize", "DifferentiallyPrivate", "ScheduleFree"):  # wrappers: an update their own
        return cls(Adam(learning_rate=1e-2))
    return cls(learning_rate=1e-2)


@pytest.mark.parametrize("name", catalog_optimizers())
def test_catalog_matches_our_optimizer(name):
    opt = build(name)
    if name in ("LBFGS", "SAM", "Mechanize", "DPSGD", "DifferentiallyPrivate", "ScheduleFree"):  # a closure /
        # an update of their own / per-example gradients (tests/test_dpsgd.py): no
        # transformation, refused by name (tests/test_interop_optax_more.py)
        with pytest.raises(TypeError, match=name):
            optax_transformation(opt)
        return
    tx = optax_transformation(opt)
    theirs, state, _ = run_optax(tx)
    ours = run_ours(build(name))
    assert isinstance(state, OptaxState) and int(state.count) == STEPS
    assert rel_error(ours, theirs) < TOL, (name, rel_error(ours, theirs))


CONFIGS = {
    "sgd-nesterov-groups": lambda: SGD(1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2,
                                       param_groups=[{"params": "^out/", "learning_rate": 2e-2,
                                                      "momentum": 0.5}]),
    "sgd-keras": lambda: SGD(1e-2, momentum=0.9, convention="keras"),
    "adam-amsgrad-clip": lambda: Adam(1e-2, amsgrad=True, clip_norm=1.0, clip_value=0.8),
    "adam-keras": lambda: Adam(1e-2, convention="keras"),
    "adamw-averaging": lambda: AdamW(1e-2, weight_decay=0.1, ema_decay=0.9, ema_every=2,
                                     swa_start=5),
    "adam-groups": lambda: Adam(1e-2, weight_decay=1e-2, param_groups=[
        {"params": "layer/b", "learning_rate": 3e-2, "beta1": 0.8}],
        exclude_weight_decay=["out/0"]),
    "nadam-optax": lambda: NAdam(1e-2, convention="optax"),
    "rmsprop-centered": lambda: RMSProp(1e-2, centered=True, momentum=0.9),
    "radam-decoupled": lambda: RAdam(1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    # adaptive clipping (optax adaptive_grad_clip) before the rest, per group
    "adam-adaptive-clip-groups": lambda: Adam(1e-2, adaptive_clip=0.02, clip_norm=1.0,
                                              param_groups=[{"params": "layer/b",
                                                             "adaptive_clip": 0.3}]),
}
if hasattr(catalog, "LAMB"):
    CONFIGS["lamb-groups"] = lambda: catalog.LAMB(1e-2, weight_decay=0.1, param_groups=[
        {"params": "layer/b", "weight_decay": 0.0}])
if hasattr(catalog, "Novograd"):
    CONFIGS["novograd-clip"] = lambda: catalog.Novograd(1e-2, weight_decay=1e-2, clip_norm=2.0)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_configurations_match(config):
    opt = CONFIGS[config]()
    theirs, state, _ = run_optax(optax_transformation(opt))
    assert rel_error(run_ours(CONFIGS[config]()), theirs) < TOL
    if "averaging" in config:  # the averages are slots like the params
        assert set(state.slots) == {"m", "v", "ema", "swa"}
        assert state.slots["ema"]["layer"]["w"].shape == SHAPES["layer/w"]


@pytest.mark.parametrize("name", ["Adam", "LAMB"])
def test_host_scalars_are_the_engines(name):
    """scalars="host": the per-step scalars the engine computes (float64, on the host),
    here for scalars that would be traced (a two-pass optimizer's too)."""
    if not hasattr(catalog, name):
        pytest.skip(f"no {name} here")
    theirs, _, _ = run_optax(optax_transformation(build(name), scalars="host"))
    assert rel_error(run_ours(build(name)), theirs) < TOL


class BranchyAdam(Adam):
    """Adam whose scalars branch on the step in Python: not traceable."""

    def scalars(self, step):
        return super().scalars(step) if step > 0 else super().scalars(1)


def test_which_scalars_are_traced():
    assert scalars_on_host(Adam()) is None  # math.sqrt in scalars(): traced as jnp.sqrt
    assert scalars_on_host(AdamW()) is None
    assert scalars_on_host(RAdam()) is None  # ρₜ without cancellation, the branch a where
    why = scalars_on_host(BranchyAdam())
    assert "BranchyAdam.scalars(step) is not traceable" in why
    with pytest.raises(TypeError, match="scalars='traced'.*BranchyAdam"):
        tx = optax_transformation(BranchyAdam(), scalars="traced")
        tx.update(nested(P0), tx.init(nested(P0)), nested(P0))


@pytest.mark.parametrize("beta2", [0.9, 0.99, 0.999, 0.9999])
def test_radam_rho_traced_is_the_hosts(beta2):
    """RAdam's ρₜ traced in float32 (its series where torch's formula cancels: 1999 − 1990
    at step 10 with β₂ = 0.999) equals the host's float64 to 1e-6 wherever the rectifier's
    branch (ρₜ > 5) is near, over 20,000 steps."""
    from mithril.utils.optimizers.radam import _traced_rho

    opt = RAdam(beta2=beta2)
    rho_inf = 2 / (1 - beta2) - 1
    ts = np.arange(1, 20_001)
    got = np.asarray(jax.jit(lambda t: _traced_rho(t, beta2, rho_inf))(jnp.asarray(ts)))
    want = np.array([opt.rho(int(t)) for t in ts])
    near = want > 4.5
    assert near.sum() > 100
    np.testing.assert_allclose(got[near], want[near], rtol=1e-6)


# -- optax composition, purity, learning rate -------------------------------------------------
def test_chain_with_clip_by_global_norm_matches_clip_norm():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax_transformation(Adam(1e-2)))
    theirs, _, _ = run_optax(tx)
    ours = run_ours(Adam(1e-2, clip_norm=1.0))
    # optax scales by 1/norm, ours by 1/(norm + 1e-6) (torch's clip_grad_norm_)
    assert rel_error(ours, theirs) < TOL


@pytest.mark.skipif(not hasattr(Adam(), "clip_tensor_norm"), reason="no per-tensor clipping")
def test_per_tensor_clipping_is_optax_and_keras():
    """clip_block_rms is optax.clip_by_block_rms, clip_tensor_norm Keras' clipnorm (per
    tensor, before clip_norm; a group may turn it off)."""

    def keras_clipnorm(c):
        def update(u, state, params=None):
            return jax.tree.map(lambda g: g * (c / jnp.maximum(jnp.linalg.norm(g), c)), u), state

        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

    scaled = {k: 3.0 * v for k, v in P0.items()}  # large enough to clip
    ours = optax_transformation(Adam(1e-2, clip_block_rms=0.5, clip_norm=2.0,
                                     clip_tensor_norm=1.5,
                                     param_groups=[{"params": "^out/", "clip_tensor_norm": None}]))
    mask = nested({k: not k.startswith("out/") for k in P0})
    reference = optax.chain(optax.masked(keras_clipnorm(1.5), mask), optax.clip_by_block_rms(0.5),
                            optax.clip_by_global_norm(2.0), optax_transformation(Adam(1e-2)))
    (a, _, _), (b, _, _) = run_optax(ours, start=scaled), run_optax(reference, start=scaled)
    assert rel_error(b, a) < 1e-6  # optax scales by 1/norm, ours by 1/(norm + 1e-6)


@pytest.mark.parametrize("opt_fn", [lambda: AdamW(1e-2, weight_decay=0.1, ema_decay=0.9),
                                    lambda: catalog.ASGD(1e-2)], ids=["traced", "host"])
def test_update_is_pure(opt_fn):
    """The same state and gradients give the same result, every time (ASGD's scalars,
    computed on the host, remember the previous step's lr: still the same)."""
    tx = optax_transformation(opt_fn())
    params = nested({k: jnp.asarray(v) for k, v in P0.items()})
    g = nested(grads(0, flat_of(params)))
    state = tx.init(params)
    update = jax.jit(tx.update)
    first, again = update(g, state, params), update(g, state, params)
    for a, b in zip(*map(jax.tree.leaves, (first, again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.count) == 0 and int(first[1].count) == 1  # the input state is untouched
    shapes = jax.eval_shape(tx.init, params)  # init traces too (for sharding)
    slot = next(iter(shapes.slots.values()))
    assert slot["layer"]["w"].shape == SHAPES["layer/w"]


@pytest.mark.parametrize("opt_fn", [lambda: Adam(1e-2), lambda: RAdam(1e-2)],
                         ids=["traced-scalars", "host-scalars"])
def test_learning_rate_from_state_without_recompiling(opt_fn):
    change = {7: 3e-3, 12: 2e-2}
    theirs, _, traces = run_optax(optax_transformation(opt_fn()), lr_at=change)
    assert traces == 1
    assert rel_error(run_ours(opt_fn(), lr_at=change), theirs) < TOL


def test_inject_hyperparams_and_schedules():
    injected = optax.inject_hyperparams(optax_transformation)(Adam(), learning_rate=1e-2)
    theirs, state, traces = run_optax(injected, lr_at={5: jnp.asarray(4e-3, jnp.float32)})
    assert traces == 1 and abs(float(state.hyperparams["learning_rate"]) - 4e-3) < 1e-9
    assert rel_error(run_ours(Adam(1e-2), lr_at={5: 4e-3}), theirs) < TOL
    sched = optax.piecewise_constant_schedule(1e-2, {10: 0.5})
    theirs, _, _ = run_optax(optax_transformation(Adam(1.0), learning_rate=sched))
    assert rel_error(run_ours(Adam(1e-2), lr_at={10: 5e-3}), theirs) < TOL


def test_nonfinite_skip():
    theirs, state, _ = run_optax(optax_transformation(Adam(1e-2, nonfinite="skip")), bad_step=4)
    assert int(state.count) == STEPS - 1  # the skipped step does not count
    with pytest.warns(RuntimeWarning):
        ours = run_ours(Adam(1e-2, nonfinite="skip"), bad_step=4)
    assert rel_error(ours, theirs) < TOL


def test_mixed_dtypes():
    """Leaves of different float dtypes each keep theirs."""
    tx = optax_transformation(Adam(1e-2))
    params = {"a": jnp.ones((3,), jnp.bfloat16), "b": jnp.ones((2,), jnp.float32)}
    g = {"a": jnp.full((3,), 0.5, jnp.bfloat16), "b": jnp.full((2,), 0.5, jnp.float32)}
    updates, state = jax.jit(tx.update)(g, tx.init(params), params)
    assert updates["a"].dtype == jnp.bfloat16 and state.slots["v"]["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(updates["b"]), -1e-2, rtol=1e-5)


# -- refusals ---------------------------------------------------------------------------------
def test_refusals():
    with pytest.raises(TypeError, match="LBFGS cannot be an optax transformation.*optax.lbfgs"):
        optax_transformation(LBFGS())
    with pytest.raises(TypeError, match="mithril optimizer"):
        optax_transformation(optax.adam(1e-3))
    with pytest.raises(ValueError, match="nonfinite='raise'"):
        optax_transformation(Adam(nonfinite="raise"))
    with pytest.raises(ValueError, match="scalars must be"):
        optax_transformation(Adam(), scalars="device")
    tx = optax_transformation(Adam())
    params = nested(P0)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


def test_a_state_of_other_params_or_another_optimizer_is_named():
    """``update`` with a state ``init`` made for other params, or by another optimizer's
    transformation: a ValueError naming the slot and key (not JAX's KeyError from deep
    inside), raised while tracing, before anything runs; Muon's tensorwise program too."""
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    grads = {"w": jnp.full((4, 3), 0.1), "b": jnp.full(3, 0.1)}
    for make in (Adam, LAMB, Muon):
        tx = optax_transformation(make())
        update = jax.jit(tx.update)
        wider = tx.init({"w": jnp.ones((4, 5)), "b": jnp.zeros(5)})
        with pytest.raises(ValueError, match=r"slot '\w+' for '(b|w)' has shape \((4, )?5,?\)"):
            update(grads, wider, params)
        with pytest.raises(ValueError, match="slot .* does not have the params' structure"):
            update(grads, tx.init({"w": params["w"]}), params)
        with pytest.raises(ValueError, match="a state of another optimizer"):
            update(grads, optax_transformation(SGD(momentum=0.9)).init(params), params)
        update(grads, tx.init(params), params)  # the right state still works
        with pytest.raises(ValueError, match=r"updates \(gradients\) do not have the params' "
                                             r"structure: .*key"):
            update({"w": grads["w"]}, tx.init(params), params)
        with pytest.raises(ValueError, match="the update for 'b' is None"):
            update({**grads, "b": None}, tx.init(params), params)


def test_no_params():
    """An empty params tree (a model part without parameters) steps as optax's own
    transformations do: empty updates, the count moves; two-pass and tensorwise
    optimizers too (they used to fail on an empty stack / ``max()``)."""
    for make in (Adam, LAMB, Muon):
        tx = optax_transformation(make())
        for update in (tx.update, jax.jit(tx.update)):
            updates, state = update({}, tx.init({}), {})
            assert updates == {} and int(state.count) == 1


@pytest.mark.skipif(os.environ.get("JAX_ENABLE_X64") == "1", reason="already float64")
def test_float64_traced_scalars_are_exact():
    """With jax_enable_x64 the traced scalars are float64 too: the engine's numbers to a few
    ulps (a subprocess: x64 is process-wide)."""
    code = """
        import jax, numpy as np, jax.numpy as jnp, optax
        jax.config.update("jax_enable_x64", True)
        from mithril.utils.optimizers import engines, Adam, NAdam
        engines.JAX_ENGINE = "jit"
        from mithril.interop import optax_transformation
        rng = np.random.default_rng(1)
        p0 = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
        noise = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(20)]
        for make in (lambda: Adam(1e-2), lambda: NAdam(1e-2, convention="optax")):
            tx = optax_transformation(make())
            p = {k: jnp.asarray(v) for k, v in p0.items()}
            s = tx.init(p)
            step = jax.jit(tx.update)
            for n in noise:
                u, s = step({k: n[k] + 0.5 * p[k] for k in p}, s, p)
                p = optax.apply_updates(p, u)
            opt = make()
            q = {k: jnp.asarray(v) for k, v in p0.items()}
            st = opt.init(q)
            for n in noise:
                q, st = opt.update(q, {k: n[k] + 0.5 * q[k] for k in q}, st)
            err = max(float(jnp.max(jnp.abs(p[k] - q[k]))) for k in p)
            assert p["w"].dtype == jnp.float64 and err < 1e-13, err
        print("ok")
    """
    assert run_python(code).strip().endswith("ok")
