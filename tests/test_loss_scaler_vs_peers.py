"""LossScaler / MixedPrecisionTrainer run side by side with what an engineer switching from
torch.amp or Keras 3 would compare them to: Keras' ``LossScaleOptimizer`` configured its
default way (initial scale 2**15, doubled after 2000 finite steps, halved on inf/NaN), torch's
``GradScaler`` where the overflow appears only once the gradients are unscaled, an LR
scheduler whose first step is skipped, and EMA weight averaging across skipped steps.

The data are small dyadic numbers: the float16 gradients of the Linear model are exact, so the
peers' runs compare to the last bit.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import run_python

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.mixed_precision import LossScaler, MixedPrecisionTrainer
from mithril.utils.optimizers import SGD

W, B = "linear.weight", "linear.bias"


def linear(backend, rows: int | None = None):
    """``out = input @ W.T + b`` (W: 2×3), compiled on ``backend``."""
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    return ml.compile(m, backend, shapes={"input": [rows, 3]})


def start(backend):
    return {W: backend.array(np.full((2, 3), 0.5, np.float32), "float32"),
            B: backend.array(np.zeros(2, np.float32), "float32")}


def host(backend, tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(backend.to_numpy(v), dtype=np.float32) for k, v in tree.items()}


# -- Keras' LossScaleOptimizer, default configuration ------------------------------------------
_KERAS = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax, jax.numpy as jnp, keras, numpy as np
cots, bad, n = {cots!r}, {bad!r}, {n}
opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=2.0**-10))
w = keras.Variable(np.full((2, 3), 0.5, np.float32))
b = keras.Variable(np.zeros(2, np.float32))
opt.build([w, b])
i_scale = [id(v) for v in opt.variables].index(id(opt.dynamic_scale))
ov, tv = [v.value for v in opt.variables], [w.value, b.value]
step = jax.jit(opt.stateless_apply)
scales = []
for t in range(n):
    s = np.float32(np.asarray(ov[i_scale]))
    c = np.asarray(cots[t % len(cots)], np.float32)
    gw, gb = (c.T * s).astype(np.float32), (c.sum(0) * s).astype(np.float32)  # (x = I)
    if str(t) in bad:
        gw[0, 0] = float(bad[str(t)])
    tv, ov = step(ov, [jnp.asarray(gw), jnp.asarray(gb)], tv)
    scales.append(float(np.asarray(ov[i_scale])))
print(json.dumps({{"scales": scales, "w": np.asarray(tv[0]).tolist(),
                   "b": np.asarray(tv[1]).tolist()}}))
"""


def test_keras_default_dynamic_scaling_matches_the_trainer_configured_the_keras_way():
    """2050 float16 steps, NaN/inf gradients at steps 3, 2010 and 2011: Keras'
    ``LossScaleOptimizer()`` (2**15, growth every 2000 finite steps, factor 2, backoff 1/2)
    against ``MixedPrecisionTrainer(loss_scale=2**15)`` (growth_interval 2000 is torch's
    default too). The scale after every step (32768 → 16384 at step 3 → 32768 at step 2003,
    2000 finite steps later → 16384 → 8192) and the parameters at the end agree exactly."""
    rng = np.random.default_rng(0)
    cots = [rng.integers(-4, 5, (3, 2)).astype(np.float32) / 8 for _ in range(7)]
    bad, n = {3: "nan", 2010: "inf", 2011: "nan"}, 2050
    code = _KERAS.format(cots=[c.tolist() for c in cots], bad={str(k): v for k, v in
                                                                bad.items()}, n=n)
    keras_run = json.loads(run_python(code, timeout=300).strip().splitlines()[-1])

    backend = NumpyBackend(dtype="float16")
    trainer = MixedPrecisionTrainer(linear(backend), SGD(learning_rate=2.0**-10),
                                    start(backend), loss_scale=2.0**15)
    scales = []
    for t in range(n):
        x = np.eye(3, dtype=np.float32)  # (the weight gradient is c.T, the bias's c.sum(0))
        if t in bad:
            x[0, 0] = float(bad[t])
        trainer.forward({"input": backend.array(x)})
        ok = trainer.backward_and_update({"out": backend.array(cots[t % 7])})[2]
        assert ok == (t not in bad), t
        scales.append(trainer.loss_scale)
    changes = [(t, s) for t, s in enumerate(scales) if t == 0 or s != scales[t - 1]]
    assert changes == [(0, 32768.0), (3, 16384.0), (2003, 32768.0), (2010, 16384.0),
                       (2011, 8192.0)]
    assert scales == keras_run["scales"]
    got = host(backend, trainer.master_params)
    np.testing.assert_array_equal(got[W], np.float32(keras_run["w"]))
    np.testing.assert_array_equal(got[B], np.float32(keras_run["b"]))
    assert trainer.optimizer_state.step == n - 3


# -- an overflow that appears only when the gradients are unscaled -----------------------------
def test_overflow_after_unscaling_is_skipped_where_gradscaler_applies_it():
    """A scale below 1 (2**-4, as a long backoff reaches) and bfloat16 gradients that are
    finite when scaled (2.5e37) but not once unscaled (x16: 4e38 > float32's 3.4e38).
    torch's ``GradScaler`` tests the *scaled* gradients for inf/NaN
    (``_amp_foreach_non_finite_check_and_unscale_``), so it finds none, steps, and the
    weights become -inf; Keras' ``LossScaleOptimizer`` also checks before dividing. The
    trainer tests the unscaled float32 gradients the optimizer would get: it skips the
    step (weights unchanged) and backs off to 2**-5. A deliberate difference: an inf update
    is never what the loop wants."""
    x = np.ones((2, 3), np.float32)
    c = np.full((2, 2), 2e38, np.float32)

    ps = {W: torch.nn.Parameter(torch.full((2, 3), 0.5)), B: torch.nn.Parameter(torch.zeros(2))}
    opt = torch.optim.SGD(list(ps.values()), lr=2.0**-10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.nn.functional.linear(torch.from_numpy(x), ps[W], ps[B])
    scaler.scale((out.float() * torch.from_numpy(c)).sum()).backward()
    scaler.unscale_(opt)
    assert torch.isinf(ps[W].grad).all()                         # unscaled: inf ...
    assert not any(v.item() for v in scaler._found_inf_per_device(opt).values())  # ... unseen
    scaler.step(opt)
    scaler.update()
    assert torch.isneginf(ps[W]).all() and scaler.get_scale() == 2.0**-4

    backend = TorchBackend(dtype="bfloat16")
    trainer = MixedPrecisionTrainer(linear(backend), SGD(learning_rate=2.0**-10),
                                    start(backend), loss_scale=2.0**-4)
    trainer.forward({"input": backend.array(x)})
    ok = trainer.backward_and_update({"out": backend.array(c, "float32")})[2]
    assert not ok and trainer.loss_scale == 2.0**-5
    assert torch.isinf(trainer.last_gradients[W]).all()
    np.testing.assert_array_equal(host(backend, trainer.master_params)[W], 0.5)
    assert trainer.optimizer_state.step == 0


# -- an LR scheduler when the first step is skipped ---------------------------------------------
def _torch_run(batches, guard: bool):
    """torch's AMP loop with ``StepLR(step_size=1, gamma=0.5)``; ``guard``: step the
    scheduler only when ``scaler.update()`` did not lower the scale (the usual recipe),
    else after every iteration as the plain loop does. Returns the rates and the params."""
    ps = {W: torch.nn.Parameter(torch.full((2, 3), 0.5)), B: torch.nn.Parameter(torch.zeros(2))}
    opt = torch.optim.SGD(list(ps.values()), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    lrs: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, c in batches:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                out = torch.nn.functional.linear(torch.from_numpy(x), ps[W], ps[B])
            scaler.scale((out.float() * torch.from_numpy(c)).sum()).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if not guard or scaler.get_scale() >= before:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    said = any("lr_scheduler.step()` before `optimizer.step()" in str(w.message)
               for w in caught)
    return lrs, {n: p.detach().numpy().copy() for n, p in ps.items()}, said


def test_scheduler_after_a_skipped_first_step_vs_torchs_loop():
    """At scale 2**16 a float16 loss gradient of 1 overflows, so step 0 is skipped. torch's
    plain loop steps ``StepLR`` anyway (and warns 'Detected call of `lr_scheduler.step()`
    before `optimizer.step()`'): every later update runs at half the rate. The trainer's
    ``step_scheduler`` does not step after the skipped update: rates and parameters equal
    torch's guarded recipe (step only when the scale was not lowered), and the plain
    loop's rates are ours halved."""
    rng = np.random.default_rng(3)
    batches = [(rng.integers(-2, 3, (2, 3)).astype(np.float32) / 2,
                np.ones((2, 2), np.float32) / 2 ** (i > 0)) for i in range(5)]
    plain_lrs, plain_p, plain_warned = _torch_run(batches, guard=False)
    want_lrs, want_p, guarded_warned = _torch_run(batches, guard=True)
    assert plain_warned and not guarded_warned

    backend = NumpyBackend(dtype="float16")
    sgd = SGD(learning_rate=0.5)
    sched = StepLR(sgd, step_size=1, gamma=0.5)
    trainer = MixedPrecisionTrainer(linear(backend), sgd, start(backend), growth_interval=1000)
    lrs, oks = [], []
    for x, c in batches:
        trainer.forward({"input": backend.array(x)})
        oks.append(trainer.backward_and_update({"out": backend.array(c)})[2])
        trainer.step_scheduler(sched)
        lrs.append(sgd.get_learning_rate())
    assert oks == [False, True, True, True, True]
    assert lrs == want_lrs == [0.5, 0.25, 0.125, 0.0625, 0.03125]
    assert plain_lrs == [lr / 2 for lr in lrs]
    got = host(backend, trainer.master_params)
    for n in (W, B):
        np.testing.assert_array_equal(got[n], want_p[n], err_msg=n)
        assert not np.array_equal(got[n], plain_p[n])


# -- EMA across skipped steps ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", [NumpyBackend(dtype="float16"),
                                     TorchBackend(dtype="float16")], ids=lambda b: b.name)
def test_ema_is_not_moved_by_a_skipped_step_as_in_torchs_guarded_averaged_model(backend):
    """``ema_decay=0.75`` through the trainer, with NaN inputs at steps 2 and 5 (skipped):
    the average equals torch's ``AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(0.75))``
    updated only after steps whose update was applied (Keras' ``use_ema`` under a
    ``LossScaleOptimizer`` does the same: its EMA moves inside the skipped ``apply``). An
    ``update_parameters`` after every iteration would have moved it toward the unchanged
    parameters twice more; that average is checked to differ."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    rng = np.random.default_rng(4)
    data = []
    for i in range(8):
        x = rng.integers(-2, 3, (2, 3)).astype(np.float32) / 2
        if i in (2, 5):
            x[0, 1] = np.nan
        data.append((x, rng.integers(-4, 5, (2, 2)).astype(np.float32) / 4))

    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.fill_(0.5)
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=0.25, momentum=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guarded = AveragedModel(lin, multi_avg_fn=get_ema_multi_avg_fn(0.75), use_buffers=True)
    every = AveragedModel(lin, multi_avg_fn=get_ema_multi_avg_fn(0.75), use_buffers=True)
    for x, c in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = lin(torch.from_numpy(x))
        scaler.scale((out.float() * torch.from_numpy(c)).sum()).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() >= before:
            guarded.update_parameters(lin)
        every.update_parameters(lin)

    sgd = SGD(learning_rate=0.25, momentum=0.5, ema_decay=0.75)
    trainer = MixedPrecisionTrainer(linear(backend), sgd, start(backend), loss_scale=2.0**8)
    for x, c in data:
        trainer.forward({"input": backend.array(x)})
        trainer.backward_and_update({"out": backend.array(c)})
    assert trainer.num_skipped_steps == 2 and trainer.loss_scale == 2.0**6
    ema = host(backend, sgd.ema_params(trainer.optimizer_state))
    want = {W: guarded.module.weight.detach().numpy(), B: guarded.module.bias.detach().numpy()}
    other = {W: every.module.weight.detach().numpy(), B: every.module.bias.detach().numpy()}
    for n in (W, B):
        np.testing.assert_allclose(ema[n], want[n], rtol=1e-6, atol=1e-7, err_msg=n)
    assert np.abs(ema[W] - other[W]).max() > 1e-3
    np.testing.assert_allclose(host(backend, trainer.master_params)[W],
                               lin.weight.detach().numpy(), rtol=1e-6, atol=1e-7)


# -- a floor under the scale: jmp's min_loss_scale ------------------------------------------------
def jmp_adjust(scale: np.float32, counter: int, finite: bool, period: int, factor: float,
               floor: np.float32) -> tuple[np.float32, int]:
    """``jmp.DynamicLossScale.adjust`` (jmp 0.0.4, ``jmp/_src/loss_scale.py``) on host
    float32 scalars: finite - grow by ``factor`` when ``counter == period - 1`` (if finite);
    else ``max(min_loss_scale, scale / factor)``; ``counter = (counter + 1) % period`` if
    finite, else 0."""
    if finite:
        grown = np.float32(scale * np.float32(factor))
        new = (grown if np.isfinite(grown) else scale) if counter == period - 1 else scale
    else:
        new = np.maximum(floor, np.float32(scale / np.float32(factor)))
    return np.float32(new), (counter + 1) % period if finite else 0


def test_min_scale_floors_backoffs_as_jmps_min_loss_scale():
    """jmp's ``DynamicLossScale`` stops backing off at ``min_loss_scale`` (1.0 by default);
    torch's ``GradScaler`` and Keras have no floor. Before, ``LossScaler`` had no way to say
    it: 12 overflows in a row from 2**4 took the scale to 2**-8 (torch's too). With
    ``min_scale=1.0`` (the trainer's ``min_loss_scale``) the scale and the growth tracker
    after every step equal jmp's rule: 16, 8, 4, 2, 1, 1, ..., then 2 after 3 finite
    steps; the masters follow torch's with the same steps skipped."""
    finite = [False] * 12 + [True] * 7 + [False, True, True, True]
    ours, jmp_side = LossScaler(16.0, growth_interval=3, min_scale=1.0), []
    scale, counter = np.float32(16.0), 0
    for f in finite:
        scale, counter = jmp_adjust(scale, counter, f, 3, 2.0, np.float32(1.0))
        jmp_side.append((float(scale), counter))
        ours.update(not f)
        assert (ours.scale, ours.growth_tracker) == jmp_side[-1]
    assert [s for s, _ in jmp_side] == [8, 4, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 4,
                                        4, 2, 2, 2, 4]
    p = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([p], lr=0.25)
    torch_side = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=3)
    for _ in range(12):  # 12 inf gradients in a row
        opt.zero_grad()
        torch_side.scale(p * np.inf).backward()
        torch_side.step(opt)
        torch_side.update()
    assert torch_side.get_scale() == 2.0**-8 and LossScaler(16.0).scale == 16.0  # no floor
    plain = LossScaler(16.0, growth_interval=3)
    for _ in range(12):
        plain.update(True)
    assert plain.scale == 2.0**-8

    backend = NumpyBackend(dtype="float16")
    trainer = MixedPrecisionTrainer(linear(backend), SGD(learning_rate=0.25), start(backend),
                                    loss_scale=16.0, growth_interval=3, min_loss_scale=1.0)
    rng = np.random.default_rng(6)
    for f, (want, _) in zip(finite, jmp_side, strict=True):
        x = rng.integers(-2, 3, (2, 3)).astype(np.float32) / 2
        if not f:
            x[1, 0] = np.nan
        trainer.forward({"input": backend.array(x)})
        assert trainer.backward_and_update({"out": backend.array(np.ones((2, 2)))})[2] == f
        assert trainer.loss_scale == want
    sd = trainer.state_dict()
    assert sd["scaler"]["min_scale"] == 1.0
    back = LossScaler()
    back.load_state_dict(sd["scaler"])
    assert (back.scale, back.min_scale) == (4.0, 1.0)
    with pytest.raises(ValueError, match="min_scale = 1.0 must not exceed init_scale = 0.5"):
        LossScaler(0.5, min_scale=1.0)  # (a floor above the scale)
    before = back.state_dict()
    for bad, err in ((8.0, ValueError), (-1.0, ValueError), ("1", TypeError)):
        with pytest.raises(err, match="'min_scale'"):
            back.min_scale = bad  # (refused: nothing changes)
    assert back.state_dict() == before
    with pytest.raises(ValueError, match="min_loss_scale"):
        MixedPrecisionTrainer(linear(backend), SGD(), start(backend), min_loss_scale=-1.0)
