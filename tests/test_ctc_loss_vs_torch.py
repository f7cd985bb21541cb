"""``CTCLoss`` side by side with ``torch.nn.functional.ctc_loss``.

Float64, every reduction with and without ``zero_infinity``, padded and concatenated
targets, one unbatched sequence, repeated labels (no skip between them), empty targets,
input lengths of 0 and below what a target needs (inf and torch's NaN gradient, or 0 with
``zero_infinity``), a blank other than 0, padding values outside [0, C): the loss and the
gradient w.r.t. ``log_probs`` on NumPy and torch in process and on JAX in a fresh x64
process within 1e-10 of torch autograd's. torch's gradient is the logits' one (see
``mithril.models.ctc_loss``): checked against central differences of the NumPy loss. Bad
lengths, labels and shapes are refused naming the key, before anything runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences
from layer_edges import Case, nonfinite_error, parity_tests, run_mithril

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import InputValueError, ShapeError
from mithril.models.ctc_loss import CTCLoss

_KEYS = ("targets", "input_lengths", "target_lengths")


def _ref(**kw):
    def ref(t: dict, d: dict) -> dict:
        return {"output": F.ctc_loss(t["log_probs"], *(d[k] for k in _KEYS), **kw)}
    return ref


def _data(targets, il, tl) -> dict:
    return {k: np.asarray(v, np.int64) for k, v in zip(_KEYS, (targets, il, tl))}


CASES: dict[str, Case] = {}
# padded (N, S): repeats (1, 2, 2), an empty target, a sequence too short for its target
# (2 steps for "1 1": needs 3), padding -1 past each target's end
_PAD = [[1, 2, 2, 4], [3, -1, -1, -1], [1, 1, -1, -1], [0, 0, 0, 0]]
for red in ("mean", "sum", "none"):
    for zi in (False, True):
        CASES[f"padded {red} zero_inf={zi}"] = Case(
            lambda red=red, zi=zi: CTCLoss(reduction=red, zero_infinity=zi),
            {"log_probs": (7, 4, 5)}, _ref(reduction=red, zero_infinity=zi),
            data=_data(_PAD, [7, 4, 2, 3], [3, 1, 2, 0]))
        CASES[f"concatenated {red} zero_inf={zi}"] = Case(
            lambda red=red, zi=zi: CTCLoss(reduction=red, zero_infinity=zi),
            {"log_probs": (6, 3, 4)}, _ref(reduction=red, zero_infinity=zi),
            data=_data([1, 3, 3, 2, 1, 1, 1], [6, 0, 5], [4, 0, 3]))
for red in ("mean", "none"):
    CASES[f"unbatched {red}"] = Case(
        lambda red=red: CTCLoss(reduction=red), {"log_probs": (6, 4)}, _ref(reduction=red),
        data=_data([2, 1, 1], 5, 3))
CASES["blank=4 input length 0"] = Case(
    lambda: CTCLoss(blank=4, reduction="sum"), {"log_probs": (5, 3, 5)},
    _ref(blank=4, reduction="sum"), data=_data([[0, 1], [3, 3], [2, 0]], [5, 0, 0], [2, 2, 0]))
CASES["log-softmax inputs, long T"] = Case(
    lambda: CTCLoss(), {"log_probs": np.log(np.random.default_rng(3).dirichlet(
        np.ones(6), (40, 2)))}, _ref(), data=_data([[1, 2, 3, 4, 5], [5, 5, 5, 0, 0]], [40, 33], [5, 3]))
_LONG = np.random.default_rng(4).integers(1, 20, (3, 60))
CASES["log-softmax inputs, T=300, targets of 60"] = Case(  # log space: no underflow
    lambda: CTCLoss(reduction="sum"), {"log_probs": np.log(np.random.default_rng(5).dirichlet(
        np.ones(20), (300, 3)))}, _ref(reduction="sum"),
    data=_data(_LONG, [300, 250, 121], [60, 45, 60]))

#: the JAX column by default (one compiled scan each); the rest with ``-m slow``
JAX_NAMES = ["padded mean zero_inf=False", "padded none zero_inf=True",
             "concatenated sum zero_inf=False", "unbatched none", "blank=4 input length 0"]
test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_ctc_loss_vs_torch", CASES, err=nonfinite_error, jax_default=JAX_NAMES)


def test_an_impossible_target_is_inf_with_torchs_nan_gradient() -> None:
    """The case is live: sequence 3 (2 steps, target "1 1") has nll inf; its gradient is
    NaN as torch's without zero_infinity, and 0 with it."""
    _, _, out, grads = run_mithril("padded none zero_inf=False",
                                   CASES["padded none zero_inf=False"], "numpy")
    assert np.isinf(out["output"][2]) and np.isfinite(out["output"][[0, 1, 3]]).all()
    g = grads["log_probs"]
    assert np.isnan(g[:2, 2]).all() and (g[2:, 2] == 0).all() and np.isfinite(g[:, [0, 1, 3]]).all()
    _, _, out, grads = run_mithril("padded none zero_inf=True",
                                   CASES["padded none zero_inf=True"], "numpy")
    assert out["output"][2] == 0 and (grads["log_probs"][:, 2] == 0).all()


def test_gradient_is_the_logits_gradient_torch_returns() -> None:
    """torch's CTC gradient is exp(log_probs) + d nll / d log_probs (the logits' gradient
    through a log-softmax): our NumPy gradient minus exp(log_probs) (within each input
    length) equals central differences of the NumPy loss."""
    rng = np.random.default_rng(7)
    lp = rng.standard_normal((5, 2, 4))
    data = _data([[1, 2, 2], [3, 1, 0]], [5, 4], [3, 2])
    be = NumpyBackend(dtype="float64")
    model = ml.Model()
    model |= CTCLoss(reduction="sum")(log_probs="log_probs", **{k: k for k in _KEYS},
                                      output="output")
    c = ml.compile(model, be, shapes={"log_probs": [5, 2, 4], "targets": [2, 3],
                                      "input_lengths": [2], "target_lengths": [2]},
                   trainable_keys={"log_probs"})
    out, grads = c.evaluate({"log_probs": lp}, data, output_gradients={"output": np.array(1.0)})[:2]
    fd = central_differences(lambda p: float(c.evaluate(p, data)["output"]),
                             {"log_probs": lp}, 1e-6)["log_probs"]
    live = (np.arange(5)[:, None] < data["input_lengths"])[:, :, None]
    assert np.abs(grads["log_probs"] - np.where(live, np.exp(lp), 0) - fd).max() < 1e-7
    assert np.abs(fd[4, 1]).max() == 0  # past the second sequence's 4 steps


def _compiled(shapes: dict) -> Any:
    model = ml.Model()
    model |= CTCLoss()(log_probs="log_probs", **{k: k for k in _KEYS}, output="output")
    return ml.compile(model, NumpyBackend(dtype="float64"), shapes=shapes,
                      trainable_keys={"log_probs"})


@pytest.mark.parametrize(("targets", "il", "tl", "match"), [
    ([[1, 2], [1, 0]], [6, 3], [2, 1], r"input_lengths 'input_lengths' holds 6: .*\[0, T = 5\]"),
    ([[1, 2], [1, 0]], [-1, 3], [2, 1], r"input_lengths 'input_lengths' holds -1"),
    ([[1, 2], [1, 0]], [5, 3], [2, -1], r"target_lengths 'target_lengths' holds -1"),
    ([[1, 2], [1, 0]], [5, 3], [3, 1], r"holds 3, longer than the padded 'targets' \[2, 2\]"),
    ([[1, 4], [1, 9]], [5, 3], [2, 1], r"targets 'targets' holds class index 4 .*\[0, 3\]"),
    ([[1, -2], [1, 0]], [5, 3], [2, 1], r"holds class index -2"),
    ([1, 2, 1], [5, 3], [2, 2], r"sums to 4, but the concatenated 'targets' have 3 labels"),
])
def test_bad_lengths_and_labels_are_named(targets, il, tl, match) -> None:
    data = _data(targets, il, tl)
    c = _compiled({"log_probs": [5, 2, 4], **{k: list(v.shape) for k, v in data.items()}})
    with pytest.raises(InputValueError, match=match):
        c.evaluate({"log_probs": np.zeros((5, 2, 4))}, data)


@pytest.mark.parametrize(("shapes", "match"), [
    ({"log_probs": [5, 2, 4, 1]}, r"'log_probs' must be \(T, N, C\) or \(T, C\)"),
    ({"log_probs": [5, 2, 4], "targets": [3, 2]}, r"padded 'targets' \[3, 2\] must have N = 2"),
    ({"log_probs": [5, 4], "targets": [1, 2]}, r"'targets' must be \(S,\) for unbatched"),
    ({"log_probs": [5, 2, 4], "input_lengths": [3]}, r"'input_lengths' must have shape \[2\]"),
    ({"log_probs": [5, 4], "target_lengths": [1]}, r"'target_lengths' must have shape \[\]"),
])
def test_bad_shapes_are_named(shapes, match) -> None:
    full = {"targets": [2, 2], "input_lengths": [2], "target_lengths": [2]}
    if len(shapes["log_probs"]) == 2:
        full = {"targets": [2], "input_lengths": [], "target_lengths": []}
    with pytest.raises(ShapeError, match=match):
        _compiled({**full, **shapes})


def test_blank_outside_the_classes_and_bad_arguments() -> None:
    with pytest.raises(ShapeError, match=r"blank=4 is not a class"):
        model = ml.Model()
        model |= CTCLoss(blank=4)(log_probs="log_probs", **{k: k for k in _KEYS}, output="o")
        ml.compile(model, NumpyBackend(), shapes={"log_probs": [5, 2, 4]})
    with pytest.raises(ValueError, match="blank must be an int >= 0"):
        CTCLoss(blank=-1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        CTCLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="zero_infinity must be a bool"):
        CTCLoss(zero_infinity=1)


def test_torch_reference_is_live() -> None:
    """The parity table exercises finite and infinite sequences (torch's own values)."""
    lp = torch.tensor(np.random.default_rng(0).standard_normal((7, 4, 5)))
    d = {k: torch.tensor(v) for k, v in _data(_PAD, [7, 4, 2, 3], [3, 1, 2, 0]).items()}
    out = F.ctc_loss(lp, *(d[k] for k in _KEYS), reduction="none")
    assert np.isinf(out[2].item()) and np.isfinite(out[[0, 1, 3]].numpy()).all()


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_training_with_make_train_step_follows_torch(backend_name: str) -> None:
    """Linear → LogSoftmax → CTCLoss, 5 SGD steps by ``make_train_step`` against the same
    torch loop (nn.Linear, F.ctc_loss, torch.optim.SGD): the weights within 1e-10."""
    from mithril.backends import TorchBackend
    from mithril.utils.optimizers import SGD
    from mithril.utils.training import make_train_step

    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 2, 3))
    data = _data([[1, 2, 2], [3, 1, 0]], [9, 7], [3, 2])
    model = ml.Model()
    model |= ml.Linear(4)(input="input", output="logits")
    model |= ml.LogSoftmax(axis=-1)(input="logits", output="log_probs")
    model |= CTCLoss()(log_probs="log_probs", **{k: k for k in _KEYS}, output=ml.IOKey("loss"))
    be = (NumpyBackend if backend_name == "numpy" else TorchBackend)(dtype="float64")
    c = ml.compile(model, be, shapes={"input": [9, 2, 3], "targets": [2, 3],
                                      "input_lengths": [2], "target_lengths": [2]})
    wkey, bkey = (next(k for k in c.get_parameters() if k.endswith(e)) for e in ("weight", "bias"))
    lin = torch.nn.Linear(3, 4, dtype=torch.float64)
    w0, b0 = lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()
    params = {wkey: be.array(w0.copy()), bkey: be.array(b0.copy())}
    step = make_train_step(c, SGD(learning_rate=0.5), loss="loss")
    opt_state = step.init(params)
    feed = {"input": be.array(x), **{k: be.array(v, be.int_dtype) for k, v in data.items()}}
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    for _ in range(5):
        params, opt_state, _ = step(params, opt_state, feed)
        opt.zero_grad()
        F.ctc_loss(lin(torch.tensor(x)).log_softmax(-1),
                   *(torch.tensor(data[k]) for k in _KEYS)).backward()
        opt.step()
    for key, want, start in ((wkey, lin.weight, w0), (bkey, lin.bias, b0)):
        got = np.asarray(be.to_numpy(params[key]))
        assert np.abs(got - want.detach().numpy()).max() < 1e-10
        assert np.abs(got - start).max() > 1e-2  # (trained: the comparison is not trivial)
