"""Random ``Embedding`` configurations side by side with ``torch.nn.functional.embedding``,
via hypothesis.

A configuration is a JSON dict (its text seeds the weight, the indices and the cotangent):
``num_embeddings`` 1-6, ``dim`` 1-4, ``padding_idx`` None or any int in [-n, n) (negative
counting from the end, as torch's), index arrays of 0-3 axes with axes of size 0 and 1,
repeated indices (the weight gradient accumulates rows), int32 / int64 indices and float32 /
float64 weights. The output and the weight's gradient (zero on the padding row, as torch's)
within 1e-12 (float64) or 1e-6 (float32) relative to max(1, |torch|), on NumPy and torch in
process and JAX in a fresh x64 process; the NumPy gradient against central differences.

torch's ``max_norm``, ``norm_type`` and ``scale_grad_by_freq`` are tested in
test_embedding_options_vs_torch; ``sparse=True`` is refused by name (gradients are dense).
Bad indices (float, out of range) are named errors before anything runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, central_differences, run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_edges import error

import mithril as ml
from mithril.errors import DTypeError


@st.composite
def embedding_configs(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(1, 6))
    return {"n": n, "dim": draw(st.integers(1, 4)),
            "pad": draw(st.one_of(st.none(), st.integers(-n, n - 1))),
            "shape": draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)),
            "idx_dtype": draw(st.sampled_from(["int64", "int32"])),
            "dtype": draw(st.sampled_from(["float64", "float64", "float32"]))}


def name_of(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def setup(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight (n, dim), indices, cotangent of the output), the indices drawn with repeats
    and the padding index among them."""
    cfg = json.loads(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    w = rng.standard_normal((cfg["n"], cfg["dim"]))
    idx = rng.integers(0, cfg["n"], cfg["shape"]).astype(cfg["idx_dtype"])
    if cfg["pad"] is not None and idx.size:
        idx.reshape(-1)[0] = cfg["pad"] % cfg["n"]
    return w, idx, rng.standard_normal((*cfg["shape"], cfg["dim"]))


def run_ours(name: str, backend_name: str) -> dict[str, np.ndarray]:
    cfg = json.loads(name)
    w, idx, cot = setup(name)
    backend = BACKENDS[backend_name](dtype=cfg["dtype"])
    compiled = ml.compile(ml.Embedding(cfg["n"], cfg["dim"], padding_idx=cfg["pad"]), backend,
                          shapes={"input": list(idx.shape)})
    ins = backend.array(idx) if backend_name != "numpy" else idx
    out, grads = compiled.evaluate({"embedding.weight": backend.array(w)}, {"input": ins},
                                   output_gradients={"output": backend.array(cot)})
    return {"output": np.asarray(backend.to_numpy(out["output"])),
            "weight": np.asarray(backend.to_numpy(grads["embedding.weight"]))}


def run_torch(name: str) -> dict[str, np.ndarray]:
    cfg = json.loads(name)
    w, idx, cot = setup(name)
    tw = torch.tensor(w, requires_grad=True)
    y = F.embedding(torch.tensor(idx.astype(np.int64)), tw, padding_idx=cfg["pad"])
    (g,) = torch.autograd.grad(y, [tw], torch.tensor(cot))
    return {"output": y.detach().numpy(), "weight": g.numpy()}


def check(name: str, got: dict[str, np.ndarray], what: str) -> None:
    want = run_torch(name)
    t = 1e-12 if json.loads(name)["dtype"] == "float64" else 1e-6
    errs = {k: error(got[k].astype(np.float64), want[k]) for k in want}
    bad = {k: e for k, e in errs.items() if not e <= t}
    assert not bad, f"{what} {name}: {bad}"
    dtype = np.dtype(json.loads(name)["dtype"])
    assert got["output"].dtype == got["weight"].dtype == dtype, (got["output"].dtype, dtype)


_FAST = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(embedding_configs())
def test_numpy_and_torch_equal_torch_functional(cfg: dict[str, Any]) -> None:
    name = name_of(cfg)
    for backend_name in ("numpy", "torch"):
        check(name, run_ours(name, backend_name), backend_name)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(embedding_configs())
def test_numpy_and_torch_equal_torch_functional_many(cfg: dict[str, Any]) -> None:
    name = name_of(cfg)
    for backend_name in ("numpy", "torch"):
        check(name, run_ours(name, backend_name), backend_name)


@settings(max_examples=1, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(embedding_configs(), min_size=6, max_size=6))
def test_jax_equals_torch_functional(cfgs: list[dict[str, Any]]) -> None:
    names = [name_of(c) for c in cfgs]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jax.npz")
        run_python(f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import jax
            jax.config.update("jax_enable_x64", True)
            import numpy as np
            import test_embedding_fuzz as m
            flat = {{}}
            for i, name in enumerate({names!r}):
                flat.update({{f"{{i}}#{{k}}": v for k, v in m.run_ours(name, "jax").items()}})
            np.savez({path!r}, **flat)
        """, timeout=300)
        with np.load(path) as z:
            for i, name in enumerate(names):
                check(name, {k: z[f"{i}#{k}"] for k in ("output", "weight")}, "jax")


def test_numpy_gradient_equals_central_differences() -> None:
    cfg = {"n": 4, "dim": 2, "pad": -1, "shape": [2, 3], "idx_dtype": "int64", "dtype": "float64"}
    name = name_of(cfg)
    w, idx, cot = setup(name)
    compiled = ml.compile(ml.Embedding(4, 2, padding_idx=-1), ml.NumpyBackend(dtype="float64"),
                          shapes={"input": list(idx.shape)})
    f = lambda p: float(np.sum(compiled.evaluate(p, {"input": idx})["output"] * cot))  # noqa: E731
    fd = central_differences(f, {"embedding.weight": w}, 1e-6)["embedding.weight"]
    got = run_ours(name, "numpy")
    check(name, got, "numpy")
    np.testing.assert_allclose(got["weight"], np.where(np.arange(4)[:, None] == 3, 0, fd),
                               rtol=1e-7, atol=1e-9)
    assert np.abs(fd[3]).max() > 0  # the padding row's lookup does depend on it: torch's choice


def test_sparse_is_named() -> None:
    with pytest.raises(ValueError, match=r"Embedding: sparse must be False, got True: gradients "
                                         r"are dense"):
        ml.Embedding(4, 2, sparse=True)


def test_bad_indices_and_padding_idx_are_named() -> None:
    with pytest.raises(ValueError, match=r"Embedding: padding_idx must be an int in \[-4, 3\]"):
        ml.Embedding(4, 2, padding_idx=4)
    backend = ml.NumpyBackend(dtype="float64")
    compiled = ml.compile(ml.Embedding(4, 2), backend, shapes={"input": [3]})
    params = compiled.get_parameters()
    with pytest.raises(ValueError, match=r"input 'input': embedding index 4 out of range"):
        compiled.evaluate(params, {"input": np.array([0, 4, 1])})
    with pytest.raises(ValueError, match=r"input 'input': embedding index -1 out of range"):
        compiled.evaluate(params, {"input": np.array([0, -1, 1])})
    with pytest.raises(DTypeError, match=r"input 'input': expected an integer dtype"):
        compiled.evaluate(params, {"input": np.array([0.0, 1.0, 2.0])})
