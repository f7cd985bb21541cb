"""The compiled NumPy gradient scan: addresses equal NumPy's, anything unusual is refused."""

import numpy as np
import pytest

from mithril.utils.optimizers import SGD
from mithril.utils.optimizers.engines import ndarray_fields as nf

SHAPES = [(3, 4), (5,), (), (2, 0, 3), (7, 1)]


def _arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def test_offsets_verified_on_this_interpreter():
    assert nf._verified()


def test_scan_returns_numpy_addresses():
    vals = _arrays()
    got = nf.scan(vals, nf.Expected(SHAPES, np.float32))
    assert got is not None
    assert got.tolist() == [a.ctypes.data for a in vals]


class _Sub(np.ndarray):
    pass


@pytest.mark.parametrize("change", [
    lambda a: a.astype(np.float64),            # dtype
    lambda a: a.reshape(4, 3),                 # shape, same size
    lambda a: np.asfortranarray(a).T.copy().T,  # not C-contiguous
    lambda a: a.view(_Sub),                    # subclass
    lambda a: a.astype(">f4"),                 # byte-swapped
    lambda a: a.tolist(),                      # not an array
])
def test_scan_refuses(change):
    vals = _arrays()
    vals[0] = change(vals[0])
    assert nf.scan(vals, nf.Expected(SHAPES, np.float32)) is None


def test_scan_refuses_a_wrong_count():
    assert nf.scan(_arrays()[:-1], nf.Expected(SHAPES, np.float32)) is None


def test_refused_gradients_take_the_checked_path():
    """A gradient the scan refuses still updates correctly, or fails with a clear error."""
    params = dict(zip("abcde", _arrays()))
    grads = {k: np.full_like(v, 0.5) for k, v in params.items()}
    grads["a"] = np.asfortranarray(np.full((4, 3), 0.5, np.float32)).T  # non-contiguous, fine
    want = {k: v - 0.1 * 0.5 for k, v in params.items()}
    opt = SGD(0.1)
    new, _ = opt.update(dict(params), grads, opt.init(params))
    for k in params:
        np.testing.assert_allclose(new[k], want[k], rtol=1e-6)
    grads["a"] = np.zeros((4, 3), np.float32)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"gradients\['a'\] has shape \(4, 3\)"):
        opt.update(dict(params), grads, state)
