"""Cached kernels load without numba's registry refresh (``kernel_cache._TolerantCache.
_load_light``): a second process runs its steps without ever refreshing numba's registries,
computes the same bits as numba's own load path, and numba still compiles the user's code
and new kernels afterwards. Each process is a fresh interpreter sharing one cache folder."""

from __future__ import annotations

import json

import pytest
from conftest import run_python

SCRIPT = """
import hashlib, json, sys
import numpy as np
from mithril.utils.optimizers import SGD, Adam
from mithril.utils.optimizers.engines import kernel_cache
kernel_cache.LIGHT_LOAD = {light!r}
rng = np.random.default_rng(0)
p = {{"w": rng.standard_normal((300, 200)).astype(np.float32),
      "b": rng.standard_normal(200).astype(np.float32)}}
g = {{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}}
h = hashlib.sha256()
for opt in (Adam(1e-2, weight_decay=0.1), SGD(0.1, momentum=0.9, nesterov=True)):
    s, q = opt.init(p), p
    for _ in range(3):
        q, s = opt.update(q, g, s)
    h.update(b"".join(np.ascontiguousarray(v).tobytes() for v in q.values()))
out = {{"bits": h.hexdigest(), "refreshed": "numba.np.arraymath" in sys.modules,
        **kernel_cache.stats()}}
if {after!r}:  # the user's own numba code, then a kernel of a new math, after the loads
    import numba
    @numba.njit
    def user(a, b):
        return np.dot(a, b) + np.sqrt(np.abs(a)).sum()
    a = np.arange(6.0)
    out["user"] = float(user(a, a))
    from mithril.utils.optimizers import Optimizer
    class Half(Optimizer):
        slots = ()
        @staticmethod
        def math(p, g, lr):
            return (p - lr * g * 0.5,)
    opt = Half(learning_rate=0.2)
    q, _ = opt.update(p, g, opt.init(p))
    out["half"] = bool(all(np.array_equal(q[k], p[k] - np.float32(0.2) * g[k] * np.float32(0.5))
                           for k in p))
print(json.dumps(out))
"""


def _run(cache, light: bool, after: bool = False) -> dict:
    out = run_python(SCRIPT.format(light=light, after=after), timeout=600,
                     env={"MITHRIL_CACHE_DIR": str(cache)})
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache folder the first process filled (it compiles: numba refreshes, as for any
    compile), and that process's result."""
    cache = tmp_path_factory.mktemp("kernels")
    first = _run(cache, light=True)
    assert first["misses"] > 0 and first["refreshed"] is True
    return cache, first


def test_a_second_process_loads_without_a_refresh_and_computes_the_same_bits(warm):
    cache, first = warm
    light = _run(cache, light=True)
    assert light["misses"] == 0 and light["hits"] > 0
    assert light["refreshed"] is False  # numba's registries were never loaded
    full = _run(cache, light=False)
    assert full["misses"] == 0 and full["refreshed"] is True
    assert light["bits"] == full["bits"] == first["bits"]


def test_numba_compiles_user_code_and_new_kernels_after_light_loads(warm):
    out = _run(warm[0], light=True, after=True)
    assert out["refreshed"] is False and out["misses"] == 0  # (counted before the user code)
    a = [float(x) for x in range(6)]
    assert abs(out["user"] - (sum(x * x for x in a) + sum(x ** 0.5 for x in a))) < 1e-12
    assert out["half"] is True
