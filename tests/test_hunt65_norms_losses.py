"""Hunt 65 (normalisation layers and losses): edge cases against ``torch.nn.functional`` in
float64, the loss and every gradient, on NumPy, torch and JAX.

* CTCLoss with padded targets of width 0 ((N, 0): every target empty) and an unbatched
  empty target ((0,)): the extended labels have one state, the blank.
* CTCLoss with an empty ``log_probs`` (T = 0 or N = 0): refused naming it on every backend,
  as torch refuses it.
* BatchNorm in training mode on an empty batch (N = 0 or a spatial axis of 0): torch gives
  an empty output, zero weight / bias gradients, leaves the running statistics and counts
  the batch in ``num_batches_tracked`` (so a later ``momentum=None`` average divides by it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml

BACKENDS = {
    "numpy": lambda: ml.NumpyBackend(dtype="float64", seed=0),
    "torch": lambda: ml.TorchBackend(dtype="float64", seed=0),
    "jax": lambda: ml.JaxBackend(dtype="float64", seed=0),
}


def _np(v) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_ctc_loss_targets_of_width_zero(backend, reduction, zero_infinity, batched):
    """Every target empty, as padded (N, 0) targets or one unbatched (0,) target: the loss is
    −Σ_t log_probs[t, blank] over each sequence's steps, as torch's. Ours refused the data
    ("cannot reshape array of size 0 into shape (0)"); past that, the one-state recursion
    broadcast against two-state shifts (NumPy's gradient wrong, JAX's scan refused)."""
    rng = np.random.default_rng(0)
    t, n, c = 6, 3, 4
    shape = (t, n, c) if batched else (t, c)
    lp = np.log(rng.dirichlet(np.ones(c), shape[:-1]))
    targets = np.zeros((n, 0) if batched else (0,), np.int64)
    il = np.array([6, 4, 0]) if batched else np.array(5)
    tl = np.zeros(n, np.int64) if batched else np.array(0)
    x = torch.tensor(lp, requires_grad=True)
    want = F.ctc_loss(x, torch.tensor(targets), torch.tensor(il), torch.tensor(tl),
                      reduction=reduction, zero_infinity=zero_infinity)
    g = rng.standard_normal(tuple(want.shape))
    want.backward(torch.tensor(g))

    be = BACKENDS[backend]()
    data = {"targets": targets, "input_lengths": il, "target_lengths": tl}
    compiled = ml.compile(ml.CTCLoss(reduction=reduction, zero_infinity=zero_infinity), be,
                          shapes={"log_probs": list(shape),
                                  **{k: list(v.shape) for k, v in data.items()}},
                          trainable_keys={"log_probs"})
    out, grads = compiled.evaluate({"log_probs": be.array(lp)},
                                   {k: be.array(v) for k, v in data.items()},
                                   output_gradients={"output": be.array(g)})[:2]
    assert np.abs(_np(out["output"]) - want.detach().numpy()).max() < 1e-10
    assert np.abs(_np(grads["log_probs"]) - x.grad.numpy()).max() < 1e-10


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shape", [(0, 2, 3), (5, 0, 3), (0, 3)])
@pytest.mark.parametrize("free", [False, True])
def test_ctc_loss_empty_log_probs_is_refused_naming_it(backend, shape, free):
    """torch refuses an empty ``log_probs`` ("log_probs tensor must not be empty"). Ours gave
    0 on JAX, NumPy's "need at least one array to stack" (T = 0) or a NaN mean (N = 0), and
    torch's unnamed RuntimeError: a ShapeError naming 'log_probs' on every backend, at
    compile time or, with free shapes, at the first evaluate."""
    with pytest.raises(RuntimeError, match="must not be empty"):
        F.ctc_loss(torch.zeros(shape, dtype=torch.float64), torch.zeros(shape[1:-1] + (0,),
                   dtype=torch.long), torch.zeros(shape[1:-1], dtype=torch.long),
                   torch.zeros(shape[1:-1], dtype=torch.long))
    be = BACKENDS[backend]()
    batch = shape[1:-1]
    data = {"lp": np.zeros(shape), "t": np.zeros(batch + (0,), np.int64),
            "il": np.zeros(batch, np.int64), "tl": np.zeros(batch, np.int64)}
    model = ml.Model()
    model |= ml.CTCLoss()(log_probs="lp", targets="t", input_lengths="il",
                          target_lengths="tl", output=ml.IOKey("output"))
    with pytest.raises(ml.ShapeError, match="'log_probs' must not be empty"):
        shapes = None if free else {k: list(v.shape) for k, v in data.items()}
        compiled = ml.compile(model, be, shapes=shapes)
        compiled.evaluate({}, {k: be.array(v) for k, v in data.items()})


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("empty", [(0, 3, 2, 2), (2, 3, 0, 2)])
def test_batch_norm_empty_batch_in_training_is_torchs(backend, momentum, empty):
    """Ours refused an empty batch as "one value per channel" (torch's check is for exactly
    one); torch's module runs it. Three training steps around it, then inference mode: the
    outputs, the weight / bias gradients and the state match torch's after every step."""
    rng = np.random.default_rng(0)
    be = BACKENDS[backend]()
    compiled = ml.compile(ml.BatchNorm2D(3, momentum=momentum), be,
                          shapes={"input": [None, 3, None, None]})
    ref = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    w, b = np.array([0.5, 1.5, 2.0]), np.array([0.1, 0.2, 0.3])
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        ref.bias.copy_(torch.tensor(b))
    params = {k: be.array(w if k.endswith("weight") else b) for k in compiled.get_parameters()}
    state = compiled.initial_state_dict
    steps = [((4, 3, 2, 2), True), (empty, True), ((3, 3, 2, 2), True), (empty, False),
             ((2, 3, 2, 2), False)]
    for shape, training in steps:
        x, g = 1 + 2 * rng.standard_normal(shape), rng.standard_normal(shape)
        ref.train(training)
        ref.weight.grad = ref.bias.grad = None
        xt = torch.tensor(x, requires_grad=True)
        y = ref(xt)
        y.backward(torch.tensor(g))
        out, grads, state = compiled.evaluate(params, {"input": be.array(x)},
                                              output_gradients={"output": be.array(g)},
                                              state=state, training=training)
        assert _np(out["output"]).shape == shape
        assert np.abs(_np(out["output"]) - y.detach().numpy()).max(initial=0) < 1e-10
        for key in params:
            want = getattr(ref, key.rsplit(".", 1)[1]).grad.numpy()
            assert np.abs(_np(grads[key]) - want).max() < 1e-10
        for key, value in state.items():
            want = getattr(ref, key.rsplit(".", 1)[1]).numpy()
            assert np.abs(_np(value) - want).max() < 1e-10, key
