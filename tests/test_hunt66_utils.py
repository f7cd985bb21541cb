"""Hunt 66 (utils outside the optimizer step: hessian, per-example gradients, weight averaging,
accumulation, monitoring): defects found side by side with torch / JAX, each pinned here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import jax_float64

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.hessian import hessian_vector_product, hutchinson_diagonal

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


@pytest.fixture(autouse=True)
def _x64():
    """float64 JAX for each test, the process-wide flag put back after."""
    with jax_float64():
        yield


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


# -- Muon: a group's averaging and clipping reach its fallback tensors -------------------------
def _torch_ema_of(trajectory: list[dict], decay: float | None, start: int) -> list[dict]:
    """torch's ``AveragedModel(get_ema_multi_avg_fn(decay))`` (None: ``AveragedModel``'s
    default equal average, SWA) created after step ``start − 1`` and updated after every
    later step, over the parameters ``trajectory`` (the initial ones first)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    names = list(trajectory[0])
    net = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(trajectory[0][n]))
                                  for n in names])
    avg, out = None, []
    for t, p in enumerate(trajectory[1:], 1):
        with torch.no_grad():
            for q, n in zip(net, names):
                q.copy_(torch.tensor(p[n]))
        if t == start:
            avg = AveragedModel(net) if decay is None else AveragedModel(
                net, multi_avg_fn=get_ema_multi_avg_fn(decay))
        if avg is not None:
            avg.update_parameters(net)
        src = net if avg is None else avg.module
        out.append({n: q.detach().numpy().copy() for n, q in zip(names, src)} if avg
                   else {n: trajectory[0][n] for n in names})
    return out


def _host(x) -> np.ndarray:
    return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, dtype=np.float64)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_muon_group_averaging_and_clipping_reach_the_fallback_tensors(name):
    """A Muon group naming a fallback tensor (``"b"``, a vector: SGD's) with its own
    ``ema_decay`` / ``ema_start`` / ``clip_value``: the fallback's rows took Muon's own
    (the EMA of ``"b"`` started at step 1 with decay 0.5, its gradient unclipped), though
    clipping and averaging are Muon's for every parameter. Against torch: SGD after
    ``clip_grad_value_`` for ``"b"``, ``AveragedModel`` EMAs per group."""
    import jax.numpy as jnp

    from mithril.utils.optimizers import SGD, Muon

    rng = np.random.default_rng(3)
    p0 = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(6)]
    make = {"numpy": np.array, "torch": torch.tensor, "jax": jnp.asarray}[name]
    opt = Muon(0.02, ns_dtype=None, fallback=SGD(0.1), ema_decay=0.5,
               param_groups=[{"params": ["b"], "ema_decay": 0.9, "ema_start": 3,
                              "clip_value": 0.3}])
    params = {k: make(v.copy()) for k, v in p0.items()}
    state = opt.init(params)
    traj, emas = [{k: v.copy() for k, v in p0.items()}], []
    for g in grads:
        params, state = opt.update(params, {k: make(v) for k, v in g.items()}, state)
        traj.append({k: _host(v).copy() for k, v in params.items()})
        emas.append({k: _host(v).copy() for k, v in opt.ema_params(state).items()})
    b = torch.nn.Parameter(torch.tensor(p0["b"]))  # torch's "b": SGD on clipped gradients
    sgd = torch.optim.SGD([b], lr=0.1)
    for t, g in enumerate(grads, 1):
        b.grad = torch.tensor(g["b"])
        torch.nn.utils.clip_grad_value_([b], 0.3)
        sgd.step()
        np.testing.assert_allclose(traj[t]["b"], b.detach().numpy(), rtol=1e-14, atol=1e-15)
    want_w = _torch_ema_of([{"w": p["w"]} for p in traj], 0.5, 1)
    want_b = _torch_ema_of([{"b": p["b"]} for p in traj], 0.9, 3)
    for t, (got, ww, wb) in enumerate(zip(emas, want_w, want_b, strict=True), 1):
        np.testing.assert_allclose(got["w"], ww["w"], rtol=1e-13, atol=1e-14, err_msg=str(t))
        np.testing.assert_allclose(got["b"], wb["b"], rtol=1e-13, atol=1e-14, err_msg=str(t))
    assert np.array_equal(emas[1]["b"], p0["b"])  # (before its start: the initial params)


@pytest.mark.parametrize("kind", ["Muon", "Adafactor", "SM3"])
def test_traced_tensorwise_averages_follow_each_group(kind):
    """``optax_transformation`` of a tensorwise optimizer (Muon, Adafactor, SM3) gave every
    tensor the optimizer's own averaging weights: a group's ``ema_decay`` / ``ema_start`` /
    ``swa_start`` were left out of the traced program (the eager step keeps them). Against
    torch's ``AveragedModel`` per group over the parameters the program gives."""
    import jax.numpy as jnp
    import optax

    import mithril.utils.optimizers as mo
    from mithril.interop import optax_transformation

    rng = np.random.default_rng(7)
    p0 = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(6)]
    extra = {"ns_dtype": None} if kind == "Muon" else {}
    opt = getattr(mo, kind)(0.02, ema_decay=0.5, swa_start=4, **extra, param_groups=[
        {"params": ["w"], "ema_decay": 0.9, "ema_start": 3, "swa_start": 2}])
    tx = optax_transformation(opt)
    q = {k: jnp.asarray(v) for k, v in p0.items()}
    s = tx.init(q)
    traj, got = [p0], []
    for g in grads:
        u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, q)
        q = optax.apply_updates(q, u)
        traj.append({k: np.asarray(v, np.float64) for k, v in q.items()})
        got.append({a: {k: np.asarray(v, np.float64) for k, v in s.slots[a].items()}
                    for a in ("ema", "swa")})
    want = {("ema", "w"): _torch_ema_of([{"w": p["w"]} for p in traj], 0.9, 3),
            ("ema", "b"): _torch_ema_of([{"b": p["b"]} for p in traj], 0.5, 1),
            ("swa", "w"): _torch_ema_of([{"w": p["w"]} for p in traj], None, 2),
            ("swa", "b"): _torch_ema_of([{"b": p["b"]} for p in traj], None, 4)}
    for (a, k), rows in want.items():
        for t, (g, w) in enumerate(zip(got, rows, strict=True), 1):
            np.testing.assert_allclose(g[a][k], w[k], rtol=1e-13, atol=1e-14,
                                       err_msg=f"{kind} {a} {k} step {t}")


def test_update_ratios_of_a_snapshot_in_another_library():
    """``before`` copied to NumPy (``{k: np.array(v)}``, or a torch tensor, a JAX array)
    against ``after`` of another library: the torch path called ``.detach()`` on a NumPy /
    JAX ``before`` (AttributeError) and the JAX path took torch tensors into its jitted
    norm. Now every pairing gives torch's ``(a − b).norm() / b.norm()``."""
    import jax.numpy as jnp

    from mithril.utils.monitoring import TrainingMonitor, update_ratios

    rng = np.random.default_rng(5)
    b0, a0 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    want = float((torch.tensor(a0) - torch.tensor(b0)).norm() / torch.tensor(b0).norm())
    make = {"numpy": np.array, "torch": torch.tensor, "jax": jnp.asarray}
    for kb, mb in make.items():
        for ka, ma in make.items():
            got = update_ratios({"w": mb(b0)}, {"w": ma(a0)})
            assert got["w"] == pytest.approx(want, rel=1e-12), (kb, ka)
    monitor = TrainingMonitor()
    monitor.before_update({"w": np.array(b0)})
    assert monitor.after_update({"w": torch.tensor(a0)})["update_ratios"]["w"] == \
        pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_hessian_of_an_output_of_unknown_shape_checks_it_for_the_inputs(name):
    """A loss whose shape the compiler could not tell (no input shapes given) and that is
    not a scalar for the inputs given went to each backend's own error (NumPy's output
    gradient shape, torch's ``grad can be implicitly created only for scalar outputs``,
    JAX's ``Gradient only defined for scalar-output functions``): now one ShapeError
    naming it, as torch's ``hvp`` refuses it; a scalar one is torch's ``hvp``."""
    be = BACKENDS[name](dtype="float64")
    model = ml.Model()
    model |= ml.Multiply()(left="input", right=ml.IOKey("w", differentiable=True), output="y")
    model |= ml.Multiply()(left="y", right="y", output=ml.IOKey("out"))
    model |= ml.Sum()(input="out", output=ml.IOKey("loss"))
    c = ml.compile(model, be, shapes={"w": [3]})
    assert c.program.output_shape("out") is None
    rng = np.random.default_rng(2)
    w0, x, v0 = rng.standard_normal(3), rng.standard_normal((2, 3)), rng.standard_normal(3)
    params, data, vec = {"w": be.array(w0)}, {"input": be.array(x)}, {"w": be.array(v0)}
    with pytest.raises(RuntimeError, match="single element"):
        torch.autograd.functional.hvp(lambda w: (torch.tensor(x) * w) ** 2, torch.tensor(w0),
                                      torch.tensor(v0))
    for fn in (lambda: hessian_vector_product(c, params, data, vec, loss="out"),
               lambda: hutchinson_diagonal(c, params, data, 0, loss="out")):
        with pytest.raises(ShapeError, match=r"the loss 'out' must be a scalar output, it "
                                             r"has shape \(2, 3\) for these inputs"):
            fn()
    _, want = torch.autograd.functional.hvp(lambda w: ((torch.tensor(x) * w) ** 2).sum(),
                                            torch.tensor(w0), torch.tensor(v0))
    got = hessian_vector_product(c, params, data, vec, loss="loss")["w"]
    np.testing.assert_allclose(_host(got), want.numpy(), rtol=1e-8 if name == "numpy" else 1e-14)
    assert c.step == 0


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_per_example_gradients_of_an_output_of_unknown_shape(name):
    """``per_example_gradients`` of a loss whose shape the compiler could not tell and that
    is not a scalar: NumPy returned the gradient of its sum (silently), torch and JAX raised
    their autograd's errors; now one ShapeError naming it (torch.func.grad refuses it too),
    and a scalar one is ``torch.func.vmap(torch.func.grad(...))``."""
    from torch.func import grad, vmap

    from mithril.utils.per_example import per_example_gradients

    be = BACKENDS[name](dtype="float64")
    model = ml.Model()
    model |= ml.Multiply()(left="input", right=ml.IOKey("w", differentiable=True), output="y")
    model |= ml.Multiply()(left="y", right="y", output=ml.IOKey("out"))
    model |= ml.Sum()(input="out", output=ml.IOKey("loss"))
    c = ml.compile(model, be, shapes={"w": [3]})
    rng = np.random.default_rng(4)
    w0, x = rng.standard_normal(3), rng.standard_normal((4, 3))
    params, data = {"w": be.array(w0)}, {"input": be.array(x)}
    with pytest.raises(RuntimeError, match="scalar"):
        vmap(grad(lambda w, xi: (xi[None] * w) ** 2), in_dims=(None, 0))(
            torch.tensor(w0), torch.tensor(x))
    with pytest.raises(ShapeError, match=r"per_example_gradients: the loss 'out' must be a "
                                         r"scalar output, it has shape \(1, 3\)"):
        per_example_gradients(c, params, data, "out")
    want = vmap(grad(lambda w, xi: ((xi[None] * w) ** 2).sum()), in_dims=(None, 0))(
        torch.tensor(w0), torch.tensor(x))
    got = per_example_gradients(c, params, data, "loss")["w"]
    np.testing.assert_allclose(_host(got), want.numpy(), rtol=1e-14)
    assert c.step == 0
