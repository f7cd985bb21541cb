"""Mixed precision with real losses (session 66): half-precision statistics that torch's
``torch.autocast`` runs in float32 (``cosine_embedding_loss`` is on its float32 list) must not
overflow or round away on the NumPy and JAX backends, and ``MixedPrecisionTrainer`` steps
on them as torch's AMP recipe does."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils.mixed_precision import MixedPrecisionTrainer
from mithril.utils.optimizers import SGD

HALF = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
BACKENDS = {"numpy": NumpyBackend, "jax": JaxBackend, "torch": TorchBackend}


def _evaluate(block, backend, ins, data, cot=1.0):
    """The block's output and its inputs' gradients (for the output gradient ``cot``) as
    float64 arrays."""
    model = ml.Model()
    model |= block(**{k: k for k in (*ins, *data)}, output=ml.IOKey("out"))
    shapes = {k: list(np.shape(v)) for k, v in {**ins, **data}.items()}
    compiled = ml.compile(model, backend, shapes=shapes, trainable_keys=set(ins))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, grads = compiled.evaluate({k: backend.array(v) for k, v in ins.items()},
                                       {k: backend.array(v) for k, v in data.items()},
                                       output_gradients={"out": backend.array(
                                           np.float64(cot))})
    f64 = lambda a: np.asarray(backend.to_numpy(a)).astype(np.float64)  # noqa: E731
    return f64(out["out"]), {k: f64(grads[k]) for k in ins}


# -- CosineEmbeddingLoss: |a|² over 1024 features of size 10 is ~1e5 > 65504 ----------------
@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_float16_cosine_embedding_loss_sums_squares_in_float32(kind):
    """torch.autocast computes ``cosine_embedding_loss`` in float32; in float16 itself |a|²
    overflowed: NumPy gave the loss 1 (cos = 0) with zero gradients, JAX NaN gradients
    (every MixedPrecisionTrainer step skipped). Now the float64 truth within float16's
    rounding."""
    rng = np.random.default_rng(0)
    ins = {k: (10 * rng.standard_normal((4, 1024))).astype(np.float16).astype(np.float64)
           for k in ("input1", "input2")}
    data = {"target": np.array([1.0, -1.0, 1.0, -1.0])}
    got, grads = _evaluate(lambda **kw: ml.CosineEmbeddingLoss(reduction="sum")(**kw),
                           BACKENDS[kind](dtype="float16"), ins, data)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    want = F.cosine_embedding_loss(t["input1"], t["input2"], torch.tensor(data["target"]),
                                   reduction="sum")
    want.backward()
    assert abs(got - want.item()) < 2e-3 * abs(want.item())  # (1.04 + 0.97 + 0 + 0)
    for k in ins:
        ref = t[k].grad.numpy()
        assert np.isfinite(grads[k]).all()
        assert np.abs(grads[k] - ref).max() < 2e-2 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["numpy", "jax", "torch"])
def test_trainer_steps_a_float16_cosine_embedding_model_as_torch_autocast(kind):
    """A float16 Linear embedding trained with CosineEmbeddingLoss: one SGD step of the
    MixedPrecisionTrainer moves the float32 masters as torch's autocast + GradScaler step
    (the loss in float32) does, to float16 rounding. Before, the NumPy step applied zero
    gradients and the JAX and torch steps were skipped (NaN gradients; torch's float16
    kernel overflowed |e|²)."""
    rng = np.random.default_rng(1)
    x1, x2 = ((10 * rng.standard_normal((4, 1024))).astype(np.float16) for _ in range(2))
    w = (rng.standard_normal((1024, 1024)) / 32).astype(np.float16).astype(np.float32)
    target = np.array([1.0, -1.0, 1.0, -1.0])
    model = ml.Model()
    model |= ml.Linear(1024, use_bias=False)(input="x1", output="e1")
    model |= ml.Linear(1024, use_bias=False)(input="x2", output="e2")
    model |= ml.CosineEmbeddingLoss()(input1="e1", input2="e2", target="target",
                                      output=ml.IOKey("loss"))
    backend = BACKENDS[kind](dtype="float16")
    compiled = ml.compile(model, backend, shapes={"x1": [4, 1024], "x2": [4, 1024]})
    names = sorted(compiled.get_parameters())
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=10.0),
                                    dict.fromkeys(names, w), loss_scale=2.0**8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.forward({"x1": backend.array(x1), "x2": backend.array(x2),
                         "target": backend.array(target)})
        masters, _, ok = trainer.backward_and_update({"loss": 1.0})
    # torch: float32 weights, the Linears in float16 under autocast, the loss in float32
    ws = [torch.tensor(w, requires_grad=True) for _ in names]
    opt = torch.optim.SGD(ws, lr=10.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with torch.autocast("cpu", dtype=torch.float16):
        e1 = torch.tensor(x1) @ ws[0].T
        e2 = torch.tensor(x2) @ ws[1].T
        loss = F.cosine_embedding_loss(e1, e2, torch.tensor(target, dtype=torch.float16))
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert ok and scaler.get_scale() == trainer.loss_scale == 2.0**8
    for name, want in zip(names, ws, strict=True):
        got = np.asarray(backend.to_numpy(masters[name]), np.float64)
        moved = want.detach().numpy().astype(np.float64) - w
        assert np.abs(moved).max() > 1e-4  # (the step is not nothing)
        assert np.abs((got - w) - moved).max() < 3e-2 * np.abs(moved).max()


@pytest.mark.parametrize("kind", ["numpy", "jax"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_multilabel_soft_margin_loss_sums_classes_in_float32(kind, dtype):
    """The per-row sum over 1000 classes was taken in the half dtype on NumPy: in bfloat16
    it stagnated (spacing 8 above 1024) at a loss of 1.148 against the truth 1.396 (torch's
    bfloat16 kernel: 1.391). Now within one rounding of the truth on both backends, and the
    gradients w·(σ(x) − y)/C within a few half ulps (torch's bfloat16: 0.4% of the largest),
    for the loss gradient 1024 (a loss scale: 1 would leave them float16 subnormals)."""
    rng = np.random.default_rng(0)
    ins = {"input": (3 * rng.standard_normal((64, 1000))).astype(HALF[dtype]).astype(np.float64)}
    data = {"target": (rng.random((64, 1000)) > 0.5).astype(np.float64)}
    got, grads = _evaluate(lambda **kw: ml.MultiLabelSoftMarginLoss()(**kw),
                           BACKENDS[kind](dtype=dtype), ins, data, cot=1024.0)
    x = torch.tensor(ins["input"], requires_grad=True)
    want = F.multilabel_soft_margin_loss(x, torch.tensor(data["target"]))
    (1024 * want).backward()
    eps = float(ml_dtypes.finfo(HALF[dtype]).eps)
    assert abs(got - want.item()) <= eps * abs(want.item())
    ref = x.grad.numpy()
    assert np.abs(grads["input"] - ref).max() < 2 * eps * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["numpy", "jax"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("weighted", [False, True])
def test_half_multi_margin_loss_in_float32(kind, dtype, weighted):
    """MultiMarginLoss (on torch.autocast's float32 list; torch has no half CPU kernel): the
    sum over 1000 classes in bfloat16 on NumPy was 40 bfloat16 eps off the truth, the JAX
    float16 gradient 6 eps of its largest entry. Now one rounding of the float64 truth."""
    rng = np.random.default_rng(2)
    ins = {"input": (3 * rng.standard_normal((64, 1000))).astype(HALF[dtype]).astype(np.float64)}
    data = {"target": rng.integers(0, 1000, 64)}
    w = rng.random(1000) + 0.5 if weighted else None
    got, grads = _evaluate(lambda **kw: ml.MultiMarginLoss(weight=w)(**kw),
                           BACKENDS[kind](dtype=dtype), ins, data, cot=1024.0)
    x = torch.tensor(ins["input"], requires_grad=True)
    want = F.multi_margin_loss(x, torch.tensor(data["target"]),
                               weight=None if w is None else torch.tensor(w))
    (1024 * want).backward()
    eps = float(ml_dtypes.finfo(HALF[dtype]).eps)
    assert abs(got - want.item()) <= eps * abs(want.item())
    ref = x.grad.numpy()
    assert np.abs(grads["input"] - ref).max() < 2 * eps * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["numpy", "jax"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_multilabel_margin_loss_in_float32(kind, dtype):
    """MultiLabelMarginLoss in bfloat16 on NumPy: its VJP's einsum raised ``TypeError:
    invalid data type for einsum`` (NumPy has no bfloat16 einsum). Now the float64 truth
    to one rounding (torch.autocast runs it in float32; torch has no half CPU kernel)."""
    rng = np.random.default_rng(3)
    ins = {"input": (3 * rng.standard_normal((8, 50))).astype(HALF[dtype]).astype(np.float64)}
    target = np.full((8, 50), -1)
    target[:, :20] = rng.integers(0, 50, (8, 20))
    got, grads = _evaluate(lambda **kw: ml.MultiLabelMarginLoss()(**kw),
                           BACKENDS[kind](dtype=dtype), ins, {"target": target}, cot=1024.0)
    x = torch.tensor(ins["input"], requires_grad=True)
    want = F.multilabel_margin_loss(x, torch.tensor(target))
    (1024 * want).backward()
    eps = float(ml_dtypes.finfo(HALF[dtype]).eps)
    assert abs(got - want.item()) <= eps * abs(want.item())
    ref = x.grad.numpy()
    assert np.abs(grads["input"] - ref).max() < 2 * eps * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["numpy", "jax"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_bilinear_contracts_in_float32(kind, dtype):
    """Bilinear in bfloat16 on NumPy raised ``TypeError: invalid data type for einsum`` in
    its forward (NumPy has no bfloat16 einsum): a bfloat16 model with a Bilinear layer could
    not run. Now its output and all four gradients are the float64 truth to the half
    dtype's rounding, as torch's ``F.bilinear`` in that dtype (which accumulates in float32)."""
    rng = np.random.default_rng(4)
    h = HALF[dtype]
    ins = {"input1": rng.standard_normal((6, 16)), "input2": rng.standard_normal((6, 24)),
           "weight": rng.standard_normal((8, 16, 24)) / 4, "bias": rng.standard_normal(8)}
    ins = {k: v.astype(h).astype(np.float64) for k, v in ins.items()}
    model = ml.Model()
    model |= ml.Bilinear(16, 24, 8)(input1="input1", input2="input2", weight="weight",
                                    bias="bias", output=ml.IOKey("out"))
    backend = BACKENDS[kind](dtype=dtype)
    compiled = ml.compile(model, backend, shapes={"input1": [6, 16], "input2": [6, 24]},
                          trainable_keys={"input1", "input2"})
    cot = rng.standard_normal((6, 8)).astype(h).astype(np.float64)
    out, grads = compiled.evaluate({k: backend.array(v) for k, v in ins.items()},
                                   output_gradients={"out": backend.array(cot)})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    want = F.bilinear(t["input1"], t["input2"], t["weight"], t["bias"])
    want.backward(torch.tensor(cot))
    eps = float(ml_dtypes.finfo(h).eps)
    got = np.asarray(backend.to_numpy(out["out"])).astype(np.float64)
    assert np.abs(got - want.detach().numpy()).max() < 2 * eps * np.abs(want.detach().numpy()).max()
    for k in ins:
        g, ref = np.asarray(backend.to_numpy(grads[k])).astype(np.float64), t[k].grad.numpy()
        assert np.abs(g - ref).max() < 2 * eps * np.abs(ref).max(), k


@pytest.mark.parametrize("kind", ["numpy", "jax"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_ctc_loss_recursion_in_float32(kind, dtype):
    """CTCLoss on JAX ran its log-space α/β recursions in the half dtype: a gradient ~15 eps
    of its largest entry off the truth, a float16 loss several eps off. torch.autocast runs
    ``ctc_loss`` in float32 (torch has no half CPU kernel); now both backends are the
    float64 truth (torch's, on the same rounded log-probabilities) to one rounding."""
    rng = np.random.default_rng(5)
    T, N, C, S = 50, 4, 20, 10
    lp = np.log(rng.dirichlet(np.ones(C), (T, N))).astype(HALF[dtype]).astype(np.float64)
    data = {"targets": rng.integers(1, C, (N, S)), "input_lengths": np.array([50, 45, 40, 30]),
            "target_lengths": np.array([10, 8, 10, 5])}
    got, grads = _evaluate(lambda **kw: ml.CTCLoss()(**kw), BACKENDS[kind](dtype=dtype),
                           {"log_probs": lp}, data, cot=1024.0)
    x = torch.tensor(lp, requires_grad=True)
    want = F.ctc_loss(x, *(torch.tensor(v) for v in data.values()))
    (1024 * want).backward()
    eps = float(ml_dtypes.finfo(HALF[dtype]).eps)
    assert abs(got - want.item()) <= eps * abs(want.item())
    ref = x.grad.numpy()
    assert np.abs(grads["log_probs"] - ref).max() < 2 * eps * np.abs(ref).max()


# -- parameters the loss does not reach: torch.optim skips a .grad None ---------------------
def _two_heads(backend):
    model = ml.Model()
    model |= ml.Linear(3)(input="input", output="a")
    model |= ml.Linear(2)(input="input", output=ml.IOKey("b"))
    model |= ml.MeanSquaredError()(input="a", target="target", output=ml.IOKey("loss"))
    return ml.compile(model, backend, shapes={"input": [2, 4]})


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_trainer_leaves_unreached_head_as_torch_amp_adamw(kind):
    """A two-head model whose loss reaches one head: under torch.autocast + GradScaler the
    other head's ``.grad`` is None, so AdamW neither decays it nor starts its step count;
    when a later step reaches it, its bias correction is a first step's. The trainer gave it
    zero gradients instead: its weights decayed by lr·wd·w on the first step (as a
    TrainStep, which leaves them out, does not). Now as torch's: 2 steps, float32 masters."""
    from mithril.utils.optimizers import AdamW

    backend = BACKENDS[kind](dtype="float16")
    compiled = _two_heads(backend)
    rng = np.random.default_rng(7)
    p0 = {"linear_0.weight": rng.standard_normal((3, 4)), "linear_0.bias": rng.standard_normal(3),
          "linear_1.weight": rng.standard_normal((2, 4)), "linear_1.bias": rng.standard_normal(2)}
    p0 = {k: v.astype(np.float16).astype(np.float32) for k, v in p0.items()}
    x = rng.standard_normal((2, 4)).astype(np.float16)
    y = rng.standard_normal((2, 3)).astype(np.float16)
    cot_b = rng.standard_normal((2, 2)).astype(np.float16)
    trainer = MixedPrecisionTrainer(compiled, AdamW(learning_rate=0.1, weight_decay=0.5),
                                    dict(p0), loss_scale=2.0**8)
    data = {"input": backend.array(x), "target": backend.array(y)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.forward(data)
        first, _, ok1 = trainer.backward_and_update({"loss": 1.0})
        first = {k: np.array(backend.to_numpy(v), np.float64) for k, v in first.items()}
        trainer.forward(data)
        second, _, ok2 = trainer.backward_and_update({"loss": 1.0, "b": cot_b})
    # torch: float32 weights, the Linears under autocast in float16, the MSE in float32
    w = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.AdamW(list(w.values()), lr=0.1, weight_decay=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    want = []
    for step in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            xt = torch.tensor(x)
            a = xt @ w["linear_0.weight"].T + w["linear_0.bias"]
            b = xt @ w["linear_1.weight"].T + w["linear_1.bias"]
        loss = ((a.float() - torch.tensor(y).float()) ** 2).mean()
        if step:
            loss = loss + (b.float() * torch.tensor(cot_b).float()).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        want.append({k: v.detach().numpy().astype(np.float64) for k, v in w.items()})
    assert ok1 and ok2
    for k in ("linear_1.weight", "linear_1.bias"):  # unreached: exactly as they were
        np.testing.assert_array_equal(first[k], p0[k])
    for got, ref in ((first, want[0]), ((second), want[1])):
        for k, v in got.items():
            v = np.array(backend.to_numpy(v), np.float64) if not isinstance(v, np.ndarray) else v
            np.testing.assert_allclose(v, ref[k], rtol=0, atol=2e-3, err_msg=k)


@pytest.mark.parametrize("order", [("loss", "both"), ("both", "loss")])
def test_trainer_accumulate_window_mixing_reached_heads_keeps_every_gradient(order):
    """With an Accumulate, one micro-batch's loss may reach a head the window's other does
    not: the window sums every parameter's gradient (zeros where unreached), so the step is
    torch's accumulation loop's (``(loss / 2).backward()`` twice, then AdamW), not a
    KeyMismatchError between the micro-batches' gradient sets."""
    from mithril.utils.accumulation import Accumulate
    from mithril.utils.optimizers import AdamW

    backend = NumpyBackend(dtype="float32")
    compiled = _two_heads(backend)
    p0 = {k: np.array(v) for k, v in compiled.get_parameters().items()}
    trainer = MixedPrecisionTrainer(compiled, Accumulate(AdamW(learning_rate=0.1,
                                                               weight_decay=0.5), 2),
                                    dict(p0), loss_scale=1.0, dynamic_loss_scaling=False)
    x, y, cb = np.ones((2, 4)), np.zeros((2, 3)), np.ones((2, 2))
    for o in order:
        trainer.forward({"input": x, "target": y})
        masters, _, _ = trainer.backward_and_update(
            {"loss": 1.0} if o == "loss" else {"loss": 1.0, "b": cb})
    w = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.AdamW(list(w.values()), lr=0.1, weight_decay=0.5)
    for o in order:
        xt = torch.tensor(x, dtype=torch.float32)
        a = xt @ w["linear_0.weight"].T + w["linear_0.bias"]
        b = xt @ w["linear_1.weight"].T + w["linear_1.bias"]
        loss = ((a - torch.tensor(y, dtype=torch.float32)) ** 2).mean()
        if o == "both":
            loss = loss + (b * torch.tensor(cb, dtype=torch.float32)).sum()
        (loss / 2).backward()
    opt.step()
    for k, v in masters.items():
        np.testing.assert_allclose(v, w[k].detach().numpy(), rtol=0, atol=1e-6, err_msg=k)


def test_trainer_refuses_batch_norm_state_naming_the_way_out():
    """A BatchNorm with running statistics: the trainer's forward has no ``state=``, yet its
    error told to pass ``state=compiled.initial_state_dict to evaluate(..., state=...)``.
    Now it names the state keys and what to compile instead; nothing changes."""
    model = ml.Model()
    model |= ml.BatchNorm1D(5)(input="input", output=ml.IOKey("output"))
    backend = NumpyBackend(dtype="float16")
    compiled = ml.compile(model, backend, shapes={"input": [4, 5]})
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.1),
                                    compiled.get_parameters())
    before = {k: np.array(v) for k, v in trainer.master_params.items()}
    with pytest.raises(ml.KeyMismatchError) as err:
        trainer.forward({"input": np.ones((4, 5))})
    msg = str(err.value)
    assert "batch_norm1_d.running_mean" in msg and "track_running_stats=False" in msg
    assert "evaluate(" not in msg
    with pytest.raises(RuntimeError, match="forward"):  # (no forward was kept)
        trainer.backward_and_update({"output": np.ones((4, 5))})
    for k, v in trainer.master_params.items():
        np.testing.assert_array_equal(v, before[k])
    # without running statistics it trains
    model = ml.Model()
    model |= ml.BatchNorm1D(5, track_running_stats=False)(input="input", output=ml.IOKey("output"))
    compiled = ml.compile(model, backend, shapes={"input": [4, 5]})
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.1),
                                    compiled.get_parameters(), loss_scale=1.0)
    trainer.forward({"input": np.arange(20.0).reshape(4, 5)})
    assert trainer.backward_and_update({"output": np.ones((4, 5))})[2]
