"""Failure atomicity and error messages of the recent features: the optimizers SM3, AcProp,
DAdaptAdamW, NoisySGD, MADGRAD, RAdam/NAdam (optax convention), Lion (modes), DoG/DoWG
(layer-wise), Muon (exclusions), natively, through ``optax_transformation`` and the torch.optim
wrapper; and the blocks ConvTranspose1D/2D, PReLU, Glu, KLDivergence, BinaryCrossEntropy, MDS,
the SVM regularizer, the GP core and the integer primitives.

Every case snapshots everything the call could touch (params, optimizer state and its state
dict, hyperparameters, torch param groups, a compiled model's BatchNorm state), makes the bad
call, checks the error's type and that its message names the key / slot / argument at fault,
and checks every snapshot bit for bit. Where torch or optax refuse the same mistake, the test
runs them side by side: ours names at least as much; where they accept it silently (optax's
DoG broadcasts a wrong-shape update), ours refuses by name.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import InputValueError, KeyMismatchError, ShapeError
from mithril.interop import optax_transformation, torch_optimizer
from mithril.models import MDSCore, QuadraticFormRegularizer, gp_regression
from mithril.models.integer_primitives import FloorDivide
from mithril.utils.optimizers import (
    MADGRAD,
    SM3,
    AcProp,
    Adam,
    DAdaptAdamW,
    DoG,
    DoWG,
    Lion,
    Muon,
    NAdam,
    NoisySGD,
    RAdam,
)

OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "SM3": lambda **k: SM3(**k),
    "AcProp": lambda **k: AcProp(**k),
    "DAdaptAdamW": lambda **k: DAdaptAdamW(**k),
    "NoisySGD": lambda **k: NoisySGD(**k),
    "MADGRAD": lambda **k: MADGRAD(**k),
    "RAdam-optax": lambda **k: RAdam(convention="optax", **k),
    "NAdam-optax": lambda **k: NAdam(convention="optax", eps_root=1e-8, **k),
    "Lion-smooth": lambda **k: Lion(mode="smooth", **k),
    "DoG-layer_wise": lambda **k: DoG(layer_wise=True, **k),
    "DoWG-layer_wise": lambda **k: DoWG(layer_wise=True, **k),
    "Muon-exclusions": lambda **k: Muon(exclude_layers=["b"], exclude_embeddings=True, **k),
}


# -- snapshots --------------------------------------------------------------------------------
def host(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def frozen(tree: Any) -> Any:
    """``tree`` (dicts, lists, arrays, scalars) with every array as (dtype, shape, bytes)."""
    if isinstance(tree, dict):
        return {k: frozen(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(frozen(v) for v in tree)
    if isinstance(tree, (np.ndarray, np.generic, torch.Tensor)) or hasattr(tree, "dtype"):
        a = host(tree)
        return str(a.dtype), a.shape, a.tobytes()
    if isinstance(tree, float) and tree != tree:
        return "nan"
    return copy.deepcopy(tree)


def snapshot(opt: Any, params: dict[str, Any], state: Any) -> Any:
    """Everything an update or a load could change: params, the state dict (slots, counters,
    values), the hyperparameters and the state's report fields."""
    report = (state.step, state.num_skipped, state.num_nonfinite, state.consecutive_skips,
              state.last_step_skipped)
    return frozen({"params": params, "state": opt.state_dict(state),
                   "hp": opt.hyperparameters(), "report": report})


def refused(call: Callable[[], Any], error: Any, *names: str) -> str:
    """Run ``call``, expect ``error``; every one of ``names`` must be in its message."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as info:
            call()
    text = str(info.value)
    for name in names:
        assert name in text, f"{name!r} not named in: {text}"
    return text


# -- native optimizers --------------------------------------------------------------------------
def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((4, 3)).astype(np.float32),
            "b": rng.standard_normal(3).astype(np.float32)}


def _grads(scale: float = 0.1) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), scale, np.float32), "b": np.full(3, -scale, np.float32)}


@pytest.fixture(scope="module")
def stepped() -> dict[str, tuple[Any, dict[str, np.ndarray], Any]]:
    """Each optimizer (nonfinite="raise") after two steps: (optimizer, params, state). The
    refused calls of the tests must leave it so: sharing it across them tests that too."""
    out = {}
    for name, make in OPTIMIZERS.items():
        opt = make(nonfinite="raise")
        params = _params()
        state = opt.init(params)
        for s in (1.0, 0.5):
            params, state = opt.update(params, _grads(0.1 * s), state)
        out[name] = opt, {k: np.array(v) for k, v in params.items()}, state
    return out


def _other_state(name: str) -> Any:
    opt = Adam() if name != "AcProp" else SM3()  # (a state of another optimizer)
    return opt.init(_params())


UPDATE_CASES: dict[str, tuple[Callable[[str, dict], tuple], Any, tuple[str, ...]]] = {
    # label: (params, gradients, state) from (optimizer name, params), error, names
    "extra key": (lambda n, p: (p, {**_grads(), "zz": np.ones(3, np.float32)}, None),
                  KeyMismatchError, ("zz",)),
    "gradient shape": (lambda n, p: (p, {**_grads(), "w": np.ones((3, 4), np.float32)}, None),
                       ShapeError, ("gradients['w']", "(3, 4)", "(4, 3)")),
    "gradient dtype": (lambda n, p: (p, {**_grads(), "b": np.ones(3, np.float64)}, None),
                       TypeError, ("gradients['b']", "float64")),
    "integer gradient": (lambda n, p: (p, {**_grads(), "b": np.ones(3, np.int32)}, None),
                         TypeError, ("gradients['b']", "int32")),
    "list gradient": (lambda n, p: (p, {**_grads(), "w": [[0.1] * 3] * 4}, None),
                      TypeError, ("gradients['w']", "list")),
    "param shape": (lambda n, p: ({**p, "w": np.ones((3, 4), np.float32)}, _grads(), None),
                    ShapeError, ("params['w']", "(3, 4)")),
    "nan gradient": (lambda n, p: (p, {**_grads(), "b": np.array([0.1, np.nan, 0.1],
                                                                 np.float32)}, None),
                     FloatingPointError, ("['b']", "unchanged")),
    "inf gradient": (lambda n, p: (p, {**_grads(), "w": np.full((4, 3), np.inf, np.float32)},
                                   None), FloatingPointError, ("['w']",)),
    "state of another optimizer": (lambda n, p: (p, _grads(), _other_state(n)), ValueError,
                                   ("state was made by",)),
    "state of other params": (lambda n, p: (p, _grads(), OPTIMIZERS[n]().init(
        {"x": np.ones(5, np.float32)})), KeyMismatchError, ("'x'",)),
}


@pytest.mark.parametrize("case", list(UPDATE_CASES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_refused_update_changes_nothing(stepped, name: str, case: str) -> None:
    opt, params, state = stepped[name]
    make, error, names = UPDATE_CASES[case]
    p, g, other = make(name, params)
    before = snapshot(opt, params, state)
    other_before = None if other is None else frozen(other.slots)
    refused(lambda: opt.update(p, g, state if other is None else other), error, *names)
    assert snapshot(opt, params, state) == before
    if other is not None:
        assert frozen(other.slots) == other_before


@pytest.mark.parametrize("kind, name", [("torch", n) for n in OPTIMIZERS] + [
    ("jax", "DAdaptAdamW"), ("jax", "DoG-layer_wise")])
def test_refused_update_on_torch_and_jax_changes_nothing(kind: str, name: str) -> None:
    """The same refusals on the torch and JAX engines (JAX-on-CPU aliases its host buffers
    and donates on accelerators: a refused step must not have written them)."""
    arr = jnp.asarray if kind == "jax" else (lambda a: torch.from_numpy(np.array(a)))
    opt = OPTIMIZERS[name](nonfinite="raise")
    params = {k: arr(v) for k, v in _params().items()}
    g = {k: arr(v) for k, v in _grads().items()}
    state = opt.init(params)
    params, state = opt.update(params, g, state)
    before = snapshot(opt, params, state)
    refused(lambda: opt.update(params, {**g, "b": arr(np.array([0.1, np.nan, 0.1],
                                                              np.float32))}, state),
            FloatingPointError, "['b']")
    refused(lambda: opt.update(params, {**g, "w": arr(np.ones((3, 4), np.float32))}, state),
            ShapeError, "gradients['w']")
    refused(lambda: opt.update(params, [g["w"], g["b"]], state), TypeError, "dict")
    assert snapshot(opt, params, state) == before
    params, state = opt.update(params, g, state)  # (and the next good step is taken)
    assert state.step == 2


def _set(d: dict, path: tuple, value: Any) -> dict:
    """A deep copy of state dict ``d`` with ``path`` set to ``value`` (``...``: deleted)."""
    d = copy.deepcopy(d)
    *head, last = path
    node = d
    for k in head:
        node = node[k]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return d


def _corruptions(name: str, sd: dict) -> list[tuple[str, dict, Any, tuple[str, ...]]]:
    """(label, corrupted state dict, error, names) for every slot and counter of ``sd``."""
    out = []
    for slot, per in sd["slots"].items():
        for param, a in per.items():
            out += [
                (f"{slot}/{param} shape", _set(sd, ("slots", slot, param),
                                               np.zeros(a.shape + (2,), np.float32)),
                 ShapeError, (f"slot '{slot}' of '{param}'",)),
                (f"{slot}/{param} text", _set(sd, ("slots", slot, param), np.array(["x"])),
                 TypeError, (f"slot '{slot}' of '{param}'",)),
                (f"{slot}/{param} beyond float32", _set(sd, ("slots", slot, param),
                                                        np.full(a.shape, 1e300)),
                 ValueError, (f"slot '{slot}' of '{param}'", "float32")) if a.size else None,
                (f"{slot}/{param} missing", _set(sd, ("slots", slot, param), ...),
                 KeyError, (f"slot '{slot}'", param)),
            ]
        out.append((f"{slot} missing", _set(sd, ("slots", slot), ...), KeyError, (slot,)))
    for counter in ("step", "num_skipped", "num_nonfinite", "consecutive_skips"):
        for bad in (float("nan"), -1, 1.5, True, "3"):
            out.append((f"{counter}={bad!r}", _set(sd, (counter,), bad), ValueError,
                        (f"'{counter}'",)))
    for value in sd.get("values", {}):
        out.append((f"value {value} text", _set(sd, ("values", value), "x"), TypeError,
                    (f"'{value}'",)))
    out += [("unknown key", _set(sd, ("newer",), 1), KeyError, ("'newer'",)),
            ("other optimizer", _set(sd, ("optimizer",), "Adam"), ValueError, ("'Adam'",)),
            ("unknown hyperparameter", _set(sd, ("hyperparameters", "betaa"), 0.9), KeyError,
             ("betaa",)),
            ("NaN learning rate", _set(sd, ("hyperparameters", "learning_rate"), float("nan")),
             ValueError, ("learning_rate",))]
    # values no step could give (load_state_dict's loaded_domains)
    if name == "DAdaptAdamW":
        out += [("d <= 0", _set(sd, ("values", "d"), -1.0), ValueError, ("'d'", "> 0")),
                ("d = 0", _set(sd, ("values", "d"), 0.0), ValueError, ("'d'",))]
    if name.startswith(("DoG", "DoWG")):
        est = "sum_sq" if name.startswith("DoG") else "weighted_sq"
        out += [("started 0.5", _set(sd, ("slots", "started", "w"), np.float32(0.5)),
                 ValueError, ("slot 'started' of 'w'", "0 or 1")),
                ("started NaN", _set(sd, ("slots", "started", "b"), np.float32(np.nan)),
                 ValueError, ("'started'",)),
                (f"{est} < 0", _set(sd, ("slots", est, "b"), np.float32(-1.0)), ValueError,
                 (f"slot '{est}' of 'b'", ">= 0"))]
    return [c for c in out if c is not None]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_corrupted_state_dict_is_refused_and_changes_nothing(stepped, name: str) -> None:
    opt, params, state = stepped[name]
    sd = opt.state_dict(state)
    before = snapshot(opt, params, state)
    cases = _corruptions(name, sd)
    assert len(cases) > 20
    for label, bad, error, names in cases:
        given = frozen(bad)
        try:
            refused(partial(opt.load_state_dict, bad, params), error, *names)
        except AssertionError as e:
            raise AssertionError(f"{name}, {label}: {e}") from None
        assert frozen(bad) == given, f"{name}, {label}: the state dict was changed"
        assert snapshot(opt, params, state) == before, f"{name}, {label}: state changed"
    # the intact dict still loads, and the loaded state steps as the original
    loaded = opt.load_state_dict(copy.deepcopy(sd), params)
    assert frozen(opt.state_dict(loaded)) == frozen(sd)


@pytest.mark.parametrize("make, value", [(DoG, "max_dist"), (DoG, "sum_sq"),
                                         (DoWG, "estim_sq_dist"), (DoWG, "weighted_sq")])
def test_optimizer_wide_estimates_below_zero_are_refused(make, value: str) -> None:
    """DoG's / DoWG's one estimate (not layer-wise: a state value) can't be negative."""
    opt = make()
    params = _params()
    state = opt.init(params)
    params, state = opt.update(params, _grads(), state)
    params = {k: np.array(v) for k, v in params.items()}
    before = snapshot(opt, params, state)
    bad = _set(opt.state_dict(state), ("values", value), -1e-3)
    refused(lambda: opt.load_state_dict(bad, params), ValueError, f"value '{value}'", ">= 0")
    assert snapshot(opt, params, state) == before


def test_note_missed_refuses_a_bare_name() -> None:
    """A string was iterated: note_missed("w") counted a parameter named "w" by luck, and
    "weight" failed on 'e'. It is refused, naming the fix; unknown names change nothing."""
    opt = DAdaptAdamW()
    params = _params()
    state = opt.init(params)
    params, state = opt.update(params, _grads(), state)
    state.note_missed(["b"])
    refused(lambda: state.note_missed("w"), TypeError, "'w'", "['w']")
    refused(lambda: state.note_missed(["w", "zz"]), KeyMismatchError, "'zz'")
    assert state.missed_counts() == {"b": 1}


def test_a_diverged_state_still_loads() -> None:
    """NaN in slots and in DAdaptAdamW's d (a run that went NaN under "propagate") loads, as
    torch's and optax's states do: only values no step can give are refused."""
    opt = DAdaptAdamW()
    params = _params()
    state = opt.init(params)
    params, state = opt.update(params, _grads(), state)
    sd = _set(opt.state_dict(state), ("values", "d"), float("nan"))
    sd["slots"]["m"]["w"] = np.full((4, 3), np.nan, np.float32)
    loaded = opt.load_state_dict(sd, params)
    assert np.isnan(loaded.values["d"]) and loaded.nonfinite_values


CONSTRUCTOR_CASES = [
    (lambda: SM3(beta2=1.5), ValueError, "beta2"),
    (lambda: SM3(momentum=float("nan")), ValueError, "momentum"),
    (lambda: SM3(epsilon="1e-8"), TypeError, "epsilon"),
    (lambda: AcProp(beta1=1.0), ValueError, "beta1"),
    (lambda: AcProp(epsilon=0.0), ValueError, "epsilon"),
    (lambda: AcProp(eps_root=True), TypeError, "eps_root"),
    (lambda: DAdaptAdamW(estim_lr0=0.0), ValueError, "estim_lr0"),
    (lambda: DAdaptAdamW(beta2=-0.1), ValueError, "beta2"),
    (lambda: NoisySGD(seed=-1), ValueError, "seed"),
    (lambda: NoisySGD(seed=1.5), TypeError, "seed"),
    (lambda: NoisySGD(seed=True), TypeError, "seed"),
    (lambda: NoisySGD(seed=2**32), ValueError, "seed"),
    (lambda: NoisySGD(eta=float("inf")), ValueError, "eta"),
    (lambda: NoisySGD(gamma=-0.55), ValueError, "gamma"),
    (lambda: MADGRAD(momentum=1.0), ValueError, "momentum"),
    (lambda: RAdam(convention="keras"), ValueError, "convention"),
    (lambda: RAdam(eps_root=1e-8), ValueError, "eps_root"),
    (lambda: RAdam(convention="optax", threshold=3.0), ValueError, "threshold"),
    (lambda: NAdam(eps_root=1e-8), ValueError, "eps_root"),
    (lambda: NAdam(convention="optax", eps_root=-1.0), ValueError, "eps_root"),
    (lambda: NAdam(convention="optax", momentum_decay=4e-3), ValueError, "momentum_decay"),
    (lambda: Lion(mode="soft"), ValueError, "mode"),
    (lambda: Lion(mode="smooth", smooth_beta=0.0), ValueError, "smooth_beta"),
    (lambda: DoG(init_step=("x", 1.0)), ValueError, "init_step"),
    (lambda: DoG(init_step=("distance", -1.0)), ValueError, "init_step"),
    (lambda: DoG(layer_wise=2), TypeError, "layer_wise"),
    (lambda: DoWG(layer_wise="yes"), TypeError, "layer_wise"),
    (lambda: DoWG(init_estim_sq_dist=float("nan")), ValueError, "init_estim_sq_dist"),
    (lambda: Muon(exclude_layers="w"), TypeError, "exclude_layers"),
    (lambda: Muon(exclude_layers=["("]), ValueError, "exclude_layers[0]"),
    (lambda: Muon(exclude_layers=[3]), TypeError, "exclude_layers[0]"),
    (lambda: Muon(exclude_embeddings=2), TypeError, "exclude_embeddings"),
    (lambda: Muon(fallback=None, exclude_layers=["b"]), ValueError, "fallback"),
    (lambda: Muon(ns_steps=100), ValueError, "ns_steps"),
]


@pytest.mark.parametrize("make, error, name", CONSTRUCTOR_CASES)
def test_bad_constructor_arguments_are_named(make, error, name: str) -> None:
    refused(make, error, name)


@pytest.mark.parametrize("ours, theirs, name", [
    (lambda: NAdam(beta1=1.0), lambda p: torch.optim.NAdam(p, betas=(1.0, 0.9)), "beta1"),
    (lambda: RAdam(learning_rate=float("nan")), lambda p: torch.optim.RAdam(p, lr=float("nan")),
     "learning_rate"),
    (lambda: RAdam(epsilon=-1.0), lambda p: torch.optim.RAdam(p, eps=-1.0), "epsilon"),
])
def test_torch_refuses_the_same_arguments(ours, theirs, name: str) -> None:
    """torch names the value only ("Invalid beta parameter at index 0: 1.0"); ours names the
    argument too."""
    with pytest.raises(ValueError):
        theirs([torch.zeros(1)])
    refused(ours, ValueError, name)


# -- optax_transformation -------------------------------------------------------------------
OPTAX_OPTIMIZERS = ["SM3", "DAdaptAdamW", "DoG-layer_wise", "Muon-exclusions"]


@pytest.fixture(scope="module")
def optax_stepped() -> dict[str, tuple[Any, dict, Any]]:
    out = {}
    for name in OPTAX_OPTIMIZERS:
        tx = optax_transformation(OPTIMIZERS[name]())
        p = {k: jnp.asarray(v) for k, v in _params().items()}
        out[name] = tx, p, tx.init(p)  # (no step: a refused update compiles nothing)
    return out


@pytest.mark.parametrize("name", OPTAX_OPTIMIZERS)
def test_optax_transformation_names_the_mismatch(optax_stepped, name: str) -> None:
    tx, p, state = optax_stepped[name]
    g = {k: jnp.asarray(v) for k, v in _grads().items()}
    before = frozen({"p": dict(p), "state": list(state)})
    kind = name.split("-")[0]
    refused(lambda: tx.update({"w": g["w"]}, state, p), ValueError, kind, "structure")
    refused(lambda: tx.update({**g, "z": jnp.ones(3)}, state, p), ValueError, "'z'")
    refused(lambda: tx.update({**g, "w": jnp.ones((3, 4))}, state, p), ValueError, "'w'",
            "(3, 4)", "(4, 3)")
    refused(lambda: tx.update(g, state), ValueError, "needs params")
    refused(lambda: tx.update(g, optax.adam(1e-3).init(p), p), TypeError, "OptaxState")
    other = tx.init({"w": jnp.ones((5, 3)), "b": jnp.ones(3)})
    refused(lambda: tx.update(g, other, p), ValueError, "'w'", "other params")
    assert frozen({"p": dict(p), "state": list(state)}) == before


def test_optax_dog_broadcasts_a_wrong_shape_update_ours_refuses() -> None:
    """optax.contrib.dog takes a (4,) update for a (3,) parameter silently (broadcast); the
    same through ours names the key and both shapes."""
    p = {"w": jnp.ones(3)}
    theirs = optax.contrib.dog()
    updates, _ = theirs.update({"w": jnp.ones(4)}, theirs.init(p), p)
    assert updates["w"].shape == (4,)  # (no error: a silently different shape)
    ours = optax_transformation(DoG())
    refused(lambda: ours.update({"w": jnp.ones(4)}, ours.init(p), p), ValueError, "'w'", "(4,)")


# -- the torch.optim wrapper ----------------------------------------------------------------
TORCH_OPTIMIZERS = ["AcProp", "DAdaptAdamW", "Lion-smooth", "DoWG-layer_wise", "Muon-exclusions"]


def _torch_setup(name: str) -> tuple[torch.nn.Module, Any, Callable[[], None]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    make = OPTIMIZERS[name]
    if name == "Muon-exclusions":
        def make(**k: Any) -> Any:
            return Muon(exclude_layers=["0.bias"], exclude_embeddings=True, **k)
    opt = torch_optimizer(make(nonfinite="raise"), model.named_parameters())
    x = torch.randn(5, 3)

    def backward() -> None:
        opt.zero_grad()
        model(x).sum().backward()

    backward()
    opt.step()
    backward()
    return model, opt, backward


def _torch_snapshot(model: torch.nn.Module, opt: Any) -> Any:
    sd = opt.state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return frozen({"model": dict(model.state_dict()), "state": sd["state"], "groups": groups,
                   "grads": [p.grad for p in model.parameters()]})


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_torch_wrapper_refuses_and_changes_nothing(name: str) -> None:
    model, opt, _ = _torch_setup(name)
    group = opt.param_groups[0]
    key = next(k for k in ("betas", "momentum", "eps") if k in group)
    for k, bad, error in (("lr", float("nan"), ValueError), ("lr", "0.1", TypeError),
                          ("weight_decay", -1.0, ValueError),
                          (key, None, (TypeError, ValueError))):
        before = _torch_snapshot(model, opt)
        old = group[k]
        group[k] = bad
        refused(opt.step, error, f"param_groups[0]['{k}']")
        group[k] = old
        assert _torch_snapshot(model, opt) == before, (name, k)
    weight = next(model.parameters())
    before = _torch_snapshot(model, opt)
    saved = weight.grad.clone()
    weight.grad[0, 0] = float("nan")
    refused(opt.step, FloatingPointError, "'0.weight'", "unchanged")
    weight.grad.copy_(saved)
    assert _torch_snapshot(model, opt) == before
    sd = opt.state_dict()
    slot = next(k for k in sd["state"][0] if k != "step")
    for bad, error, names in ((torch.zeros(7, 7), ShapeError, (f"'{slot}' of '0.weight'",)),
                              ("x", TypeError, (f"'{slot}' of '0.weight'",)),
                              (..., KeyError, (f"'{slot}'", "0.weight"))):
        broken = copy.deepcopy(sd)
        if bad is ...:
            del broken["state"][0][slot]
        else:
            broken["state"][0][slot] = bad
        refused(partial(opt.load_state_dict, broken), error, "nothing changed", *names)
        assert _torch_snapshot(model, opt) == before
    # values no step could give, in torch's layout too
    broken = copy.deepcopy(sd)
    if name == "DAdaptAdamW":
        broken["mithril"]["values"]["d"] = -1.0
        names = ("value 'd'", "> 0")
    elif name == "DoWG-layer_wise":
        broken["state"][0]["started"] = torch.tensor(0.5)
        names = ("slot 'started' of '0.weight'", "0 or 1")
    else:
        return
    refused(partial(opt.load_state_dict, broken), ValueError, "nothing changed", *names)
    assert _torch_snapshot(model, opt) == before


def test_muon_exclusions_loaded_from_a_state_dict_are_the_ones_used() -> None:
    """load_state_dict may set other exclusions: the routing follows them (it kept the
    constructor's regexes while hyperparameters() reported the new list), and a state laid
    out by the old ones is refused by name, nothing changed."""
    p = {"w": np.ones((4, 3), np.float32), "v": np.ones((3, 3), np.float32)}
    g = {k: np.full_like(v, 0.1) for k, v in p.items()}
    opt = Muon(exclude_layers=["w"])
    state = opt.init(p)
    params, state = opt.update(dict(p), g, state)
    params = {k: np.array(v) for k, v in params.items()}
    hp = {**opt.state_dict()["hyperparameters"], "exclude_layers": []}
    opt.load_state_dict({"optimizer": "Muon", "hyperparameters": hp})
    assert opt.exclude_layers == [] and not opt.excluded("w")
    assert opt.init(p).slot("momentum_buffer")["w"].shape == (4, 3)
    before = snapshot(opt, params, state)
    refused(lambda: opt.update(params, g, state), ValueError, "other exclusions", "'w'")
    assert snapshot(opt, params, state) == before


def test_torch_wrapper_refuses_a_muon_exclusion_change_that_moves_the_state() -> None:
    """A group's exclude_layers that would route a matrix elsewhere (other slot shapes,
    same slot names) is refused at the step, the optimizer and its state as they were; one
    that routes the same way is taken."""
    model, opt, _ = _torch_setup("Muon-exclusions")  # (exclude_layers=["0.bias"]: a vector)
    group = opt.param_groups[0]
    before = _torch_snapshot(model, opt)
    group["exclude_layers"] = ["1.weight"]
    refused(opt.step, ValueError, "param_groups[0]['exclude_layers']", "lay out",
            "momentum_buffer")
    assert opt.mithril_optimizer.exclude_layers == ["0.bias"]
    group["exclude_layers"] = ["0.bias"]
    assert _torch_snapshot(model, opt) == before
    group["exclude_layers"] = ["0\\.bias", "nothing"]  # (the same routing)
    opt.step()
    assert opt.mithril_optimizer.exclude_layers == ["0\\.bias", "nothing"]


# -- blocks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("block, kwargs, names", [
    (ml.ConvTranspose1D, dict(kernel_size=3, out_channels=4, stride=0), ("stride",)),
    (ml.ConvTranspose1D, dict(kernel_size=3, out_channels=4, padding=-1), ("padding",)),
    (ml.ConvTranspose1D, dict(kernel_size=3, out_channels=4, stride=2, output_padding=2),
     ("output_padding", "stride")),
    (ml.ConvTranspose2D, dict(kernel_size=3, out_channels=4, stride=(2, 1),
                              output_padding=(0, 1)), ("output_padding",)),
    (ml.ConvTranspose1D, dict(kernel_size=3, out_channels=3, groups=2), ("out_channels",
                                                                         "groups")),
    (ml.ConvTranspose2D, dict(kernel_size=(3, 3, 3), out_channels=4), ("kernel_size",)),
    (ml.ConvTranspose1D, dict(kernel_size=3, out_channels=4, stride=2.0), ("stride",)),
    (ml.ConvTranspose1D, dict(kernel_size=3, out_channels=4, use_bias=1), ("use_bias",)),
    (ml.ConvTranspose1D, dict(kernel_size=3, out_channels=4, bias=False), ("use_bias",)),
    (ml.ConvTranspose1D, dict(kernel_size=3, out_channels=True), ("out_channels",)),
    (ml.PReLU, dict(num_parameters=0), ("num_parameters",)),
    (ml.PReLU, dict(init=float("nan")), ("init",)),
    (ml.Glu, dict(axis=1.0), ("axis",)),
    (ml.KLDivergence, dict(reduction="batchmeans"), ("reduction", "batchmean")),
    (ml.KLDivergence, dict(log_target=1), ("log_target",)),
    (ml.BinaryCrossEntropy, dict(pos_weight=[[1.0, 2.0]]), ("pos_weight",)),
    (ml.BinaryCrossEntropy, dict(pos_weight=torch.tensor([1.0, -1.0])), ("pos_weight",)),
    (ml.BinaryCrossEntropy, dict(pos_weight=float("nan")), ("pos_weight",)),
    (ml.MDS, dict(prediction_dim=0), ("prediction_dim",)),
    (ml.MDS, dict(prediction_dim=2, input_type="point"), ("input_type",)),
])
def test_bad_block_arguments_are_named(block, kwargs: dict, names: tuple[str, ...]) -> None:
    refused(lambda: block(**kwargs), (ValueError, TypeError), block.__name__, *names)


def test_bce_pos_weight_as_torch_gives_it() -> None:
    """torch's pos_weight is a tensor: ours takes one (and a 0-d array as the number)."""
    x, t = torch.tensor([[0.3, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    pw = torch.tensor([1.0, 2.0, 3.0])
    want = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
    for given in (pw, np.array(2.0)):
        m = ml.Model()
        m |= ml.BinaryCrossEntropy(pos_weight=given)(input="input", target="target",
                                                     output="output")
        c = ml.compile(m, NumpyBackend(dtype="float64"))
        got = c.evaluate({}, {"input": x.double().numpy(), "target": t.double().numpy()})
        ref = want if given is pw else F.binary_cross_entropy_with_logits(
            x, t, pos_weight=torch.tensor(2.0))
        np.testing.assert_allclose(got["output"], ref.double().numpy(), rtol=1e-6)


def _compiled(block: Any, backend: Any, shapes: dict | None = None, **keys: str) -> Any:
    m = ml.Model()
    m |= block.connect(**keys) if keys else block
    return ml.compile(m, backend, shapes=shapes or {})


@pytest.mark.parametrize("backend", [NumpyBackend, TorchBackend, JaxBackend])
def test_block_shape_errors_name_the_key_and_change_nothing(backend) -> None:
    """A model with BatchNorm state around each block: a refused evaluate leaves the
    params, the state dict passed in and its arrays as they were, and a good call after it
    gives what a fresh model gives."""
    b = backend()
    cases = [  # (block, its output's channels, a good input, bad inputs)
        (ml.ConvTranspose2D(3, 6, groups=2, stride=2), 6, (2, 4, 5, 5),
         [((2, 4, 5), ShapeError, ("'x'", "[2, 4, 5]")),
          ((2, 3, 5, 5), ShapeError, ("'x'", "[2, 3, 5, 5]"))]),
        (ml.PReLU(num_parameters=4), 4, (2, 4, 5),
         [((2, 3, 5), ShapeError, ("PReLU", "num_parameters=4", "3 channels")),
          ((4,), ShapeError, ("PReLU", "rank"))]),
        (ml.Glu(axis=1), 2, (2, 4, 5), [((2, 3, 5), ShapeError, ("Glu", "axis 1", "3"))]),
    ]
    for block, out_channels, good, bad_cases in cases:
        m = ml.Model()
        norm = ml.BatchNorm1D if len(good) == 3 else ml.BatchNorm2D
        m |= block(input="x", output="h")
        m |= norm(out_channels)(input="h", output="output")
        # (the channels fixed where the weight needs them, the rest free: each call's shapes
        # are checked by the blocks)
        fixed = isinstance(block, ml.ConvTranspose2D)
        c = ml.compile(m, b, shapes={"x": [None, good[1]] + [None] * (len(good) - 2)}
                       if fixed else {})
        params = c.randomize_params()
        state = c.initial_state_dict
        x = b.array(np.linspace(-1, 1, int(np.prod(good))).reshape(good).astype(np.float32))
        ref = c.evaluate(params, {"x": x}, state=state)
        before, step = frozen({"params": params, "state": state}), c.step
        for shape, error, names in bad_cases:
            xb = b.array(np.ones(shape, np.float32))
            refused(partial(c.evaluate, params, {"x": xb}, state=state), error, *names)
            assert frozen({"params": params, "state": state}) == before, (block, shape)
            assert c.step == step  # (a training call's counter did not move)
        assert frozen(c.evaluate(params, {"x": x}, state=state)) == frozen(ref)


def test_torch_refuses_the_same_shapes_ours_names_the_block() -> None:
    """torch's messages for the same mistakes; ours name the block and the argument."""
    with pytest.raises(RuntimeError, match="Mismatch of parameter numbers"):
        F.prelu(torch.ones(2, 3, 5), torch.ones(4))
    with pytest.raises(RuntimeError, match="even"):
        F.glu(torch.ones(2, 3, 5), dim=1)
    with pytest.raises(RuntimeError, match="output padding"):
        F.conv_transpose1d(torch.ones(1, 1, 3), torch.ones(1, 2, 3), stride=2,
                           output_padding=2)
    with pytest.raises(ValueError, match="batchmeans"):
        F.kl_div(torch.ones(2), torch.ones(2), reduction="batchmeans")
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy_with_logits(torch.ones(4, 2), torch.ones(4, 2),
                                           pos_weight=torch.ones(3))
    bce = _compiled(ml.BinaryCrossEntropy(pos_weight=[1.0, 2.0, 3.0]), NumpyBackend(),
                    input="input", target="target", output="output")
    refused(lambda: bce.evaluate({}, {"input": np.ones((4, 2)), "target": np.ones((4, 2))}),
            ShapeError, "pos_weight has 3 classes", "[4, 2]")
    # (torch broadcasts an (N, 1) input against 3 weights into an error of its output only)
    refused(lambda: bce.evaluate({}, {"input": np.ones((4, 1)), "target": np.ones((4, 1))}),
            ShapeError, "pos_weight")


@pytest.mark.parametrize("backend", [NumpyBackend, TorchBackend, JaxBackend])
def test_published_blocks_refuse_by_name(backend) -> None:
    b = backend()

    def arr(a: Any) -> Any:
        return b.array(np.asarray(a, np.float32))

    mds = _compiled(MDSCore(), b)
    norm = arr([2.0])
    # non-square distances gave a stress of 0; a (1, 1) prediction broadcast against (3, 3)
    refused(lambda: mds.evaluate({}, {"distances": arr(np.ones((3, 4))), "norm": norm,
                                      "pred_distances": arr(np.ones((3, 4)))}),
            ShapeError, "MDSCore", "'distances'", "square", "[3, 4]")
    refused(lambda: mds.evaluate({}, {"distances": arr(np.ones((3, 3))), "norm": norm,
                                      "pred_distances": arr(np.ones((1, 1)))}),
            ShapeError, "'pred_distances'", "one N")
    ok = mds.evaluate({}, {"distances": arr(np.ones((3, 3))), "norm": norm,
                           "pred_distances": arr(np.ones((3, 3)))})
    assert np.asarray(host(ok["output"])).shape == (1,)
    qfr = _compiled(QuadraticFormRegularizer(), b)
    # a w of two rows gave a (2, 2) "regularizer"
    refused(lambda: qfr.evaluate({}, {"input": arr(np.ones((2, 3))),
                                      "kernel": arr(np.eye(3))}), ShapeError, "'input'", "1")
    got = qfr.evaluate({}, {"input": arr([[1.0, 2.0, 3.0]]), "kernel": arr(np.eye(3))})
    np.testing.assert_allclose(host(got["output"]), [[7.0]])  # ½·(1 + 4 + 9)
    if backend is not JaxBackend:  # (JAX's solve gives NaN, as jnp.linalg.solve)
        gp = _compiled(gp_regression.GaussProcessRegressionCore(), b)
        data = {"label": arr(np.ones((3, 1))), "mu": arr(np.zeros((3, 1))), "s": arr([0.0]),
                "k": arr(np.ones((3, 3))), "k_star": arr(np.eye(3))}
        refused(lambda: gp.evaluate({}, data), InputValueError, "SymmetricSolve", "'matrix'",
                "singular")
    div = _compiled(FloorDivide(), b, numerator="n", denominator="d", output="output")
    refused(lambda: div.evaluate({}, {"n": b.array(np.array([7, 8])),
                                      "d": b.array(np.array([2, 0]))}),
            InputValueError, "'d'", "holds 0")


def test_torch_and_numpy_linalg_say_singular_without_a_name() -> None:
    """The peers' text for the GP's singular K: no key named (ours: 'matrix')."""
    with pytest.raises(np.linalg.LinAlgError, match="Singular matrix"):
        np.linalg.solve(np.ones((3, 3)), np.ones((3, 1)))
    with pytest.raises(RuntimeError, match="singular"):
        torch.linalg.solve(torch.ones(3, 3), torch.ones(3, 1))
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        torch.floor_divide(torch.tensor([7, 8]), torch.tensor([2, 0]))


# -- a randomized sweep ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_corruptions_change_nothing(seed: int) -> None:
    """Random corruptions of random slots, counters and values of every optimizer's state
    dict (two parameters of random shapes, torch and NumPy): each refused by name, nothing
    changed."""
    rng = np.random.default_rng(seed)
    for name, make in OPTIMIZERS.items():
        shapes = {"w": tuple(int(n) for n in rng.integers(2, 6, 2)),
                  "b": (int(rng.integers(1, 6)),)}
        kind = "torch" if rng.random() < 0.5 else "numpy"
        params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        if kind == "torch":
            params = {k: torch.from_numpy(v) for k, v in params.items()}
        opt = make()
        state = opt.init(params)
        for _ in range(int(rng.integers(1, 4))):
            grads = {k: (0.1 * rng.standard_normal(s)).astype(np.float32)
                     for k, s in shapes.items()}
            if kind == "torch":
                grads = {k: torch.from_numpy(v) for k, v in grads.items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                params, state = opt.update(params, grads, state)
        params = {k: host(v) if kind == "numpy" else v.detach().clone()
                  for k, v in params.items()}
        sd = opt.state_dict(state)
        before = snapshot(opt, params, state)
        cases = _corruptions(name, sd)
        for i in rng.choice(len(cases), size=min(12, len(cases)), replace=False):
            label, bad, error, names = cases[i]
            refused(partial(opt.load_state_dict, bad, params), error, *names)
            assert snapshot(opt, params, state) == before, (name, kind, label)
