"""The lead's own fixes of the forty-ninth session, each against the installed peer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils import optimizers as mo

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_ema_decay_one_is_a_frozen_average_as_torch(kind):
    """``ema_decay=1.0`` was refused ("must be in [0, 1)"); torch's ``get_ema_multi_avg_fn(1.0)``,
    Keras's ``ema_momentum=1.0`` and ``optax.ema(1.0)`` take it: the average stays the first
    averaged parameters. Side by side with ``AveragedModel`` over 5 AdamW steps."""
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(5)]
    net = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()})
    topt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.01)
    avg = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(1.0))
    for g in grads:
        for k, v in g.items():
            net[k].grad = torch.tensor(v)
        topt.step()
        avg.update_parameters(net)
    be = BACKENDS[kind](dtype="float64")
    opt = mo.AdamW(0.1, weight_decay=0.01, ema_decay=1.0)
    params = {k: be.array(v) for k, v in p0.items()}
    state = opt.init(params)
    for i, g in enumerate(grads):
        params, state = opt.update(params, {k: be.array(v) for k, v in g.items()}, state)
        if i == 0:
            first = {k: np.array(be.to_numpy(v)) for k, v in params.items()}
    for k in p0:
        np.testing.assert_allclose(np.asarray(be.to_numpy(params[k])), net[k].detach().numpy(),
                                   rtol=1e-13, atol=1e-15, err_msg=k)
        ema = np.asarray(be.to_numpy(opt.ema_params(state)[k]))
        np.testing.assert_allclose(ema, avg.module[k].detach().numpy(), rtol=1e-13, atol=1e-15,
                                   err_msg=k)
        np.testing.assert_array_equal(ema, first[k], err_msg=k)  # frozen at step 1's params
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\]"):
        mo.AdamW(ema_decay=1.0 + 1e-9)


@pytest.mark.parametrize("groups", [False, True])
def test_drop_in_shows_a_scheduled_momentum_as_torch_and_an_edit_keeps_it(groups):
    """A Mithril ``OneCycleLR(cycle_momentum=True)`` on a torch drop-in's
    ``mithril_optimizer``: ``param_groups[i]["momentum"]`` and ``state_dict()`` showed the
    constructor's 0.9 all run long, and a group's weight decay edited by hand wrote that 0.9
    back over the cycled momentum (the scheduler's change silently undone). Side by side with
    ``torch.optim.SGD`` + ``torch.optim.lr_scheduler.OneCycleLR``: every step's shown lr and
    momentum, and the parameters, with a weight-decay edit mid-run on both."""
    from mithril.interop.torch_optim import torch_optimizer
    from mithril.utils import lr_schedulers as L

    rng = np.random.default_rng(1)
    init = [rng.standard_normal(3), rng.standard_normal(2)]
    grads = [[rng.standard_normal(3), rng.standard_normal(2)] for _ in range(12)]

    def params():
        return [torch.nn.Parameter(torch.tensor(v)) for v in init]

    def given(ps):
        return [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.02}] if groups else ps

    tp, mp = params(), params()
    ref = torch.optim.SGD(given(tp), lr=0.1, momentum=0.9)
    ref_s = torch.optim.lr_scheduler.OneCycleLR(ref, 0.1,
                                                total_steps=30)
    tw = torch_optimizer(mo.SGD(learning_rate=0.1, momentum=0.9), given(mp))
    ours = L.OneCycleLR(tw.mithril_optimizer, 0.1, total_steps=30,
                        cycle_momentum=True, per_group=groups)
    for step, g in enumerate(grads):
        if step == 6:  # an unrelated value edited by hand, as a user would
            for opt in (ref, tw):
                opt.param_groups[-1]["weight_decay"] = 1e-3
        for ps in (tp, mp):
            for p, v in zip(ps, g):
                p.grad = torch.tensor(v)
        ref.step()
        tw.step()
        ref_s.step()
        ours.step()
        for a, b in zip(ref.param_groups, tw.param_groups):
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-14, abs=1e-16)
            assert b["momentum"] == pytest.approx(a["momentum"], rel=1e-14)
        saved = tw.state_dict()["param_groups"]
        assert [s["momentum"] for s in saved] == [b["momentum"] for b in tw.param_groups]
    for a, b in zip(tp, mp):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-13,
                                   atol=1e-15)


def test_a_grouped_drop_in_resumes_from_its_optimizers_own_state_dict(tmp_path):
    """``tw.load_state_dict(opt.state_dict(state))`` (what ``save_checkpoint`` keeps) was
    refused ("no 'mithril' entry"): a drop-in could not resume from a ``save_checkpoint``
    file. Two torch groups (their own lr and weight decay) and a torch ``StepLR``: 3 steps,
    save, a fresh drop-in loads the file, 3 more steps equal 6 uninterrupted bit for bit, and
    the groups show the checkpoint's rates. Another optimizer's state dict is refused by
    name, the drop-in as it was."""
    from mithril.interop import torch_optimizer
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    def run(steps, tw=None, net=None, sched=None):
        if tw is None:
            torch.manual_seed(0)
            net = torch.nn.Linear(3, 2, dtype=torch.float64)
            tw = torch_optimizer(mo.AdamW(0.1), [
                {"params": [net.weight], "weight_decay": 0.05},
                {"params": [net.bias], "lr": 0.02, "weight_decay": 0.0}])
            sched = torch.optim.lr_scheduler.StepLR(tw, 2, 0.5)
        x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
        for _ in range(steps):
            tw.zero_grad()
            (net(x) ** 3).sum().backward()
            tw.step()
            sched.step()
        return net, tw, sched

    ref, ref_tw, _ = run(6)
    net, tw, sched = run(3)
    # (groups given as dicts: the drop-in names the parameters param0, param1, ...)
    params = {"param0": net.weight.detach(), "param1": net.bias.detach()}
    save_checkpoint(tmp_path / "c.safetensors", params, tw.mithril_optimizer, tw.mithril_state)
    torch.manual_seed(1)
    net2 = torch.nn.Linear(3, 2, dtype=torch.float64)
    tw2 = torch_optimizer(mo.AdamW(0.1), [
        {"params": [net2.weight], "weight_decay": 0.05},
        {"params": [net2.bias], "lr": 0.02, "weight_decay": 0.0}])
    ck = load_checkpoint(tmp_path / "c.safetensors", params_template=params)
    with torch.no_grad():
        net2.weight.copy_(ck["params"]["param0"])
        net2.bias.copy_(ck["params"]["param1"])
    before = [dict(g) for g in tw2.param_groups]
    sgd = mo.SGD(0.1, momentum=0.9)
    with pytest.raises(ValueError, match="state dict refused .*SGD"):
        tw2.load_state_dict(sgd.state_dict(sgd.init({"w": np.ones(2)})))
    assert [dict(g) for g in tw2.param_groups] == before and tw2.mithril_state is None
    tw2.load_state_dict(ck["optimizer_state_dict"])
    assert [g["lr"] for g in tw2.param_groups] == pytest.approx([g["lr"] for g in tw.param_groups])
    sched2 = torch.optim.lr_scheduler.StepLR(tw2, 2, 0.5)
    sched2.load_state_dict(sched.state_dict())
    run(3, tw2, net2, sched2)
    for (k, a), b in zip(ref.named_parameters(), net2.parameters()):
        assert torch.equal(a, b), k
    assert [g["lr"] for g in tw2.param_groups] == [g["lr"] for g in ref_tw.param_groups]


@pytest.mark.parametrize("make", [
    lambda: mo.SGD(0.1, momentum=0.9, nesterov=True), lambda: mo.RMSProp(0.01, centered=True),
    lambda: mo.AdaGrad(0.1), lambda: mo.NAdam(0.01), lambda: mo.Adam(0.01, amsgrad=True),
    lambda: mo.AdamW(0.01, ema_decay=0.9)], ids=["sgd", "rmsprop", "adagrad", "nadam",
                                                "amsgrad", "adamw-ema"])
def test_the_drop_in_resumes_from_its_own_state_dict_across_the_catalog(make):
    """The same resume for optimizers with other slots (momentum, centered RMSProp's mean,
    AdaGrad's sums, AMSGrad's max, an EMA): 3 steps, the optimizer's own state dict into a
    fresh drop-in, 3 more steps equal 6 uninterrupted bit for bit."""
    from mithril.interop import torch_optimizer

    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)

    def run(steps, net=None, tw=None):
        if net is None:
            torch.manual_seed(0)
            net = torch.nn.Linear(3, 2, dtype=torch.float64)
            tw = torch_optimizer(make(), net.named_parameters())
        for _ in range(steps):
            tw.zero_grad()
            (net(x) ** 3).sum().backward()
            tw.step()
        return net, tw

    ref, _ = run(6)
    net, tw = run(3)
    saved = tw.mithril_optimizer.state_dict(tw.mithril_state)
    torch.manual_seed(1)
    net2 = torch.nn.Linear(3, 2, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(net.parameters(), net2.parameters()):
            b.copy_(a)
    tw2 = torch_optimizer(make(), net2.named_parameters())
    tw2.load_state_dict(saved)
    run(3, net2, tw2)
    for (k, a), b in zip(ref.named_parameters(), net2.parameters()):
        assert torch.equal(a, b), k
