"""A parameter group's learning rate while the optimizer's own is 0: kept as it is given
(a group's rate is otherwise a ratio to the optimizer's, which 0 cannot hold), side by side
with torch.optim, whose groups are independent: a per-group ``LambdaLR`` warming the first
lane up from 0, a group built with a rate beside an optimizer at 0, state dicts holding
such a rate, and the traced JAX program, which refuses one by name and changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train_step_hyperparameters import adamw_groups, problem

from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils import lr_schedulers as lrs
from mithril.utils.optimizers import SGD, Adam
from mithril.utils.training import make_train_step

#: per lane: the optimizer's own parameters warm up from 0, the group's rate decays
LAMBDAS = [lambda s: min(1.0, s / 4), lambda s: 0.9 ** s]
BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}


def _ours(backend_name: str, make, steps: int, lambdas=LAMBDAS):
    be = BACKENDS[backend_name](dtype="float64")
    start = {"w": np.full((3, 2), 0.5), "b": np.full(2, -0.25)}
    opt = make()
    params = {k: be.array(v) for k, v in start.items()}
    state = opt.init(params)
    sched = lrs.LambdaLR(opt, lambdas) if lambdas else None
    rates = []
    for t in range(steps):
        rates.append([opt.get_learning_rate(), opt.get_learning_rate(0)])
        g = {k: be.array(v) for k, v in _grads(t).items()}
        params, state = opt.update(params, g, state)
        if sched is not None:
            sched.step()
    return {k: np.asarray(be.to_numpy(v)) for k, v in params.items()}, rates


def _torch(cls, kw, group_lr: float, steps: int, lambdas=LAMBDAS):
    w = torch.full((3, 2), 0.5, dtype=torch.float64, requires_grad=True)
    b = torch.full((2,), -0.25, dtype=torch.float64, requires_grad=True)
    opt = cls([{"params": [w]}, {"params": [b], "lr": group_lr}], **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas) if lambdas else None
    rates = []
    for t in range(steps):
        rates.append([g["lr"] for g in opt.param_groups])
        g = _grads(t)
        w.grad, b.grad = torch.from_numpy(g["w"]), torch.from_numpy(g["b"])
        opt.step()
        if sched is not None:
            sched.step()
    return {"w": w.detach().numpy(), "b": b.detach().numpy()}, rates


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("which", ["sgd", "adam"])
def test_first_lane_warming_up_from_zero_matches_torch(backend, which):
    if which == "sgd":
        def make():
            return SGD(learning_rate=0.1, momentum=0.9,
                       param_groups=[{"params": ["b"], "learning_rate": 0.3}])
        ref = _torch(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, 0.3, 12)
    else:
        def make():
            return Adam(learning_rate=0.01, param_groups=[{"params": ["b"],
                                                           "learning_rate": 0.05}])
        ref = _torch(torch.optim.Adam, {"lr": 0.01}, 0.05, 12)
    got, rates = _ours(backend, make, 12)
    np.testing.assert_allclose(rates, ref[1], rtol=1e-15, atol=0)  # (it raised at step 0)
    for k in got:
        np.testing.assert_allclose(got[k], ref[0][k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_a_group_rate_beside_an_optimizer_at_zero_matches_torch():
    def make():
        return SGD(learning_rate=0.0, param_groups=[{"params": ["b"], "learning_rate": 0.2}])
    got, rates = _ours("numpy", make, 3, lambdas=None)
    ref, ref_rates = _torch(torch.optim.SGD, {"lr": 0.0}, 0.2, 3, lambdas=None)
    assert rates == ref_rates == [[0.0, 0.2]] * 3
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-15, atol=0, err_msg=k)


def test_setting_the_optimizers_rate_makes_groups_follow_their_ratio_again():
    opt = SGD(learning_rate=0.1, param_groups=[{"params": ["b"], "learning_rate": 0.3}])
    opt.set_learning_rate(0.0)
    assert opt.get_learning_rate(0) == 0.0  # follows: 0 x its ratio 3
    opt.set_learning_rate(0.5, group=0)
    assert (opt.get_learning_rate(), opt.get_learning_rate(0)) == (0.0, 0.5)
    opt.set_learning_rate(0.2)  # the group follows its last ratio (3) again
    assert opt.get_learning_rate(0) == pytest.approx(0.6, rel=1e-15)
    opt.set_learning_rate(0.0)
    opt.set_learning_rate(0.0, group=0)
    assert opt.get_learning_rate(0) == 0.0 and "learning_rate" not in opt.param_groups[0]


def test_state_dict_keeps_a_group_rate_set_while_the_optimizers_is_zero():
    def make():
        return Adam(learning_rate=0.01, param_groups=[{"params": ["b"], "learning_rate": 0.05}])
    full, _ = _ours("numpy", make, 8)
    opt = make()
    params = {"w": np.full((3, 2), 0.5), "b": np.full(2, -0.25)}
    state = opt.init(params)
    sched = lrs.LambdaLR(opt, LAMBDAS)  # step 0: the first lane at 0, the group at 0.05
    saved = (opt.state_dict(state), sched.state_dict())
    fresh = Adam(learning_rate=0.3, param_groups=[{"params": ["b"], "learning_rate": 0.1}])
    state = fresh.load_state_dict(saved[0], params)
    assert (fresh.get_learning_rate(), fresh.get_learning_rate(0)) == (0.0, 0.05)
    sched = lrs.LambdaLR(fresh, LAMBDAS)
    sched.load_state_dict(saved[1])
    for t in range(8):
        params, state = fresh.update(params, _grads(t), state)
        sched.step()
    for k in full:
        np.testing.assert_array_equal(params[k], full[k], err_msg=k)


def test_traced_jax_step_refuses_it_by_name_and_changes_nothing():
    compiled, batches = problem(JaxBackend(dtype="float32"))
    opt = adamw_groups()
    step = make_train_step(compiled, opt, loss="loss")
    params = compiled.get_parameters()
    params, state, _ = step(params, step.init(params), batches[0])
    before = {k: np.array(v) for k, v in params.items()}
    opt.set_learning_rate(0.0)
    opt.set_learning_rate(0.02, group=0)
    with pytest.raises(ValueError, match=r"AdamW param_groups\[0\]: a learning rate set "
                                         r"while the optimizer's is 0 cannot be traced"):
        step(params, state, batches[1])
    for k, v in params.items():
        np.testing.assert_array_equal(np.array(v), before[k], err_msg=k)
    opt.set_learning_rate(0.01)  # the group follows its ratio again: the program runs
    params, state, _ = step(params, state, batches[1])
    assert any(not np.array_equal(np.array(v), before[k]) for k, v in params.items())


def test_traced_per_tensor_update_refuses_it_too():
    """Muon's rows (per-tensor updates) as an optax transformation: the same refusal, where
    the row's rate was silently 0."""
    import jax.numpy as jnp

    from mithril.interop import optax_transformation
    from mithril.utils.optimizers import Muon

    opt = Muon(learning_rate=0.1, param_groups=[{"params": ["w2"], "learning_rate": 0.2}])
    opt.set_learning_rate(0.0)
    opt.set_learning_rate(0.3, group=0)
    tx = optax_transformation(opt)
    p = {"w": jnp.ones((3, 3)), "w2": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match=r"Muon param_groups\[0\]: a learning rate set"):
        tx.update(p, tx.init(p), p)
