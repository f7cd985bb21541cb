"""Follow-ups of the sixty-seventh session's review."""
from __future__ import annotations

import numpy as np
import pytest


def test_mlx_ema_and_eval_params_keep_the_parameters_tree() -> None:
    """``mlx_optimizer(...).ema_params()`` / ``eval_params()`` come back in the user's own
    tree structure, as ``apply_gradients`` does (MLX's tree_map): tuples stay tuples, a dict
    with digit keys stays a dict. They came back through ``tree_unflatten``: lists."""
    mx = pytest.importorskip("mlx.core")
    from mithril.interop import mlx_optimizer
    from mithril.utils.optimizers import Adam, ScheduleFreeAdamW

    def tree(a: float) -> dict:
        return {"layers": ({"w": mx.full((2,), a)}, {"w": mx.full((3,), a)}),
                "d": {"0": mx.full((1,), a)}}

    for opt, get in [(mlx_optimizer(Adam(1e-2, ema_decay=0.9)), "ema_params"),
                     (mlx_optimizer(ScheduleFreeAdamW(1e-2)), "eval_params")]:
        params = tree(1.0)
        for _ in range(2):
            params = opt.apply_gradients(tree(0.5), params)
        got = getattr(opt, get)()
        assert isinstance(got["layers"], tuple) and isinstance(got["d"], dict)
        want = getattr(opt.mithril_optimizer, get)(
            *((opt.mithril_state,) if get == "ema_params" else (opt.mithril_state, opt._params)))
        np.testing.assert_array_equal(np.asarray(got["layers"][1]["w"]), want["layers.1.w"])
        np.testing.assert_array_equal(np.asarray(got["d"]["0"]), want["d.0"])


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("p", [-1.0, -2.5, -np.inf])
def test_pairwise_distance_negative_p_nan_beats_zero(backend_name: str, p: float) -> None:
    """A row of ``x1 − x2`` holding both a NaN and a 0 has distance NaN for p < 0, as
    ``F.pairwise_distance`` (the zero made it 0 on every backend)."""
    import torch.nn.functional as F
    from test_hunt66_kernel_models import _run, _torch

    import mithril as ml

    x1 = np.array([[np.nan, 0.0, 2.0], [1.0, 0.0, 3.0], [np.nan, 2.0, 3.0], [1.0, 2.0, 3.0]])
    x2 = np.zeros((1, 3))
    ins = {"input1": x1, "input2": x2}
    cots = {"output": np.array([1.0, -2.0, 0.5, 1.5])}
    want, wgrad = _torch(lambda t: {"output": F.pairwise_distance(t["input1"], t["input2"], p,
                                                                  0.0)}, ins, cots)
    assert np.isnan(want["output"][0]) and want["output"][1] == 0.0
    out, grads = _run(ml.PairwiseDistance(p=p, eps=0.0), ins, cots, backend_name)
    np.testing.assert_allclose(out["output"], want["output"], rtol=1e-12, equal_nan=True)
    # the gradient of the rows without a NaN as torch's (torch's NaN rows: NaN or 0 per entry)
    np.testing.assert_allclose(grads["input1"][[1, 3]], wgrad["input1"][[1, 3]], rtol=1e-12)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_a_multi_kind_input_feeding_only_a_buffer_takes_its_declared_kinds(
        backend_name: str) -> None:
    """``IOKey("x", type=Tensor[int | bool])`` read only by a Buffer took float data and
    passed it on (a single kind was enforced, several were not): now int and bool data pass,
    float data is a DTypeError naming the input, as the declaration says."""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
    from mithril.models import Buffer, IOKey, Model

    b = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[backend_name](
        dtype="float64")
    m = Model()
    m |= Buffer().connect(input=IOKey("x", type=ml.Tensor[int | bool]), output="y")
    c = ml.compile(m, b, shapes={"x": [3]})
    with pytest.raises(ml.DTypeError, match="input 'x': expected a bool or int dtype, got float64"):
        c.evaluate({}, {"x": np.array([1.5, 2.0, 3.0])})
    for x in (np.array([3, -1, 7]), np.array([True, False, True])):
        out = c.evaluate({}, {"x": b.array(x, b.int_dtype if x.dtype != bool else "bool")})
        np.testing.assert_array_equal(np.asarray(out["y"]), x)
    both = Model()
    both |= Buffer().connect(input=IOKey("x", type=ml.Tensor[int | float]), output="y")
    c = ml.compile(both, b, shapes={"x": [2]})
    with pytest.raises(ml.DTypeError, match="input 'x': expected a float or int dtype, got bool"):
        c.evaluate({}, {"x": np.array([True, False])})
    np.testing.assert_array_equal(np.asarray(c.evaluate({}, {"x": np.array([1.5, 2.0])})["y"]),
                                  [1.5, 2.0])


def test_recurrent_state_shape_error_names_the_batch_of_a_batch_first_input() -> None:
    """A wrong ``initial_hidden`` for a ``batch_first`` LSTM named the layer's time-major
    input shape ([5, 2, 3] for the user's (2, 5, 3)) as "the batch of 'input'"; the message
    now gives N itself and says the shape shown is time-major. torch refuses the same."""
    import torch

    import mithril as ml
    from mithril.backends import NumpyBackend
    from mithril.models import LSTM, Model

    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 4\)"):
        torch.nn.LSTM(3, 4, batch_first=True)(torch.zeros(2, 5, 3),
                                               (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)))
    m = Model()
    m |= LSTM(4, batch_first=True, initial_states=True)(
        input="x", initial_hidden="h0", initial_cell="c0", output="y")
    with pytest.raises(ml.ShapeError, match=r"'initial_hidden' must be \(N, 4\) .*with N = 2 "
                       r"the batch of 'input' \(\[5, 2, 3\] in time-major \(T, N, I\) order\), "
                       r"got shape \[1, 3, 4\]"):
        ml.compile(m, NumpyBackend(dtype="float64"),
                   shapes={"x": [2, 5, 3], "h0": [1, 3, 4], "c0": [1, 2, 4]})


def test_checkpoint_extra_keeps_nan_and_infinities(tmp_path) -> None:
    """``extra={"best_loss": inf}`` (a training loop's usual start) was refused as not JSON;
    torch.save keeps it. Non-finite floats (Python's and NumPy's) now round-trip as floats,
    as the scheduler state's and the metrics' do; a deep tuple is refused like a deep list."""
    import math

    import torch

    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    extra = {"best_loss": math.inf, "worst": -math.inf, "last": float("nan"),
             "history": [1.0, np.float32("inf"), {"v": np.float64("-inf")}], "epoch": 3}
    params = {"w": np.ones(2)}
    save_checkpoint(tmp_path / "c.safetensors", params, extra=extra)
    got = load_checkpoint(tmp_path / "c.safetensors")["extra"]
    torch.save(extra, tmp_path / "t.pt")
    want = torch.load(tmp_path / "t.pt", weights_only=False)
    assert got["best_loss"] == want["best_loss"] == math.inf
    assert got["worst"] == -math.inf and math.isnan(got["last"]) and got["epoch"] == 3
    assert got["history"] == [1.0, math.inf, {"v": -math.inf}]
    assert all(type(v) is float for v in (got["best_loss"], got["history"][1]))
    deep: tuple = ()
    for _ in range(70):
        deep = (deep,)
    before = (tmp_path / "c.safetensors").read_bytes()
    with pytest.raises(ValueError, match="extra nests deeper than 63 levels"):
        save_checkpoint(tmp_path / "c.safetensors", params, extra=deep)
    assert (tmp_path / "c.safetensors").read_bytes() == before


def test_accumulate_refuses_an_empty_first_micro_batch(tmp_path) -> None:
    """``Accumulate.update(params, {}, state)`` on a window's first call was taken and
    counted: the window's keys became none, every later micro-batch was refused and the state
    could not be saved (stuck). It is refused now, nothing changed; the same window then runs
    as ``optax.MultiSteps`` does."""
    import jax.numpy as jnp
    import optax

    from mithril.utils.accumulation import Accumulate
    from mithril.utils.checkpoint import save_checkpoint
    from mithril.utils.optimizers import Adam

    params = {"w": np.array([1.0, -2.0, 0.5]), "b": np.array([0.25, 0.0])}
    acc = Accumulate(Adam(0.1), 2)
    state = acc.init(params)
    with pytest.raises(ValueError, match=r"gradients is empty on the window's first micro-batch "
                                         r"\(params: \['b', 'w'\]\)"):
        acc.update(params, {}, state)
    assert state.micro_step == 0 and state.accumulator.count == 0
    grads = [{"w": np.array([0.5, 1.0, -1.0]), "b": np.array([2.0, -0.5])},
             {"w": np.array([-0.25, 0.5, 3.0]), "b": np.array([1.0, 1.5])}]
    p = params
    for g in grads:
        p, state = acc.update(p, g, state)
    save_checkpoint(tmp_path / "c.safetensors", p, acc, state)
    tx = optax.MultiSteps(optax.adam(0.1), 2)
    q = {k: jnp.asarray(v) for k, v in params.items()}
    s = tx.init(q)
    for g in grads:
        u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, q)
        q = optax.apply_updates(q, u)
    for k in params:
        np.testing.assert_allclose(p[k], np.asarray(q[k]), rtol=1e-5)  # (optax: float32)


@pytest.mark.parametrize("arg", ["trainable_keys", "data_keys", "discard_keys"])
def test_compile_key_sets_take_none(arg: str) -> None:
    """``compile(..., trainable_keys=None)`` (and ``data_keys`` / ``discard_keys``) failed
    with a bare "'NoneType' object is not iterable" while ``shapes=None`` and
    ``constant_keys=None`` were taken: None is the empty set, a number a TypeError naming
    the argument."""
    import mithril as ml
    from mithril.backends import NumpyBackend
    from mithril.models import Linear, Model

    m = Model()
    m |= Linear(2)(input="x", output="y")
    b = NumpyBackend(dtype="float64")
    c = ml.compile(m, b, shapes={"x": [3, 4]}, **{arg: None})
    params = {"linear.weight": np.arange(8.0).reshape(2, 4) / 8, "linear.bias": np.array([0.5, -1.0])}
    x = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    np.testing.assert_allclose(c.evaluate(params, {"x": x})["y"],
                               x @ params["linear.weight"].T + params["linear.bias"], rtol=1e-15)
    with pytest.raises(TypeError, match=rf"compile\({arg}=...\) must be a key or a set of keys, "
                                        r"got int"):
        ml.compile(m, b, shapes={"x": [3, 4]}, **{arg: 5})


_PAIR_LOSSES = {
    "SquaredError": (lambda ml: ml.SquaredError(reduction="mean"),
                     lambda F, x, t: F.mse_loss(x, t)),
    "SquaredError-none": (lambda ml: ml.SquaredError(),
                          lambda F, x, t: F.mse_loss(x, t, reduction="none")),
    "AbsoluteError-sum": (lambda ml: ml.AbsoluteError(reduction="sum"),
                          lambda F, x, t: F.l1_loss(x, t, reduction="sum")),
    "HuberLoss": (lambda ml: ml.HuberLoss(delta=0.5), lambda F, x, t: F.huber_loss(x, t, delta=0.5)),
    "SmoothL1Loss-none": (lambda ml: ml.SmoothL1Loss(reduction="none", beta=0.5),
                          lambda F, x, t: F.smooth_l1_loss(x, t, reduction="none", beta=0.5)),
}


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("loss", sorted(_PAIR_LOSSES))
@pytest.mark.parametrize("tshape", [(), (3,), (1, 3), (4, 1)])
def test_pair_losses_broadcast_the_target(backend_name: str, loss: str, tshape: tuple) -> None:
    """A target that broadcasts against the input (``target=0.0``, a (3,) row of targets) was
    a ShapeError; torch's F.mse_loss / l1_loss / huber_loss / smooth_l1_loss and the published
    losses broadcast it. The values and both gradients equal torch autograd's (float64), a
    target of another rank warns as torch does."""
    import warnings

    import torch
    import torch.nn.functional as F

    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
    from mithril.models import Model

    rng = np.random.default_rng(3)
    x, t = rng.normal(size=(4, 3)), rng.normal(size=tshape)
    make, ref = _PAIR_LOSSES[loss]
    b = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[backend_name](
        dtype="float64")
    m = Model()
    m |= make(ml)(input="x", target="t", output="out")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        c = ml.compile(m, b, shapes={"x": [4, 3], "t": list(tshape)}, trainable_keys=["x", "t"])
    ours = [w for w in seen if "broadcasts against 'input'" in str(w.message)]
    assert bool(ours) == (tshape != ())  # (as torch: but a 0-d target never warns)
    tx, tt = torch.tensor(x, requires_grad=True), torch.tensor(t, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own size warning)
        want = ref(F, tx, tt)
    cot = rng.normal(size=tuple(want.shape))
    want.backward(torch.tensor(cot))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, grads = c.evaluate({"x": b.array(x), "t": b.array(t)},
                                output_gradients={"out": b.array(cot)})
    np.testing.assert_allclose(np.asarray(b.to_numpy(out["out"])), want.detach().numpy(),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(b.to_numpy(grads["x"])), tx.grad.numpy(), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(np.asarray(b.to_numpy(grads["t"])), tt.grad.numpy(), rtol=1e-12,
                               atol=1e-14)
