"""MixedPrecisionTrainer against torch's AMP recipe (``torch.autocast`` on CPU + ``GradScaler``)
where an engineer switching from torch.amp would look: a small MLP trained 50 Adam steps in
float16 and in bfloat16 from the same float32 weights, parameter groups with gradient clipping
after unscaling (torch's ``unscale_`` then ``clip_grad_norm_``) and an overflow in only one
parameter, and the errors that name the constructor's arguments.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils.mixed_precision import LossScaler, MixedPrecisionTrainer
from mithril.utils.optimizers import Adam

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


def host(backend, tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(backend.to_numpy(v), dtype=np.float32) for k, v in tree.items()}


# -- a small MLP, 50 steps, against torch.autocast ----------------------------------------------
def mlp_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = rng.standard_normal((16, 2)).astype(np.float32)
    w0 = (rng.standard_normal((8, 4)) * 0.5).astype(np.float32)
    w1 = (rng.standard_normal((2, 8)) * 0.5).astype(np.float32)
    params = {"linear_0.weight": w0, "linear_0.bias": np.full(8, 0.1, np.float32),
              "linear_1.weight": w1, "linear_1.bias": np.zeros(2, np.float32)}
    return x, y, params


def torch_autocast_mlp(dtype: str, steps: int):
    """torch's recipe: float32 ``Linear -> ReLU -> Linear`` under ``autocast(dtype)``, the
    MSE in float32, ``GradScaler`` (2**10, growth every 10 steps), Adam(lr 1e-2).
    Returns the scales after each step and the parameters."""
    x, y, p = mlp_data()
    l0, l1 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    with torch.no_grad():
        for name, lin in (("linear_0", l0), ("linear_1", l1)):
            lin.weight.copy_(torch.from_numpy(p[f"{name}.weight"]))
            lin.bias.copy_(torch.from_numpy(p[f"{name}.bias"]))
    opt = torch.optim.Adam([*l0.parameters(), *l1.parameters()], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10)
    scales = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            out = l1(torch.relu(l0(torch.from_numpy(x))))
        loss = ((out.float() - torch.from_numpy(y)) ** 2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    got = {f"{n}.{k}": v.detach().numpy().copy() for n, lin in (("linear_0", l0),
                                                                ("linear_1", l1))
           for k, v in (("weight", lin.weight), ("bias", lin.bias))}
    return scales, got


@pytest.mark.parametrize("kind", ["torch", "numpy", "jax"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mlp_50_adam_steps_match_torch_autocast(dtype, kind):
    """The same MLP, weights and data; the trainer computes the whole model in ``dtype``
    (autocast computes the Linears in it, the loss in float32: dL/dout is passed in float32).
    The scale sequence (1024 → 32768 by the 50th step) is torch's exactly. The float32
    masters after 50 steps: on the torch backend (torch's own half kernels) within 2e-7 of
    autocast's; on NumPy and JAX, whose half kernels round in other places (a bias add
    rounded apart from the matmul), within 1e-3 (float16) / 1e-2 (bfloat16), against steps
    of ~0.5 in total."""
    steps = 50
    want_scales, want = torch_autocast_mlp(dtype, steps)
    x, y, p0 = mlp_data()
    m = ml.Model()
    m |= ml.Linear(8)(input="input", output="h")
    m |= ml.Relu()(input="h", output="r")
    m |= ml.Linear(2)(input="r", output=ml.IOKey("out"))
    backend = BACKENDS[kind](dtype=dtype)
    compiled = ml.compile(m, backend, shapes={"input": [16, 4]})
    assert sorted(compiled.get_parameters()) == sorted(p0)
    trainer = MixedPrecisionTrainer(compiled, Adam(learning_rate=1e-2),
                                    {k: backend.array(v, "float32") for k, v in p0.items()},
                                    loss_scale=2.0**10, growth_interval=10)
    scales = []
    for _ in range(steps):
        out = host(backend, trainer.forward({"input": backend.array(x)}))["out"]
        dout = 2 * (out - y) / out.size  # (the float32 MSE's gradient, as autocast's loss)
        assert trainer.backward_and_update({"out": backend.array(dout, "float32")})[2]
        scales.append(trainer.loss_scale)
    assert scales == want_scales and scales[-1] == 2.0**15
    got = host(backend, trainer.master_params)
    tol = 2e-7 if kind == "torch" else {"float16": 1e-3, "bfloat16": 1e-2}[dtype]
    moved = max(np.abs(want[k] - p0[k]).max() for k in p0)
    assert moved > 0.2
    for k in p0:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=tol, err_msg=k)


# -- parameter groups, clipping after unscaling, an overflow in one parameter only ------------
W, B = "linear.weight", "linear.bias"


def group_batches():
    """30 dyadic batches; at step 6 an input of 60000 makes the weight's float16 gradient
    overflow while the bias's (the sum of dL/dout) stays finite."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(30):
        x = rng.integers(-2, 3, (2, 3)).astype(np.float32) / 2
        c = rng.integers(-4, 5, (2, 2)).astype(np.float32) / 4 * 2.0 ** rng.integers(-3, 3)
        if i == 6:
            x[1, 1] = 60000.0
        out.append((x, c))
    return out


def torch_groups_run(batches, clip: float | None):
    """torch: Adam with a bias group of its own (lr 0.05, weight_decay 0.1), autocast
    float16, ``GradScaler(2**12, growth_interval=4)``, ``unscale_`` then
    ``clip_grad_norm_`` (torch's recipe). Per step: scale used, scale after, skipped, params."""
    ps = {W: torch.nn.Parameter(torch.full((2, 3), 0.5)), B: torch.nn.Parameter(torch.zeros(2))}
    opt = torch.optim.Adam([{"params": [ps[W]]},
                            {"params": [ps[B]], "lr": 0.05, "weight_decay": 0.1}], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=4)
    rows = []
    for x, c in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.functional.linear(torch.from_numpy(x), ps[W], ps[B])
        scaler.scale((out.float() * torch.from_numpy(c)).sum()).backward()
        scaler.unscale_(opt)
        finite_bias = bool(torch.isfinite(ps[B].grad).all())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)
        used = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        rows.append((used, scaler.get_scale(), scaler.get_scale() < used, finite_bias,
                     {n: p.detach().numpy().copy() for n, p in ps.items()}))
    return rows


@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip0.5"])
@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_groups_and_clipping_with_an_overflow_in_one_parameter_match_gradscaler(kind, clip):
    """``Adam(param_groups=[bias: lr 0.05, weight_decay 0.1], clip_norm=clip)`` through the
    trainer against torch's groups + ``unscale_`` + ``clip_grad_norm_``: the scale before and
    after every step, which steps are skipped (step 6, where only the weight's gradient is
    inf, skips the whole step in both, the bias too) and the masters after every step
    (within 3e-8)."""
    batches = group_batches()
    ref = torch_groups_run(batches, clip)
    backend = BACKENDS[kind](dtype="float16")
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    compiled = ml.compile(m, backend, shapes={"input": [2, 3]})
    opt = Adam(learning_rate=0.01, **({} if clip is None else {"clip_norm": clip}),
               param_groups=[{"params": [B], "learning_rate": 0.05, "weight_decay": 0.1}])
    trainer = MixedPrecisionTrainer(
        compiled, opt, {W: backend.array(np.full((2, 3), 0.5, np.float32), "float32"),
                        B: backend.array(np.zeros(2, np.float32), "float32")},
        loss_scale=2.0**12, growth_interval=4)
    for i, ((x, c), (used, after, skipped, finite_bias, want)) in enumerate(
            zip(batches, ref, strict=True)):
        assert trainer.loss_scale == used, i
        trainer.forward({"input": backend.array(x)})
        ok = trainer.backward_and_update({"out": backend.array(c)})[2]
        assert (trainer.loss_scale, not ok) == (after, skipped), i
        if i == 6:
            assert skipped and finite_bias  # (only the weight overflowed)
            g = host(backend, trainer.last_gradients)
            assert np.isfinite(g[B]).all() and not np.isfinite(g[W]).all()
        got = host(backend, trainer.master_params)
        for n in (W, B):
            np.testing.assert_allclose(got[n], want[n], rtol=0, atol=3e-8, err_msg=f"{n} {i}")
    assert trainer.num_skipped_steps == sum(r[2] for r in ref) >= 2


# -- errors name the argument given ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, err, name", [
    ({"init_scale": -1.0}, ValueError, "init_scale"),
    ({"init_scale": 0.0}, ValueError, "init_scale"),
    ({"init_scale": "2"}, TypeError, "init_scale"),
    ({"dynamic": "yes"}, TypeError, "dynamic"),
    ({"growth_factor": 1.0}, ValueError, "growth_factor"),
    ({"backoff_factor": 1.0}, ValueError, "backoff_factor"),
    ({"growth_interval": 0}, ValueError, "growth_interval"),
])
def test_loss_scaler_constructor_errors_name_its_own_arguments(kwargs, err, name):
    """Bug: ``LossScaler(init_scale=-1.0)`` said 'loss_scale must be positive ...' and
    ``LossScaler(dynamic='yes')`` 'dynamic_loss_scaling must be True or False' - the
    trainer's argument names, not the ones given. Now the error starts with the argument
    given; the trainer's errors still name its own (``loss_scale``,
    ``dynamic_loss_scaling``)."""
    with pytest.raises(err) as info:
        LossScaler(**kwargs)
    assert str(info.value).startswith(f"{name}")
    assert "dynamic_loss_scaling" not in str(info.value) and "loss_scale" not in str(info.value)


@pytest.mark.parametrize("kwargs, name", [({"loss_scale": -1.0}, "loss_scale"),
                                          ({"dynamic_loss_scaling": "yes"}, "dynamic_loss_scaling")])
def test_trainer_constructor_errors_name_the_trainers_arguments(kwargs, name):
    backend = NumpyBackend(dtype="float16")
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    compiled = ml.compile(m, backend, shapes={"input": [2, 3]})
    with pytest.raises((TypeError, ValueError)) as info:
        MixedPrecisionTrainer(compiled, Adam(), compiled.get_parameters(), **kwargs)
    assert str(info.value).startswith(name) and "init_scale" not in str(info.value)


# -- Accumulate: torch's loop skips the whole window, the trainer drops one micro-batch ---------
def torch_accumulating_loop(batches, k: int):
    """torch's recipe: ``scaler.scale(loss / k).backward()`` on each of ``k`` micro-batches,
    then one ``scaler.step`` + ``update``; SGD(0.25, momentum 0.5). Returns the params after
    each window, the scale after each window, and whether each window was skipped."""
    ps = {W: torch.nn.Parameter(torch.full((2, 3), 0.5)), B: torch.nn.Parameter(torch.zeros(2))}
    opt = torch.optim.SGD(list(ps.values()), lr=0.25, momentum=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1000)
    params, scales, skipped = [], [], []
    for i in range(0, len(batches) - k + 1, k):
        opt.zero_grad()
        for x, c in batches[i:i + k]:
            with torch.autocast("cpu", dtype=torch.float16):
                out = torch.nn.functional.linear(torch.from_numpy(x), ps[W], ps[B])
            scaler.scale((out.float() * torch.from_numpy(c)).sum() / k).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
        scales.append(scaler.get_scale())
        params.append({n: p.detach().numpy().copy() for n, p in ps.items()})
    return params, scales, skipped


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_accumulate_drops_the_overflowing_micro_batch_where_torch_skips_the_window(kind):
    """Six micro-batches, k = 2, a NaN in micro-batch 3. torch's loop skips the whole second
    window (micro-batches 2 and 3: three updates made of 0+1 and 4+5, two of them applied).
    The trainer (Keras' ``LossScaleOptimizer`` over an accumulating optimizer) drops only
    micro-batch 3: its windows are 0+1 and 2+4, micro-batch 5 waits in the buffer. Its
    masters equal torch's loop run without micro-batch 3, and differ from torch's run on
    all six - what a torch user switching over gets."""
    from mithril.utils.accumulation import Accumulate
    from mithril.utils.optimizers import SGD

    rng = np.random.default_rng(8)
    batches = []
    for i in range(6):
        x = rng.integers(-2, 3, (2, 3)).astype(np.float32) / 2
        if i == 3:
            x[0, 2] = np.nan
        batches.append((x, rng.integers(-4, 5, (2, 2)).astype(np.float32) / 4))
    full, full_scales, full_skipped = torch_accumulating_loop(batches, 2)
    assert full_skipped == [False, True, False] and full_scales == [64.0, 32.0, 32.0]
    dropped, _, dropped_skipped = torch_accumulating_loop(batches[:3] + batches[4:], 2)
    assert dropped_skipped == [False, False]

    backend = BACKENDS[kind](dtype="float16")
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    compiled = ml.compile(m, backend, shapes={"input": [2, 3]})
    trainer = MixedPrecisionTrainer(
        compiled, Accumulate(SGD(learning_rate=0.25, momentum=0.5), 2),
        {W: backend.array(np.full((2, 3), 0.5, np.float32), "float32"),
         B: backend.array(np.zeros(2, np.float32), "float32")},
        loss_scale=2.0**6, growth_interval=1000)
    applied = []
    for x, c in batches:
        trainer.forward({"input": backend.array(x)})
        trainer.backward_and_update({"out": backend.array(c)})
        applied.append(trainer.last_step_applied)
    assert applied == [False, True, False, False, True, False]
    assert trainer.loss_scale == 32.0 and trainer.optimizer_state.micro_step == 1
    got = host(backend, trainer.master_params)
    for n in (W, B):
        np.testing.assert_allclose(got[n], dropped[-1][n], rtol=0, atol=1e-7, err_msg=n)
        assert np.abs(got[n] - full[-1][n]).max() > 1e-3


# -- the trainer on a float32 model against make_train_step --------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_trainer_on_a_float32_model_equals_make_train_step(kind, fused):
    """``make_train_step`` has no loss scaling or master weights; on a float32 model the
    trainer is plain training with a loss scale (2**10: scaling and unscaling by a power of
    two are exact), so 20 Adam steps (clip_norm 0.5) of a tanh MLP's mean squared error
    equal the train step's: bitwise on NumPy and torch, within 2e-7 on JAX (the trainer's
    jitted VJP against the one-program step, ``fused``, or the compiled model's,
    ``separate``: XLA may fuse the float32 sums differently)."""
    from mithril.utils.training import make_train_step

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    backend = BACKENDS[kind](dtype="float32")
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h")
    m |= ml.Tanh()(input="h", output="t")
    m |= ml.Linear(2)(input="t", output=ml.IOKey("out"))
    m |= ml.SquaredError()(input=m.out, target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    compiled = ml.compile(m, backend, shapes={"input": [8, 3], "target": [8, 2]})
    p0 = {k: np.array(backend.to_numpy(v)) for k, v in compiled.get_parameters().items()}
    data = {"input": backend.array(x), "target": backend.array(y)}

    opt = Adam(learning_rate=0.01, clip_norm=0.5)
    step = make_train_step(compiled, opt, loss="loss")
    params = {k: backend.array(v, "float32") for k, v in p0.items()}
    state = step.init(params) if fused else opt.init(params)
    for _ in range(20):
        params, state, _ = step(params, state, data)
    want = {k: np.array(backend.to_numpy(v)) for k, v in params.items()}

    trainer = MixedPrecisionTrainer(compiled, Adam(learning_rate=0.01, clip_norm=0.5),
                                    {k: backend.array(v, "float32") for k, v in p0.items()},
                                    loss_scale=2.0**10)
    for _ in range(20):
        trainer.forward(data)
        assert trainer.backward_and_update({"loss": 1.0})[2]
    got = host(backend, trainer.master_params)
    for k in p0:
        assert np.abs(want[k] - p0[k]).max() > 0.05
        if kind == "jax":
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-7, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
