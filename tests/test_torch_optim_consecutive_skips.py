"""torch_optimizer state dicts keep the non-finite steps in a row (``max_consecutive_skips``,
optax ``apply_if_finite``'s ``notfinite_count``): a resume in the middle of a run of skipped
steps forces the same step as the unbroken run does."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from mithril.interop import torch_optimizer
from mithril.utils.optimizers import Adam

#: per step: whether the gradient is NaN (runs of 1 and 4; the limit is 2)
NAN_AT = [False, True, False, True, True, True, True, False, False]


def _grads(step: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(step)
    g = [torch.tensor(rng.standard_normal((3, 2))), torch.tensor(rng.standard_normal(2))]
    if NAN_AT[step]:
        g[0][0, 0] = float("nan")
    return g


def _run(resume_at: int | None) -> tuple[list[torch.Tensor], list[int]]:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64)),
          torch.nn.Parameter(torch.randn(2, dtype=torch.float64))]

    def make():
        return torch_optimizer(Adam(learning_rate=0.1, nonfinite="skip",
                                    max_consecutive_skips=2),
                               [("w", ps[0]), ("b", ps[1])])
    opt, counts = make(), []
    for step in range(len(NAN_AT)):
        if step == resume_at:
            sd = opt.state_dict()
            opt = make()
            opt.load_state_dict(sd)
        for p, g in zip(ps, _grads(step)):
            p.grad = g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        counts.append(opt.mithril_state.consecutive_skips)
    return [p.detach().clone() for p in ps], counts


def test_a_resume_mid_run_of_skips_forces_the_same_step():
    want, counts = _run(None)
    # optax's notfinite_count after each step; the 3rd NaN in a row (step 5) is applied
    assert counts == [0, 1, 0, 1, 2, 3, 4, 5, 6]
    assert torch.isnan(want[0]).any()  # (the forced step put the NaN in, as optax does)
    for at in (4, 5, 6):  # resumed with 1, 2 and 3 non-finite steps in a row behind it
        got, got_counts = _run(at)
        assert got_counts == counts
        for a, b in zip(got, want):
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
