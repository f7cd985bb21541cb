"""The first update's memory (issue #16, point 3): mithril's ``torch_optimizer`` moves each
``nn.Parameter`` into the flat buffer before copying the next, so the old storages are
freed as it goes; the engines' zero buffers are lazy (``calloc``) zero pages."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mithril.interop import torch_optimizer  # noqa: E402
from mithril.utils.optimizers import Adam  # noqa: E402


def test_torch_optimizer_frees_the_old_storages_on_the_first_step():
    rng = np.random.default_rng(0)
    hosts = [rng.standard_normal(s).astype(np.float32) for s in (300, 7, 64)]
    refs = [weakref.ref(a) for a in hosts]
    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in hosts]
    expect = {f"p{i}": a.copy() for i, a in enumerate(hosts)}
    grads = {f"p{i}": rng.standard_normal(a.shape).astype(np.float32) for i, a in enumerate(hosts)}
    del hosts
    for p, g in zip(params, grads.values(), strict=True):
        p.grad = torch.from_numpy(g.copy())
    opt = torch_optimizer(Adam(learning_rate=0.1), params)
    opt.step()
    gc.collect()
    assert all(r() is None for r in refs)  # the original storages are gone
    flat = opt.mithril_state.params_flat
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert all(lo <= p.data_ptr() < hi for p in params)
    # bit for bit the functional update
    ref = Adam(learning_rate=0.1)
    new, _ = ref.update(expect, grads, ref.init(expect))
    for p, k in zip(params, new, strict=True):
        np.testing.assert_array_equal(p.detach().numpy(), new[k])
    opt.step()  # later steps run in place over the same buffer
    assert all(lo <= p.data_ptr() < hi for p in params)


def test_adopt_storage_only_before_the_first_update():
    p = {"w": torch.ones(3)}
    opt = Adam(learning_rate=0.1)
    state = opt.init(p)
    p, state = opt.update(p, {"w": torch.ones(3)}, state)
    with pytest.raises(ValueError, match="before the first update"):
        state.engine.adopt_storage(state, {"w": torch.ones(3)}, lambda n, v: None)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_zero_buffers_are_zero(kind):
    p = {"w": np.ones(1000, np.float32)}
    if kind == "torch":
        p = {"w": torch.ones(1000)}
    state = Adam(learning_rate=0.1).init(p)
    for s in state.slots.values():
        assert not np.asarray(s).any()
