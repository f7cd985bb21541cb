"""Shaping, indexing and tensor-creation blocks against torch in float64 (hunt 65)."""

import numpy as np
import pytest
import torch

import mithril as ml

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("block, fn", [(ml.Maximum, torch.maximum), (ml.Minimum, torch.minimum)])
def test_extremum_gradient_at_infinite_ties_and_nan_is_torchs(backend, block, fn):
    # a tie of two infinities splits the cotangent in halves (NumPy gave 0: inf - inf is NaN);
    # where either operand is NaN, torch gives both the whole cotangent (NumPy and JAX gave 0)
    nan, inf = np.nan, np.inf
    left = np.array([[1.0], [inf], [-inf], [nan]])
    right = np.array([1.0, inf, -inf, nan, -2.0])
    model = ml.Model()
    model |= block()(left="left", right="right", output="output")
    compiled = ml.compile(model, BACKENDS[backend](dtype="float64"),
                          shapes={"left": [4, 1], "right": [5]}, trainable_keys={"left", "right"})
    cot = np.random.default_rng(0).standard_normal((4, 5))
    out, grads = compiled.evaluate({"left": left, "right": right}, {},
                                   output_gradients={"output": cot})
    tl = torch.tensor(left, requires_grad=True)
    tr = torch.tensor(right, requires_grad=True)
    y = fn(tl, tr)
    (y * torch.tensor(cot)).sum().backward()
    np.testing.assert_array_equal(np.asarray(out["output"]), y.detach().numpy())
    np.testing.assert_allclose(np.asarray(grads["left"]), tl.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grads["right"]), tr.grad.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backend_flatten_refuses_dims_out_of_range_as_torch(backend):
    # flatten(x, 5) on a 3-d x returned x unchanged, flatten(x, 0, 7) merged axes 0..1 and
    # flatten(x, -4, -1) only the last axis (the dims wrapped modulo the rank); torch raises
    b = BACKENDS[backend](dtype="float64")
    x = b.ones(2, 3, 4)
    for dims in [(5,), (0, 7), (-4, -1), (0, 3)]:
        with pytest.raises(IndexError):
            torch.ones(2, 3, 4).flatten(*dims)
        with pytest.raises(IndexError, match="out of range"):
            b.flatten(x, *dims)
    for dims in [(0, -1), (-3, -2), (1, 2), (2, 2)]:
        assert tuple(b.flatten(x, *dims).shape) == tuple(torch.ones(2, 3, 4).flatten(*dims).shape)
    s = b.ones(())
    assert tuple(b.flatten(s).shape) == tuple(torch.flatten(torch.tensor(1.0)).shape) == (1,)
    assert tuple(b.flatten(s, -1, 0).shape) == (1,)
    with pytest.raises(IndexError):
        b.flatten(s, 1)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_flatten_block_of_a_scalar_takes_torchs_dims_only(backend):
    # a 0-d input became (1,) whatever start_dim / end_dim were (Flatten() is start_dim=1,
    # nn.Flatten's: torch raises there); its axes are [-1, 0], as torch's
    x = np.array(2.5)
    for dims in [(0, -1), (-1, 0), (0, 0)]:
        model = ml.Model()
        model |= ml.Flatten(*dims)(input="input", output="output")
        compiled = ml.compile(model, BACKENDS[backend](dtype="float64"), shapes={"input": []},
                              trainable_keys={"input"})
        out, grads = compiled.evaluate({"input": x}, {}, output_gradients={"output": np.ones(1)})
        tx = torch.tensor(x, requires_grad=True)
        y = torch.flatten(tx, *dims)
        y.sum().backward()
        np.testing.assert_array_equal(np.asarray(out["output"]), y.detach().numpy())
        np.testing.assert_array_equal(np.asarray(grads["input"]), tx.grad.numpy())
    for dims in [(1, -1), (0, 1), (-2, -1)]:
        with pytest.raises(IndexError):
            torch.flatten(torch.tensor(x), *dims)
        model = ml.Model()
        model |= ml.Flatten(*dims)(input="input", output="output")
        with pytest.raises(ml.ShapeError, match="does not fit an input of 0 dimensions"):
            ml.compile(model, BACKENDS[backend](dtype="float64"), shapes={"input": []})


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("index", [slice(None, 3), slice(-2, None), slice(3, None, -1),
                                   (slice(1, 3), slice(None, None, -1))])
def test_slice_of_a_free_axis_shorter_than_its_bounds_is_clipped(backend, index):
    # x[:3] over a free batch axis was inferred as 3 rows, so a batch of 2 (or 1, or 0) was
    # a ShapeError ('output' has shape [3, 3]); as NumPy and torch, the slice is clipped
    model = ml.Model()
    model |= ml.Indexer(index)(input="input", output="output")
    compiled = ml.compile(model, BACKENDS[backend](dtype="float64"), shapes={"input": [None, 3]})
    for n in (5, 2, 1, 0):
        x = np.arange(n * 3.0).reshape(n, 3)
        got = np.asarray(compiled.evaluate({}, {"input": x})["output"])
        t = torch.tensor(x)
        want = (t[:4].flip(0) if index == slice(3, None, -1) else  # (torch: no negative step)
                t[1:3].flip(1) if isinstance(index, tuple) else t[index]).numpy()
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_embedding_of_computed_indices_out_of_range_is_not_a_wrapped_row(backend):
    # indices computed by the model are not checked as a data input is: NumPy and JAX read
    # -1 as the last row (JAX clamped 4 to it too), torch raises; NumPy raises now, JAX
    # (which cannot raise under jit) gives NaN rows that send no gradient anywhere
    model = ml.Model()
    model |= ml.Indexer(slice(None))(input="ids", output="ids2")
    model |= ml.Embedding(4, 2)(input="ids2", output="output")
    compiled = ml.compile(model, BACKENDS[backend](dtype="float64"), shapes={"ids": [3]})
    w = np.arange(8.0).reshape(4, 2)
    for ids in (np.array([-1, 0, 0]), np.array([4, 0, 2])):
        with pytest.raises(IndexError):
            torch.nn.functional.embedding(torch.tensor(ids), torch.tensor(w))
        if backend == "jax":
            out, grads = compiled.evaluate({"embedding.weight": w}, {"ids": ids},
                                           output_gradients={"output": np.ones((3, 2))})
            assert np.isnan(np.asarray(out["output"])[0]).all()
            np.testing.assert_array_equal(np.asarray(out["output"])[1:], w[ids[1:]])
            assert np.asarray(grads["embedding.weight"])[3].tolist() == [0.0, 0.0]
        else:
            with pytest.raises(IndexError, match="out of range"):
                compiled.evaluate({"embedding.weight": w}, {"ids": ids})


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_integer_arange_of_an_empty_range_is_empty_on_every_backend(backend):
    # Arange(1, x.shape[0]) over an empty batch, Arange(2, 1), Arange(0, 5, -1): torch's
    # arange refuses ends that face the step's way, so the torch backend raised its
    # RuntimeError where NumPy and JAX (and the documented rule) give no values
    for args in [(2, 1), (0, 5, -1), (3, 3), (5, 0, -2), (0, 10, 3)]:
        model = ml.Model()
        model |= ml.Arange(*args)(output="output")
        compiled = ml.compile(model, BACKENDS[backend](dtype="float64"), shapes={})
        got = np.asarray(compiled.evaluate({}, {})["output"])
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.arange(*args))
        if args[0] < args[1] if args[-1] > 0 else args[0] > args[1]:
            np.testing.assert_array_equal(got, torch.arange(*args).numpy())
    model = ml.Model()
    model |= ml.Buffer()(input="x", output="y")
    model |= ml.Arange(start=1, stop=model.y.shape[0])(output="output")
    compiled = ml.compile(model, BACKENDS[backend](dtype="float64"), shapes={"x": [None, 2]})
    for n in (0, 1, 4):
        got = np.asarray(compiled.evaluate({}, {"x": np.ones((n, 2))})["output"])
        np.testing.assert_array_equal(got, np.arange(1, n))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64])
def test_gather_indexer_takes_every_integer_index_dtype(backend, dtype):
    # x[i] with i a connection: torch read a uint8 index as a boolean mask (a wrong gather,
    # or a mask-shape error) and refused int8 / int16; NumPy and JAX index by the values
    from mithril.models.gather_index import SLOT, GatherIndexer

    x = np.random.default_rng(0).standard_normal((4, 3))
    i = np.array([1, 0, 3, 1], dtype=dtype)
    model = ml.Model()
    model |= GatherIndexer((SLOT,))(input="input", index0="i", output="output")
    compiled = ml.compile(model, BACKENDS[backend](dtype="float64"),
                          shapes={"input": [4, 3], "i": [4]}, trainable_keys={"input"})
    cot = np.random.default_rng(1).standard_normal((4, 3))
    out, grads = compiled.evaluate({"input": x}, {"i": i}, output_gradients={"output": cot})
    tx = torch.tensor(x, requires_grad=True)
    y = tx[torch.tensor(i.astype(np.int64))]
    (y * torch.tensor(cot)).sum().backward()
    np.testing.assert_array_equal(np.asarray(out["output"]), y.detach().numpy())
    np.testing.assert_allclose(np.asarray(grads["input"]), tx.grad.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("block", [ml.ArgMax, ml.ArgMin])
def test_arg_reductions_of_a_bool_input_agree_on_every_backend(backend, block):
    # a boolean input (a mask: the first True) raised torch's 'argmax(): does not support
    # bool input' on the torch backend only; NumPy and JAX give the first extreme's index
    mask = np.array([[True, False, True], [False, False, True], [False, False, False]])
    for axis in (None, 0, 1, -1):
        model = ml.Model()
        model |= ml.Buffer()(input="x", output="y")
        model |= block(axis=axis)(input="y", output="output")
        compiled = ml.compile(model, BACKENDS[backend](dtype="float64"), shapes={"x": [3, 3]})
        got = np.asarray(compiled.evaluate({}, {"x": mask})["output"])
        want = getattr(torch, block.__name__.lower())(torch.tensor(mask, dtype=torch.uint8),
                                                      dim=axis).numpy()
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_permute_tensor_of_computed_indices_out_of_range_is_not_a_clamped_row(backend):
    # indices the model computes skip the data check: NumPy and torch raise IndexError,
    # JAX clamped 5 to the last row and -4 to the first; it gives NaN rows now
    model = ml.Model()
    model |= ml.Indexer(slice(None))(input="ids", output="ids2")
    model |= ml.PermuteTensor()(input="x", indices="ids2", output="output")
    compiled = ml.compile(model, BACKENDS[backend](dtype="float64"),
                          shapes={"x": [3, 2], "ids": [3]}, trainable_keys={"x"})
    x = np.arange(6.0).reshape(3, 2)
    good = np.array([-1, -1, 2])  # negatives count from the end, as torch's
    out, grads = compiled.evaluate({"x": x}, {"ids": good},
                                   output_gradients={"output": np.ones((3, 2))})
    tx = torch.tensor(x, requires_grad=True)
    y = tx[torch.tensor(good)]
    y.sum().backward()
    np.testing.assert_array_equal(np.asarray(out["output"]), y.detach().numpy())
    np.testing.assert_array_equal(np.asarray(grads["x"]), tx.grad.numpy())
    for ids in (np.array([5, 0, -1]), np.array([-4, 0, 1])):
        with pytest.raises(IndexError):
            torch.tensor(x)[torch.tensor(ids)]
        if backend == "jax":
            got = np.asarray(compiled.evaluate({"x": x}, {"ids": ids})["output"])
            assert np.isnan(got[0]).all()
            np.testing.assert_array_equal(got[1:], x[ids[1:]])
        else:
            with pytest.raises(IndexError):
                compiled.evaluate({"x": x}, {"ids": ids})
