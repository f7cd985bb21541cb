"""Faults found by the sixty-third session's review of the "a call that raises changes
nothing, and says what was wrong" contract."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest

from mithril.utils import checkpoint_io
from mithril.utils.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from mithril.utils.optimizers import Adam, DoG


@pytest.mark.parametrize("attr,out_of_range,bad", [
    ("weight_decay", -1, "x"), ("beta1", 1, "0.9"), ("beta2", 2.0, None),
    ("epsilon", -1e-8, [1e-8])])
def test_a_non_number_is_refused_over_an_out_of_range_number(attr, out_of_range, bad):
    """A number set over a float is unchecked (torch's ``param_groups`` are); a string,
    None or a list is refused. Once the attribute held an out-of-range number, any value
    was taken (the check of the current value, meant for a nested optimizer's names, failed
    too), and the next step raised NumPy's bare errors."""
    opt = Adam(0.01)
    setattr(opt, attr, out_of_range)  # (taken: a number over a float)
    assert getattr(opt, attr) == out_of_range
    with pytest.raises(TypeError, match=re.escape(f"Adam: {attr}={bad!r} refused: {attr} must be "
                                                  f"a number")):
        setattr(opt, attr, bad)
    assert getattr(opt, attr) == out_of_range


def test_a_nested_optimizers_name_still_set_by_attribute():
    """(What the fallback is for: a hyperparameter the wrapper's check does not know.)"""
    from mithril.utils.optimizers import Lookahead

    opt = Lookahead(Adam(0.01))
    opt.inner.beta1 = 0.5
    assert opt.inner.beta1 == 0.5


def test_a_refused_managed_save_removes_every_folder_it_made(tmp_path):
    """``CheckpointManager(folder).save`` made the missing parents of ``folder`` and, when
    the save was refused, removed only ``folder`` itself."""
    manager = CheckpointManager(str(tmp_path / "runs" / "exp1" / "ckpts"), max_to_keep=2)
    with pytest.raises(Exception, match="'w'"):
        manager.save(1, {"w": np.arange(3)})  # (integer params: refused)
    assert os.listdir(tmp_path) == []
    (tmp_path / "runs").mkdir()  # an existing parent is kept
    with pytest.raises(Exception, match="'w'"):
        manager.save(1, {"w": np.arange(3)})
    assert os.listdir(tmp_path) == ["runs"] and os.listdir(tmp_path / "runs") == []
    path = manager.save(1, {"w": np.ones(3, np.float32)})
    assert path.startswith(str(tmp_path / "runs" / "exp1" / "ckpts"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch, code):
    """A write that fails for want of space (or a file size limit) raised the bare
    ``OSError: [Errno 28] No space left on device``, naming no file. The file there is left
    as it was, and no temporary file stays."""
    path = str(tmp_path / "model.safetensors")
    save_checkpoint(path, {"w": np.zeros(4, np.float32)})
    before = open(path, "rb").read()

    def full(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_io.os, "fsync", full)
    with pytest.raises(OSError) as e:
        save_checkpoint(path, {"w": np.ones(64, np.float32)})
    assert e.value.errno == code and e.value.filename == path and path in str(e.value)
    monkeypatch.undo()
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["model.safetensors"]
    np.testing.assert_array_equal(load_checkpoint(path)["params"]["w"], np.zeros(4))


def test_dog_raise_message():
    """(test_two_pass_state_nonfinite.py has the rest.) The error names the value."""
    opt = DoG(nonfinite="raise")
    p = {"w": np.ones(2, np.float32)}
    s = opt.init(p)
    with pytest.raises(FloatingPointError, match="state value 'sum_sq'"):
        opt.update(p, {"w": np.full(2, 3e19, np.float32)}, s)
    assert s.step == 0 and s.values["sum_sq"] == 0.0


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hardsigmoid_at_infinities_is_torchs(backend, dtype):
    """``Hardsigmoid(±inf)`` was NaN (``0 · inf`` in the constant branches) on every
    backend; ``F.hardsigmoid`` gives 0 and 1, NaN for NaN. The output keeps the dtype."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    import mithril as ml

    if backend == "jax":
        pytest.importorskip("jax")
    make = {"numpy": ml.NumpyBackend, "jax": ml.JaxBackend, "torch": ml.TorchBackend}[backend]
    x = np.array([-np.inf, -3.0, -2.5, 0.0, 2.5, 3.0, np.inf, np.nan], dtype)
    m = ml.Model()
    m |= ml.Hardsigmoid()(input="input", output="output")
    c = ml.compile(m, make(dtype=dtype), shapes={"input": [x.size]})
    out = c.evaluate({}, {"input": x})["output"]
    got = np.asarray(out.detach() if hasattr(out, "detach") else out)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, F.hardsigmoid(torch.tensor(x)).numpy())
