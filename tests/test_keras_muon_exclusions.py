"""Keras 3's Muon ``exclude_layers`` / ``exclude_embeddings`` on ours, side by side.

``keras.optimizers.Muon`` gives AdamW every variable that is not a matrix, and the matrices
whose path has "embedding" in it (``exclude_embeddings=True``, its default) or a regex of
``exclude_layers`` found in it. Ours takes the same arguments on our dotted parameter names
(an embedding: an ``Embedding`` / ``PositionalEmbedding`` block's table, by the compiler's
names). The variables here are named as a compiled model names them, so that both rules
route them alike; Keras runs (JAX backend, float64 and float32) in one subprocess with ours
on the jitted JAX engine, ours on NumPy here, 20 steps, some tensors without a gradient on
some steps.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from optimizer_parity import rel_err

import mithril as ml
import mithril.utils.optimizers as mo
from mithril.errors import ShapeError
from mithril.utils.optimizers.muon import EMBEDDING

SHAPES = {"embedding.weight": (10, 4), "encoder.embedding_1.weight": (6, 4),
          "positional_embedding.weight": (5, 4), "linear.weight": (6, 4),
          "mlp.linear_1.weight": (7, 3), "head.weight": (3, 6), "linear.bias": (6,),
          "norm.scale": (4,)}
STEPS = 20
LR = 0.01

# name -> (Keras's Muon arguments, the missing-gradient pattern); ours: :func:`ours`
CASES = {
    "defaults": ({}, False),  # exclude_embeddings=True, Keras's defaults
    "layers": ({"exclude_layers": ["head", r"linear_\d"], "exclude_embeddings": False,
                "adam_lr_ratio": 0.5, "adam_weight_decay": 0.02, "weight_decay": 0.01,
                "rms_rate": 0.3, "momentum": 0.9}, True),
    "both": ({"exclude_layers": ["^head"], "nesterov": False, "adam_beta_1": 0.8}, True),
}


def ours(kw: dict) -> mo.Muon:
    """Keras's ``Muon(LR, **kw)`` by the recipe of Muon's docstring."""
    r = kw.get("adam_lr_ratio", 1.0)
    fallback = mo.AdamW(LR * r, weight_decay=kw.get("adam_weight_decay", 0.004) / r,
                        beta1=kw.get("adam_beta_1", 0.9), epsilon=1e-7, convention="keras")
    rate = kw.get("rms_rate", 0.2)
    return mo.Muon(LR, weight_decay=kw.get("weight_decay", 0.004),
                   momentum=kw.get("momentum", 0.95), nesterov=kw.get("nesterov", True),
                   adjust_lr_fn="match_rms_adamw" if rate == 0.2 else rate, ns_dtype=None,
                   fallback=fallback, exclude_layers=kw.get("exclude_layers"),
                   exclude_embeddings=kw.get("exclude_embeddings", True))


def problem(dtype: str):
    rng = np.random.default_rng(3)
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
             for _ in range(STEPS)]
    return p0, grads


def gone(missing: bool, t: int) -> set[str]:
    """The tensors without a gradient at step ``t``: an excluded matrix, a Muon one."""
    if not missing:
        return set()
    return {"head.weight"} if t % 4 == 1 else {"linear.weight"} if t % 5 == 2 else set()


_SCRIPT = r"""
import os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import keras
import keras.src.ops as kops
import mithril.utils.optimizers.engines as engines

keras_norm = kops.norm


def float64_norm(x, ord=None, axis=None, keepdims=False):  # (Keras 3.15's is float32's)
    return jnp.linalg.norm(jnp.asarray(x), ord=ord, axis=axis, keepdims=keepdims)


out = {}
for dtype in ("float64", "float32"):
    keras.config.set_floatx(dtype)
    kops.norm = float64_norm if dtype == "float64" else keras_norm
    for case, (kw, missing) in CASES.items():
        p0, grads = problem(dtype)
        opt = keras.optimizers.Muon(learning_rate=LR, **kw)
        vs = [keras.Variable(p0[k], dtype=dtype, name=k) for k in SHAPES]
        opt.build(vs)
        adamw = [v.path for v in vs if opt._should_use_adamw(v)]
        traj = []
        for t in range(STEPS):
            opt.apply([None if k in gone(missing, t) else jnp.asarray(grads[t][k])
                       for k in SHAPES], vs)
            traj.append([np.asarray(v.value, dtype=np.float64).tolist() for v in vs])
        out[f"{case}/{dtype}"] = {"keras": traj, "adamw": adamw}
        if dtype == "float32":
            continue
        engines.JAX_ENGINE = "jit"
        mine = ours(kw)
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        state = mine.init(params)
        jit = []
        for t in range(STEPS):
            params, state = mine.update(params, {k: jnp.asarray(g) for k, g in grads[t].items()
                                                 if k not in gone(missing, t)}, state)
            jit.append([np.asarray(params[k]).tolist() for k in SHAPES])
        out[f"{case}/{dtype}"]["jit"] = jit
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def keras_runs() -> dict:
    code = "\n".join([
        "import json\nimport numpy as np\nimport mithril.utils.optimizers as mo",
        f"SHAPES = {SHAPES!r}\nSTEPS = {STEPS}\nLR = {LR}\nCASES = {CASES!r}",
        inspect.getsource(ours), inspect.getsource(problem), inspect.getsource(gone), _SCRIPT])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(case: str, dtype: str) -> tuple[list, mo.Muon]:
    kw, missing = CASES[case]
    opt = ours(kw)
    p0, grads = problem(dtype)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    traj = []
    for t in range(STEPS):
        params, state = opt.update(params, {k: g for k, g in grads[t].items()
                                            if k not in gone(missing, t)}, state)
        traj.append([np.array(params[k], dtype=np.float64) for k in SHAPES])  # (a copy)
    return traj, opt


def worst(a: list, b: list) -> float:
    return max(rel_err(x, np.asarray(y)) for sa, sb in zip(a, b, strict=True)
               for x, y in zip(sa, sb, strict=True))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_keras_muon_step_by_step(case: str, dtype: str, keras_runs: dict) -> None:
    """The same tensors go to AdamW (Keras's ``_should_use_adamw``, ours ``to_fallback``)
    and every parameter follows Keras's after every step: float64 to Keras's 1e-7 on ‖U‖
    (ours max(‖U‖, ε)). float32: ours within 3e-6 of Keras's float64 run; Keras's own
    float32 run is up to ~7e-5 off it (its β₂ rounded to float32: 1 − 0.999 is 1.3e-5 off),
    so against that 1e-4."""
    ref = keras_runs[f"{case}/{dtype}"]
    traj, opt = run_ours(case, dtype)
    assert [n for n, s in SHAPES.items() if opt.to_fallback(n, s)] == ref["adamw"]
    if dtype == "float64":
        assert worst(traj, ref["keras"]) <= 3e-7
        assert worst(ref["jit"], ref["keras"]) <= 3e-7, "jitted JAX engine"
    else:
        assert worst(traj, keras_runs[f"{case}/float64"]["keras"]) <= 3e-6
        assert worst(traj, ref["keras"]) <= 1e-4


def test_exclusions_change_the_trajectory(keras_runs: dict) -> None:
    """(So the comparisons above can fail:) without the exclusions ours is far from Keras's."""
    kw, _ = CASES["defaults"]
    opt = ours({**kw, "exclude_embeddings": False})
    p0, grads = problem("float64")
    params, state = dict(p0), opt.init(p0)
    for t in range(STEPS):
        params, state = opt.update(params, grads[t], state)
    i = list(SHAPES).index("embedding.weight")
    assert rel_err(params["embedding.weight"],
                   np.asarray(keras_runs["defaults/float64"]["keras"][-1][i])) > 1e-2


def test_embedding_is_our_embedding_blocks_table() -> None:
    """What the compiler names an Embedding / PositionalEmbedding table is an embedding,
    nested or numbered; a Linear is not, nor a name with "embedding" elsewhere in it (Keras's
    substring rule would take ``embedding_proj.weight``: give it in exclude_layers)."""
    model = ml.Model()
    model |= ml.Embedding(10, 4)(input="input", output="a")
    model |= ml.Embedding(10, 4)(input="input", output="b")
    model |= ml.Add()(left="a", right="b", output=ml.IOKey("c", expose=False))
    model |= ml.PositionalEmbedding(7, 4)(input="c", output=ml.IOKey("d", expose=False))
    model |= ml.Linear(3)(input="d", output="out")
    outer = ml.Model()
    outer |= model(input="x", out="y")
    params = ml.compile(outer, ml.NumpyBackend(seed=0),
                        shapes={"x": [None, 7]}).get_parameters()
    found = sorted(n for n in params if EMBEDDING.search(n))
    assert found == ["model.embedding_0.weight", "model.embedding_1.weight",
                     "model.positional_embedding.weight"], sorted(params)
    for name in ("embedding_proj.weight", "linear.weight", "token_embedding.weight",
                 "embedding.bias"):
        assert not EMBEDDING.search(name), name
    muon = mo.Muon(exclude_embeddings=True, fallback=mo.AdamW())
    state = muon.init(params)
    assert [n for n in params if state.slot("fallback_m")[n].size] == [
        *found, "model.linear.bias"]
    assert [n for n in params if state.slot("momentum_buffer")[n].size] == [
        "model.linear.weight"]


def test_defaults_unchanged_and_hyperparameters_round_trip() -> None:
    """Our defaults route by shape alone (torch's Muon has no exclusions); the exclusions
    are hyperparameters, and ``Muon(**hyperparameters())`` routes as the original."""
    assert mo.Muon().exclude_layers == [] and mo.Muon().exclude_embeddings is False
    assert not mo.Muon().to_fallback("embedding.weight", (3, 2))
    m = mo.Muon(exclude_layers=["head"], exclude_embeddings=True)
    again = mo.Muon(**m.hyperparameters())
    assert again.hyperparameters() == m.hyperparameters()
    assert again.to_fallback("head.weight", (2, 2)) and again.to_fallback("embedding.weight",
                                                                          (2, 2))
    assert not again.to_fallback("linear.weight", (2, 2))


def test_bad_exclusions_are_refused_naming_them() -> None:
    with pytest.raises(TypeError, match="exclude_layers must be a list of regexes"):
        mo.Muon(exclude_layers="head")  # (Keras would search its characters)
    with pytest.raises(TypeError, match=r"exclude_layers\[1\] must be a regex string"):
        mo.Muon(exclude_layers=["head", 3])
    with pytest.raises(ValueError, match=r"exclude_layers\[0\] = '\(' is not a regex"):
        mo.Muon(exclude_layers=["("])
    with pytest.raises(TypeError, match="exclude_embeddings must be True or False"):
        mo.Muon(exclude_embeddings="yes")
    with pytest.raises(ValueError, match="Muon\\(fallback=None\\) has none"):
        mo.Muon(fallback=None, exclude_embeddings=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: \['exclude_layers'\]"):
        mo.Muon(param_groups=[{"params": ["w"], "exclude_layers": ["w"]}])
    m = mo.Muon(exclude_layers=["head"])
    with pytest.raises(AttributeError, match="exclude_layers is fixed at construction"):
        m.exclude_layers = ["w"]
    assert m.exclude_layers == ["head"]


def test_a_state_of_another_routing_is_refused() -> None:
    """A state laid out by one Muon's exclusions, stepped by another's, is refused naming
    the parameter (its slots would not fit), and nothing changes."""
    params = {"head.weight": np.ones((3, 2)), "w": np.ones((2, 2))}
    grads = {k: np.full_like(v, 0.5) for k, v in params.items()}
    plain = mo.Muon()
    state = plain.init(params)
    with pytest.raises(ValueError, match="'head.weight' is updated by the fallback here"):
        mo.Muon(exclude_layers=["head"]).update(params, grads, state)
    assert state.step == 0 and np.all(params["head.weight"] == 1.0)
    _, state = plain.update(params, grads, state)  # (plain's rows cached for its state)
    state = mo.Muon(exclude_layers=["head"]).init(params)
    with pytest.raises(ValueError, match="'head.weight' is updated by Muon here"):
        plain.update(params, grads, state)


def test_the_optax_transformation_routes_exclusions_by_name() -> None:
    """The optax transformation lays its slots out by each parameter's name too: with
    ``exclude_layers`` the excluded matrix has the AdamW fallback's slots and its updates
    equal the NumPy optimizer's (float32, 5 steps)."""
    pytest.importorskip("optax")
    import jax.numpy as jnp
    import optax

    from mithril.interop import optax_transformation

    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(shp).astype(np.float32) for k, shp in
              (("head.weight", (3, 2)), ("body.weight", (4, 3)), ("body.bias", (4,)))}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(5)]
    make = lambda: mo.Muon(learning_rate=0.05, exclude_layers=["head"], ns_dtype="float32")  # noqa: E731
    opt = make()
    p, st = dict(params), opt.init(dict(params))
    tx = optax_transformation(make())
    q = {k: jnp.asarray(v) for k, v in params.items()}
    s = tx.init(q)
    assert s.slots["momentum_buffer"]["head.weight"].shape == (0,)
    assert s.slots["momentum_buffer"]["body.weight"].shape == (4, 3)
    for g in grads:
        p, st = opt.update(p, g, st)
        u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, q)
        q = optax.apply_updates(q, u)
    for k in params:
        assert np.abs(np.asarray(q[k]) - p[k]).max() < 2e-6, k


def test_a_muon_without_fallback_refuses_a_vector() -> None:
    with pytest.raises(ShapeError, match="2-D parameters only"):
        mo.Muon(fallback=None).init({"b": np.ones(3)})

