"""The fast path of a step whose loss leaves some parameters out (``make_train_step`` on one
head of a two-head model: their gradients are left out of the update and their missed
steps counted, as ``torch.optim`` skips a ``.grad`` None): a two-head model trained in runs
of one head and alternately, side by side with torch.optim (Adam, AdamW, SGD momentum; one
AdamW with a param group and a learning rate set every step), float64 NumPy and torch, to
1e-13; bit for bit the full path and the rows made anew at every step; the recipe and the
own-count rows kept while the same parameters miss steps, made anew when that changes;
the incremental rows equal to those made from scratch under random missed counts; bad
gradients refused by name with nothing changed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.optimizers import SGD, Adam, AdamW
from mithril.utils.optimizers.engines import fast_step
from mithril.utils.optimizers.own_rows import own_count_rows
from mithril.utils.training import make_train_step

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend}
HEAD_B = ("linear_2.weight", "linear_2.bias")


def _lr(i: int) -> float:
    return 1e-2 * 0.95 ** i  # (the learning rate of step i where a test schedules it)


# name -> (ours, torch.optim's, whether the learning rate is set before every step)
OPTIMIZERS = {
    "adam": (lambda: Adam(learning_rate=1e-2),
             lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), False),
    "adamw": (lambda: AdamW(learning_rate=1e-2, weight_decay=0.1),
              lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), False),
    "sgd": (lambda: SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.1),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                      weight_decay=0.1), False),
    # head b a group of its own (half the rate, no decay), the rate scheduled every step
    "adamw_group": (
        lambda: AdamW(learning_rate=1e-2, weight_decay=0.1, param_groups=[
            {"params": "linear_2", "lr_scale": 0.5, "weight_decay": 0.0}]),
        lambda m: torch.optim.AdamW(
            [{"params": [*m.linear_0.parameters(), *m.linear_1.parameters()]},
             {"params": m.linear_2.parameters(), "lr": 5e-3, "weight_decay": 0.0}],
            lr=1e-2, weight_decay=0.1), True),
}
# runs of one head (the other's count grows, its rows kept), then alternation (the rows
# merge and split), then a run again
SCHEDULE = [*"aaaa", *"bbb", *"ababab", *"aaa"]


def two_heads() -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h0")
    m |= ml.Relu()(input="h0", output="h")
    m |= ml.Linear(1)(input="h", output="ya")
    m |= ml.Linear(2)(input="h", output="yb")
    m |= ml.MeanSquaredError()(input="ya", target="ta", output=ml.IOKey("loss_a"))
    m |= ml.MeanSquaredError()(input="yb", target="tb", output=ml.IOKey("loss_b"))
    return m


class TorchTwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_0, self.linear_1, self.linear_2 = (
            torch.nn.Linear(3, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 2))

    def loss(self, head: str, data: dict) -> torch.Tensor:
        h = torch.relu(self.linear_0(torch.from_numpy(data["input"])))
        lin, target = (self.linear_1, "ta") if head == "a" else (self.linear_2, "tb")
        return torch.nn.functional.mse_loss(lin(h), torch.from_numpy(data[target]))


def _host(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _batches(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((8, 3)), "ta": rng.standard_normal((8, 1)),
             "tb": rng.standard_normal((8, 2))} for _ in range(n)]


class _Counted:
    """Counts the updates ``fast_step.run`` took (not None)."""

    def __init__(self, monkeypatch):
        self.taken = 0
        run = fast_step.run

        def counted(*a):
            out = run(*a)
            self.taken += out is not None
            return out

        monkeypatch.setattr(fast_step, "run", counted)


def _train(backend: str, make_opt, schedule, scheduled=False, each_step=None):
    """``schedule``'s steps (head "a" or "b") on one state; ``each_step(i, state)`` before
    each. Returns the compiled model, the optimizer, the params and the state."""
    b = BACKENDS[backend](dtype="float64")
    c = ml.compile(two_heads(), b, shapes={"input": [8, 3]})
    opt = make_opt()
    steps = {h: make_train_step(c, opt, loss=f"loss_{h}") for h in "ab"}
    params = c.get_parameters()
    state = steps["a"].init(params)
    for i, (head, data) in enumerate(zip(schedule, _batches(len(schedule)), strict=True)):
        if scheduled:
            opt.learning_rate = _lr(i)
        if each_step is not None:
            each_step(i, state)
        params, state, _ = steps[head](params, state, {k: b.array(v) for k, v in data.items()})
    return c, opt, params, state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_two_heads_in_runs_and_alternately_as_torch_optim(monkeypatch, backend, opt):
    ours, theirs, scheduled = OPTIMIZERS[opt]
    counted = _Counted(monkeypatch)
    c, _, params, state = _train(backend, ours, SCHEDULE, scheduled)
    # the 1st step copies the params in, the 2nd makes the recipe: every later one takes it
    assert counted.taken == len(SCHEDULE) - 2
    module = TorchTwoHeads().double()
    init = c.get_parameters()
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(_host(init[n]).copy()))
    topt = theirs(module)
    for i, (head, data) in enumerate(zip(SCHEDULE, _batches(len(SCHEDULE)), strict=True)):
        if scheduled:
            for g, scale in zip(topt.param_groups, (1.0, 0.5), strict=True):
                g["lr"] = _lr(i) * scale
        topt.zero_grad()  # (set_to_none: the other head's .grad stays None)
        module.loss(head, data).backward()
        topt.step()
    worst = 0.0
    for n, p in module.named_parameters():
        diff = np.abs(_host(params[n]) - p.detach().numpy())
        worst = max(worst, float(diff.max()))
    assert worst <= 1e-13, worst
    if opt != "sgd":  # each parameter's own step count, as torch's state[p]["step"]
        mine = {n: len(SCHEDULE) - state.missed_counts().get(n, 0) for n in params}
        assert mine == {n: int(topt.state[p]["step"]) for n, p in module.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bit_for_bit_the_full_path_and_rows_made_anew(backend):
    """The fast path with its kept rows, the full path at every step, and the rows made
    from scratch at every step (what each step did before they were kept): equal bits."""
    make = OPTIMIZERS["adamw_group"][0]

    def full_path(i, state):
        state.fast, state.fast_waste = None, 99  # never made: the full path every step

    def rows_anew(i, state):
        state.own_rows = None

    runs = [_train(backend, make, SCHEDULE, True, each)[2:]
            for each in (None, full_path, rows_anew)]
    (p0, s0), *others = runs
    for p, s in others:
        assert s.missed_counts() == s0.missed_counts()
        for n in p0:
            np.testing.assert_array_equal(_host(p[n]), _host(p0[n]), err_msg=n)
        for k in s0.slots:
            np.testing.assert_array_equal(_host(s.slots[k]), _host(s0.slots[k]), err_msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recipe_and_rows_kept_while_the_same_parameters_miss(monkeypatch, backend):
    seen = []

    def record(i, state):
        own = state.own_rows
        views = None if own is None or own._views is None else list(own._views)
        seen.append((state.fast, own, None if own is None else own.index, views,
                     None if views is None else (own.rows[-1]["step_offset"],
                                                 views[-1]._step_offset)))

    _, _, _, state = _train(backend, lambda: Adam(learning_rate=1e-2), [*"aaaaaa", "b", "b"],
                            each_step=record)
    # steps 3-6 (indices 2-5): one recipe; head b's rows, their index and views kept (its
    # count raised in place): the row's offset is its missed count, before each step i
    fast, own, index, views, _ = seen[2]
    assert fast is not None and own is not None and views is not None
    for i, (f, o, x, v, offsets) in enumerate(seen[2:6], start=2):
        assert f is fast and o is own and x is index
        assert all(map(lambda a, b: a is b, v, views))
        assert offsets == (i, i)
    # step 7 (loss_b): head a misses its first step (the rows change: marked, and made
    # anew by step 8, head b's view reused for head a's row); the recipe stays
    assert seen[6][0] is fast and seen[6][1] is own and seen[7][0] is fast
    assert not own.current and state.own_rows is not own and state.own_rows.current
    assert any(v is views[-1] for v in state.own_rows._views)
    # the recipe read one partial gradient dict's keys per head
    assert len(fast.partial) == 2
    assert state.missed_counts() == {**dict.fromkeys(HEAD_B, 6), "linear_1.weight": 2,
                                     "linear_1.bias": 2}


def test_kept_rows_equal_rows_made_from_scratch():
    """Random missed counts on a state with groups (one with a ``step_offset``): after
    each ``note_missed`` the rows and views ``group_rows`` gives equal those made anew."""
    rng = np.random.default_rng(0)
    names = [f"p{i}" for i in range(9)]
    params = {n: np.zeros(2) for n in names}
    opt = AdamW(learning_rate=1e-2, param_groups=[
        {"params": ["p0", "p1", "p2"], "lr_scale": 0.5},
        {"params": ["p3", "p4"], "weight_decay": 0.0, "step_offset": 2}])
    state = opt.init(params)
    state.step = 400
    kept, last = 0, ["p0"]
    for k in range(300):
        if rng.random() < 0.4:  # another set (else the same again: the rows may stay)
            last = list(rng.choice(names, size=int(rng.integers(1, 5)), replace=False))
        if k % 7 == 6:  # a new learning rate: the views take it
            opt.learning_rate = 1e-2 * (k + 1)
        before = state.own_rows
        state.note_missed(last)
        index, views = opt.group_rows(state)
        kept += state.own_rows is before
        base = state.groups
        want_index, want_rows = own_count_rows(base[1], base[2], state.missed)
        np.testing.assert_array_equal(index, want_index)
        assert state.own_rows.rows == want_rows
        fresh = [opt.row_view(dict(r)) if r else opt for r in want_rows]
        assert [v.__dict__ for v in views] == [f.__dict__ for f in fresh]
    assert kept > 30  # (the incremental path was taken, not only the rows made anew)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_partial_gradients_refused_by_name_and_nothing_changes(backend):
    c, opt, params, state = _train(backend, lambda: Adam(learning_rate=1e-2), [*"aaaa"])
    assert state.fast is not None
    b = c.backend
    g = {n: b.array(np.ones(tuple(p.shape))) for n, p in params.items() if n not in HEAD_B}
    snap = ({n: _host(p).copy() for n, p in params.items()}, state.step,
            state.missed_counts(), {k: _host(v).copy() for k, v in state.slots.items()})
    bad_shape = {**g, "linear_0.bias": b.array(np.ones(5))}
    with pytest.raises(ShapeError, match=r"gradients\['linear_0.bias'\] has shape"):
        opt.update(params, bad_shape, state)
    ones32 = np.ones(4, np.float32)
    bad_dtype = {**g, "linear_0.bias": torch.from_numpy(ones32) if backend == "torch"
                 else ones32}
    with pytest.raises(TypeError, match=r"gradients\['linear_0.bias'\] has dtype"):
        opt.update(params, bad_dtype, state)
    with pytest.raises(KeyMismatchError, match="linear_9"):
        opt.update(params, {**g, "linear_9.bias": g["linear_0.bias"]}, state)
    assert state.step == snap[1] and state.missed_counts() == snap[2]
    for n, p in params.items():
        np.testing.assert_array_equal(_host(p), snap[0][n])
    for k, v in state.slots.items():
        np.testing.assert_array_equal(_host(v), snap[3][k])
    # the same partial dict, well formed: taken by the recipe, head b untouched
    new, state = opt.update(params, g, state)
    assert state.step == snap[1] + 1
    for n in HEAD_B:
        np.testing.assert_array_equal(_host(new[n]), snap[0][n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_partial_sets_bit_for_bit_the_full_path(backend):
    """``update`` given a different set of gradients at every step (each set once, then
    again): the recipe scans the first eight sets, the others take the full path; the
    results equal those of the full path at every step, bit for bit."""
    rng = np.random.default_rng(5)
    shapes = {f"p{i}": (3, i + 1) for i in range(6)}
    p0 = {n: rng.standard_normal(s) for n, s in shapes.items()}
    sets = [list(c) for c in itertools.combinations(shapes, 4)][:12] * 2  # (12 sets, twice)
    grads = [{n: rng.standard_normal(shapes[n]) for n in keys} for keys in sets]
    if backend == "torch":
        p0 = {n: torch.from_numpy(v) for n, v in p0.items()}
        grads = [{n: torch.from_numpy(v) for n, v in g.items()} for g in grads]
    runs = []
    for fast in (True, False):
        opt = AdamW(learning_rate=1e-2, weight_decay=0.1)
        p = {n: v.clone() if backend == "torch" else v.copy() for n, v in p0.items()}
        s = opt.init(p)
        for g in grads:
            if not fast:
                s.fast, s.fast_waste = None, 99
            p, s = opt.update(p, g, s)
            s.note_missed([n for n in shapes if n not in g])
        runs.append((p, s))
    (p, s), (q, t) = runs
    assert len(s.fast.partial) == 8 and s.missed_counts() == t.missed_counts()
    for n in shapes:
        np.testing.assert_array_equal(_host(p[n]), _host(q[n]), err_msg=n)
    for k in s.slots:
        np.testing.assert_array_equal(_host(s.slots[k]), _host(t.slots[k]), err_msg=k)
