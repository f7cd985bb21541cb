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


_KERAS_EMPTY = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np, keras
keras.config.set_floatx("float64")
rng = np.random.default_rng(0)
p0 = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
gs = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(5)]
opt = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)
opt.exclude_from_weight_decay(var_names=[])
vs = [keras.Variable(p0[k], name=k) for k in ("w", "b")]
opt.build(vs)
for g in gs:
    opt.apply([g["w"], g["b"]], vs)
print(json.dumps([np.asarray(v.value).tolist() for v in vs]))
"""


def test_exclude_from_weight_decay_var_names_empty_excludes_nothing_as_keras():
    import json

    from conftest import run_python

    import mithril.utils.optimizers as mo

    ref = json.loads(run_python(_KERAS_EMPTY, timeout=300).strip().splitlines()[-1])
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    gs = [{k: rng.standard_normal(v.shape) for k, v in p.items()} for _ in range(5)]
    opt = mo.AdamW(learning_rate=0.1, weight_decay=0.5, epsilon=1e-7, convention="keras")
    opt.exclude_from_weight_decay(var_names=[])  # (was 'needs names=, regex= or var_names=')
    state = opt.init(p)
    for g in gs:
        p, state = opt.update(p, g, state)
    np.testing.assert_allclose(p["w"], ref[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p["b"], ref[1], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="needs names="):
        opt.exclude_from_weight_decay()


@pytest.mark.parametrize("y, p", [
    ([1.0, 2.0, 4.0], [1.5, 2.0, 3.0]),   # an ordinary target
    ([3.0, 3.0, 3.0], [3.0, 3.0, 3.0]),   # constant, predicted exactly: 1
    ([3.0, 3.0, 3.0], [2.0, 3.0, 3.5]),   # constant, not exactly: 0 (was NaN)
])
def test_r_squared_as_sklearn_r2_score(y, p):
    from sklearn.metrics import r2_score

    from mithril.cli.run_types import r_squared

    y, p = np.asarray(y), np.asarray(p)
    ours = r_squared(float(np.sum((p - y) ** 2)), float(np.sum((y - y.mean()) ** 2)))
    assert ours == pytest.approx(r2_score(y, p), abs=1e-15)
