"""Parameter groups against torch.optim's param_groups and optax's multi_transform (hunt 65)."""

from __future__ import annotations

import pytest
import torch

from mithril.interop import torch_optimizer
from mithril.utils.optimizers import Adam


def _params(n: int = 4) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64)) for _ in range(n)]


def _grads(step: int, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(3, 2, dtype=torch.float64, generator=g) for _ in range(n)]


def test_torch_flag_in_a_group_is_refused_when_the_group_is_given() -> None:
    """``torch_optimizer(Adam(), [..., {"params": ..., "maximize": True}])`` was taken and
    refused only at the first step; ``add_param_group({..., "maximize": True})`` mid-run was
    taken too, leaving an optimizer every later step refused (the group could not be
    dropped). Both are refused when the group is given, naming it, nothing changed: the run
    goes on as ``torch.optim.Adam``'s without that group."""
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['maximize'\] = True: Adam has "
                                         r"no 'maximize'"):
        torch_optimizer(Adam(learning_rate=0.1), [{"params": _params()[:2]},
                                                  {"params": _params()[2:], "maximize": True}])

    ours, theirs = _params(), _params()
    opt = torch_optimizer(Adam(learning_rate=0.1), ours[:2])
    ref = torch.optim.Adam(theirs[:2], lr=0.1)
    for step in range(6):
        if step == 3:
            for key, value in [("maximize", True), ("decoupled_weight_decay", True)]:
                with pytest.raises(ValueError, match=rf"param_groups\[1\]\['{key}'\] = True"):
                    opt.add_param_group({"params": ours[2:], "lr": 0.02, key: value})
            assert len(opt.param_groups) == 1
            assert [len(g["params"]) for g in opt.state_dict()["param_groups"]] == [2]
            opt.add_param_group({"params": ours[2:], "lr": 0.02, "maximize": False})
            ref.add_param_group({"params": theirs[2:], "lr": 0.02})
        n = 4 if step >= 3 else 2
        for p, q, g in zip(ours[:n], theirs[:n], _grads(step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_schedule_of_an_optimizer_at_zero_with_group_rates_is_refused() -> None:
    """torch's ``Adam([{"params": frozen, "lr": 0}, {"params": head, "lr": 0.02}])`` ported
    as ``Adam(0.0, param_groups=[{"params": ["head"], "lr": 0.02}])`` with ``StepLR(opt)``:
    the scheduler moved the optimizer's rate (0) and every group with it, so its first step
    set the head's rate to 0 and training stopped silently (torch's decays it from 0.02).
    Refused now, naming the group and per_group=True, nothing changed; per_group=True gives
    torch's rates and parameters."""
    import numpy as np

    from mithril.utils import lr_schedulers as ls

    rng = np.random.default_rng(0)
    params = {"frozen": rng.standard_normal((3, 2)), "head": rng.standard_normal(2)}
    opt = Adam(learning_rate=0.0, param_groups=[{"params": ["head"], "lr": 0.02}])
    for make in (lambda: ls.StepLR(opt, 2, 0.5),
                 lambda: ls.CosineAnnealingLR(opt.hyperparameter("learning_rate"), 5, 1e-3)):
        with pytest.raises(ValueError, match=r"param_groups\[0\] has a rate of its own "
                                             r"\(0.02\).*per_group=True"):
            make()
        assert (opt.get_learning_rate(), opt.get_learning_rate(0)) == (0.0, 0.02)
    sched = ls.StepLR(opt, 2, 0.5, per_group=True)

    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ref = torch.optim.Adam([{"params": [t["frozen"]], "lr": 0.0},
                            {"params": [t["head"]], "lr": 0.02}])
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, 2, 0.5)
    state = opt.init(params)
    p = {k: v.copy() for k, v in params.items()}
    for _ in range(6):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        p, state = opt.update(p, grads, state)
        for k, v in t.items():
            v.grad = torch.tensor(grads[k])
        ref.step()
        sched.step()
        ref_sched.step()
        assert np.allclose(sched.get_last_lrs(), [g["lr"] for g in ref.param_groups],
                           rtol=1e-15, atol=0)
    assert opt.get_learning_rate(0) == pytest.approx(0.0025, rel=1e-15)
    for k in p:
        np.testing.assert_allclose(p[k], t[k].detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(p["frozen"], params["frozen"])


def test_group_naming_an_unknown_parameter_beside_known_ones_is_said() -> None:
    """A group listing a typo beside a real name (``["b", "bb"]``; a dict with an entry
    no parameter has) was silent, with ``strict=True`` too: only a group matching nothing
    was reported. It warns now, naming the unknown ones, and with ``strict=True`` the
    update raises, params and state unchanged; the known names still take the group's
    rate (torch's AdamW with the same groups)."""
    import numpy as np

    from mithril.utils.optimizers import AdamW

    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    for listed in (["b", "bb"], ("b", "bb"), {"b": True, "w": False, "bb": True}):
        opt = AdamW(learning_rate=0.1, weight_decay=0.1, strict=True,
                    param_groups=[{"params": listed, "lr": 0.02}])
        state = opt.init(params)
        with pytest.raises(ValueError, match=r"param_groups\[0\] names unknown parameters "
                                             r"\['bb'\]"):
            opt.update(params, grads, state)
        assert state.step == 0 and not state.slot("m")["b"].any()

        opt = AdamW(learning_rate=0.1, weight_decay=0.1,
                    param_groups=[{"params": listed, "lr": 0.02}])
        state = opt.init(params)
        with pytest.warns(UserWarning, match=r"names unknown parameters \['bb'\]"):
            p, state = opt.update(params, grads, state)
        t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        ref = torch.optim.AdamW([{"params": [t["w"]]}, {"params": [t["b"]], "lr": 0.02}],
                                lr=0.1, weight_decay=0.1)
        for k, v in t.items():
            v.grad = torch.tensor(grads[k])
        ref.step()
        for k in p:
            np.testing.assert_allclose(p[k], t[k].detach().numpy(), rtol=1e-12, atol=1e-15)


def test_a_groups_refused_rate_is_named_by_its_group() -> None:
    """``opt.set_learning_rate(-1.0, group=1)`` said only "learning_rate must be >= 0"
    (the handle's ``set`` names the group): it names ``param_groups[1]`` now, and the
    refused call changes no group (torch's AdamW with the same groups steps alike)."""
    import numpy as np

    from mithril.utils.optimizers import AdamW

    opt = AdamW(learning_rate=0.1, param_groups=[{"params": ["a"], "lr": 0.2},
                                                 {"params": ["b"], "lr": 0.3}])
    for bad, err in [(-1.0, ValueError), (float("nan"), ValueError), ("x", TypeError)]:
        with pytest.raises(err, match=r"^AdamW param_groups\[1\]: learning_rate must be"):
            opt.set_learning_rate(bad, group=1)
    assert [opt.get_learning_rate(g) for g in (None, 0, 1)] == pytest.approx([0.1, 0.2, 0.3],
                                                                             rel=1e-15)
    params = {k: np.ones(2) for k in "wab"}
    grads = {k: np.full(2, 0.5) for k in "wab"}
    p, _ = opt.update(params, grads, opt.init(params))
    t = {k: torch.ones(2, dtype=torch.float64, requires_grad=True) for k in "wab"}
    ref = torch.optim.AdamW([{"params": [t["w"]]}, {"params": [t["a"]], "lr": 0.2},
                             {"params": [t["b"]], "lr": 0.3}], lr=0.1)
    for v in t.values():
        v.grad = torch.full((2,), 0.5, dtype=torch.float64)
    ref.step()
    for k in p:
        np.testing.assert_allclose(p[k], t[k].detach().numpy(), rtol=1e-12, atol=1e-15)
