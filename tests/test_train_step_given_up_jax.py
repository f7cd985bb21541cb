"""The one-program JAX step warns of a step applied after ``max_consecutive_skips=N``
non-finite ones in a row, as ``optimizer.update`` does (``"Adam: 3 non-finite steps in a
row (max_consecutive_skips=2): step 2 applied"``).

Before, the separate calls warned of each such step and the program of none (it counted
the skips, and warned of those, but a step it applied anyway left no trace but the NaN
params). The program now counts them in the donated state (``hyperparams["num_given_up"]``,
an int32: nothing read back per step) and a later call warns of them once the device has
the count, in ``update``'s words for a single one.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

pytest.importorskip("jax")

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.utils.optimizers import Adam  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402

N = 2
GOOD = {"input": np.ones((4, 3), np.float32), "target": np.zeros((4, 2), np.float32)}
BAD = {"input": np.full((4, 3), np.inf, np.float32), "target": GOOD["target"]}
#: 2 skipped, the 3rd and 4th applied (NaN params), then finite gradients on NaN params
#: (NaN results: the run goes on, applied)
BATCHES = [GOOD, BAD, BAD, BAD, BAD, GOOD, GOOD]
ROW = re.compile(r"non-finite steps in a row|steps applied after")


def _step(fused: bool) -> tuple:
    b = JaxBackend()
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    c = ml.compile(m, b, shapes={"input": [None, 3]})
    step = make_train_step(c, Adam(1e-2, nonfinite="skip", max_consecutive_skips=N),
                           loss="loss")
    p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
         for k, v in c.get_parameters().items()}
    return b, step, p, (step.init(p) if fused else step.optimizer.init(p))


def _warned(step, p, s, b, batches, wait: bool = True) -> tuple[list[list[str]], object]:
    import jax

    out = []
    for d in batches:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            p, s, _ = step(p, s, {k: b.array(v) for k, v in d.items()})
        if wait:
            jax.block_until_ready(s)
        out.append([str(x.message) for x in w if ROW.search(str(x.message))])
        if not hasattr(s, "layout"):  # the program's (at the caller's line)
            assert all(x.filename == __file__ for x in w if ROW.search(str(x.message)))
    return out, (p, s)


def test_fused_step_warns_as_update_a_call_later() -> None:
    b, step, p, s = _step(False)
    plain, _ = _warned(step, p, s, b, BATCHES)
    b, step, p, s = _step(True)
    assert step.fused and int(s.hyperparams["num_given_up"]) == 0
    fused, (p, s) = _warned(step, p, s, b, BATCHES + [GOOD])
    want = [[f"Adam: {k} non-finite steps in a row (max_consecutive_skips=2): step {t} applied"]
            for k, t in ((3, 2), (4, 3), (5, 4), (6, 5))]
    assert plain == [[], [], []] + want
    assert fused == [[], [], [], []] + want  # (each read at the next call)
    assert int(s.hyperparams["num_given_up"]) == 5


def test_several_given_up_between_reads_are_one_warning() -> None:
    """A loop the host does not wait for reads the counts when the device has them: the
    steps given up since the last read are one warning, counted (every step warned once,
    whichever the reads)."""
    import jax
    import jax.numpy as jnp

    from mithril.utils.train_step_jax import report_skips

    b, step, p, s = _step(True)
    _, (p, s) = _warned(step, p, s, b, BATCHES[:3])  # 2 skipped, read
    got, (p, s) = _warned(step, p, s, b, [BAD, BAD, GOOD], wait=False)
    jax.block_until_ready(s)
    late, (p, s) = _warned(step, p, s, b, [GOOD])
    seen = [m for w in got + late for m in w]
    assert sum(int(re.search(r"(\d+) steps applied after", m).group(1))
               if "applied after" in m else 1 for m in seen) == 3, seen
    # reads missed (not ready then): the next one finds 3 more given up since the last
    assert step._skips_seen == (2, 3, True)  # (the run at the limit: read on)
    held = {**s.hyperparams, "num_given_up": jnp.asarray(6, jnp.int32),
            "consecutive_skips": jnp.asarray(8, jnp.int32)}
    step._returned_state = s = s._replace(hyperparams=held, count=jnp.asarray(7, jnp.int32))
    with pytest.warns(RuntimeWarning) as w:
        report_skips(step, s)
    assert [str(x.message) for x in w] == [
        "Adam: 3 steps applied after 2 or more non-finite steps in a row (max_consecutive_"
        "skips=2); params may now be non-finite (6 in all; 8 non-finite steps in a row at "
        "step 7)"]


def test_a_resumed_state_starts_counting_there() -> None:
    """Through ``to_optimizer_state`` / ``from_optimizer_state`` in the middle of the run
    (2 in a row): the next step is given up and warned of, as without the round trip."""
    b, step, p, s = _step(True)
    _, (p, s) = _warned(step, p, s, b, BATCHES[:3])
    s = step.from_optimizer_state(step.to_optimizer_state(s, p))
    assert int(s.hyperparams["consecutive_skips"]) == N
    got, _ = _warned(step, p, s, b, [BAD, GOOD])
    assert got == [[], ["Adam: 3 non-finite steps in a row (max_consecutive_skips=2): "
                        "step 2 applied"]]


def test_no_counter_without_a_limit() -> None:
    b = JaxBackend()
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    c = ml.compile(m, b, shapes={"input": [None, 3]})
    step = make_train_step(c, Adam(1e-2, nonfinite="skip"), loss="loss")
    s = step.init({k: b.array(np.zeros(tuple(v.shape), np.float32))
                   for k, v in c.get_parameters().items()})
    assert "num_given_up" not in s.hyperparams and "num_skipped" in s.hyperparams


_MESH = r"""
import json, warnings
import numpy as np
import jax
import mithril as ml
from mithril.backends import JaxBackend
from mithril.distributed.jax_parallel import make_sharded_train_step
from mithril.utils.optimizers import Adam

assert jax.device_count() == 2
good = {"input": np.ones((4, 3), np.float32), "target": np.zeros((4, 2), np.float32)}
bad = {"input": np.full((4, 3), np.inf, np.float32), "target": good["target"]}
b = JaxBackend()
m = ml.Model()
m |= ml.Linear(2)(input="input", output="out")
m |= ml.SquaredError()(input="out", target="target", output="se")
m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
c = ml.compile(m, b, shapes={"input": [None, 3]})
out = {}
for shard in (False, True):
    step = make_sharded_train_step(c, Adam(1e-2, nonfinite="skip", max_consecutive_skips=2),
                                   loss="loss", devices=2, shard_state=shard)
    p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
         for k, v in c.get_parameters().items()}
    s = step.init(p)
    rows = []
    for d in [good, bad, bad, bad, bad, good, good, good]:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            p, s, _ = step(p, s, {k: b.array(v) for k, v in d.items()})
        jax.block_until_ready(s)
        rows.append([str(x.message) for x in w if "in a row" in str(x.message)])
    st = step.to_optimizer_state(s, p)
    out[str(shard)] = [rows, [st.step, st.num_skipped, st.consecutive_skips],
                       bool(step.last_batch_sharded),
                       np.concatenate([np.asarray(p[k]).ravel() for k in sorted(p)]).tolist()]
print(json.dumps(out))
"""


def test_two_device_mesh_warns_alike() -> None:
    """``make_sharded_train_step`` on a 2-device mesh (replicated and sharded state): the
    same warnings at the same calls as the one-device program, once each (not per device),
    and the params (NaN where they are NaN) and counts of the separate calls."""
    import json

    from conftest import run_python

    b, step, p, s = _step(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for d in BATCHES + [GOOD]:
            p, s, _ = step(p, s, {k: b.array(v) for k, v in d.items()})
    got = json.loads(run_python(_MESH, timeout=300, env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}).strip().splitlines()[-1])
    want = [[f"Adam: {k} non-finite steps in a row (max_consecutive_skips=2): step {t} applied"]
            for k, t in ((3, 2), (4, 3), (5, 4), (6, 5))]
    flat = np.concatenate([np.asarray(p[k]).ravel() for k in sorted(p)])
    for shard, (rows, counts, split, params) in got.items():
        np.testing.assert_allclose(np.array(params, dtype=np.float64), flat, rtol=1e-6,
                                   atol=1e-7, equal_nan=True, err_msg=shard)
        assert split, shard  # (the batch of 4 over the 2 devices)
        assert rows == [[], [], [], []] + want, shard
        assert counts == [s.step, s.num_skipped, s.consecutive_skips] == [6, 2, 7], shard
