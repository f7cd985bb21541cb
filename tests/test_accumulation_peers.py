"""``Accumulate`` against the other accumulations, float64, side by side:

* ``use_grad_mean=False`` (a window's **sum**) against ``optax.MultiSteps(...,
  use_grad_mean=False)`` and torch's hand-written loop that calls ``loss.backward()`` on each
  micro-batch without dividing by ``k`` (``.grad`` sums them), with weight decay, momentum and
  a ``StepLR`` stepped once per optimizer step;
* Keras 3's ``gradient_accumulation_steps`` with ``use_ema`` (JAX backend): the parameters
  agree, the EMA does not, by design: Keras moves its EMA on every call (``k`` times a window,
  toward parameters that change once), torch's ``AveragedModel`` updated after each
  ``opt.step()``, and ours, once per window. Keras's is reproduced from our per-call
  parameters by its recipe (pinned here, documented in docs/training.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_python

from mithril.backends import NumpyBackend, TorchBackend
from mithril.utils.accumulation import Accumulate
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.optimizers import SGD, Adam

K, CALLS = 3, 13  # the last call leaves one micro-batch buffered
LR = 2.0**-4  # (optax's schedules give float32 rates, even under x64: exact here)


def _grads(t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7 + t)
    return {"w": rng.standard_normal((2, 3)) * (1 + t % 4), "b": rng.standard_normal(3)}


def _start() -> dict[str, np.ndarray]:
    return {"w": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.full(3, 0.25)}


def _torch_summing_loop() -> list[dict[str, np.ndarray]]:
    ps = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in _start().items()}
    opt = torch.optim.SGD(list(ps.values()), lr=LR, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    out = []
    for t in range(CALLS):
        loss = sum((p * torch.tensor(_grads(t)[n])).sum() for n, p in ps.items())
        loss.backward()  # (not loss / K: the gradients add up in .grad)
        if (t + 1) % K == 0:
            opt.step()
            sched.step()
            opt.zero_grad()
        out.append({n: p.detach().numpy().copy() for n, p in ps.items()})
    return out


def _optax_summing() -> list[dict[str, np.ndarray]]:
    import jax
    import jax.numpy as jnp
    import optax

    with jax.enable_x64(True):
        # (MultiSteps' wrapped count: windows, so the StepLR is a staircase over windows)
        lr = optax.exponential_decay(LR, 2, 0.5, staircase=True)
        tx = optax.MultiSteps(optax.chain(optax.add_decayed_weights(0.01),
                                          optax.sgd(lr, momentum=0.9)),
                              K, use_grad_mean=False, accumulator_dtype=jnp.float64)
        q = {n: jnp.asarray(v) for n, v in _start().items()}
        s, update, out = tx.init(q), jax.jit(tx.update), []
        for t in range(CALLS):
            u, s = update({n: jnp.asarray(v) for n, v in _grads(t).items()}, s, q)
            q = optax.apply_updates(q, u)
            out.append({n: np.asarray(v) for n, v in q.items()})
        return out


@pytest.mark.parametrize("backend", [NumpyBackend, TorchBackend])
def test_use_grad_mean_false_steps_with_the_sum_as_optax_and_torch(backend):
    be = backend(dtype="float64")
    acc = Accumulate(SGD(learning_rate=LR, momentum=0.9, weight_decay=0.01), K,
                     use_grad_mean=False)
    sched = StepLR(acc, step_size=2, gamma=0.5)
    params = {n: be.array(v) for n, v in _start().items()}
    state = acc.init(params)
    torch_run, optax_run = _torch_summing_loop(), _optax_summing()
    for t in range(CALLS):
        params, state = acc.update(params, {n: be.array(v) for n, v in _grads(t).items()},
                                   state)
        if state.applied and not state.last_step_skipped:
            sched.step()
        for n, v in params.items():
            got = be.to_numpy(v)
            np.testing.assert_allclose(got, torch_run[t][n], rtol=0, atol=1e-12, err_msg=n)
            np.testing.assert_allclose(got, optax_run[t][n], rtol=0, atol=1e-12, err_msg=n)
    assert (state.windows, state.micro_step) == (CALLS // K, CALLS % K)
    # the mean would have stepped K times less far
    mean_acc = Accumulate(SGD(learning_rate=0.05), K)
    p, st = _start(), mean_acc.init(_start())
    summing = Accumulate(SGD(learning_rate=0.05 / K), K, use_grad_mean=False)
    q, sq = _start(), summing.init(_start())
    for t in range(K):
        p, st = mean_acc.update(p, _grads(t), st)
        q, sq = summing.update(q, _grads(t), sq, weight=1.0 + t)
    assert not np.allclose(p["w"], q["w"])  # (weights count in the sum: Σ wᵢ·gᵢ)
    with pytest.raises(TypeError, match="use_grad_mean must be a bool, got 'sum'"):
        summing.use_grad_mean = "sum"
    assert summing.use_grad_mean is False and "use_grad_mean=False" in repr(summing)


_KERAS = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import keras
import numpy as np
keras.config.set_floatx("float64")
start, grads, k = {start!r}, {grads!r}, {k}
opt = keras.optimizers.Adam(learning_rate=0.01, weight_decay=0.1, use_ema=True,
                            ema_momentum=0.9, gradient_accumulation_steps=k)
vs = [keras.Variable(np.asarray(start[n]), dtype="float64", name=n) for n in ("w", "b")]
opt.build(vs)
for g in grads:
    opt.apply([jnp.asarray(g[n]) for n in ("w", "b")], vs)
print(json.dumps({{"params": [np.asarray(v.value).tolist() for v in vs],
                   "ema": [np.asarray(e.value).tolist()
                           for e in opt._model_variables_moving_average]}}))
"""


@pytest.mark.slow  # (Keras's import, in a fresh interpreter)
def test_keras_moves_its_ema_on_every_call_ours_once_per_window():
    grads = [{n: v.tolist() for n, v in _grads(t).items()} for t in range(CALLS)]
    code = _KERAS.format(start={n: v.tolist() for n, v in _start().items()}, grads=grads, k=K)
    ref = json.loads(run_python(code, timeout=240).strip().splitlines()[-1])
    acc = Accumulate(Adam(learning_rate=0.01, epsilon=1e-7, weight_decay=0.1, ema_decay=0.9,
                          convention="keras"), K)
    p, st = _start(), acc.init(_start())
    per_call, torch_ema = [], None
    for t in range(CALLS):
        p, st = acc.update(p, _grads(t), st)
        per_call.append({n: v.copy() for n, v in p.items()})
        if st.applied:  # torch's AveragedModel(get_ema_multi_avg_fn(0.9)) after opt.step()
            torch_ema = per_call[-1] if torch_ema is None else \
                {n: 0.9 * torch_ema[n] + 0.1 * per_call[-1][n] for n in p}
    ours = acc.ema_params(st)
    for i, n in enumerate(("w", "b")):
        np.testing.assert_allclose(p[n], ref["params"][i], rtol=0, atol=1e-12, err_msg=n)
        np.testing.assert_allclose(ours[n], torch_ema[n], rtol=0, atol=1e-12, err_msg=n)
        # Keras's: after every call, toward that call's parameters (momentum 0 through the
        # first window, its iterations being calls // k)
        keras_ema = None
        for c, pc in enumerate(per_call):
            m = 0.0 if c // K == 0 else 0.9
            keras_ema = pc[n] if keras_ema is None else m * keras_ema + (1 - m) * pc[n]
        np.testing.assert_allclose(keras_ema, ref["ema"][i], rtol=0, atol=1e-12, err_msg=n)
        assert np.abs(ours[n] - np.asarray(ref["ema"][i])).max() > 1e-4  # (they differ)
