"""Review 47: programs of the published Mithril (synnada-ai/mithril) ported as they are and
run on NumPy, torch and JAX in float64, their outputs and gradients compared with torch
autograd of the same network computed here (not with the examples' prose); and the
published spellings a porting user meets on the way (``Model(name=...)``,
``set_shapes({conn: shape})``, ``ml.TBD``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64

import mithril as ml
from mithril.models import (
    MLP,
    Buffer,
    Convolution2D,
    Flatten,
    LeakyRelu,
    LinearSVM,
    MaxPool2D,
    Mean,
    Model,
    QuadHingeLoss,
    SquaredError,
    TrainModel,
)

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
TOL = dict(rtol=1e-10, atol=1e-12)


def _run(name: str, build, shapes: dict, params: dict, data: dict, cots=True, **compile_kw):
    """Compile ``build()`` on backend ``name`` (float64), evaluate with ``params`` / ``data``
    (NumPy arrays, moved to the backend) and return NumPy outputs and gradients."""
    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(build(), b, shapes=shapes, **compile_kw)
        cv = cots if cots is True else {k: b.array(v) for k, v in cots.items()}
        out, grads = pm.evaluate({k: b.array(v) for k, v in params.items()},
                                 {k: b.array(v) for k, v in data.items()}, output_gradients=cv)
        return ({k: np.asarray(b.to_numpy(v)) for k, v in out.items()},
                {k: np.asarray(b.to_numpy(v)) for k, v in grads.items()})
    if name == "jax":
        with jax_float64():
            return go()
    return go()


# --- examples/model_api/convolution_with_svm.py (published, as of cc5c80c) ------------------

def _svm_train_model() -> TrainModel:
    # synnada-ai/mithril examples/model_api/convolution_with_svm.py, as published
    backbone = Model()
    backbone += Convolution2D(kernel_size=3, out_channels=8, stride=2, padding=1)
    backbone += MaxPool2D(kernel_size=2, stride=2)
    backbone += Convolution2D(kernel_size=3, out_channels=16, stride=2, padding=1)
    backbone += MaxPool2D(kernel_size=2, stride=2)
    backbone += Convolution2D(kernel_size=3, out_channels=32, stride=2, padding=1)
    backbone += Flatten(start_dim=1)
    age_head = MLP(activations=[LeakyRelu(), LeakyRelu(), Buffer()], dimensions=[256, 64, 1])
    gender_head = MLP(activations=[LeakyRelu(), LeakyRelu(), Buffer()], dimensions=[32, 16, 1])
    SVM_Model = LinearSVM()  # noqa: N806 (the example's name)
    logical_model = Model()
    logical_model |= backbone
    logical_model |= age_head.connect(input=backbone.cout, output="age")
    logical_model |= gender_head.connect(input=backbone.cout)
    logical_model |= SVM_Model.connect(input=gender_head.output, output="gender",
                                       decision_output="pred_gender")
    logical_model.expose_keys("gender", "pred_gender", "age")
    logical_model.set_cin(backbone.cin)
    train_model = TrainModel(logical_model)
    train_model.add_loss(QuadHingeLoss(), reduce_steps=[Mean()], target="gender_target",
                         input="gender")
    train_model.add_loss(SquaredError(), reduce_steps=[Mean()], target="age_target", input="age")
    return train_model


def _svm_torch(p: dict, d: dict) -> tuple[dict, dict]:
    """The same network in torch: final_cost and the gradients of every parameter."""
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    h = torch.tensor(d["input"])
    for i in range(3):
        h = F.conv2d(h, t[f"model.convolution2_d_{i}.weight"], t[f"model.convolution2_d_{i}.bias"],
                     stride=2, padding=1)
        if i < 2:
            h = F.max_pool2d(h, 2, 2)
    h = h.flatten(1)

    def mlp(x, m):
        for i in range(3):
            x = F.linear(x, t[f"{m}.linear_{i}.weight"], t[f"{m}.linear_{i}.bias"])
            x = F.leaky_relu(x, 0.01) if i < 2 else x
        return x
    age = mlp(h, "mlp_0")
    gender = F.linear(mlp(h, "mlp_1"), t["weight"], t["bias"])
    gt, at = torch.tensor(d["gender_target"]), torch.tensor(d["age_target"])
    cost = (torch.clamp(1 - gt * gender, min=0) ** 2).mean() + ((age - at) ** 2).mean()
    cost.backward()
    outs = {"final_cost": cost.detach().numpy(), "age": age.detach().numpy(),
            "gender": gender.detach().numpy(), "pred_gender": torch.sign(gender).detach().numpy()}
    return outs, {k: v.grad.numpy() for k, v in t.items()}


@pytest.fixture(scope="module")
def svm_case():
    rng = np.random.default_rng(47)
    shapes = {"input": [6, 3, 32, 32]}
    pm = ml.compile(_svm_train_model(), ml.NumpyBackend(dtype="float64"), shapes=shapes,
                    data_keys={"input", "age_target", "gender_target"})
    params = {k: rng.standard_normal(v) * 0.3 for k, v in pm.parameter_shapes.items()}
    data = {"input": rng.standard_normal((6, 3, 32, 32)),
            "age_target": rng.standard_normal((6, 1)),
            "gender_target": np.sign(rng.standard_normal((6, 1)))}
    return shapes, params, data, _svm_torch(params, data)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_convolution_with_svm_example_matches_torch(name, svm_case):
    shapes, params, data, (want_out, want_grads) = svm_case
    out, grads = _run(name, _svm_train_model, shapes, params, data,
                      data_keys={"input", "age_target", "gender_target"})
    for k, v in want_out.items():
        np.testing.assert_allclose(out[k], v, **TOL, err_msg=k)
    assert set(grads) == set(want_grads)
    for k, v in want_grads.items():
        np.testing.assert_allclose(grads[k], v, **TOL, err_msg=k)
