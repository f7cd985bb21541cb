"""Random ``RNN`` / ``LSTM`` / ``GRU`` / ``RNNCell`` / ``LSTMCell`` / ``GRUCell`` configurations
side by side with ``torch.nn``, via hypothesis.

A configuration is a JSON dict; its text is the case's name and seeds its weights, inputs and
cotangents, so a name rebuilds its case anywhere (the JAX column runs names in a fresh x64
process). Every argument ours offers is drawn: ``nonlinearity`` tanh / relu, ``bias``,
``batch_first``, ``num_layers`` 1-3, ``bidirectional``, ``proj_size``, ``dropout`` (0, 0.4 or
1) in inference or training mode, initial states given or zero, ``lengths`` (none, all T, or
random and unsorted: torch's ``pack_padded_sequence(enforce_sorted=False)`` then
``pad_packed_sequence(total_length=T)``), sequences and batches of length 1, float32 and
float64, and inputs and weights large enough to saturate the gates.

* The torch reference is torch's own module with our parameters copied through
  ``params_from_torch`` (a rename). Training-mode dropout with 0 < p < 1 (two layers) is
  compared through our mask: torch's two single-layer modules with layer 1's input multiplied
  by the mask our ``Dropout`` at path ``dropout`` draws at that seed and step; p = 1 is torch's
  module itself (zeros between layers either way).
* Outputs, final states and the gradients of every parameter, the input and the initial states
  (torch autograd, float64) within :func:`tol` of torch's, relative to max(1, |torch|): 1e-10
  in float64, 2e-4 in float32, on NumPy and torch in process and JAX in a fresh process.
* A few configurations' NumPy gradients against central differences in float64.

The default variant draws a handful of examples; ``-m slow`` draws many.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from conftest import BACKENDS, central_differences, run_python, to_np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_edges import error
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import mithril as ml

pytestmark = pytest.mark.filterwarnings("ignore:.*dropout is applied between layers:UserWarning")
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU,
         "rnncell": torch.nn.RNNCell, "lstmcell": torch.nn.LSTMCell, "grucell": torch.nn.GRUCell}
OURS = {"rnn": ml.RNN, "lstm": ml.LSTM, "gru": ml.GRU,
        "rnncell": ml.RNNCell, "lstmcell": ml.LSTMCell, "grucell": ml.GRUCell}
SEED, STEP = 7, 2


# -- configurations ---------------------------------------------------------------------------
@st.composite
def rnn_configs(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(TORCH)))
    h = draw(st.integers(1, 4))
    cfg: dict[str, Any] = {"kind": kind, "I": draw(st.integers(1, 3)), "H": h,
                           "n": draw(st.integers(1, 3)), "bias": draw(st.booleans()),
                           "dtype": draw(st.sampled_from(["float64", "float64", "float32"])),
                           "scale": draw(st.sampled_from([0.5, 0.5, 1.0, 5.0]))}
    if kind.startswith("rnn"):
        cfg["nonlin"] = draw(st.sampled_from(["tanh", "relu"]))
    if kind.endswith("cell"):
        return cfg
    t = draw(st.integers(1, 4))
    cfg.update(T=t, bf=draw(st.booleans()), layers=draw(st.integers(1, 3)),
               bi=draw(st.booleans()), given=draw(st.booleans()),
               proj=draw(st.integers(0, h - 1)) if kind == "lstm" and h > 1 else 0,
               dropout=draw(st.sampled_from([0.0, 0.0, 0.4, 1.0])),
               training=draw(st.booleans()))
    lens = draw(st.sampled_from(["none", "equal", "random"]))
    cfg["lengths"] = (None if lens == "none" else [t] * cfg["n"] if lens == "equal" else
                      [draw(st.integers(1, t)) for _ in range(cfg["n"])])
    if cfg["dropout"] and cfg["layers"] == 1:
        cfg["layers"] = 2  # dropout acts between layers
    if cfg["training"] and 0 < cfg["dropout"] < 1:
        cfg["layers"] = 2  # compared through the mask of the one Dropout at path "dropout"
    return cfg


def name_of(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def tol(cfg: dict[str, Any]) -> float:
    return 1e-10 if cfg["dtype"] == "float64" else 2e-4


# -- one case: torch's module, our block, inputs and cotangents -------------------------------
def _opts(cfg: dict[str, Any]) -> dict[str, Any]:
    """The arguments both torch's module and ours take."""
    kw: dict[str, Any] = {"bias": cfg["bias"]}
    if "nonlin" in cfg:
        kw["nonlinearity"] = cfg["nonlin"]
    if not cfg["kind"].endswith("cell"):
        kw.update(batch_first=cfg["bf"], num_layers=cfg["layers"], bidirectional=cfg["bi"],
                  dropout=cfg["dropout"])
        if cfg["proj"]:
            kw["proj_size"] = cfg["proj"]
    return kw


def setup(name: str) -> tuple[Any, Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(torch's float64 module with random weights, our block, inputs by our key, cotangents
    by our output key), all float64 arrays."""
    cfg = json.loads(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    kind, n, h, s = cfg["kind"], cfg["n"], cfg["H"], cfg["scale"]
    ref = TORCH[kind](cfg["I"], h, **_opts(cfg)).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * s))
    lstm = kind.startswith("lstm")
    if kind.endswith("cell"):
        ours = OURS[kind](h, **_opts(cfg))
        ins = {"input": rng.standard_normal((n, cfg["I"])) * s,
               "prev_hidden": rng.standard_normal((n, h))}
        cots = {"output": rng.standard_normal((n, h))}
        if lstm:
            ins["prev_cell"] = rng.standard_normal((n, h))
            cots["cell"] = rng.standard_normal((n, h))
        return ref, ours, ins, cots
    ours = OURS[kind](h, **_opts(cfg), initial_states=cfg["given"],
                      lengths=cfg["lengths"] is not None, input_size=cfg["I"])
    t, d = cfg["T"], 2 if cfg["bi"] else 1
    k, p = cfg["layers"] * d, cfg["proj"] or h
    ins = {"input": rng.standard_normal((n, t, cfg["I"]) if cfg["bf"] else (t, n, cfg["I"])) * s}
    cots = {"output": rng.standard_normal((n, t, d * p) if cfg["bf"] else (t, n, d * p)),
            "hidden": rng.standard_normal((k, n, p))}
    if cfg["given"]:
        ins["initial_hidden"] = rng.standard_normal((k, n, p))
    if lstm:
        cots["cell"] = rng.standard_normal((k, n, h))
        if cfg["given"]:
            ins["initial_cell"] = rng.standard_normal((k, n, h))
    return ref, ours, ins, cots


def dropout_mask(cfg: dict[str, Any]) -> np.ndarray:
    """The mask our ``Dropout`` at path ``dropout`` draws at :data:`SEED` and :data:`STEP`
    for layer 0's time-major output (the one between layers of a two-layer block)."""
    backend = ml.NumpyBackend(dtype="float64", seed=SEED)
    w = (2 if cfg["bi"] else 1) * (cfg["proj"] or cfg["H"])
    drop = ml.compile(ml.Dropout(cfg["dropout"]), backend)
    return drop.evaluate({}, {"input": np.ones((cfg["T"], cfg["n"], w))}, step=STEP)["output"]


def run_ours(name: str, backend_name: str) -> dict[str, np.ndarray]:
    """``{"out|<key>": ..., "grad|<torch name or input key>": ...}`` of our block."""
    cfg = json.loads(name)
    ref, ours, ins, cots = setup(name)
    backend = BACKENDS[backend_name](dtype=cfg["dtype"], seed=SEED)
    data: dict[str, Any] = {}
    if cfg.get("lengths") is not None:
        data["lengths"] = np.array(cfg["lengths"])
    compiled = ml.compile(ours, backend, shapes={k: v.shape for k, v in {**ins, **data}.items()},
                          trainable_keys=list(ins))
    params = ours.params_from_torch(ref.state_dict(), backend=backend)
    params.update({k: backend.array(v) for k, v in ins.items()})
    out, grads = compiled.evaluate(params, {k: backend.array(v) for k, v in data.items()},
                                   output_gradients={k: backend.array(v) for k, v in cots.items()},
                                   training=bool(cfg.get("training")), step=STEP)
    back = {m: t for t, m in ours.torch_names().items()}
    kept = {np.asarray(backend.to_numpy(v)).dtype for v in [*out.values(), *grads.values()]}
    assert kept == {np.dtype(cfg["dtype"])}, (name, backend_name, kept)  # no silent up/downcast
    res = {f"out|{k}": to_np(backend, v) for k, v in out.items()}
    res.update({f"grad|{back.get(k, k)}": to_np(backend, v) for k, v in grads.items()})
    return res


def _layer(ref: Any, cfg: dict[str, Any], layer: int) -> Any:
    """Layer ``layer`` of ``ref`` as a one-layer torch module sharing its parameters."""
    width = (cfg["proj"] or cfg["H"]) * (2 if cfg["bi"] else 1) if layer else cfg["I"]
    m = TORCH[cfg["kind"]](width, cfg["H"],
                           **{**_opts(cfg), "num_layers": 1, "dropout": 0.0}).double()
    for pname in [k for k, _ in m.named_parameters()]:
        delattr(m, pname)
        setattr(m, pname, getattr(ref, pname.replace("_l0", f"_l{layer}")))
    return m


def run_torch(name: str) -> dict[str, np.ndarray]:
    """The same dict from torch's module (float64 autograd)."""
    cfg = json.loads(name)
    ref, _, ins, cots = setup(name)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    ref.train(bool(cfg.get("training")))
    if cfg["kind"].endswith("cell"):
        if cfg["kind"] == "lstmcell":
            o, c = ref(leaves["input"], (leaves["prev_hidden"], leaves["prev_cell"]))
            outs = {"output": o, "cell": c}
        else:
            outs = {"output": ref(leaves["input"], leaves["prev_hidden"])}
    else:
        outs = _run_sequence(ref, cfg, leaves)
    leaves.update(dict(ref.named_parameters()))
    grads = torch.autograd.grad(list(outs.values()), list(leaves.values()),
                                [torch.tensor(cots[k]) for k in outs], allow_unused=True)
    res = {f"out|{k}": v.detach().numpy() for k, v in outs.items()}
    res.update({f"grad|{k}": torch.zeros_like(v).numpy() if g is None else g.numpy()
                for (k, v), g in zip(leaves.items(), grads)})
    return res


def _call(m: Any, cfg: dict[str, Any], x: Any, states: list[Any]) -> tuple[Any, Any]:
    """``m`` on ``x`` (packed when ``lengths``), padded back to T: (output, final states)."""
    lens = cfg.get("lengths")
    if lens is not None:
        x = pack_padded_sequence(x, torch.tensor(lens), batch_first=cfg["bf"], enforce_sorted=False)
    args = (x,) + ((tuple(states) if len(states) == 2 else states[0],) if states else ())
    o, s = m(*args)
    if lens is not None:
        o, _ = pad_packed_sequence(o, batch_first=cfg["bf"], total_length=cfg["T"])
    return o, s


def _run_sequence(ref: Any, cfg: dict[str, Any], leaves: dict[str, Any]) -> dict[str, Any]:
    states = [leaves[k] for k in ("initial_hidden", "initial_cell") if k in leaves]
    if not (cfg["training"] and 0 < cfg["dropout"] < 1):
        o, s = _call(ref, cfg, leaves["input"], states)
    else:  # two layers, layer 1 reads layer 0's output times our mask
        d = 2 if cfg["bi"] else 1
        mask = torch.tensor(dropout_mask(cfg))
        if cfg["bf"]:
            mask = mask.transpose(0, 1)
        o0, s0 = _call(_layer(ref, cfg, 0), cfg, leaves["input"], [v[:d] for v in states])
        o, s1 = _call(_layer(ref, cfg, 1), cfg, o0 * mask, [v[d:] for v in states])
        s = tuple(torch.cat([a, b]) for a, b in zip(s0, s1)) if isinstance(s0, tuple) \
            else torch.cat([s0, s1])
    return {"output": o, **(dict(zip(("hidden", "cell"), s)) if isinstance(s, tuple)
                            else {"hidden": s})}


def check(name: str, got: dict[str, np.ndarray], what: str) -> None:
    want, t = run_torch(name), tol(json.loads(name))
    assert set(got) == set(want), set(got) ^ set(want)
    errs = {k: error(got[k].astype(np.float64), want[k]) for k in want}
    bad = {k: e for k, e in errs.items() if not e <= t}
    assert not bad, f"{what} {name}: {bad}"


def jax_column(names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """:func:`run_ours` on JAX for ``names``, in one fresh process with x64 on."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jax.npz")
        run_python(f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import jax
            jax.config.update("jax_enable_x64", True)
            import numpy as np
            import test_recurrent_fuzz as m
            flat = {{}}
            for i, name in enumerate({names!r}):
                flat.update({{f"{{i}}#{{k}}": v for k, v in m.run_ours(name, "jax").items()}})
            np.savez({path!r}, **flat)
        """, timeout=600)
        res: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
        with np.load(path) as z:
            for key in z.files:
                i, k = key.split("#", 1)
                res[names[int(i)]][k] = z[key]
    return res


configs = rnn_configs()
_FAST = settings(max_examples=12, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])
_SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- tests ------------------------------------------------------------------------------------
@_FAST
@given(configs)
def test_numpy_and_torch_equal_torch_nn(cfg: dict[str, Any]) -> None:
    name = name_of(cfg)
    for backend_name in ("numpy", "torch"):
        check(name, run_ours(name, backend_name), backend_name)


@pytest.mark.slow
@_SLOW
@given(configs)
def test_numpy_and_torch_equal_torch_nn_many(cfg: dict[str, Any]) -> None:
    name = name_of(cfg)
    for backend_name in ("numpy", "torch"):
        check(name, run_ours(name, backend_name), backend_name)


@settings(max_examples=1, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(configs, min_size=5, max_size=5))
def test_jax_equals_torch_nn(cfgs: list[dict[str, Any]]) -> None:
    names = [name_of(c) for c in cfgs]
    for name, got in jax_column(names).items():
        check(name, got, "jax")


@pytest.mark.slow
@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(configs, min_size=50, max_size=50))
def test_jax_equals_torch_nn_many(cfgs: list[dict[str, Any]]) -> None:
    names = [name_of(c) for c in cfgs]
    for name, got in jax_column(names).items():
        check(name, got, "jax")


# -- central differences ----------------------------------------------------------------------
_SEQ = {"I": 2, "H": 3, "n": 2, "dtype": "float64", "scale": 0.5, "T": 3, "layers": 2,
        "given": True, "proj": 0, "dropout": 0.0, "training": False, "bias": True}
FD_CONFIGS = [
    {**_SEQ, "kind": "lstm", "bf": True, "bi": True, "proj": 2, "lengths": [3, 1]},
    {**_SEQ, "kind": "gru", "bf": False, "bi": True, "lengths": None, "dropout": 0.4,
     "training": True, "bias": False},
    {**_SEQ, "kind": "rnn", "nonlin": "relu", "bf": False, "bi": False, "lengths": [2, 3]},
    {"kind": "grucell", "I": 2, "H": 3, "n": 2, "dtype": "float64", "scale": 1.0, "bias": True},
]


@pytest.mark.parametrize("cfg", FD_CONFIGS, ids=lambda c: c["kind"])
def test_numpy_gradients_equal_central_differences(cfg: dict[str, Any]) -> None:
    """Every gradient of ``<outputs, cotangents>`` on NumPy float64 against central
    differences (dropout's mask held: the same seed and step), and torch's side by side."""
    name = name_of(cfg)
    got = run_ours(name, "numpy")
    check(name, got, "numpy")
    ref, ours, ins, cots = setup(name)
    backend = ml.NumpyBackend(dtype="float64", seed=SEED)
    data = {} if cfg.get("lengths") is None else {"lengths": np.array(cfg["lengths"])}
    compiled = ml.compile(ours, backend, shapes={k: v.shape for k, v in {**ins, **data}.items()},
                          trainable_keys=list(ins))
    params = {**ours.params_from_torch(ref.state_dict()), **ins}
    back = {m: t for t, m in ours.torch_names().items()}

    def f(p: dict[str, np.ndarray]) -> float:
        out = compiled.evaluate(p, data, training=bool(cfg.get("training")), step=STEP)
        return float(sum(np.sum(out[k] * c) for k, c in cots.items()))

    for k, g in central_differences(f, params, 1e-6).items():
        np.testing.assert_allclose(got[f"grad|{back.get(k, k)}"], g, rtol=1e-6, atol=1e-7,
                                   err_msg=k)
