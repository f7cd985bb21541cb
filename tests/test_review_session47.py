"""Session 47's integration of the reviews: what the reviewers found outside their files,
each against the installed peer run in the same test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mithril.interop import torch_optimizer
from mithril.utils.optimizers import Adafactor


def _torch_run(make, steps: int = 10) -> list[torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    opt = make(m)
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


def test_adafactor_takes_torchs_param_groups() -> None:
    """torch's groups repeat every value, Adafactor's ``convention`` too: a repeated one is
    taken (it was refused), so the drop-in equals ``torch.optim.Adafactor`` with groups."""
    def groups(m):
        return [{"params": m[0].parameters(), "lr": 0.05},
                {"params": m[1].parameters(), "weight_decay": 0.1, "beta2_decay": -0.5}]

    theirs = _torch_run(lambda m: torch.optim.Adafactor(groups(m), lr=0.01))
    ours = _torch_run(lambda m: torch_optimizer(Adafactor(learning_rate=0.01), groups(m)))
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    assert float((theirs[0] - _torch_run(lambda m: torch.optim.Adafactor(
        m.parameters(), lr=0.01))[0]).abs().max()) > 1e-3  # (the groups mattered)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: \['convention'\] hold for the "
                                         r"whole step"):
        Adafactor(param_groups=[{"params": ["w"], "convention": "keras"}])
    opt = Adafactor(param_groups=[{"params": ["w"], "convention": "torch"}])  # (restated)
    assert "convention" not in opt.param_groups[0]
    assert np.isclose(opt.learning_rate, 1e-2)
