"""TrainModel (the published Mithril's training API) against the same objective in torch
autograd (float64), on NumPy, torch and JAX."""

import re
import warnings

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.errors import KeyMismatchError
from mithril.models import (
    L1,
    L2,
    AbsoluteError,
    IOKey,
    Linear,
    Mean,
    Model,
    Relu,
    Reshape,
    SquaredError,
    Sum,
    TrainModel,
)
from mithril.utils.optimizers import SGD
from mithril.utils.training import make_train_step

BACKENDS = [ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend]
rng = np.random.default_rng(67)
X, T = rng.standard_normal((5, 3)), rng.standard_normal((5, 4))
W12, B4 = rng.standard_normal(12), rng.standard_normal(4)


def _reshaped_weight_model() -> Model:
    """A weight kept flat ('w', declared differentiable), reshaped before the Linear reads it."""
    model = Model()
    model |= Reshape(shape=(4, 3)).connect(input=IOKey("w", differentiable=True, shape=[12]),
                                           output="w2")
    model |= Linear(4).connect(input="input", weight="w2", output="output")
    return model


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_regex_regularizes_the_parameter_behind_a_reshape(backend_cls):
    """A regex once matched the Reshape's output 'w2' (a wire a block computes, not a
    parameter) and compile failed; it matches the parameter 'w', as compile names it."""
    tm = TrainModel(_reshaped_weight_model())
    assert tm.parameter_names == ["w", "linear.bias"]
    tm.add_loss(SquaredError(), input="output", target="target")
    tm.add_regularization(L2(), coef=0.3, input=re.compile(r"^w"))
    backend = backend_cls(dtype=ml.float64)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]})
    assert sorted(compiled.randomize_params()) == ["linear.bias", "w"]
    params = {"w": backend.array(W12), "linear.bias": backend.array(B4)}
    out, grads = compiled.evaluate(params, {"input": backend.array(X), "target": backend.array(T)},
                                   output_gradients=True)

    w = torch.tensor(W12, requires_grad=True)
    b = torch.tensor(B4, requires_grad=True)
    y = torch.tensor(X) @ w.reshape(4, 3).T + b
    cost = ((y - torch.tensor(T)) ** 2).mean() + 0.3 * 0.5 * (w**2).sum() / 20
    cost.backward()
    np.testing.assert_allclose(backend.to_numpy(out["final_cost"]), cost.item(), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(grads["w"]), w.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(backend.to_numpy(grads["linear.bias"]), b.grad.numpy(), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("weight", [IOKey("w", value=np.ones((4, 3))), 2.0,
                                    IOKey("w", differentiable=False)])
def test_a_constant_or_data_weight_is_not_a_parameter(weight):
    """A weight given a constant (or declared not differentiable: data) was listed as a
    parameter: a pattern matching it was accepted and compile failed naming an internal
    ParameterRef. It is refused at add_regularization, naming the parameters, and the
    TrainModel is left as it was."""
    model = Model()
    model |= Linear(4).connect(input="input", weight=weight, output="output")
    tm = TrainModel(model)
    assert tm.parameter_names == ["linear.bias"]
    tm.add_loss(SquaredError(), input="output", target="target")
    with pytest.raises(KeyMismatchError, match=r"matches no parameter; the parameters are "
                                               r"\['linear.bias'\]"):
        tm.add_regularization(L2(), coef=0.1, input=re.compile(r"w"))
    backend = ml.NumpyBackend(dtype=ml.float64)
    data = {"input": X, "target": T}
    if isinstance(weight, IOKey) and weight.value is None:
        data["w"] = np.full((4, 3), 0.5)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]})
    out = compiled.evaluate({"linear.bias": B4}, data)
    wv = 0.5 if "w" in data else 1.0 if isinstance(weight, IOKey) else 2.0
    expected = np.mean((X @ np.full((4, 3), wv).T + B4 - T) ** 2)
    np.testing.assert_allclose(out["final_cost"], expected, rtol=1e-12)


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("how", ["data_keys", "constant_keys"])
def test_a_regularized_parameter_compiled_as_data_or_a_constant(backend_cls, how):
    """A frozen weight keeps its penalty, as torch's loss with a weight that does not require
    grad: compile(data_keys={'linear.weight'}) or constant_keys of a regularized parameter
    failed ("objective.parameter_ref (ParameterRef): 'linear.weight' names no parameter");
    the regularizer reads that input, which gets no gradient."""
    weight = rng.standard_normal((4, 3))
    tm = TrainModel(Linear(4))
    tm.add_loss(SquaredError(), input="output", target="target")
    tm.add_regularization(L2(), coef=0.3, input=re.compile(r"weight"))
    tm.add_regularization(L1(), coef=0.2, input="linear.bias")
    backend = backend_cls(dtype=ml.float64)
    data = {"input": backend.array(X), "target": backend.array(T)}
    if how == "data_keys":
        compiled = ml.compile(tm, backend, shapes={"input": [None, 3]}, data_keys={"linear.weight"})
        data["linear.weight"] = backend.array(weight)
    else:
        compiled = ml.compile(tm, backend, shapes={"input": [None, 3]},
                              constant_keys={"linear.weight": weight})
    out, grads = compiled.evaluate({"linear.bias": backend.array(B4)}, data, output_gradients=True)
    assert sorted(grads) == ["linear.bias"]

    w, b = torch.tensor(weight), torch.tensor(B4, requires_grad=True)
    y = torch.tensor(X) @ w.T + b
    cost = ((y - torch.tensor(T)) ** 2).mean() + (0.3 * 0.5 * (w**2).sum() + 0.2 * b.abs().sum()) / 20
    cost.backward()
    np.testing.assert_allclose(backend.to_numpy(out["final_cost"]), cost.item(), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(grads["linear.bias"]), b.grad.numpy(), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_one_criterion_and_one_reduce_steps_list_for_several_terms(backend_cls):
    """As torch's ``crit = nn.MSELoss()`` called twice: one loss instance for two losses, one
    ``reduce_steps`` list for both, one L2 for two regularizers. compile failed ("Mean(...) is
    already part of a model"), and again at every retry; each use is its own copy now."""
    criterion, steps, l2 = SquaredError(), [Mean()], L2()
    tm = TrainModel(Linear(4))
    tm.add_loss(criterion, reduce_steps=steps, input="output", target="target")
    tm.add_loss(criterion, reduce_steps=steps, input="output", target="target2", coef=0.5)
    tm.add_regularization(l2, coef=0.1, input="linear.weight")
    tm.add_regularization(l2, coef=0.2, input="linear.bias")
    backend = backend_cls(dtype=ml.float64)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]})
    weight, t2 = rng.standard_normal((4, 3)), rng.standard_normal((5, 4))
    params = {"linear.weight": backend.array(weight), "linear.bias": backend.array(B4)}
    data = {"input": backend.array(X), "target": backend.array(T), "target2": backend.array(t2)}
    step = make_train_step(compiled, SGD(learning_rate=0.1))
    state = step.init(params)
    params, state, out = step(params, state, data)

    w, b = torch.tensor(weight, requires_grad=True), torch.tensor(B4, requires_grad=True)
    y = torch.tensor(X) @ w.T + b
    mse = torch.nn.MSELoss()
    cost = mse(y, torch.tensor(T)) + 0.5 * mse(y, torch.tensor(t2))
    cost = cost + (0.1 * 0.5 * (w**2).sum() + 0.2 * 0.5 * (b**2).sum()) / 20
    cost.backward()
    np.testing.assert_allclose(backend.to_numpy(out["final_cost"]), cost.item(), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(params["linear.weight"]),
                               weight - 0.1 * w.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(backend.to_numpy(params["linear.bias"]), B4 - 0.1 * b.grad.numpy(),
                               rtol=1e-12, atol=1e-14)


def test_a_shared_block_with_parameters_is_refused_when_added():
    """A loss block that holds parameters cannot be copied silently: refused at add_loss,
    naming it, and the TrainModel is left as it was."""
    lin = Linear(1)
    model = Model()
    model |= lin.connect(input="input", output="output")
    tm = TrainModel(model)
    tm.add_loss(SquaredError(), input="output", target="target")
    with pytest.raises(ValueError, match=r"add_metric: .*already part of this TrainModel and has "
                                         r"parameters"):
        tm.add_metric(lin, input="output", key_name="m")
    assert "m" not in tm.conns and len(tm._metrics) == 0
    compiled = ml.compile(tm, ml.NumpyBackend(dtype=ml.float64), shapes={"input": [None, 1]})
    assert sorted(compiled.output_keys) == ["final_cost", "output"]


def _hidden_wire_model() -> Model:
    model = Model()
    model |= Linear(4).connect(input="input", output=IOKey("h", expose=False))
    model |= Relu().connect(input="h", output="output")
    return model


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_a_connection_naming_an_internal_wire_is_refused(backend_cls):
    """target='h', 'h' an expose=False wire inside the model, silently read that wire (the
    loss was mean((relu(h) - h)²), no target input); outside its model the wire is hidden
    (as for Model composition, where 'h' is a new input): refused, naming it, and nothing
    changes: the TrainModel then trains on a target named otherwise."""
    tm = TrainModel(_hidden_wire_model())
    with pytest.raises(KeyMismatchError, match=r"connection 'target': 'h' is an internal wire"):
        tm.add_loss(SquaredError(), input="output", target="h")
    with pytest.raises(KeyMismatchError, match=r"'h' is an internal wire"):
        tm.add_metric(AbsoluteError(), input="output", target=IOKey("h"))
    tm.add_loss(SquaredError(), input="output", target="target")
    backend = backend_cls(dtype=ml.float64)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]})
    assert sorted(compiled.input_keys) == ["input", "target"]
    weight = rng.standard_normal((4, 3))
    params = {"linear.weight": backend.array(weight), "linear.bias": backend.array(B4)}
    out, grads = compiled.evaluate(params, {"input": backend.array(X), "target": backend.array(T)},
                                   output_gradients=True)
    w, b = torch.tensor(weight, requires_grad=True), torch.tensor(B4, requires_grad=True)
    cost = torch.nn.functional.mse_loss(torch.relu(torch.tensor(X) @ w.T + b), torch.tensor(T))
    cost.backward()
    np.testing.assert_allclose(backend.to_numpy(out["final_cost"]), cost.item(), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(grads["linear.weight"]), w.grad.numpy(), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_key_name_of_an_input_another_term_reads_is_refused(backend_cls):
    """key_name='aux' where a loss reads the data input 'aux' (or the regularizer's key_name
    'target') was accepted: that loss then read the new output instead of its data, and
    compile failed on a shape. Refused at the call, naming it; the TrainModel is unchanged."""
    tm = TrainModel(Linear(4))
    tm.add_loss(SquaredError(), input="output", target="aux")
    with pytest.raises(KeyMismatchError, match=r"key_name 'aux' is already the name of an input"):
        tm.add_loss(AbsoluteError(), reduce_steps=Sum(), input="output", target="t2", key_name="aux")
    with pytest.raises(KeyMismatchError, match=r"key_name 'aux' is already the name of an input"):
        tm.add_regularization(L2(), coef=0.1, input="linear.weight", key_name="aux")
    with pytest.raises(KeyMismatchError, match=r"key_name 't2' is already the name of an input"):
        tm.add_loss(AbsoluteError(), input="output", target="t2", key_name="t2")
    tm.add_loss(AbsoluteError(), reduce_steps=Sum(), input="output", target="t2", key_name="l1")
    backend = backend_cls(dtype=ml.float64)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]})
    weight, t2 = rng.standard_normal((4, 3)), rng.standard_normal((5, 4))
    params = {"linear.weight": backend.array(weight), "linear.bias": backend.array(B4)}
    out = compiled.evaluate(params, {"input": backend.array(X), "aux": backend.array(T),
                                     "t2": backend.array(t2)})
    y = X @ weight.T + B4
    np.testing.assert_allclose(backend.to_numpy(out["l1"]), np.abs(y - t2).sum(), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(out["final_cost"]),
                               np.mean((y - T) ** 2) + np.abs(y - t2).sum(), rtol=1e-12)


def test_reduce_steps_not_a_list():
    tm = TrainModel(Linear(4))
    with pytest.raises(TypeError, match=r"add_loss: reduce_steps must be a list of reductions"):
        tm.add_loss(SquaredError(), "mean", input="output", target="target")
    assert tm._losses == []


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_an_empty_batch_with_a_regularizer_gives_torchs_nan_and_inf(backend_cls):
    """An empty batch (the last split of np.array_split) gave nan without a regularizer, as
    torch, but a bare ZeroDivisionError ('float division by zero') with one: the regularizer
    is divided by the Mean's 0 entries. It is torch's coef·R(x)/0 now: nan cost, ±inf / nan
    gradients."""
    weight = np.array([[1.0, 0.0, -2.0]] * 4)
    tm = TrainModel(Linear(4))
    tm.add_loss(SquaredError(), input="output", target="target")
    tm.add_regularization(L2(), coef=0.3, input="linear.weight")
    backend = backend_cls(dtype=ml.float64)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]})
    params = {"linear.weight": backend.array(weight), "linear.bias": backend.array(B4)}
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (NumPy's mean of an empty slice)
        out, grads = compiled.evaluate(params, {"input": backend.array(np.zeros((0, 3))),
                                                "target": backend.array(np.zeros((0, 4)))},
                                       output_gradients=True)
    w, b = torch.tensor(weight, requires_grad=True), torch.tensor(B4, requires_grad=True)
    y = torch.zeros(0, 3, dtype=torch.float64) @ w.T + b
    cost = ((y - torch.zeros(0, 4, dtype=torch.float64)) ** 2).mean() + 0.3 * 0.5 * (w**2).sum() / 0
    cost.backward()
    assert np.isnan(backend.to_numpy(out["final_cost"])) and np.isnan(cost.item())
    np.testing.assert_array_equal(backend.to_numpy(grads["linear.weight"]), w.grad.numpy())
    np.testing.assert_array_equal(backend.to_numpy(grads["linear.bias"]), b.grad.numpy())
    assert np.isinf(w.grad.numpy()[:, 0]).all()


def test_a_pattern_matching_nothing_is_refused_and_changes_nothing():
    """docs/mithril-compat.md: the published adds nothing, silently; here a KeyMismatchError
    naming the pattern and the parameters, and the TrainModel's numbers stay as they were."""
    tm = TrainModel(Linear(4))
    tm.add_loss(SquaredError(), input="output", target="target")
    with pytest.raises(KeyMismatchError, match=r"the pattern 'kernel' matches no parameter; the "
                                               r"parameters are \['linear.weight', 'linear.bias'\]"):
        tm.add_regularization(L2(), coef=0.1, input=re.compile(r"kernel"))
    assert tm._regs == []
    weight = rng.standard_normal((4, 3))
    out = ml.compile(tm, ml.NumpyBackend(dtype=ml.float64), shapes={"input": [None, 3]}).evaluate(
        {"linear.weight": weight, "linear.bias": B4}, {"input": X, "target": T})
    np.testing.assert_allclose(out["final_cost"], np.mean((X @ weight.T + B4 - T) ** 2), rtol=1e-12)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_the_mean_combiner_of_losses_with_no_entry(backend_cls):
    """set_loss_combiner(Mean()) of a loss left with no entry (Mean(axis=1) of an empty
    batch): torch and JAX give nan and a zero gradient, the NumPy backend raised a bare
    ZeroDivisionError in its VJP."""
    tm = TrainModel(Linear(4))
    tm.add_loss(SquaredError(), reduce_steps=[Mean(axis=1)], input="output", target="target")
    tm.set_loss_combiner(Mean())
    backend = backend_cls(dtype=ml.float64)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]})
    weight = rng.standard_normal((4, 3))
    params = {"linear.weight": backend.array(weight), "linear.bias": backend.array(B4)}
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, grads = compiled.evaluate(params, {"input": backend.array(np.zeros((0, 3))),
                                                "target": backend.array(np.zeros((0, 4)))},
                                       output_gradients=True)
    w = torch.tensor(weight, requires_grad=True)
    cost = (((torch.zeros(0, 3, dtype=torch.float64) @ w.T) ** 2).mean(1)).mean()
    cost.backward()
    assert np.isnan(backend.to_numpy(out["final_cost"])) and np.isnan(cost.item())
    np.testing.assert_array_equal(backend.to_numpy(grads["linear.weight"]), w.grad.numpy())


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_regularize_by_object_a_nested_weight_given_a_name(backend_cls):
    """input=lin.weight, lin inside a child model whose weight is the wire 'w' (the compiled
    parameter 'w'), was refused: "'inner.linear.weight' names no parameter"; it is 'w', as
    the name and the pattern select it."""
    lin = Linear(4)
    inner = Model(name="inner")
    inner |= lin.connect(input="input", weight="w", output="output")
    outer = Model()
    outer |= inner.connect(input="input", output="output")
    tm = TrainModel(outer)
    tm.add_loss(SquaredError(), input="output", target="target")
    tm.add_regularization(L2(), coef=0.3, input=lin.weight, key_name="r")
    backend = backend_cls(dtype=ml.float64)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]})
    weight = rng.standard_normal((4, 3))
    params = {"w": backend.array(weight), "inner.linear.bias": backend.array(B4)}
    out, grads = compiled.evaluate(params, {"input": backend.array(X), "target": backend.array(T)},
                                   output_gradients=True)
    w, b = torch.tensor(weight, requires_grad=True), torch.tensor(B4, requires_grad=True)
    cost = torch.nn.functional.mse_loss(torch.tensor(X) @ w.T + b, torch.tensor(T))
    cost = cost + 0.3 * 0.5 * (w**2).sum() / 20
    cost.backward()
    np.testing.assert_allclose(backend.to_numpy(out["r"]), 0.5 * np.sum(weight**2), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(out["final_cost"]), cost.item(), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(grads["w"]), w.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_a_default_metric_name_skips_one_taken():
    """add_metric without key_name named it metric_<number of metrics>, even when the user
    had taken that name: refused with "key_name 'metric_1' is already a terminal", a name
    the call did not give. It takes the next free one."""
    tm = TrainModel(Linear(4))
    tm.add_loss(SquaredError(), input="output", target="target")
    tm.add_metric(AbsoluteError(), reduce_steps=[Mean()], input="output", target="target",
                  key_name="metric_1")
    tm.add_metric(AbsoluteError(), reduce_steps=[Sum()], input="output", target="target")
    tm.add_metric(AbsoluteError(), reduce_steps=[Mean(axis=0)], input="output", target="target")
    weight = rng.standard_normal((4, 3))
    compiled = ml.compile(tm, ml.NumpyBackend(dtype=ml.float64), shapes={"input": [None, 3]})
    out = compiled.evaluate({"linear.weight": weight, "linear.bias": B4}, {"input": X, "target": T})
    err = np.abs(X @ weight.T + B4 - T)
    np.testing.assert_allclose(out["metric_1"], err.mean(), rtol=1e-12)
    np.testing.assert_allclose(out["metric_2"], err.sum(), rtol=1e-12)
    np.testing.assert_allclose(out["metric_3"], err.mean(0), rtol=1e-12)


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("named", [False, True])
def test_discarding_the_output_of_a_regularized_block(backend_cls, named):
    """compile(discard_keys={'o2'}) pruned the head 'h2' (no output left reads it) though a
    regularizer reads its weight: by its path 'h2.weight' compile failed ("ParameterRef:
    'h2.weight' names no parameter"), by a wire name ('w2') the weight silently became a
    data input. The head stays; final_cost and the gradients are those without discarding
    (the regularizer of a weight no loss reads is not divided: 0.3·w)."""
    m = Model()
    m |= Linear(4, name="h1").connect(input="input", output="o1")
    m |= Linear(2, name="h2").connect(input="input", **({"weight": "w2"} if named else {}),
                                      output="o2")
    key = "w2" if named else "h2.weight"
    tm = TrainModel(m)
    tm.add_loss(SquaredError(), input="o1", target="t1")
    tm.add_regularization(L2(), coef=0.3, input=key, key_name="r2")
    backend = backend_cls(dtype=ml.float64)
    compiled = ml.compile(tm, backend, shapes={"input": [None, 3]}, discard_keys={"o2"})
    assert sorted(compiled.input_keys) == ["input", "t1"]
    params = {"h1.weight": rng.standard_normal((4, 3)), "h1.bias": B4, key: rng.standard_normal((2, 3)),
              "h2.bias": rng.standard_normal(2)}
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    out, grads = compiled.evaluate({k: backend.array(v) for k, v in params.items()},
                                   {"input": backend.array(X), "t1": backend.array(T)},
                                   output_gradients=True)
    assert "o2" not in out
    cost = torch.nn.functional.mse_loss(torch.tensor(X) @ tp["h1.weight"].T + tp["h1.bias"],
                                        torch.tensor(T)) + 0.3 * 0.5 * (tp[key] ** 2).sum()
    cost.backward()
    np.testing.assert_allclose(backend.to_numpy(out["final_cost"]), cost.item(), rtol=1e-12)
    for k in ("h1.weight", "h1.bias", key):
        np.testing.assert_allclose(backend.to_numpy(grads[k]), tp[k].grad.numpy(), rtol=1e-12,
                                   atol=1e-14)
    np.testing.assert_array_equal(backend.to_numpy(grads["h2.bias"]), 0.0)
