"""MixedPrecisionTrainer, LossScaler and Accumulate run side by side with their peers:
Keras 3's ``LossScaleOptimizer`` over an inner optimizer with ``gradient_accumulation_steps``
(run in a subprocess, ``KERAS_BACKEND=jax``), torch's manual accumulation loop with
``torch.amp.GradScaler`` (``unscale_`` then ``clip_grad_norm_``) and ``optax.MultiSteps``.

The data are small dyadic numbers, so the half-precision gradients of the Linear model are
exact and the peers' float32 runs can be compared to the last bit or nearly.

Conventions checked (``shared/reference/conventions.md`` and the trainer's docs):

* With an :class:`~mithril.utils.accumulation.Accumulate` the loss scale is updated on every
  micro-batch and an overflowing micro-batch is dropped, not the whole window: Keras'
  semantics (its ``LossScaleOptimizer`` wraps the accumulating optimizer); torch's loop
  checks once per optimizer step instead, so it is compared on finite runs only.
* ``clip_norm`` is torch's ``min(1, c/(‖g‖ + 1e-6))``; against Keras' ``global_clipnorm``
  (no ε) it takes ``clip_eps=0.0``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import half_backends, run_python

import mithril as ml
from mithril.utils.accumulation import Accumulate
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.mixed_precision import MixedPrecisionTrainer
from mithril.utils.optimizers import SGD

SHAPES = {"linear.weight": (2, 3), "linear.bias": (2,)}


def linear(backend):
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    return ml.compile(m, backend, shapes={"input": [None, 3]})


def dyadic_batches(n: int, seed: int = 0):
    """``n`` (input, dL/dout, true parameter gradient) triples, all exact in float16 and
    bfloat16 (and so are the scaled half-precision VJPs for scales up to 2**10)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(-2, 3, (4, 3)).astype(np.float32) / 2
        c = rng.integers(-4, 5, (4, 2)).astype(np.float32) / 4
        out.append((x, c, {"linear.weight": c.T @ x, "linear.bias": c.sum(0)}))
    return out


def host(backend, tree):
    return {k: np.asarray(backend.to_numpy(v), dtype=np.float32) for k, v in tree.items()}


def p0(backend):
    return {k: backend.array(np.full(s, 0.5, np.float32), "float32") for k, s in SHAPES.items()}


class Counter:
    """A scheduler stand-in that counts its steps."""

    n = 0

    def step(self) -> None:
        self.n += 1


# -- Accumulate + dynamic loss scaling + clipping + schedule, against Keras ---------------------
_KERAS = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax.numpy as jnp
import keras
import numpy as np
grads, bad = {grads!r}, {bad!r}
inner = keras.optimizers.SGD(learning_rate=0.25, global_clipnorm=1.5,
                             gradient_accumulation_steps={k})
opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=64.0, dynamic_growth_steps=3)
names = ["linear.weight", "linear.bias"]
vs = [keras.Variable(np.full(np.shape(grads[0][n]), 0.5, np.float32), name=n.replace(".", "_"))
      for n in names]
opt.build(vs)
ov, tv = [v.value for v in opt.variables], [v.value for v in vs]
where = {{id(v): i for i, v in enumerate(opt.variables)}}
i_scale, i_it = where[id(opt.dynamic_scale)], where[id(inner._iterations)]
scales, updated, params = [], [], []
for g, b in zip(grads, bad):
    s = np.float32(np.asarray(ov[i_scale]))
    scaled = [jnp.asarray(np.asarray(g[n], np.float32) * s) for n in names]
    if b:
        scaled[0] = scaled[0].at[0, 0].set(float(b))
    it = int(np.asarray(ov[i_it]))
    tv, ov = opt.stateless_apply(ov, scaled, tv)
    new_it = int(np.asarray(ov[i_it]))
    scales.append(float(np.asarray(ov[i_scale])))
    updated.append(new_it > it and new_it % {k} == 0)
    params.append({{n: np.asarray(v).tolist() for n, v in zip(names, tv)}})
print(json.dumps({{"scales": scales, "updated": updated, "params": params}}))
"""

BAD = [None, None, None, "inf", None, None, "nan", None, None, None, "inf", None, None]


@pytest.fixture(scope="module")
def keras_accumulating_run():
    """Keras' run of the micro-batches of :func:`dyadic_batches` (k = 2), ``BAD[i]`` put
    into the first gradient of micro-batch i."""
    data = dyadic_batches(len(BAD))
    grads = [{n: g.tolist() for n, g in gr.items()} for _, _, gr in data]
    code = _KERAS.format(grads=grads, bad=BAD, k=2)
    return data, json.loads(run_python(code, timeout=300).strip().splitlines()[-1])


@pytest.mark.parametrize("backend", half_backends(), ids=lambda b: f"{b.name}-{b.dtype}")
def test_accumulate_with_loss_scaling_clip_and_schedule_matches_keras(backend,
                                                                      keras_accumulating_run):
    """Per micro-batch: the scale, whether the masters were updated (``state.applied``,
    ``trainer.last_step_applied`` and whether ``step_scheduler`` stepped) and the masters,
    against Keras. Bugs: ``step_scheduler`` stepped on micro-batches the Accumulate only
    buffered, and after an update an overflowing micro-batch left ``state.applied`` True.
    (The learning rate is constant: Keras' schedules count micro-batches, a documented
    difference; torch's loop, below, steps them per update.)"""
    data, ref = keras_accumulating_run
    compiled = linear(backend)
    sgd = SGD(learning_rate=0.25, clip_norm=1.5, clip_eps=0.0)  # (Keras': no ε)
    acc = Accumulate(sgd, 2)
    counted = Counter()
    trainer = MixedPrecisionTrainer(compiled, acc, p0(backend), loss_scale=64.0,
                                    growth_interval=3)
    scales, applied, stepped, flags = [], [], [], []
    for (x, c, g), bad, want in zip(data, BAD, ref["params"], strict=True):
        trainer.forward({"input": backend.array(x)})
        cot = c.copy()
        if bad:
            cot[0, 0] = float(bad)
        _, state, ok = trainer.backward_and_update({"out": backend.array(cot)})
        assert ok is (bad is None)
        if ok:  # the half-precision VJP, scaled and unscaled, is exact here
            for k, v in host(backend, trainer.last_gradients).items():
                np.testing.assert_array_equal(v, g[k])
        scales.append(trainer.loss_scale)
        applied.append(state.applied)
        stepped.append(trainer.step_scheduler(counted))
        flags.append((state.last_step_skipped, getattr(trainer, "last_step_applied", None)))
        got = host(backend, trainer.master_params)
        for k in SHAPES:
            np.testing.assert_allclose(got[k], np.asarray(want[k], np.float32), rtol=1e-5,
                                       atol=1e-7, err_msg=k)
    assert scales == ref["scales"]
    assert applied == stepped == ref["updated"]
    assert flags == [(bad is not None, up) for bad, up in zip(BAD, ref["updated"], strict=True)]
    assert sum(ref["updated"]) == counted.n == trainer.optimizer_state.inner.step == 5


# -- Accumulate + loss scaling + unscale_/clip + schedule, against torch's manual loop -------
def torch_accumulation_loop(data, k: int, lr: float, clip: float):
    """torch's documented AMP accumulation recipe: ``scaler.scale(loss / k).backward()`` per
    micro-batch; every k-th: ``unscale_``, ``clip_grad_norm_``, ``step``, ``update``, then the
    scheduler. The loss is linear in the parameters, so its gradient is exactly ``g``.
    Returns the parameters and learning rate after each micro-batch, and the scaler."""
    ps = {n: torch.nn.Parameter(torch.full(s, 0.5)) for n, s in SHAPES.items()}
    opt = torch.optim.SGD(list(ps.values()), lr=lr, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=3)
    params, lrs = [], []
    for i, (_, _, g) in enumerate(data):
        loss = sum((ps[n] * torch.from_numpy(g[n])).sum() for n in ps)
        scaler.scale(loss / k).backward()
        if (i + 1) % k == 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad()
        params.append({n: p.detach().numpy().copy() for n, p in ps.items()})
        lrs.append(opt.param_groups[0]["lr"])
    return params, lrs, ps, scaler


@pytest.mark.parametrize("backend", half_backends(), ids=lambda b: f"{b.name}-{b.dtype}")
def test_accumulate_clip_and_schedule_match_torch_loop_with_a_partial_last_window(backend):
    """8 finite micro-batches, k = 3: two updates (clipped after unscaling, momentum, the
    schedule stepped once per update) and a partial window of two left buffered, as torch
    leaves them in ``.grad``. Bug: ``trainer.step_scheduler`` stepped StepLR on every
    micro-batch (the learning rate fell 3x faster than torch's). The scale itself is not
    compared: with an Accumulate it counts micro-batches (Keras' convention, above)."""
    data = dyadic_batches(8, seed=1)
    want, want_lr, tps, scaler = torch_accumulation_loop(data, 3, 0.25, 1.5)
    sgd = SGD(learning_rate=0.25, momentum=0.5, clip_norm=1.5)
    acc = Accumulate(sgd, 3)
    sched = StepLR(acc, step_size=1, gamma=0.5)
    trainer = MixedPrecisionTrainer(linear(backend), acc, p0(backend),
                                    loss_scale=64.0, growth_interval=3)
    for (x, c, _), w, lr in zip(data, want, want_lr, strict=True):
        trainer.forward({"input": backend.array(x)})
        assert trainer.backward_and_update({"out": backend.array(c)})[2]
        trainer.step_scheduler(sched)
        assert sgd.get_learning_rate() == lr
        got = host(backend, trainer.master_params)
        for n in SHAPES:
            np.testing.assert_allclose(got[n], w[n], rtol=1e-6, atol=1e-7, err_msg=n)
    state = trainer.optimizer_state
    assert (state.micro_step, state.inner.step, sched.last_step) == (2, 2, 2)
    # the partial window: torch's .grad holds scale·Σg/k, the Accumulate holds Σg
    partial = host(backend, state.accumulator.sum())
    for n, p in tps.items():
        np.testing.assert_allclose(partial[n] / 3, p.grad.numpy() / scaler.get_scale(),
                                   rtol=1e-6, err_msg=n)


# -- real float16 overflows: the scale trajectory against GradScaler + autocast --------------
def autocast_loss(ps, x, c):
    """The torch peers' loss: the linear map under float16 autocast, weighted by ``c`` and
    summed in float32 (``ps``: the parameters by name)."""
    with torch.autocast("cpu", dtype=torch.float16):
        out = torch.nn.functional.linear(torch.from_numpy(x), ps["linear.weight"],
                                         ps["linear.bias"])
    return (out.float() * torch.from_numpy(c)).sum()


def overflowing_batches(n: int, seed: int = 2):
    """Dyadic batches of varied magnitude (some overflow float16 at 2**14, some only at
    2**18) and one NaN input (step 7) and one inf input (step 23). Two rows: a float16 sum
    of two is what a float32 sum rounds to, so no backend overflows in a partial sum (NumPy
    and JAX sum float16 in float16, torch in float32)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.integers(-2, 3, (2, 3)).astype(np.float32) / 2
        c = rng.integers(-4, 5, (2, 2)).astype(np.float32) / 4 * 2.0 ** rng.integers(-3, 2)
        if i in (7, 23):
            x[1, 2] = np.nan if i == 7 else np.inf
        out.append((x, c))
    return out


def torch_autocast_run(batches, lr: float):
    """torch's AMP recipe on CPU: float32 parameters, the Linear under float16 autocast,
    ``GradScaler`` (growth_interval 3); the loss ``Σ out·c`` has dL/dout = c. Returns per
    step the scale, the growth tracker, whether the step was skipped, and the parameters."""
    ps = {n: torch.nn.Parameter(torch.full(s, 0.5)) for n, s in SHAPES.items()}
    opt = torch.optim.SGD(list(ps.values()), lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    rows = []
    for x, c in batches:
        opt.zero_grad()
        scaler.scale(autocast_loss(ps, x, c)).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        skipped = bool(sum(v.item() for v in scaler._found_inf_per_device(opt).values()))
        scaler.update()
        sd = scaler.state_dict()
        rows.append((scaler.get_scale(), sd["_growth_tracker"], skipped, before,
                     {n: p.detach().numpy().copy() for n, p in ps.items()}))
    return rows


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_scale_trajectory_and_skips_match_gradscaler_with_a_restart(kind):
    """40 steps where float16 really overflows (and a NaN and an inf input): after every
    step the scale, the growth tracker (reset on overflow), which steps were skipped and
    the masters equal torch's AMP run; the trainer is saved after step 20 and a new one
    (new optimizer, state and scaler from the state dicts) continues, as if uninterrupted."""
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

    backend = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[kind](
        dtype="float16")
    batches = overflowing_batches(40)
    ref = torch_autocast_run(batches, 0.125)
    compiled = linear(backend)

    def fresh(params):
        return MixedPrecisionTrainer(compiled, SGD(learning_rate=0.125, momentum=0.9), params,
                                     growth_interval=3)

    trainer = fresh(p0(backend))
    for i, ((x, c), (scale, tracker, skipped, used, want)) in enumerate(
            zip(batches, ref, strict=True)):
        if i == 20:  # checkpoint and restart
            saved = (trainer.state_dict(), trainer.optimizer.state_dict(trainer.optimizer_state),
                     host(backend, trainer.master_params))
            trainer = fresh({k: backend.array(v, "float32") for k, v in saved[2].items()})
            trainer.optimizer_state = trainer.optimizer.load_state_dict(saved[1],
                                                                        trainer.master_params)
            trainer.load_state_dict(saved[0])
        assert trainer.loss_scale == used
        trainer.forward({"input": backend.array(x)})
        ok = trainer.backward_and_update({"out": backend.array(c)})[2]
        sd = trainer.state_dict()["scaler"]
        assert (sd["scale"], sd["growth_tracker"], not ok) == (scale, tracker, skipped), i
        got = host(backend, trainer.master_params)
        for n in SHAPES:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=f"{n} {i}")
    skips = [r[2] for r in ref]
    assert skips[7] and skips[23] and 8 <= sum(skips) <= 30  # the run does overflow
    assert trainer.num_skipped_steps == sum(skips) and trainer.num_steps == 40
    assert trainer.optimizer_state.step == 40 - sum(skips)


def test_a_refused_trainer_leaves_the_optimizer_bound_as_it_was():
    """A call that raises changes nothing (conventions of this library; torch's GradScaler
    never touches the optimizer): the trainer re-binds a built-in optimizer to the float32
    twin of the model's backend before converting the state, and a state it cannot carry
    over (made for other parameters) raised with the optimizer left re-bound."""
    from mithril.backends import TorchBackend

    backend = TorchBackend(dtype="float16")
    compiled = linear(backend)
    params = compiled.get_parameters()
    opt = SGD(learning_rate=0.1, momentum=0.9)
    half_state = opt.init(params)
    bound = opt.backend
    w = {"linear.weight": params["linear.weight"]}
    other = opt.update(w, {"linear.weight": torch.ones(2, 3, dtype=torch.float16)},
                       opt.init(w))[1]  # a state that took a step, for other parameters
    with pytest.raises(KeyError, match="linear.bias"):
        MixedPrecisionTrainer(compiled, opt, params, other)
    assert opt.backend is bound and opt.backend.dtype == "float16"
    # and the optimizer still trains the half-precision params as before
    g = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    new, _ = opt.update(params, g, half_state)
    assert new["linear.bias"].dtype == torch.float16


def test_an_accumulate_state_from_half_params_is_carried_over_as_torch_continues():
    """Five micro-batches (two Adam updates and one buffered) run on the float16 params
    themselves, then the trainer takes that state over and three more micro-batches make two
    more updates: equal to torch's Adam continuing from the same moments and step count on
    float32 copies, with the buffered gradient in its first window. Bug: the trainer
    re-initialised an Accumulate's state (a plain optimizer's it carries over): the moments,
    the step count and the buffered micro-batch were silently dropped."""
    from mithril.backends import TorchBackend
    from mithril.utils.optimizers import Adam

    backend = TorchBackend(dtype="float16")
    compiled = linear(backend)
    data = dyadic_batches(8, seed=3)
    acc = Accumulate(Adam(learning_rate=1e-2, epsilon=1e-4), 2)
    params = {k: v.half() for k, v in p0(backend).items()}
    state = acc.init(params)
    for x, c, _ in data[:5]:  # plain half-precision training first
        _, g = compiled.evaluate(params, {"input": backend.array(x)},
                                 output_gradients={"out": backend.array(c)})
        params, state = acc.update(params, g, state)
    assert (state.inner.step, state.micro_step) == (2, 1)
    moments = {s: {k: v.float() for k, v in state.inner.slot(s).items()} for s in ("m", "v")}

    ps = {k: torch.nn.Parameter(v.float()) for k, v in params.items()}
    ref = torch.optim.Adam(list(ps.values()), lr=1e-2, eps=1e-4)
    ref.load_state_dict({"state": {i: {"step": torch.tensor(2.0), "exp_avg": moments["m"][k],
                                       "exp_avg_sq": moments["v"][k]}
                                   for i, k in enumerate(ps)},
                         "param_groups": ref.state_dict()["param_groups"]})

    trainer = MixedPrecisionTrainer(compiled, acc, params, state, loss_scale=1024.0)
    for window in ([data[4], data[5]], [data[6], data[7]]):
        for n, p in ps.items():  # torch: the window's mean gradient, then one step
            p.grad = torch.from_numpy((window[0][2][n] + window[1][2][n]) / 2)
        ref.step()
        for x, c, _ in window[1 if window[0] is data[4] else 0:]:
            trainer.forward({"input": backend.array(x)})
            assert trainer.backward_and_update({"out": backend.array(c)})[2]
        got = host(backend, trainer.master_params)
        for n, p in ps.items():
            np.testing.assert_allclose(got[n], p.detach().numpy(), rtol=1e-6, atol=1e-7,
                                       err_msg=n)
    assert trainer.optimizer_state.inner.step == 4 and trainer.optimizer_state.micro_step == 0
    assert trainer.optimizer_state.inner.layout.dtype == "float32"


@pytest.mark.parametrize("backend", half_backends(), ids=lambda b: f"{b.name}-{b.dtype}")
def test_uneven_micro_batches_weighted_through_the_trainer_equal_torchs_whole_batch(backend):
    """Micro-batches of 3 and 1 rows of a mean-reduced loss, each weighted by its rows
    (``backward_and_update(..., weight=n)``; the trainer could not pass it): the window's
    update is torch's SGD step on the whole batch of 4. Any other optimizer refuses a
    weight, changing nothing."""
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, (4, 3)).astype(np.float32) / 2
    t = rng.integers(-2, 3, (4, 2)).astype(np.float32) / 2
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.fill_(0.5)
        lin.bias.fill_(0.5)
    opt = torch.optim.SGD(lin.parameters(), lr=0.25)
    ((lin(torch.from_numpy(x)) - torch.from_numpy(t)) ** 2).sum(1).mean().backward()
    opt.step()
    want = {"linear.weight": lin.weight.detach().numpy(), "linear.bias": lin.bias.detach().numpy()}

    trainer = MixedPrecisionTrainer(linear(backend), Accumulate(SGD(learning_rate=0.25), 2),
                                    p0(backend), loss_scale=64.0)
    for rows in (slice(0, 3), slice(3, 4)):
        out = trainer.forward({"input": backend.array(x[rows])})
        n = x[rows].shape[0]
        pred = np.asarray(backend.to_numpy(out["out"]), np.float32)
        cot = 2 * (pred - t[rows]) / n  # d mean_rows sum_cols (out - t)^2 / d out
        assert trainer.backward_and_update({"out": backend.array(cot)}, weight=n)[2]
    assert trainer.last_step_applied
    got = host(backend, trainer.master_params)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=5e-3, err_msg=k)

    plain = MixedPrecisionTrainer(linear(backend), SGD(learning_rate=0.25), p0(backend))
    plain.forward({"input": backend.array(x)})
    with pytest.raises(TypeError, match=r"weight=4.*for an Accumulate optimizer, not SGD"):
        plain.backward_and_update({"out": backend.array(np.zeros((4, 2), np.float32))},
                                  weight=4)
    assert host(backend, plain.master_params)["linear.bias"].tolist() == [0.5, 0.5]


def test_buffered_micro_batches_keep_the_half_precision_copies():
    """With an Accumulate, a micro-batch that is only buffered leaves the masters as they
    were: the half-precision copies the forward uses are kept (they were cast anew on every
    micro-batch, k casts per update), and made anew once the window updates."""
    be = half_backends()[0]
    tr = MixedPrecisionTrainer(linear(be), Accumulate(SGD(learning_rate=0.25), 3), p0(be),
                               loss_scale=64.0)
    x, c = be.array(np.ones((4, 3), np.float32)), be.array(np.full((4, 2), 0.25, np.float32))
    seen = []
    for _ in range(4):
        tr.forward({"input": x})
        seen.append(tr.compute_params())
        tr.backward_and_update({"out": c})
    same = [all(a[k] is b[k] for k in a) for a, b in zip(seen, seen[1:])]
    assert same == [True, True, False]  # the third micro-batch updated the masters
