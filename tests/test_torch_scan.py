"""The compiled torch gradient scan: addresses equal torch's, anything unusual is refused and
takes the checked path, and a machine without a compiler falls back to the same results."""

import logging

import numpy as np
import pytest
import torch

from mithril.utils.optimizers import SGD, Adam
from mithril.utils.optimizers.engines import torch_scan

SHAPES = [(3, 4), (5,), (), (2, 0, 3), (7, 1)]


def _tensors(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _scan(vals, dtype=torch.float32):
    mod = torch_scan.load()
    nd = np.array([len(s) for s in SHAPES], np.int64)
    dims = np.array([d for s in SHAPES for d in s], np.int64)
    out = np.zeros(len(vals), np.int64)
    bad = mod.scan(vals, torch.empty(0, dtype=dtype), nd.ctypes.data, dims.ctypes.data, out.ctypes.data)
    return bad, out


def test_scan_is_built_here():
    """CI machines have a compiler: the fast path must be the one the suite exercises."""
    assert torch_scan.load() is not None


def test_scan_returns_torch_addresses():
    vals = _tensors()
    vals[1] = torch.arange(20.0)[5:10]  # a view: the address includes the storage offset
    bad, out = _scan(vals)
    assert bad == -1
    assert out.tolist() == [t.data_ptr() for t in vals]


@pytest.mark.parametrize("change", [
    lambda t: t.double(),                         # dtype
    lambda t: t.reshape(4, 3),                    # shape, same size
    lambda t: t.reshape(12),                      # rank
    lambda t: t.t().contiguous().t(),             # not contiguous
    lambda t: torch.nn.Parameter(t),              # subclass
    lambda t: torch._neg_view(t),                 # lazy negation
    lambda t: t.to_sparse(),                      # not strided
    lambda t: torch.empty(3, 4, device="meta"),   # not on the CPU
    lambda t: t.numpy(),                          # not a tensor
])
def test_scan_refuses(change):
    vals = _tensors()
    vals[0] = change(vals[0])
    bad, _ = _scan(vals)
    assert bad == 0


def test_scan_reports_the_first_refused_index():
    vals = _tensors()
    vals[3] = vals[3].double()
    assert _scan(vals)[0] == 3


def _run(opt, grads, params, steps=3):
    state = opt.init({k: v.clone() for k, v in params.items()})
    p = {k: v.clone() for k, v in params.items()}
    for _ in range(steps):
        p, state = opt.update(p, grads, state)
    return {k: v.clone() for k, v in p.items()}


@pytest.mark.parametrize("make", [lambda: SGD(0.1, momentum=0.9), lambda: Adam(1e-2, clip_norm=0.5)])
def test_scan_and_python_reads_agree(make, monkeypatch):
    """Bit-identical steps with the scan, without it, and with gradients the scan refuses."""
    params = {f"w{i}": t for i, t in enumerate(_tensors())}
    grads = {k: torch.full_like(v, 0.25) * (1 + i) for i, (k, v) in enumerate(params.items())}
    fast = _run(make(), grads, params)
    odd = dict(grads)
    odd["w0"] = grads["w0"].t().contiguous().t()              # non-contiguous: copied
    odd["w1"] = torch._neg_view(-grads["w1"])                 # lazy negation: resolved
    odd["w4"] = grads["w4"].clone().requires_grad_()          # needs a detach
    refused = _run(make(), odd, params)
    monkeypatch.setenv("MITHRIL_TORCH_SCAN", "0")
    monkeypatch.setattr(torch_scan, "_loaded", {})
    slow = _run(make(), grads, params)
    slow_odd = _run(make(), odd, params)
    slow_neg = _run(make(), {**grads, "w1": odd["w1"]}, params)  # the only odd one: no copy else
    for k in params:
        assert torch.equal(fast[k], slow[k]), k
        assert torch.equal(fast[k], refused[k]), k
        assert torch.equal(fast[k], slow_odd[k]), k
        assert torch.equal(fast[k], slow_neg[k]), k


def test_without_a_compiler_steps_fall_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")  # a "compiler" that always fails
    monkeypatch.setattr(torch_scan, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="mithril"):
        assert torch_scan.load() is None
    assert "could not be built" in caplog.text
    assert not list(tmp_path.rglob("*.so"))  # no partial file left behind
    params = {"w": torch.ones(3)}
    opt = SGD(0.5)
    new, _ = opt.update(params, {"w": torch.ones(3)}, opt.init(params))
    assert torch.equal(new["w"], torch.full((3,), 0.5))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MITHRIL_TORCH_SCAN", "0")
    monkeypatch.setattr(torch_scan, "_loaded", {})
    assert torch_scan.load() is None
