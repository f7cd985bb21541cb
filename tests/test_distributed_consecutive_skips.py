"""``DataParallel`` with ``nonfinite="skip", max_consecutive_skips=N`` gives up at the same
step as the wrapped optimizer alone and as optax's ``apply_if_finite(inner,
max_consecutive_errors=N)`` on the mean gradients, on every rank, in both modes, and its
count (``state.consecutive_skips``) survives ``save_sharded`` / ``load_sharded``.

Before, the sharded step skipped a non-finite gradient forever (the count stayed 0 there:
its early skip never counted it), so from the 3rd step of a run of 4 on, the params were
those of the steps before (finite) where optax's and one process's hold NaN, and
``num_skipped`` was 7 where theirs is 5 (+2 applied). Two gloo ranks run this file as the
worker (``python tests/test_distributed_consecutive_skips.py RANK WORLD INIT_FILE OUT
FOLDER``; ``@pytest.mark.slow``); the world-size-1 tests run here.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mithril.distributed import DataParallel, load_sharded, save_sharded  # noqa: E402
from mithril.errors import CheckpointError  # noqa: E402
from mithril.utils.optimizers import SGD, Adam  # noqa: E402

N, LR = 2, 0.05
SHAPES = {"a": (3, 4), "b": (5,), "c": (2,)}  # sharded over 2: a on rank 0, b and c on 1
#: per step: "f" finite, "a" a NaN in rank 1's gradient of a, "b" +inf in rank 0's of b.
#: Runs of 1 and 2 non-finite steps (skipped), of 4 (the 3rd and 4th applied: a NaN in a
#: from then on), then finite gradients (NaN results: counted on, applied)
PATTERN = ["f", "f", "a", "f", "b", "ab", "f", "f", "a", "b", "a", "a", "f", "f"]
GIVE_UP = 10  # (0-based) the first step applied anyway
CUT = 10  # saved before this step: 2 in a row, at the limit
ROW = "non-finite steps in a row"


def init_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.normal(size=s) for n, s in SHAPES.items()}


def rank_grads(t: int, rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * t + rank)
    g = {n: rng.normal(size=s) for n, s in SHAPES.items()}
    if "a" in PATTERN[t] and rank == 1:
        g["a"][1, 2] = np.nan
    if "b" in PATTERN[t] and rank == 0:
        g["b"][0] = np.inf
    return g


def mean_grads(t: int) -> dict[str, np.ndarray]:
    g0, g1 = rank_grads(t, 0), rank_grads(t, 1)
    return {n: (g0[n] + g1[n]) / 2 for n in SHAPES}


def make() -> Adam:
    return Adam(LR, beta1=0.9, beta2=0.99, epsilon=1e-8, nonfinite="skip",
                max_consecutive_skips=N)


def flat(p: dict[str, Any]) -> list[float]:
    return np.concatenate([np.asarray(p[n]).ravel() for n in SHAPES]).tolist()


def run(update: Any, p: dict, st: Any, steps: range, grads: Any) -> tuple[list, dict, Any]:
    """Per step: the params, the counters and the warnings of giving up."""
    rows = []
    for t in steps:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            p, st = update(p, grads(t), st)
        rows.append([flat(p), st.consecutive_skips, st.num_skipped, st.num_nonfinite,
                     st.step, bool(st.last_step_skipped),
                     [str(w.message) for w in seen if ROW in str(w.message)]])
    return rows, p, st


def make_clipped() -> SGD:
    """Global-norm clipping: the inf of a step given up scales every gradient by 0."""
    return SGD(LR, momentum=0.9, clip_norm=0.5, nonfinite="skip", max_consecutive_skips=1)


def alone(make: Any = make) -> list:
    """The wrapped optimizer alone on the mean gradients (one process)."""
    opt = make()
    p = init_params()
    return run(opt.update, p, opt.init(p), range(len(PATTERN)), mean_grads)[0]


def optax_reference() -> list:
    import jax

    with jax.enable_x64(True):  # thread-local: the worker's other tests stay float32
        return _optax_rows()


def _optax_rows() -> list:
    import jax.numpy as jnp
    import optax

    tx = optax.apply_if_finite(optax.adam(LR, b1=0.9, b2=0.99, eps=1e-8), N)
    ps = {n: jnp.asarray(a) for n, a in init_params().items()}
    s = tx.init(ps)
    rows = []
    for t in range(len(PATTERN)):
        u, s = tx.update({n: jnp.asarray(a) for n, a in mean_grads(t).items()}, s, ps)
        ps = optax.apply_updates(ps, u)
        rows.append([flat({n: np.asarray(a) for n, a in ps.items()}), int(s.notfinite_count),
                     int(s.total_notfinite), int(s.inner_state[0].count)])
    return rows


def same(a: list, b: list, tol: float) -> None:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=tol)


def check_rows(got: list, want: list, what: str, tol: float = 0.0) -> None:
    """``got`` (a DataParallel's rows) equal the wrapped optimizer's alone: params bit for
    bit (``tol``), every counter, the same warnings at the same steps."""
    assert len(got) == len(want), what
    for t, (g, w) in enumerate(zip(got, want)):
        same(g[0], w[0], tol)
        assert g[1:] == w[1:], (what, t, g[1:], w[1:])


# -- one process (fast) ------------------------------------------------------------------

def test_the_reference_itself() -> None:
    """One process vs optax ``apply_if_finite`` on the mean gradients (float64, 1e-12):
    runs of 1 and 2 skipped, the 3rd and 4th of 4 applied (warned), then (optax looking at
    gradients only) optax's count back to 0 where ours counts the NaN results on."""
    ours, ref = alone(), optax_reference()
    for t, (o, r) in enumerate(zip(ours, ref)):
        same(o[0], r[0], 1e-12)
        assert o[4] == r[3], t  # the inner count: a skipped step leaves it
        if t <= GIVE_UP + 1:
            assert (o[1], o[2] + o[3]) == (r[1], r[2]), t
    assert [o[1] for o in ours] == [0, 0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6]
    assert [r[1] for r in ref][-2:] == [0, 0]
    assert [o[6] for o in ours][GIVE_UP:] == [
        [f"Adam: {k} {ROW} (max_consecutive_skips=2): step {s} applied"]
        for k, s in ((3, 6), (4, 7), (5, 8), (6, 9))]
    assert not any(o[6] for o in ours[:GIVE_UP])


@pytest.mark.parametrize("shard", [False, True])
def test_world_one_equals_the_optimizer_alone(shard) -> None:
    dp = DataParallel(make(), shard_state=shard)
    p = init_params()
    rows = run(dp.update, p, dp.init(p), range(len(PATTERN)), mean_grads)[0]
    check_rows(rows, alone(), f"world 1 shard={shard}")


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_sharded_clip_of_an_applied_inf_gradient_as_one_process_and_torch(name) -> None:
    """``clip_norm`` with an inf gradient applied (``"propagate"``): one process and torch's
    ``clip_grad_norm_`` scale every gradient by ``c / (inf + 1e-6) = 0`` (the inf element
    becomes NaN, the others no step of their own). The sharded step skipped clipping when the
    norm was not finite: the finite gradients applied unclipped (SGD: ``a[1]`` -0.2321 where
    both have -0.1321) and -inf for NaN. A NaN norm scales by ``min(1, NaN) = 1`` in one
    process (torch: NaN everywhere), and so sharded."""
    import torch

    ours, theirs = {"SGD": (SGD, torch.optim.SGD), "Adam": (Adam, torch.optim.Adam)}[name]
    rng = np.random.default_rng(0)
    p0 = {"a": rng.normal(size=3), "b": rng.normal(size=2)}
    for bad in (np.inf, np.nan):
        g = {"a": np.array([bad, 1.0, 2.0]), "b": np.array([0.5, -0.5])}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt = ours(0.1, clip_norm=1.0)
            one = opt.update(dict(p0), g, opt.init(dict(p0)))[0]
            dp = DataParallel(ours(0.1, clip_norm=1.0), shard_state=True)
            got, st = dp.update(dict(p0), g, dp.init(dict(p0)))
        def cat(q: dict) -> list:
            return np.concatenate([np.asarray(q[n]).ravel() for n in "ab"]).tolist()

        np.testing.assert_array_equal(cat(got), cat(one))
        assert st.num_nonfinite == 1
        if bad == np.inf:
            x = [torch.nn.Parameter(torch.tensor(p0[n])) for n in "ab"]
            topt = theirs(x, lr=0.1)
            for q, n in zip(x, "ab"):
                q.grad = torch.tensor(g[n])
            torch.nn.utils.clip_grad_norm_(x, 1.0)
            topt.step()
            same(cat(got), cat({n: q.detach().numpy() for n, q in zip("ab", x)}), 1e-12)


def test_a_bad_saved_count_is_refused(tmp_path) -> None:
    """A checkpoint whose ``consecutive_skips`` is not an int >= 0: a CheckpointError
    naming it, nothing of ``dp`` changed."""
    from mithril.utils.checkpoint_io import read_file, write_file

    dp = DataParallel(make(), shard_state=True)
    p = init_params()
    st = dp.init(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(3):
            p, st = dp.update(p, mean_grads(t), st)
    path = save_sharded(tmp_path, p, dp, st)
    assert load_sharded(tmp_path, dp)[1].consecutive_skips == 1
    text, tensors = read_file(path)
    for bad in (-1, 1.5, "2"):
        write_file(path, json.dumps({**json.loads(text), "consecutive_skips": bad}), tensors)
        with pytest.raises(CheckpointError, match="'consecutive_skips' must be an int >= 0"):
            load_sharded(tmp_path, dp)
    meta = json.loads(text)
    del meta["consecutive_skips"]  # (a checkpoint from before it was kept: 0)
    write_file(path, json.dumps(meta), tensors)
    assert load_sharded(tmp_path, dp)[1].consecutive_skips == 0


# -- two processes (slow) ------------------------------------------------------------------

def _worker(rank: int, world: int, init: str, out: str, folder: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    res: dict[str, Any] = {}
    for shard in (False, True):
        dp = DataParallel(make(), shard_state=shard)
        p = init_params()
        st = dp.init(p)
        where = os.path.join(folder, f"ckpt-{shard}")
        head, p, st = run(dp.update, p, st, range(CUT), lambda t: rank_grads(t, rank))
        save_sharded(where, p, dp, st)
        tail = run(dp.update, p, st, range(CUT, len(PATTERN)),
                   lambda t: rank_grads(t, rank))[0]
        dp = DataParallel(make(), shard_state=shard)
        p, st = load_sharded(where, dp)
        res[f"loaded/{shard}"] = st.consecutive_skips
        res[f"resumed/{shard}"] = run(dp.update, p, st, range(CUT, len(PATTERN)),
                                      lambda t: rank_grads(t, rank))[0]
        res[f"rows/{shard}"] = head + tail
        res[f"owned/{shard}"] = list(st.owned)
        dp = DataParallel(make_clipped(), shard_state=shard)
        p = init_params()
        res[f"clipped/{shard}"] = run(dp.update, p, dp.init(p), range(len(PATTERN)),
                                      lambda t: rank_grads(t, rank))[0]
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], str]:
    sys.path.insert(0, os.path.dirname(__file__))
    from test_distributed import run_ranks

    folder = str(tmp_path_factory.mktemp("consecutive"))
    out, init = os.path.join(folder, "out"), os.path.join(folder, "init")
    results, logs = run_ranks(lambda r: [__file__, str(r), "2", init, out, folder], out, 2,
                              240, 30, "consecutive skips")
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"rank {r} wrote nothing:\n{logs[r].decode()[-3000:]}")
    return results, folder


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_two_ranks_give_up_as_one_process_and_optax(two_ranks, shard) -> None:
    """Every rank: the params bit for bit those of the optimizer alone on the mean
    gradients (so optax's to 1e-12: :func:`test_the_reference_itself`), the same counts and
    the same warnings at the same steps; the NaN of the run of 4 comes from rank 1's
    gradient of ``a``, held (sharded) by rank 0, the inf from rank 0's of ``b``, held by
    rank 1."""
    results, _ = two_ranks
    want = alone()
    if shard:
        assert [res["owned/True"] for res in results] == [["a"], ["b", "c"]]
    for r, res in enumerate(results):
        check_rows(res[f"rows/{shard}"], want, f"rank {r} shard={shard}")
    ref = optax_reference()
    same(results[0][f"rows/{shard}"][GIVE_UP][0], ref[GIVE_UP][0], 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_two_ranks_clip_steps_given_up_as_one_process(two_ranks, shard) -> None:
    """SGD with momentum and ``clip_norm``, ``max_consecutive_skips=1``: the steps given up
    with an inf gradient (held by rank 1) clip as one process does (every gradient scaled
    by 0); before, sharded, they applied the finite gradients unclipped (0.07 off at the
    first, growing)."""
    results, _ = two_ranks
    want = alone(make_clipped)
    assert sum(bool(w[6]) for w in want) >= 4  # (steps given up, inf ones among them)
    for r, res in enumerate(results):
        check_rows(res[f"clipped/{shard}"], want, f"rank {r} shard={shard}", tol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_the_count_survives_a_sharded_checkpoint(two_ranks, shard) -> None:
    """Saved after the run of 4's first 2 skips (count 2, at the limit): loaded on 2 ranks
    the next step is applied (warned) as in the unbroken run; loaded on 1 process, too."""
    results, folder = two_ranks
    want = alone()
    for r, res in enumerate(results):
        assert res[f"loaded/{shard}"] == N
        check_rows(res[f"resumed/{shard}"], want[CUT:], f"rank {r} resumed shard={shard}")
    dp = DataParallel(make(), shard_state=shard)
    p, st = load_sharded(os.path.join(folder, f"ckpt-{shard}"), dp)
    assert st.consecutive_skips == N and st.step == want[CUT - 1][4]
    rows = run(dp.update, p, st, range(CUT, len(PATTERN)), mean_grads)[0]
    check_rows(rows, want[CUT:], f"2 -> 1 shard={shard}")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
