"""Weight averaging (``ema_decay=``, ``swa_start=``) side by side with the peers, after every
step: torch's ``AveragedModel`` behind a ``GradScaler`` loop that skips overflowing steps (the
average is not updated on a skipped step) through the :class:`MixedPrecisionTrainer`;
Keras 3's ``use_ema`` / ``ema_momentum`` / ``ema_overwrite_frequency`` (run in a subprocess,
``KERAS_BACKEND=jax``); optax's ``optax.ema`` (the documented relation to ours); and
float16 / bfloat16 parameters against ``AveragedModel`` on a half-precision module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_python
from test_mixed_precision_peers import (
    SHAPES,
    autocast_loss,
    host,
    linear,
    overflowing_batches,
    p0,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mithril.backends import NumpyBackend, TorchBackend
from mithril.utils import optimizers as mo
from mithril.utils.mixed_precision import MixedPrecisionTrainer


def torch_amp_with_averages(batches, decay: float, swa_from: int):
    """torch's AMP recipe (float16 autocast, GradScaler growth_interval 3, SGD momentum) with
    an EMA and an SWA ``AveragedModel`` updated only after steps GradScaler did not skip (the
    SWA one from the ``swa_from``-th applied step on). Per step: skipped, EMA, SWA."""
    ps = {n: torch.nn.Parameter(torch.full(s, 0.5)) for n, s in SHAPES.items()}
    mod = torch.nn.ParameterDict({n.replace(".", "_"): p for n, p in ps.items()})
    ema = AveragedModel(mod, multi_avg_fn=get_ema_multi_avg_fn(decay))
    swa = AveragedModel(mod)
    opt = torch.optim.SGD(list(ps.values()), lr=0.125, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    rows, applied = [], 0
    for x, c in batches:
        opt.zero_grad()
        scaler.scale(autocast_loss(ps, x, c)).backward()
        scaler.step(opt)
        skipped = bool(sum(v.item() for v in scaler._found_inf_per_device(opt).values()))
        scaler.update()
        if not skipped:
            applied += 1
            ema.update_parameters(mod)
            if applied >= swa_from:
                swa.update_parameters(mod)
        rows.append((skipped, *({n: m.module[n.replace(".", "_")].detach().numpy().copy()
                                 for n in SHAPES} for m in (ema, swa))))
    return rows


@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend], ids=["numpy", "torch"])
def test_trainer_averages_skip_overflowing_steps_as_a_gradscaler_loop(backend_cls):
    """40 float16 steps, 10 of them overflowing: after every step the EMA and the SWA
    average (from the 5th applied step on) equal torch's; a skipped step moves neither (the
    optimizer's step count, from which the averaging weights come, does not advance)."""
    batches = overflowing_batches(40)
    ref = torch_amp_with_averages(batches, 0.75, 5)
    assert 8 <= sum(r[0] for r in ref) <= 30
    backend = backend_cls(dtype="float16")
    opt = mo.SGD(learning_rate=0.125, momentum=0.9, ema_decay=0.75, swa_start=5)
    tr = MixedPrecisionTrainer(linear(backend), opt, p0(backend), growth_interval=3)
    for i, ((x, c), (skipped, want_ema, want_swa)) in enumerate(zip(batches, ref, strict=True)):
        tr.forward({"input": backend.array(x)})
        ok = tr.backward_and_update({"out": backend.array(c)})[2]
        assert ok is not skipped, i
        got_ema = host(backend, opt.ema_params(tr.optimizer_state))
        got_swa = host(backend, opt.swa_params(tr.optimizer_state))
        for n in SHAPES:
            np.testing.assert_allclose(got_ema[n], want_ema[n], rtol=1e-6, atol=1e-6,
                                       err_msg=f"ema {n} {i}")
            np.testing.assert_allclose(got_swa[n], want_swa[n], rtol=1e-6, atol=1e-6,
                                       err_msg=f"swa {n} {i}")


KERAS_RUN = """
import json, os
import numpy as np, jax
jax.config.update("jax_enable_x64", True)
import keras
keras.config.set_floatx("float64")
from mithril.utils import optimizers as mo
rng = np.random.default_rng(0)
p0 = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(30)]
out = {}
for freq in (None, 1, 3):
    vs = [keras.Variable(p0[k], dtype="float64") for k in p0]
    ko = keras.optimizers.SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.8,
                              ema_overwrite_frequency=freq)
    ko.build(vs)
    opt = mo.SGD(0.1, momentum=0.9, ema_decay=0.8)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    errs = []
    for t, g in enumerate(grads, 1):
        ko.apply([g[k] for k in p0], vs)
        params, state = opt.update(params, g, state)
        if freq and t % freq == 0:  # Keras' overwrite: the parameters become the EMA
            params = {k: v.copy() for k, v in opt.ema_params(state).items()}
        kp = {k: np.asarray(v) for k, v in zip(p0, vs)}
        ke = {k: np.asarray(v) for k, v in zip(p0, ko._model_variables_moving_average)}
        oe = opt.ema_params(state)
        errs.append(max(max(np.abs(kp[k] - params[k]).max(), np.abs(ke[k] - oe[k]).max())
                        for k in p0))
    out[str(freq)] = errs
print(json.dumps(out))
"""


@pytest.mark.slow  # (~15 s: a fresh interpreter importing Keras and JAX)
def test_keras_use_ema_and_its_overwrite_frequency_step_by_step():
    """Keras' EMA (first step a copy, then ``m·avg + (1−m)·var``) equals ``ema_decay=m``
    after every step; ``ema_overwrite_frequency=k`` equals rebinding the parameters to a copy
    of ``ema_params(state)`` after every k-th update (the documented recipe), also k = 1."""
    res = json.loads(run_python(KERAS_RUN, timeout=240, env={"KERAS_BACKEND": "jax"}
                                ).strip().splitlines()[-1])
    assert set(res) == {"None", "1", "3"}
    for freq, errs in res.items():
        assert len(errs) == 30 and max(errs) < 1e-12, (freq, max(errs))


def test_optax_ema_is_a_different_average_by_a_known_term():
    """``optax.ema`` starts from zeros: undebiased it is ours minus ``d**t · p1`` (ours, as
    torch's and Keras', starts as a copy of the first averaged parameters), debiased it is
    that divided by ``1 − d**t``; they meet ours only in the limit."""
    optax = pytest.importorskip("optax")
    import jax

    rng = np.random.default_rng(3)
    d, steps = 0.9, 25
    p_init = {"w": rng.standard_normal(6)}
    grads = [{"w": rng.standard_normal(6)} for _ in range(steps)]
    opt = mo.SGD(0.1, momentum=0.5, ema_decay=d)
    params = {k: v.copy() for k, v in p_init.items()}
    state = opt.init(params)
    with jax.enable_x64(True):
        plain, debiased = optax.ema(d, debias=False), optax.ema(d, debias=True)
        s_plain, s_deb = plain.init(p_init), debiased.init(p_init)
        first = None
        for t, g in enumerate(grads, 1):
            params, state = opt.update(params, g, state)
            first = params["w"].copy() if first is None else first
            u_plain, s_plain = plain.update({"w": params["w"]}, s_plain)
            u_deb, s_deb = debiased.update({"w": params["w"]}, s_deb)
            ours = opt.ema_params(state)["w"]
            np.testing.assert_allclose(np.asarray(u_plain["w"]) + d**t * first, ours,
                                       rtol=1e-12, atol=1e-12, err_msg=str(t))
            np.testing.assert_allclose(np.asarray(u_deb["w"]) * (1 - d**t) + d**t * first,
                                       ours, rtol=1e-12, atol=1e-12, err_msg=str(t))
            if t == 2:  # really a different number at the start
                assert np.abs(np.asarray(u_deb["w"]) - ours).max() > 1e-3


def half_targets(steps: int, seed: int = 0):
    """Parameter values on a 1/8 grid: SGD(lr=1) with g = p_old − p_new reaches them exactly
    in float16 and bfloat16, so both sides average the very same parameters."""
    rng = np.random.default_rng(seed)
    return [{"w": rng.integers(-32, 33, (20, 30)) / 8, "b": rng.integers(-32, 33, 30) / 8}
            for _ in range(steps + 1)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_averages_against_averaged_model(dtype):
    """On float16 / bfloat16 parameters the averages are kept in that dtype, as
    ``AveragedModel`` on a half-precision module keeps them. SWA's equal mean matches torch
    exactly here; the EMA is within a few units in the last place of torch's (torch's
    ``lerp`` rounds once from float32, ours rounds each operation in the parameters' dtype:
    the documented difference) and does not drift over 30 steps."""
    tdt = getattr(torch, dtype)
    targets = half_targets(30)
    mod = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.tensor(v, dtype=tdt))
                                  for k, v in targets[0].items()})
    ema = AveragedModel(mod, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    swa = AveragedModel(mod)
    opt = mo.SGD(1.0, ema_decay=0.9, swa_start=1)
    params = {k: torch.tensor(v, dtype=tdt) for k, v in targets[0].items()}
    state = opt.init(params)
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7  # relative, near the grid's values
    for t in range(1, 31):
        for k, p in mod.items():
            p.data = torch.tensor(targets[t][k], dtype=tdt)
        ema.update_parameters(mod)
        swa.update_parameters(mod)
        g = {k: torch.tensor(targets[t - 1][k] - targets[t][k], dtype=tdt) for k in mod}
        params, state = opt.update(params, g, state)
        got_ema, got_swa = opt.ema_params(state), opt.swa_params(state)
        for k in mod:
            assert got_ema[k].dtype == tdt and got_swa[k].dtype == tdt
            assert torch.equal(params[k].double(), torch.tensor(targets[t][k]))
            assert torch.equal(got_swa[k], swa.module[k].detach()), (t, k)
            err = (got_ema[k].double() - ema.module[k].detach().double()).abs()
            assert (err <= 4 * ulp * (ema.module[k].detach().double().abs() + 1)).all(), (t, k)
