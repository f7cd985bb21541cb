"""Review atomic48, files and the loss scaler: a refused call changes nothing. The loss
scaler against torch's ``_amp_update_scale_``; checkpoints written into a full disk, a
read-only folder or with a failing fsync leave the old file byte-identical and no
temporaries; corrupted, truncated or foreign files load nothing (the optimizers and
schedulers are in ``test_review_atomic48.py``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_review_atomic48 import BAD_VALUES, SETTINGS, deep, differs

import mithril.utils.lr_schedulers as ls
import mithril.utils.optimizers as mo
from mithril.utils import checkpoint_io
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.loss_scaler import LossScaler


# -- the loss scaler ----------------------------------------------------------------------------
def _torch_scale(init: float, interval: int, infs: list[bool]) -> list[float]:
    """GradScaler's own kernel (``torch._amp_update_scale_``) over ``infs``."""
    s, tracker, out = torch.tensor([init]), torch.tensor([0], dtype=torch.int32), []
    for inf in infs:
        torch._amp_update_scale_(s, tracker, torch.tensor([float(inf)]), 2.0, 0.5, interval)
        out.append(float(s))
    return out


def _loss_scaler_fuzz(n: int):
    @settings(max_examples=n, **SETTINGS)
    @given(infs=st.lists(st.booleans(), min_size=1, max_size=12),
           where=st.integers(0, 11), field=st.sampled_from(
               ["scale", "growth_factor", "backoff_factor", "growth_interval", "dynamic",
                "growth_tracker", "_growth_tracker", "min_scale", "update", "attribute"]),
           value=st.sampled_from(BAD_VALUES + [0, 0.0, -0.5, 7, 2.5, np.float32(3.0)]))
    def run(infs, where, field, value):
        scaler = LossScaler(init_scale=8.0, growth_interval=3)
        got = []
        for i, inf in enumerate(infs):
            if i == where % len(infs):
                before = (scaler.state_dict(), repr(scaler))
                try:
                    if field == "update":
                        scaler.update(value)
                    elif field == "attribute":
                        scaler.growth_interval = value
                    else:
                        scaler.load_state_dict({**scaler.state_dict(), field: value})
                except (TypeError, ValueError, KeyError):
                    assert (scaler.state_dict(), repr(scaler)) == before
                else:  # an accepted value (a number in range): start over from it
                    return
            scaler.update(inf)
            got.append(scaler.scale)
        assert got == _torch_scale(8.0, 3, infs)

    return run


def test_loss_scaler_calls_that_raise_change_nothing():
    _loss_scaler_fuzz(80)()


@pytest.mark.slow
def test_loss_scaler_calls_that_raise_change_nothing_slow():
    _loss_scaler_fuzz(3000)()


# -- checkpoints --------------------------------------------------------------------------------
def _saved(tmp_path):
    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    opt = mo.Adam(0.01)
    state = opt.init(params)
    for i in range(3):
        params, state = opt.update(params, {k: (i + 1.0) * v for k, v in params.items()}, state)
    sched = ls.StepLR(opt, 2, 0.5)
    sched.step()
    path = str(tmp_path / "run.safetensors")
    save_checkpoint(path, params, opt, state, sched, extra={"epoch": 3})
    return path, params, opt, state, sched


def _target():
    opt = mo.Adam(0.2)
    sched = ls.StepLR(opt, 3, 0.9)
    return opt, sched, (deep(opt.hyperparameters()), sched.state_dict())


@pytest.mark.parametrize("fail", ["disk-full", "read-only", "fsync"])
def test_a_save_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch, fail):
    """A full disk (the write raises ENOSPC after some bytes), a read-only folder (as root
    ignores chmod: the open raises EACCES) or a failing fsync: the save raises OSError, the
    file saved before is byte for byte as it was and loads, and no temporary file stays."""
    path, params, opt, state, sched = _saved(tmp_path)
    saved = open(path, "rb").read()
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.left = f, 100

        def write(self, b):
            n = min(len(b), self.left)
            self.f.write(bytes(memoryview(b)[:n]))
            self.left -= n
            if n < len(b):
                raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *a, **kw):
        if fail == "read-only" and "x" in mode:
            raise PermissionError(13, "Permission denied", file)
        f = real_open(file, mode, *a, **kw)
        return Full(f) if fail == "disk-full" and "x" in mode else f

    def bad_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint_io, "open", fake_open, raising=False)
    if fail == "fsync":
        monkeypatch.setattr(checkpoint_io.os, "fsync", bad_fsync)
    params2, state2 = opt.update(params, {k: 0.5 * v for k, v in params.items()}, state)
    with pytest.raises(OSError):
        save_checkpoint(path, params2, opt, state2, sched)
    monkeypatch.undo()
    assert open(path, "rb").read() == saved
    assert os.listdir(tmp_path) == ["run.safetensors"]
    assert load_checkpoint(path)["extra"] == {"epoch": 3}


def _corrupt_fuzz(n: int):
    @settings(max_examples=n, **SETTINGS)
    @given(how=st.sampled_from(["flip", "truncate", "append", "foreign"]),
           where=st.floats(0, 1), byte=st.integers(1, 255))
    def run(tmp_path_factory, how, where, byte):
        folder = tmp_path_factory.mktemp("ck")
        path, params, *_ = _saved(folder)
        raw = bytearray(open(path, "rb").read())
        at = int(where * (len(raw) - 1))
        if how == "flip":
            raw[at] ^= byte
        elif how == "truncate":
            raw = raw[:at]
        elif how == "append":
            raw += bytes([byte]) * (1 + at % 9)
        else:  # another safetensors file: torch-style names, no mithril metadata
            header = b'{"weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
            raw = len(header).to_bytes(8, "little") + header + bytes(8)
        open(path, "wb").write(bytes(raw))
        opt, sched, before = _target()
        with pytest.raises(ValueError):
            load_checkpoint(path, {k: np.zeros_like(v) for k, v in params.items()}, opt, sched)
        assert differs(before, (deep(opt.hyperparameters()), sched.state_dict())) is None

    return run


def test_a_corrupted_or_foreign_file_loads_nothing(tmp_path_factory):
    _corrupt_fuzz(40)(tmp_path_factory)


@pytest.mark.slow
def test_a_corrupted_or_foreign_file_loads_nothing_slow(tmp_path_factory):
    _corrupt_fuzz(1500)(tmp_path_factory)


def test_loading_into_another_model_or_optimizer_loads_nothing(tmp_path):
    """Another model's shapes or keys, or another optimizer's class: refused naming it, the
    optimizer and scheduler given unchanged."""
    path, params, *_ = _saved(tmp_path)
    for template, error, words in [
            ({"w": np.zeros((4, 3)), "b": np.zeros(4)}, ValueError, "shape"),
            ({"w": np.zeros((3, 4))}, KeyError, "not in template \\['b'\\]")]:
        opt, sched, before = _target()
        with pytest.raises(error, match=words):
            load_checkpoint(path, template, opt, sched)
        assert differs(before, (deep(opt.hyperparameters()), sched.state_dict())) is None
    sgd = mo.SGD(0.3, momentum=0.9)
    sched = ls.StepLR(sgd, 3, 0.9)
    before = (deep(sgd.hyperparameters()), sched.state_dict())
    with pytest.raises(ValueError, match="Adam"):
        load_checkpoint(path, None, sgd, sched)
    assert differs(before, (deep(sgd.hyperparameters()), sched.state_dict())) is None
