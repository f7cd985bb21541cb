"""Sophia against ``optax.contrib.sophia``, side by side in the same test.

Each run feeds both the same gradients and the same Hessian-diagonal estimates (optax through
a ``hessian_diagonal_fn`` handing out the i-th estimate at its i-th call, which it makes at
counts 0, k, 2k, ...; ours through ``update_hessian`` after the steps ``hessian_due`` named),
float64, 30 steps, on every engine: the fused numba kernel (NumPy, torch, JAX host buffers),
the jitted JAX step and the flat tensor-op engine (torch's path on accelerators). The
Hutchinson loop on a compiled Mithril model (JAX, torch, NumPy) runs against optax's own
``obj_fn`` path with the same key. Then: state dicts and checkpoints keep ν (resume bit for
bit), bad estimates are refused naming the key with nothing changed, a non-finite estimate
follows the ``nonfinite`` policy, and hyperparameters are checked.
"""

from __future__ import annotations

import copy
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import host, jax_float64, native, optimizer_engine

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.hessian import hutchinson_diagonal
from mithril.utils.optimizers import Adam, Sophia

STEPS = 30
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
ENGINES = ["numpy", "torch", "jax", "jax-jit", "array-torch"]
OBSERVED: dict[str, float] = {}

# ours -> optax's spelling
OPTAX_NAMES = {"beta1": "b1", "beta2": "b2", "epsilon": "eps"}


def problem(seed: int = 0, steps: int = STEPS) -> tuple[dict, list, list]:
    """A start, ``steps`` gradients and ``steps`` (at most) positive-ish estimates."""
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.normal(size=s)) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.normal(size=s)) for k, s in SHAPES.items()}
             for _ in range(steps)]
    hs = [{k: np.asarray(rng.normal(size=s) * 0.5 + 1.0) for k, s in SHAPES.items()}
          for _ in range(steps)]
    return p0, grads, hs


def handed_out(hs: list[dict]) -> optax.GradientTransformation:
    """A ``hessian_diagonal_fn`` giving ``hs[i]`` at its i-th call (its state counts them)."""
    stacked = {k: jnp.asarray(np.stack([h[k] for h in hs])) for k in hs[0]}

    def init(params):
        return jnp.zeros([], jnp.int32)

    def update(updates, state, params=None, **kw):
        return {k: v[state] for k, v in stacked.items()}, state + 1

    return optax.GradientTransformation(init, update)


def optax_run(kw: dict, p0: dict, grads: list, hs: list, lr: float,
              mask: dict | None = None) -> list[dict]:
    """optax.contrib.sophia's params after each step (float64)."""
    opts = {OPTAX_NAMES.get(k, k): v for k, v in kw.items()}
    with jax_float64():
        tx = optax.contrib.sophia(lr, hessian_diagonal_fn=handed_out(hs),
                                  weight_decay_mask=mask, **opts)
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        st = tx.init(p)
        step = jax.jit(tx.update)
        out = []
        for g in grads:
            u, st = step({k: jnp.asarray(v) for k, v in g.items()}, st, p)
            p = optax.apply_updates(p, u)
            out.append({k: np.asarray(v) for k, v in p.items()})
    return out


def our_run(engine: str, opt: Sophia, p0: dict, grads: list, hs: list) -> tuple[list, int]:
    """Our params after each step, and how many estimates were folded in."""
    with optimizer_engine(engine), jax_float64():
        p = {k: native(engine, v) for k, v in p0.items()}
        state = opt.init(p)
        out, used = [], 0
        for g in grads:
            due = opt.hessian_due(state)
            p, state = opt.update(p, {k: native(engine, v) for k, v in g.items()}, state)
            if due:
                state = opt.update_hessian(state, {k: native(engine, v)
                                                   for k, v in hs[used].items()})
                used += 1
            out.append({k: host(v) for k, v in p.items()})
    return out, used


def max_diff(ours: list[dict], theirs: list[dict]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for a, b in zip(ours, theirs) for k in a)


CASES = {
    "defaults": {},
    "clip_small_interval": {"beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "gamma": 0.05,
                            "clip_threshold": 0.5, "update_interval": 3},
    "noclip_nodecay_every_step": {"clip_threshold": None, "weight_decay": 0.0,
                                  "update_interval": 1, "gamma": 0.2, "epsilon": 1e-3},
}


@functools.cache
def optax_case(case: str) -> list[dict]:
    p0, grads, hs = problem()
    return optax_run(CASES[case], p0, grads, hs, 0.01)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_optax_with_the_same_estimates(case, engine):
    p0, grads, hs = problem()
    kw = CASES[case]
    ours, used = our_run(engine, Sophia(0.01, **kw), p0, grads, hs)
    k = kw.get("update_interval", 10)
    assert used == -(-STEPS // k) >= 3  # several estimates: at counts 0, k, 2k, ...
    err = max_diff(ours, optax_case(case))
    OBSERVED[f"{case}/{engine}"] = err
    assert err <= 1e-12, err


@functools.cache
def optax_float32() -> list[dict]:
    p0, grads, hs = (f32(problem(8)[0]), *([f32(d) for d in x] for x in problem(8)[1:]))
    tx = optax.contrib.sophia(0.01, update_interval=3, hessian_diagonal_fn=handed_out(hs))
    p = {k: jnp.asarray(v) for k, v in p0.items()}
    st, out = tx.init(p), []
    for g in grads:
        u, st = tx.update({k: jnp.asarray(v) for k, v in g.items()}, st, p)
        p = optax.apply_updates(p, u)
        out.append({k: np.asarray(v, np.float64) for k, v in p.items()})
    return out


def f32(d: dict) -> dict:
    return {k: np.asarray(v, np.float32) for k, v in d.items()}


@pytest.mark.parametrize("engine", ENGINES)
def test_float32_equals_optax_to_rounding(engine):
    """float32 (optax's default): ~1 ulp (measured 9e-8; the tensor-op engine 0)."""
    p0, grads, hs = problem(8)
    ours, _ = our_run(engine, Sophia(0.01, update_interval=3), f32(p0),
                      [f32(g) for g in grads], [f32(h) for h in hs])
    assert all(v.dtype == np.float32 for v in ours[-1].values())
    ours = [{k: v.astype(np.float64) for k, v in d.items()} for d in ours]
    err = max_diff(ours, optax_float32())
    OBSERVED[f"float32/{engine}"] = err
    assert err <= 1e-6, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_fused_ops_engine_equals_optax(case, monkeypatch):
    """torch's CUDA engine (its fused kernels on flat buffers), forced on CPU."""
    import mithril.utils.optimizers.engines as engines

    monkeypatch.setattr(engines, "TORCH_ENGINE", "fused-ops")
    p0, grads, hs = problem()
    ours, _ = our_run("torch-fused-ops", Sophia(0.01, **CASES[case]), p0, grads, hs)
    assert max_diff(ours, optax_case(case)) <= 1e-12


def test_weight_decay_mask_and_param_groups_equal_optax():
    """optax's ``weight_decay_mask`` is ours; a group with its own learning rate and γ is
    optax's sophia run on those parameters alone (every quantity is elementwise)."""
    p0, grads, hs = problem(1)
    kw = {"update_interval": 4, "weight_decay": 0.1}
    mask = {"w": True, "b": False, "s": True}
    opt = Sophia(0.01, weight_decay_mask=["w", "s"], **kw)
    ours, _ = our_run("numpy", opt, p0, grads, hs)
    assert max_diff(ours, optax_run(kw, p0, grads, hs, 0.01, mask)) <= 1e-12

    for engine in ("numpy", "jax-jit"):
        opt = Sophia(0.01, param_groups=[{"params": ["b"], "learning_rate": 0.05,
                                          "gamma": 0.1}], **kw)
        ours, _ = our_run(engine, opt, p0, grads, hs)
        part = {"w", "s"}
        sub = [{k: v for k, v in d.items() if k in part} for d in (p0, *grads)]
        rest = [{k: v for k, v in d.items() if k not in part} for d in (p0, *grads)]
        a = optax_run(kw, sub[0], sub[1:], [{k: h[k] for k in part} for h in hs], 0.01)
        b = optax_run({**kw, "gamma": 0.1}, rest[0], rest[1:], [{"b": h["b"]} for h in hs],
                      0.05)
        assert max_diff(ours, [{**x, **y} for x, y in zip(a, b)]) <= 1e-12


def test_step_wide_settings_are_refused_in_a_group():
    for name, value in (("beta2", 0.9), ("update_interval", 2), ("clip_threshold", 2.0)):
        with pytest.raises(ValueError, match=name):
            Sophia(param_groups=[{"params": ["b"], name: value}]).init(
                {"b": np.zeros(2), "w": np.zeros(2)})


def test_mu_dtype_bfloat16_equals_optax():
    """``mu_dtype``: m kept in bfloat16 (optax's cast after each step), float32 params."""
    p0, grads, hs = problem(2, steps=12)
    f32 = [{k: v.astype(np.float32) for k, v in d.items()} for d in (p0, *grads)]
    h32 = [{k: v.astype(np.float32) for k, v in h.items()} for h in hs]
    tx = optax.contrib.sophia(0.01, update_interval=3, hessian_diagonal_fn=handed_out(h32),
                              mu_dtype=jnp.bfloat16)
    p = {k: jnp.asarray(v) for k, v in f32[0].items()}
    st = tx.init(p)
    theirs = []
    for g in f32[1:]:
        u, st = tx.update({k: jnp.asarray(v) for k, v in g.items()}, st, p)
        p = optax.apply_updates(p, u)
        theirs.append({k: np.asarray(v, np.float64) for k, v in p.items()})
    for engine in ("torch", "jax"):
        opt = Sophia(0.01, update_interval=3, mu_dtype="bfloat16")
        ours, _ = our_run(engine, opt, f32[0], f32[1:], h32)
        ours = [{k: v.astype(np.float64) for k, v in d.items()} for d in ours]
        assert max_diff(ours, theirs) <= 2e-6


# -- the Hutchinson loop on a compiled model ----------------------------------------------------
def mlp_model() -> ml.Model:
    model = ml.Model()
    model |= ml.MLP(["tanh", None], [5, 3])(input="input", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return model


def jnp_loss(p: dict, x, y):
    h = jnp.tanh(x @ p["mlp.linear_0.weight"].T + p["mlp.linear_0.bias"])
    logits = h @ p["mlp.linear_1.weight"].T + p["mlp.linear_1.bias"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def optax_hutchinson_run(p0: dict, batches: list, key0, k: int) -> list[dict]:
    """optax's sophia (lr 0.05, γ 0.05, every ``k`` steps its Hutchinson estimator from
    ``key0`` with ``obj_fn``) over ``batches`` from ``p0``: the params after each step."""
    tx = optax.contrib.sophia(
        0.05, update_interval=k, gamma=0.05,
        hessian_diagonal_fn=optax.contrib.hutchinson_estimator_diag_hessian(key0))
    pj = {n: jnp.asarray(v) for n, v in p0.items()}
    st, out = tx.init(pj), []
    for x, y in batches:
        obj = functools.partial(jnp_loss, x=jnp.asarray(x), y=jnp.asarray(y))
        u, st = tx.update(jax.grad(obj)(pj), st, pj, obj_fn=obj)
        pj = optax.apply_updates(pj, u)
        out.append({n: np.asarray(v) for n, v in pj.items()})
    return out


@pytest.mark.parametrize("backend", ["jax", "torch", "numpy"])
def test_hutchinson_loop_equals_optax_obj_fn(backend):
    """Our loop (evaluate, Hutchinson on the due steps with the key split as optax's
    estimator splits it, update, update_hessian) against optax's sophia with its default
    Hutchinson estimator and ``obj_fn``, same key, 25 steps: exact on JAX and torch; NumPy's
    central differences (~1e-10 relative) move the params by less than 1e-8."""
    steps, k = 25, 4
    rng = np.random.default_rng(0)
    with jax_float64():
        be = {"jax": JaxBackend, "torch": TorchBackend, "numpy": NumpyBackend}[backend](
            dtype="float64")
        c = ml.compile(mlp_model(), be, shapes={"input": [8, 4]})
        p0 = {n: rng.standard_normal(s) * 0.5 for n, s in c.parameter_shapes.items()}
        batches = [(rng.standard_normal((8, 4)), rng.integers(0, 3, 8)) for _ in range(steps)]
        key0 = jax.random.PRNGKey(7)
        theirs = optax_hutchinson_run(p0, batches, key0, k)

        opt = Sophia(0.05, update_interval=k, gamma=0.05)
        p = {n: be.array(v) for n, v in p0.items()}
        state, key, ours = opt.init(p), key0, []
        for x, y in batches:
            data = {"input": be.array(x), "target": be.array(y, be.int_dtype)}
            _, g = c.evaluate(p, data, output_gradients={"loss": 1.0})
            h = None
            if opt.hessian_due(state):
                key, sub = jax.random.split(key)
                h = hutchinson_diagonal(c, p, data, sub, loss="loss")
            p, state = opt.update(p, g, state)
            if h is not None:
                state = opt.update_hessian(state, h)
            ours.append({n: host(v) for n, v in p.items()})  # (copies: the next update
            # writes the returned arrays' buffers)
    err = max_diff(ours, theirs)
    OBSERVED[f"hutchinson/{backend}"] = err
    assert err <= (1e-8 if backend == "numpy" else 1e-12), err
    assert max_diff(ours[:1], [p0]) > 1e-3  # (it moved)


# -- state dicts and checkpoints keep nu ---------------------------------------------------------
@pytest.mark.parametrize("engine", ["numpy", "torch", "jax-jit"])
def test_state_dict_resume_is_bit_for_bit(engine):
    p0, grads, hs = problem(3, steps=14)
    opt = Sophia(0.01, update_interval=3)
    whole, _ = our_run(engine, opt, p0, grads, hs)
    with optimizer_engine(engine), jax_float64():
        p = {k: native(engine, v) for k, v in p0.items()}
        state, used = opt.init(p), 0
        for t, g in enumerate(grads):
            if t == 7:  # (after the estimate of step 7: nu is not the zeros it started as)
                saved = copy.deepcopy(opt.state_dict(state))
                assert np.abs(np.concatenate([np.ravel(v) for v in
                                              saved["slots"]["nu"].values()])).max() > 0
                fresh = Sophia()
                p = {k: native(engine, host(v)) for k, v in p.items()}
                state = fresh.load_state_dict(saved, p)
                assert fresh.hyperparameters() == opt.hyperparameters()
            due = (fresh if t >= 7 else opt).hessian_due(state)
            cur = fresh if t >= 7 else opt
            p, state = cur.update(p, {k: native(engine, v) for k, v in g.items()}, state)
            if due:
                state = cur.update_hessian(state, {k: native(engine, v)
                                                   for k, v in hs[used].items()})
                used += 1
            assert all(np.array_equal(host(p[k]), whole[t][k]) for k in p), t


def test_checkpoint_file_keeps_nu(tmp_path):
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    p0, grads, hs = problem(4, steps=10)
    opt = Sophia(0.01, update_interval=2)
    whole, _ = our_run("numpy", opt, p0, grads, hs)
    p = {k: v.copy() for k, v in p0.items()}
    state, used = opt.init(p), 0
    for t, g in enumerate(grads):
        if t == 5:
            save_checkpoint(tmp_path / "c.safetensors", p, opt, state)
            opt = Sophia()
            got = load_checkpoint(tmp_path / "c.safetensors", p0, opt)
            p, state = got["params"], got["state"]
        due = opt.hessian_due(state)
        p, state = opt.update(p, g, state)
        if due:
            state = opt.update_hessian(state, hs[used])
            used += 1
        assert all(np.array_equal(p[k], whole[t][k]) for k in p), t


# -- bad input ------------------------------------------------------------------------------------
def stepped(engine: str = "numpy", **kw) -> tuple[Sophia, dict, object]:
    """An optimizer and state after its first (due) step, with nu from one estimate."""
    p0, grads, hs = problem(5, steps=2)
    opt = Sophia(0.01, update_interval=2, **kw)
    with optimizer_engine(engine):
        p = {k: native(engine, v) for k, v in p0.items()}
        state = opt.init(p)
        p, state = opt.update(p, {k: native(engine, v) for k, v in grads[0].items()}, state)
    return opt, p, state


def nu_of(state) -> dict:
    return {k: host(v) for k, v in state.slot("nu").items()}


@pytest.mark.parametrize("engine", ["numpy", "torch", "jax-jit"])
def test_a_bad_estimate_is_refused_naming_the_key_and_changes_nothing(engine):
    with jax_float64():
        refused_unchanged(engine)


def refused_unchanged(engine: str) -> None:
    opt, p, state = stepped(engine)
    good = {k: native(engine, np.ones(s)) for k, s in SHAPES.items()}
    before = nu_of(state)
    bad = [
        ({k: v for k, v in good.items() if k != "b"}, KeyMismatchError, r"missing \['b'\]"),
        ({**good, "extra": good["b"]}, KeyMismatchError, r"unknown \['extra'\]"),
        ({**good, "w": native(engine, np.ones((4, 3)))}, ShapeError, r"estimate\['w'\]"),
        ({**good, "b": native(engine, np.ones(4, np.float32))}, TypeError,
         r"estimate\['b'\] has dtype float32"),
        ({**good, "s": 1.0}, TypeError, r"estimate\['s'\] must be an array"),
        ([1.0], TypeError, "dict of arrays"),
    ]
    for est, err, msg in bad:
        with pytest.raises(err, match=msg):
            opt.update_hessian(state, est)
        assert all(np.array_equal(nu_of(state)[k], before[k]) for k in before)
    opt.update_hessian(state, good)  # the same state takes a good one
    with pytest.raises(ValueError, match="already folded in"):
        opt.update_hessian(state, good)


def test_the_order_is_checked():
    p0, grads, _ = problem(6, steps=3)
    opt = Sophia(0.01, update_interval=2)
    p = {k: v.copy() for k, v in p0.items()}
    state = opt.init(p)
    ones = {k: np.ones(s) for k, s in SHAPES.items()}
    assert opt.hessian_due(state)
    with pytest.raises(ValueError, match="step 0.*after the update"):
        opt.update_hessian(state, ones)  # before the update: optax measures, then steps
    p, state = opt.update(p, grads[0], state)
    assert not opt.hessian_due(state)
    p, state = opt.update(p, grads[1], state)
    with pytest.raises(ValueError, match=r"\(step 2\) is not one.*steps 1, 3, 5"):
        opt.update_hessian(state, ones)
    assert np.array_equal(np.concatenate([v.ravel() for v in nu_of(state).values()]),
                          np.zeros(17))
    with pytest.raises(ValueError, match="update_hessian: state was made by Adam"):
        opt.update_hessian(Adam().init(p), ones)
    with pytest.raises(TypeError, match="hessian_due: state must be what Sophia.init"):
        opt.hessian_due({"step": 0})


@pytest.mark.parametrize("policy", ["propagate", "unchecked", "skip", "raise"])
def test_a_non_finite_estimate_follows_the_nonfinite_policy(policy):
    """"propagate" folds it in as optax does (a warning); "unchecked" silently; "skip"
    keeps nu (a warning); "raise" raises, nothing changed."""
    opt, p, state = stepped(nonfinite=policy)
    before = nu_of(state)
    est = {k: np.ones(s) for k, s in SHAPES.items()}
    est["b"][1] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if policy == "raise":
            with pytest.raises(FloatingPointError, match=r"\['b'\] holds inf/NaN"):
                opt.update_hessian(state, est)
        else:
            opt.update_hessian(state, est)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    after = nu_of(state)
    if policy in ("propagate", "unchecked"):
        assert np.isnan(after["b"][1]) and np.isfinite(after["w"]).all()
        assert np.array_equal(after["w"], (1 - 0.99) * np.ones((3, 4)))  # from 0
        assert bool(said) == (policy == "propagate")
    else:
        assert all(np.array_equal(after[k], before[k]) for k in before)
        assert bool(said) == (policy == "skip")


def test_a_skipped_step_folds_nothing_as_optax_apply_if_finite():
    p0, grads, hs = problem(7, steps=6)
    grads[2] = {k: v.copy() for k, v in grads[2].items()}
    grads[2]["w"][0, 0] = np.nan  # step 3 (count 2): a due step, skipped
    opt = Sophia(0.01, update_interval=2, nonfinite="skip")
    tx = optax.apply_if_finite(optax.contrib.sophia(0.01, update_interval=2,
                                                    hessian_diagonal_fn=handed_out(hs)), 5)
    with jax_float64():
        pj = {k: jnp.asarray(v) for k, v in p0.items()}
        st = tx.init(pj)
        p = {k: v.copy() for k, v in p0.items()}
        state, used = opt.init(p), 0
        for g in grads:
            u, st = tx.update({k: jnp.asarray(v) for k, v in g.items()}, st, pj)
            pj = optax.apply_updates(pj, u)
            due = opt.hessian_due(state)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                p, state = opt.update(p, g, state)
            if due:
                opt.update_hessian(state, hs[used])
                used += not state.last_step_skipped
            assert max(float(np.abs(p[k] - np.asarray(pj[k])).max()) for k in p) <= 1e-12
    assert state.num_skipped == 1 and state.step == 5


@pytest.mark.parametrize("kw, err, name", [
    ({"beta1": 1.0}, ValueError, "beta1"), ({"beta2": -0.1}, ValueError, "beta2"),
    ({"epsilon": 0.0}, ValueError, "epsilon"), ({"gamma": 0.0}, ValueError, "gamma"),
    ({"clip_threshold": -1.0}, ValueError, "clip_threshold"),
    ({"update_interval": 0}, ValueError, "update_interval"),
    ({"update_interval": 2.0}, TypeError, "update_interval"),
    ({"mu_dtype": "int8"}, TypeError, "mu_dtype"),
    ({"b1": 0.9}, TypeError, "did you mean beta1"),
    ({"hessian_diagonal_fn": optax.contrib.hutchinson_estimator_diag_hessian()}, TypeError,
     "hessian_diagonal_fn= is optax's.*update_hessian.*hutchinson_diagonal"),
    ({"verbose": True}, TypeError, "verbose= is optax's.*win rate"),
])
def test_bad_hyperparameters_are_refused_by_name(kw, err, name):
    with pytest.raises(err, match=name):
        Sophia(**kw)


def test_sophia_joins_the_train_step_table():
    import test_train_step_fn

    assert Sophia in {type(make()) for make in test_train_step_fn.optimizers().values()}


def test_make_train_step_opt_state_takes_the_estimate_as_optax():
    """make_train_step's one-program JAX step: its ``opt_state`` (an OptaxState) is taken by
    hessian_due and update_hessian (a new state returned), the loop equal to optax's
    Hutchinson sophia; a bad estimate is refused naming the key, the state unchanged."""
    from mithril.utils.training import make_train_step

    steps, k = 9, 3
    rng = np.random.default_rng(1)
    with jax_float64():
        be = JaxBackend(dtype="float64")
        c = ml.compile(mlp_model(), be, shapes={"input": [8, 4]})
        p0 = {n: rng.standard_normal(s) * 0.5 for n, s in c.parameter_shapes.items()}
        batches = [(rng.standard_normal((8, 4)), rng.integers(0, 3, 8)) for _ in range(steps)]
        key0 = jax.random.PRNGKey(2)
        theirs = optax_hutchinson_run(p0, batches, key0, k)
        opt = Sophia(0.05, update_interval=k, gamma=0.05)
        step = make_train_step(c, opt, loss="loss")
        assert step.fused
        p = {n: be.array(v) for n, v in p0.items()}
        opt_state, key = step.init(p), key0
        for i, (x, y) in enumerate(batches):
            data = {"input": be.array(x), "target": be.array(y, be.int_dtype)}
            h = None
            assert opt.hessian_due(opt_state) == (i % k == 0)
            if opt.hessian_due(opt_state):
                key, sub = jax.random.split(key)
                h = hutchinson_diagonal(c, p, data, sub, loss="loss")
            p, opt_state, _ = step(p, opt_state, data)
            if h is not None:
                with pytest.raises(ShapeError, match=r"estimate\['mlp.linear_0.bias'\]"):
                    opt.update_hessian(opt_state, {**h, "mlp.linear_0.bias": jnp.ones(2)})
                opt_state = opt.update_hessian(opt_state, h)
            else:
                with pytest.raises(ValueError, match="is not one that takes an estimate"):
                    opt.update_hessian(opt_state, {n: jnp.ones_like(v) for n, v in p.items()})
            err = max(float(np.abs(np.asarray(p[n]) - theirs[i][n]).max()) for n in p)
            assert err <= 1e-12, (i, err)


def test_under_accumulate_equals_optax_multisteps():
    """Accumulate(Sophia, 2) with the estimate folded after the micro-batches that step it:
    optax.MultiSteps(sophia, 2); update_hessian takes and returns the AccumulateState."""
    from mithril.utils.accumulation import Accumulate, AccumulateState

    p0, grads, hs = problem(9, steps=20)
    tx = optax.MultiSteps(optax.contrib.sophia(0.01, update_interval=2,
                                               hessian_diagonal_fn=handed_out(hs)), 2)
    opt = Sophia(0.01, update_interval=2)
    acc = Accumulate(opt, 2)
    with jax_float64():
        pj = {k: jnp.asarray(v) for k, v in p0.items()}
        st = tx.init(pj)
        p = {k: v.copy() for k, v in p0.items()}
        state, used = acc.init(p), 0
        for g in grads:
            u, st = tx.update({k: jnp.asarray(v) for k, v in g.items()}, st, pj)
            pj = optax.apply_updates(pj, u)
            due = opt.hessian_due(state)
            p, state = acc.update(p, g, state)
            if due and state.applied:
                state = opt.update_hessian(state, hs[used])
                used += 1
            assert isinstance(state, AccumulateState)
            assert max(float(np.abs(p[k] - np.asarray(pj[k])).max()) for k in p) <= 1e-12
    assert used == 5


def test_torch_optimizer_drop_in_takes_the_estimate_through_its_mithril_state():
    """A torch loop: torch_optimizer(Sophia) steps, update_hessian on its mithril_state
    (changed in place: the wrapper's next step reads it), as optax."""
    from mithril.interop import torch_optimizer

    p0, grads, hs = problem(10, steps=12)
    theirs = optax_run({"update_interval": 3}, p0, grads, hs, 0.01)
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    soph = Sophia(0.01, update_interval=3)
    opt, used = torch_optimizer(soph, list(params.items())), 0
    for t, g in enumerate(grads):
        due = opt.mithril_state is None or soph.hessian_due(opt.mithril_state)
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        opt.step()
        if due:
            soph.update_hessian(opt.mithril_state, {k: torch.tensor(hs[used][k]) for k in params})
            used += 1
        assert all(np.abs(p.detach().numpy() - theirs[t][k]).max() <= 1e-12
                   for k, p in params.items())
    assert used == 4


def test_optax_transformation_state_takes_the_estimate():
    """optax_transformation(Sophia) under jax.jit; update_hessian on its OptaxState between
    the jitted updates gives a new state: optax's sophia."""
    from mithril.interop import optax_transformation

    p0, grads, hs = problem(11, steps=12)
    theirs = optax_run({"update_interval": 3}, p0, grads, hs, 0.01)
    soph = Sophia(0.01, update_interval=3)
    with jax_float64():
        tx = optax_transformation(soph)
        update = jax.jit(tx.update)
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        st, used = tx.init(p), 0
        for t, g in enumerate(grads):
            due = soph.hessian_due(st)
            u, st = update({k: jnp.asarray(v) for k, v in g.items()}, st, p)
            p = optax.apply_updates(p, u)
            if due:
                st = soph.update_hessian(st, {k: jnp.asarray(v) for k, v in hs[used].items()})
                used += 1
            assert max(float(np.abs(np.asarray(p[k]) - theirs[t][k]).max()) for k in p) <= 1e-12
    assert used == 4
