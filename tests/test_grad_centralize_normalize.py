"""``centralize=`` (optax ``centralize``) and ``normalize_grad=`` / ``normalize_eps=``
(``optax.contrib.normalize``, ``optax.normalize_by_update_norm``), side by side with optax
chains: float32 in this process, float64 in one subprocess (JAX x64 is process-global);
every engine, ``optax_transformation``, ``torch_optimizer``, ``make_train_step``; groups
turning them off (optax ``masked``); bad values refused by name; a refused call changing
nothing."""

from __future__ import annotations

import functools
import json
import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import optimizer_engine, run_python

from mithril.utils.optimizers import SGD, Adafactor, Adam

SHAPES = {"w": (5, 3), "heads": (2, 3, 4), "b": (3,), "s": ()}
STEPS = 6


def problem(dtype="float32"):
    rng = np.random.default_rng(0)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (0.5 + t % 3) + 0.7, dtype=dtype)
              for k, s in SHAPES.items()} for t in range(STEPS)]
    return p0, grads


def off_mask(name):
    return {k: k != name for k in SHAPES}


#: (mithril optimizer, the optax chain it equals); a group's None is optax's ``masked``
CASES = {
    "centralize/adam": (lambda: Adam(0.01, centralize=True),
                        lambda: optax.chain(optax.centralize(), optax.adam(0.01))),
    "centralize+clip/adam": (
        lambda: Adam(0.01, centralize=True, clip_norm=1.0, clip_eps=0.0),
        lambda: optax.chain(optax.centralize(), optax.clip_by_global_norm(1.0),
                            optax.adam(0.01))),
    "normalize/sgd": (lambda: SGD(0.1, normalize_grad=1.0, normalize_eps=0.0),
                      lambda: optax.chain(optax.contrib.normalize(), optax.sgd(0.1))),
    "by_update_norm/momentum": (
        lambda: SGD(0.1, momentum=0.9, nesterov=False, normalize_grad=2.5),
        lambda: optax.chain(optax.normalize_by_update_norm(2.5, 1e-6),
                            optax.trace(0.9), optax.scale(-0.1))),
    "both+clip/adam": (  # (Adam is blind to a global scale: a per-tensor clip shows it)
        lambda: Adam(0.01, centralize=True, normalize_grad=1.0, clip_block_rms=0.2),
        lambda: optax.chain(optax.centralize(), optax.normalize_by_update_norm(1.0, 1e-6),
                            optax.clip_by_block_rms(0.2), optax.adam(0.01))),
    "adaptive/adam": (  # (the numba engine normalizes copies here: it clips unit-wise after)
        lambda: Adam(0.01, centralize=True, normalize_grad=3.0, adaptive_clip=0.05),
        lambda: optax.chain(optax.centralize(), optax.normalize_by_update_norm(3.0, 1e-6),
                            optax.adaptive_grad_clip(0.05), optax.adam(0.01))),
    "groups-off/adam": (
        lambda: Adam(0.01, centralize=True, normalize_grad=1.0, param_groups=[
            {"params": ["w"], "centralize": None}, {"params": ["b"], "normalize_grad": None}]),
        lambda: optax.chain(optax.masked(optax.centralize(), off_mask("w")),
                            optax.masked(optax.normalize_by_update_norm(), off_mask("b")),
                            optax.adam(0.01))),
}


def optax_run(tx, dtype="float32"):
    p0, grads = problem(dtype)
    ps = {k: jnp.asarray(v) for k, v in p0.items()}
    st = tx.init(ps)
    for g in grads:
        u, st = tx.update({k: jnp.asarray(v) for k, v in g.items()}, st, ps)
        ps = optax.apply_updates(ps, u)
    return {k: np.asarray(v) for k, v in ps.items()}


def run(opt, conv=np.array, dtype="float32"):
    p0, grads = problem(dtype)
    params = {k: conv(v.copy()) for k, v in p0.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
    return {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in params.items()}


def close(got, want, rtol, atol):
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


@functools.cache
def float64_references() -> dict:
    import inspect

    code = "\n".join([
        "import jax, json\njax.config.update('jax_enable_x64', True)",
        "import jax.numpy as jnp, numpy as np, optax",
        f"SHAPES = {SHAPES!r}\nSTEPS = {STEPS!r}", inspect.getsource(problem),
        inspect.getsource(off_mask), inspect.getsource(optax_run),
        "SGD = Adam = None  # (the cases' mithril side is not called there)",
        "CASES = " + _cases_source(),
        "print(json.dumps({n: {k: v.tolist() for k, v in optax_run(tx(), 'float64').items()}"
        " for n, (_, tx) in CASES.items()}))"])
    return json.loads(run_python(code, timeout=240).strip().splitlines()[-1])


def _cases_source() -> str:
    import inspect

    src = inspect.getsource(__import__(__name__))
    start = src.index("CASES = {") + len("CASES = ")
    return src[start:src.index("\n}\n", start) + 2]


@pytest.mark.parametrize("case", list(CASES))
def test_equals_optax_float32(case):
    mine, theirs = CASES[case]
    close(run(mine()), optax_run(theirs()), 2e-5, 2e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_equals_optax_float64(case):
    want = float64_references()[case]
    got = run(CASES[case][0](), dtype="float64")
    close(got, {k: np.asarray(v) for k, v in want.items()}, 1e-11, 1e-12)


@pytest.mark.parametrize("kind, conv", [
    ("numba", torch.from_numpy), ("numba", jnp.asarray), ("jax-jit", jnp.asarray),
    ("array", np.array), ("array", torch.from_numpy)],
    ids=["torch", "jax", "jax-jit", "array-numpy", "array-torch"])
def test_every_engine(kind, conv):
    for case in ("both+clip/adam", "adaptive/adam"):
        want = optax_run(CASES[case][1]())
        with optimizer_engine(kind):
            got = run(CASES[case][0](), conv)
        close(got, want, 2e-5, 2e-6)


def test_optax_transformation_and_tensorwise():
    from mithril.interop import optax_transformation

    for case in ("both+clip/adam", "groups-off/adam"):
        mine, theirs = CASES[case]
        close(optax_run(optax_transformation(mine())), optax_run(theirs()), 2e-5, 2e-6)
    # a per-tensor optimizer: as its plain self on gradients centralized and normalized by hand
    p0, grads = problem()
    by_hand = []
    for g in grads:
        c = {k: v - v.mean(axis=tuple(range(1, v.ndim)), keepdims=True) if v.ndim > 1 else v
             for k, v in g.items()}
        n = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in c.values()))
        by_hand.append({k: (v * (0.5 / (n + 1e-6))).astype(np.float32) for k, v in c.items()})
    for conv in (np.array, jnp.asarray):
        got = run(Adafactor(0.05, centralize=True, normalize_grad=0.5), conv)
        params = {k: conv(v.copy()) for k, v in p0.items()}
        opt = Adafactor(0.05)
        state = opt.init(params)
        for g in by_hand:
            params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
        close(got, {k: np.asarray(v) for k, v in params.items()}, 2e-5, 2e-6)
    tx = optax_transformation(Adafactor(0.05, centralize=True, normalize_grad=0.5))
    close(optax_run(tx), {k: np.asarray(v) for k, v in params.items()}, 2e-5, 2e-6)


def test_torch_optimizer_and_make_train_step():
    from mithril.interop import torch_optimizer

    mine, theirs = CASES["both+clip/adam"]
    want = optax_run(theirs())
    p0, grads = problem()
    ts = [torch.nn.Parameter(torch.tensor(p0[k])) for k in SHAPES]
    topt = torch_optimizer(mine(), ts)
    for g in grads:
        for t, k in zip(ts, SHAPES):
            t.grad = torch.tensor(g[k])
        topt.step()
    close({k: t.detach().numpy() for k, t in zip(SHAPES, ts)}, want, 2e-5, 2e-6)
    # a torch param group turning it off; the other against torch.optim.Adam on centralized
    # gradients (torch's own Adam: its peer)
    init = torch.tensor(p0["w"])
    w, v, u = (torch.nn.Parameter(init.clone()) for _ in range(3))
    topt = torch_optimizer(Adam(0.01, centralize=True), [{"params": [w]},
                                                         {"params": [v], "centralize": False}])
    ref = torch.optim.Adam([u], lr=0.01)
    for g in grads:
        g = torch.tensor(g["w"])
        w.grad, v.grad, u.grad = g.clone(), g.clone(), g - g.mean(1, keepdim=True)
        topt.step()
        ref.step()
    np.testing.assert_allclose(w.detach().numpy(), u.detach().numpy(), rtol=2e-5, atol=2e-6)
    assert topt.state_dict()["param_groups"][1]["centralize"] is False
    assert not np.allclose(v.detach().numpy(), u.detach().numpy(), atol=1e-3)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_make_train_step(backend):
    """The fused step (JAX: one program, through ``optax_transformation``) equals the
    separate evaluate + update."""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
    from mithril.cli.networks import mlp_spec
    from mithril.utils.training import make_train_step

    spec = mlp_spec(8, 4, [6])
    be = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[backend](
        dtype="float32", seed=0)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    rng = np.random.default_rng(0)
    batches = [{"input": be.array(rng.standard_normal((16, 8)).astype(np.float32)),
                "target": be.array(rng.integers(0, 4, 16), be.int_dtype)} for _ in range(3)]

    def loop(fused):
        opt, params = CASES["both+clip/adam"][0](), compiled.get_parameters()
        step = make_train_step(compiled, opt, loss="loss") if fused else None
        state = step.init(params) if fused else opt.init(params)
        for data in batches:
            if fused:
                params, state, _ = step(params, state, data)
            else:
                _, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
                params, state = opt.update(params, grads, state)
        return {k: np.array(be.to_numpy(v)) for k, v in params.items()}

    want, got = loop(False), loop(True)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_zero_gradient_stays_zero_where_optax_gives_nan():
    # optax.contrib.normalize divides 0 by 0; here the factor is 1 where ‖g‖ + ε is 0
    opt = SGD(0.1, normalize_grad=1.0, normalize_eps=0.0)
    params = {"w": np.ones((2, 3), np.float32)}
    state = opt.init(params)
    params, state = opt.update(params, {"w": np.zeros((2, 3), np.float32)}, state)
    assert np.array_equal(params["w"], np.ones((2, 3), np.float32))
    u, _ = optax.contrib.normalize().update({"w": jnp.zeros((2, 3))}, optax.EmptyState())
    assert np.isnan(np.asarray(u["w"])).all()


@pytest.mark.parametrize("kw, name", [
    ({"normalize_grad": -1.0}, "normalize_grad"), ({"normalize_grad": 0.0}, "normalize_grad"),
    ({"normalize_grad": float("nan")}, "normalize_grad"), ({"normalize_eps": -1e-6}, "normalize_eps"),
    ({"centralize": "yes"}, "centralize"), ({"centralize": 2}, "centralize")])
def test_bad_values_name_the_argument(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        Adam(0.01, **kw)
    with pytest.raises((ValueError, TypeError), match=rf"param_groups\[0\].*{name}"):
        Adam(0.01, param_groups=[{"params": ["w"], **kw}])


def test_a_refused_call_changes_nothing():
    p0, grads = problem()
    opt = Adam(0.01, centralize=True, normalize_grad=1.0)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    before = {k: np.array(v) for k, v in params.items()}, state.to_numpy(), state.step
    given = {k: v.copy() for k, v in grads[1].items()}
    with pytest.raises(Exception, match="heads"):  # a wrong shape, named
        opt.update(params, dict(given, heads=np.ones((2, 4, 3), np.float32)), state)
    setattr_bad = pytest.raises(ValueError, match="normalize_grad")
    with setattr_bad:
        opt.hyperparameter("normalize_grad").set_learning_rate(-2.0)
    assert opt.normalize_grad == 1.0
    for kw, bad in (({"centralize": True}, np.nan), ({"normalize_grad": 1.0}, np.inf),
                    ({"normalize_grad": 1.0, "centralize": True}, np.nan)):
        opt2 = Adam(0.01, nonfinite="skip", **kw)  # (an inf norm: factor 0, a NaN step)
        p2 = {k: v.copy() for k, v in p0.items()}
        st2 = opt2.init(p2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out, st2 = opt2.update(p2, dict(given, w=np.full((5, 3), bad, np.float32)), st2)
        assert st2.last_step_skipped and st2.step == 0, kw
        assert all(np.array_equal(out[k], p0[k]) for k in SHAPES), kw
    assert state.step == before[2]
    for k in SHAPES:
        assert np.array_equal(params[k], before[0][k]) and np.array_equal(given[k], grads[1][k])
    for s, v in state.to_numpy().items():
        assert np.array_equal(v, before[1][s])


def test_state_dict_keeps_the_options():
    opt = Adam(0.01, centralize=True, normalize_grad=2.0, normalize_eps=0.0,
               param_groups=[{"params": ["w"], "centralize": False}])
    p0, grads = problem()
    state = opt.init({k: v.copy() for k, v in p0.items()})
    d = json.loads(json.dumps(opt.state_dict(state), default=lambda a: np.asarray(a).tolist()))
    hp = d["hyperparameters"]
    assert (hp["centralize"], hp["normalize_grad"], hp["normalize_eps"]) == (True, 2.0, 0.0)
    fresh = Adam(0.01)
    fresh.load_state_dict(opt.state_dict(state))
    assert (fresh.centralize, fresh.normalize_grad, fresh.normalize_eps) == (True, 2.0, 0.0)
    assert fresh.param_groups[0]["centralize"] is False
    bad = opt.state_dict(state)
    bad["hyperparameters"] = {**bad["hyperparameters"], "normalize_grad": -1.0, "beta1": 0.5}
    with pytest.raises(ValueError, match="normalize_grad"):
        fresh.load_state_dict(bad)
    assert fresh.normalize_grad == 2.0 and fresh.beta1 == 0.9  # refused: nothing changed


def test_data_parallel():
    """One rank: the replicated step is the optimizer's; the sharded one refuses
    ``normalize_grad`` (a norm over every rank's tensors) before anything changes, and takes
    ``centralize`` (per tensor, on the rank's own tensors)."""
    from mithril.distributed import DataParallel

    p0, grads = problem("float64")
    with pytest.raises(NotImplementedError, match="normalize_grad"):
        DataParallel(Adam(0.01, param_groups=[{"params": ["w"], "normalize_grad": 1.0}]),
                     shard_state=True).init({k: v.copy() for k, v in p0.items()})
    want = run(CASES["groups-off/adam"][0](), dtype="float64")
    for shard, make in ((False, CASES["groups-off/adam"][0]), (True, CASES["centralize/adam"][0])):
        dp, params = DataParallel(make(), shard_state=shard), {k: v.copy() for k, v in p0.items()}
        state = dp.init(params)
        for g in grads:
            params, state = dp.update(params, {k: v.copy() for k, v in g.items()}, state)
        close(params, want if not shard else run(make(), dtype="float64"), 1e-12, 1e-13)


def test_cli_flags_and_specs():
    """``--centralize`` / ``--normalize-grad`` / ``--normalize-eps`` and the spec keys reach the
    optimizer (every one of the catalog, as the clips); a bad value is the constructor's error."""
    import argparse

    from mithril.cli.options import COMMON_OPTIONS, add_options, build_optimizer, settings_from

    parser = argparse.ArgumentParser()
    add_options(parser, "gradient handling", COMMON_OPTIONS)
    got = settings_from(parser.parse_args(["--centralize", "--normalize-grad", "2",
                                           "--normalize-eps", "0"]), COMMON_OPTIONS)
    assert got == {"centralize": True, "normalize_grad": 2.0, "normalize_eps": 0.0}
    for name in ("sgd", "adamw", "lion", "adafactor"):
        opt = build_optimizer(name, got)
        assert (opt.centralize, opt.normalize_grad, opt.normalize_eps) == (True, 2.0, 0.0)
    with pytest.raises(Exception, match="normalize_grad"):
        build_optimizer("adam", {"normalize_grad": -1.0})
