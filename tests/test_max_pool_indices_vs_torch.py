"""``MaxPool1D/2D/3D(return_indices=True)`` side by side with torch's
``max_pool{1,2,3}d(..., return_indices=True)``, and the pool wired into ``MaxUnpool1D/2D``
against ``F.max_unpool{1,2}d(*F.max_pool{1,2}d(..., return_indices=True))``.

Float64: the indices equal torch's exactly (int64) on NumPy and torch for padding (an int,
and per side: torch's of the −inf padded input moved to the unpadded plane), dilation,
ceil_mode, an unbatched input, ties and a NaN; on JAX (a fresh x64 process) a few of them.
The chains' outputs and input gradients within 1e-10 of torch autograd's on all three
backends. Bad ``return_indices`` is refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64
from layer_edges import Case, compare, jax_column, parity_tests

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

_POOLS = {1: ml.MaxPool1D, 2: ml.MaxPool2D, 3: ml.MaxPool3D}
#: name -> (input shape, pool arguments)
CONFIGS: dict[str, tuple[tuple[int, ...], dict]] = {
    "1-D k3 s2 p1": ((2, 3, 9), dict(kernel_size=3, stride=2, padding=1)),
    "1-D dilated ceil": ((2, 2, 10), dict(kernel_size=3, stride=2, padding=1, dilation=2,
                                          ceil_mode=True)),
    "1-D per side": ((2, 2, 8), dict(kernel_size=3, stride=2, padding=(0, 1))),
    "2-D k3 s2 p1": ((2, 3, 7, 6), dict(kernel_size=3, stride=2, padding=1)),
    "2-D ceil": ((1, 2, 7, 8), dict(kernel_size=(2, 3), stride=2, ceil_mode=True)),
    "2-D dilated padded": ((2, 2, 9, 8), dict(kernel_size=3, stride=1, padding=1, dilation=2)),
    "2-D unbatched": ((3, 6, 5), dict(kernel_size=2, stride=1, padding=1)),
    "2-D per side ceil": ((2, 2, 7, 7), dict(kernel_size=3, stride=2, padding=((1, 0), (0, 1)),
                                             ceil_mode=True)),
    "3-D": ((1, 2, 5, 6, 4), dict(kernel_size=2, stride=(1, 2, 2), padding=1)),
    "3-D unbatched ceil": ((2, 5, 5, 5), dict(kernel_size=3, stride=2, ceil_mode=True)),
}
JAX_CONFIGS = ["1-D dilated ceil", "2-D k3 s2 p1", "2-D per side ceil", "3-D unbatched ceil"]


def _input(name: str) -> np.ndarray:
    shape, _ = CONFIGS[name]
    x = np.random.default_rng(len(name)).standard_normal(shape)
    x.reshape(-1)[:3] = 0.5  # ties: the first maximum in window order
    if "unbatched" in name:
        x.reshape(-1)[7] = np.nan  # a NaN window: its NaN
    return x


def _nd(name: str) -> int:
    return int(name[0])


def torch_indices(name: str) -> tuple[np.ndarray, np.ndarray]:
    """torch's output and indices; per-side padding: of the −inf padded input (cut to the
    pool's output as ours), moved to the unpadded plane. The −inf windows (padding only)
    are marked by the output."""
    x, (_, kw) = torch.tensor(_input(name)), CONFIGS[name]
    nd, fn = _nd(name), getattr(F, f"max_pool{_nd(name)}d")
    kw = dict(kw)
    pad = kw.pop("padding", 0)
    if not (isinstance(pad, tuple) and isinstance(pad[0], tuple) or nd == 1 and isinstance(pad, tuple)):
        return tuple(t.numpy() for t in fn(x, padding=pad, return_indices=True, **kw))
    pairs = (pad,) if nd == 1 else pad
    xp = F.pad(x, [p for pair in reversed(pairs) for p in pair], value=-math.inf)
    y, idx = fn(xp, return_indices=True, **kw)
    want = _POOLS[nd](**CONFIGS[name][1]).infer_shape({"input": x.shape})[-nd:]
    cut = (..., *(slice(0, o) for o in want))
    y, idx = y[cut], idx[cut]
    flat, step = 0, 1
    for n, (lo, hi) in zip(reversed(x.shape[-nd:]), reversed(pairs)):
        flat, idx, step = flat + (idx % (n + lo + hi) - lo) * step, idx // (n + lo + hi), step * n
    return y.numpy(), flat.numpy()


def ours(name: str, backend: ml.Backend) -> tuple[np.ndarray, np.ndarray]:
    x = _input(name)
    model = ml.Model()
    model |= _POOLS[_nd(name)](**CONFIGS[name][1], return_indices=True)(
        input="input", output="output", indices="indices")
    c = ml.compile(model, backend, shapes={"input": list(x.shape)}, trainable_keys={"input"})
    out = c.evaluate({"input": backend.array(x)})
    return tuple(np.asarray(backend.to_numpy(out[k])) for k in ("output", "indices"))


def check(name: str, got: tuple[np.ndarray, np.ndarray]) -> None:
    want_y, want_i = torch_indices(name)
    y, idx = got
    assert idx.dtype == np.int64 and idx.shape == want_i.shape
    real = want_y != -np.inf  # a dilated window of padding only: torch's index is garbage
    assert np.array_equal(idx[real], want_i[real]), name
    np.testing.assert_array_equal(y, want_y)


@pytest.mark.parametrize("backend", [NumpyBackend, TorchBackend])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_indices_equal_torch(name: str, backend: type) -> None:
    check(name, ours(name, backend(dtype="float64")))


class _PoolUnpool(ml.Model):
    """MaxPool(return_indices=True) then MaxUnpool of its two outputs, as one block."""

    def __init__(self, nd: int, size: tuple[int, ...], k: int, s: int, p: int) -> None:
        super().__init__()
        self |= _POOLS[nd](k, s, p, return_indices=True)(
            input="input", output=ml.IOKey("pooled", expose=False),
            indices=ml.IOKey("idx", expose=False))
        unpool = ml.MaxUnpool1D if nd == 1 else ml.MaxUnpool2D
        self |= unpool(k, s, p, output_size=size)(input="pooled", indices="idx", output="output")


def _torch_chain(nd: int, k: int, s: int, p: int):
    pool, unpool = getattr(F, f"max_pool{nd}d"), getattr(F, f"max_unpool{nd}d")
    return lambda t, _: {"output": unpool(*pool(t["input"], k, s, p, return_indices=True), k, s,
                                          p, output_size=t["input"].shape[-nd:])}


CASES = {f"chain {nd}-D k{k} s{s} p{p} {shape}": Case(
    lambda nd=nd, shape=shape, k=k, s=s, p=p: _PoolUnpool(nd, shape[-nd:], k, s, p),
    {"input": shape}, _torch_chain(nd, k, s, p))
    for nd, shape, k, s, p in ((2, (2, 3, 6, 8), 2, 2, 0), (2, (2, 2, 7, 6), 3, 2, 1),
                               (1, (2, 3, 9), 3, 2, 1), (2, (3, 5, 5), 2, 2, 1))}
JAX_CHAINS = ["chain 2-D k3 s2 p1 (2, 2, 7, 6)", "chain 1-D k3 s2 p1 (2, 3, 9)"]
test_chain_equals_torch, _, _ = parity_tests("test_max_pool_indices_vs_torch", CASES)


@pytest.fixture(scope="module")
def jax_results() -> dict:
    """JAX float64 in this process (x64 for the block only): the indices of JAX_CONFIGS
    checked there, and the JAX_CHAINS runs (outputs and gradients) as
    :func:`layer_edges.jax_column` returns them."""
    with jax_float64():
        for name in JAX_CONFIGS:
            check(name, ours(name, JaxBackend(dtype="float64")))
    return jax_column("test_max_pool_indices_vs_torch", JAX_CHAINS, "")


def test_jax_indices_equal_torch(jax_results: dict) -> None:
    assert set(jax_results) == set(JAX_CHAINS)  # (and the indices were checked there)


@pytest.mark.parametrize("name", JAX_CHAINS)
def test_jax_chain_equals_torch(name: str, jax_results: dict) -> None:
    compare(name, CASES[name], *jax_results[name], what="jax")


def test_indices_are_live() -> None:
    """Ties and a NaN are in the inputs, and the chain's gradient is not all zero."""
    y, idx = torch_indices("2-D unbatched")
    assert np.isnan(y).any() and len(np.unique(idx)) < idx.size  # overlapping windows
    x = torch.tensor(np.random.default_rng(0).standard_normal((1, 1, 4, 4)), requires_grad=True)
    _torch_chain(2, 2, 2, 0)({"input": x}, {})["output"].sum().backward()
    assert x.grad.sum() == 4


def test_bad_return_indices_is_refused() -> None:
    with pytest.raises(TypeError, match=r"MaxPool2D: return_indices must be a bool, got 1"):
        ml.MaxPool2D(2, return_indices=1)
    with pytest.raises(ValueError, match=r"AdaptiveMaxPool2D: return_indices=True is not"):
        ml.AdaptiveMaxPool2D(2, return_indices=True)
    assert repr(ml.MaxPool1D(2, return_indices=True)).endswith("return_indices=True)")
    assert isinstance(ml.MaxPool3D(2, return_indices=False), ml.MaxPool3D)

