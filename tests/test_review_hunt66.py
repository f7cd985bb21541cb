"""Follow-ups to the sixty-sixth session's reviews, each checked against its peer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mithril.utils.mixed_precision import LossScaler


@pytest.mark.parametrize("conv", ["savez", "torch"])
def test_loss_scaler_state_of_0d_arrays_loads(tmp_path, conv):
    # A state dict kept as 0-d arrays (np.savez) or tensors (torch's own tracker is a tensor)
    # loads as torch.amp.GradScaler.load_state_dict takes it.
    s = LossScaler(init_scale=1024.0, growth_interval=5)
    s.load_state_dict({**s.state_dict(), "growth_tracker": 3, "_growth_tracker": 3})
    d = s.state_dict()
    if conv == "savez":
        np.savez(tmp_path / "s.npz", **d)
        with np.load(tmp_path / "s.npz") as f:
            saved = {k: f[k] for k in f.files}
    else:
        saved = {k: torch.tensor(v) for k, v in d.items()}
    t = LossScaler()
    t.load_state_dict(saved)
    assert t.state_dict() == d
    ref = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=5)
    ref.load_state_dict({k: saved[k] for k in ("scale", "growth_factor", "backoff_factor",
                                               "growth_interval", "_growth_tracker")})
    for _ in range(3):  # both grow on the second finite step: tracker 3 -> 4 -> grow
        ref._scale = torch.tensor([float(ref.get_scale())])
        ref._growth_tracker = torch.tensor([int(ref._get_growth_tracker())], dtype=torch.int32)
        torch._amp_update_scale_(ref._scale, ref._growth_tracker, torch.zeros(1), 2.0, 0.5, 5)
        t.update(found_inf=False)
        assert t.scale == float(ref._scale) and t.growth_tracker == int(ref._growth_tracker)
    assert t.scale == 2048.0


def test_loss_scaler_state_array_of_wrong_kind_is_refused_and_changes_nothing():
    s = LossScaler(init_scale=8.0)
    before = s.state_dict()
    bad = {**LossScaler(init_scale=4.0).state_dict(), "growth_interval": np.asarray(5.0)}
    with pytest.raises(TypeError, match="growth_interval"):
        s.load_state_dict(bad)
    bad["growth_interval"] = np.asarray([5])
    with pytest.raises(TypeError, match="growth_interval"):
        s.load_state_dict(bad)
    assert s.state_dict() == before
