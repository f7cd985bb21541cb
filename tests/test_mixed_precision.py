"""MixedPrecisionTrainer: the guide's listing, accuracy on real data, loss-scale dynamics
(checked against torch.amp.GradScaler), skipped steps, bfloat16 / float16 on every backend."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.mixed_precision import LossScaler, MixedPrecisionTrainer
from mithril.utils.optimizers import SGD, Adam, OptimizerState

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits (ships with the package), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:1347], perm[1347:]
    return x[tr], y[tr], x[te], y[te]


def classifier(hidden: int = 64, act: str = "tanh", reduction: str = "mean") -> ml.Model:
    """64 -> hidden -> 10 MLP with a softmax cross-entropy on integer labels."""
    m = ml.Model()
    m += ml.MLP([act, None], [hidden, 10])(input="input", output="logits")
    m |= ml.CrossEntropy(reduction)(input="logits", target="labels", output="loss")
    m.set_shapes(input=[None, 64])
    return m


def regressor() -> ml.Model:
    m = ml.Model()
    m += ml.MLP(["tanh", None], [16, 4])
    m.set_shapes(input=[None, 8])
    return m


def batch(backend, x, y):
    return {"input": backend.array(x), "labels": backend.array(y.astype(backend.int_dtype))}


def as_np(backend, tree):
    return {k: backend.to_numpy(v).astype(np.float64) for k, v in tree.items()}


def accuracy(compiled, params, x, y):
    b = compiled.backend
    out = compiled.evaluate(params, batch(b, x, y))
    return float((b.to_numpy(out["logits"]).argmax(1) == y).mean())


# -- the guide's listing -------------------------------------------------------------------------
def test_guide_mixed_precision_listing_as_written():
    # Create a backend with mixed precision support
    backend = TorchBackend(dtype="float16")

    # Create a model
    model = ml.Model()
    model += ml.MLP(["tanh", None], [16, 4])
    model.set_shapes(input=[None, 8])
    compiled_model = ml.compile(model, backend)

    # Initialize parameters
    params = compiled_model.get_parameters()
    given = {k: v.clone() for k, v in params.items()}

    # Create an optimizer
    optimizer = Adam(learning_rate=0.001)
    optimizer_state = optimizer.init(params)

    # Create mixed precision trainer
    mp_trainer = MixedPrecisionTrainer(
        model=compiled_model,
        optimizer=optimizer,
        params=params,
        optimizer_state=optimizer_state,
        loss_scale=128.0,            # Initial loss scale
        dynamic_loss_scaling=True    # Automatically adjust loss scale
    )
    inputs = {"input": backend.randn(32, 8)}
    targets = backend.randn(32, 4) * 0.5
    num_epochs = 40
    losses, skipped = [], 0

    # Training loop with mixed precision
    for _epoch in range(num_epochs):
        # Forward pass in mixed precision
        outputs = mp_trainer.forward(inputs)
        losses.append(float(((outputs["output"].float() - targets.float()) ** 2).mean()))

        # Compute loss gradients
        loss_gradients = {"output": 2 * (outputs["output"] - targets)}

        # Backward pass and parameter update
        params, optimizer_state, success = mp_trainer.backward_and_update(
            loss_gradients
        )

        if not success:
            skipped += 1

    assert outputs["output"].dtype == torch.float16
    assert skipped == 0 and mp_trainer.num_skipped_steps == 0
    assert losses[-1] < 0.8 * losses[0]
    # the returned params are the float32 masters; the model runs on float16 copies
    assert all(p.dtype == torch.float32 for p in params.values())
    assert params.keys() == mp_trainer.master_params.keys()
    assert all(params[k] is v for k, v in mp_trainer.master_params.items())
    assert all(p.dtype == torch.float16 for p in mp_trainer.compute_params().values())
    for k, p in mp_trainer.compute_params().items():
        assert torch.equal(p, params[k].half())
    # the state initialised on the float16 params was re-initialised on the masters
    assert optimizer_state is mp_trainer.optimizer_state
    assert optimizer_state.layout.dtype == "float32" and optimizer_state.step == num_epochs
    # the params handed to the trainer were copied, never modified
    assert all(torch.equal(given[k], v) for k, v in compiled_model.get_parameters().items())
    assert mp_trainer.loss_scale == 128.0


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_one_step_is_scaled_half_vjp_unscaled_in_float32(kind):
    """masters ← masters − lr · float32(VJP_fp16(scale · dL/dy)) / scale, exactly."""
    backend = BACKENDS[kind](dtype="float16", seed=3)
    compiled = ml.compile(regressor(), backend)
    params = compiled.get_parameters()
    lr, scale = 0.05, 1024.0
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=lr), params, None, loss_scale=scale)
    x, t = backend.randn(16, 8), backend.randn(16, 4)
    half = trainer.compute_params()
    before = as_np(backend, trainer.master_params)
    out = trainer.forward({"input": x})
    cot = 2 * (out["output"] - t)
    _, ok_grads = compiled.evaluate(half, {"input": x}, output_gradients={
        "output": backend.array(backend.to_numpy(cot).astype(np.float32) * np.float32(scale))})
    params, _, success = trainer.backward_and_update({"output": cot})
    assert success
    for k, g in ok_grads.items():
        g32 = backend.to_numpy(g).astype(np.float32) / np.float32(scale)
        np.testing.assert_allclose(backend.to_numpy(trainer.last_gradients[k]), g32, rtol=0, atol=0)
        np.testing.assert_allclose(backend.to_numpy(params[k]), (before[k] - lr * g32),
                                   rtol=1e-6, atol=1e-7)


# -- real data: float16 reaches the float32 accuracy ------------------------------------------------
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_float16_training_on_digits_matches_float32_accuracy(kind, digits):
    xtr, ytr, xte, yte = digits
    epochs, bs, lr = 6, 32, 5e-3
    b32 = BACKENDS[kind](dtype="float32", seed=0)
    b16 = BACKENDS[kind](dtype="float16", seed=0)
    m32, m16 = ml.compile(classifier(), b32), ml.compile(classifier(), b16)
    p32 = m32.get_parameters()
    opt32 = Adam(learning_rate=lr)
    s32 = opt32.init(p32)
    # same initial weights for both runs (the float32 ones become the masters)
    trainer = MixedPrecisionTrainer(m16, Adam(learning_rate=lr), p32, None)
    order = np.random.default_rng(1)
    for _ in range(epochs):
        perm = order.permutation(len(xtr))
        for i in range(0, len(perm), bs):
            idx = perm[i:i + bs]
            _, g = m32.evaluate(p32, batch(b32, xtr[idx], ytr[idx]), output_gradients={"loss": 1.0})
            p32, s32 = opt32.update(p32, g, s32)
            trainer.forward(batch(b16, xtr[idx], ytr[idx]))
            trainer.backward_and_update({"loss": 1.0})
    acc32 = accuracy(m32, p32, xte, yte)
    acc16 = accuracy(m16, trainer.compute_params(), xte, yte)
    assert acc32 >= 0.95 and acc16 >= 0.95
    assert abs(acc16 - acc32) <= 0.01
    # the default scale 2**16 overflows float16 (max 65504) for a loss gradient of 1.0:
    # exactly one skip, then 2**15 works
    assert trainer.num_skipped_steps == 1 and trainer.loss_scale == 2.0**15


# -- loss-scale dynamics -----------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_huge_initial_scale_backs_off_and_skips_exactly_the_overflowing_steps(kind, reduction,
                                                                              digits):
    """With the mean loss only the scaled dL/dloss itself overflows (scale >= 2**16); with the
    sum over 128 samples the parameter gradients overflow at much smaller scales."""
    xtr, ytr, _, _ = digits
    backend = BACKENDS[kind](dtype="float16", seed=0)
    compiled = ml.compile(classifier(hidden=32, reduction=reduction), backend)
    trainer = MixedPrecisionTrainer(compiled, Adam(learning_rate=1e-2), compiled.get_parameters(),
                                    None, loss_scale=2.0**40, growth_interval=4)

    data = batch(backend, xtr[:128], ytr[:128])

    def overflows(scale):
        """Oracle: the half-precision VJP through the ordinary evaluate() path."""
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            _, g = compiled.evaluate(trainer.compute_params(), data,
                                     output_gradients={"loss": backend.array(np.float32(scale))})
        return not all(np.isfinite(backend.to_numpy(v)).all() for v in g.values())

    expected, skipped, scales, losses = [], [], [], []
    for step in range(40):
        scale = trainer.loss_scale
        scales.append(scale)
        expected.append(overflows(scale))
        masters = as_np(backend, trainer.master_params)
        opt_step = trainer.optimizer_state.step
        out = trainer.forward(data)
        losses.append(float(backend.to_numpy(out["loss"])))
        _, state, success = trainer.backward_and_update({"loss": 1.0})
        if not success:
            skipped.append(step)
            # a skipped step leaves masters and optimizer state untouched
            for k, v in as_np(backend, trainer.master_params).items():
                np.testing.assert_array_equal(v, masters[k])
            assert state.step == opt_step and state.last_step_skipped
    assert skipped == [i for i, e in enumerate(expected) if e]
    assert trainer.num_skipped_steps == len(skipped) == trainer.optimizer_state.num_skipped
    assert trainer.optimizer_state.step == 40 - len(skipped)
    # every scale >= 2**16 overflows float16 for dL/dloss = 1: the first 25+ steps are skipped
    # while the scale halves from 2**40; it then stays finite (growing and re-backing off)
    n0 = next(i for i, s in enumerate(scales) if not expected[i])
    assert n0 >= 25 and scales[:n0 + 1] == [2.0 ** (40 - i) for i in range(n0 + 1)]
    assert scales[n0] <= (2.0**15 if reduction == "mean" else 2.0**12)
    assert np.isfinite(trainer.loss_scale)
    assert max(scales[n0:]) <= 2.0**16 and min(scales[n0:]) >= 1.0
    assert losses[-1] < losses[n0] * 0.8


def gradscaler_scales(pattern, init, interval, growth=2.0, backoff=0.5):
    """Drive torch.amp.GradScaler with a dummy optimizer; ``pattern[i]`` True puts an inf/NaN
    into the gradient of step i. Returns the scale after each update."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_factor=growth,
                                  backoff_factor=backoff, growth_interval=interval)
    out = []
    for i, bad in enumerate(pattern):
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        if bad:
            p.grad[i % 3] = float("inf") if i % 2 else float("nan")
        scaler.step(opt)
        scaler.update()
        out.append(scaler.get_scale())
    return out


def test_loss_scaler_matches_gradscaler_documented_sequence():
    pattern = [False, False, False, False, True, False, False, False]
    want = [8, 8, 16, 16, 8, 8, 8, 16]
    assert gradscaler_scales(pattern, 8.0, 3) == want
    s = LossScaler(8.0, growth_interval=3)
    got = []
    for bad in pattern:
        s.update(found_inf=bad)
        got.append(s.scale)
    assert got == want


@pytest.mark.parametrize("growth,backoff,interval", [(2.0, 0.5, 2), (3.0, 0.3, 3), (1.7, 0.9, 1)])
def test_loss_scaler_matches_gradscaler_on_random_patterns(growth, backoff, interval):
    rng = np.random.default_rng(int(growth * 10 + interval))
    pattern = list(rng.random(80) < 0.3)
    want = gradscaler_scales(pattern, 1000.0, interval, growth, backoff)
    s = LossScaler(1000.0, growth, backoff, interval)
    got = []
    for bad in pattern:
        s.update(bool(bad))
        got.append(s.scale)
    assert got == want  # bit-identical: float32 scale, float64 products, as torch


@pytest.mark.parametrize("kind,dtype", [("torch", "float16"), ("numpy", "float16"),
                                        ("jax", "bfloat16")])
def test_trainer_scale_sequence_matches_gradscaler(kind, dtype):
    """The trainer itself, with inf in the loss gradient on the non-finite steps."""
    pattern = [False, False, False, False, True, False, False, False]
    backend = BACKENDS[kind](dtype=dtype)
    compiled = ml.compile(regressor(), backend)
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.01), compiled.get_parameters(),
                                    None, loss_scale=8.0, growth_interval=3)
    x, t = backend.randn(8, 8), backend.randn(8, 4)
    got, ok = [], []
    for bad in pattern:
        out = trainer.forward({"input": x})
        cot = 2 * (backend.to_numpy(out["output"]).astype(np.float32) - backend.to_numpy(t))
        if bad:
            cot[0, 0] = np.inf
        before = as_np(backend, trainer.master_params)
        ok.append(trainer.backward_and_update({"output": backend.array(cot)})[2])
        got.append(trainer.loss_scale)
        after = as_np(backend, trainer.master_params)
        assert all(np.array_equal(after[k], before[k]) is bad for k in before)
    assert got == [8, 8, 16, 16, 8, 8, 8, 16] == gradscaler_scales(pattern, 8.0, 3)
    assert ok == [not b for b in pattern] and trainer.num_skipped_steps == 1


def test_static_scale_still_skips_non_finite_steps():
    backend = NumpyBackend(dtype="float16")
    compiled = ml.compile(regressor(), backend)
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.01), compiled.get_parameters(),
                                    None, loss_scale=64.0, dynamic_loss_scaling=False,
                                    growth_interval=1)
    x, t = backend.randn(8, 8), backend.randn(8, 4)
    for bad in [False, True, False, False]:
        out = trainer.forward({"input": x})
        cot = 2 * (out["output"] - t)
        if bad:
            cot[0, 0] = np.nan
        assert trainer.backward_and_update({"output": cot})[2] is (not bad)
        assert trainer.loss_scale == 64.0
    assert trainer.num_skipped_steps == 1


def test_skipped_steps_do_not_advance_the_lr_schedule():
    backend = TorchBackend(dtype="float16")
    compiled = ml.compile(regressor(), backend)
    opt = SGD(learning_rate=0.1)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    trainer = MixedPrecisionTrainer(compiled, opt, compiled.get_parameters(), None, loss_scale=4.0)
    x, t = backend.randn(8, 8), backend.randn(8, 4)
    assert not trainer.step_scheduler(sched)  # nothing happened yet
    stepped = []
    for bad in [False, True, True, False]:
        out = trainer.forward({"input": x})
        cot = 2 * (out["output"] - t)
        if bad:
            cot[1, 1] = float("inf")
        _, state, success = trainer.backward_and_update({"output": cot})
        assert trainer.last_step_skipped is bad is state.last_step_skipped
        stepped.append(trainer.step_scheduler(sched))
    assert stepped == [True, False, False, True]
    assert sched.last_step == 2 and opt.get_learning_rate() == pytest.approx(0.025)


# -- bfloat16 / float16 on every backend ------------------------------------------------------------
@pytest.mark.parametrize("kind,dtype", [("torch", "bfloat16"), ("jax", "bfloat16"),
                                        ("numpy", "float16"), ("torch", "float16")])
def test_half_precision_backends_train(kind, dtype, digits):
    xtr, ytr, _, _ = digits
    backend = BACKENDS[kind](dtype=dtype, seed=0)
    compiled = ml.compile(classifier(hidden=32), backend)
    params = compiled.get_parameters()
    opt = Adam(learning_rate=1e-2)
    trainer = MixedPrecisionTrainer(compiled, opt, params, opt.init(params), loss_scale=1024.0)
    data = batch(backend, xtr[:256], ytr[:256])
    losses = []
    for _ in range(12):
        out = trainer.forward(data)
        losses.append(float(np.asarray(backend.to_numpy(out["loss"]), dtype=np.float64)))
        _, state, ok = trainer.backward_and_update({"loss": 1.0})
        assert ok
    assert losses[-1] < 0.6 * losses[0]
    assert backend.dtype_name(out["logits"]) == dtype
    assert {backend.dtype_name(p) for p in trainer.master_params.values()} == {"float32"}
    assert {backend.dtype_name(p) for p in trainer.compute_params().values()} == {dtype}
    assert state.layout.dtype == "float32" and state.step == 12


def test_torch_steps_stay_on_device_without_numpy_round_trips(monkeypatch, digits):
    xtr, ytr, _, _ = digits
    backend = TorchBackend(dtype="float16")
    compiled = ml.compile(classifier(hidden=16), backend)
    trainer = MixedPrecisionTrainer(compiled, Adam(learning_rate=1e-3), compiled.get_parameters(),
                                    None, loss_scale=256.0)
    data = batch(backend, xtr[:64], ytr[:64])

    def forbidden(*a, **k):
        raise AssertionError("numpy round trip")

    for b in (backend, trainer.master_backend):
        monkeypatch.setattr(b, "to_numpy", forbidden)
        monkeypatch.setattr(b, "array", forbidden)
    # float32 inputs are cast to float16 by the trainer
    data["input"] = data["input"].float()
    for _ in range(3):
        trainer.forward(data)
        assert trainer.backward_and_update({"loss": torch.tensor(1.0)})[2]


# -- optimizer state and argument handling -------------------------------------------------------
def test_optimizer_state_is_carried_to_float32_masters():
    backend = TorchBackend(dtype="float16", seed=1)
    compiled = ml.compile(regressor(), backend)
    params = compiled.get_parameters()
    opt = Adam(learning_rate=1e-3, epsilon=1e-4)  # 1e-8 is 0 in float16 (refused)
    half_state = opt.init(params)
    x, t = backend.randn(8, 8), backend.randn(8, 4)
    for _ in range(2):  # two steps directly on float16 params
        out, g = compiled.evaluate(params, {"input": x}, output_gradients={"output": t})
        params, half_state = opt.update(params, g, half_state)
    m_half = {k: v.clone() for k, v in half_state.slot("m").items()}
    trainer = MixedPrecisionTrainer(compiled, opt, params, half_state)
    st = trainer.optimizer_state
    assert isinstance(st, OptimizerState) and st.layout.dtype == "float32" and st.step == 2
    for k, v in st.slot("m").items():
        assert v.dtype == torch.float32 and torch.equal(v, m_half[k].float())
    # a float32 state for the masters is used as given
    st32 = opt.init(trainer.master_params)
    t2 = MixedPrecisionTrainer(compiled, opt, trainer.master_params, st32)
    assert t2.optimizer_state is st32


def test_argument_errors():
    backend = NumpyBackend(dtype="float16")
    compiled = ml.compile(regressor(), backend)
    params = compiled.get_parameters()
    trainer = MixedPrecisionTrainer(compiled, SGD(), params)
    with pytest.raises(RuntimeError, match="forward"):
        trainer.backward_and_update({"output": np.zeros((4, 4))})
    trainer.forward({"input": np.ones((4, 8), dtype=np.float32)})
    with pytest.raises(KeyMismatchError):
        trainer.backward_and_update({"nope": np.zeros((4, 4))})
    with pytest.raises(ShapeError):
        trainer.backward_and_update({"output": np.zeros((3, 4))})
    for bad in [dict(loss_scale=0.0), dict(growth_factor=1.0), dict(backoff_factor=1.0),
                dict(growth_interval=0)]:
        with pytest.raises(ValueError):
            MixedPrecisionTrainer(compiled, SGD(), params, **bad)
    with pytest.raises(TypeError):
        MixedPrecisionTrainer(object(), SGD(), params)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_forward_refuses_out_of_range_labels_naming_the_key(kind):
    """Class indices past the classes: the float16 forward raises the error naming the data
    key (on NumPy found by the loss's own pass), and the masters do not move."""
    backend = BACKENDS[kind](dtype="float16", seed=0)
    compiled = ml.compile(classifier(hidden=8), backend)
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.1), compiled.get_parameters(),
                                    None)
    before = as_np(backend, trainer.master_params)
    x = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=r"input 'labels': 1 of 4 class indices out of range"):
        trainer.forward(batch(backend, x, np.array([0, 3, 10, 1])))
    for k, v in as_np(backend, trainer.master_params).items():
        np.testing.assert_array_equal(v, before[k])
    trainer.forward(batch(backend, x, np.array([0, 3, 9, 1])))  # good labels still run
