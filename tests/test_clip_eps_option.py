"""The optimizers' ``clip_eps``: the global-norm clip's floor, ``min(1, c / (‖g‖ + clip_eps))``.
The default 1e-6 is torch's ``clip_grad_norm_``; 0 is optax's ``clip_by_global_norm`` and
Keras's ``global_clipnorm``. Side by side with both peers in float64 over three Adam steps,
for the clip cases of ``tests/test_clip_norm_eps.py`` (a large norm, one just below ``c``, a
tiny one above a tiny ``c``, an all-zero gradient), on every path the fused clip takes:
NumPy, torch (numba, its fused ops, the tensor-op engine), JAX (default and jitted engines),
``optax_transformation``, ``torch_optimizer``, ``make_train_step`` on the three backends, the
tensorwise optimizers (Adafactor, SM3, Muon). Adam's ε is a tenth of the gradients' size, so
that the update follows the gradients' scale and the two floors give different steps.
optax's side on the host: torch.optim.Adam fed ``clip_by_global_norm``'s rule written out,
which the (slow) JAX test checks against ``optax.chain(clip_by_global_norm, adam)`` itself.

Tensorwise optimizers have no peer with this clip: with ``clip_eps=0`` they equal themselves
without ``clip_norm``, fed ``clip_gradients(eps=0)`` (optax's rule, checked against optax in
``tests/test_clip_norm_eps.py``)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_python
from test_clip_norm_eps import CASES, problem

from mithril.utils.optimizers import SM3, Adafactor, Adam, Muon, clip_gradients, engines

TOL = 1e-12
LR, STEPS = 0.1, (1.0, 0.5, 2.0)  # each step's gradient: the case's times this factor
HERE = os.path.dirname(__file__)


def adam_eps(case: str) -> float:
    return 0.1 * (CASES[case][0] or 1.0)


def grads_at(case: str) -> list[dict[str, np.ndarray]]:
    _, g, _ = problem(case)
    return [{k: v * f for k, v in g.items()} for f in STEPS]


def torch_peer(case: str, optax_clip: bool = False) -> dict[str, np.ndarray]:
    """clip_grad_norm_ then torch.optim.Adam, each step; ``optax_clip``: optax's
    clip_by_global_norm instead (``g·c/‖g‖`` where ‖g‖ >= c: written out, checked against
    optax itself in the JAX test)."""
    p0, _, c = problem(case)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.Adam(list(tp.values()), lr=LR, eps=adam_eps(case))
    for g in grads_at(case):
        n = np.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        for k, t in tp.items():
            t.grad = torch.tensor(g[k] / n * c if optax_clip and n >= c else g[k])
        if not optax_clip:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), c)
        opt.step()
    return {k: t.detach().numpy() for k, t in tp.items()}


def diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


JAX_CODE = """
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    import test_clip_eps_option as t
    from mithril.interop import optax_transformation
    from mithril.utils.optimizers import Adam, clip_gradients, engines

    def run_tx(tx, case):
        p0, _, _ = t.problem(case)
        p = {{k: jnp.asarray(v) for k, v in p0.items()}}
        s, upd = tx.init(p), jax.jit(tx.update)
        for g in t.grads_at(case):
            u, s = upd({{k: jnp.asarray(v) for k, v in g.items()}}, s, p)
            p = optax.apply_updates(p, u)
        return {{k: np.asarray(v) for k, v in p.items()}}

    def run_ours(opt, case, clip_first=None):
        p0, _, _ = t.problem(case)
        p = {{k: jnp.asarray(v) for k, v in p0.items()}}
        s = opt.init(p)
        for g in t.grads_at(case):
            g = {{k: jnp.asarray(v) for k, v in g.items()}}
            if clip_first is not None:
                g = clip_gradients(g, clip_norm=clip_first, eps=0.0)
            p, s = opt.update(p, g, s)
        return {{k: np.asarray(v) for k, v in p.items()}}

    out = {{}}
    for case in t.CASES:
        p0, _, c = t.problem(case)
        eps = t.adam_eps(case)
        peer = run_tx(optax.chain(optax.clip_by_global_norm(c), optax.adam(t.LR, eps=eps)), case)
        torch_want = t.torch_peer(case)
        r = {{"optax-vs-rule": t.diff(peer, t.torch_peer(case, optax_clip=True))}}
        for engine in ("auto", "jit"):
            engines.JAX_ENGINE = engine
            r[f"{{engine}}-eps0-vs-optax"] = t.diff(
                run_ours(Adam(t.LR, epsilon=eps, clip_norm=c, clip_eps=0.0), case), peer)
            r[f"{{engine}}-default-vs-torch"] = t.diff(
                run_ours(Adam(t.LR, epsilon=eps, clip_norm=c), case), torch_want)
            for name, make in t.TENSORWISE.items():
                r[f"{{engine}}-{{name}}-eps0"] = t.diff(run_ours(make(c, 0.0), case),
                                                      run_ours(make(None, 0.0), case, c))
        engines.JAX_ENGINE = "auto"
        r["transformation-eps0-vs-optax"] = t.diff(run_tx(optax_transformation(
            Adam(t.LR, epsilon=eps, clip_norm=c, clip_eps=0.0)), case), peer)
        r["transformation-default-vs-torch"] = t.diff(run_tx(optax_transformation(
            Adam(t.LR, epsilon=eps, clip_norm=c)), case), torch_want)
        for name, make in t.TENSORWISE.items():
            r[f"transformation-{{name}}-eps0"] = t.diff(
                run_tx(optax_transformation(make(c, 0.0)), case),
                run_ours(make(None, 0.0), case, c))
        out[case] = r
    print(json.dumps(out))
"""


#: tensorwise optimizers with ``clip_norm`` (None: without) and ``clip_eps``
TENSORWISE = {
    "adafactor": lambda c, e: Adafactor(0.1, clip_norm=c, clip_eps=e),
    "adafactor-per-tensor": lambda c, e: Adafactor(0.1, clip_norm=c, clip_eps=e, fused=False),
    "sm3": lambda c, e: SM3(0.1, clip_norm=c, clip_eps=e),
    "muon": lambda c, e: Muon(0.1, clip_norm=c, clip_eps=e, ns_dtype="float64"),
}


@pytest.mark.slow  # (~1 min: JAX compiles each engine's and transformation's programs)
def test_jax_engines_and_optax_transformation() -> None:
    out = json.loads(run_python(JAX_CODE.format(tests=HERE), timeout=400).strip().splitlines()[-1])
    for case in CASES:
        r = out[case]
        assert len(r) == 1 + 2 * (2 + len(TENSORWISE)) + 2 + len(TENSORWISE)
        bad = {k: v for k, v in r.items() if not v <= TOL}
        assert not bad, (case, bad)


def optax_peer(case: str) -> dict[str, np.ndarray]:
    return torch_peer(case, optax_clip=True)


def test_the_cases_tell_the_floors_apart() -> None:
    """Where the norm is not zero, optax's three steps and torch's differ: each check below
    can fail."""
    for case in ("large", "just-below", "tiny"):
        assert diff(optax_peer(case), torch_peer(case)) > 1e-10, case
    assert diff(optax_peer("zero"), torch_peer("zero")) == 0.0


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def run(opt, case: str, to=np.array, back=np.asarray, clip_first=None) -> dict[str, np.ndarray]:
    p0, _, _ = problem(case)
    p = {k: to(v) for k, v in p0.items()}
    s = opt.init(p)
    for g in grads_at(case):
        g = {k: to(v) for k, v in g.items()}
        if clip_first is not None:
            g = clip_gradients(g, clip_norm=clip_first, eps=0.0)
        p, s = opt.update(p, g, s)
    return {k: back(v) for k, v in p.items()}


#: the host engines: numba (NumPy, torch), torch's fused ops, the tensor-op engine
HOST = {"numpy": (np.array, np.asarray, None), "torch": (to_torch, lambda t: t.numpy(), None),
        "torch-fused-ops": (to_torch, lambda t: t.numpy(), "fused-ops"),
        "numpy-tensor-ops": (np.array, np.asarray, "array")}


@pytest.fixture
def host_engine(request, monkeypatch):
    to, back, kind = HOST[request.param]
    if kind == "fused-ops":
        monkeypatch.setattr(engines, "TORCH_ENGINE", "fused-ops")
    elif kind == "array":
        from mithril.utils.optimizers.engines.array_engine import ArrayEngine

        monkeypatch.setattr(engines, "engine_for", lambda b, lay, *_: ArrayEngine(b, lay))
    return to, back


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("host_engine", sorted(HOST), indirect=True)
def test_host_engines(host_engine, case: str) -> None:
    to, back = host_engine
    _, _, c = problem(case)
    ours = run(Adam(LR, epsilon=adam_eps(case), clip_norm=c, clip_eps=0.0), case, to, back)
    assert diff(ours, optax_peer(case)) <= TOL
    ours = run(Adam(LR, epsilon=adam_eps(case), clip_norm=c), case, to, back)
    assert diff(ours, torch_peer(case)) <= TOL


@pytest.mark.parametrize(("name", "case"), [(n, k) for n in sorted(TENSORWISE)
                                             for k in sorted(CASES)])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_tensorwise_host(name: str, case: str, backend: str) -> None:
    to, back, _ = HOST[backend]
    make, c = TENSORWISE[name], problem(case)[2]
    ours = run(make(c, 0.0), case, to, back)
    optax_rule = run(make(None, 0.0), case, to, back, clip_first=c)
    if case != "zero":  # the floor counts: the two rules differ (this test can fail)
        assert diff(run(make(c, 1e-6), case, to, back), optax_rule) > TOL
    assert diff(ours, optax_rule) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_optimizer(case: str) -> None:
    from mithril.interop import torch_optimizer

    p0, _, c = problem(case)
    for clip_eps, want in ((0.0, optax_peer(case)), (1e-6, torch_peer(case))):
        tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
        opt = torch_optimizer(Adam(LR, epsilon=adam_eps(case), clip_norm=c, clip_eps=clip_eps),
                              list(tp.items()))
        assert opt.param_groups[0]["clip_eps"] == clip_eps  # (under its own name)
        for g in grads_at(case):
            for k, t in tp.items():
                t.grad = torch.tensor(g[k])
            opt.step()
        assert diff({k: t.detach().numpy() for k, t in tp.items()}, want) <= TOL, clip_eps


def test_checked_and_saved() -> None:
    for bad in (-1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_eps"):
            Adam(clip_norm=1.0, clip_eps=bad)
    with pytest.raises(TypeError, match="clip_eps"):
        Adam(clip_eps="0")
    opt = Adam(clip_norm=1.0, clip_eps=0.0)
    d = opt.state_dict()
    assert d["hyperparameters"]["clip_eps"] == 0.0
    other = Adam(clip_norm=1.0)
    other.load_state_dict(d)
    assert other.clip_eps == 0.0
    old = {**d, "hyperparameters": {k: v for k, v in d["hyperparameters"].items()
                                    if k != "clip_eps"}}
    other = Adam(clip_norm=1.0)
    other.load_state_dict(old)  # a checkpoint from before the option: torch's floor
    assert other.clip_eps == 1e-6
    bad = {**d, "hyperparameters": {**d["hyperparameters"], "clip_eps": -1.0, "beta1": 0.5}}
    with pytest.raises(ValueError, match="clip_eps"):
        other.load_state_dict(bad)
    assert other.clip_eps == 1e-6 and other.beta1 == 0.9  # refused: nothing changed


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_make_train_step(backend: str) -> None:
    """``make_train_step``'s fused step with ``clip_eps=0`` is optax's rule: the separate
    calls, ``clip_gradients(eps=0)`` before an optimizer without ``clip_norm`` (the clip
    binds: norms 0.26-0.64 against 0.3; the JAX one-program step is
    ``tests/test_porting_hunt.py``'s, against optax itself)."""
    from porting_hunt_peers import _data, _mlp

    import mithril as ml
    from mithril.utils.training import make_train_step

    be = (ml.NumpyBackend if backend == "numpy" else ml.TorchBackend)(dtype="float64")
    compiled = _mlp(be)
    x, y = _data()
    host = (lambda v: v.numpy()) if backend == "torch" else np.asarray
    p0 = {k: host(v) for k, v in compiled.get_parameters().items()}
    batches = [{"input": be.array(x[i:i + 32]), "target": be.array(y[i:i + 32], be.int_dtype)}
               for i in range(0, 128, 32)]

    def fused(clip_eps: float) -> dict:
        step = make_train_step(compiled, Adam(5e-2, clip_norm=0.3, clip_eps=clip_eps), "loss")
        p = {k: be.array(v) for k, v in p0.items()}
        s = step.init(p)
        for b in batches:
            p, s, _ = step(p, s, b)
        return {k: host(v) for k, v in p.items()}

    opt = Adam(5e-2)
    p = {k: be.array(v) for k, v in p0.items()}
    s = opt.init(p)
    for b in batches:
        _, g = compiled.evaluate(p, b, output_gradients={"loss": 1.0})
        p, s = opt.update(p, clip_gradients(g, clip_norm=0.3, eps=0.0), s)
    separate = {k: host(v) for k, v in p.items()}
    assert diff(fused(0.0), separate) <= 1e-12
    assert diff(fused(1e-6), separate) > 1e-9  # torch's floor: another step
