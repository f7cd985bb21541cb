"""Edges of the training utilities side by side with their peers, in float64 where the peer
allows: ``Accumulate`` against ``optax.MultiSteps`` and a plain torch accumulation loop
(checkpoints resumed mid-window into another dtype or backend), the training monitor
against torch's norms."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mithril.backends import NumpyBackend, TorchBackend
from mithril.utils.accumulation import Accumulate
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.monitoring import TrainingMonitor, update_ratios
from mithril.utils.optimizers import Adam, AdamW

K = 3


def _dyadic(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values exact in float16, float32 and float64 (multiples of 1/8 in [-2, 2])."""
    return np.random.default_rng(seed).integers(-16, 17, shape) / 8.0


def _grads(t: int) -> dict[str, np.ndarray]:
    return {"w": _dyadic((3, 2), 100 + t), "b": _dyadic((2,), 200 + t)}


def _start() -> dict[str, np.ndarray]:
    return {"w": _dyadic((3, 2), 1), "b": _dyadic((2,), 2)}


@functools.cache  # (the peers' runs, the same for every parametrization: computed once)
def _multisteps(n: int) -> dict[str, np.ndarray]:
    """optax.MultiSteps(adam) over the first ``n`` micro-batches, in float64."""
    with jax.enable_x64(True):
        tx = optax.MultiSteps(optax.adam(0.01), every_k_schedule=K,
                              accumulator_dtype=jnp.float64)  # (float32 by default)
        params = {k: jnp.asarray(v) for k, v in _start().items()}
        state = tx.init(params)
        for t in range(n):
            upd, state = tx.update({k: jnp.asarray(v) for k, v in _grads(t).items()}, state,
                                   params)
            params = optax.apply_updates(params, upd)
        return {k: np.asarray(v) for k, v in params.items()}


@functools.cache
def _torch_loop(n: int) -> dict[str, np.ndarray]:
    """torch.optim.Adam with ``.grad`` summed over ``K`` micro-batches and divided by ``K``."""
    params = {k: torch.tensor(v, requires_grad=True) for k, v in _start().items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.01)
    for t in range(n):
        for k, p in params.items():
            g = torch.tensor(_grads(t)[k]) / K
            p.grad = g if p.grad is None else p.grad + g
        if (t + 1) % K == 0:
            opt.step()
            opt.zero_grad()
    return {k: p.detach().numpy() for k, p in params.items()}


@pytest.mark.parametrize("saved, loaded", [
    ((NumpyBackend, "float32"), (TorchBackend, "float64")),
    ((TorchBackend, "bfloat16"), (NumpyBackend, "float64")),
    ((TorchBackend, "float64"), (NumpyBackend, "float32")),
])
def test_a_window_resumed_in_another_dtype_takes_the_templates_dtype(saved, loaded, tmp_path):
    # The buffered gradient sums were restored in the saved dtype while the params and the
    # optimizer state took the template's: the next micro-batch was refused (DTypeError:
    # float64 gradients against a float32 buffer). Saved in the first window (the Adam
    # slots still zero) with values exact in every dtype, the resumed float64 run equals
    # optax.MultiSteps and torch's accumulation loop, unbroken, in float64.
    cut, steps = 2, 3 * K
    sb = saved[0](dtype=saved[1])
    acc = Accumulate(Adam(learning_rate=0.01), K)
    p = {k: sb.array(v, saved[1]) for k, v in _start().items()}
    st = acc.init(p)
    for t in range(cut):
        p, st = acc.update(p, {k: sb.array(v, saved[1]) for k, v in _grads(t).items()}, st)
    save_checkpoint(tmp_path / "ck", p, acc, st)

    lb = loaded[0](dtype=loaded[1])
    template = {k: lb.array(v, loaded[1]) for k, v in _start().items()}
    acc2 = Accumulate(Adam(learning_rate=0.01), K)
    got = load_checkpoint(tmp_path / "ck", params_template=template, optimizer=acc2)
    q, st2 = got["params"], got["state"]
    assert {lb.dtype_name(v) for v in st2.accumulator.sum().values()} == {loaded[1]}
    for t in range(cut, steps):
        q, st2 = acc2.update(q, {k: lb.array(v, loaded[1]) for k, v in _grads(t).items()}, st2)
    assert st2.step == steps // K and st2.micro_step == 0
    ours = {k: np.asarray(lb.to_numpy(v), np.float64) for k, v in q.items()}
    optax_p, torch_p = _multisteps(steps), _torch_loop(steps)
    tol = 1e-15 if loaded[1] == "float64" else 1e-6
    for k in ours:
        np.testing.assert_allclose(ours[k], optax_p[k], rtol=tol, atol=tol, err_msg=k)
        np.testing.assert_allclose(ours[k], torch_p[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_update_ratios_of_diverged_parameters_are_nan_as_torchs(kind):
    # A zero-initialised bias that became NaN was reported 0.0 ("did not move"), and so was
    # any parameter NaN before the update: torch's (after - before).norm() / before.norm()
    # is NaN for both. The documented zero-norm conventions (inf if moved, 0 if not) stay.
    before = {"zero_to_nan": np.zeros(2), "nan_before": np.array([np.nan, 1.0]),
              "to_nan": np.array([3.0, 4.0]), "zero_moved": np.zeros(2),
              "zero_still": np.zeros(3), "moved": np.array([3.0, 4.0])}
    after = {"zero_to_nan": np.array([np.nan, 0.0]), "nan_before": np.array([1.0, 1.0]),
             "to_nan": np.array([3.0, np.nan]), "zero_moved": np.array([0.0, 1.0]),
             "zero_still": np.zeros(3), "moved": np.array([3.0, 4.5])}
    conv = {"numpy": np.asarray, "torch": torch.tensor,
            "jax": lambda v: jnp.asarray(v, jnp.float32)}[kind]
    ours = update_ratios({k: conv(v) for k, v in before.items()},
                         {k: conv(v) for k, v in after.items()})
    for k in before:
        b, a = torch.tensor(before[k]), torch.tensor(after[k])
        peer = float((a - b).norm() / b.norm())
        if float(b.norm()) == 0 and not math.isnan(float((a - b).norm())):
            peer = math.inf if float((a - b).norm()) > 0 else 0.0  # (documented)
        if math.isnan(peer):
            assert math.isnan(ours[k]), (k, ours[k])
        else:
            assert ours[k] == pytest.approx(peer, rel=1e-7), k
    monitor = TrainingMonitor()
    monitor.before_update({k: conv(v) for k, v in before.items()})
    rec = monitor.after_update({k: conv(v) for k, v in after.items()})
    assert [k for k, r in rec["update_ratios"].items() if math.isnan(r)] == [
        "zero_to_nan", "nan_before", "to_nan"]


def test_a_scheduled_window_with_an_ema_matches_multisteps_and_torch():
    # every_k_schedule as a callable of the count of windows applied (optax's
    # gradient_step) is acc.k set from state.step before each call; the step count and the
    # EMA move once per window (torch's AveragedModel updated after each opt.step()), the
    # learning rate from a schedule of the windows applied, weight decay masked by name.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def every_k(s):
        return 2 if s < 2 else 3

    def lr(s):
        return 0.05 / (1 + s)

    rng = np.random.default_rng(3)
    p0 = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    # 8 micro-batches: two windows of 2, one of 3 and one begun (the schedule's switch, the
    # EMA and the learning rate moved at each window; 14 showed nothing more)
    gs = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(8)]
    opt = AdamW(learning_rate=lr(0), weight_decay=0.1, exclude_weight_decay=("b",),
                ema_decay=0.9)
    acc = Accumulate(opt, 1)
    p = {k: v.copy() for k, v in p0.items()}
    st = acc.init(p)
    steps_seen = []
    for g in gs:
        acc.k = every_k(st.step)
        acc.set_learning_rate(lr(st.step))
        p, st = acc.update(p, {k: v.copy() for k, v in g.items()}, st)
        steps_seen.append(st.step)
    ema = opt.ema_params(st.inner)

    with jax.enable_x64(True):
        tx = optax.MultiSteps(
            optax.adamw(lambda c: 0.05 / (1 + c), weight_decay=0.1,
                        mask={"w": True, "b": False}),
            every_k_schedule=lambda s: jnp.where(s < 2, 2, 3), accumulator_dtype=jnp.float64)
        q = {k: jnp.asarray(v) for k, v in p0.items()}
        ostate = tx.init(q)
        optax_steps = []
        for g in gs:
            upd, ostate = tx.update({k: jnp.asarray(v) for k, v in g.items()}, ostate, q)
            q = optax.apply_updates(q, upd)
            optax_steps.append(int(ostate.gradient_step))
    assert steps_seen == optax_steps == [0, 1, 1, 2, 2, 2, 3, 3]
    assert st.micro_step == int(ostate.mini_step) == 1

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    holder = torch.nn.ParameterList(list(tp.values()))
    topt = torch.optim.AdamW([{"params": [tp["w"]], "weight_decay": 0.1},
                              {"params": [tp["b"]], "weight_decay": 0.0}], lr=lr(0))
    avg = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    done, buffered = 0, 0
    for g in gs:
        k = every_k(done)
        for name, t in tp.items():
            gt = torch.tensor(g[name])
            t.grad = gt if t.grad is None else t.grad + gt
        buffered += 1
        if buffered == k:
            for group in topt.param_groups:
                group["lr"] = lr(done)
            for t in tp.values():
                t.grad /= k
            topt.step()
            topt.zero_grad()
            avg.update_parameters(holder)
            done, buffered = done + 1, 0
    for i, name in enumerate(tp):
        np.testing.assert_allclose(p[name], np.asarray(q[name]), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(p[name], tp[name].detach().numpy(), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(np.asarray(ema[name]), avg.module[i].detach().numpy(),
                                   rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_float64_trainer_with_an_odd_scale_equals_gradscaler(kind):
    # A float64 model under MixedPrecisionTrainer rounded its loss gradients to float32
    # before scaling them (1e-8 relative off GradScaler, which scales in the outputs'
    # dtype), and the torch engine unscaled by the float64 1/scale where GradScaler uses
    # its float32 inv_scale (off by 1e-7 at init_scale=1000). Scales 1000 -> 3000 -> ...,
    # an inf loss gradient skipped (backoff 0.3), SGD with momentum: float64 all along.
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.mixed_precision import MixedPrecisionTrainer
    from mithril.utils.optimizers import SGD

    rng = np.random.default_rng(7)
    w0, b0 = rng.standard_normal((2, 3)), rng.standard_normal(2)
    xs = [rng.standard_normal((4, 3)) for _ in range(7)]
    cs = [rng.standard_normal((4, 2)) for _ in range(7)]
    cs[3][1, 0] = np.inf
    kw = {"init_scale": 1000.0, "growth_factor": 3.0, "backoff_factor": 0.3,
          "growth_interval": 2}

    lin = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w0))
        lin.bias.copy_(torch.tensor(b0))
    topt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **kw)
    ref = []
    for x, c in zip(xs, cs, strict=True):
        topt.zero_grad()
        scaler.scale((lin(torch.tensor(x)) * torch.tensor(c)).sum()).backward()
        scaler.unscale_(topt)
        grad = lin.weight.grad.numpy().copy()
        scaler.step(topt)
        scaler.update()
        ref.append((scaler.get_scale(), grad, lin.weight.detach().numpy().copy(),
                    lin.bias.detach().numpy().copy()))

    be = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[kind](
        dtype="float64")
    model = ml.Model()
    model |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    compiled = ml.compile(model, be, shapes={"input": [None, 3]})
    trainer = MixedPrecisionTrainer(
        compiled, SGD(learning_rate=0.1, momentum=0.9),
        {"linear.weight": be.array(w0), "linear.bias": be.array(b0)},
        loss_scale=kw["init_scale"], growth_factor=kw["growth_factor"],
        backoff_factor=kw["backoff_factor"], growth_interval=kw["growth_interval"])
    assert trainer.master_dtype == "float64"
    for i, (x, c) in enumerate(zip(xs, cs, strict=True)):
        trainer.forward({"input": be.array(x)})
        ok = trainer.backward_and_update({"out": be.array(c)})[2]
        scale, grad, w, b = ref[i]
        assert ok == (i != 3) and trainer.loss_scale == scale, i
        got = np.asarray(be.to_numpy(trainer.last_gradients["linear.weight"]))
        if ok:
            np.testing.assert_allclose(got, grad, rtol=1e-14, atol=1e-14, err_msg=str(i))
        masters = {k: np.asarray(be.to_numpy(v)) for k, v in trainer.master_params.items()}
        np.testing.assert_allclose(masters["linear.weight"], w, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(masters["linear.bias"], b, rtol=1e-14, atol=1e-14)
    assert trainer.optimizer_state.step == 6 and trainer.num_skipped_steps == 1


def _torch_accumulated_adamw(p0, batches, k, steps_lr):
    """torch.optim.AdamW (biases: half the rate, no decay) over ``k``-micro-batch windows
    of a two-layer net with F.cross_entropy, clip_grad_norm_(1.0) on the window's mean."""
    import torch.nn.functional as F

    ps = {n: torch.tensor(v, requires_grad=True) for n, v in p0.items()}
    weights = [ps[n] for n in ps if n.endswith("weight")]
    biases = [ps[n] for n in ps if n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.1, "lr": steps_lr},
                             {"params": biases, "weight_decay": 0.0, "lr": steps_lr * 0.5}],
                            lr=steps_lr)
    losses, norms = [], []
    for i, (x, y) in enumerate(batches):
        h = torch.tensor(x) @ ps["linear_0.weight"].T + ps["linear_0.bias"]
        logits = h @ ps["linear_1.weight"].T + ps["linear_1.bias"]
        loss = F.cross_entropy(logits, torch.tensor(y))
        (loss / k).backward()
        losses.append(float(loss.detach()))
        if (i + 1) % k == 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(ps.values()), 1.0)))
            opt.step()
            opt.zero_grad()
    return {n: p.detach().numpy() for n, p in ps.items()}, losses, norms


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_train_step_with_accumulate_groups_clip_and_mask_equals_torch(kind):
    # make_train_step over Accumulate(AdamW with a bias group: half the rate, no decay;
    # clip_norm) equals the separate evaluate + update bit for bit, and a torch loop of
    # (loss / k).backward(), clip_grad_norm_ and AdamW param groups in float64; its
    # last_grad_norm (None on every call before) is clip_grad_norm_'s once a window steps.
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.training import make_train_step

    be = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[kind](
        dtype="float64")
    model = ml.Model()
    model |= ml.Linear(4)(input="input", output="h")
    model |= ml.Linear(3)(input="h", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    compiled = ml.compile(model, be, shapes={"input": [None, 5]})
    rng = np.random.default_rng(11)
    p0 = {n: rng.standard_normal(tuple(s)) for n, s in compiled.program.param_shapes.items()}
    batches = [(rng.standard_normal((6, 5)), rng.integers(0, 3, 6)) for _ in range(8)]

    def make():
        return Accumulate(AdamW(
            learning_rate=0.05, weight_decay=0.1, clip_norm=1.0,
            param_groups=[{"params": lambda n: n.endswith("bias"), "weight_decay": 0.0,
                           "lr_scale": 0.5}]), 2)

    def data(x, y):
        return {"input": be.array(x), "target": be.array(y, be.int_dtype)}

    acc = make()
    step = make_train_step(compiled, acc, loss="loss")
    params = {n: be.array(v) for n, v in p0.items()}
    state = step.init(params)
    losses, norms = [], []
    for x, y in batches:
        params, state, out = step(params, state, data(x, y))
        losses.append(float(be.to_numpy(out["loss"])))
        # (None was all an Accumulate's step gave: the window's norm after it stepped)
        assert (step.last_grad_norm is None) != state.applied
        if state.applied:
            norms.append(float(step.last_grad_norm))
    assert state.step == 4 and state.micro_step == 0

    acc2 = make()
    sep = {n: be.array(v) for n, v in p0.items()}
    st2 = acc2.init(sep)
    for x, y in batches:
        _, grads = compiled.evaluate(sep, data(x, y), output_gradients={"loss": 1.0})
        sep, st2 = acc2.update(sep, grads, st2)
    ref, ref_losses, ref_norms = _torch_accumulated_adamw(p0, batches, 2, 0.05)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-13)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-13)
    for n in p0:
        got = np.asarray(be.to_numpy(params[n]))
        np.testing.assert_array_equal(got, np.asarray(be.to_numpy(sep[n])), err_msg=n)
        np.testing.assert_allclose(got, ref[n], rtol=1e-12, atol=1e-14, err_msg=n)


def _skip_data() -> tuple:
    """The start and the 9 micro-batches (two of them non-finite) of the test below."""
    rng = np.random.default_rng(5)
    w0, b0 = rng.standard_normal((2, 3)), rng.standard_normal(2)
    xs = [rng.standard_normal((4, 3)) for _ in range(9)]
    cs = [rng.standard_normal((4, 2)) for _ in range(9)]
    cs[2][0, 1], cs[5][3, 0] = np.nan, np.inf
    return w0, b0, xs, cs


@functools.cache
def _multisteps_skipping() -> list[tuple]:
    """optax.MultiSteps(adam, should_skip_update_fn=skip_not_finite) over ``_skip_data``'s
    micro-batches in float64: per micro-batch (w, b, mini_step, gradient_step, the skips so
    far)."""
    w0, b0, xs, cs = _skip_data()
    out = []
    with jax.enable_x64(True):
        tx = optax.MultiSteps(optax.adam(0.05), every_k_schedule=2,
                              should_skip_update_fn=optax.skip_not_finite,
                              accumulator_dtype=jnp.float64)
        q = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
        ostate, optax_skips = tx.init(q), 0
        for x, c in zip(xs, cs, strict=True):
            g = {"w": jnp.asarray(c.T @ x), "b": jnp.asarray(c.sum(0))}
            upd, ostate = tx.update(g, ostate, q)
            q = optax.apply_updates(q, upd)
            optax_skips += bool(ostate.skip_state["should_skip"])  # (num_not_finite: elements)
            out.append((np.asarray(q["w"]), np.asarray(q["b"]), int(ostate.mini_step),
                        int(ostate.gradient_step), optax_skips))
    return out


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_a_nonfinite_micro_batch_is_dropped_as_multisteps_skip_not_finite(kind):
    # MixedPrecisionTrainer over Accumulate drops an overflowing micro-batch (not buffered,
    # the window waits for k finite ones): optax.MultiSteps(..., should_skip_update_fn=
    # skip_not_finite). Float64 model, fixed scale: the same params, window counts and
    # skip counts step by step.
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.mixed_precision import MixedPrecisionTrainer

    w0, b0, xs, cs = _skip_data()
    be = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[kind](
        dtype="float64")
    model = ml.Model()
    model |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    compiled = ml.compile(model, be, shapes={"input": [None, 3]})
    trainer = MixedPrecisionTrainer(
        compiled, Accumulate(Adam(learning_rate=0.05), 2),
        {"linear.weight": be.array(w0), "linear.bias": be.array(b0)}, loss_scale=4.0,
        dynamic_loss_scaling=False)

    with jax.enable_x64(True):
        for i, (x, c, peer) in enumerate(zip(xs, cs, _multisteps_skipping(), strict=True)):
            qw, qb, mini_step, gradient_step, optax_skips = peer
            trainer.forward({"input": be.array(x)})
            ok = trainer.backward_and_update({"out": be.array(c)})[2]
            st = trainer.optimizer_state
            assert ok == (i not in (2, 5)), i
            assert (st.micro_step, st.step) == (mini_step, gradient_step), i
            assert trainer.num_skipped_steps == optax_skips, i
            m = {k: np.asarray(be.to_numpy(v)) for k, v in trainer.master_params.items()}
            np.testing.assert_allclose(m["linear.weight"], qw, rtol=1e-13, atol=1e-15,
                                       err_msg=str(i))
            np.testing.assert_allclose(m["linear.bias"], qb, rtol=1e-13, atol=1e-15,
                                       err_msg=str(i))
    assert st.step == 3 and st.micro_step == 1


def _finite_data() -> tuple:
    """The start and the 6 batches (two of them non-finite) of the test below."""
    rng = np.random.default_rng(9)
    w0, b0 = rng.standard_normal((2, 3)), rng.standard_normal(2)
    xs = [rng.standard_normal((4, 3)) for _ in range(6)]
    ys = [rng.standard_normal((4, 2)) for _ in range(6)]
    xs[1][2, 0], xs[4][0, 1] = np.nan, np.inf
    return w0, b0, xs, ys


@functools.cache
def _apply_if_finite() -> tuple:
    """optax.apply_if_finite(optax.adam) over ``_finite_data``'s batches in float64: the
    final w, b, the inner count, the non-finite count and the first moment of w."""
    w0, b0, xs, ys = _finite_data()

    def loss(p, x, y):
        return jnp.mean((x @ p["w"].T + p["b"] - y) ** 2)

    with jax.enable_x64(True):
        tx = optax.apply_if_finite(optax.adam(0.05), max_consecutive_errors=10)
        q = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
        ostate = tx.init(q)
        for x, y in zip(xs, ys, strict=True):
            g = jax.grad(loss)(q, jnp.asarray(x), jnp.asarray(y))
            upd, ostate = tx.update(g, ostate, q)
            q = optax.apply_updates(q, upd)
        return (np.asarray(q["w"]), np.asarray(q["b"]), int(ostate.inner_state[0].count),
                int(ostate.total_notfinite), np.asarray(ostate.inner_state[0].mu["w"]))


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_a_skipped_train_step_is_optax_apply_if_finite(kind):
    # make_train_step with Adam(nonfinite="skip") (the one-program step on JAX): a batch
    # with a NaN leaves params, moments and the step count untouched and is counted,
    # as optax.apply_if_finite(optax.adam) does; float64 side by side.
    import warnings

    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.training import make_train_step

    be = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[kind](
        dtype="float64")
    model = ml.Model()
    model |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    model |= ml.SquaredError()(input="out", target="target", output="se")
    model |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    compiled = ml.compile(model, be, shapes={"input": [None, 3], "target": [None, 2]})
    w0, b0, xs, ys = _finite_data()
    step = make_train_step(compiled, Adam(learning_rate=0.05, nonfinite="skip"), loss="loss")
    params = {"linear.weight": be.array(w0), "linear.bias": be.array(b0)}
    state = step.init(params)
    qw, qb, count, notfinite, mu_w = _apply_if_finite()
    with jax.enable_x64(True):
        for x, y in zip(xs, ys, strict=True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                params, state, _ = step(params, state, {"input": be.array(x),
                                                        "target": be.array(y)})
    st = step.to_optimizer_state(state, params)
    assert (st.step, st.num_skipped) == (count, notfinite) == (4, 2)
    np.testing.assert_allclose(np.asarray(be.to_numpy(params["linear.weight"])), qw,
                               rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(np.asarray(be.to_numpy(params["linear.bias"])), qb,
                               rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(np.asarray(be.to_numpy(st.slot("m")["linear.weight"])), mu_w,
                               rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_half_precision_windows_accumulate_in_float32_as_multisteps(kind, tmp_path):
    # Four float16 micro-batches of gradients ~3e4: their float16 sum overflowed (inf, the
    # window's step NaN) where their mean, optax.MultiSteps' float32 accumulator and
    # torch's (loss / k).backward() loop are finite. The buffers are float32 now: the
    # window's mean equals MultiSteps' bit for bit; a window saved mid-way resumes
    # exactly, its float32 sums kept.
    from mithril.backends import JaxBackend
    from mithril.utils.accumulation import GradientAccumulator
    from mithril.utils.optimizers import SGD

    be = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[kind](
        dtype="float16")
    rng = np.random.default_rng(4)
    gs = [(3e4 + 2e3 * rng.standard_normal((3, 2))).astype(np.float16) for _ in range(8)]
    acc = GradientAccumulator()
    for g in gs[:4]:
        acc.add({"w": be.array(g, "float16")})
    mean = acc.mean()["w"]
    assert be.dtype_name(mean) == "float16"
    tx = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=4)
    q = jnp.zeros((3, 2), jnp.float16)
    ostate = tx.init(q)
    for g in gs[:4]:
        upd, ostate = tx.update(jnp.asarray(g), ostate, q)
    np.testing.assert_array_equal(np.asarray(be.to_numpy(mean)), -np.asarray(upd))
    assert np.isfinite(np.asarray(be.to_numpy(mean), np.float64)).all()
    tw = torch.zeros(3, 2, dtype=torch.float16, requires_grad=True)
    for g in gs[:4]:
        ((tw * torch.tensor(g)).sum() / 4).backward()
    np.testing.assert_allclose(np.asarray(be.to_numpy(mean), np.float64),
                               tw.grad.double().numpy(), rtol=2e-3)  # (float16 rounding)

    def run(acc, p, st, t0, t1):
        for g in gs[t0:t1]:
            p, st = acc.update(p, {"w": be.array(g, "float16")}, st)
        return p, st

    def make():
        return Accumulate(SGD(learning_rate=2.0**-16), 4)

    a1 = make()
    p0 = {"w": be.array(np.ones((3, 2)), "float16")}
    full, _ = run(a1, p0, a1.init(p0), 0, 8)
    a2 = make()
    part, st = run(a2, {"w": be.array(np.ones((3, 2)), "float16")},
                   a2.init({"w": be.array(np.ones((3, 2)), "float16")}), 0, 6)
    save_checkpoint(tmp_path / "ck", part, a2, st)
    a3 = make()
    got = load_checkpoint(tmp_path / "ck", params_template=part, optimizer=a3)
    resumed, st3 = run(a3, got["params"], got["state"], 6, 8)
    assert st3.step == 2 and be.dtype_name(resumed["w"]) == "float16"
    np.testing.assert_array_equal(np.asarray(be.to_numpy(resumed["w"])),
                                  np.asarray(be.to_numpy(full["w"])))
    assert np.isfinite(np.asarray(be.to_numpy(full["w"]), np.float64)).all()
