"""``weight_dimension_numbers`` of Muon and GaLore against optax 0.2.8's
(``muon_weight_dimension_numbers`` with ``MuonDimensionNumbers``, ``weight_dimension_numbers``
with ``GaLoreDimensionNumbers``), float64, side by side in each test.

The parameters: an attention-like (embed, heads, head_dim) weight, a conv kernel
(out, in, kh, kw) (Muon: kh, kw are batch axes, 9 matrices orthogonalised alone; GaLore:
every axis named), a 2-D weight given optax's (0, 1) orientation and a bias (None: Muon's
fallback / GaLore's plain Adam). 12 steps (GaLore: projector refreshes at steps 1, 6, 11),
compared after every step to 1e-10 on NumPy, torch, JAX (the jitted engine; op by op in the
slow suite), ``optax_transformation`` and ``torch_optimizer``.

Muon is torch.optim.Muon's, optax's differs from it in two places the comparison takes out:
optax bias-corrects its Nesterov mix (``nesterov=False`` here: the bias correction is then a
common factor the normalisation removes) and divides by ``‖U‖ + eps`` (torch: by
``max(‖U‖, eps)``: ``eps=1e-30`` here, on both sides and in the Adam fallback). The
iteration runs in float64 as optax's (``ns_dtype="float64"``).
"""

from __future__ import annotations

import copy
import functools
import io

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import optax.contrib as oc  # noqa: E402
from optimizer_parity import check_torch_optimizer_resume, optax_trajectory  # noqa: E402

from mithril.errors import ShapeError  # noqa: E402
from mithril.interop import optax_transformation, torch_optimizer  # noqa: E402
from mithril.utils.optimizers import AdamW, DimensionNumbers, GaLore, Muon  # noqa: E402
from mithril.utils.optimizers.engines import tensorwise_jit  # noqa: E402

TOL = 1e-10
STEPS = 12
SHAPES = {"attn": (6, 2, 3), "conv": (4, 3, 3, 3), "w": (5, 7), "b": (5,)}
rng = np.random.default_rng(0)
P0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
GRADS = [{k: rng.standard_normal(s) * (1 + t % 3) for k, s in SHAPES.items()}
         for t in range(STEPS)]
MDN, GDN = oc.MuonDimensionNumbers, oc.GaLoreDimensionNumbers
MUON_DIMS = {"attn": MDN(0, (1, 2)), "conv": MDN(1, 0), "w": MDN(), "b": None}
GALORE_DIMS = {"attn": GDN(0, (1, 2)), "conv": GDN((1, 2, 3), 0), "w": GDN(-1, 0), "b": None}


@pytest.fixture(autouse=True, scope="module")
def _x64():
    jax.config.update("jax_enable_x64", True)  # (conftest restores it after the module)
    yield


def muon_pair(dims=MUON_DIMS, theirs=MUON_DIMS, **kw):
    mine = Muon(0.05, weight_decay=0.1, momentum=0.9, nesterov=False, epsilon=1e-30,
                ns_dtype="float64", fallback=AdamW(0.02, weight_decay=0.0, epsilon=1e-30),
                weight_dimension_numbers=dims, **kw)
    return mine, oc.muon(0.05, beta=0.9, eps=1e-30, weight_decay=0.1, nesterov=False,
                         adam_learning_rate=0.02, muon_weight_dimension_numbers=theirs,
                         consistent_rms=0.2 if kw.get("adjust_lr_fn") else None)


def galore_pair(dims=GALORE_DIMS, theirs=GALORE_DIMS):
    return (GaLore(0.05, rank=2, update_proj_gap=5, weight_decay=0.1,
                   weight_dimension_numbers=dims),
            oc.galore(0.05, rank=2, update_proj_gap=5, weight_decay=0.1,
                      weight_dimension_numbers=theirs))


def reference(tx, params=None) -> list[dict]:
    return optax_trajectory(tx, params or P0, GRADS)


def _host(params: dict) -> dict:
    return {k: v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
            for k, v in params.items()}


def ours(opt, path: str, monkeypatch) -> list[dict]:
    if path == "optax_transformation":
        return reference(optax_transformation(opt))
    if path == "torch_optimizer":
        tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in P0.items()}
        topt, out = torch_optimizer(opt, list(tp.items())), []
        for g in GRADS:
            for k, p in tp.items():
                p.grad = torch.tensor(g[k])
            topt.step()
            out.append(_host(tp))
        return out
    monkeypatch.setattr(tensorwise_jit, "ENABLED", path != "jax-eager")
    conv = {"numpy": np.array, "torch": torch.tensor}.get(path, jnp.asarray)
    params = {k: conv(v) for k, v in P0.items()}
    state, out = opt.init(params), []
    for g in GRADS:
        params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
        out.append(_host(params))
    return out


def _same(got: list[dict], want: list[dict], tol: float = TOL) -> None:
    assert np.abs(want[-1]["attn"] - P0["attn"]).max() > 1e-2  # it moved
    for t, (a, b) in enumerate(zip(got, want)):
        for k in b:
            assert a[k].dtype == np.float64
            np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=f"{k} step {t + 1}")


@functools.cache
def expected(which: str) -> list[dict]:
    return reference((muon_pair if which == "muon" else galore_pair)()[1])


PATHS = ["numpy", "torch", "jax", "jax-eager", "optax_transformation", "torch_optimizer"]


#: the slow suite's: JAX op by op, and Muon's jitted engine (GaLore's is the default suite's)
SLOW = {("muon", "jax-eager"), ("galore", "jax-eager"), ("muon", "jax")}


@pytest.mark.parametrize("which, path", [
    pytest.param(w, p, marks=[pytest.mark.slow] if (w, p) in SLOW else [])
    for w in ("muon", "galore") for p in PATHS])
def test_float64_parity_with_optax(which: str, path: str, monkeypatch) -> None:
    opt = (muon_pair if which == "muon" else galore_pair)()[0]
    _same(ours(opt, path, monkeypatch), expected(which))


def _per_leaf(make):  # optax's callable (a pytree of specs for the params), ours alike
    # (optax's Muon calls it with its masked updates too: MaskedNode leaves, no ndim)
    return lambda params: {k: make(k, getattr(v, "ndim", 0)) for k, v in params.items()}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow)
                                  for c in ("callable", "one spec", "pair", "rms")])
def test_the_other_forms_of_the_argument(case: str) -> None:
    """One spec for every tensor of 2+ axes (ours: vectors to the fallback / plain Adam;
    optax's Muon would take the bias too and fail: it is given None there), a callable,
    plain pairs, and Muon's ``consistent_rms`` (ours ``adjust_lr_fn="match_rms_adamw"``)."""
    if case == "one spec":  # GaLore: every axis named, so one 3-D tensor (and the bias)
        params = {k: P0[k] for k in ("attn", "b")}
        mine, theirs = galore_pair(DimensionNumbers(0, (1, -1)), GDN(0, (1, -1)))
        _same(ours_numpy(mine, params), reference(theirs, params))
        mine, theirs = muon_pair(MDN(-1, 0), _per_leaf(
            lambda k, nd: MDN(-1, 0) if nd >= 2 else None))
    elif case == "callable":
        spec = _per_leaf(lambda k, nd: MDN(0, tuple(range(1, nd))) if nd >= 2 else None)
        mine, theirs = muon_pair(spec, spec)
        _same(ours_numpy(mine), reference(theirs))
        assert mine.hyperparameters()["weight_dimension_numbers"]["conv"] == [[0], [1, 2, 3]]
        mine, theirs = galore_pair(_per_leaf(
            lambda k, nd: GDN(0, tuple(range(1, nd))) if nd >= 2 else None), _per_leaf(
            lambda k, nd: GDN(0, tuple(range(1, nd))) if nd >= 2 else None))
    elif case == "pair":
        mine = galore_pair({k: None if v is None else tuple(v) for k, v in GALORE_DIMS.items()})[0]
        theirs = galore_pair()[1]
    else:
        mine, theirs = muon_pair(adjust_lr_fn="match_rms_adamw")
    _same(ours_numpy(mine), reference(theirs))


@pytest.mark.parametrize("make", [muon_pair, galore_pair])
def test_a_callable_is_the_dict_it_gives(make) -> None:
    """(The default suite's; against optax: ``test_the_other_forms_of_the_argument``.)"""
    dims = MUON_DIMS if make is muon_pair else GALORE_DIMS
    opt = make(lambda params: {k: dims[k] for k in params})[0]
    got, want = ours_numpy(opt)[-1], ours_numpy(make()[0])[-1]
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    listed = opt.hyperparameters()["weight_dimension_numbers"]  # (normalised axes)
    assert set(listed) == set(P0) and listed["b"] is None and listed["attn"] == [[0], [1, 2]]


def ours_numpy(opt, params=None) -> list[dict]:
    p = {k: v.copy() for k, v in (params or P0).items()}
    state, out = opt.init(p), []
    for g in GRADS:
        p, state = opt.update(p, {k: g[k] for k in p}, state)
        out.append(_host(p))
    return out


def test_default_is_torchs_orientation_and_the_slots() -> None:
    """None is ``DimensionNumbers(1, 0)`` for a 2-D tensor (torch's (out, in) weight: lr
    scaled by √max(1, rows/cols)); optax's ``(0, 1)`` is the transpose. GaLore's slots are
    laid out from G (fan_in × fan_out), Muon's momentum in the tensor's shape."""
    p = {"w": P0["w"]}
    a, b, c = (ours_numpy(Muon(0.05, ns_dtype="float64", weight_dimension_numbers=d), p)[-1]["w"]
               for d in (None, DimensionNumbers(1, 0), DimensionNumbers(0, 1)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    opt = GaLore(rank=2, weight_dimension_numbers=GALORE_DIMS)
    s = opt.init({k: v.copy() for k, v in P0.items()})
    assert s.slot("projector")["attn"].shape == (6, 2) and s.slot("m")["attn"].shape == (2, 6)
    assert s.slot("projector")["conv"].shape == (27, 2) and s.slot("v")["conv"].shape == (2, 4)
    assert s.slot("projector")["b"].shape == (0,) and s.slot("m")["b"].shape == (5,)
    s = muon_pair()[0].init({k: v.copy() for k, v in P0.items()})
    assert s.slot("momentum_buffer")["conv"].shape == (4, 3, 3, 3)
    assert s.slot("momentum_buffer")["b"].shape == (0,) and s.slot("fallback_m")["b"].shape == (5,)


BAD = [  # (argument, the words of the error)
    ({"attn": DimensionNumbers(0, 3), "conv": None, "w": None, "b": None}, "axis 3 is out of range"),
    ({"attn": DimensionNumbers(-1, 2), "conv": None, "w": None, "b": None}, "overlap"),
    ({"attn": None, "conv": None, "w": None, "b": DimensionNumbers(0, 1)}, "2 or more axes"),
    ({"attn": None, "conv": None, "w": None}, "no entry for 'b'"),
    ({"attn": None, "conv": None, "w": None, "b": None, "x": None}, "names ['x']"),
    (lambda p: {k: DimensionNumbers(0, 5) for k in p}, "axis 5 is out of range"),
]


@pytest.mark.parametrize("make", [muon_pair, galore_pair])
@pytest.mark.parametrize("dims, words", BAD)
def test_a_bad_spec_is_refused_by_name_at_init(make, dims, words) -> None:
    opt = make(dims)[0]
    params = {k: v.copy() for k, v in P0.items()}
    if make is galore_pair and "names" in words:  # (GaLore's init: each as laid out)
        state = opt.init(params)
        with pytest.raises(KeyError, match=r"names \['x'\]"):
            opt.update(params, GRADS[0], state)
        assert state.step == 0
        params = state.slot("m")  # (the slots kept as they were: no step ran)
        assert np.all(params["attn"] == 0) and np.all(params["b"] == 0)
        return
    with pytest.raises((ValueError, KeyError), match=words.replace("[", r"\[")):
        opt.init(params)
    for k in P0:
        np.testing.assert_array_equal(params[k], P0[k])
    assert opt._backend is None  # nothing kept


@pytest.mark.parametrize("kwargs, error, words", [
    ({"weight_dimension_numbers": DimensionNumbers(0, 0)}, ValueError, "named twice"),
    ({"weight_dimension_numbers": DimensionNumbers(0.5, 1)}, TypeError, "reduction_axis"),
    ({"weight_dimension_numbers": DimensionNumbers((), 1)}, TypeError, "non-empty"),
    ({"weight_dimension_numbers": "0,1"}, TypeError, "DimensionNumbers"),
    ({"weight_dimension_numbers": {"w": 3}}, TypeError, r"\['w'\]"),
    # (a group restating the optimizer's own value is taken, as torch's groups repeat it)
    ({"param_groups": [{"params": ["w"], "weight_dimension_numbers": DimensionNumbers(0, 1)}]},
     ValueError, "weight_dimension_numbers"),
])
@pytest.mark.parametrize("cls", [Muon, GaLore])
def test_bad_arguments_are_refused_at_construction(cls, kwargs, error, words) -> None:
    with pytest.raises(error, match=words):
        cls(**kwargs)


def test_galore_takes_no_batch_axes_and_mlx_none() -> None:
    with pytest.raises(ValueError, match=r"'conv'.*axes \(2, 3\) are in neither"):
        GaLore(weight_dimension_numbers={"conv": DimensionNumbers(0, 1)}).init(
            {"conv": P0["conv"].copy()})
    with pytest.raises(ValueError, match="convention='mlx' takes None"):
        Muon(convention="mlx", weight_dimension_numbers=DimensionNumbers())


@pytest.mark.parametrize("make", [muon_pair, galore_pair])
def test_fixed_at_construction_and_a_refused_step_changes_nothing(make) -> None:
    opt = make()[0]
    p = {k: v.copy() for k, v in P0.items()}
    state = opt.init(p)
    p, state = opt.update(p, GRADS[0], state)
    with pytest.raises(AttributeError, match="fixed at construction"):
        opt.weight_dimension_numbers = None
    before = copy.deepcopy(opt.state_dict(state))
    held = {k: np.array(v) for k, v in p.items()}
    with pytest.raises(Exception, match="attn"):  # a gradient of another shape
        opt.update(p, {**GRADS[1], "attn": np.zeros((6, 6))}, state)
    after = opt.state_dict(state)
    for k in held:
        np.testing.assert_array_equal(p[k], held[k])
    for s, per in before["slots"].items():
        for k, a in per.items():
            np.testing.assert_array_equal(after["slots"][s][k], a)


@pytest.mark.parametrize("make", [muon_pair, galore_pair])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_resume_bit_for_bit(make, backend: str, tmp_path) -> None:
    """A state dict through ``torch.save`` / ``torch.load(weights_only=True)`` (plain
    values: the specs as lists) and a checkpoint file, resumed by a new optimizer built
    with defaults: the same steps to the bit."""
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    conv = np.array if backend == "numpy" else torch.tensor
    gs = [{k: conv(v) for k, v in g.items()} for g in GRADS]
    opt = make()[0]
    p = {k: conv(v) for k, v in P0.items()}
    state = opt.init(p)
    for g in gs:
        p, state = opt.update(p, g, state)
    want = _host(p)
    opt = make()[0]
    p = {k: conv(v) for k, v in P0.items()}
    state = opt.init(p)
    for g in gs[:7]:
        p, state = opt.update(p, g, state)
    buf = io.BytesIO()
    torch.save(opt.state_dict(state, arrays="torch"), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    save_checkpoint(tmp_path / "c.safetensors", p, opt, state)
    for how in ("state dict", "checkpoint"):
        other = type(opt)(fallback=AdamW()) if isinstance(opt, Muon) else type(opt)()
        if how == "state dict":
            q, s = dict(p), other.load_state_dict(sd, p)
        else:
            got = load_checkpoint(tmp_path / "c.safetensors", p, other)
            q, s = got["params"], got["state"]
        assert other.hyperparameters()["weight_dimension_numbers"]["conv"] == (
            [[1], [0]] if isinstance(opt, Muon) else [[1, 2, 3], [0]])
        q = {k: conv(np.array(_host({k: v})[k])) for k, v in q.items()}
        for g in gs[7:]:
            q, s = other.update(q, g, s)
        for k, v in _host(q).items():
            np.testing.assert_array_equal(v, want[k], err_msg=f"{how} {k}")


@pytest.mark.parametrize("make", [muon_pair, galore_pair])
def test_a_state_laid_out_otherwise_is_refused_on_loading(make) -> None:
    """A state dict without the argument (of a version before it) whose slots are laid out
    without the specs (Muon: the 3-D and 4-D tensors the fallback's; GaLore: their Adam
    moments in the tensor's shape) does not load into an optimizer with them, and the
    optimizer is left as it was. (With it, loading restores the saved specs.)"""
    p = {k: v.copy() for k, v in P0.items()}
    plain = make()[0]
    plain = type(plain)(**{**plain.hyperparameters(), "weight_dimension_numbers": None})
    sd = plain.state_dict(plain.update(p, GRADS[0], plain.init(p))[1])
    del sd["hyperparameters"]["weight_dimension_numbers"]
    opt = make()[0]
    before = opt.hyperparameters()
    with pytest.raises(ValueError, match="attn"):
        opt.load_state_dict(sd, p)
    assert opt.hyperparameters() == before


def _transposed(params):  # every weight as optax's (in, out) of a (out, in) array: (1, 0) -> (0, 1)
    return {k: DimensionNumbers(0, 1) if getattr(v, "ndim", 0) == 2 else None
            for k, v in params.items()}


TRAIN_STEP = {
    "muon": lambda: Muon(0.02, ns_dtype="float32", weight_dimension_numbers=_transposed,
                         param_groups=[{"params": lambda n: "linear_2" in n, "lr_scale": 0.5}]),
    "galore": lambda: GaLore(0.02, rank=3, update_proj_gap=2,
                             weight_dimension_numbers=_transposed)}


@pytest.mark.parametrize("which, backend", [
    pytest.param(w, b, marks=[pytest.mark.slow] if (w, b) == ("muon", "jax") else [])
    for w in TRAIN_STEP for b in ("numpy", "torch", "jax")])
def test_make_train_step_equals_evaluate_and_update(which: str, backend: str) -> None:
    """``make_train_step`` (NumPy, torch; JAX: its one program, through the optax
    transformation) against the separate evaluate + update, with a parameter group: bit for
    bit, and on JAX to float32 rounding over two steps."""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
    from mithril.cli.networks import mlp_spec
    from mithril.utils.training import make_train_step

    be_cls = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[backend]
    spec = mlp_spec(8, 4, [16, 12])
    r = np.random.default_rng(3)
    data = [{"input": r.standard_normal((32, 8)).astype(np.float32),
             "target": r.integers(0, 4, 32)} for _ in range(2)]

    def run(fused: bool) -> dict:
        be = be_cls(dtype="float32", seed=0)
        compiled = ml.compile(spec.model, be, shapes=spec.shapes)
        params, opt = compiled.get_parameters(), TRAIN_STEP[which]()
        step = make_train_step(compiled, opt, loss="loss") if fused else None
        state = step.init(params) if fused else opt.init(params)
        for d in data:
            d = {"input": be.array(d["input"]), "target": be.array(d["target"], be.int_dtype)}
            if fused:
                params, state, _ = step(params, state, d)
            else:
                _, g = compiled.evaluate(params, d, output_gradients={"loss": 1.0})
                params, state = opt.update(params, g, state)
        return {k: np.array(be.to_numpy(v)) for k, v in params.items()}

    want, got = run(False), run(True)
    for k in want:
        if backend == "jax":
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("make", [muon_pair, galore_pair])
def test_torch_optimizer_resumes_bit_for_bit(make) -> None:
    """``torch_optimizer``'s own state dict, through ``torch.save`` /
    ``torch.load(weights_only=True)``, into a new wrapper: the same steps to the bit."""
    check_torch_optimizer_resume(lambda: make()[0], P0, GRADS, at=7)


def test_optax_transformation_without_a_fallback_takes_what_the_specs_name() -> None:
    """Muon(fallback=None) takes every tensor a spec makes a matrix (3-D, 4-D) through
    ``optax_transformation`` as its own ``init`` does (the same steps), and refuses a vector
    by name."""
    dims = {k: v for k, v in MUON_DIMS.items() if k != "b"}
    make = functools.partial(Muon, 0.05, weight_decay=0.1, nesterov=False, epsilon=1e-30,
                             ns_dtype="float64", fallback=None, weight_dimension_numbers=dims)
    params = {k: v for k, v in P0.items() if k != "b"}
    tx, opt = optax_transformation(make()), make()
    p = {k: jnp.asarray(v) for k, v in params.items()}
    s, mine = tx.init(p), {k: v.copy() for k, v in params.items()}
    state = opt.init(mine)
    for g in GRADS[:4]:
        u, s = tx.update({k: jnp.asarray(g[k]) for k in p}, s, p)
        p = optax.apply_updates(p, u)
        mine, state = opt.update(mine, {k: g[k] for k in mine}, state)
    assert np.abs(mine["attn"] - params["attn"]).max() > 1e-2  # it moved
    for k in mine:
        np.testing.assert_allclose(np.array(p[k]), mine[k], rtol=TOL, atol=TOL, err_msg=k)
    with pytest.raises(ShapeError, match=r"params\['b'\].*fallback"):
        optax_transformation(make(weight_dimension_numbers={**dims, "b": None})).init(
            {k: jnp.asarray(v) for k, v in P0.items()})
