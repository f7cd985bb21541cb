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


# -- Optimizer.adopt: the caller hands its arrays over (issue #16, point 3) ----------------

def _pair(kind, rng, shapes=((30, 4), (7,), (64,))):
    conv = torch.from_numpy if kind == "torch" else (lambda a: a)
    hosts = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    grads = [{k: conv(rng.standard_normal(v.shape).astype(np.float32)) for k, v in hosts.items()}
             for _ in range(3)]
    return ({k: conv(v.copy()) for k, v in hosts.items()},
            {k: conv(v.copy()) for k, v in hosts.items()}, grads)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("make", [lambda: Adam(learning_rate=0.1),
                                  lambda: __import__("mithril.utils.optimizers", fromlist=["SGD"])
                                  .SGD(0.1, momentum=0.9, nesterov=True)])
def test_adopt_moves_the_params_and_equals_the_plain_path(kind, make):
    rng = np.random.default_rng(1)
    ref, mine, grads = _pair(kind, rng)
    refs = [weakref.ref(v) for v in mine.values()] if kind == "numpy" else []
    o1, o2 = make(), make()
    s1, s2 = o1.init(ref), o2.init(mine)
    held = o2.adopt(mine, s2)
    gc.collect()
    assert all(r() is None for r in refs)  # the caller's arrays are gone
    assert list(held) == list(mine) and all(mine[k] is held[k] for k in held)  # entries replaced
    flat = np.asarray(s2.params_flat)
    for v in held.values():  # views of the state's flat buffer
        assert np.shares_memory(np.asarray(v), flat)
    for g in grads:
        ref, s1 = o1.update(ref, g, s1)
        held, s2 = o2.update(held, g, s2)
    for k in ref:  # bit for bit the plain path
        np.testing.assert_array_equal(np.asarray(ref[k]), np.asarray(held[k]))


def test_adopt_after_updates_writes_the_existing_buffer():
    rng = np.random.default_rng(2)
    ref, mine, grads = _pair("numpy", rng)
    o1, o2 = Adam(learning_rate=0.1), Adam(learning_rate=0.1)
    s1, s2 = o1.init(ref), o2.init(mine)
    ref, s1 = o1.update(ref, grads[0], s1)
    mine, s2 = o2.update(mine, grads[0], s2)
    buffer = s2.params_flat
    new = {k: v + 1 for k, v in mine.items()}  # e.g. loaded from a checkpoint
    ref = {k: v + 1 for k, v in ref.items()}
    mine = o2.adopt(new, s2)
    assert s2.params_flat is buffer
    ref, s1 = o1.update(ref, grads[1], s1)
    mine, s2 = o2.update(mine, grads[1], s2)
    for k in ref:
        np.testing.assert_array_equal(ref[k], mine[k])


def test_adopt_refuses_bad_params_before_anything_changes():
    rng = np.random.default_rng(3)
    _, mine, _ = _pair("numpy", rng)
    opt = Adam(learning_rate=0.1)
    state = opt.init(mine)
    bad = dict(mine, p1=np.zeros(8, np.float32))
    before = dict(bad)
    with pytest.raises(Exception, match="shape"):
        opt.adopt(bad, state)
    assert state.params_flat is None and all(bad[k] is before[k] for k in bad)
    with pytest.raises(TypeError, match="dict"):
        opt.adopt(__import__("types").MappingProxyType(mine), state)


def test_adopt_changes_nothing_where_there_is_no_flat_host_buffer():
    p = {"w": torch.ones(3, dtype=torch.float16)}  # float16: the array engine
    opt = Adam(learning_rate=0.1, epsilon=1e-4)
    state = opt.init(p)
    out = opt.adopt(p, state)
    assert out["w"] is p["w"] and state.params_flat is None


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_train_step_init_adopt_equals_the_separate_calls(kind):
    import mithril as ml
    from mithril.backends import NumpyBackend, TorchBackend
    from mithril.cli.networks import mlp_spec
    from mithril.utils.training import make_train_step

    def problem():
        spec = mlp_spec(8, 4, [16, 12])
        be = {"numpy": NumpyBackend, "torch": TorchBackend}[kind](dtype="float32", seed=0)
        compiled = ml.compile(spec.model, be, shapes=spec.shapes)
        rng = np.random.default_rng(0)
        data = [{"input": be.array(rng.standard_normal((32, 8)).astype(np.float32)),
                 "target": be.array(rng.integers(0, 4, 32), be.int_dtype)} for _ in range(3)]
        return compiled, be, data

    compiled, be, batches = problem()
    params, opt = compiled.get_parameters(), Adam(learning_rate=1e-2)
    state = opt.init(params)
    for data in batches:
        _, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
        params, state = opt.update(params, grads, state)
    compiled2, _, _ = problem()
    mine, opt2 = compiled2.get_parameters(), Adam(learning_rate=1e-2)
    step = make_train_step(compiled2, opt2, loss="loss")
    state2 = step.init(mine, adopt=True)
    flat = np.asarray(be.to_numpy(state2.params_flat))
    assert all(np.shares_memory(np.asarray(be.to_numpy(v)), flat) for v in mine.values())
    for data in batches:
        mine, state2, _ = step(mine, state2, data)
    for k in params:
        np.testing.assert_array_equal(be.to_numpy(mine[k]), be.to_numpy(params[k]), err_msg=k)
