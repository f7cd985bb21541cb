"""Checkpoint faults found by a review (hunt 64, second part): each bad input raises a library
error naming the key, parameter or file, and a call that raises changes nothing."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest

import mithril.utils.optimizers as mo
from mithril.errors import CheckpointError
from mithril.utils.accumulation import Accumulate
from mithril.utils.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from mithril.utils.checkpoint_io import read_file, write_file


def _listing(folder) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir())}


# -- 1. a name safetensors cannot store ------------------------------------------------------

@pytest.mark.parametrize("where", ["params", "model_state"])
def test_a_lone_surrogate_name_is_refused_naming_it(tmp_path, where) -> None:
    """A parameter (or model state) named "\\ud800" raised safetensors' bare
    UnicodeEncodeError ("'utf-8' codec can't encode character"), naming nothing; now a
    ValueError naming it, before anything is written: the file there stays, no temporary."""
    path = tmp_path / "c.safetensors"
    good = {"w": np.arange(3.0)}
    save_checkpoint(path, good)
    before = _listing(tmp_path)
    bad = {"w\ud800": np.ones(2, np.float32)}
    kwargs = {"model_state": bad} if where == "model_state" else {}
    with pytest.raises(ValueError, match=r"name 'w\\ud800' is not valid Unicode") as e:
        save_checkpoint(path, good if kwargs else bad, **kwargs)
    assert not isinstance(e.value, UnicodeError)
    assert ("model state" if kwargs else "parameter") in str(e.value)
    assert _listing(tmp_path) == before
    np.testing.assert_array_equal(load_checkpoint(path)["params"]["w"], [0.0, 1.0, 2.0])


# -- 2. load_sharded's counters ---------------------------------------------------------------

@pytest.mark.parametrize("key", ["step", "num_skipped", "num_nonfinite"])
@pytest.mark.parametrize("bad", [1.5, -1, "nan", True, 2**63])
def test_load_sharded_refuses_a_bad_counter(tmp_path, key, bad) -> None:
    """int(...) took 1.5 as 1, -1 and 2**63 as they were, True as 1; "nan" raised a bare
    ValueError after the averaging settings were set. Now a CheckpointError naming the field,
    the value and the file, and nothing of dp changed."""
    from mithril.distributed import DataParallel, load_sharded, save_sharded

    p = {"w": np.ones((4, 3)), "b": np.ones(3)}
    dp = DataParallel(mo.Adam(0.1, ema_decay=0.9))
    st = dp.init(p)
    p, st = dp.update(p, {k: np.full_like(v, 0.5) for k, v in p.items()}, st)
    save_sharded(tmp_path, p, dp, st)
    (f,) = glob.glob(os.path.join(tmp_path, "shard-*.safetensors"))
    text, tensors = read_file(f)
    write_file(f, json.dumps({**json.loads(text), key: bad}), tensors)
    opt = mo.Adam(0.1, ema_decay=0.5)
    before = dict(vars(opt))
    with pytest.raises(CheckpointError, match=rf"shard-00000-of-00001\.safetensors'?: '{key}' "
                                              rf"must be an int >= 0 .*got {bad!r}"):
        load_sharded(tmp_path, DataParallel(opt))
    assert vars(opt) == before and opt.ema_decay == 0.5


# -- 3. a buffered sum beyond its buffer's range ----------------------------------------------

def _buffered() -> tuple[Accumulate, object, dict]:
    acc = Accumulate(mo.Adam(0.1), k=4)
    p = {"w": np.zeros(3), "b": np.zeros(2)}
    p, st = acc.update(p, {"w": np.array([1.0, 1e39, -2.0]), "b": np.ones(2)}, acc.init(p))
    assert st.accumulator.count == 1
    return acc, st, p


def test_load_checkpoint_refuses_a_buffered_sum_beyond_float32(tmp_path) -> None:
    """A float64 buffered sum of 1e39 loaded for float32 parameters became inf silently
    (the optimizer's slots refuse that); now a CheckpointError naming the tensor."""
    acc, st, p = _buffered()
    path = tmp_path / "acc.safetensors"
    save_checkpoint(path, p, acc, st)
    template = {k: v.astype(np.float32) for k, v in p.items()}
    other = Accumulate(mo.Adam(0.5), k=2)
    before, inner = dict(vars(other)), dict(vars(other.optimizer))
    with pytest.raises(CheckpointError, match=r"tensor 'accumulate/w' holds 1e\+39, beyond the "
                                              r"range of the buffer's float32"):
        load_checkpoint(path, params_template=template, optimizer=other)
    assert vars(other) == before and vars(other.optimizer) == inner and other.k == 2
    # within range it loads (float64 parameters keep the 1e39)
    ck = load_checkpoint(path, params_template=p, optimizer=other)
    assert float(ck["state"].accumulator.sum()["w"][1]) == 1e39 and other.k == 4


def test_accumulate_load_state_dict_refuses_a_sum_beyond_float32() -> None:
    """The same through Accumulate.load_state_dict: a ValueError naming the key."""
    acc, st, p = _buffered()
    sd = acc.state_dict(st)
    other = Accumulate(mo.Adam(0.5), k=2)
    before, inner = dict(vars(other)), dict(vars(other.optimizer))
    template = {k: v.astype(np.float32) for k, v in p.items()}
    with pytest.raises(ValueError, match=r"state dict 'sums' of 'w' holds 1e\+39, beyond the "
                                         r"range of the buffer's float32"):
        other.load_state_dict(sd, template)
    assert vars(other) == before and vars(other.optimizer) == inner and other.k == 2
    sd["sums"]["w"] = np.array([1.0, 3e38, -2.0])  # (float32 holds it)
    got = other.load_state_dict(sd, template)
    assert float(got.accumulator.sum()["w"][1]) == np.float32(3e38) and other.k == 4


# -- 4. a CheckpointManager step it does not keep ---------------------------------------------

@pytest.mark.parametrize("bad", ["params", "extra", "state"])
def test_manager_checks_a_step_it_does_not_keep(tmp_path, bad) -> None:
    """CheckpointManager.save of a step the rotation does not keep (a worse metric, as
    save_best_only) returned None without checking its input: an int parameter, a
    non-JSON extra or another optimizer's state raised nothing. Now the errors of
    save_checkpoint, and nothing is written or removed."""
    opt = mo.Adam(0.1)
    p = {"w": np.ones(3)}
    st = opt.init(p)
    manager = CheckpointManager(tmp_path / "ckpts", max_to_keep=1, best_metric="loss")
    first = manager.save(1, p, opt, st, metrics={"loss": 0.5})
    assert first is not None
    args = {"params": ({"w": np.ones(3, np.int64)}, opt, st, None, None),
            "extra": (p, opt, st, None, {"epoch": object()}),
            "state": (p, opt, mo.SGD(0.1).init(p), None, None)}[bad]
    before = _listing(tmp_path / "ckpts")
    error = {"params": r"params\['w'\] has dtype int64", "extra": "JSON-serialisable",
             "state": "state was made by SGD"}[bad]
    with pytest.raises((TypeError, ValueError), match=error):
        manager.save(2, *args, metrics={"loss": 0.9})
    assert _listing(tmp_path / "ckpts") == before and manager.steps() == [1]
    assert manager.save(2, p, opt, st, metrics={"loss": 0.9}) is None  # good: checked only
    assert _listing(tmp_path / "ckpts") == before and manager.steps() == [1]
