"""Follow-ups of the state-dict fuzzer: each average's update counts bounded by the step
(2**70 was a bare OverflowError from NumPy's int64) in a state dict and a sharded
checkpoint; ``Accumulate.state_dict(state, arrays="torch")`` through ``torch.save`` and
``torch.load(weights_only=True)`` with no allowed globals, resuming bit for bit."""

from __future__ import annotations

import copy
import glob
import io
import json
import os

import numpy as np
import pytest
import torch

from mithril.distributed import DataParallel, load_sharded, save_sharded
from mithril.utils.accumulation import Accumulate
from mithril.utils.checkpoint_io import read_file, write_file
from mithril.utils.optimizers import SGD, Adam
from mithril.utils.optimizers.averaging import loaded_counts, merged_counts


def _problem(steps: int = 3) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    return p, [{n: rng.standard_normal(a.shape) for n, a in p.items()} for _ in range(steps)]


def _averaged_state():
    opt = Adam(0.05, ema_decay=0.9)
    p, grads = _problem()
    st = opt.init(p)
    for g in grads:
        p, st = opt.update(p, g, st)
    return opt, st


@pytest.mark.parametrize("count, msg", [
    (2**70, "'averaged' count of 'ema' for 'w' is 1180591620717411303424, beyond the 3 steps"),
    (4, "'averaged' count of 'ema' for 'w' is 4, beyond the 3 steps"),
    (-1, "'averaged' count of 'ema' for 'w' must be a non-negative int, got -1"),
])
def test_loaded_counts_are_bounded_by_the_step(count, msg) -> None:
    opt, st = _averaged_state()
    with pytest.raises(ValueError, match=msg):
        loaded_counts(opt, {"ema": {"w": count, "b": 3}}, st, ())
    got = loaded_counts(opt, {"ema": {"w": 3, "b": 2}}, st, ())
    assert got["ema"].tolist() == [3, 2] or got["ema"].tolist() == [2, 3]


@pytest.mark.parametrize("count, step, msg", [
    (2**70, None, "'averaged' count of 'ema' for 'w' is 1180591620717411303424, beyond "
                  "9223372036854775807"),
    (2**70, 3, "'averaged' count of 'ema' for 'w' is 1180591620717411303424, beyond the 3 "
               "steps"),
    (4, 3, "'averaged' count of 'ema' for 'w' is 4, beyond the 3 steps"),
    (True, None, "'averaged' count of 'ema' for 'w' must be a non-negative int"),
])
def test_merged_counts_are_bounded(count, step, msg) -> None:
    opt = Adam(0.05, ema_decay=0.9)
    parts = [{"ema": {"w": count}}, {"ema": {"b": 2}}]
    with pytest.raises(ValueError, match=msg):
        merged_counts(opt, parts, ["w", "b"], step)
    got = merged_counts(opt, [{"ema": {"w": 3}}, {"ema": {"b": 2}}], ["w", "b"], 3)
    assert got["ema"].tolist() == [3, 2]


@pytest.mark.parametrize("count", [2**70, 4])
def test_a_sharded_checkpoint_with_a_huge_count_is_refused(tmp_path, count) -> None:
    """What ``load_sharded`` merges: a count of 2**70 (was a bare OverflowError) or one past
    the checkpoint's 3 steps is a ValueError naming it, and the optimizer is left as it was."""
    p, grads = _problem()
    dp = DataParallel(Adam(0.05, ema_decay=0.9), shard_state=True)
    st = dp.init(dict(p))
    for g in grads:
        p, st = dp.update(p, g, st)
    save_sharded(tmp_path, p, dp, st)
    for f in glob.glob(os.path.join(tmp_path, "shard-*.safetensors")):
        text, tensors = read_file(f)
        meta = json.loads(text)
        assert meta["averaged"]["ema"]["w"] == 3
        meta["averaged"]["ema"]["w"] = count
        write_file(f, json.dumps(meta), tensors)
    opt = Adam(0.05, ema_decay=0.9)
    before = dict(vars(opt))
    with pytest.raises(ValueError, match=f"checkpoint 'averaged' count of 'ema' for 'w' is "
                                         f"{count}, beyond"):
        load_sharded(tmp_path, DataParallel(opt, shard_state=True))
    assert vars(opt) == before


# -- Accumulate.state_dict(arrays="torch") -----------------------------------------------

def _acc() -> Accumulate:
    return Accumulate(Adam(0.05, ema_decay=0.9), k=3)


def _micro(t: int, backend: str) -> dict:
    rng = np.random.default_rng(50 + t)
    g = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    return {n: torch.tensor(a) if backend == "torch" else a for n, a in g.items()}


def _run(acc, p, st, steps, backend):
    for t in steps:
        p, st = acc.update(p, _micro(t, backend), st)
    return p, st


def _host(p: dict) -> dict:
    return {n: v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
            for n, v in p.items()}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_accumulate_torch_arrays_through_torch_save(backend) -> None:
    """Saved mid-window with ``arrays="torch"``: every array a torch tensor (the buffered
    sums and the wrapped optimizer's slots), ``torch.load(weights_only=True)`` takes it
    with no allowed globals, and the resumed run is the unbroken one bit for bit."""
    p0 = {n: torch.tensor(a) if backend == "torch" else a for n, a in _problem()[0].items()}
    acc = _acc()
    want, ws = _run(acc, p0, acc.init(p0), range(11), backend)
    p, st = _run(acc, p0, acc.init(p0), range(5), backend)
    assert st.accumulator.count == 2  # (mid-window)
    d = acc.state_dict(st, arrays="torch")
    assert all(isinstance(v, torch.Tensor) for v in d["sums"].values())
    assert all(isinstance(v, torch.Tensor) for per in d["inner"]["slots"].values()
               for v in per.values())
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    numpy_d = acc.state_dict(st)  # (the default: NumPy, the same numbers)
    for n, v in numpy_d["sums"].items():
        np.testing.assert_array_equal(loaded["sums"][n].numpy(), v)
    other = _acc()
    st2 = other.load_state_dict(loaded, p)
    p2, st2 = _run(other, p, st2, range(5, 11), backend)
    for n, v in _host(want).items():
        np.testing.assert_array_equal(_host(p2)[n], v, err_msg=n)
    assert st2.windows == ws.windows and st2.inner.step == ws.inner.step
    np.testing.assert_array_equal(_host(other.optimizer.ema_params(st2.inner))["w"],
                                  _host(acc.optimizer.ema_params(ws.inner))["w"])


def test_accumulate_numpy_arrays_need_allowed_globals() -> None:
    """The default (NumPy) dict, as the docs say, is refused by ``weights_only=True``."""
    acc = Accumulate(SGD(0.1), k=2)
    p = _problem()[0]
    p, st = _run(acc, p, acc.init(p), range(1), "numpy")
    buf = io.BytesIO()
    torch.save(acc.state_dict(st), buf)
    buf.seek(0)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(buf, weights_only=True)


def test_accumulate_arrays_is_checked_first() -> None:
    acc = Accumulate(SGD(0.1), k=2)
    p = _problem()[0]
    st = acc.init(p)
    kept = copy.deepcopy(vars(acc.optimizer))
    with pytest.raises(ValueError, match="arrays must be 'numpy' or 'torch', got 'jax'"):
        acc.state_dict(st, arrays="jax")
    assert vars(acc.optimizer).keys() == kept.keys()
