"""Class-index labels of ``CrossEntropy`` are checked on every backend before the backend runs:
out of range, not integers, or the wrong length/shape is a Mithril error naming the data key,
never a raw NumPy ``IndexError``, a broadcast error or a torch/JAX error."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml

X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)


@pytest.fixture
def classifier(backend):
    """logits = Linear(3)(x); loss = CrossEntropy(logits, labels): 3 classes, batch free."""
    model = ml.Model()
    model |= ml.Linear(3)(input="x", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="labels", output="loss")
    compiled = ml.compile(model, backend, shapes={"x": [None, 4]})
    return compiled, compiled.get_parameters()


def run(backend, compiled, params, labels, grads: bool):
    inputs = {"x": X, "labels": labels}
    if grads:
        return compiled.evaluate(params, inputs, output_gradients={"loss": 1.0})
    return compiled.evaluate(params, inputs)


def reference_loss(backend, compiled, params, labels) -> float:
    logits = backend.to_numpy(compiled.evaluate(params, {"x": X, "labels": labels})["logits"])
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("grads", [False, True], ids=["forward", "vjp"])
def test_valid_labels_give_the_cross_entropy(backend, classifier, grads):
    compiled, params = classifier
    labels = np.array([0, 2, 1, 2, 0])  # both ends of [0, 3) included
    out = run(backend, compiled, params, labels, grads)
    out = out[0] if grads else out
    loss = float(backend.to_numpy(out["loss"]))
    assert loss == pytest.approx(reference_loss(backend, compiled, params, labels), rel=1e-5)
    assert loss > 0


@pytest.mark.parametrize("grads", [False, True], ids=["forward", "vjp"])
@pytest.mark.parametrize("bad, shown, count", [(7, "e.g. 7", 1), (3, "e.g. 3", 1),
                                               (-1, "e.g. -1", 1)])
def test_labels_out_of_range(backend, classifier, grads, bad, shown, count):
    compiled, params = classifier
    labels = np.array([0, 1, 2, bad, 0])
    with pytest.raises(ValueError, match="labels") as e:
        run(backend, compiled, params, labels, grads)
    msg = str(e.value)
    assert f"input 'labels': {count} of 5 class indices out of range ({shown})" in msg
    assert "3 classes, so labels must be in [0, 2]" in msg and "[5, 3]" in msg
    assert not isinstance(e.value, (IndexError, ml.ShapeError))


def test_every_bad_label_is_counted(backend, classifier):
    compiled, params = classifier
    with pytest.raises(ValueError, match=r"3 of 5 class indices out of range \(e\.g\. 9\)"):
        run(backend, compiled, params, np.array([9, 1, -4, 3, 0]), grads=False)


@pytest.mark.parametrize("grads", [False, True], ids=["forward", "vjp"])
def test_float_labels_are_a_dtype_error(backend, classifier, grads):
    compiled, params = classifier
    with pytest.raises(ml.DTypeError, match="input 'labels': class indices must have an "
                                            "integer dtype, got float") as e:
        run(backend, compiled, params, np.array([0.0, 1.0, 2.0, 1.0, 0.0]), grads)
    assert "one-hot / probability rows of shape [5, 3]" in str(e.value)


@pytest.mark.parametrize("labels, got", [(np.array([0, 1, 2]), "[3]"),
                                         (np.zeros(6, dtype=np.int64), "[6]"),
                                         (np.zeros((5, 1), dtype=np.int64), "[5, 1]")],
                         ids=["short", "long", "column"])
@pytest.mark.parametrize("grads", [False, True], ids=["forward", "vjp"])
def test_labels_of_the_wrong_length_or_shape(backend, classifier, labels, got, grads):
    compiled, params = classifier
    with pytest.raises(ml.ShapeError) as e:
        run(backend, compiled, params, labels, grads)
    assert (f"input 'labels': integer class indices must have shape [5] (one per row of "
            f"logits; the logits 'logits' have shape [5, 3]), got {got}") in str(e.value)


def test_one_hot_targets_of_the_wrong_width(backend, classifier):
    compiled, params = classifier
    with pytest.raises(ml.ShapeError, match=r"one-hot / probability targets must have shape "
                                            r"\[5, 3\].*got \[5, 4\]"):
        run(backend, compiled, params, np.eye(5, 4, dtype=np.float32), grads=False)
    onehot = np.eye(3, dtype=np.float32)[[0, 2, 1, 2, 0]]  # still fine: same loss as indices
    loss = float(backend.to_numpy(run(backend, compiled, params, onehot, False)["loss"]))
    assert loss == pytest.approx(reference_loss(backend, compiled, params, [0, 2, 1, 2, 0]),
                                 rel=1e-5)


def test_complex_targets_are_refused(classifier, backend):
    compiled, params = classifier
    labels = np.zeros((5, 3), dtype=np.complex64)
    with pytest.raises(ml.DTypeError, match="input 'labels': expected integer class indices "
                                            "or float one-hot"):
        run(backend, compiled, params, labels, grads=False)


def test_free_batch_dimensions_must_agree_elsewhere_too(backend):
    """The shape rules run again on the concrete shapes: 5 predictions against 4 targets is a
    ShapeError naming both wires, not a broadcast error from the backend."""
    model = ml.Model()
    model |= ml.Linear(3)(input="x", output="pred")
    model |= ml.SquaredError("mean")(input="pred", target="t", output="loss")
    compiled = ml.compile(model, backend, shapes={"x": [None, 4]})
    params = compiled.get_parameters()
    t = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ml.ShapeError, match=r"'input' has shape \[5, 3\] but 'target' has shape "
                                            r"\[4, 3\].*'target' <- 't' \[4, 3\]"):
        compiled.evaluate(params, {"x": X, "t": t})
    out = compiled.evaluate(params, {"x": X[:4], "t": t})  # agreeing batches still run
    pred = backend.to_numpy(out["pred"]).astype(np.float64)
    assert float(backend.to_numpy(out["loss"])) == pytest.approx(((pred - 1) ** 2).mean(),
                                                                 rel=1e-5)


def test_jax_under_jit_checks_shapes_and_runs_valid_labels():
    """Inside ``jax.jit`` the labels are tracers: shapes are still checked (they are static),
    values cannot be; valid labels give the same loss as outside."""
    jax = pytest.importorskip("jax")
    from mithril.backends import JaxBackend

    backend = JaxBackend(dtype="float32", seed=0)
    model = ml.Model()
    model |= ml.Linear(3)(input="x", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="labels", output="loss")
    compiled = ml.compile(model, backend, shapes={"x": [None, 4]})
    params = compiled.get_parameters()

    @jax.jit
    def loss(params, x, labels):
        return compiled.evaluate(params, {"x": x, "labels": labels})["loss"]

    labels = np.array([0, 2, 1, 2, 0], dtype=np.int32)
    want = reference_loss(backend, compiled, params, labels)
    assert float(loss(params, X, labels)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ml.ShapeError, match="input 'labels'"):
        loss(params, X, labels[:3])


def test_mixed_precision_trainer_checks_labels_too():
    torch = pytest.importorskip("torch")
    from mithril.backends import TorchBackend
    from mithril.utils.mixed_precision import MixedPrecisionTrainer
    from mithril.utils.optimizers import Adam

    backend = TorchBackend(dtype="float16", seed=0)
    model = ml.Model()
    model |= ml.Linear(3)(input="x", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="labels", output="loss")
    compiled = ml.compile(model, backend, shapes={"x": [None, 4]})
    trainer = MixedPrecisionTrainer(compiled, Adam(learning_rate=1e-3), compiled.get_parameters(),
                                    None, loss_scale=256.0)
    x = torch.tensor(X, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"input 'labels': 1 of 5 class indices out of range"):
        trainer.forward({"x": x, "labels": torch.tensor([0, 1, 5, 1, 0])})
    out = trainer.forward({"x": x, "labels": torch.tensor([0, 1, 2, 1, 0])})
    assert float(out["loss"]) > 0


@pytest.mark.parametrize("bad", [[0, 5], [-1, 2]], ids=["too-large", "negative"])
def test_embedding_index_out_of_range_is_named(backend, bad):
    """Embedding indices are checked like class labels: a ValueError naming the input, on
    every backend, with and without gradients."""
    compiled = ml.compile(ml.Embedding(5, 2), backend, shapes={"input": [None]})
    params = compiled.get_parameters()
    with pytest.raises(ValueError, match=r"input 'input': embedding index (5|-1) out of range: "
                                         r"5 embeddings, so indices must be in \[0, 4\]"):
        compiled.evaluate(params, {"input": backend.array(np.array(bad), dtype="int32")})
    with pytest.raises(ValueError, match="embedding index"):
        compiled.evaluate(params, {"input": backend.array(np.array(bad), dtype="int32")},
                          output_gradients={"output": backend.ones(2, 2)})
    out = compiled.evaluate(params, {"input": backend.array(np.array([0, 4]), dtype="int32")})
    assert tuple(out["output"].shape) == (2, 2)
