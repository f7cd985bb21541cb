"""Hunt 66 (utils outside the optimizer step: hessian, per-example gradients, weight averaging,
accumulation, monitoring): defects found side by side with torch / JAX, each pinned here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.hessian import hessian_vector_product, hutchinson_diagonal

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


# -- hessian: the default loss, a non-scalar output ------------------------------------------
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_hessian_of_a_non_scalar_default_output_is_refused_in_its_own_words(name):
    """Without ``loss=`` the single output is differentiated; a non-scalar one is refused as
    torch's ``hvp`` refuses it, and the error names the function and ``loss=`` (it spoke of
    ``output_gradients=True`` and a dict of output gradients, arguments these do not take)."""
    be = BACKENDS[name](dtype="float64")
    model = ml.Model()
    model |= ml.Linear(3)(input="input", output=ml.IOKey("out"))
    c = ml.compile(model, be, shapes={"input": [None, 4]})
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s) for k, s in c.parameter_shapes.items()}
    x = rng.standard_normal((2, 4))
    params = {k: be.array(v) for k, v in p0.items()}
    data = {"input": be.array(x)}
    with pytest.raises(RuntimeError, match="single element"):  # torch refuses it too
        torch.autograd.functional.hvp(
            lambda w: torch.tensor(x) @ w.T, torch.tensor(p0["linear.weight"]),
            torch.ones(3, 4))
    with pytest.raises(ShapeError, match=r"hessian_vector_product: the loss 'out' must be a "
                                         r"scalar output, it has shape \(None, 3\).*loss="):
        hessian_vector_product(c, params, data, params)
    with pytest.raises(ShapeError, match=r"hutchinson_diagonal: the loss 'out' must be a "
                                         r"scalar output.*loss="):
        hutchinson_diagonal(c, params, data, 0)
    # two outputs, none 'final_cost': name the loss
    model2 = ml.Model()
    model2 |= ml.Linear(3)(input="input", output=ml.IOKey("out"))
    model2 |= ml.Linear(2)(input="input", output=ml.IOKey("other"))
    c2 = ml.compile(model2, be, shapes={"input": [None, 4]})
    p2 = {k: be.array(rng.standard_normal(s)) for k, s in c2.parameter_shapes.items()}
    with pytest.raises(KeyMismatchError, match=r"hessian_vector_product: the model has outputs "
                                               r"\['other', 'out'\] and no 'final_cost'.*loss="):
        hessian_vector_product(c2, p2, data, p2)
    assert c.step == 0 and c2.step == 0


# -- monitoring: integer and bool tensors ----------------------------------------------------
def test_norms_of_integer_and_bool_tensors_on_every_backend():
    """NumPy and JAX took the norm of an integer or bool array; torch raised its own
    ``linalg.vector_norm: Expected a floating point or complex tensor`` (a model state's
    ``num_batches_tracked``, a mask): now the same float64 norm on every backend."""
    import jax.numpy as jnp

    from mithril.utils.monitoring import global_norm, parameter_norms, update_ratios

    ints, mask = np.array([[3, -4], [12, 0]]), np.array([True, False, True])
    want = {"i": float(np.linalg.norm(ints)), "m": float(np.linalg.norm(mask.astype(float)))}
    assert want == {"i": 13.0, "m": np.sqrt(2.0)}
    for make in (np.asarray, torch.tensor, jnp.asarray):
        tree = {"i": make(ints), "m": make(mask)}
        got = parameter_norms(tree)
        assert got == pytest.approx(want, rel=1e-7), make
        assert global_norm(tree) == pytest.approx(float(np.sqrt(13.0**2 + 2)), rel=1e-7)
        assert update_ratios({"i": make(ints)}, {"i": make(ints * 2)}) == \
            pytest.approx({"i": 1.0})
