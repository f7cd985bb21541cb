"""GaLore against optax.contrib.galore (optax 0.2.8), float64, side by side.

35 steps with a projection refresh every 10 (steps 1, 11, 21, 31) or 7, under a
piecewise-constant learning-rate schedule (optax: the schedule as ``learning_rate``; ours:
``set_learning_rate`` before each step), on a tall and a wide matrix (projected on the left
and on the right), a matrix thinner than the rank, a vector, a 3-D tensor and a scalar (Adam
on the full gradient, optax's default ``weight_dimension_numbers=None``), on every path:
NumPy, torch, JAX (the one-program step and eagerly), ``optax_transformation`` and
``torch_optimizer``; parameters compared after every step, to 1e-10.

The SVD's signs matter: the moments carry over a refresh into the new basis, so a singular
vector of the other sign changes every later step (``test_the_result_depends_on_the_svd_signs``).
Ours is the same LAPACK routine as jaxlib's on CPU, in float32 as optax's
(``test_the_svd_is_jaxs_to_the_bit``), hence equal results.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import optax.contrib as oc  # noqa: E402
from optimizer_parity import optax_trajectory  # noqa: E402

from mithril.errors import ShapeError  # noqa: E402
from mithril.interop import optax_transformation, torch_optimizer  # noqa: E402
from mithril.utils.optimizers import GaLore  # noqa: E402
from mithril.utils.optimizers import galore as galore_module  # noqa: E402
from mithril.utils.optimizers.engines import tensorwise_jit  # noqa: E402
from mithril.utils.optimizers.tensorwise import JaxOps, NumpyOps, TorchOps  # noqa: E402

TOL = 1e-10
STEPS = 35
SHAPES = {"tall": (12, 5), "wide": (4, 9), "thin": (3, 8), "b": (7,), "c": (2, 3, 2), "s": ()}
rng = np.random.default_rng(0)
P0 = {k: np.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}
GRADS = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 4)) for k, s in SHAPES.items()}
         for t in range(STEPS)]
FACTORS = {12: 0.5, 25: 2.0}


@pytest.fixture(autouse=True, scope="module")
def _x64():
    jax.config.update("jax_enable_x64", True)  # (conftest restores it after the module)
    yield


def sched(lr0: float):
    return optax.piecewise_constant_schedule(lr0, FACTORS)


CASES = {
    "defaults": (lambda: GaLore(0.05, rank=3, update_proj_gap=10),
                 lambda: oc.galore(sched(0.05), rank=3, update_proj_gap=10)),
    "options": (lambda: GaLore(0.02, rank=2, update_proj_gap=7, scale=0.25, beta1=0.8,
                               beta2=0.99, epsilon=1e-6, eps_root=1e-10, weight_decay=0.1,
                               weight_decay_mask=lambda n: n != "b"),
                lambda: oc.galore(sched(0.02), rank=2, update_proj_gap=7, scale=0.25,
                                  base_optimizer=optax.scale_by_adam(0.8, 0.99, 1e-6, 1e-10),
                                  weight_decay=0.1, mask={k: k != "b" for k in SHAPES})),
}


def _host_tree(params: dict) -> dict:
    return {k: v.numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
            for k, v in params.items()}


@functools.cache
def expected(case: str) -> list[dict]:
    return reference(CASES[case][1]())


def reference(tx) -> list[dict]:
    return optax_trajectory(tx, P0, GRADS)


def ours(opt: GaLore, path: str, monkeypatch) -> list[dict]:
    lr0 = opt.learning_rate
    if path == "optax_transformation":
        return reference(optax_transformation(opt, learning_rate=sched(lr0)))
    if path == "torch_optimizer":
        tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in P0.items()}
        topt, out = torch_optimizer(opt, list(tp.items())), []
        for t, g in enumerate(GRADS):
            topt.param_groups[0]["lr"] = float(sched(lr0)(t))
            for k, p in tp.items():
                p.grad = torch.tensor(g[k])
            topt.step()
            out.append({k: p.detach().numpy().copy() for k, p in tp.items()})
        return out
    monkeypatch.setattr(tensorwise_jit, "ENABLED", path != "jax-eager")
    conv = {"numpy": np.array, "torch": torch.tensor}.get(path, jnp.asarray)
    params = {k: conv(v) for k, v in P0.items()}
    state, out = opt.init(params), []
    traces = tensorwise_jit.TRACES
    for t, g in enumerate(GRADS):
        opt.set_learning_rate(float(sched(lr0)(t)))
        params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
        out.append(_host_tree(params))
    assert state.step == STEPS
    if path == "jax":  # one program with the SVD, one without (compiled once each)
        assert tensorwise_jit.TRACES - traces <= 2 and tensorwise_jit.TRACES > traces
    return out


PATHS = ["numpy", "torch", "jax", "jax-eager", "optax_transformation", "torch_optimizer"]
#: the default suite's: every path but JAX op by op (~3x slower), on the case with every
#: option; the slow suite's: the defaults on every path, and JAX op by op
SLOW = {("options", "jax-eager"), *(("defaults", p) for p in PATHS)}


@pytest.mark.parametrize("case, path", [
    pytest.param(c, p, marks=[pytest.mark.slow] if (c, p) in SLOW else [])
    for c in CASES for p in PATHS])
def test_float64_parity_with_optax(case: str, path: str, monkeypatch) -> None:
    make = CASES[case][0]
    want = expected(case)
    assert np.abs(want[-1]["tall"] - P0["tall"]).max() > 1e-2  # it moved
    got = ours(make(), path, monkeypatch)
    for t, (a, b) in enumerate(zip(got, want)):
        for k in SHAPES:
            assert a[k].dtype == np.float64
            np.testing.assert_allclose(a[k], b[k], rtol=TOL, atol=TOL, err_msg=f"{k} step {t + 1}")


def test_a_full_program_cache_keeps_the_two_programs_in_use(monkeypatch) -> None:
    """The process-wide cache of step programs drops its least recently used one when full,
    not every one: GaLore's two programs (with and without the SVD refresh) are traced once
    each however many programs other optimizers left (31 here: the second program of the
    loop fills it, and the first, used since, stays)."""
    from collections import OrderedDict

    others = OrderedDict((("another optimizer", i), None) for i in range(31))
    monkeypatch.setattr(tensorwise_jit, "_COMPILED", others)
    traces = tensorwise_jit.TRACES
    got = ours(CASES["options"][0](), "jax", monkeypatch)
    assert tensorwise_jit.TRACES - traces == 2
    assert len(tensorwise_jit._COMPILED) == tensorwise_jit._MOST
    np.testing.assert_allclose(got[-1]["tall"], expected("options")[-1]["tall"], rtol=TOL,
                               atol=TOL)


def test_defaults_are_optax() -> None:
    import inspect

    theirs = {k: p.default for k, p in inspect.signature(oc.galore).parameters.items()}
    adam = {k: p.default for k, p in inspect.signature(optax.scale_by_adam).parameters.items()}
    mine = {k: p.default for k, p in inspect.signature(GaLore).parameters.items()}
    for k in ("rank", "update_proj_gap", "scale", "weight_decay"):
        assert mine[k] == theirs[k], k
    for k, a in (("beta1", "b1"), ("beta2", "b2"), ("epsilon", "eps"), ("eps_root", "eps_root")):
        assert mine[k] == adam[a], k


@pytest.mark.parametrize("shape", [(12, 5), (4, 9), (64, 32)])
def test_the_svd_is_jaxs_to_the_bit(shape: tuple[int, int]) -> None:
    """float32, as optax: NumPy and torch-CPU call jaxlib's LAPACK routine (SciPy's gesdd)."""
    g = np.random.default_rng(1).standard_normal(shape)
    u, _, vt = jnp.linalg.svd(jnp.asarray(g).astype(jnp.float32), full_matrices=False)
    for xp, a in ((NumpyOps(), g), (TorchOps(), torch.tensor(g)), (JaxOps(), jnp.asarray(g))):
        mu, mvt = _host(_svd(xp, a))
        assert mu.dtype == np.float32
        np.testing.assert_array_equal(mu, np.asarray(u), err_msg=xp.name)
        np.testing.assert_array_equal(mvt, np.asarray(vt), err_msg=xp.name)


def _svd(xp, a):
    return galore_module._svd_float32(xp, a)


def _host(pair):
    return tuple(x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in pair)


def test_the_result_depends_on_the_svd_signs(monkeypatch) -> None:
    """The second refresh's singular vectors negated: every later step differs (the
    moments carried over meet the flipped basis), so the SVD routine must be optax's."""
    def run() -> dict:
        opt, p = GaLore(0.05, rank=3, update_proj_gap=10), {k: v.copy() for k, v in P0.items()}
        s = opt.init(p)
        for g in GRADS:
            p, s = opt.update(p, g, s)
        return {k: np.array(v) for k, v in p.items()}

    base = run()
    real, calls = galore_module._svd_float32, []

    def flipped(xp, g):
        u, vt = real(xp, g)
        calls.append(1)
        return (-u, -vt) if 4 <= len(calls) <= 6 else (u, vt)  # the 2nd refresh: 3 matrices

    monkeypatch.setattr(galore_module, "_svd_float32", flipped)
    other = run()
    assert len(calls) == 12  # 4 refreshes of 3 matrices
    assert max(np.abs(other[k] - base[k]).max() for k in ("tall", "wide", "thin")) > 1e-3
    np.testing.assert_array_equal(other["b"], base["b"])  # (Adam alone: no projection)


# -- state ----------------------------------------------------------------------------------
def _run(opt, params, state, grads):
    for g in grads:
        params, state = opt.update(params, g, state)
    return params, state


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_resume_equals_uninterrupted(backend: str, tmp_path) -> None:
    """Saved at step 15 (after the refresh of step 11), through a checkpoint file, resumed
    by a new GaLore: the same 35 steps to the bit."""
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    conv = np.array if backend == "numpy" else torch.tensor
    gs = [{k: conv(v) for k, v in g.items()} for g in GRADS]
    opt = GaLore(0.05, rank=3, update_proj_gap=10, weight_decay=0.01)
    p = {k: conv(v) for k, v in P0.items()}
    want, _ = _run(opt, p, opt.init(p), gs)
    want = _host_tree(want)

    opt = GaLore(0.05, rank=3, update_proj_gap=10, weight_decay=0.01)
    p = {k: conv(v) for k, v in P0.items()}
    p, s = _run(opt, p, opt.init(p), gs[:15])
    sd = opt.state_dict(s)
    assert sd["slots"]["projector"]["tall"].shape == (12, 3)
    assert sd["slots"]["m"]["wide"].shape == (4, 3) and sd["slots"]["projector"]["b"].shape == (0,)
    save_checkpoint(tmp_path / "c.safetensors", p, opt, s)
    other = GaLore()
    got = load_checkpoint(tmp_path / "c.safetensors", p, other)
    assert other.rank == 3 and other.update_proj_gap == 10 and got["state"].step == 15
    p2, _ = _run(other, got["params"], got["state"], gs[15:])
    p2 = _host_tree(p2)
    for k in want:
        np.testing.assert_array_equal(p2[k], want[k], err_msg=k)


def _saved(steps: int = 12) -> tuple[GaLore, dict, dict]:
    opt, p = GaLore(0.05, rank=3, update_proj_gap=10), {k: v.copy() for k, v in P0.items()}
    p, s = _run(opt, p, opt.init(p), GRADS[:steps])
    return opt, p, opt.state_dict(s)


def test_state_round_trip() -> None:
    opt, p, sd = _saved()
    fresh = GaLore()
    state = fresh.load_state_dict(sd, p)
    again = fresh.state_dict(state)
    assert again["step"] == 12 and again["hyperparameters"] == sd["hyperparameters"]
    for slot, per in sd["slots"].items():
        for k, a in per.items():
            np.testing.assert_array_equal(again["slots"][slot][k], a, err_msg=f"{slot}/{k}")


def _with(sd: dict, slot: str, name: str, value) -> dict:
    out = {**sd, "slots": {s: dict(v) for s, v in sd["slots"].items()}}
    out["slots"][slot][name] = value
    return out


@pytest.mark.parametrize("change, error, words", [
    (lambda sd: _with(sd, "v", "tall", -np.abs(sd["slots"]["v"]["tall"])), ValueError,
     "slot 'v' of 'tall' must be >= 0"),
    (lambda sd: _with(sd, "projector", "wide", 2 * sd["slots"]["projector"]["wide"]),
     ValueError, "'projector' of 'wide' must have orthonormal columns"),
    (lambda sd: {**_with(sd, "projector", "tall", np.ones((12, 3))), "step": 0}, ValueError,
     "'projector' of 'tall' must be zeros at step 0"),
    (lambda sd: _with(sd, "projector", "tall", np.eye(12)[:, :4]), ShapeError,
     "'projector' of 'tall' has shape (12, 4)"),
    (lambda sd: _with(sd, "m", "b", np.zeros((7, 3))), ShapeError, "slot 'm' of 'b'"),
])
def test_impossible_saved_values_are_refused_and_change_nothing(change, error, words) -> None:
    _, p, sd = _saved()
    bad = change(sd)
    bad["hyperparameters"] = {**bad["hyperparameters"], "learning_rate": 0.5}
    opt = GaLore(0.01, rank=3, update_proj_gap=10)
    before = opt.hyperparameters()
    with pytest.raises(error, match=None) as e:
        opt.load_state_dict(bad, p)
    assert words in str(e.value)
    assert opt.hyperparameters() == before


def test_a_zero_projector_after_steps_is_a_tensor_without_gradients_yet() -> None:
    opt, p, sd = _saved()
    ok = _with(sd, "projector", "tall", np.zeros((12, 3)))
    assert GaLore().load_state_dict(ok, p).step == 12


# -- arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, words", [
    ({"rank": 0}, ValueError, "rank"),
    ({"rank": 2.0}, TypeError, "rank"),
    ({"update_proj_gap": 0}, ValueError, "update_proj_gap"),
    ({"update_proj_gap": True}, TypeError, "update_proj_gap"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"scale": "1"}, TypeError, "scale"),
    ({"beta1": 1.0}, ValueError, "beta1"),
    ({"beta2": -0.1}, ValueError, "beta2"),
    ({"epsilon": -1e-8}, ValueError, "epsilon"),
    ({"eps_root": float("inf")}, ValueError, "eps_root"),
    ({"param_groups": [{"params": ["b"], "rank": 2}]}, ValueError, "rank"),
])
def test_bad_arguments_are_refused_by_name(kwargs, error, words) -> None:
    with pytest.raises(error, match=words):
        GaLore(**kwargs)


def test_rank_is_fixed_and_a_refused_step_changes_nothing() -> None:
    opt = GaLore(0.05, rank=3)
    opt.rank = 3  # (what it is: nothing changes)
    with pytest.raises(AttributeError, match="rank is fixed"):
        opt.rank = 4
    assert opt.rank == 3
    p = {k: v.copy() for k, v in P0.items()}
    s = opt.init(p)
    p, s = opt.update(p, GRADS[0], s)
    before = opt.state_dict(s)
    kept = {k: np.array(v) for k, v in p.items()}
    with pytest.raises(ShapeError, match="tall"):
        opt.update(p, {**GRADS[1], "tall": np.ones((5, 12))}, s)
    after = opt.state_dict(s)
    assert after["step"] == 1
    for slot in before["slots"]:
        for k in SHAPES:
            np.testing.assert_array_equal(after["slots"][slot][k], before["slots"][slot][k])
    for k in SHAPES:
        np.testing.assert_array_equal(p[k], kept[k])
