"""TransformerBlock(use_bias=False) is torch's TransformerEncoderLayer(bias=False): no bias
anywhere, the LayerNorms' included; same parameters, same output and gradients."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

import mithril as ml

_LAYER = {"layer_norm_0": "norm1", "layer_norm_1": "norm2", "linear_0": "linear1",
          "linear_1": "linear2", "multi_head_attention": "self_attn"}


@pytest.mark.parametrize("backend_cls", [ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend], ids=lambda b: b.__name__)
def test_no_bias_is_torchs(backend_cls):
    backend = backend_cls(dtype="float64")
    m = ml.Model()
    m |= ml.TransformerBlock(8, 2, 16, use_bias=False)(input="input", output=ml.IOKey("output"))
    c = ml.compile(m, backend, shapes={"input": [None, 5, 8]})
    params = {k: np.asarray(backend.to_numpy(v)) for k, v in c.get_parameters().items()}
    ref = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True,
                                           bias=False, dtype=torch.float64)
    names = {f"{_LAYER[k.split('.')[1]]}.{k.split('.')[2].replace('out_proj_', 'out_proj.')}": k for k in params}
    assert sorted(names) == sorted(ref.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    g = np.random.default_rng(1).standard_normal((2, 5, 8))
    out, grads = c.evaluate({k: backend.array(v) for k, v in params.items()}, {"input": backend.array(x)},
                            output_gradients={"output": backend.array(g)})
    t = {n: torch.tensor(params[k], requires_grad=True) for n, k in names.items()}
    want = functional_call(ref, t, (torch.tensor(x),))
    want.backward(torch.tensor(g))
    np.testing.assert_allclose(np.asarray(backend.to_numpy(out["output"])), want.detach().numpy(), atol=1e-12)
    for n, k in names.items():
        np.testing.assert_allclose(np.asarray(backend.to_numpy(grads[k])), t[n].grad.numpy(), atol=1e-11)
