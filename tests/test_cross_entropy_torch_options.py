"""``CrossEntropy(weight=..., ignore_index=..., label_smoothing=...)``: torch's
``F.cross_entropy`` options, checked side by side with torch in float64 (values and input
gradients to 1e-12) on NumPy and torch in process and on float64 JAX in a subprocess (x64 is
process-global), for class-index and probability targets, ``axis=1`` ((N, C, d1, ...)) and
the last axis, every reduction; the NumPy VJP against finite differences; the backends
against each other in float32; optax's ``smooth_labels``; and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences, run_python

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import CrossEntropy, Linear, Model, loss_kernels

#: (logits shape, class axis): torch's (N, C, d1, ...) layout with axis=1, the last axis
SHAPES = [((6, 5), -1), ((6, 5), 1), ((3, 4, 5), -1), ((2, 4, 3), 1), ((2, 4, 3, 2), 1),
          ((2, 3, 2, 4), -1), ((1, 3), -1), ((4, 1), -1), ((3, 2, 1, 2), 1)]
REDUCTIONS = ("mean", "sum", "none")
RTOL, ATOL = 1e-12, 1e-14


def option_sets(c: int, rng: np.random.Generator) -> list[dict]:
    """The option combinations tried for ``c`` classes (a weight of ``c`` entries)."""
    w = rng.uniform(0.2, 2.0, c)
    inside = min(1, c - 1)  # an ignore_index that is a class
    return [dict(weight=w), dict(ignore_index=-100), dict(ignore_index=inside),
            dict(ignore_index=c),  # beyond the classes: those labels are ignored, not refused
            dict(label_smoothing=0.1), dict(label_smoothing=1.0),
            dict(weight=w, label_smoothing=0.25), dict(weight=w, ignore_index=-100),
            dict(ignore_index=-100, label_smoothing=0.3),
            dict(weight=w, ignore_index=inside, label_smoothing=0.15)]


def make_target(kind: str, shape: tuple, axis: int, opts: dict, rng: np.random.Generator) -> np.ndarray:
    """Class indices (a third of them ``ignore_index`` where set) or probability rows."""
    ax = axis % len(shape)
    c = shape[ax]
    if kind == "index":
        t = rng.integers(0, c, tuple(d for i, d in enumerate(shape) if i != ax))
        if opts.get("ignore_index") is not None:
            t[rng.random(t.shape) < 1 / 3] = opts["ignore_index"]
        return t
    t = rng.random(shape) + 0.05
    return t / t.sum(axis=ax, keepdims=True)


def torch_reference(x, t, axis, reduction, opts, g, kind, fn=F.cross_entropy, log=False):
    """torch's loss and gradient of ``x`` for output cotangent ``g`` (``log``: ``x`` holds
    probabilities whose log ``fn`` takes)."""
    ax = axis % x.ndim
    xt = torch.tensor(np.moveaxis(x, ax, 1), requires_grad=True)
    tt = torch.tensor(t if kind == "index" else np.moveaxis(t, ax, 1))
    kw = {k: torch.tensor(v) if k == "weight" else v for k, v in opts.items()}
    loss = fn(torch.log(xt) if log else xt, tt, reduction=reduction, **kw)
    loss.backward(torch.tensor(g))
    return loss.detach().numpy(), np.moveaxis(xt.grad.numpy(), 1, ax)


def ours(backend, x, t, axis, reduction, opts, g, input_type="logits", wrt_target=False,
         jit=True):
    """Our loss and gradients (NumPy arrays) on ``backend``."""
    c = ml.compile(CrossEntropy(reduction=reduction, axis=axis, input_type=input_type, **opts),
                   backend, shapes={"input": list(x.shape), "target": list(t.shape)},
                   trainable_keys=["input", "target"] if wrt_target else ["input"], jit=jit)
    params = {"input": backend.array(x)}
    data = {"target": backend.array(t)}
    if wrt_target:
        params, data = {**params, **data}, {}
    out, grads = c.evaluate(params, data, output_gradients={"output": backend.array(g)})
    return backend.to_numpy(out["output"]), {k: backend.to_numpy(v) for k, v in grads.items()}


def cases(seed: int = 0):
    """Every (shape, axis, kind, reduction, options) case, with its data and cotangent."""
    rng = np.random.default_rng(seed)
    for shape, axis in SHAPES:
        c = shape[axis % len(shape)]
        for kind in ("index", "probs"):
            for reduction in REDUCTIONS:
                for opts in option_sets(c, rng):
                    if kind == "probs" and opts.get("ignore_index", -1) >= 0:
                        continue  # refused, as torch (test_ignore_index_with_probability_rows)
                    x = 2 * rng.standard_normal(shape)
                    t = make_target(kind, shape, axis, opts, rng)
                    rows = t.shape if kind == "index" else t.shape[:axis % len(shape)] + t.shape[
                        axis % len(shape) + 1:]
                    g = rng.standard_normal(rows) if reduction == "none" else np.array(
                        rng.uniform(0.5, 2.0))
                    yield shape, axis, kind, reduction, opts, x, t, g


def failures(backend, jit_every: int = 1, every: int = 1) -> list[str]:
    """Every case (every ``every``-th) where ``backend`` (float64) is not torch's to RTOL /
    ATOL; on JAX, every ``jit_every``-th case jitted (a jit is ~0.2 s a case), the others run
    op by op."""
    bad = []
    for i, (shape, axis, kind, reduction, opts, x, t, g) in enumerate(cases()):
        if i % every:
            continue
        want, want_g = torch_reference(x, t, axis, reduction, opts, g, kind)
        got, grads = ours(backend, x, t, axis, reduction, opts, g, jit=i % jit_every == 0)
        for what, a, b in (("loss", got, want), ("grad", grads["input"], want_g)):
            if a.shape != b.shape or not np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True):
                err = np.nanmax(np.abs(a - b)) if a.shape == b.shape else f"{a.shape} != {b.shape}"
                bad.append(f"{shape} axis={axis} {kind} {reduction} {sorted(opts)}: {what} {err}")
    return bad


@pytest.mark.parametrize("make", [lambda: NumpyBackend(dtype="float64"),
                                  lambda: TorchBackend(dtype="float64")], ids=["numpy", "torch"])
def test_values_and_gradients_are_torchs(make):
    bad = failures(make())
    assert not bad, "\n".join(bad[:20])


# every 12th case visits every shape and each (target kind, reduction, option names) that
# every 6th did (17 of the 39 combinations: NumPy and torch run all of them by default)
@pytest.mark.parametrize("every", [12, pytest.param(1, marks=pytest.mark.slow)])
def test_values_and_gradients_are_torchs_on_float64_jax(every):
    """The same cases on JAX (every 12th by default: each compiles; all under ``-m slow``),
    float64, in a subprocess; and optax's label smoothing (``softmax_cross_entropy`` of
    ``smooth_labels(onehot, a)``) is ours."""
    out = run_python(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, optax
        import test_cross_entropy_torch_options as T
        import mithril as ml
        b = ml.JaxBackend(dtype="float64")
        bad = T.failures(b, jit_every=9, every={every})
        assert not bad, "\\n".join(bad[:20])
        rng = np.random.default_rng(3)
        for a in (0.0, 0.1, 0.5, 1.0):
            for shape, axis in ((6, 5), -1), ((2, 5, 3), 1):
                x = rng.standard_normal(shape)
                t = rng.integers(0, 5, (6,) if len(shape) == 2 else (2, 3))
                onehot = np.moveaxis(np.eye(5)[t], -1, axis)
                xl, ol = np.moveaxis(x, axis, -1), np.moveaxis(onehot, axis, -1)
                ref = optax.softmax_cross_entropy(jnp.asarray(xl), optax.smooth_labels(jnp.asarray(ol), a))
                ref_g = jax.grad(lambda z: optax.softmax_cross_entropy(
                    z, optax.smooth_labels(jnp.asarray(ol), a)).mean())(jnp.asarray(xl))
                ref_g = np.moveaxis(np.asarray(ref_g), -1, axis)
                for backend in (b, ml.NumpyBackend(dtype="float64"), ml.TorchBackend(dtype="float64")):
                    for target in (t, onehot):
                        for red in ("none", "mean"):
                            g = np.ones(t.shape) if red == "none" else np.array(1.0)
                            got, grads = T.ours(backend, x, target, axis, red,
                                                dict(label_smoothing=a), g, jit=a == 0.1)
                            want = np.asarray(ref) if red == "none" else np.asarray(ref).mean()
                            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
                            if red == "mean":
                                np.testing.assert_allclose(grads["input"], ref_g, rtol=1e-12, atol=1e-15)
        print("ok")
    """, timeout=600)
    assert out.strip().endswith("ok")


def test_smoothing_is_optax_smooth_labels_formula():
    """optax.smooth_labels is ``(1 − a)·onehot + a/C``: torch's smoothed target for one-hot
    rows (so ``softmax_cross_entropy`` of it is torch's ``label_smoothing=a``)."""
    optax = pytest.importorskip("optax")
    onehot = np.eye(4)[[0, 3, 1]]
    for a in (0.0, 0.2, 1.0):
        np.testing.assert_allclose(np.asarray(optax.smooth_labels(onehot, a)),
                                   (1 - a) * onehot + a / 4, rtol=1e-6)


# -- "probs" and "log_probs" inputs ------------------------------------------------------

def _probs_case(rng, shape=(5, 4), axis=-1):
    x = rng.random(shape) + 0.05
    return x / x.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("make", [lambda: NumpyBackend(dtype="float64"),
                                  lambda: TorchBackend(dtype="float64")], ids=["numpy", "torch"])
@pytest.mark.parametrize("input_type", ["probs", "log_probs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, axis", [((5, 4), -1), ((2, 4, 3), 1)])
def test_probs_and_log_probs_are_torchs_nll_loss(make, input_type, reduction, shape, axis):
    """weight and ignore_index on probabilities / log-probabilities: torch's ``F.nll_loss``
    of their log (values and gradients); with label_smoothing the value is torch's
    ``F.cross_entropy`` of the log-probabilities (its log-softmax of normalised
    log-probabilities is themselves)."""
    rng = np.random.default_rng(7)
    b = make()
    p = _probs_case(rng, shape, axis)
    c = shape[axis]
    w = rng.uniform(0.2, 2.0, c)
    for opts in (dict(weight=w), dict(ignore_index=1), dict(weight=w, ignore_index=-100)):
        t = make_target("index", shape, axis, opts, rng)
        g = rng.standard_normal(t.shape) if reduction == "none" else np.array(1.5)
        x = p if input_type == "probs" else np.log(p)
        want, want_g = torch_reference(x, t, axis, reduction, opts, g, "index", fn=F.nll_loss,
                                       log=input_type == "probs")
        got, grads = ours(b, x, t, axis, reduction, opts, g, input_type=input_type)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(grads["input"], want_g, rtol=RTOL, atol=ATOL)
    for kind in ("index", "probs"):
        opts = dict(weight=w, label_smoothing=0.2, **({"ignore_index": 0} if kind == "index" else {}))
        t = make_target(kind, shape, axis, opts, rng)
        g = rng.standard_normal(t.shape[:1] + t.shape[2:] if kind == "probs" and axis == 1 else
                                t.shape[:-1] if kind == "probs" else t.shape) \
            if reduction == "none" else np.array(1.5)
        x = p if input_type == "probs" else np.log(p)
        want, _ = torch_reference(np.log(p), t, axis, reduction, opts, g, kind)
        got, _ = ours(b, x, t, axis, reduction, opts, g, input_type=input_type)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


# -- the NumPy VJP -----------------------------------------------------------------------

@pytest.mark.parametrize("input_type", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, axis", [((4, 3), -1), ((2, 3, 2), 1)])
def test_numpy_vjp_is_finite_differences(input_type, kind, reduction, shape, axis):
    """The NumPy VJP (input, and the target where it holds probability rows) against central
    differences of the NumPy forward, for each option set."""
    rng = np.random.default_rng(11)
    b = NumpyBackend(dtype="float64")
    c = shape[axis]
    for opts in option_sets(c, rng):
        if kind == "probs" and opts.get("ignore_index", -1) >= 0:
            continue
        x = _probs_case(rng, shape, axis) if input_type != "logits" else rng.standard_normal(shape)
        x = np.log(x) if input_type == "log_probs" else x
        t = make_target(kind, shape, axis, opts, rng)
        wrt_target = kind == "probs"
        comp = ml.compile(CrossEntropy(reduction=reduction, axis=axis, input_type=input_type,
                                       **opts), b, shapes={"input": list(shape), "target": list(t.shape)},
                          trainable_keys=["input", "target"] if wrt_target else ["input"])
        out0 = comp.evaluate({"input": x, **({"target": t} if wrt_target else {})},
                             {} if wrt_target else {"target": t})["output"]
        if not np.all(np.isfinite(out0)):  # every row ignored (a NaN mean): no derivative
            continue
        g = rng.standard_normal(np.shape(out0)) if reduction == "none" else np.array(0.7)

        def f(ps, g=g, comp=comp, wrt_target=wrt_target, t=t):
            o = comp.evaluate(ps, {} if wrt_target else {"target": t})["output"]
            return float(np.sum(o * g))

        params = {"input": x, **({"target": t} if wrt_target else {})}
        _, grads = comp.evaluate(params, {} if wrt_target else {"target": t},
                                 output_gradients={"output": g})
        fd = central_differences(f, params, 1e-6)
        for k in params:
            np.testing.assert_allclose(grads[k], fd[k], rtol=1e-6, atol=1e-8,
                                       err_msg=f"{k} {sorted(opts)}")


# -- the backends against each other -----------------------------------------------------

@pytest.mark.parametrize("shape, axis", [((16, 7), -1), ((4, 7, 3, 2), 1)])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_backends_agree_in_float32(shape, axis, kind):
    """NumPy, torch and (jitted) JAX in float32 give the same loss and gradients (to float32
    rounding) for every option set and reduction; and the float32 losses are the float64
    ones to float32 precision."""
    rng = np.random.default_rng(5)
    backends = [NumpyBackend(dtype="float32"), TorchBackend(dtype="float32"),
                JaxBackend(dtype="float32")]
    for reduction in REDUCTIONS:
        for opts in option_sets(shape[axis], rng):
            if kind == "probs" and opts.get("ignore_index", -1) >= 0:
                continue
            x = rng.standard_normal(shape).astype(np.float32)
            t = make_target(kind, shape, axis, opts, rng)
            t = t.astype(np.float32) if kind == "probs" else t
            rows = t.shape if kind == "index" else np.delete(np.array(shape), axis % len(shape))
            g = (rng.standard_normal(tuple(rows)) if reduction == "none" else
                 np.array(1.25)).astype(np.float32)
            results = [ours(be, x, t, axis, reduction, opts, g, jit=reduction == "mean")
                       for be in backends]
            (l0, g0), *rest = results
            for (l1, g1), be in zip(rest, backends[1:]):
                where = f"{type(be).__name__} {reduction} {sorted(opts)}"
                np.testing.assert_allclose(l1, l0, rtol=2e-5, atol=1e-6, err_msg=where)
                np.testing.assert_allclose(g1["input"], g0["input"], rtol=2e-5, atol=1e-6,
                                           err_msg=where)
            l64, _ = ours(NumpyBackend(dtype="float64"), x.astype(np.float64),
                          t.astype(np.float64) if kind == "probs" else t, axis, reduction, opts,
                          g.astype(np.float64))
            np.testing.assert_allclose(l0, l64, rtol=2e-5, atol=1e-6)


def test_a_training_step_with_the_options_on_every_backend():
    """A Linear + CrossEntropy with all three options (labels padded with -100) trained a
    few steps by ``make_train_step`` gives the same losses on the three backends."""
    from mithril.utils.optimizers import Adam
    from mithril.utils.training import make_train_step

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    y = rng.integers(0, 4, 32)
    y[::5] = -100
    model = Model()
    model |= Linear(4)(input="input", output="logits")
    model |= CrossEntropy(weight=[1.0, 2.0, 0.5, 1.5], ignore_index=-100,
                          label_smoothing=0.1)(input="logits", target="target", output="loss")
    init = None
    runs = []
    for backend in (NumpyBackend(), TorchBackend(), JaxBackend()):
        compiled = ml.compile(model, backend, shapes={"input": [None, 6]})
        init = init or {k: backend.to_numpy(v) for k, v in compiled.randomize_params().items()}
        params = {k: backend.array(v) for k, v in init.items()}
        step = make_train_step(compiled, Adam(learning_rate=0.05), loss="loss")
        state = step.init(params)
        data = {"input": backend.array(x), "target": backend.array(y, backend.int_dtype)}
        losses = []
        for _ in range(4):
            params, state, out = step(params, state, data)
            losses.append(float(backend.to_numpy(out["loss"])))
        runs.append(losses)
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4)
    np.testing.assert_allclose(runs[2], runs[0], rtol=1e-4)
    assert runs[0][-1] < runs[0][0]


# -- degenerate batches --------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: NumpyBackend(dtype="float64"),
                                  lambda: TorchBackend(dtype="float64")], ids=["numpy", "torch"])
def test_every_row_ignored_and_empty_batches_are_torchs(make):
    """Every row ignored under "mean": NaN loss and a zero gradient, as torch; a zero weight
    sum: NaN; an empty batch: NaN mean, 0 sum, an empty "none" - with no NumPy warning."""
    b = make()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3))
    w = np.array([0.0, 2.0, 1.5])
    cases_ = [(np.full(4, -100), dict(ignore_index=-100)),
              (np.full(4, -100), dict(ignore_index=-100, weight=w, label_smoothing=0.2)),
              (np.array([0, 0, -100, 0]), dict(ignore_index=-100, weight=w)),
              (np.array([0, 0, -100, 0]), dict(ignore_index=-100, weight=w, label_smoothing=0.2))]
    with np.errstate(all="raise"):
        for t, opts in cases_:
            want, want_g = torch_reference(x, t, -1, "mean", opts, np.array(1.0), "index")
            got, grads = ours(b, x, t, -1, "mean", opts, np.array(1.0))
            assert np.isnan(got) and np.isnan(want)
            np.testing.assert_allclose(grads["input"], want_g, rtol=RTOL, equal_nan=True)
        for reduction in REDUCTIONS:
            for kind in ("index", "probs"):
                opts = dict(weight=w, label_smoothing=0.1)
                e = np.zeros((0, 3))
                t = np.zeros(0, np.int64) if kind == "index" else np.zeros((0, 3))
                g = np.zeros(0) if reduction == "none" else np.array(1.0)
                want, want_g = torch_reference(e, t, -1, reduction, opts, g, kind)
                got, grads = ours(b, e, t, -1, reduction, opts, g)
                np.testing.assert_allclose(got, want, equal_nan=True)
                assert grads["input"].shape == (0, 3)


def test_ignore_index_out_of_the_targets_dtype_matches_nothing():
    """uint8 labels with ignore_index=-100: nothing is ignored (torch reads the labels as
    int64; a wrapped comparison would take 156 for -100), on NumPy and torch."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 200))
    t = np.array([156, 3, 199, 0, 156], np.uint8)
    want, want_g = torch_reference(x, t.astype(np.int64), -1, "mean", dict(ignore_index=-100),
                                   np.array(1.0), "index")
    for b in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        got, grads = ours(b, x, t, -1, "mean", dict(ignore_index=-100), np.array(1.0))
        np.testing.assert_allclose(got, want, rtol=RTOL)
        np.testing.assert_allclose(grads["input"], want_g, rtol=RTOL, atol=ATOL)


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, name", [
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=math.nan), ValueError, "label_smoothing"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (dict(label_smoothing=True), TypeError, "label_smoothing"),
    (dict(ignore_index=1.0), TypeError, "ignore_index"),
    (dict(ignore_index="-100"), TypeError, "ignore_index"),
    (dict(ignore_index=True), TypeError, "ignore_index"),
    (dict(weight=[[1.0, 2.0]]), ValueError, "weight"),
    (dict(weight=[]), ValueError, "weight"),
    (dict(weight=["a", "b"]), TypeError, "weight"),
])
def test_bad_options_are_refused_naming_the_argument(kwargs, error, name):
    model = Model()
    model |= Linear(3)(input="input", output="logits")
    blocks = len(model.blocks)
    with pytest.raises(error, match=name):
        model |= CrossEntropy(**kwargs)(input="logits", target="target", output="loss")
    assert len(model.blocks) == blocks  # unchanged: the block was never made


@pytest.mark.parametrize("axis", [-1, 1])
def test_a_weight_of_the_wrong_length_is_a_shape_error_at_compile_time(axis):
    model = Model()
    model |= Linear(4)(input="input", output="logits")
    model |= CrossEntropy(weight=[1.0, 2.0, 3.0], axis=axis)(input="logits", target="target",
                                                             output="loss")
    for backend in (NumpyBackend(), TorchBackend()):
        with pytest.raises(ml.ShapeError, match=r"weight has 3 entries .* 4 classes"):
            ml.compile(model, backend, shapes={"input": [5, 6]})
    # the model is unchanged and compiles once the logits have 3 classes
    fixed = Model()
    fixed |= Linear(3)(input="input", output="logits")
    fixed |= CrossEntropy(weight=[1.0, 2.0, 3.0], axis=axis)(input="logits", target="target",
                                                             output="loss")
    compiled = ml.compile(fixed, NumpyBackend(), shapes={"input": [5, 6]})
    assert compiled.shapes["loss"] == ()


def test_a_free_class_count_is_checked_when_it_is_known():
    c = ml.compile(CrossEntropy(weight=[1.0, 2.0]), NumpyBackend(dtype="float64"),
                   shapes={"input": [None, None]})
    with pytest.raises(ml.ShapeError, match="weight has 2 entries"):
        c.evaluate({}, {"input": np.zeros((3, 4)), "target": np.zeros(3, np.int64)})
    out = c.evaluate({}, {"input": np.zeros((3, 2)), "target": np.zeros(3, np.int64)})
    np.testing.assert_allclose(out["output"], np.log(2))


def test_ignore_index_with_probability_rows():
    """A non-negative ignore_index against probability rows is refused naming ignore_index
    (torch: "ignore_index is not supported for floating point target"), at compile time when
    the target's shape is known, else by evaluate; a negative one matches nothing, as torch."""
    with pytest.raises(ml.ShapeError, match="ignore_index=0"):
        ml.compile(CrossEntropy(ignore_index=0), NumpyBackend(),
                   shapes={"input": [4, 3], "target": [4, 3]})
    for b in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        c = ml.compile(CrossEntropy(ignore_index=2), b, shapes={"input": [4, 3]})
        with pytest.raises(ValueError, match="ignore_index=2"):
            c.evaluate({}, {"input": b.array(np.zeros((4, 3))), "target": b.array(np.eye(3)[[0, 1, 2, 0]])})
    x = np.random.default_rng(0).standard_normal((4, 3))
    t = np.eye(3)[[0, 1, 2, 0]]
    want, _ = torch_reference(x, t, -1, "mean", dict(ignore_index=-100), np.array(1.0), "probs")
    got, _ = ours(NumpyBackend(dtype="float64"), x, t, -1, "mean", dict(ignore_index=-100),
                  np.array(1.0))
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("make", [lambda: NumpyBackend(dtype="float64"),
                                  lambda: TorchBackend(dtype="float64"),
                                  lambda: JaxBackend(dtype="float32")],
                         ids=["numpy", "torch", "jax"])
def test_labels_out_of_range_are_refused_and_params_unchanged(make):
    """A label neither in [0, C) nor ignore_index is a ValueError naming the data key; the
    params are unchanged. Without ignore_index, a -100 label's message says to pass
    ignore_index=-100 (torch's default)."""
    b = make()
    model = Model()
    model |= Linear(3)(input="input", output="logits")
    model |= CrossEntropy(ignore_index=-100, weight=[1.0, 2.0, 3.0])(
        input="logits", target="labels", output="loss")
    c = ml.compile(model, b, shapes={"input": [4, 2]})
    params = c.randomize_params()
    before = {k: b.to_numpy(v).copy() for k, v in params.items()}
    x = b.array(np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"'labels'.*out of range \(e\.g\. 3\)"):
        c.evaluate(params, {"input": x, "labels": b.array(np.array([0, -100, 3, 1]))},
                   output_gradients={"loss": b.array(1.0)})
    with pytest.raises(ValueError, match=r"'labels'.*out of range \(e\.g\. -1\)"):
        c.evaluate(params, {"input": x, "labels": b.array(np.array([0, -100, -1, 1]))})
    for k, v in params.items():
        np.testing.assert_array_equal(b.to_numpy(v), before[k])
    out = c.evaluate(params, {"input": x, "labels": b.array(np.array([0, -100, 2, 1]))})
    assert np.isfinite(b.to_numpy(out["loss"]))
    plain = ml.compile(CrossEntropy(), b, shapes={"input": [3, 3]})
    with pytest.raises(ValueError, match=r"ignore_index=-100"):
        plain.evaluate({}, {"input": b.array(np.ones((3, 3), np.float32)),
                            "target": b.array(np.array([0, -100, 1]))})


# -- the defaults keep the fast path -------------------------------------------------------

def test_defaults_keep_the_fast_path(monkeypatch):
    """At their defaults the options are no options (the NumPy compiled loops run, as
    before); set, the loss does not use them."""
    assert CrossEntropy()._options is None
    assert CrossEntropy(weight=None, ignore_index=None, label_smoothing=0.0)._options is None
    assert CrossEntropy(label_smoothing=0)._options is None
    calls = []
    real = loss_kernels.softmax_nll
    monkeypatch.setattr(loss_kernels, "softmax_nll", lambda *a: calls.append(1) or real(*a))
    x = np.random.default_rng(0).standard_normal((8, 5))
    t = np.arange(8) % 5
    b = NumpyBackend(dtype="float64")
    plain = ml.compile(CrossEntropy(), b, shapes={"input": [8, 5], "target": [8]})
    smooth = ml.compile(CrossEntropy(label_smoothing=1e-300), b,
                        shapes={"input": [8, 5], "target": [8]})
    a = plain.evaluate({}, {"input": x, "target": t})["output"]
    assert calls == [1]
    s = smooth.evaluate({}, {"input": x, "target": t})["output"]
    assert calls == [1]
    np.testing.assert_allclose(s, a, rtol=1e-15)


def test_repr_and_attributes():
    ce = CrossEntropy(weight=np.array([1, 2, 3]), ignore_index=-100, label_smoothing=0.1, axis=1)
    assert repr(ce) == ("CrossEntropy(reduction='mean', axis=1, weight=[1., 2., 3.], "
                        "ignore_index=-100, label_smoothing=0.1)")
    assert ce.weight.dtype == np.float64 and not ce.weight.flags.writeable
    assert (ce.ignore_index, ce.label_smoothing) == (-100, 0.1)
    assert repr(CrossEntropy()) == "CrossEntropy(reduction='mean')"
    plain = CrossEntropy()
    assert (plain.weight, plain.ignore_index, plain.label_smoothing) == (None, None, 0.0)
    w = torch.tensor([1.0, 2.0])
    np.testing.assert_array_equal(CrossEntropy(weight=w).weight, [1.0, 2.0])
