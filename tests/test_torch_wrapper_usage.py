"""What a ``torch.optim`` user does with an optimizer object, on a mithril ``torch_optimizer``
side by side with the ``torch.optim`` optimizer (float64 to 1e-12 unless said): the six
optimizer hooks (``register_step_pre_hook`` / ``post``, ``register_state_dict_pre_hook`` /
``post``, ``register_load_state_dict_pre_hook`` / ``post``) and torch's global step hooks,
called as torch's with what torch's get; ``zero_grad(set_to_none=False)`` (a zero gradient
is a step, counted); ``GradScaler`` skipping the very first step (no state yet) while
parameters lack a ``.grad``; ``step(closure)`` returning the closure's loss; a parameter
that does not require a gradient; complex parameters (torch's take them; ours are refused
by name)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_interop_torch_optimizer import (
    data,
    default_dtype,
    make_model,
    model_err,
    normwise_err,
    ours_for,
    torch_for,
)
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

TOL = 1e-12


@pytest.fixture(autouse=True)
def _float64_default():
    with default_dtype(torch.float64):
        yield


def steps(model, opt, n: int, start: int = 0, set_to_none: bool = True) -> None:
    x, y = data(torch.float64)
    for t in range(start, start + n):
        opt.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.mse_loss(model(x, t % 3 == 0), y).backward()
        opt.step()


def hooked(make):
    """A model and optimizer with every hook registered, logging what each is given; the
    state dict post hook adds an entry and the load pre hook takes it out again."""
    model = make_model()
    opt = make("adam", model)
    log: list = []
    def given(a):  # (torch's hooks get step's own arguments: the optimizer itself first)
        return [x is opt or x for x in a]

    opt.register_step_pre_hook(lambda o, a, k: log.append(("pre", o is opt, given(a), k)))
    opt.register_step_post_hook(lambda o, a, k: log.append(("post", o is opt, given(a), k)))
    opt.register_state_dict_pre_hook(lambda o: log.append(("sd pre", o is opt)))

    def sd_post(o, sd):
        log.append(("sd post", o is opt, sorted(k for k in sd if k != "mithril")))
        return {**sd, "note": 1}

    def load_pre(o, sd):
        log.append(("load pre", o is opt, sd.pop("note", None)))
        return sd

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: log.append(("load post", o is opt)))
    return model, opt, log


def test_hooks_are_called_as_torchs():
    logs, models = [], []
    for make in (ours_for, torch_for):
        model, opt, log = hooked(make)
        with register_optimizer_step_pre_hook(lambda o, a, k, log=log: log.append("g pre")), \
                register_optimizer_step_post_hook(lambda o, a, k, log=log: log.append("g post")):
            steps(model, opt, 2)
        steps(model, opt, 1, start=2)  # (the global hooks removed)
        sd = opt.state_dict()
        assert sd["note"] == 1
        opt.load_state_dict(sd)
        steps(model, opt, 2, start=3)
        logs.append(log)
        models.append(model)
    assert logs[0] == logs[1]
    assert [e[0] for e in logs[0]].count("pre") == 5
    assert model_err(*models) <= TOL
    # a removed hook is not called any more
    model, opt, log = hooked(ours_for)
    handle = opt.register_step_pre_hook(lambda o, a, k: log.append("extra"))
    handle.remove()
    steps(model, opt, 1)
    assert "extra" not in log


@pytest.mark.parametrize("case", ["adam", "sgd_momentum", "rprop", "asgd", "adagrad", "nadam"])
def test_zero_grad_without_none_counts_every_step_as_torch(case):
    """``zero_grad(set_to_none=False)``: ``extra``'s gradient is 0, not None, on the steps
    it is unused: a step for it, counted, as torch's."""
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    o1, o2 = ours_for(case, m1), torch_for(case, m2)
    steps(m1, o1, 8, set_to_none=False)
    steps(m2, o2, 8, set_to_none=False)
    assert model_err(m1, m2) <= TOL, case
    assert all(p.grad is not None for p in m1.parameters())
    if case != "sgd_momentum":  # (torch's SGD keeps no step)
        assert float(o1.state[m1.extra]["step"]) == float(o2.state[m2.extra]["step"]) == 8


@pytest.mark.parametrize("case", ["adam", "sgd_momentum"])
def test_grad_scaler_skipping_the_first_step_with_parameters_lacking_a_grad(case):
    """An inf at the very first step (the optimizer has no state yet) and ``extra`` without
    a ``.grad`` every other step: skipped, scale backed off, the runs equal (float32: to
    its rounding, the scaler's unscale being exact)."""
    results = []
    for make in (ours_for, torch_for):
        with default_dtype(torch.float32):
            model = make_model(torch.float32)
            opt = make(case, model)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            x, y = data(torch.float32)
            for t in range(6):
                opt.zero_grad()
                scaler.scale(torch.nn.functional.mse_loss(model(x, t % 2 == 0), y)).backward()
                if t == 0:
                    model.l1.weight.grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
        results.append((model, scaler.get_scale()))
    (m1, s1), (m2, s2) = results
    assert s1 == s2 == 2.0**9
    assert normwise_err(m1, m2) <= 1e-6


def test_step_with_a_closure_returns_its_loss():
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    x, y = data(torch.float64)
    losses = []
    for m, o in ((m1, ours_for("adam", m1)), (m2, torch_for("adam", m2))):
        def closure(m=m, o=o):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        losses.append([o.step(closure) for _ in range(4)])
    for a, b in zip(*losses):  # (to the last bits: tests/test_interop_torch_optimizer.py)
        assert isinstance(a, torch.Tensor)
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    assert model_err(m1, m2) <= TOL


def test_a_parameter_not_requiring_grad_is_left_as_torchs():
    """``l1.bias`` frozen with ``requires_grad_(False)`` before the optimizer is made: never
    moved; torch's keeps no state for it, ours an entry at step 0 (what torch's first
    step would read) that torch.optim loads."""
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    for m in (m1, m2):
        m.l1.bias.requires_grad_(False)
    o1, o2 = ours_for("adam", m1), torch_for("adam", m2)
    frozen = m1.l1.bias.detach().clone()
    steps(m1, o1, 5)
    steps(m2, o2, 5)
    assert torch.equal(m1.l1.bias, frozen) and torch.equal(m2.l1.bias, frozen)
    assert model_err(m1, m2) <= TOL
    pid = [p is m1.l1.bias for p in m1.parameters()].index(True)
    assert pid not in o2.state_dict()["state"]
    assert float(o1.state_dict()["state"][pid]["step"]) == 0
    m3 = copy.deepcopy(m1)
    o3 = torch_for("adam", m3)
    o3.load_state_dict(o1.state_dict())
    steps(m1, o1, 3, start=5)
    steps(m3, o3, 3, start=5)
    assert model_err(m1, m3) <= TOL


def test_integer_parameters_are_refused_by_name():
    """Complex parameters are taken (as torch's real pairs: tests/test_review_torch48.py);
    an integer one is refused at construction, naming the parameter."""
    z = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="parameter 'z' has dtype torch.int64"):
        torch_optimizer(mo.Adam(), [("z", z)])
