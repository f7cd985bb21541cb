"""Per-example gradients (against torch.func.vmap(grad)) and DP-SGD (against
optax.contrib.dpsgd / differentially_private_aggregate), side by side, on NumPy, torch, JAX."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.optimizers import DPSGD, SGD, Adam, DifferentiallyPrivate
from mithril.utils.per_example import per_example_gradients

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


@pytest.fixture(scope="module", autouse=True)
def _x64():
    was = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", was)


def mlp_model() -> ml.Model:
    model = ml.Model()
    model |= ml.MLP(["tanh", None], [5, 3])(input="input", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return model


def conv_model() -> ml.Model:
    model = ml.Model()
    model |= ml.Convolution2D(3, 2, padding=1)(input="input")
    model += ml.Relu()
    model += ml.Flatten()
    model += ml.Linear(3)(output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return model


def torch_mlp_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p["mlp.linear_0.weight"].T + p["mlp.linear_0.bias"])
    logits = h @ p["mlp.linear_1.weight"].T + p["mlp.linear_1.bias"]
    return F.cross_entropy(logits[None], y[None])  # (the example as a batch of one)


def torch_conv_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = F.relu(F.conv2d(x[None], p["convolution2_d.weight"], p["convolution2_d.bias"],
                        padding=1)).flatten(1)
    return F.cross_entropy(h @ p["linear.weight"].T + p["linear.bias"], y[None])


CASES = {"mlp": (mlp_model, (4,), torch_mlp_loss), "conv": (conv_model, (1, 4, 4), torch_conv_loss)}


def setup(backend_name: str, case: str = "mlp", batch: int = 6, seed: int = 0):
    make, shape, _ = CASES[case]
    be = BACKENDS[backend_name](dtype="float64")
    c = ml.compile(make(), be, shapes={"input": [None, *shape]})
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(v) * 0.5 for k, v in c.parameter_shapes.items()}
    x = rng.standard_normal((batch, *shape))
    y = rng.integers(0, 3, batch)
    return be, c, p0, x, y


def data_of(be, x, y):
    return {"input": be.array(x), "target": be.array(y, be.int_dtype)}


def host(be, tree):
    return {k: np.asarray(be.to_numpy(v), dtype=np.float64) for k, v in tree.items()}


# -- per-example gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_per_example_gradients_equal_torch_func_vmap_grad(name, case):
    be, c, p0, x, y = setup(name, case)
    params = {k: be.array(v) for k, v in p0.items()}
    step_before = c.step
    got = per_example_gradients(c, params, data_of(be, x, y), "loss")
    assert c.step == step_before
    tp = {k: torch.tensor(v) for k, v in p0.items()}
    want = torch.func.vmap(torch.func.grad(CASES[case][2]), in_dims=(None, 0, 0))(
        tp, torch.tensor(x), torch.tensor(y))
    assert list(got) == list(c.parameter_shapes)
    for k, g in host(be, got).items():
        assert g.shape == (6, *p0[k].shape)
        np.testing.assert_allclose(g, want[k].numpy(), rtol=0, atol=1e-10, err_msg=k)
    # the rows' mean is the gradient of the batch's mean loss (CrossEntropy's "mean")
    _, full = c.evaluate(params, data_of(be, x, y), output_gradients={"loss": 1.0})
    for k, g in host(be, got).items():
        np.testing.assert_allclose(g.mean(0), host(be, full)[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_unbatched_inputs_are_seen_whole_by_every_example(name):
    model = ml.Model()
    model |= ml.Multiply()(left="input", right="scale", output="scaled")
    model |= ml.Linear(3)(input="scaled", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    be = BACKENDS[name](dtype="float64")
    c = ml.compile(model, be, shapes={"input": [None, 4], "scale": [4]})
    rng = np.random.default_rng(3)
    x, y, scale = rng.standard_normal((5, 4)), rng.integers(0, 3, 5), rng.standard_normal(4)
    p0 = {k: rng.standard_normal(s) for k, s in c.parameter_shapes.items()}
    got = per_example_gradients(c, {k: be.array(v) for k, v in p0.items()},
                                {**data_of(be, x, y), "scale": be.array(scale)}, "loss",
                                unbatched=["scale"])

    def loss(p, xi, yi):
        logits = (xi * torch.tensor(scale)) @ p["linear.weight"].T + p["linear.bias"]
        return F.cross_entropy(logits[None], yi[None])

    want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        {k: torch.tensor(v) for k, v in p0.items()}, torch.tensor(x), torch.tensor(y))
    for k, g in host(be, got).items():
        np.testing.assert_allclose(g, want[k].numpy(), rtol=0, atol=1e-10, err_msg=k)


def test_per_example_gradients_refusals():
    be, c, p0, x, y = setup("numpy")
    params = {k: be.array(v) for k, v in p0.items()}
    with pytest.raises(ShapeError, match=r"'input' \(6, 4\), 'target' \(5,\)"):
        per_example_gradients(c, params, {"input": x, "target": y[:5]}, "loss")
    with pytest.raises(KeyMismatchError, match="'logits2'"):
        per_example_gradients(c, params, data_of(be, x, y), "logits2")
    with pytest.raises(ShapeError, match="scalar"):
        per_example_gradients(c, params, data_of(be, x, y), "logits")
    fixed = ml.compile(mlp_model(), be, shapes={"input": [6, 4]})
    with pytest.raises(ShapeError, match="batch of one"):
        per_example_gradients(fixed, params, data_of(be, x, y), "loss")
    model = ml.Model()
    model |= ml.Linear(3)(input="input")
    model += ml.Dropout(0.5)(output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    dropout = ml.compile(model, be, shapes={"input": [None, 4]})
    with pytest.raises(KeyMismatchError, match=r"unbatched keys \['nope'\]"):
        per_example_gradients(c, params, data_of(be, x, y), "loss", unbatched=["nope"])
    with pytest.raises(ValueError, match="no batched input"):
        per_example_gradients(c, params, data_of(be, x, y), "loss", unbatched=["input", "target"])
    with pytest.raises(TypeError, match="Dropout"):
        per_example_gradients(dropout, dropout.randomize_params(), data_of(be, x, y), "loss")


# -- DP-SGD against optax ----------------------------------------------------------------------
@functools.cache
def optax_dpsgd(lr, clip, momentum, nesterov):
    with warnings.catch_warnings():  # (optax's dpsgd passes its deprecated seed=)
        warnings.simplefilter("ignore", DeprecationWarning)
        return jitted(optax.contrib.dpsgd(lr, clip, 0.0, 0, momentum=momentum,
                                          nesterov=nesterov))


def jitted(tx):
    """``tx`` with its update jitted (eager, optax's step compiles op by op: seconds a step),
    once per test module (the same program for every backend's run)."""
    return optax.GradientTransformation(tx.init, jax.jit(tx.update))


def run_side_by_side(name, ours, tx, steps=20, batch=6):
    """``steps`` updates of ours and of optax's ``tx`` from the same params, each from the
    per-example gradients of our model on a fresh batch; optax's params must stay ours."""
    be, c, p0, _, _ = setup(name, batch=batch)
    rng = np.random.default_rng(1)
    params = {k: be.array(v) for k, v in p0.items()}
    q = {k: jnp.asarray(v) for k, v in p0.items()}
    state, ostate = ours.init(params), tx.init(q)
    clipped = 0
    for t in range(steps):
        x = rng.standard_normal((batch, 4)) * (3.0 if t % 2 else 0.3)
        y = rng.integers(0, 3, batch)
        g = per_example_gradients(c, params, data_of(be, x, y), "loss")
        hg = host(be, g)
        if t == 3:  # an example with a zero gradient (0/0 in optax's multiplier: 1)
            hg = {k: v.copy() for k, v in hg.items()}
            for v in hg.values():
                v[0] = 0
            g = {k: be.array(v) for k, v in hg.items()}
        norms = np.sqrt(sum((v.reshape(batch, -1) ** 2).sum(1) for v in hg.values()))
        clipped += int((norms > ours.l2_norm_clip).sum())
        params, state = ours.update(params, g, state)
        upd, ostate = tx.update({k: jnp.asarray(v) for k, v in hg.items()}, ostate, q)
        q = optax.apply_updates(q, upd)
        ours_h = host(be, params)
        for k, v in ours_h.items():
            np.testing.assert_allclose(v, np.asarray(q[k]), rtol=0, atol=1e-12,
                                       err_msg=f"step {t + 1} {k}")
    assert 0 < clipped < steps * batch  # (the clip bound some examples and not others)
    assert state.values["dp_count"] == steps
    return params, state


@pytest.mark.parametrize("momentum,nesterov", [(None, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_dpsgd_equals_optax_without_noise(name, momentum, nesterov):
    run_side_by_side(name, DPSGD(0.1, l2_norm_clip=0.5, noise_multiplier=0.0, seed=3,
                                 momentum=momentum, nesterov=nesterov),
                     optax_dpsgd(0.1, 0.5, momentum, nesterov))


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_differentially_private_adam_equals_optax_chain(name):
    run_side_by_side(name, DifferentiallyPrivate(Adam(1e-2, convention="optax"), 0.5, 0.0),
                     optax_dp_adam())


@functools.cache
def optax_dp_adam():
    return jitted(optax.chain(optax.contrib.differentially_private_aggregate(0.5, 0.0, key=0),
                              optax.adam(1e-2)))


# -- the noise -----------------------------------------------------------------------------
def zero_rows(be, batch, shapes):
    return {k: be.array(np.zeros((batch, *s))) for k, s in shapes.items()}


def test_noise_equal_across_backends_and_of_the_right_law():
    shapes = {"w": (100, 50), "b": (50,)}
    clip, sigma, batch = 0.7, 1.3, 4
    draws = {}
    for name, cls in BACKENDS.items():
        be = cls(dtype="float64")
        opt = DifferentiallyPrivate(SGD(1.0), clip, sigma, seed=11)
        params = {k: be.array(np.zeros(s)) for k, s in shapes.items()}
        state = opt.init(params)
        steps = []
        for _ in range(3):  # p ← p − ḡ: the new params are minus the aggregate
            new, state = opt.update(params, zero_rows(be, batch, shapes), state)
            steps.append({k: -v for k, v in host(be, new).items()})
            params = {k: be.array(np.zeros(s)) for k, s in shapes.items()}
        draws[name] = steps
    for name in ("torch", "jax"):
        for a, b in zip(draws["numpy"], draws[name], strict=True):
            for k in a:
                np.testing.assert_allclose(b[k], a[k], rtol=1e-13, atol=0, err_msg=name)
    z = np.concatenate([v.ravel() for s in draws["numpy"] for v in s.values()])
    z = z / (clip * sigma / batch)  # standard normal if the law is right
    n = z.size  # 15150 draws: the mean's sd is 1/√n, the variance's √(2/n)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert not np.allclose(draws["numpy"][0]["w"], draws["numpy"][1]["w"])  # fresh per step


@pytest.mark.slow  # (optax's jax.random draws compile for ~10 s on 2 busy cores)
def test_optax_noise_has_the_same_law():
    """optax's draws (jax.random) differ from ours, their scale C·σ/B does not."""
    shapes, clip, sigma, batch = {"w": (100, 50), "b": (50,)}, 0.7, 1.3, 4
    tx = optax.contrib.differentially_private_aggregate(clip, sigma, key=11)
    zeros = {k: jnp.zeros((batch, *s)) for k, s in shapes.items()}
    u, _ = tx.update(zeros, tx.init(zeros))
    zo = np.concatenate([np.asarray(v).ravel() for v in u.values()]) / (clip * sigma / batch)
    assert abs(zo.mean()) < 5 / math.sqrt(zo.size)
    assert abs(zo.var() - 1) < 5 * math.sqrt(2 / zo.size)


def test_noise_on_clipped_gradients_is_the_sum_plus_noise_over_batch():
    be = NumpyBackend(dtype="float64")
    rng = np.random.default_rng(5)
    rows = {"w": rng.standard_normal((3, 4, 2))}
    with_noise = DifferentiallyPrivate(SGD(1.0), 0.8, 2.0, seed=4)
    without = DifferentiallyPrivate(SGD(1.0), 0.8, 0.0)
    p = {"w": np.zeros((4, 2))}
    a, _ = with_noise.update(p, rows, with_noise.init(p))
    b, _ = without.update(p, rows, without.init(p))
    from mithril.utils.optimizers.noisy_sgd import gaussian_noise
    from mithril.utils.optimizers.tensorwise import ops_for

    xi = gaussian_noise(ops_for(be), (4, 2), 4, "dp/w", 1, np.float64)
    np.testing.assert_allclose(a["w"] - b["w"], -(0.8 * 2.0) * xi / 3, rtol=0, atol=1e-15)


# -- state, checks -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_state_dict_round_trip_resumes_the_noise(name):
    be, c, p0, _, _ = setup(name)
    rng = np.random.default_rng(2)
    batches = [data_of(be, rng.standard_normal((6, 4)), rng.integers(0, 3, 6)) for _ in range(6)]

    def fresh():
        return DPSGD(0.1, 0.5, 1.1, seed=7, momentum=0.9)

    opt = fresh()
    params = {k: be.array(v) for k, v in p0.items()}
    state = opt.init(params)
    for i, d in enumerate(batches):
        if i == 3:  # save, then resume into a new optimizer
            saved = copy.deepcopy(opt.state_dict(state))
            opt = fresh()
            state = opt.load_state_dict(saved, params)
            assert state.values["dp_count"] == 3
        params, state = opt.update(params, per_example_gradients(c, params, d, "loss"), state)
    ref = fresh()
    rp = {k: be.array(v) for k, v in p0.items()}
    rs = ref.init(rp)
    for d in batches:
        rp, rs = ref.update(rp, per_example_gradients(c, rp, d, "loss"), rs)
    for k, v in host(be, params).items():
        np.testing.assert_array_equal(v, host(be, rp)[k])
    assert opt.hyperparameters()["base_optimizer"]["optimizer"] == "SGD"
    with pytest.raises(ValueError, match="dp_count"):
        opt.load_state_dict({**saved, "values": {**saved["values"], "dp_count": 1.5}}, params)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_refused_updates_change_nothing(name):
    be, c, p0, x, y = setup(name)
    opt = DPSGD(0.1, 0.5, 1.0, momentum=0.9)
    params = {k: be.array(v) for k, v in p0.items()}
    rows = per_example_gradients(c, params, data_of(be, x, y), "loss")
    params, state = opt.update(params, rows, opt.init(params))
    before = (copy.deepcopy(opt.state_dict(state)), host(be, params))
    _, full = c.evaluate(params, data_of(be, x, y), output_gradients={"loss": 1.0})
    w = "mlp.linear_0.weight"
    bad = [
        (full, ShapeError, r"gradients\['mlp.linear_0.weight'\] has the parameter's own "
                           r"shape \(5, 4\) \(a batch's gradient\?\).*\(batch, 5, 4\).*"
                           r"per_example_gradients"),
        ({**rows, w: rows[w][:, :2]}, ShapeError, r"shape \(6, 2, 4\), the parameter \(5, 4\)"),
        ({**rows, w: rows[w][:5]}, ShapeError, r"batch size.*'mlp.linear_0.weight' \(5, 5, 4\)"),
        ({**rows, "nope": rows[w]}, KeyMismatchError, "nope"),
        ({}, TypeError, "non-empty"),
        ({**rows, w: np.asarray(be.to_numpy(rows[w])).astype(np.float32)}
         if name != "numpy" else {**rows, w: rows[w].astype(np.float32)}, TypeError, w),
    ]
    for grads, err, match in bad:
        with pytest.raises(err, match=match):
            opt.update(params, grads, state)
        assert opt.state_dict(state)["values"] == before[0]["values"]
        for slot, arrays in opt.state_dict(state)["slots"].items():
            for k, v in arrays.items():
                np.testing.assert_array_equal(v, before[0]["slots"][slot][k])
        for k, v in host(be, params).items():
            np.testing.assert_array_equal(v, before[1][k])
    opt.l2_norm_clip = -1.0  # (a float attribute is checked when the step reads it)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        opt.update(params, rows, state)
    assert opt.state_dict(state)["values"] == before[0]["values"]
    with pytest.raises(ValueError, match="l2_norm_clip"):
        DPSGD(0.1, l2_norm_clip=-1.0)
    scalar = DPSGD(0.1)  # (a 0-d parameter: rows of shape (batch,))
    p = {"s": be.array(np.zeros(()))}
    s = scalar.init(p)
    with pytest.raises(ShapeError, match=r"own shape \(\).*shape \(batch\)"):
        scalar.update(p, {"s": be.array(np.ones(()))}, s)
    p, s = scalar.update(p, {"s": be.array(np.ones(4))}, s)
    assert tuple(p["s"].shape) == () and s.values["dp_count"] == 1
    with pytest.raises(TypeError, match="seed"):
        DPSGD(0.1, seed=1.5)


# -- in a JAX program: optax_aggregate ---------------------------------------------------------
def test_optax_aggregate_in_a_jitted_chain_steps_as_update():
    from mithril.interop import optax_transformation

    be, c, p0, _, _ = setup("jax")
    dp = DPSGD(0.1, 0.5, 1.1, seed=9, momentum=0.9, nesterov=True)
    tx = optax.chain(dp.optax_aggregate(), optax_transformation(dp.base_optimizer))
    rng = np.random.default_rng(4)
    params = {k: be.array(v) for k, v in p0.items()}
    q = {k: jnp.asarray(v) for k, v in p0.items()}
    state, ostate = dp.init(params), tx.init(q)

    @jax.jit
    def step(q, ostate, g):
        u, ostate = tx.update(g, ostate, q)
        return optax.apply_updates(q, u), ostate

    for t in range(5):
        d = data_of(be, rng.standard_normal((6, 4)), rng.integers(0, 3, 6))
        g = per_example_gradients(c, params, d, "loss")
        params, state = dp.update(params, g, state)
        q, ostate = step(q, ostate, g)
        for k, v in host(be, params).items():
            np.testing.assert_allclose(np.asarray(q[k]), v, rtol=0, atol=1e-12,
                                       err_msg=f"step {t + 1} {k}")
        q = {k: jnp.asarray(v) for k, v in host(be, params).items()}  # (the same next rows)
    assert int(ostate[0].count) == 5
    with pytest.raises(ValueError, match=r"batch axis first.*'b'\] \(3,\), \['w'\] \(4, 2\)"):
        dp.optax_aggregate().update({"w": jnp.ones((4, 2)), "b": jnp.ones(3)},
                                    DPSGD().optax_aggregate().init(None))
