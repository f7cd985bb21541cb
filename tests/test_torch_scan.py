"""The torch gradient scan (torch's tensor guard + the addresses read by a numba pass over
the tensors' fields): addresses equal torch's ``data_ptr``, anything unusual is refused and
takes the checked path, nothing is compiled by a C++ compiler, a field layout that reads
wrong addresses is caught and dropped, and a torch without the guard falls back to the same
results."""

from pathlib import Path

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
    scan = torch_scan.make(SHAPES, dtype)
    assert scan is not None
    return scan(vals)


def test_scan_is_available_here():
    """The installed torch has the guard: the fast path must be the one the suite exercises."""
    assert torch_scan.make(SHAPES, torch.float32) is not None


def test_fields_are_located_here():
    """On the tested torch the addresses come from the compiled pass, not from Python."""
    scan = torch_scan.make(SHAPES, torch.float32)
    assert scan._fields is not None and scan._fields == torch_scan._layout()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fields_give_data_ptr_for_every_kind_of_tensor(dtype):
    """Fresh tensors, views at a storage offset, tensors over NumPy memory, gradients made
    by autograd, 0-d and empty tensors: the pass's address is ``data_ptr()``, each one."""
    leaf = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    (leaf * 3).sum().backward()
    big = torch.arange(100, dtype=dtype)
    vals = [leaf.grad, big[17:22], big[50:51].view(()), torch.zeros(2, 0, 3, dtype=dtype),
            torch.from_numpy(np.arange(7.0)).to(dtype)[2:].clone()[1:].reshape(2, 2)
            if dtype != torch.bfloat16 else torch.ones(2, 2, dtype=dtype)]
    shapes = [tuple(t.shape) for t in vals]
    scan = torch_scan.make(shapes, dtype)
    assert scan is not None and scan._fields is not None
    out = scan(vals)
    assert out is not None and out.tolist() == [t.data_ptr() for t in vals]
    # (three: one or two tensors are read by data_ptr, see test_one_or_two_tensors...)
    numpy_backed = [torch.from_numpy(np.arange(6.0 + i, dtype=np.float32)[1:4]) for i in range(3)]
    scan32 = torch_scan.make([(3,)] * 3, torch.float32)
    assert scan32(numpy_backed).tolist() == [t.data_ptr() for t in numpy_backed]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_or_two_tensors_are_read_by_data_ptr_after_the_guard(monkeypatch, n):
    """Up to two tensors the scan's check with ``data_ptr`` reads every address anyway, so
    the compiled pass is not called (a numba dispatch and two arrays: ~2-3 µs of a
    one-tensor step as a step leaves the caches); from three it is. The addresses are ``data_ptr``'s
    either way, a view at an offset included."""
    calls = []
    real = torch_scan._locate
    monkeypatch.setattr(torch_scan, "_locate", lambda *a: calls.append(1) or real(*a))
    vals = [torch.arange(40.0)[3 + 10 * i:8 + 10 * i] for i in range(n)]
    scan = torch_scan.make([(5,)] * n, torch.float32)
    assert scan is not None and scan._fields is not None
    assert scan(vals).tolist() == [t.data_ptr() for t in vals]
    assert len(calls) == (n > 2)


def test_wrong_fields_are_caught_and_dropped(monkeypatch, caplog):
    """A layout that reads wrong addresses (here the storage's data read 8 bytes off) is
    caught by the per-scan comparison with ``data_ptr``, logged, and not used again."""
    o_impl, o_storage, o_offset, o_data = torch_scan._layout()
    scan = torch_scan.make(SHAPES, torch.float32)
    scan._fields = (o_impl, o_storage, o_offset, o_data + 8)
    vals = _tensors()
    with caplog.at_level("WARNING"):
        out = scan(vals)
    assert out.tolist() == [t.data_ptr() for t in vals]
    assert scan._fields is None and "wrong addresses" in caplog.text
    assert scan(vals).tolist() == [t.data_ptr() for t in vals]


def test_guard_only_mode(monkeypatch):
    monkeypatch.setenv("MITHRIL_TORCH_SCAN", "guard")
    scan = torch_scan.make(SHAPES, torch.float32)
    assert scan is not None and scan._fields is None
    vals = _tensors()
    assert scan(vals).tolist() == [t.data_ptr() for t in vals]


def test_nothing_is_compiled():
    """No C++ source ships and the module never starts a compiler."""
    here = Path(torch_scan.__file__).parent
    assert not list(here.glob("*.cpp"))
    source = Path(torch_scan.__file__).read_text()
    assert "cpp_extension" not in source and "subprocess" not in source


def test_scan_returns_torch_addresses():
    vals = _tensors()
    vals[1] = torch.arange(20.0)[5:10]  # a view: the address includes the storage offset
    out = _scan(vals)
    assert out is not None
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
    lambda t: t.clone().requires_grad_(),         # needs a detach
    lambda t: t.numpy(),                          # not a tensor
    lambda t: None,                               # not a tensor
])
@pytest.mark.parametrize("n", [1, 2, len(SHAPES)])
def test_scan_refuses(change, n):
    """On the compiled pass (five tensors) and on the guard with ``data_ptr`` (one, two)."""
    vals = _tensors()[:n]
    vals[0] = change(vals[0])
    scan = torch_scan.make(SHAPES[:n], torch.float32)
    assert scan is not None and scan(vals) is None


def test_scan_refuses_a_later_tensor():
    vals = _tensors()
    vals[3] = vals[3].double()
    assert _scan(vals) is None


def test_scan_refuses_a_wrong_count():
    assert _scan(_tensors()[:-1]) is None
    assert _scan([*_tensors(), torch.zeros(1)]) is None


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
    subclass = _run(make(), {**grads, "w2": torch.nn.Parameter(grads["w2"], requires_grad=False)},
                    params)                                   # refused by the scan, read by Python
    monkeypatch.setenv("MITHRIL_TORCH_SCAN", "guard")
    guard_only = _run(make(), grads, params)
    monkeypatch.setenv("MITHRIL_TORCH_SCAN", "0")
    slow = _run(make(), grads, params)
    slow_odd = _run(make(), odd, params)
    slow_neg = _run(make(), {**grads, "w1": odd["w1"]}, params)  # the only odd one: no copy else
    for k in params:
        assert torch.equal(fast[k], slow[k]), k
        assert torch.equal(fast[k], guard_only[k]), k
        assert torch.equal(fast[k], refused[k]), k
        assert torch.equal(fast[k], subclass[k]), k
        assert torch.equal(fast[k], slow_odd[k]), k
        assert torch.equal(fast[k], slow_neg[k]), k


def test_without_the_guard_steps_fall_back(monkeypatch):
    """A torch without the tensor guard (or one that misbehaves): Python reads, same step."""
    import torch._C._dynamo.guards as guards

    def broken(*args, **kwargs):
        raise AttributeError("no TensorGuards in this torch")

    monkeypatch.setattr(guards, "TensorGuards", broken)
    assert torch_scan.make(SHAPES, torch.float32) is None
    params = {"w": torch.ones(3)}
    opt = SGD(0.5)
    new, _ = opt.update(params, {"w": torch.ones(3)}, opt.init(params))
    assert torch.equal(new["w"], torch.full((3,), 0.5))


def test_a_guard_that_accepts_anything_is_not_used(monkeypatch):
    import torch._C._dynamo.guards as guards

    class Lax:
        def __init__(self, *args, **kwargs):
            pass

        def check(self, *args):
            return True

    monkeypatch.setattr(guards, "TensorGuards", Lax)
    assert torch_scan.make(SHAPES, torch.float32) is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MITHRIL_TORCH_SCAN", "0")
    assert torch_scan.make(SHAPES, torch.float32) is None
