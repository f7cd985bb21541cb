"""LBFGS(convention="optax") against optax.lbfgs, side by side in float64: Rosenbrock (two
parameter tensors, the zoom taking several steps, failing into its safe step, backing off
from a NaN), a small Mithril-compiled MLP, and no line search with a learning rate; the
parameters agree to 1e-10 after every iteration on NumPy, torch and JAX, and the line search's
counts to the step. Then float32 loosely, nothing changes on error, resume, bad arguments, and
the torch drop-in."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import mithril as ml
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.optimizers import LBFGS
from mithril.utils.training import make_train_step

KINDS = ["numpy", "torch", "jax"]


@pytest.fixture
def x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def rosenbrock(p):
    x = jnp.concatenate([p["u"], p["v"].ravel()])
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


ROSEN0 = {"u": np.array([-1.2, 1.0]), "v": np.array([[-0.5, 0.8], [1.5, 0.3]])}


def log_barrier(p):  # NaN for x <= 0: a trial step too far
    x = p["x"]
    return jnp.sum(x * x) - 10.0 * jnp.sum(jnp.log(x))


def host(v):
    return v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)


def flat(params):
    return np.concatenate([host(params[k]).ravel() for k in sorted(params)])


def to_kind(kind, arrays, dtype="float64"):
    if kind == "torch":
        return {k: torch.tensor(np.asarray(v), dtype=getattr(torch, dtype))
                for k, v in arrays.items()}
    if kind == "jax":
        return {k: jnp.asarray(np.asarray(v), dtype) for k, v in arrays.items()}
    return {k: np.asarray(v, dtype) for k, v in arrays.items()}


@functools.cache
def jitted(f, x64):  # (compiled once per function and precision)
    return jax.jit(jax.value_and_grad(f))


def closure_of(f, kind, dtype="float64", calls=None):
    """``f`` (a JAX function of a dict) as a closure on ``kind``'s arrays."""
    vg = jitted(f, jax.config.jax_enable_x64)

    def closure(p):
        if calls is not None:
            calls.append(1)
        value, g = vg({k: jnp.asarray(host(v)) for k, v in p.items()})
        return float(value), to_kind(kind, g, dtype)
    return closure


def optax_run(f, p0, iters, **kw):
    """optax.lbfgs's params after each iteration, and each zoom's number of steps (each
    run made once: its step compiles slowly)."""
    key = (f, tuple((k, v.dtype.name, v.tobytes()) for k, v in p0.items()), iters,
           tuple(kw.items()), jax.config.jax_enable_x64)
    if key not in _RUNS:
        _RUNS[key] = _optax_run(f, p0, iters, **kw)
    return _RUNS[key]


_RUNS: dict = {}


def _optax_run(f, p0, iters, **kw):
    opt = optax.lbfgs(**kw)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = opt.init(params)
    line_search = kw.get("linesearch", True) is not None
    vg = optax.value_and_grad_from_state(f) if line_search else jax.value_and_grad(f)

    @jax.jit
    def step(params, state):
        value, g = vg(params, state=state) if line_search else vg(params)
        updates, state = opt.update(g, state, params, value=value, grad=g, value_fn=f)
        return optax.apply_updates(params, updates), state

    out, steps = [], []
    for _ in range(iters):
        params, state = step(params, state)
        out.append(flat(params))
        if line_search:
            steps.append(int(optax.tree.get(state, "info").num_linesearch_steps))
    return out, steps


def ours_run(f, p0, iters, kind, *, given=False, dtype="float64", **kw):
    opt = LBFGS(convention="optax", **kw)
    params, closure = to_kind(kind, p0, dtype), closure_of(f, kind, dtype)
    state = opt.init(params)
    out, steps = [], []
    for _ in range(iters):
        if given:  # the gradients you have (no closure: no line search)
            loss, grads = closure(params)
            params, state = opt.update(params, grads, state, loss=loss)
        else:
            params, state = opt.update(params, None, state, closure=closure)
        out.append(flat(params))
        steps.append(int(state.values["num_linesearch_steps"]))
    return out, steps, opt, state


def rel_err(a, b):
    return max(np.abs(x - y).max() / max(np.abs(y).max(), 1e-300) for x, y in zip(a, b))


CASES = {  # name: (f, start, iterations, optax.lbfgs's arguments, ours)
    "rosenbrock": (rosenbrock, ROSEN0, 25, {}, {}),
    "few zoom steps, keep": (
        rosenbrock, ROSEN0, 25,
        {"memory_size": 4, "linesearch": optax.scale_by_zoom_linesearch(
            max_linesearch_steps=3, initial_guess_strategy="keep", curv_rtol=0.1)},
        {"history_size": 4, "max_linesearch_steps": 3, "initial_guess_strategy": "keep",
         "curv_rtol": 0.1}),
    "NaN trial, no precond scaling": (
        log_barrier, {"x": np.array([5.0, 0.5, 2.0])}, 12,
        {"learning_rate": 2.0, "scale_init_precond": False},
        {"learning_rate": 2.0, "scale_init_precond": False}),
    "no line search": (
        rosenbrock, ROSEN0, 30, {"learning_rate": 0.1, "linesearch": None},
        {"learning_rate": 0.1, "line_search_fn": None}),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_optax(x64, case, kind):
    f, p0, iters, theirs, kw = CASES[case]
    ref, ref_steps = optax_run(f, p0, iters, **theirs)
    got, steps, _, state = ours_run(f, p0, iters, kind, **kw)
    assert rel_err(got, ref) <= 1e-10
    assert state.values["count"] == iters == state.step
    if case == "no line search":
        given, _, _, _ = ours_run(f, p0, iters, kind, given=True, **kw)
        assert rel_err(given, ref) <= 1e-10
        return
    assert steps == ref_steps
    assert max(steps) > 1  # the zoom took several steps somewhere
    if case == "few zoom steps, keep":  # the curvature test failed: the safe step taken
        assert steps.count(3) >= 3
    if case.startswith("NaN"):  # the first trial point (stepsize 1) is outside the domain
        x = {k: jnp.asarray(v) for k, v in p0.items()}
        g = jax.grad(f)(x)
        assert np.isnan(float(f({k: x[k] - 2.0 * g[k] for k in x}))) and steps[0] > 1


def test_reuses_the_line_searchs_evaluation_as_value_and_grad_from_state(x64):
    """The loss and gradients the zoom found at the params it returned are not evaluated
    again: one closure call per trial point, plus the first; gradients you give (with their
    loss) instead of the closure's give the same run; on the jitted JAX engine (the state
    on the device, as on accelerators) too."""
    from mithril.utils.optimizers import engines

    f, p0, iters, _, _ = CASES["rosenbrock"]
    ref, ref_steps = optax_run(f, p0, iters)
    calls = []
    opt = LBFGS(convention="optax")
    params = to_kind("numpy", p0)
    closure = closure_of(f, "numpy", calls=calls)
    state = opt.init(params)
    for i in range(iters):
        loss, grads = closure(params)  # a first evaluation you made: counts as optax's
        params, state = opt.update(params, grads, state, closure=closure, loss=loss)
        assert rel_err([flat(params)], [ref[i]]) <= 1e-10
    assert len(calls) == iters + sum(ref_steps)
    calls.clear()
    params, state = to_kind("numpy", p0), opt.init(to_kind("numpy", p0))
    for _ in range(iters):  # the closure evaluates params only the first time
        params, state = opt.update(params, None, state, closure=closure)
    assert len(calls) == 1 + sum(ref_steps) and rel_err([flat(params)], ref[-1:]) <= 1e-10
    old = engines.JAX_ENGINE
    engines.JAX_ENGINE = "jit"
    try:
        got, _, _, state = ours_run(f, p0, iters, "jax")
    finally:
        engines.JAX_ENGINE = old
    assert isinstance(state.slots["ls_grad"], jax.Array)
    assert rel_err(got, ref) <= 1e-10


def mlp(backend):
    model = ml.Model()
    model |= ml.Linear(4)(input="x", output="h")
    model |= ml.Tanh()(input="h", output="t")
    model |= ml.Linear(1)(input="t", output="y")
    model |= ml.MeanSquaredError()(input="y", target="target", output="loss")
    return ml.compile(model, backend, shapes={"x": [20, 3], "target": [20, 1]})


RNG = np.random.default_rng(0)
XS = RNG.standard_normal((20, 3))
TS = np.sin(XS.sum(axis=1, keepdims=True))
MLP0 = {"linear_0.weight": 0.5 * RNG.standard_normal((4, 3)), "linear_0.bias": np.zeros(4),
        "linear_1.weight": 0.5 * RNG.standard_normal((1, 4)), "linear_1.bias": np.zeros(1)}


def mlp_loss(p):
    h = jnp.tanh(XS @ p["linear_0.weight"].T + p["linear_0.bias"])
    return jnp.mean((h @ p["linear_1.weight"].T + p["linear_1.bias"] - TS) ** 2)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_model_matches_optax(x64, kind):
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

    backend = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[kind](
        dtype="float64")
    compiled = mlp(backend)
    data = {"x": backend.array(XS), "target": backend.array(TS)}

    def closure(params):
        outputs, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
        return outputs["loss"], grads

    ref, ref_steps = optax_run(mlp_loss, MLP0, 20)
    opt = LBFGS(convention="optax")
    params = {k: backend.array(v) for k, v in MLP0.items()}
    state = opt.init(params)
    for i in range(20):
        params, state = opt.update(params, None, state, closure=closure)
        assert rel_err([flat(params)], [ref[i]]) <= 1e-10, i
        assert state.values["num_linesearch_steps"] == ref_steps[i]
    step = make_train_step(compiled, LBFGS(convention="optax"), loss="loss")
    params = {k: backend.array(v) for k, v in MLP0.items()}
    state = step.init(params)
    for _ in range(20):  # the training step: the model on the step's data as the closure
        params, state, _ = step(params, state, data)
    assert rel_err([flat(params)], ref[-1:]) <= 1e-10


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_float32_close_to_optax(kind):
    assert not jax.config.jax_enable_x64
    ref, _ = optax_run(mlp_loss, {k: v.astype(np.float32) for k, v in MLP0.items()}, 8)
    got, _, _, _ = ours_run(mlp_loss, MLP0, 8, kind, dtype="float32")
    assert rel_err(got, ref) <= 1e-3


# -- nothing changes on error -------------------------------------------------------------

def snapshot(opt, state, params):
    return opt.state_dict(state), {k: host(v) for k, v in params.items()}


def same(opt, state, params, snap):
    sd, ps = snap
    now = opt.state_dict(state)
    assert now["step"] == sd["step"]
    assert all(a == b or (a != a and b != b) for a, b in zip(now["values"].values(),
                                                              sd["values"].values()))
    for s, per in sd["slots"].items():
        for n, a in per.items():
            assert np.array_equal(now["slots"][s][n], a), (s, n)
    for k, v in ps.items():
        assert np.array_equal(host(params[k]), v)


def warmed(kind, steps=4):
    opt = LBFGS(convention="optax", history_size=3)
    params, closure = to_kind(kind, ROSEN0), closure_of(rosenbrock, kind)
    state = opt.init(params)
    for _ in range(steps):
        params, state = opt.update(params, None, state, closure=closure)
    return opt, state, params, closure


@pytest.mark.parametrize("kind", KINDS)
def test_closure_raising_changes_nothing(x64, kind):
    opt, state, params, closure = warmed(kind)
    params = {k: v + 0 for k, v in params.items()}  # not the returned arrays: evaluated first
    calls = []
    copy = opt.load_state_dict(opt.state_dict(state), params)
    expected = flat(opt.update(params, None, copy, closure=closure_of(
        rosenbrock, kind, calls=calls))[0])
    assert len(calls) >= 2
    snap = snapshot(opt, state, params)
    for fail_at in range(1, len(calls) + 1):
        n = [0]

        def failing(p, fail_at=fail_at, n=n):
            n[0] += 1
            if n[0] == fail_at:
                raise RuntimeError("out of memory")
            return closure(p)

        with pytest.raises(RuntimeError, match="out of memory"):
            opt.update(params, None, state, closure=failing)
        same(opt, state, params, snap)
    params, state = opt.update(params, None, state, closure=closure)
    assert np.array_equal(flat(params), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_closure_results_are_named(x64, kind):
    opt, state, params, closure = warmed(kind)
    params = {k: v + 0 for k, v in params.items()}
    snap = snapshot(opt, state, params)
    nan = float("nan")

    def bad_from(n, change):
        calls = [0]

        def c(p):
            calls[0] += 1
            loss, g = closure(p)
            return change(loss, dict(g)) if calls[0] >= n else (loss, g)
        return c

    cases = [
        (lambda loss, g: (loss, {"u": g["u"]}), KeyMismatchError, r"missing \['v'\]"),
        (lambda loss, g: (loss, {**g, "u": g["u"][:1]}), ShapeError, r"gradients\['u'\]"),
        (lambda loss, g: ([loss], g), TypeError, "loss must be a number"),
        (lambda loss, g: loss, TypeError, r"must return \(loss, gradients\)"),
    ]
    for change, exc, match in cases:
        for n in (1, 2):  # at params, at a trial point
            with pytest.raises(exc, match=match):
                opt.update(params, None, state, closure=bad_from(n, change))
            same(opt, state, params, snap)
    with pytest.raises(FloatingPointError, match=r"non-finite for \['v'\]"):  # at params
        opt.update(params, None, state, closure=bad_from(
            1, lambda loss, g: (loss, {**g, "v": g["v"] * nan})))
    same(opt, state, params, snap)
    # everywhere NaN past params: the zoom fails with no safe step (stepsize 0), as optax's
    params, state = opt.update(params, None, state, closure=bad_from(2, lambda loss, g: (nan, g)))
    assert np.array_equal(flat(params), flat({k: snap[1][k] for k in snap[1]}))
    assert state.values["ls_learning_rate"] == 0.0
    assert state.values["num_linesearch_steps"] == 20


# -- resume ------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["state_dict", "checkpoint"])
@pytest.mark.parametrize("kind", KINDS)
def test_resume_equals_an_uninterrupted_run(x64, kind, via, tmp_path):
    full, _, _, _ = ours_run(rosenbrock, ROSEN0, 12, kind, history_size=4)
    opt, state, params, closure = warmed(kind, 0)
    opt = LBFGS(convention="optax", history_size=4)
    state = opt.init(params)
    for _ in range(6):
        params, state = opt.update(params, None, state, closure=closure)
    fresh = LBFGS()  # torch's convention until loaded
    if via == "state_dict":
        state = fresh.load_state_dict(opt.state_dict(state), to_kind(kind, {
            k: host(v) for k, v in params.items()}))
    else:
        save_checkpoint(tmp_path / "ck.safetensors", params, opt, state)
        loaded = load_checkpoint(tmp_path / "ck.safetensors", params, fresh)
        params, state = loaded["params"], loaded["state"]
    assert fresh.hyperparameters() == opt.hyperparameters()
    assert fresh.convention == "optax" and state.values["count"] == 6
    got = []
    for _ in range(6):
        params, state = fresh.update(params, None, state, closure=closure)
        got.append(flat(params))
    assert all(np.array_equal(a, b) for a, b in zip(got, full[6:]))


# -- arguments, the drop-ins ---------------------------------------------------------------

def test_bad_arguments_are_named():
    for kw, exc, match in [
        ({"max_iter": 5}, ValueError, "max_iter=5: torch.optim.LBFGS's"),
        ({"tolerance_grad": 1e-5}, ValueError, "tolerance_grad"),
        ({"max_eval": 3}, ValueError, "max_eval"),
        ({"fused": True}, ValueError, "fused"),
        ({"line_search_fn": "strong_wolfe"}, ValueError, "'zoom'"),
        ({"history_size": 0}, ValueError, "history_size"),
        ({"max_linesearch_steps": 0}, ValueError, "max_linesearch_steps"),
        ({"initial_guess_strategy": "max"}, ValueError, "initial_guess_strategy"),
        ({"max_learning_rate": 0.0}, ValueError, "max_learning_rate"),
        ({"curv_rtol": -1.0}, ValueError, "curv_rtol"),
        ({"convention": "keras"}, ValueError, "convention"),
    ]:
        with pytest.raises(exc, match=match):
            LBFGS(**{"convention": "optax", **kw})
    with pytest.raises(ValueError, match="max_linesearch_steps=5: optax.lbfgs's"):
        LBFGS(max_linesearch_steps=5)
    assert LBFGS(None, convention="optax").hyperparameters() == {
        "learning_rate": 1.0, "history_size": 10, "line_search_fn": "zoom",
        "convention": "optax", "scale_init_precond": True, "max_linesearch_steps": 20,
        "max_learning_rate": None, "slope_rtol": 1e-4, "curv_rtol": 0.9,
        "approx_dec_rtol": 1e-6, "stepsize_precision": 1e-5, "initial_guess_strategy": "one"}
    params = to_kind("numpy", ROSEN0)
    opt = LBFGS(convention="optax")
    state = opt.init(params)
    with pytest.raises(TypeError, match="needs closure="):
        opt.update(params, None, state)
    with pytest.raises(TypeError, match="loss="):
        opt.update(params, params, state, closure=lambda p: None)
    with pytest.raises(ValueError, match="convention='torch', history_size=100, not by this "
                                         r"LBFGS \(convention='optax', history_size=10\)"):
        opt.update(params, None, LBFGS().init(params), closure=lambda p: None)
    assert state.step == 0


def test_torch_optimizer_drop_in(x64):
    from mithril.interop import torch_optimizer

    ref, _ = optax_run(rosenbrock, ROSEN0, 25)  # (test_matches_optax's run)
    u, v = (torch.tensor(ROSEN0[k], requires_grad=True) for k in ("u", "v"))
    opt = torch_optimizer(LBFGS(convention="optax"), [("u", u), ("v", v)])

    def closure():
        opt.zero_grad()
        x = torch.cat([u, v.reshape(-1)])
        loss = (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
        loss.backward()
        return loss

    for i in range(15):
        opt.step(closure)
        assert rel_err([flat({"u": u, "v": v})], [ref[i]]) <= 1e-10, i


def test_torch_state_dict_shows_the_history_made_and_resumes(x64):
    """torch's view of the state holds the ring entries written so far (update ``c`` writes
    entry ``c − 1``), not the never-written ones; loaded into a fresh drop-in, the run goes
    on as the uninterrupted one, bit for bit."""
    from mithril.interop import torch_optimizer

    def make():
        return torch.tensor([-1.2, 1.0, 0.5], dtype=torch.float64, requires_grad=True)

    def run(opt, u, n):
        def closure():
            opt.zero_grad()
            loss = (100 * (u[1:] - u[:-1] ** 2) ** 2 + (1 - u[:-1]) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(n):
            opt.step(closure)

    u = make()
    opt = torch_optimizer(LBFGS(convention="optax"), [("u", u)])
    run(opt, u, 4)
    sd = opt.state_dict()
    assert sorted(k for k in sd["state"][0] if k[0] in "sy" and k != "step") == \
        ["s0", "s1", "s2", "y0", "y1", "y2"]
    u2 = make()
    opt2 = torch_optimizer(LBFGS(convention="optax"), [("u", u2)])
    opt2.load_state_dict(sd)
    with torch.no_grad():
        u2.copy_(u)
    run(opt, u, 5)
    run(opt2, u2, 5)
    assert torch.equal(u, u2)
    assert not torch.equal(u, make())
