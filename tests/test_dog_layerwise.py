"""DoG / DoWG ``layer_wise=True`` (L-DoG: one step size per tensor) against optax 0.2.8's
``contrib.dog`` / ``contrib.dowg`` given one tensor each through ``optax.multi_transform``
(each its own r, S, ε and r_ε = c·(1 + ‖x₀‖) of that tensor): float64 to 1e-12 over 25
steps (NumPy, torch), float32 to 1e-6 (JAX; ``optax_transformation`` in ``jax.jit``; the
one-program ``make_train_step``); the default is still optax's one global step size, which
differs; a tensor missing from a step keeps its own estimates."""

from __future__ import annotations

import numpy as np
import pytest
from optimizer_peer_arguments import (
    SHAPES,
    STEPS,
    gradient,
    moved,
    optax_float64,
    optax_run,
    ours,
    rel_err,
    start,
)

from mithril.utils.optimizers import DoG, DoWG


def per_tensor(factory: str) -> str:
    """optax's source: ``factory`` (e.g. ``contrib.dog(0.5)``) applied to each tensor alone."""
    labels = {n: n for n in SHAPES}
    return (f"optax.multi_transform({{n: {factory} for n in {list(SHAPES)!r}}}, "
            f"{labels!r})")


# name -> (class, our keyword arguments, optax's source)
CASES = {
    "dog_heuristic": (DoG, {"learning_rate": 0.7},
                      per_tensor("contrib.dog(0.7)")),
    "dog_heuristic_big": (DoG, {"init_step": ("heuristic", 0.05), "epsilon": 1e-3},
                          per_tensor("contrib.dog(init_step=('heuristic', 0.05), eps=1e-3)")),
    "dog_distance_wd": (DoG, {"init_step": ("distance", 1e-2), "weight_decay": 0.1},
                        per_tensor("contrib.dog(init_step=('distance', 1e-2), "
                                   "weight_decay=0.1)")),
    "dog_learning_rate": (DoG, {"learning_rate": 0.5, "init_step": ("learning_rate", 0.02)},
                          per_tensor("contrib.dog(0.5, init_step=('learning_rate', 0.02))")),
    "dowg": (DoWG, {}, per_tensor("contrib.dowg()")),
    "dowg_init_wd": (DoWG, {"learning_rate": 0.8, "init_estim_sq_dist": 1e-3,
                            "weight_decay": 0.05},
                     per_tensor("contrib.dowg(0.8, init_estim_sq_dist=1e-3, "
                                "weight_decay=0.05)")),
}
GLOBAL = {"dog_global": "contrib.dog(0.7)", "dowg_global": "contrib.dowg()"}


@pytest.fixture(scope="module")
def optax64():
    return optax_float64({**{n: src for n, (_, _, src) in CASES.items()}, **GLOBAL})


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_optax_per_tensor(optax64, name, backend):
    cls, kw, _ = CASES[name]
    want = optax64[name]
    assert moved(want) > 1e-5  # (DoG from r_ε = 1e-6·(1 + ‖x₀‖) starts slowly)
    assert rel_err(ours(cls(layer_wise=True, **kw), backend), want) < 1e-12


def test_default_is_one_global_step_size(optax64):
    """Without ``layer_wise`` ours is optax's global DoG / DoWG (as before), which is not
    the per-tensor one: the test above can fail."""
    for name, cls, kw in (("dog", DoG, {"learning_rate": 0.7}), ("dowg", DoWG, {})):
        got, glob = ours(cls(**kw)), optax64[f"{name}_global"]
        local = optax64[f"{name}_heuristic" if name == "dog" else name]
        assert rel_err(got, glob) < 1e-12
        # (apart by a good part of how far they went: DoG from r_ε = 1e-6 moves little)
        assert rel_err(got, local) > 0.05 * moved(local)
        assert rel_err(ours(cls(layer_wise=True, **kw)), glob) > 0.05 * moved(glob)


def test_state_holds_one_estimate_per_tensor():
    """The estimates are tensor slots: S of each tensor is its own Σₜ‖gₜ‖² (float64), r its
    own r_ε = c·(1 + ‖x₀‖) at the first step; no optimizer-wide value."""
    opt = DoG(layer_wise=True, init_step=("heuristic", 1e-3))
    p = start()
    state = opt.init(p)
    opt.update(dict(p), {n: np.asarray(a) for n, a in gradient(1, p).items()}, state)
    assert state.values == {}
    for n in SHAPES:
        np.testing.assert_allclose(state.slot("sum_sq")[n], np.sum(gradient(1, p)[n] ** 2),
                                   rtol=1e-14)
        np.testing.assert_allclose(state.slot("max_dist")[n],
                                   1e-3 * (1 + np.linalg.norm(p[n])), rtol=1e-14)


def test_float32_jax_and_optax_transformation():
    import optax
    from optax import contrib

    from mithril.interop import optax_transformation

    for cls, kw, src in (CASES["dog_distance_wd"], CASES["dowg_init_wd"]):
        want = optax_run(eval(src, {"optax": optax, "contrib": contrib}), STEPS, np.float32)
        assert rel_err(ours(cls(layer_wise=True, **kw), "jax", "float32"), want) < 1e-6
        tx = optax_transformation(cls(layer_wise=True, **kw))
        assert rel_err(optax_run(tx, STEPS, np.float32), want) < 1e-6


@pytest.mark.parametrize("cls", [DoG, pytest.param(DoWG, marks=pytest.mark.slow)])
def test_make_train_step_one_program(cls):
    from test_train_step_fn import fused, problem, separate

    compiled, _, batches = problem("jax")
    want, want_losses = separate(compiled, cls(layer_wise=True), batches)
    compiled2, _, _ = problem("jax")
    got, losses, (step, _, _) = fused(compiled2, cls(layer_wise=True), batches)
    assert step.fused
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6, atol=1e-6)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_missing_tensor_keeps_its_estimates():
    """A tensor without a gradient at a step is left alone with its estimates: ``b`` missing
    at step 2 is then optax's per-tensor DoG that saw one step less (its own count)."""
    opt = DoG(layer_wise=True, init_step=("distance", 1e-2))
    p = start()
    state = opt.init(p)
    b_alone = DoG(init_step=("distance", 1e-2))  # a global DoG on b alone: b's own estimate
    pb = {"b": start()["b"]}
    sb = b_alone.init(pb)
    for t in range(1, 6):
        g = gradient(t, p)
        if t == 2:
            del g["b"]
        else:
            pb, sb = b_alone.update(pb, {"b": g["b"]}, sb)
        p, state = opt.update(p, g, state)
    np.testing.assert_allclose(p["b"], pb["b"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [DoG, DoWG])
def test_layer_wise_is_checked_and_step_wide(cls):
    with pytest.raises(TypeError, match="layer_wise must be True or False"):
        cls(layer_wise="yes")
    with pytest.raises(ValueError, match="layer_wise"):
        cls(param_groups=[{"params": "b", "layer_wise": True}])
