"""mithril.distributed: refused saves, loads and steps change nothing; shapes, dtypes
(0-d, bfloat16) and Lookahead round-trip. One process (fast); the two-rank cases of the same
rules run in ``tests/test_distributed.py``'s jobs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mithril.distributed import DataParallel, load_sharded, save_sharded
from mithril.errors import CheckpointError, DTypeError, KeyMismatchError, ShapeError
from mithril.utils.optimizers import ASGD, Adam, Lookahead, Novograd


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}


def _grads(p: dict, t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10 + t)
    return {n: rng.normal(size=np.shape(a)) for n, a in p.items()}


def _snapshot(folder) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("shard", [False, True])
def test_refused_save_leaves_the_checkpoint(tmp_path, shard) -> None:
    """Bugs 1, 3: a save refused (missing key, int dtype, wrong shape, float32 params of a
    float64 state) raises a library error naming the key and leaves the earlier checkpoint
    byte for byte, loadable with its numbers."""
    dp = DataParallel(Adam(0.1), shard_state=shard)
    p = _params()
    st = dp.init(p)
    p, st = dp.update(p, _grads(p, 0), st)
    save_sharded(tmp_path, p, dp, st)
    before = _snapshot(tmp_path)
    good = {n: np.array(a) for n, a in p.items()}
    p, st = dp.update(p, _grads(p, 1), st)
    bad = [({"w": p["w"]}, KeyMismatchError, "missing \\['b'\\]"),
           (dict(p, b=np.arange(3)), DTypeError, "params\\['b'\\] has dtype int64"),
           (dict(p, w=np.ones((3, 4))), ShapeError, "params\\['w'\\] has shape \\(3, 4\\)"),
           ({n: a.astype(np.float32) for n, a in p.items()}, DTypeError,
            "params\\['w'\\] has dtype float32, the state's parameters float64")]
    for params, cls, msg in bad:
        with pytest.raises(cls, match=msg):
            save_sharded(tmp_path, params, dp, st)
        assert _snapshot(tmp_path) == before
    loaded, st2 = load_sharded(tmp_path, DataParallel(Adam(0.1), shard_state=shard))
    assert st2.step == 1
    for n in good:
        np.testing.assert_array_equal(loaded[n], good[n])
        assert loaded[n].dtype == np.float64


def test_refused_save_keeps_another_world_sizes_checkpoint(tmp_path) -> None:
    """Bug 1: a checkpoint of 2 shards (another world size) survives a refused save."""
    dp = DataParallel(Adam(0.1))
    p = _params()
    st = dp.init(p)
    save_sharded(tmp_path, p, dp, st)
    os.rename(tmp_path / "shard-00000-of-00001.safetensors",
              tmp_path / "shard-00000-of-00002.safetensors")  # stands for a 2-rank save
    (tmp_path / "shard-00001-of-00002.safetensors").write_bytes(b"rank 1's shard")
    before = _snapshot(tmp_path)
    with pytest.raises(KeyMismatchError, match="missing \\['b'\\]"):
        save_sharded(tmp_path, {"w": p["w"]}, dp, st)
    assert _snapshot(tmp_path) == before
    path = save_sharded(tmp_path, p, dp, st)  # a good save replaces it, stale shards go
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


@pytest.mark.parametrize("make", [lambda: Novograd(0.01), lambda: ASGD(0.01)])
def test_zero_dimensional_arrays_round_trip(tmp_path, make) -> None:
    """Bug 2: 0-d parameters and per-tensor 0-d slots keep their shape and values."""
    p = {"w": np.ones((4, 3)), "scale": np.array(2.0)}
    dp = DataParallel(make(), shard_state=True)
    st = dp.init(p)
    for t in range(2):
        p, st = dp.update(p, _grads(p, t), st)
    save_sharded(tmp_path, p, dp, st)
    loaded, st2 = load_sharded(tmp_path, DataParallel(make(), shard_state=True))
    assert loaded["scale"].shape == () and float(loaded["scale"]) == float(p["scale"])
    for s in st.local.slots:
        for n, a in st.slot(s).items():
            assert np.shape(st2.slot(s)[n]) == np.shape(a)
            np.testing.assert_array_equal(st2.slot(s)[n], a)
    assert st2.step == 2


def test_refused_load_changes_nothing(tmp_path) -> None:
    """Bug 9: a load refused (slots of another optimizer) leaves ``dp`` unbound: torch
    parameters then start fresh with it."""
    p = _params()
    dp0 = DataParallel(Adam(0.1))
    save_sharded(tmp_path, p, dp0, dp0.init(p))
    opt = Adam(0.1, amsgrad=True)
    dp = DataParallel(opt)
    with pytest.raises(CheckpointError, match="slots \\['m', 'v'\\].*'vmax'"):
        load_sharded(tmp_path, dp, backend="torch")
    assert opt._backend is None
    tp = {n: torch.from_numpy(a.copy()) for n, a in p.items()}
    st = dp.init(tp)
    out, st = dp.update(tp, {n: torch.from_numpy(g) for n, g in _grads(p, 0).items()}, st)
    ref_opt = Adam(0.1, amsgrad=True)
    ref, _ = ref_opt.update(p, _grads(p, 0), ref_opt.init(p))
    for n in p:
        np.testing.assert_array_equal(out[n].numpy(), ref[n])


def test_clip_norm_set_after_init_is_refused() -> None:
    """Bug 5: clip_norm set after init with per-tensor clipping, sharded: refused at the
    step, nothing changed."""
    opt = Adam(0.05, clip_tensor_norm=0.3)
    dp = DataParallel(opt, shard_state=True)
    p = _params()
    st = dp.init(p)
    opt.clip_norm = 0.2
    with pytest.raises(NotImplementedError, match="clip_norm together with \\['clip_tensor"):
        dp.update(p, _grads(p, 0), st)
    assert st.step == 0 and st.last_grad_norm is None
    assert all(not np.any(a) for a in st.slot("m").values())


@pytest.mark.parametrize("shard", [False, True])
def test_lookahead(tmp_path, shard) -> None:
    """Bug 6: Lookahead, replicated and sharded, is the wrapped optimizer step for step
    (sync steps included), and its checkpoint round-trips."""
    def make() -> Lookahead:
        return Lookahead(Adam(0.05, clip_norm=0.3), sync_period=3)

    ref_opt = make()
    ref = _params()
    ref_st = ref_opt.init(ref)
    dp = DataParallel(make(), shard_state=shard)
    p = _params()
    st = dp.init(p)
    for t in range(7):
        ref, ref_st = ref_opt.update(ref, _grads(ref, t), ref_st)
        p, st = dp.update(p, _grads(p, t), st)
    for n in ref:
        np.testing.assert_allclose(p[n], ref[n], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(st.slot("slow")["w"], ref_st.slot("slow")["w"], rtol=1e-13)
    save_sharded(tmp_path, p, dp, st)
    loaded, st2 = load_sharded(tmp_path, DataParallel(make(), shard_state=shard))
    assert st2.step == 7
    np.testing.assert_array_equal(st2.slot("slow")["w"], st.slot("slow")["w"])


@pytest.mark.parametrize("shard", [False, True])
def test_bfloat16_torch(tmp_path, shard) -> None:
    """Bug 7: torch bfloat16 parameters: init, steps equal the wrapped Adam's, and the
    sharded checkpoint loads back bfloat16, bit for bit."""
    def tp() -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(a).to(torch.bfloat16) for n, a in _params().items()}

    def tg(t: int) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(g).to(torch.bfloat16) for n, g in _grads(_params(), t).items()}

    ref_opt = Adam(0.01)
    ref = tp()
    ref_st = ref_opt.init(ref)
    dp = DataParallel(Adam(0.01), shard_state=shard)
    p = tp()
    st = dp.init(p)
    for t in range(3):
        ref, ref_st = ref_opt.update(ref, tg(t), ref_st)
        p, st = dp.update(p, tg(t), st)
    for n in ref:
        assert p[n].dtype == torch.bfloat16
        torch.testing.assert_close(p[n], ref[n], rtol=0, atol=0)
    save_sharded(tmp_path, p, dp, st)
    loaded, st2 = load_sharded(tmp_path, DataParallel(Adam(0.01), shard_state=shard),
                               backend="torch")
    for n in p:
        assert loaded[n].dtype == torch.bfloat16
        assert torch.equal(loaded[n], p[n])
        assert torch.equal(st2.slot("m")[n], st.slot("m")[n])
