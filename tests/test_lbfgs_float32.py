"""LBFGS on the torch backend with ``fused=False`` (torch's own operations) in float32 equals
torch.optim.LBFGS to the last bit over 300+
iterations, with and without the strong-Wolfe line search: the extended Rosenbrock
function in 100 dimensions (long curved valleys: every iteration's line search brackets and
interpolates), history 10 (the ring wraps many times).

In float32 a scalar rounded otherwise anywhere (torch's float32 ``sqrt`` in the cubic
interpolation is not correctly rounded, ``float / tensor`` is ``reciprocal() * float``)
sends the runs apart within a few steps: the line search runs on torch's own 0-d tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mithril.utils.optimizers import LBFGS

N, HIST, MAX_ITER = 100, 10, 20


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def closure(p):
    x = p["x"].detach().clone().requires_grad_()
    loss = rosenbrock(x)
    loss.backward()
    return loss.detach(), {"x": x.grad}


@pytest.mark.parametrize("ls, lr, steps", [("strong_wolfe", 1.0, 16), (None, 0.05, 16)])
def test_float32_equals_torch_bit_for_bit_over_300_iterations(ls, lr, steps):
    x0 = (np.random.default_rng(0).standard_normal(N) * 0.5 - 1.0).astype(np.float32)
    kw = dict(history_size=HIST, max_iter=MAX_ITER, line_search_fn=ls)
    tx = torch.tensor(x0, requires_grad=True)
    ref = torch.optim.LBFGS([tx], lr=lr, **kw)

    def ref_closure():
        ref.zero_grad()
        loss = rosenbrock(tx)
        loss.backward()
        return loss

    opt = LBFGS(lr, fused=False, **kw)  # torch's own operations
    params = {"x": torch.tensor(x0)}
    state = opt.init(params)
    start = float(rosenbrock(tx.detach()))
    for i in range(steps):
        ref.step(ref_closure)
        params, state = opt.update(params, None, state, closure=closure)
        assert torch.equal(params["x"], tx.detach()), f"step {i}"
        assert state.values["n_iter"] == ref.state[tx]["n_iter"]
        assert state.values["func_evals"] == ref.state[tx]["func_evals"]
    assert state.values["n_iter"] >= 300
    assert float(rosenbrock(tx.detach())) < 0.5 * start  # it went somewhere
