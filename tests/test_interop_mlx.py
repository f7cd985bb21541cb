"""``mithril.interop.mlx_optimizer``: a mithril optimizer inside an MLX training loop.

Side by side with ``mlx.optimizers`` (MLX's CPU build): ``convention="mlx"`` optimizers in
an ``mlx.nn`` loop (float32) and on float64 trees of random gradients (1e-12); other
optimizers against the same mithril optimizer run directly on NumPy (bit for bit);
``update`` vs ``apply_gradients``; MLX schedules and learning rates set between steps;
refused calls that change nothing; resumed runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from mithril.errors import KeyMismatchError, ShapeError
from mithril.interop import mlx_optimizer
from mithril.utils.optimizers import (
    LBFGS,
    SAM,
    SGD,
    Adam,
    AdamW,
    Lookahead,
    Mechanize,
    Muon,
    PolyakSGD,
    Prodigy,
    ScheduleFree,
    ScheduleFreeAdamW,
)

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
optim = pytest.importorskip("mlx.optimizers")
from mlx.utils import tree_flatten  # noqa: E402 - after the skip

SHAPES = {"w": (6, 5), "layers.0.weight": (4, 6), "layers.0.bias": (4,), "layers.1.weight": (3, 4)}


def tree(flat, dtype=mx.float64):
    """A nested MLX tree ({"w", "layers": [{"weight", "bias"}, {"weight"}]}) of ``flat``."""
    from mlx.utils import tree_unflatten

    return tree_unflatten([(k, mx.array(v, dtype=dtype)) for k, v in flat.items()])


def flat_np(t):
    return {k: np.array(v) for k, v in tree_flatten(t)}


def random_run(steps=12, seed=0):
    rng = np.random.default_rng(seed)
    start = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(steps)]
    return start, grads


def run_mlx_tree(opt, start, grads, dtype=mx.float64):
    params = tree(start, dtype)
    for g in grads:
        params = opt.apply_gradients(tree(g, dtype), params)
        mx.eval(params, opt.state)
    return flat_np(params)


def run_direct(opt, start, grads, dtype=np.float64):
    params = {k: v.astype(dtype) for k, v in start.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, {k: v.astype(dtype) for k, v in g.items()}, state)
    return {k: np.array(v) for k, v in params.items()}


def close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        scale = max(1.0, float(np.abs(b[k]).max()))
        assert float(np.abs(a[k] - b[k]).max()) <= tol * scale, (k, np.abs(a[k] - b[k]).max())


# -- (1) convention="mlx" against mlx.optimizers in an mlx.nn loop ----------------------
def mlp():
    mx.random.seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


_rng = np.random.default_rng(1)
X, Y = _rng.standard_normal((32, 8)).astype(np.float32), _rng.integers(0, 4, 32)


def train(opt, steps=20):
    model = mlp()
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    x, y = mx.array(X), mx.array(Y)
    for _ in range(steps):
        _, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


MLX_PAIRS = [
    (lambda: Adam(1e-2, convention="mlx"), lambda: optim.Adam(1e-2)),
    (lambda: Adam(1e-2, bias_correction=True, convention="mlx"),
     lambda: optim.Adam(1e-2, bias_correction=True)),
    (lambda: SGD(0.1, momentum=0.9, weight_decay=1e-3, convention="mlx"),
     lambda: optim.SGD(0.1, momentum=0.9, weight_decay=1e-3)),
    (lambda: AdamW(1e-2, weight_decay=0.05, convention="mlx"),
     lambda: optim.AdamW(1e-2, weight_decay=0.05)),
]


@pytest.mark.parametrize("ours,theirs", MLX_PAIRS, ids=["adam", "adam-bc", "sgd", "adamw"])
def test_mlx_loop_float32_equals_mlx(ours, theirs):
    opt = mlx_optimizer(ours())
    assert isinstance(opt, optim.Optimizer)
    got = train(opt)
    ref = train(theirs())
    close(got, ref, 2e-6)
    assert max(float(np.abs(got[k] - mlp_start()[k]).max()) for k in got) > 1e-2  # it moved
    assert int(opt.state["step"]) == 20 and opt.state["step"].dtype == mx.uint64


def test_inside_mlx_multi_optimizer():
    def multi(first):
        return optim.MultiOptimizer([first, optim.SGD(0.1, momentum=0.9)],
                                    [lambda path, w: w.ndim == 2])

    ours = multi(mlx_optimizer(Adam(1e-2, convention="mlx")))
    close(train(ours), train(multi(optim.Adam(1e-2))), 2e-6)
    assert sorted(ours.optimizers[0].mithril_state.layout.names) == ["layers.0.weight",
                                                                      "layers.2.weight"]


def mlp_start():
    return {k: np.array(v) for k, v in tree_flatten(mlp().parameters())}


@pytest.mark.parametrize("ours,theirs", MLX_PAIRS, ids=["adam", "adam-bc", "sgd", "adamw"])
def test_float64_trees_equal_mlx(ours, theirs):
    start, grads = random_run()
    lr = mx.array(0.05, dtype=mx.float64)  # (MLX holds a float learning rate in float32)
    a, b = ours(), theirs()
    b.learning_rate = lr
    got = run_mlx_tree(mlx_optimizer(a, learning_rate=lr), start, grads)
    close(got, run_mlx_tree(b, start, grads), 1e-12)


# -- (2) any mithril optimizer: the same as on NumPy, bit for bit ----------------------
OTHERS = {
    "prodigy": lambda: Prodigy(1.0, weight_decay=0.01),
    "lookahead-adam": lambda: Lookahead(Adam(1e-2), sync_period=3),
    "muon": lambda: Muon(0.02, fallback=AdamW(1e-2)),
    "groups-clip-ema": lambda: Adam(1e-2, clip_norm=1.0, ema_decay=0.9, param_groups=[
        {"params": ["layers.0.weight", "layers.0.bias"], "learning_rate": 1e-3,
         "weight_decay": 0.1}]),
}


@pytest.mark.parametrize("name", sorted(OTHERS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_any_optimizer_bit_for_bit_with_numpy(name, dtype):
    start, grads = random_run()
    opt = mlx_optimizer(OTHERS[name]())
    got = run_mlx_tree(opt, start, grads, getattr(mx, dtype))
    ref = run_direct(OTHERS[name](), start, grads, np.dtype(dtype))
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert int(opt.state["step"]) == len(grads) == opt.mithril_state.step


def catalog():
    import mithril.utils.optimizers as catalog_module

    wrappers = {"Lookahead": lambda: Lookahead(Adam()), "ScheduleFree": lambda: ScheduleFree(
        SGD(0.1)), "Mechanize": lambda: Mechanize(Adam())}
    # (LBFGS and SAM take a closure: below; DPSGD and DifferentiallyPrivate per-example
    # gradients, which mlx_optimizer passes on as any others)
    left = {"Optimizer", "LBFGS", "SAM", "DPSGD", "DifferentiallyPrivate"}
    for name in catalog_module.__all__:
        cls = getattr(catalog_module, name)
        if isinstance(cls, type) and issubclass(cls, catalog_module.Optimizer) and name not in left:
            yield name, wrappers.get(name, cls)


def test_whole_catalog_bit_for_bit_with_numpy():
    start, grads = random_run(steps=3)
    start = {k: v for k, v in start.items() if k != "layers.1.weight"}
    grads = [{k: g[k] for k in start} for g in grads]
    wrong, names = [], []
    for name, make in catalog():
        names.append(name)
        kw = {"loss": 2.0} if make().needs_loss else {}
        opt, params = mlx_optimizer(make()), tree(start)
        for g in grads:
            params = opt.apply_gradients(tree(g), params, **kw)
        ref, p_ref = make(), {k: v.copy() for k, v in start.items()}
        state = ref.init(p_ref)
        for g in grads:
            p_ref, state = ref.update(p_ref, g, state, **kw)
        got = flat_np(params)
        if any(not np.array_equal(got[k], p_ref[k], equal_nan=True) for k in got):
            wrong.append(name)
    assert len(names) > 40 and {"Prodigy", "Muon", "Adafactor", "Lookahead"} <= set(names)
    assert not wrong, wrong


# -- (3) update(model, grads) vs apply_gradients; a parameter without gradient ----------
def test_update_equals_apply_gradients_and_skips_missing():
    a, b = mlx_optimizer(Adam(1e-2)), mlx_optimizer(Adam(1e-2))
    m = mlp()
    params = m.parameters()
    loss_and_grad = nn.value_and_grad(m, loss_fn)
    _, grads = loss_and_grad(m, mx.array(X), mx.array(Y))
    out = b.apply_gradients(grads, params)
    a.update(m, grads)
    for k, v in tree_flatten(m.parameters()):
        np.testing.assert_array_equal(np.array(v), np.array(dict(tree_flatten(out))[k]))
    # a gradients tree without layers.2: returned without it, left alone, its state kept
    start, grads = random_run(steps=3)
    opt, ref = mlx_optimizer(SGD(0.1, momentum=0.9, weight_decay=0.1)), SGD(0.1, momentum=0.9,
                                                                           weight_decay=0.1)
    params, p_ref = tree(start), {k: v.copy() for k, v in start.items()}
    state = ref.init(p_ref)
    for i, g in enumerate(grads):
        g = {k: v for k, v in g.items() if i != 1 or k != "w"}
        new = opt.apply_gradients(tree(g), params)
        assert {k for k, _ in tree_flatten(new)} == set(g)
        params = tree({**flat_np(params), **flat_np(new)})
        p_ref, state = ref.update(p_ref, g, state)
    close(flat_np(params), {k: np.array(v) for k, v in p_ref.items()}, 0)


def test_parameters_replaced_between_steps_are_read():
    # the model keeps the arrays a step returned: mithril's buffer is used as it is; a
    # parameter replaced between steps (model.load_weights, model.update) is copied in
    start, grads = random_run(steps=6)
    opt, ref = mlx_optimizer(Adam(1e-2)), Adam(1e-2)
    params, p_ref = tree(start), {k: v.copy() for k, v in start.items()}
    state = ref.init(p_ref)
    for i, g in enumerate(grads):
        if i == 3:
            params["w"] = mx.zeros((6, 5), dtype=mx.float64)
            p_ref = {**p_ref, "w": np.zeros((6, 5))}
        params = opt.apply_gradients(tree(g), params)
        p_ref, state = ref.update(p_ref, g, state)
    close(flat_np(params), {k: np.array(v) for k, v in p_ref.items()}, 0)
    assert float(np.abs(flat_np(params)["w"]).max()) < 0.05  # (restarted from zeros)


def test_ema_swa_and_schedule_free_eval_params():
    start, grads = random_run(steps=5)
    for make, get in [(lambda: Adam(1e-2, ema_decay=0.9, swa_start=2),
                       lambda o, s, p: {**o.ema_params(s), **{"swa." + k: v for k, v in
                                                               o.swa_params(s).items()}}),
                      (lambda: ScheduleFreeAdamW(1e-2), lambda o, s, p: o.eval_params(s, p))]:
        opt, ref = mlx_optimizer(make()), make()
        with pytest.raises(ValueError, match="no step yet"):
            opt.eval_params()
        run_mlx_tree(opt, start, grads)
        params = {k: v.copy() for k, v in start.items()}
        state = ref.init(params)
        for g in grads:
            params, state = ref.update(params, g, state)
        want = {k: np.array(v) for k, v in get(ref, state, params).items()}
        if "swa.w" in want:
            got = {**flat_np(opt.ema_params()),
                   **{"swa." + k: v for k, v in flat_np(opt.swa_params()).items()}}
        else:
            got = flat_np(opt.eval_params())
        close(got, want, 0)
        assert float(np.abs(got["w"] - np.array(params["w"])).max()) > 1e-6  # not y itself
    # evaluate with x in a model, put y back, train on: as if never swapped
    start, grads = random_run(steps=4)
    model, ref = nn.Module(), ScheduleFreeAdamW(1e-2)
    for k, v in tree(start).items():
        setattr(model, k, v)
    opt = mlx_optimizer(ScheduleFreeAdamW(1e-2))
    params = {k: v.copy() for k, v in start.items()}
    state = ref.init(params)
    for i, g in enumerate(grads):
        opt.update(model, tree(g))
        params, state = ref.update(params, g, state)
        if i == 1:
            y = model.parameters()
            model.update(opt.eval_params())
            model.update(y)
    close(flat_np(model.parameters()), {k: np.array(v) for k, v in params.items()}, 0)


def test_init_fixes_the_parameters():
    model = mlp()
    model.freeze(keys=["bias"])  # MLX's: biases frozen, out of the gradients
    opt = mlx_optimizer(AdamW(1e-2))
    opt.init(model.trainable_parameters())
    assert sorted(opt.mithril_state.layout.names) == ["layers.0.weight", "layers.2.weight"]
    opt.init(model.trainable_parameters())  # the same parameters: nothing to do
    with pytest.raises(KeyMismatchError, match="already holds"):
        opt.init(model.parameters())
    biases = {k: v for k, v in tree_flatten(model.parameters()) if "bias" in k}
    _, grads = nn.value_and_grad(model, loss_fn)(model, mx.array(X), mx.array(Y))
    opt.update(model, grads)
    assert int(opt.state["step"]) == 1
    for k, v in tree_flatten(model.parameters()):
        if k in biases:
            assert v is biases[k]  # frozen: not touched (not even decayed)
    # a resume from the model: the frozen biases (no saved slots) are left out again
    d = opt.state_dict()
    again = mlx_optimizer(AdamW(1e-2))
    bad = {**d, "slots": {s: {**v, "layers.0.weight": v["layers.0.weight"][:1]}
                          for s, v in d["slots"].items()}}
    with pytest.raises(ShapeError, match="layers.0.weight"):
        again.load_state_dict(bad, model)
    assert again.mithril_state is None and int(again.state["step"]) == 0
    again.load_state_dict(d, model)
    ours, theirs = opt.apply_gradients(grads, model), again.apply_gradients(grads, model)
    assert int(again.state["step"]) == 2
    close(flat_np(theirs), flat_np(ours), 0)


# -- (4) schedules --------------------------------------------------------------------
def test_mlx_schedule_equals_mlx():
    start, grads = random_run(steps=15)
    sched = optim.join_schedules([optim.linear_schedule(0.0, 0.1, 5),
                                  optim.cosine_decay(0.1, 10)], [5])
    opt = mlx_optimizer(Adam(1e-3, convention="mlx"), learning_rate=sched)
    assert float(opt.learning_rate) == 0.0  # the value at step 0, as MLX's
    got = run_mlx_tree(opt, start, grads)
    close(got, run_mlx_tree(optim.Adam(sched), start, grads), 1e-12)
    assert opt.mithril_optimizer.learning_rate == float(sched(mx.array(14)))


def test_learning_rate_set_between_steps_equals_mlx():
    start, grads = random_run(steps=9)
    ours, theirs = mlx_optimizer(SGD(0.5, momentum=0.9, convention="mlx")), optim.SGD(
        0.5, momentum=0.9)
    p, q = tree(start), tree(start)
    for i, g in enumerate(grads):
        if i in (3, 6):  # (values float32 holds exactly: MLX rounds a float to float32)
            ours.learning_rate = theirs.learning_rate = 0.5 / 2 ** i
        p, q = ours.apply_gradients(tree(g), p), theirs.apply_gradients(tree(g), q)
    close(flat_np(p), flat_np(q), 1e-12)
    assert ours.mithril_optimizer.learning_rate == 0.5 / 2 ** 6
    ours.learning_rate = optim.step_decay(0.5, 0.5, 2)  # a schedule set later, at step 9
    assert float(ours.learning_rate) == 0.5 * 0.5 ** 4
    ours.learning_rate = lambda step: 0.25 / (1 + int(step))  # a plain callable's floats
    p = ours.apply_gradients(tree(grads[0]), p)
    mx.eval(p, ours.state)
    assert ours.mithril_optimizer.learning_rate == 0.025  # (unrounded; the state: float32)
    assert float(ours.learning_rate) == float(np.float32(0.025))


# -- (5) refused calls change nothing ---------------------------------------------------
def snapshot(opt):
    st = opt.mithril_state
    return (int(opt.state["step"]), float(opt.learning_rate), opt.mithril_optimizer.learning_rate,
            {s: {n: np.array(v) for n, v in st.slot(s).items()} for s in st.slots})


def same_snapshot(a, b):
    assert a[:3] == b[:3]
    for s in a[3]:
        for n in a[3][s]:
            np.testing.assert_array_equal(a[3][s][n], b[3][s][n])


def test_refused_calls_change_nothing():
    start, grads = random_run(steps=2)
    opt = mlx_optimizer(Adam(1e-2, nonfinite="raise"))
    params = tree(start)
    params = opt.apply_gradients(tree(grads[0]), params)
    before, p_before = snapshot(opt), flat_np(params)
    bad_shape = {**grads[1], "w": np.ones((5, 6))}
    nan = {**grads[1], "layers.0.bias": np.full(4, np.nan)}
    cases = [
        (ShapeError, "gradients\\['w'\\] has shape", tree(bad_shape), params),
        (KeyMismatchError, "extra", tree({**grads[1], "extra": np.ones(2)}),
         tree({**start, "extra": np.ones(2)})),
        (KeyMismatchError, "parameters has no", tree(grads[1]),
         tree({k: v for k, v in start.items() if k != "w"})),
        (TypeError, "float32 master", tree(grads[1], mx.bfloat16), params),
        (TypeError, "gradients\\['w'\\] is a", {**tree(grads[1]), "w": np.ones((6, 5))}, params),
        (FloatingPointError, "layers.0.bias", tree(nan), params),
    ]
    for err, match, g, p in cases:
        with pytest.raises(err, match=match):
            opt.apply_gradients(g, p)
        same_snapshot(snapshot(opt), before)
    np.testing.assert_array_equal(flat_np(params)["w"], p_before["w"])
    # a schedule giving a negative rate: refused before the step, the rate kept
    calls = []  # (fine when set, negative at the update)
    opt.learning_rate = lambda step: mx.array(-1.0 if calls.append(step) or len(calls) > 1
                                              else 0.1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="learning_rate must be >= 0"):
        opt.apply_gradients(tree(grads[1]), params)
    same_snapshot(snapshot(opt), before)
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = -0.1
    with pytest.raises(AttributeError, match="load_state_dict"):
        opt.state = {}
    m, compiled = nn.Linear(3, 2), mlx_optimizer(Adam(1e-2))

    @mx.compile
    def traced(x):
        grads = nn.value_and_grad(m, lambda m, x: (m(x) ** 2).mean())(m, x)[1]
        return compiled.apply_gradients(grads, m)

    with pytest.raises(ValueError, match="outside mx.compile"):
        traced(mx.ones((4, 3)))
    assert compiled.mithril_state is None and int(compiled.state["step"]) == 0
    with pytest.raises(TypeError, match="closure: Adam takes gradients only"):
        opt.apply_gradients(tree(grads[1]), params, closure=lambda p: None)
    same_snapshot(snapshot(opt), before)
    with pytest.raises(TypeError, match="mithril optimizer"):
        mlx_optimizer(optim.Adam(1e-3))


def test_skipped_step_is_not_counted():
    start, grads = random_run(steps=2)
    opt = mlx_optimizer(Adam(1e-2, nonfinite="skip"))
    params = opt.apply_gradients(tree(grads[0]), tree(start))
    before = snapshot(opt)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        new = opt.apply_gradients(tree({**grads[1], "w": np.full((6, 5), np.inf)}), params)
    same_snapshot(snapshot(opt), before)
    close(flat_np(new), flat_np(params), 0)


def test_loss_aware_optimizer_takes_loss():
    start, grads = random_run(steps=4)
    opt, ref = mlx_optimizer(PolyakSGD(max_learning_rate=0.5)), PolyakSGD(max_learning_rate=0.5)
    params, p_ref = tree(start), {k: v.copy() for k, v in start.items()}
    state = ref.init(p_ref)
    for i, g in enumerate(grads):
        params = opt.apply_gradients(tree(g), params, loss=mx.array(3.0 - i))
        p_ref, state = ref.update(p_ref, g, state, loss=3.0 - i)
    close(flat_np(params), {k: np.array(v) for k, v in p_ref.items()}, 0)


# -- closures: LBFGS and SAM -------------------------------------------------------------
A = np.random.default_rng(3).standard_normal((5, 5))


def mlx_loss(params):  # a smooth loss of the tree, in MLX
    w, b = params["w"], params["layers"][0]["bias"]
    return (mx.tanh(mx.array(A) @ w[:5]) ** 2).sum() + ((b - 1.0) ** 2).sum()


def test_closure_optimizers_equal_direct_numpy():
    start = {k: v for k, v in random_run(steps=1)[0].items() if k in ("w", "layers.0.bias")}
    value_and_grad = mx.value_and_grad(mlx_loss)

    def direct_closure(p):  # the same MLX arithmetic, NumPy in and out
        loss, g = value_and_grad(tree(p))
        return loss.item(), {k: np.array(v) for k, v in tree_flatten(g)}

    for make, with_grads in [(lambda: LBFGS(1.0, max_iter=5, line_search_fn="strong_wolfe"), False),
                             (lambda: SAM(SGD(0.1, momentum=0.9), rho=0.05), True)]:
        opt, ref = mlx_optimizer(make()), make()
        params, p_ref = tree(start), {k: v.copy() for k, v in start.items()}
        state = ref.init(p_ref)
        for _ in range(4):
            g = value_and_grad(params)[1] if with_grads else None
            params = {**params, **opt.apply_gradients(g, params, closure=value_and_grad)}
            gn = None if g is None else {k: np.array(v) for k, v in tree_flatten(g)}
            p_ref, state = ref.update(p_ref, gn, state, closure=direct_closure)
        close(flat_np(params), {k: np.array(v) for k, v in p_ref.items()}, 0)
        assert mlx_loss(params).item() < 0.9 * mlx_loss(tree(start)).item()  # (it descends)


def test_closure_update_of_a_model_and_a_failing_closure():
    model = mlp()
    x, y = mx.array(X), mx.array(Y)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def closure(params):
        model.update(params)
        return loss_and_grad(model, x, y)

    opt = mlx_optimizer(LBFGS(1.0, max_iter=4))
    first = loss_fn(model, x, y).item()
    for _ in range(3):
        opt.update(model, None, closure=closure)
    assert loss_fn(model, x, y).item() < 0.9 * first
    kept, before = flat_np(model.parameters()), snapshot(opt)
    calls = []

    def failing(params):  # moves the model, then fails at its second evaluation
        model.update(params)
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("data loader failed")
        return loss_and_grad(model, x, y)

    with pytest.raises(RuntimeError, match="data loader"):
        opt.update(model, None, closure=failing)
    same_snapshot(snapshot(opt), before)
    for k, v in flat_np(model.parameters()).items():
        np.testing.assert_array_equal(v, kept[k])


# -- (6) resume -------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["state_dict", "file"])
def test_resumed_run_equals_uninterrupted(route, tmp_path):
    start, grads = random_run(steps=10)
    make = lambda: Lookahead(AdamW(0.1, weight_decay=0.01), sync_period=4)  # noqa: E731
    sched = optim.cosine_decay(1.0, 10)
    whole = run_mlx_tree(mlx_optimizer(make(), sched), start, grads)
    first = mlx_optimizer(make(), sched)
    params = tree(start)
    for g in grads[:6]:
        params = first.apply_gradients(tree(g), params)
    second = mlx_optimizer(make(), sched)
    if route == "state_dict":
        second.load_state_dict(first.state_dict(), params)
    else:
        first.save(tmp_path / "opt.safetensors")
        second.load(tmp_path / "opt.safetensors")
    assert int(second.state["step"]) == 6
    assert float(second.learning_rate) == float(sched(mx.array(5)))  # as MLX's state
    for g in grads[6:]:
        params = second.apply_gradients(tree(g), params)
    for k, v in flat_np(params).items():
        np.testing.assert_array_equal(v, whole[k], err_msg=k)
