"""``mithril cache warm`` / :func:`mithril.utils.cache.warm`: the kernels of an optimizer
configuration compiled ahead of a run, so that a later process (another model, another
shape) compiles none on its first steps; bad use refused before any process starts or any
file is written, and the optimizer given left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mithril.cli import cache_warm
from mithril.cli.main import main
from mithril.utils import cache
from mithril.utils.optimizers import SGD, Adam

#: a run of its own: another MLP than warm's (other widths, classes and batch), its first
#: steps through make_train_step and through evaluate + update; prints the kernels this
#: process compiled for the first time on the machine and the last loss
RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mithril as ml
    from mithril import backends
    from mithril.utils.optimizers import SGD, Adam
    from mithril.utils.optimizers.engines import kernel_cache
    from mithril.utils.training import make_train_step

    be = getattr(backends, sys.argv[1])(dtype="float32", seed=3)
    opt = Adam(learning_rate=1e-2) if sys.argv[2] == "adam" else \\
        SGD(learning_rate=0.1, momentum=0.9)
    model = ml.Model()
    model |= ml.MLP(["relu", "relu", None], [32, 24, 5])(input="input", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    c = ml.compile(model, be, shapes={"input": [None, 12]})
    rng = np.random.default_rng(1)
    data = {"input": be.array(rng.standard_normal((10, 12)).astype("float32")),
            "target": be.array(rng.integers(0, 5, 10), be.int_dtype)}
    step = make_train_step(c, opt, loss="loss")
    for init in (step.init, opt.init):
        p = c.get_parameters()
        s = init(p)
        for _ in range(3):
            p, s, out = step(p, s, data)
    print(json.dumps({"new": kernel_cache.stats()["new"],
                      "loss": float(be.to_numpy(out["loss"]))}))
""")


def _env(folder) -> dict[str, str]:
    return {**os.environ, "MITHRIL_CACHE_DIR": str(folder), "MITHRIL_JAX_CACHE": "0"}


def _run(folder, backend: str, optimizer: str) -> dict:
    got = subprocess.run([sys.executable, "-c", RUN, backend, optimizer], env=_env(folder),
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    return json.loads(got.stdout.strip().splitlines()[-1])


def _warm(folder, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mithril", "cache", "warm", *argv],
                          env=_env(folder), capture_output=True, text=True, timeout=600)


def test_a_warmed_configuration_compiles_nothing_in_a_later_run(tmp_path):
    folder = tmp_path / "cache"
    got = _warm(folder, "sgd:momentum=0.9", "adam", "--backend", "numpy", "jax", "--jobs", "2")
    assert got.returncode == 0, got.stderr[-3000:]
    lines = got.stdout.strip().splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [  # (in the order of the pairs)
        "sgd:momentum=0.9 on numpy (float32)", "sgd:momentum=0.9 on jax (float32)",
        "adam on numpy (float32)", "adam on jax (float32)"]
    assert all("loaded from the cache (" in ln for ln in lines)
    compiled = [int(ln.split(": ")[1].split()[0]) for ln in lines]
    assert compiled[0] > 0 and compiled[1] > 0  # (the first ever on this folder)

    # another model in a new process: every kernel from the cache, on both paths
    for backend, opt in (("NumpyBackend", "sgd"), ("JaxBackend", "adam")):
        run = _run(folder, backend, opt)
        assert run["new"] == 0, (backend, opt)
        assert np.isfinite(run["loss"])

    again = _warm(folder, "adam", "--backend", "numpy")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith("adam on numpy (float32): 0 kernels compiled, ")


def test_a_run_not_warmed_compiles_its_kernels(tmp_path):
    """The control of the test above: the same run in a fresh folder compiles them."""
    run = _run(tmp_path / "cache", "JaxBackend", "sgd")
    assert run["new"] > 0


def test_warm_leaves_the_optimizer_as_it_was():
    opt = SGD(learning_rate=0.1, momentum=0.9)
    got = cache.warm(opt, "jax")
    assert set(got) == {"compiled", "loaded", "seconds"} and got["seconds"] > 0
    # still unbound: it then drives NumPy arrays (a JAX-bound optimizer would refuse them)
    p = {"w": np.ones(3, np.float32)}
    state = opt.init(p)
    new, _ = opt.update(p, {"w": np.full(3, 2.0, np.float32)}, state)
    np.testing.assert_array_equal(new["w"], np.full(3, 0.8, np.float32))
    # now bound to NumPy: warmed there, refused elsewhere (before anything runs)
    assert cache.warm(opt, "numpy")["seconds"] > 0
    with pytest.raises(ValueError, match="this SGD works on numpy arrays .* give a new "
                                         "optimizer for 'jax'"):
        cache.warm(opt, "jax")
    again, _ = opt.update(new, {"w": np.full(3, 2.0, np.float32)}, state)
    np.testing.assert_allclose(again["w"], np.full(3, 0.42, np.float32), rtol=1e-6)


def test_bad_use_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path / "cache"))
    refused = [
        (["cache", "warm", "nope"], "unknown optimizer 'nope'"),
        (["cache", "warm", "adam:beta9=1"], "unknown setting 'beta9'"),
        (["cache", "warm", "adam:lr=-1"], "invalid hyperparameter for adam"),
        (["cache", "warm", "lbfgs"], "optimizer lbfgs is not supported"),
        (["cache", "warm", "--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["cache", "warm", "--jax"], "--kernels and --jax choose what"),
        (["cache", "clear", "adam"], "OPTIMIZER: for `mithril cache warm` only"),
        (["cache", "info", "--backend", "jax"], "--backend: for `mithril cache warm` only"),
    ]
    for argv, message in refused:
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
        assert status == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["cache", "warm", "--backend", "mlx"])  # (argparse's choices)
    assert "invalid choice: 'mlx'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing compiled, nothing written
    with pytest.raises(ValueError, match="backend must be one of numpy, torch, jax, got 'mlx'"):
        cache.warm(Adam(), "mlx")
    with pytest.raises(TypeError, match="optimizer must be a mithril optimizer, got str"):
        cache.warm("adam")
    assert not (tmp_path / "cache").exists()


def test_an_unwritable_cache_folder_is_refused(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(blocked))
    with pytest.raises(SystemExit) as info:
        main(["cache", "warm", "sgd", "--backend", "numpy"])
    assert info.value.code == 2
    assert f"the kernel cache folder {blocked / 'kernels'} cannot be written" in \
        capsys.readouterr().err
    with pytest.raises(OSError, match="nothing compiled would be kept"):
        cache.warm(SGD(learning_rate=0.1), "numpy")
    assert blocked.read_text() == "not a folder"


def test_a_failed_configuration_is_reported_and_the_status_is_1(capsys):
    ok = cache_warm._report(("adam", "jax"), "float32", 0,
                            'noise\n{"compiled": 1, "loaded": 2, "seconds": 1.25}\n', "")
    bad = cache_warm._report(("sm3", "torch"), "float64", 1, "",
                             "Traceback\n  File y\n  File x\nValueError: the reason\n")
    assert ok and not bad
    out, err = capsys.readouterr()
    assert out == "adam on jax (float32): 1 kernel compiled, 2 loaded from the cache (1.2 s)\n"
    assert err == "sm3 on torch (float64): failed\n  File y\n  File x\nValueError: the reason\n"
