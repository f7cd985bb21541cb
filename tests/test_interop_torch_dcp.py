"""``torch_optimizer`` through ``torch.distributed.checkpoint``: its state-dict helpers
(``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, which keep only ``state`` and
``param_groups``) and a ``dcp.save`` / ``dcp.load`` round trip resume training exactly,
side by side with ``torch.optim.Adam`` doing the same."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from mithril.interop import torch_optimizer
from mithril.utils.optimizers import Adam

X, Y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
MAKERS = {"torch.optim.Adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.1),
          "mithril Adam": lambda m: torch_optimizer(Adam(learning_rate=0.01, weight_decay=0.1),
                                                    m.parameters())}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).double()


def _steps(m, o, n) -> None:
    for _ in range(n):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(X), Y).backward()
        o.step()


def _resumed(make, via, tmp_path) -> list[torch.Tensor]:
    m = _model()
    o = make(m)
    _steps(m, o, 3)
    m2, ref = _model(), None
    m2.load_state_dict(m.state_dict())
    o2 = make(m2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (DCP's own warnings about a process group)
        sd = get_optimizer_state_dict(m, o)
        if via == "dcp.save":
            dcp.save({"optim": sd}, checkpoint_id=str(tmp_path / type(o).__name__))
            sd = get_optimizer_state_dict(m2, o2)
            holder = {"optim": sd}
            dcp.load(holder, checkpoint_id=str(tmp_path / type(o).__name__))
            sd = holder["optim"]
        set_optimizer_state_dict(m2, o2, copy.deepcopy(sd))
    _steps(m, o, 3)
    _steps(m2, o2, 3)
    ref = [p.detach().clone() for p in m.parameters()]
    got = [p.detach().clone() for p in m2.parameters()]
    return ref, got


@pytest.mark.parametrize("via", ["state_dict helpers", "dcp.save"])
def test_resume_through_distributed_checkpoint_is_exact_as_torch_optim(via, tmp_path):
    ref_t, got_t = _resumed(MAKERS["torch.optim.Adam"], via, tmp_path)
    ref_m, got_m = _resumed(MAKERS["mithril Adam"], via, tmp_path)
    for a, b in zip(ref_t, got_t):  # torch: resumed exactly
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ref_m, got_m):  # ours too (it raised "no 'mithril' entry" before)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ref_t, ref_m):  # and the two optimizers agree
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
