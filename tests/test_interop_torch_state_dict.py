"""``mithril.interop.torch_optimizer`` state dicts (split from
tests/test_interop_torch_optimizer.py, whose model, data and training helpers they use): a
state dict saved mid-run (through ``torch.save``/``torch.load(weights_only=True)``) continues
bit-exactly in a fresh wrapper, for every case there; its torch-shaped layout and names; bad
state dicts refused with nothing changed.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from test_interop_torch_optimizer import CASES, STEPS, make_model, ours_for, train
from torch import nn

from mithril.errors import KeyMismatchError, ShapeError
from mithril.interop import TorchOptimizer, torch_optimizer
from mithril.utils import optimizers as mo


def roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_dict(a, b, where="sd"):
    assert type(a) is type(b) or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_dict(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_dict(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_resumes_bit_exactly(case):
    """50 steps, save (through torch.save / torch.load(weights_only=True)), load into a
    fresh wrapper of a fresh optimizer over a copy of the model, 50 more steps: the same
    bits as 100 steps in one go. StepLR drives both (its state saved alongside)."""
    def sched(o):
        return torch.optim.lr_scheduler.StepLR(o, step_size=20, gamma=0.5)

    full = make_model()
    opt = ours_for(case, full)
    train(full, opt, STEPS, sched=sched(opt), extra_every=4)

    part = make_model()
    o1 = ours_for(case, part)
    s1 = sched(o1)
    train(part, o1, 50, sched=s1, extra_every=4)
    saved = roundtrip({"model": part.state_dict(), "opt": o1.state_dict(), "sched": s1.state_dict()})

    fresh = make_model(seed=7)
    fresh.load_state_dict(saved["model"])
    cls, kw, _, _ = CASES[case]
    o2 = torch_optimizer(cls(**{**kw, "learning_rate": 0.123}), fresh.named_parameters())
    s2 = sched(o2)
    o2.load_state_dict(saved["opt"])
    s2.load_state_dict(saved["sched"])
    assert_same_dict(o2.state_dict(), saved["opt"])  # loaded as saved
    train(fresh, o2, 50, start=50, sched=s2, extra_every=4)
    for (n, p), q in zip(full.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{case}: {n} differs after resuming"
    assert_same_dict(o2.state_dict(), opt.state_dict())


def test_state_dict_shape_and_names():
    model = make_model()
    opt = ours_for("amsgrad", model)
    sd = opt.state_dict()
    assert sd["state"] == {} and sd["mithril"]["step"] == 0
    group = sd["param_groups"][0]
    assert group["params"] == [0, 1, 2, 3, 4, 5, 6]
    assert group["param_names"] == [n for n, _ in model.named_parameters()]
    assert group["lr"] == 0.01 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert group["amsgrad"] is True and group["weight_decay"] == 0.0
    train(model, opt, 2)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert float(sd["state"][6]["step"]) == 2.0
    # the live view of torch's opt.state
    st = opt.state[model.scale]
    assert st["exp_avg"].shape == () and torch.equal(st["exp_avg"], sd["state"][0]["exp_avg"])
    rms = torch_optimizer(mo.RMSProp(decay=0.95, momentum=0.5), model.parameters())
    g = rms.param_groups[0]
    assert g["alpha"] == 0.95 and g["momentum"] == 0.5 and "param_names" not in g
    train(model, rms, 1)
    assert set(rms.state_dict()["state"][0]) == {"step", "square_avg", "momentum_buffer"}
    # a state dict saved before any step loads into a trained wrapper: back to fresh
    fresh_sd = ours_for("amsgrad", make_model()).state_dict()
    opt.load_state_dict(fresh_sd)
    assert opt.mithril_state is None and opt.state_dict()["state"] == {}


def snapshot(model: nn.Module, opt: TorchOptimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            copy.deepcopy({k: v for k, v in opt.param_groups[0].items() if k != "params"}),
            opt.mithril_optimizer.hyperparameters(), opt.state_dict())


def bad_dicts(good: dict) -> dict[str, tuple[dict, type, str]]:
    def edit(fn):
        d = copy.deepcopy(good)
        fn(d)
        return d

    def pop(d, *path):
        for k in path[:-1]:
            d = d[k]
        d.pop(path[-1])

    return {
        "not a dict": ([1, 2], TypeError, "must be a dict"),
        "neither ours nor torch's": (edit(lambda d: d.pop("mithril") and d["param_groups"][0]
                                          .pop("mithril") and d["param_groups"][0].update(
            params=[0.5] * 7)), ValueError, "no 'mithril' entry and is not a torch.optim"),
        "another optimizer": (edit(lambda d: d["mithril"].update(optimizer="SGD")), ValueError,
                              "is for 'SGD', not Adam"),
        "two groups": (edit(lambda d: d["param_groups"].append(d["param_groups"][0])),
                       ValueError, "one group"),
        "fewer params": (edit(lambda d: d["param_groups"][0].update(params=[0, 1])), ValueError,
                         "has 2 parameters, this optimizer's 7"),
        "missing entry": (edit(lambda d: d["state"].pop(3)), KeyMismatchError, "missing [3]"),
        "missing slot": (edit(lambda d: pop(d, "state", 3, "exp_avg_sq")), KeyMismatchError,
                         "slot 'v' must have exactly the parameters"),
        "unknown slot": (edit(lambda d: d["state"][0].update(bogus=torch.zeros(1))),
                         KeyMismatchError, "['bogus'] unknown to Adam"),
        "bad shape": (edit(lambda d: d["state"][1].update(exp_avg=torch.zeros(5))), ShapeError,
                      "of 'shift' has shape (5,), the parameter (3,)"),
        "bad lr": (edit(lambda d: d["param_groups"][0].update(lr=-1.0)), ValueError,
                   "learning_rate must be >= 0"),
        "bad betas": (edit(lambda d: d["param_groups"][0].update(betas=(0.9,))), ValueError,
                      "'betas'] must be a sequence of 2 numbers"),
        "bad beta2": (edit(lambda d: d["param_groups"][0].update(betas=(0.9, 1.5))),
                      ValueError, "beta2 must be in [0, 1)"),
        "bad epsilon": (edit(lambda d: d["mithril"]["hyperparameters"].update(epsilon=0.0)
                             or d["param_groups"][0].pop("eps")),
                        ValueError, "epsilon must be > 0"),
        "unknown hyperparameter": (edit(lambda d: d["mithril"]["hyperparameters"].update(
            foo=1)), KeyMismatchError, "['foo'] unknown to Adam"),
        "bad step": (edit(lambda d: d["mithril"].update(step=-3)), ValueError,
                     "'step' must be a non-negative int"),
        "step without state": (edit(lambda d: d.update(state={})), ValueError,
                               "has step 10 but no per-parameter state"),
        "non-numeric slot": (edit(lambda d: d["state"][0].update(exp_avg="x")), TypeError,
                             "is not numeric"),
    }


def test_bad_state_dict_refused_nothing_changed():
    model = make_model()
    opt = ours_for("adam", model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    train(model, opt, 10, sched=sched)
    good = opt.state_dict()
    ref_model = copy.deepcopy(model)
    before = snapshot(model, opt)
    buffer = opt.mithril_state.params_flat
    for label, (bad, exc, msg) in bad_dicts(good).items():
        with pytest.raises(exc, match=re.escape(msg)):
            opt.load_state_dict(bad)
        after = snapshot(model, opt)
        assert_same_dict(after[0], before[0], label)
        assert after[1] == before[1], label
        assert after[2] == before[2], label
        assert_same_dict(after[3], before[3], label)
        assert opt.mithril_state.params_flat is buffer, label
    # and training continues as if nothing happened
    ref_opt = ours_for("adam", ref_model)
    ref_opt.load_state_dict(good)
    train(model, opt, 5, start=10)
    train(ref_model, ref_opt, 5, start=10)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
