"""The lead's integration of the forty-eighth session's reviews: what the helpers found
outside their files (tests/test_review_atomic48.py, test_review_jax48.py), fixed here."""

from __future__ import annotations

import numpy as np
import pytest

from mithril.utils.optimizers import Adam


def test_param_groups_set_by_attribute_is_refused_by_name_and_changes_nothing() -> None:
    """torch users rebind ``opt.param_groups``; ours are fixed at construction (they decide
    the state's rows): a named AttributeError, not Python's "property has no setter", and
    the hyperparameters' change count (what a compiled JAX step watches) is unchanged."""
    opt = Adam(0.1, param_groups=[{"params": "b", "learning_rate": 0.01}])
    before = (opt.param_groups, opt.__dict__.get("_hyper_version"))
    with pytest.raises(AttributeError, match=r"Adam.param_groups is fixed at construction.*"
                                             r"set_learning_rate\(x, group=i\)"):
        opt.param_groups = []
    assert (opt.param_groups, opt.__dict__.get("_hyper_version")) == before


def test_swap_ema_refuses_one_parameter_of_another_dtype_by_name() -> None:
    """``update`` refuses a float32 array among float64 params; ``swap_ema`` took it (the
    flat copy promoted it): now the same refusal, naming it, nothing swapped."""
    opt = Adam(0.1, ema_decay=0.5)
    params = {"w": np.ones(3), "b": np.zeros(2)}
    state = opt.init(params)
    params, state = opt.update(params, {"w": np.ones(3), "b": np.ones(2)}, state)
    ema = {k: v.copy() for k, v in opt.ema_params(state).items()}
    mine = {"w": np.ones(3), "b": np.zeros(2, dtype=np.float32)}
    with pytest.raises(TypeError, match=r"params\['b'\] must have dtype float64, got float32"):
        opt.swap_ema(mine, state)
    assert state.swapped is None
    for k, v in opt.ema_params(state).items():
        np.testing.assert_array_equal(v, ema[k])


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_a_shape_wire_as_a_slice_end_equals_torch_autograd(backend) -> None:
    """The published CLIP's ``in_proj_bias[0:query.shape[2]]`` and ``[q.shape[2]:2 * ...]``:
    the slice ends known at compile time from the query's shape, the bias's gradient
    scattered into its slice (float64, against torch autograd)."""
    import torch

    import mithril as ml
    from mithril.models import Buffer, IOKey, Model

    query = IOKey("query", differentiable=True)
    bias = IOKey("in_proj_bias", differentiable=True)
    e = query.shape[2]
    model = Model()
    model |= Buffer().connect(input=query * bias[e:2 * e] + bias[0:e], output="q")
    be = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend,
          "jax": ml.JaxBackend}[backend](dtype="float64")
    pm = ml.compile(model, be, shapes={"query": [2, 3, 4], "in_proj_bias": [12]})
    rng = np.random.default_rng(0)
    x, b, cot = rng.standard_normal((2, 3, 4)), rng.standard_normal(12), rng.standard_normal((2, 3, 4))
    out, grads = pm.evaluate({"query": be.array(x), "in_proj_bias": be.array(b)}, {},
                             output_gradients={"q": be.array(cot)})
    tx, tb = (torch.tensor(a, requires_grad=True) for a in (x, b))
    ref = tx * tb[4:8] + tb[0:4]
    ref.backward(torch.tensor(cot))
    np.testing.assert_allclose(be.to_numpy(out["q"]), ref.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(be.to_numpy(grads["in_proj_bias"]), tb.grad.numpy(), rtol=1e-13,
                               atol=1e-15)
    np.testing.assert_allclose(be.to_numpy(grads["query"]), tx.grad.numpy(), rtol=1e-14)
