"""The published Mithril's README model examples and the shapes of its ``examples/model_api``
training programs, written in our own words: a linear regression with ``TrainModel`` +
``Mean`` and ``constant_keys`` trained with optax, an MLP trained with optax on JAX, and a
1-D CNN forecaster with ``expose_keys(predictions=model.cout)`` trained by a hand-written
Adam loop; the README's compile example as published (``precision=``, ``file_path=``, a model
compiled without shapes). Where this project differs the listing says so; see
docs/mithril-compat.md."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_python

import mithril as ml
from mithril.models import (
    MLP,
    Add,
    Convolution1D,
    Flatten,
    LeakyRelu,
    Linear,
    MaxPool1D,
    Mean,
    Model,
    Relu,
    SquaredError,
    TrainModel,
)


def _two_layer(act) -> Model:
    m = Model()
    m += Linear(dimension=32)
    m += act()
    m += Linear(dimension=16)(output="output")
    return m


@pytest.mark.parametrize("backend", [lambda: ml.NumpyBackend(dtype="float64"),
                                     lambda: ml.TorchBackend(dtype="float64")], ids=["numpy", "torch"])
def test_readme_logical_model(backend):
    b = backend()
    model1, model2 = _two_layer(Relu), _two_layer(LeakyRelu)
    model = Model()  # (the published README's, as it is now)
    model |= model1(output="output1")
    model += model2(output="output2")  # += wires model2's canonical input to output1
    model |= Add()(left="output1", right="output2", output="output")
    c = ml.compile(model, b, shapes={"input": [4, 3]})
    p = c.randomize_params()
    x = np.random.default_rng(0).standard_normal((4, 3))
    out, grads = c.evaluate(p, {"input": b.array(x)}, output_gradients={"output": b.ones(4, 16)})
    pn = {k: np.asarray(b.to_numpy(v)) for k, v in p.items()}

    def mlp(h, prefix, act):
        h = act(h @ pn[f"{prefix}.linear_0.weight"].T + pn[f"{prefix}.linear_0.bias"])
        return h @ pn[f"{prefix}.linear_1.weight"].T + pn[f"{prefix}.linear_1.bias"]

    o1 = mlp(x, "model_0", lambda h: np.maximum(h, 0))
    o2 = mlp(o1, "model_1", lambda h: np.where(h > 0, h, 0.01 * h))
    np.testing.assert_allclose(b.to_numpy(out["output"]), o1 + o2, rtol=1e-12)
    assert set(grads) == set(p)


def test_readme_compiling_a_logical_model():
    model = Linear(16)
    backend_jax = ml.JaxBackend(dtype="float32")  # published: JaxBackend(precision=32)
    backend_numpy = ml.NumpyBackend(dtype="float32")
    jax_model = ml.compile(model=model, backend=backend_jax, jit=False, shapes={"input": [3, 3]})
    numpy_model = ml.compile(model=Linear(16), backend=backend_numpy, shapes={"input": [3, 3]})
    other_model = Model()
    other_model += Linear(dimension=32)(input="input")
    jax_model1 = ml.compile(model=other_model, backend=backend_jax, shapes={"input": [3, 3]})

    params = jax_model1.randomize_params()
    output = jax_model1.evaluate(params, {"input": backend_jax.ones(3, 3)})
    assert output["output"].shape == (3, 32)
    assert jax_model.evaluate(jax_model.randomize_params(), {"input": backend_jax.ones(3, 3)})["output"].shape == (3, 16)

    params = numpy_model.randomize_params()
    gradients = numpy_model.evaluate_gradients(params, {"input": backend_numpy.ones(3, 3)},
                                               {"output": backend_numpy.ones(3, 16)})
    np.testing.assert_allclose(gradients["linear.weight"], np.full((16, 3), 3.0))
    np.testing.assert_allclose(gradients["linear.bias"], np.full(16, 3.0))


def test_linear_regression_with_train_model_constant_keys_and_optax():
    optax = pytest.importorskip("optax")
    backend = ml.JaxBackend(dtype="float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 1)).astype(np.float32)
    y = x * 5 + 2 + 0.1 * rng.standard_normal((256, 1)).astype(np.float32)

    train_model = TrainModel(Linear(dimension=1))
    train_model.add_loss(SquaredError(), input="output", target="target", reduce_steps=[Mean()])
    pm = ml.compile(model=train_model, backend=backend,
                    constant_keys={"input": backend.array(x), "target": backend.array(y)})
    assert pm.input_keys == ()
    params = pm.randomize_params()
    optimizer = optax.adam(learning_rate=0.1)
    opt_state = optimizer.init(params)
    for _ in range(300):
        outputs, gradients = pm.evaluate(params, output_gradients=True)  # no data: all constant
        updates, opt_state = optimizer.update(gradients, opt_state)
        params = optax.apply_updates(params, updates)
    assert abs(float(params["linear.weight"][0, 0]) - 5) < 0.05
    assert abs(float(params["linear.bias"][0]) - 2) < 0.05
    assert float(outputs["final_cost"]) < 0.02


def test_mlp_with_optax_on_jax():
    optax = pytest.importorskip("optax")
    backend = ml.JaxBackend(dtype="float32")
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 3, (128, 1)).astype(np.float32)
    y = np.sin(x)
    model = MLP(activations=["tanh", "tanh", None], dimensions=[32, 32, 1])
    train_model = TrainModel(model)
    train_model.add_loss(SquaredError(), input="output", target="target", reduce_steps=[Mean()])
    pm = ml.compile(train_model, backend, shapes={"input": [None, 1]}, data_keys={"input", "target"})
    params = pm.randomize_params()
    optimizer = optax.adam(learning_rate=0.01)
    opt_state = optimizer.init(params)
    data = {"input": backend.array(x), "target": backend.array(y)}
    first = None
    for _ in range(300):
        outputs, gradients = pm.evaluate(params, data, output_gradients=True)
        first = float(outputs["final_cost"]) if first is None else first
        updates, opt_state = optimizer.update(gradients, opt_state)
        params = optax.apply_updates(params, updates)
    assert float(outputs["final_cost"]) < 0.1 * first
    # prediction without labels
    pred = ml.compile(model, backend, shapes={"input": [None, 1]})
    got = pred.evaluate({k: params[k] for k in pred.parameter_shapes}, {"input": backend.array(x)})
    assert got["output"].shape == (128, 1)


class _Adam:
    """A hand-written Adam over dicts of backend arrays, as the published example's."""

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.999) -> None:
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2

    def init(self, backend, params):
        return {"m": {k: backend.zeros_like(v) for k, v in params.items()},
                "v": {k: backend.zeros_like(v) for k, v in params.items()}, "it": 1}

    def update_params(self, params, grads, state):
        b1, b2, it = self.beta1, self.beta2, state["it"]
        state["m"] = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grads.items()}
        state["v"] = {k: b2 * state["v"][k] + (1 - b2) * g**2 for k, g in grads.items()}
        params = {k: v - self.lr * (state["m"][k] / (1 - b1**it))
                  / ((state["v"][k] / (1 - b2**it)) ** 0.5 + 1e-16) for k, v in params.items()}
        state["it"] += 1
        return params, state


def test_cnn_forecaster_with_expose_keys_and_a_hand_written_adam():
    backend = ml.TorchBackend(dtype="float32")
    seq_len, n = 16, 64
    rng = np.random.default_rng(2)
    start = rng.uniform(0, 2 * np.pi, n)
    t = start[:, None] + np.linspace(0, 2 * np.pi, 2 * seq_len + 1)[None]
    wave = np.sin(t).astype(np.float32)
    x, y = wave[:, None, :seq_len], wave[:, seq_len + 1:seq_len + 2]

    cnn_model = Model()
    cnn_model |= Convolution1D(out_channels=8, kernel_size=5, stride=1, padding=2)
    cnn_model += Relu()
    cnn_model += MaxPool1D(kernel_size=2, stride=2)
    cnn_model += Flatten(start_dim=1)
    cnn_model += Linear(32)
    cnn_model += Relu()
    cnn_model += Linear(1)
    train_model = TrainModel(cnn_model)
    train_model.expose_keys(predictions=cnn_model.cout)
    train_model.add_loss(SquaredError(), input=cnn_model.cout, target="target", reduce_steps=[Mean()])
    train_model.set_shapes(input=[None, 1, seq_len])
    pm = ml.compile(train_model, backend, data_keys={"input", "target"})
    assert {"predictions", "final_cost"} <= set(pm.output_keys)

    params = pm.randomize_params()
    optimizer = _Adam(lr=0.01)
    state = optimizer.init(backend, params)
    data = {"input": backend.array(x), "target": backend.array(y)}
    costs = []
    for _ in range(150):
        outputs, gradients = pm.evaluate(params, data, output_gradients=True)
        params, state = optimizer.update_params(params, gradients, state)
        costs.append(float(outputs["final_cost"]))
    assert costs[-1] < 0.2 * costs[0]
    pred = pm.evaluate(params, data)["predictions"]
    np.testing.assert_allclose(backend.to_numpy(pred), backend.to_numpy(outputs["predictions"]),
                               atol=0.2)


def test_readme_compiling_example_as_published():
    """The published README's compile example word for word (JaxBackend(precision=64) turns on
    JAX's process-global x64 mode: in a subprocess). ``jax_model`` is compiled without shapes:
    it is built at its first evaluate; ``file_path`` gets a listing of the program."""
    out = run_python("""
        import os, tempfile
        os.chdir(tempfile.mkdtemp())
        import mithril as ml
        from mithril.models import Model, Linear
        model = Linear(16)
        backend_jax = ml.JaxBackend(precision=64)
        backend_numpy = ml.NumpyBackend(precision=32)
        jax_model = ml.compile(model=model, backend=backend_jax, jit=False,
                               file_path="generated_code.py")
        numpy_model = ml.compile(model=model, backend=backend_numpy, shapes={"input": [3, 3]})
        other_model = Model()
        other_model += Linear(dimension=32)(input = "input")
        jax_model1 = ml.compile(model=other_model, backend=backend_jax, shapes={"input": [3, 3]})
        params = jax_model1.randomize_params()
        inputs = {"input": backend_jax.ones(3, 3)}
        output = jax_model1.evaluate(params, inputs)
        params = numpy_model.randomize_params()
        inputs = {"input": backend_numpy.ones(3, 3)}
        output_gradients = {"output": backend_numpy.ones(3, 16)}
        gradients = numpy_model.evaluate_gradients(params, inputs, output_gradients)
        assert sorted(gradients) == ["linear.bias", "linear.weight"]
        assert str(output["output"].dtype) == "float64" and backend_numpy.dtype == "float32"
        assert "Not built yet" in open("generated_code.py").read()
        out = jax_model.evaluate({"linear.weight": backend_jax.ones(16, 3),
                                  "linear.bias": backend_jax.zeros(16)}, inputs)
        assert out["output"].shape == (3, 16) and float(out["output"][0, 0]) == 3.0
        text = open("generated_code.py").read()
        assert "linear (Linear)(input=input, weight=linear.weight, bias=linear.bias)" in text
        compile(text, "generated_code.py", "exec")  # every line a comment: valid Python
        print("ok")
    """, timeout=300)
    assert out.split()[-1] == "ok"


def test_precision_and_device_mesh_arguments():
    for cls in (ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend):
        assert cls(precision=32).dtype == "float32" and cls(precision=16).dtype == "float16"
        assert cls(dtype="bfloat16", precision=16).dtype == "bfloat16"
        with pytest.raises(ValueError, match=r"dtype='float32', precision=64\): dtype and precision"):
            cls(dtype=ml.float32, precision=64)
        with pytest.raises(ValueError, match="precision=...\\) must be 16, 32 or 64"):
            cls(precision=8)
        with pytest.raises(ValueError, match="mithril.distributed"):
            cls(dtype="float32").ones(4, 2, device_mesh=(2, 1))
    for cls in (ml.TorchBackend, ml.JaxBackend):
        with pytest.raises(ValueError, match=r"device_mesh=\(2, 1\)\).*mithril.distributed"):
            cls(device_mesh=(2, 1))
    assert ml.TorchBackend(device_mesh=None).precision == 32


def test_compile_file_path_writes_a_listing(tmp_path):
    model = Model()
    model |= Linear(4)
    model += Relu()
    path = tmp_path / "listing.py"
    c = ml.compile(model, ml.NumpyBackend(), shapes={"input": [2, 3]}, file_path=path)
    text = path.read_text()
    assert text == c.listing()
    assert "#   linear.weight: [4, 3] (init glorot)" in text
    assert "relu (Relu)(input=" in text and "#   output = output [2, 4]" in text


def test_compile_without_shapes_builds_at_the_first_evaluate():
    c = ml.compile(Linear(2), ml.NumpyBackend(dtype="float64"))
    with pytest.raises(ml.ShapeError, match="cannot infer the shape of parameter 'linear.weight'"):
        c.randomize_params()
    out = c.evaluate({"linear.weight": np.ones((2, 3)), "linear.bias": np.zeros(2)},
                     {"input": np.ones((5, 3))})
    np.testing.assert_array_equal(out["output"], np.full((5, 2), 3.0))
    assert c.get_shapes()["linear.weight"] == [2, 3]
    with pytest.raises(ml.ShapeError):  # declared shapes are still checked at compile time
        ml.compile(Linear(2), ml.NumpyBackend(), shapes={"input": [None, None]})


def test_keys_name_parameters_by_their_compiled_names():
    model = Model()
    model |= Linear(3)
    model += Relu()
    model += Linear(2)
    b = ml.NumpyBackend(dtype="float64")
    names = ml.compile(model, b, shapes={"input": [4, 5]}).get_shapes()
    assert "linear_0.weight" in names
    w = np.random.default_rng(0).standard_normal((3, 5))
    c = ml.compile(model, b, shapes={"input": [4, 5]}, constant_keys={"linear_0.weight": w},
                   data_keys={"linear_1.bias"}, trainable_keys=["linear_1.weight"])
    assert sorted(c.parameter_shapes) == ["linear_0.bias", "linear_1.weight"]
    assert c.input_keys == ("input", "linear_1.bias")
    p = c.randomize_params()
    x, bias = np.ones((4, 5)), np.arange(2.0)
    out, g = c.evaluate(p, {"input": x, "linear_1.bias": bias},
                        output_gradients={"output": np.ones((4, 2))})
    h = np.maximum(x @ w.T + p["linear_0.bias"], 0)
    np.testing.assert_allclose(out["output"], h @ p["linear_1.weight"].T + bias, rtol=1e-12)
    assert sorted(g) == sorted(p)
    for kw in ({"constant_keys": {"linear_7.weight": w}}, {"data_keys": ["linear.weight"]}):
        with pytest.raises(ml.KeyMismatchError, match="'linear.*' is not an input or a parameter"):
            ml.compile(model, b, shapes={"input": [4, 5]}, **kw)
