"""Faults found by the sixty-third session's review of the "a call that raises changes
nothing, and says what was wrong" contract."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest

from mithril.utils import checkpoint_io
from mithril.utils.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from mithril.utils.optimizers import Adam, DoG


@pytest.mark.parametrize("attr,out_of_range,bad", [
    ("weight_decay", -1, "x"), ("beta1", 1, "0.9"), ("beta2", 2.0, None),
    ("epsilon", -1e-8, [1e-8])])
def test_a_non_number_is_refused_over_an_out_of_range_number(attr, out_of_range, bad):
    """A number set over a float is unchecked (torch's ``param_groups`` are); a string,
    None or a list is refused. Once the attribute held an out-of-range number, any value
    was taken (the check of the current value, meant for a nested optimizer's names, failed
    too), and the next step raised NumPy's bare errors."""
    opt = Adam(0.01)
    setattr(opt, attr, out_of_range)  # (taken: a number over a float)
    assert getattr(opt, attr) == out_of_range
    with pytest.raises(TypeError, match=re.escape(f"Adam: {attr}={bad!r} refused: {attr} must be "
                                                  f"a number")):
        setattr(opt, attr, bad)
    assert getattr(opt, attr) == out_of_range


def test_a_nested_optimizers_name_still_set_by_attribute():
    """(What the fallback is for: a hyperparameter the wrapper's check does not know.)"""
    from mithril.utils.optimizers import Lookahead

    opt = Lookahead(Adam(0.01))
    opt.inner.beta1 = 0.5
    assert opt.inner.beta1 == 0.5


def test_a_refused_managed_save_removes_every_folder_it_made(tmp_path):
    """``CheckpointManager(folder).save`` made the missing parents of ``folder`` and, when
    the save was refused, removed only ``folder`` itself."""
    manager = CheckpointManager(str(tmp_path / "runs" / "exp1" / "ckpts"), max_to_keep=2)
    with pytest.raises(Exception, match="'w'"):
        manager.save(1, {"w": np.arange(3)})  # (integer params: refused)
    assert os.listdir(tmp_path) == []
    (tmp_path / "runs").mkdir()  # an existing parent is kept
    with pytest.raises(Exception, match="'w'"):
        manager.save(1, {"w": np.arange(3)})
    assert os.listdir(tmp_path) == ["runs"] and os.listdir(tmp_path / "runs") == []
    path = manager.save(1, {"w": np.ones(3, np.float32)})
    assert path.startswith(str(tmp_path / "runs" / "exp1" / "ckpts"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch, code):
    """A write that fails for want of space (or a file size limit) raised the bare
    ``OSError: [Errno 28] No space left on device``, naming no file. The file there is left
    as it was, and no temporary file stays."""
    path = str(tmp_path / "model.safetensors")
    save_checkpoint(path, {"w": np.zeros(4, np.float32)})
    before = open(path, "rb").read()

    def full(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_io.os, "fsync", full)
    with pytest.raises(OSError) as e:
        save_checkpoint(path, {"w": np.ones(64, np.float32)})
    assert e.value.errno == code and e.value.filename == path and path in str(e.value)
    monkeypatch.undo()
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["model.safetensors"]
    np.testing.assert_array_equal(load_checkpoint(path)["params"]["w"], np.zeros(4))


def test_dog_raise_message():
    """(test_two_pass_state_nonfinite.py has the rest.) The error names the value."""
    opt = DoG(nonfinite="raise")
    p = {"w": np.ones(2, np.float32)}
    s = opt.init(p)
    with pytest.raises(FloatingPointError, match="state value 'sum_sq'"):
        opt.update(p, {"w": np.full(2, 3e19, np.float32)}, s)
    assert s.step == 0 and s.values["sum_sq"] == 0.0


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hardsigmoid_at_infinities_is_torchs(backend, dtype):
    """``Hardsigmoid(±inf)`` was NaN (``0 · inf`` in the constant branches) on every
    backend; ``F.hardsigmoid`` gives 0 and 1, NaN for NaN. The output keeps the dtype."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    import mithril as ml

    if backend == "jax":
        pytest.importorskip("jax")
    make = {"numpy": ml.NumpyBackend, "jax": ml.JaxBackend, "torch": ml.TorchBackend}[backend]
    x = np.array([-np.inf, -3.0, -2.5, 0.0, 2.5, 3.0, np.inf, np.nan], dtype)
    m = ml.Model()
    m |= ml.Hardsigmoid()(input="input", output="output")
    c = ml.compile(m, make(dtype=dtype), shapes={"input": [x.size]})
    out = c.evaluate({}, {"input": x})["output"]
    got = np.asarray(out.detach() if hasattr(out, "detach") else out)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, F.hardsigmoid(torch.tensor(x)).numpy())


def _bf16_model(out: str = "out"):
    import mithril as ml
    from mithril.backends import NumpyBackend

    backend = NumpyBackend(dtype="bfloat16")
    model = ml.Model()
    model |= ml.Linear(3)(input="input", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    compiled = ml.compile(model, backend, shapes={"input": [None, 3]})
    rng = np.random.default_rng(0)
    data = {"input": backend.array(rng.standard_normal((4, 3))),
            "target": backend.array(rng.integers(0, 3, 4), backend.int_dtype)}
    return backend, compiled, data


def test_numpy_bfloat16_gradients_accumulate_as_torchs():
    """``NumpyBackend(dtype="bfloat16")``'s gradients (ml_dtypes' bfloat16, NumPy kind "V")
    were refused by ``Accumulate`` as "not floating point", where the optimizers, and
    ``Accumulate`` on torch's bfloat16, take them. Two micro-batches summed in float32 and
    averaged: the step equals the plain optimizer's on the mean gradient."""
    torch = pytest.importorskip("torch")
    from mithril.utils.accumulation import Accumulate

    _, compiled, data = _bf16_model()
    params = compiled.get_parameters()
    _, g = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
    assert g["linear.weight"].dtype.name == "bfloat16"
    acc = Accumulate(Adam(0.1, epsilon=1e-3), 2)
    p, s = acc.update(dict(params), g, acc.init(params))
    p, s = acc.update(p, g, s)
    tp = {k: torch.tensor(np.asarray(v, np.float32)).bfloat16() for k, v in params.items()}
    ref = torch.optim.Adam(list(tp.values()), lr=0.1, eps=1e-3)
    for k, t in tp.items():
        t.grad = torch.tensor(np.asarray(g[k], np.float32)).bfloat16()
    ref.step()
    for k in p:
        assert p[k].dtype == params[k].dtype
        np.testing.assert_allclose(np.asarray(p[k], np.float32), tp[k].float().numpy(),
                                   rtol=1e-2, atol=1e-2)
        assert not np.array_equal(np.asarray(p[k]), np.asarray(params[k]))


def test_numpy_bfloat16_dp_sgd_steps():
    """DP-SGD on a NumPy bfloat16 model's per-example gradients raised "has dtype float32
    but the parameter has dtype bfloat16" (NumPy's bfloat16 product gives float32). With
    σ = 0 the step is the clipped mean, as computed by hand."""
    from mithril.utils.optimizers import DPSGD
    from mithril.utils.per_example import per_example_gradients

    _, compiled, data = _bf16_model()
    params = compiled.get_parameters()
    rows = per_example_gradients(compiled, params, data, "loss")
    opt = DPSGD(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=0.0, seed=0)
    new, state = opt.update(dict(params), rows, opt.init(params))
    g = {k: np.asarray(v, np.float64) for k, v in rows.items()}
    norms = np.sqrt(sum((v.reshape(4, -1) ** 2).sum(1) for v in g.values()))
    c = np.minimum(1.0 / norms, 1.0)
    for k in new:
        assert new[k].dtype == params[k].dtype
        want = np.asarray(params[k], np.float64) - 0.1 * np.tensordot(c, g[k], 1) / 4
        np.testing.assert_allclose(np.asarray(new[k], np.float64), want, rtol=0, atol=2e-2)
    assert state.step == 1


def test_per_example_errors_name_per_example_gradients():
    """Its loss checks said ``make_train_step:``, a function the user had not called."""
    import mithril as ml
    from mithril.backends import NumpyBackend
    from mithril.errors import KeyMismatchError, ShapeError
    from mithril.utils.per_example import per_example_gradients

    model = ml.Model()
    model |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    model |= ml.Square()(input="out", output=ml.IOKey("loss"))
    c = ml.compile(model, NumpyBackend(), shapes={"input": [None, 3]})
    data = {"input": np.ones((4, 3), np.float32)}
    with pytest.raises(ShapeError, match="^per_example_gradients: the loss 'loss' must be"):
        per_example_gradients(c, c.get_parameters(), data, "loss")
    with pytest.raises(KeyMismatchError, match="^per_example_gradients: loss 'nope'"):
        per_example_gradients(c, c.get_parameters(), data, "nope")


@pytest.mark.parametrize("by_object", [True, False], ids=["object", "name"])
def test_compile_shapes_name_a_parameter_role(by_object):
    """docs/mithril-compat.md: every key set, ``shapes`` too, may name a direct child's
    parameter role (by object, or by its compiled name). ``shapes`` refused it ("no
    terminal 'linear.weight'"), so the published ``Linear()`` got its width only by renaming
    its weight. The parameter keeps its compiled name and its gradient."""
    import mithril as ml
    from mithril.errors import ShapeError
    from mithril.models import Linear, Model

    lin = Linear()
    m = Model()
    m |= lin.connect(input="input", output="output")
    key = lin.weight if by_object else "linear.weight"
    c = ml.compile(m, ml.NumpyBackend(dtype="float64"), shapes={key: [2, 3]})
    assert c.parameter_shapes == {"linear.weight": (2, 3), "linear.bias": (2,)}
    rng = np.random.default_rng(0)
    w, b, x = rng.standard_normal((2, 3)), rng.standard_normal(2), rng.standard_normal((4, 3))
    out, g = c.evaluate({"linear.weight": w, "linear.bias": b}, {"input": x},
                        output_gradients={"output": np.ones((4, 2))})
    np.testing.assert_allclose(out["output"], x @ w.T + b, rtol=1e-12)
    np.testing.assert_allclose(g["linear.weight"], np.ones((4, 2)).T @ x, rtol=1e-12)
    with pytest.raises(ShapeError):  # a width the block fixes otherwise
        m2 = Model()
        m2 |= Linear(5).connect(input="input", output="output")
        ml.compile(m2, ml.NumpyBackend(), shapes={"linear.weight": [2, 3]})


def test_cross_entropy_takes_the_published_threshold():
    """The published ``CrossEntropy(input_type="probs", robust=True, threshold=c)``: here
    ``cutoff``, and ``threshold`` too; both at once is refused."""
    import mithril as ml

    probs = np.array([[0.0, 1.0], [0.3, 0.7]])
    target = np.array([0, 1])
    outs = []
    for kw in ({"threshold": 1e-3}, {"cutoff": 1e-3}):
        m = ml.Model()
        m |= ml.CrossEntropy(input_type="probs", robust=True, **kw)(
            input="input", target="target", output=ml.IOKey("loss"))
        c = ml.compile(m, ml.NumpyBackend(dtype="float64"), shapes={"input": [2, 2]})
        outs.append(float(c.evaluate({}, {"input": probs, "target": target})["loss"]))
    c_ = 1e-3
    want = (-(np.log(c_) + 0.0 / c_ - 1) - np.log(0.7)) / 2
    assert outs[0] == outs[1] and np.isclose(outs[0], want, rtol=1e-12)
    with pytest.raises(TypeError, match="threshold is the published name of cutoff"):
        ml.CrossEntropy(input_type="probs", robust=True, cutoff=1e-3, threshold=1e-3)


def test_add_loss_takes_a_constant_connection():
    """The published ``test_add_loss_case_2``: ``add_loss(Subtract(), [Min(axis=-1),
    Max(axis=-1), Mean(axis=-1)], left="output", right=Tensor(0.0), key_name="abcd")`` was
    refused ("connection 'right' must be a name"); its published numbers: abcd = final_cost
    = 5, the input's gradient 0.5 at [i, 1, 0]. A plain number is a constant too."""
    import mithril as ml
    from mithril import Tensor
    from mithril.models import IOKey, Max, Mean, Min, Model, Relu, Subtract, TrainModel

    x = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]], np.float32)
    for right in (Tensor(0.0), 0.0, 1.0):
        model = Model()
        model |= Relu().connect(input=IOKey("input", differentiable=True, shape=[2, 2, 2]),
                                output="output")
        model.expose_keys("output")
        tm = TrainModel(model)
        tm.add_loss(Subtract(), [Min(axis=-1), Max(axis=-1), Mean(axis=-1)], left="output",
                    right=right, key_name="abcd")
        c = ml.compile(tm, ml.NumpyBackend())
        out, g = c.evaluate({"input": x}, output_gradients=True)
        shift = 0.0 if isinstance(right, IOKey) else right
        assert float(out["abcd"]) == float(out["final_cost"]) == 5.0 - shift
        np.testing.assert_array_equal(g["input"], [[[0, 0], [0.5, 0]], [[0, 0], [0.5, 0]]])


def _none_cases():
    from mithril.utils.optimizers import (
        SAM,
        SGD,
        SM3,
        Adafactor,
        Mechanize,
        Muon,
        NoisySGD,
        ScheduleFree,
    )

    return {"adafactor": lambda: Adafactor(0.01), "muon": lambda: Muon(0.01),
            "sm3": lambda: SM3(0.1), "noisy_sgd": lambda: NoisySGD(0.01, eta=0.1, seed=1),
            "mechanize": lambda: Mechanize(Adam(0.1)), "schedule_free": lambda: ScheduleFree(
                SGD(0.1)), "sam": lambda: SAM(SGD(0.1))}


@pytest.mark.parametrize("name", list(_none_cases()))
def test_a_none_gradient_is_no_gradient(name):
    """docs/optimizers.md, "Parameters without a gradient": a None gradient (torch's
    ``.grad`` None) is the key left out. The tensorwise optimizers (Adafactor, Muon, SM3,
    NoisySGD) raised "gradients['b'] is a NoneType", the wrappers (Mechanize, ScheduleFree,
    SAM) "are None"; so did ``DataParallel`` of them in one process."""
    make = _none_cases()[name]
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    g = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    runs = []
    for grads in ({"w": g["w"], "b": None}, {"w": g["w"]}):
        opt = make()
        p = {k: v.copy() for k, v in p0.items()}
        s = opt.init(p)
        kw = {}
        if name == "sam":  # (the gradient at the perturbed point: a quadratic's, w only)
            kw["closure"] = lambda q: (0.0, {"w": 2 * q["w"]})
        for _ in range(2):
            p, s = opt.update(p, grads, s, **kw)
        runs.append(p)
    for k in p0:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])
    assert not np.array_equal(runs[0]["w"], p0["w"])


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_data_parallel_of_one_reports_the_optimizers_norm(shard):
    """One process: ``DataParallel`` is the wrapped optimizer. Sharded, its global norm was
    the raw gradients' where the optimizer measures them centralized or adaptively clipped
    (``centralize=True`` with ``clip_norm``: other params too)."""
    from mithril import distributed as dist
    from mithril.utils.optimizers import SGD

    rng = np.random.default_rng(0)
    p0 = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    g = {"w": rng.normal(size=(4, 3)) + 5.0, "b": rng.normal(size=3)}
    for make in (lambda: SGD(0.1, clip_norm=1.0, centralize=True),
                 lambda: SGD(0.1, adaptive_clip=0.01)):
        o = make()
        ref, s = o.update(dict(p0), dict(g), o.init(dict(p0)))
        dp = dist.DataParallel(make(), shard_state=shard)
        p, st = dp.update(dict(p0), dict(g), dp.init(dict(p0)))
        assert st.last_grad_norm == pytest.approx(s.last_grad_norm, rel=1e-14)
        for k in p0:
            np.testing.assert_allclose(p[k], ref[k], rtol=0, atol=1e-15)


def test_sharded_checkpoint_of_a_run_gone_nan_loads(tmp_path):
    """``save_sharded`` wrote a Prodigy state whose values were NaN (a run diverged under
    ``"propagate"``) as JSON's non-standard ``NaN``, which ``load_sharded`` refuses; they are
    stored by name now ("nan", as the metrics), and load back as NaN."""
    import warnings

    from mithril import distributed as dist
    from mithril.utils.optimizers import Prodigy

    dp = dist.DataParallel(Prodigy(), shard_state=True)
    p = {"w": np.ones(3), "b": np.zeros(2)}
    st = dp.init(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p, st = dp.update(p, {"w": np.array([np.nan, 1.0, 1.0]), "b": np.ones(2)}, st)
    assert np.isnan(st.local.values["d"])
    dist.save_sharded(str(tmp_path / "ck"), p, dp, st)
    dp2 = dist.DataParallel(Prodigy(), shard_state=True)
    p2, st2 = dist.load_sharded(str(tmp_path / "ck"), dp2)
    assert set(st2.local.values) == set(st.local.values)
    for k, v in st.local.values.items():
        assert np.isnan(v) == np.isnan(st2.local.values[k])
        if not np.isnan(v):
            assert st2.local.values[k] == v
    assert st2.local.step == st.local.step == 1
