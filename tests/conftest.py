"""Shared fixtures: the three backends, and helpers to move data between them.

JAX's ``float64`` switches on ``jax_enable_x64`` for the whole process, so tests that
need a float64 JAX backend run it inside :func:`jax_float64` (the thread-local x64 context,
the process-wide flag put back after; :func:`jax_float64_results` for a module's table of
cases) or, where the test is about a fresh process, in a subprocess (:func:`run_python`);
every other in-process JAX backend here is float32 or narrower.

Each test process computes on one thread: ``pytest -n 2`` already runs one process per
core, and two OpenMP pools spinning on two cores can slow torch down a hundredfold.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before NumPy / torch load their thread pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib  # noqa: E402
import gc  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mithril.backends import JaxBackend, NumpyBackend, TorchBackend  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _small_jax_chunks(monkeypatch):
    """The jitted JAX engine keeps its slots in chunks (one per tensor of ``CHUNK_MIN``
    elements or more on CPU): with the tests' small tensors, a threshold of 10 elements
    gives them layouts with both kinds of chunk, so every jax-jit test runs the chunked
    step (``tests/test_jax_chunks.py`` checks the real threshold)."""
    from mithril.utils.optimizers.engines import jax_chunks

    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", 10)



@pytest.fixture(autouse=True, scope="module")
def _jax_x64_restored():
    """``jax_enable_x64`` as it was before the module: a float64 ``JaxBackend`` turns it on
    for the whole process (documented), and without this a test module doing so left every
    later module of its xdist worker in float64 (tests assuming float32 failed by the luck of
    the scheduling). Within a module the flag is the module's business."""
    jax = sys.modules.get("jax")
    before = bool(jax.config.jax_enable_x64) if jax is not None else False
    yield
    jax = sys.modules.get("jax")
    if jax is not None and bool(jax.config.jax_enable_x64) != before:
        jax.config.update("jax_enable_x64", before)

#: memory mappings a test process may hold at a module's end before JAX's caches are
#: emptied (Linux refuses new ones past ``vm.max_map_count``, 65,530 by default)
MAPS_BEFORE_CLEARING = 30_000


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _memory_maps_bounded():
    """Empty JAX's caches after a module that leaves the process holding more than
    :data:`MAPS_BEFORE_CLEARING` memory mappings. Every program XLA:CPU compiles keeps a few
    mappings of machine code for as long as JAX caches it (forever, by default; optax's
    un-jitted ``MultiSteps`` alone compiles a ``lax.cond`` of fresh lambdas per update,
    ~500 mappings a reference run); an xdist worker running ~7,000 tests reached Linux's
    ``vm.max_map_count`` and the next compile or executable load died inside LLVM
    ("Cannot allocate memory": a SIGABRT or a SIGSEGV in JAX's cache read / write).
    ``jax.clear_caches()`` releases them; the tests' own state never lives there.

    Also where JAX's C++ dispatch cache of jitted functions is nearly full: once it holds
    its capacity (8,192) of live functions, no later jitted function keeps its entry
    (jax-ml/jax#39078, jax 0.10.2), so ``f._cache_size()``, which the tests read to check
    that a step compiled once, reads 0 in a long-running worker (seen twice in the slow
    suite); ``jax.clear_caches()`` is the issue's remedy."""
    yield
    jax = sys.modules.get("jax")
    if jax is not None and (_mappings() > MAPS_BEFORE_CLEARING or _dispatch_cache_full(jax)):
        jax.clear_caches()
        gc.collect()


def _dispatch_cache_full(jax) -> bool:
    """Whether JAX's C++ cache of jitted functions with explicit attributes is 90% full
    (False where its private handle moved)."""
    try:
        cache = jax._src.pjit._cpp_pjit_cache_explicit_attributes
        return cache.size() >= 0.9 * cache.capacity()
    except Exception:  # noqa: BLE001 - a private handle of JAX's: absent, nothing to watch
        return False


BACKENDS = {"numpy": NumpyBackend, "jax": JaxBackend, "torch": TorchBackend}


def usage_error(capsys, argv: list[str], *, usage: str | None = None, last: bool = False) -> str:
    """Run the CLI on ``argv``; assert an argparse-style exit 2 (``error:``, no traceback;
    with ``usage``, its ``usage: <usage>`` line too); return stderr (``last``: its last
    line)."""
    from mithril.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert usage is None or f"usage: {usage}" in err
    return err.strip().splitlines()[-1] if last else err


def half_backends() -> list:
    """One backend per framework in its half-precision dtype (the mixed-precision tests):
    NumPy and torch float16, JAX bfloat16."""
    return [NumpyBackend(dtype="float16"), TorchBackend(dtype="float16"),
            JaxBackend(dtype="bfloat16")]


@pytest.fixture(params=list(BACKENDS))
def backend_cls(request):
    return BACKENDS[request.param]


@pytest.fixture
def backend(backend_cls):
    """A float32 backend, seeded with 0."""
    return backend_cls(dtype="float32", seed=0)


def to_np(backend, x) -> np.ndarray:
    """``x`` as a float64 (or integer) NumPy array, whatever its backend and dtype."""
    a = backend.to_numpy(x)
    return a.astype(np.float64) if a.dtype.kind not in "iub" else a


def np_dict(backend, d) -> dict[str, np.ndarray]:
    return {k: to_np(backend, v) for k, v in d.items()}


def evaluate_np(compiled, backend, params: dict, data: dict, cot: dict) -> tuple[dict, dict]:
    """``compiled.evaluate`` of host ``params``, ``data`` and output gradients ``cot`` as
    ``backend``'s arrays: (outputs, gradients) as NumPy (:func:`np_dict`)."""
    out, grads = compiled.evaluate({k: backend.array(v) for k, v in params.items()},
                                   {k: backend.array(v) for k, v in data.items()},
                                   output_gradients={k: backend.array(v) for k, v in cot.items()})
    return np_dict(backend, out), np_dict(backend, grads)


def run_python(code: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter (for process-global state such as JAX x64, or
    what a process does first); returns its stdout, failing the test with its stderr if it
    exits non-zero. ``env``: variables added to this process's environment."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def central_differences(f, params: dict, eps: float) -> dict:
    """Per parameter, the central differences ``(f(p + eps·e_i) − f(p − eps·e_i)) / 2eps`` of
    the scalar function ``f(params)`` (``params`` itself is not modified)."""
    out = {}
    for name, value in params.items():
        fd = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            hi, lo = dict(params), dict(params)
            hi[name], lo[name] = value.copy(), value.copy()
            hi[name][i] += eps
            lo[name][i] -= eps
            fd[i] = (f(hi) - f(lo)) / (2 * eps)
        out[name] = fd
    return out


def torch_results(outs: dict, leaves: dict, cots: dict) -> dict:
    """A torch reference's results as the layer parity tests compare them: ``"out|k"`` for
    each output ``outs[k]`` and ``"grad|k"`` for each leaf ``leaves[k]`` (inputs and
    parameters), the gradient of ``sum(outs[k] · cots[k])``."""
    import torch

    grads = torch.autograd.grad(list(outs.values()), list(leaves.values()),
                                [torch.as_tensor(cots[k]) for k in outs])
    res = {f"out|{k}": v.detach().numpy() for k, v in outs.items()}
    res.update({f"grad|{k}": v.numpy() for k, v in zip(leaves, grads)})
    return res


def assert_arrays_within(got: dict, want: dict, tol: float, label: str) -> float:
    """Both dicts hold the same keys and every array of ``got`` is within ``tol`` (max
    absolute difference) of ``want``'s; returns the largest difference."""
    assert set(got) == set(want), set(got) ^ set(want)
    errs = {k: float(np.abs(np.asarray(got[k]) - want[k]).max(initial=0.0)) for k in want}
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{label}: {bad}"
    return max(errs.values(), default=0.0)


#: the JAX column of a case table runs every JAX_EVERY-th case in the default suite and every
#: case under ``-m slow``: each case is an XLA compile (~1 s of CPU), the largest share of the
#: default suite, while the NumPy and torch columns (no compile) still run every case.
JAX_EVERY = 3


def jax_case_params(names: list[str], every: int = JAX_EVERY) -> list:
    """``names`` as parameters, all but every ``every``-th (from the first) marked slow."""
    return [n if i % every == 0 else pytest.param(n, marks=pytest.mark.slow)
            for i, n in enumerate(names)]


def selected_cases(request, argname: str, names: list[str]) -> list[str]:
    """The values of ``argname`` (among ``names``, in their order) of this module's selected
    tests that use the fixture asking: a module fixture computes only what will be read."""
    chosen = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is request.module and argname in params \
                and request.fixturename in getattr(item, "fixturenames", ()):
            chosen.add(params[argname])
    return [n for n in names if n in chosen]


@contextlib.contextmanager
def jax_float64():
    """float64 JAX for the duration of the block, leaving the process-global flag as it was
    (``JaxBackend(dtype="float64")`` turns it on for the whole process)."""
    import jax

    old = jax.config.jax_enable_x64
    try:
        with jax.enable_x64(True):
            yield
    finally:
        jax.config.update("jax_enable_x64", old)


def jax_float64_results(module: str, cases: str, run: str,
                        only: list[str] | None = None) -> dict:
    """``{case: {key: array}}`` of ``module.run(case, "jax")`` for every case of
    ``module.cases`` (or ``only``), computed in this process under :func:`jax_float64`.
    (It used to start an interpreter per module: ~4 CPU-s each, for the x64 flag alone.)"""
    import importlib

    t = importlib.import_module(module)
    out: dict[str, dict] = {}
    with jax_float64():
        for case in only if only is not None else getattr(t, cases):
            out[case] = {k: np.asarray(v) for k, v in getattr(t, run)(case, "jax").items()}
    return out


# ---------------------------------------------------------------------------------------------
# shared by the optimizer parity tests
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def optimizer_engine(kind: str):
    """``"jax-jit"``: the jitted JAX engine; ``"array..."``: every ``init`` gets the flat
    tensor-op ``ArrayEngine`` (torch's path on accelerators); anything else: as chosen."""
    import mithril.utils.optimizers.engines as engines
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine

    old_jax, old_for = engines.JAX_ENGINE, engines.engine_for
    if kind == "jax-jit":
        engines.JAX_ENGINE = "jit"
    if kind.startswith("array"):
        engines.engine_for = lambda backend, layout, *_: ArrayEngine(backend, layout)
    try:
        yield
    finally:
        engines.JAX_ENGINE, engines.engine_for = old_jax, old_for


def native(backend: str, a: np.ndarray):
    """A copy of ``a`` as an array of ``backend``, of the same dtype (a name that contains
    "torch", such as "torch-ops" or "array-torch", or starts with "jax")."""
    if "torch" in backend:
        import torch

        return torch.tensor(a)
    if backend.startswith("jax"):
        import jax.numpy as jnp

        return jnp.asarray(a)
    return np.array(a)


def host(x) -> np.ndarray:
    """A NumPy copy of a NumPy, torch or JAX array."""
    return x.detach().cpu().numpy().copy() if hasattr(x, "detach") else np.array(x)


def set_traced(opt, key: str, v: float) -> None:
    """Set the hyperparameter a traced program names ``key`` (a Muon's ``"fallback.beta1"``
    is its fallback's ``beta1``) as a user would: an attribute, or a group's through its
    handle (``lr_scale``: the group's learning rate over the optimizer's)."""
    from mithril.interop.optax_hyperparams import child, parse

    held = child(opt, key)
    target, key = held if held is not None else (opt, key)
    g, name = parse(key)
    if g is None:
        setattr(target, name, v)
    elif name == "lr_scale":
        target.hyperparameter("learning_rate", g).set(v * target.learning_rate)
    else:
        target.hyperparameter(name, g).set(v)


def shared_file(*parts: str) -> Path:
    """A file of ``../shared`` (beside the checkout, as CI has it; else the sessions'
    /work/shared). Missing, it is an error: the tests that read it must not vanish."""
    here = Path(__file__).resolve().parent.parent
    for root in (here.parent / "shared", Path("/work/shared")):
        if (root / Path(*parts)).exists():
            return root / Path(*parts)
    raise FileNotFoundError(f"../shared/{'/'.join(parts)} not found beside {here}")


def conv_relu_pool_model():
    """Convolution → ReLU → max-pool → flatten → Linear(5), on input [2, 3, 8, 8]: after the
    max-pool's VJP (a fresh array) the ReLU's VJP may write over its cotangent."""
    import mithril as ml

    m = ml.Model()
    m |= ml.Convolution2D(3, 4, padding=1)(input="input", output=ml.IOKey("c0", expose=False))
    m |= ml.Relu()(input="c0", output=ml.IOKey("r0", expose=False))
    m |= ml.MaxPool2D(2)(input="r0", output=ml.IOKey("p0", expose=False))
    m |= ml.Flatten()(input="p0", output=ml.IOKey("flat", expose=False))
    m |= ml.Linear(5)(input="flat", output="output")
    return m


# The parity tests record the largest error each check saw in their module's ``OBSERVED``
# dict. After the run the terminal summary prints the worst of each module, so the margins
# under the tolerances stay visible without a test that only prints. Under xdist each
# worker hands its dicts to the controller through ``workeroutput``.
_OBSERVED: dict[str, dict[str, float]] = {}


def _observed_here() -> dict[str, dict[str, float]]:
    by_dict: dict[int, str] = {}  # a dict imported by test modules: named after its helper
    here = str(Path(__file__).parent)
    for name, module in sorted(sys.modules.items()):
        observed = getattr(module, "OBSERVED", None)
        if (isinstance(observed, dict) and observed
                and (getattr(module, "__file__", None) or "").startswith(here)):
            if id(observed) not in by_dict or not name.startswith("test_"):
                by_dict[id(observed)] = name
    return {name: {str(k): float(v) for k, v in sys.modules[name].OBSERVED.items()}
            for name in by_dict.values()}


def _merge_observed(found: dict[str, dict[str, float]]) -> None:
    for name, observed in found.items():
        merged = _OBSERVED.setdefault(name, {})
        for k, v in observed.items():
            merged[k] = max(merged.get(k, 0.0), v)


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        workeroutput["observed"] = _observed_here()
        # A worker's heap ends at ~2M objects (JAX, torch, numba, hypothesis), where a full
        # collection takes 2-3 s on this machine, and pytest collects twice after the
        # worker reports it is done. execnet interrupts a worker still running 5 s after
        # the controller asks it to exit (a KeyboardInterrupt in whatever Python code runs,
        # often hypothesis's gc callback). Collect here, before the report, then freeze
        # what survives, so those later collections have nothing old to walk.
        gc.collect()
        gc.freeze()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _merge_observed(getattr(node, "workeroutput", {}).get("observed", {}))


def pytest_terminal_summary(terminalreporter):
    _merge_observed(_observed_here())
    if not _OBSERVED:
        return
    terminalreporter.section("largest parity errors observed (worst three of each module)")
    for name in sorted(_OBSERVED):
        worst = sorted(_OBSERVED[name].items(), key=lambda kv: -kv[1])[:3]
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst))


@pytest.fixture
def built(monkeypatch):
    """The CLI's training runs (``mithril.cli.training.Run``, their optimizers and states)
    built during a test, recorded in order."""
    from mithril.cli import training as training_mod

    runs: list = []
    init = training_mod.Run.__init__

    def record(self, *a, **kw):
        init(self, *a, **kw)
        runs.append(self)

    monkeypatch.setattr(training_mod.Run, "__init__", record)
    return runs
