"""The rows of the scalar table for parameters that count their own steps.

A state's ``missed`` counts (:meth:`~.state.OptimizerState.note_missed`: the applied steps
a parameter had no gradient at, torch.optim's per-parameter ``step``) give each distinct
(group row, missed count) pair of a tensor that missed steps a row of its own: the group's
values with ``step_offset`` raised by the count (:func:`own_count_rows`), so that its rules
count ``t − step_offset − missed`` while the kernels still read one row per tensor.

In a training loop where the same parameters miss step after step (the other head of a
two-head model, a parameter no loss uses) the counts change at every step, but which
tensors share a row does not: :class:`OwnRows` keeps the rows and their optimizer views
(copies of the optimizer, one per row) between steps, and a step that all of a row's
tensors missed only raises that row's ``step_offset`` by one (:meth:`OwnRows.bump`) - the
rows and views :func:`own_count_rows` would make anew, without making them. Only a step
that changes which tensors share a row (a tensor's first missed step, a row that splits
or merges with another) makes them anew, reusing the views it can (their
``_step_offset`` set again). The views are kept while the optimizer's attributes stay
what they were; a new learning rate (a scheduler's, every step) is set in them as
``row_view`` sets it (a group's ``lr_scale`` times it, a pinned rate kept), any other
change makes them anew. The views are the state's: a caller reads them during the step,
and does not keep them (the next steps change their offsets and rates in place).

The results are those of rows made anew at every step, bit for bit (the same rows in the
same order, views with the same attributes): ``tests/test_unreached_fast_path.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the most views of a group row's own rows kept unused (for rows that split again)
_SPARE = 4

#: at most this many tensors (of the layout, or that missed steps) are sorted into rows in
#: Python (a set and a sort of pairs: ~2 µs for a few tensors, where ``np.unique`` takes
#: ~20); more, by NumPy
_PYTHON_ROWS = 64


def own_count_rows(index: np.ndarray, rows: list[dict[str, Any]], missed: np.ndarray
                   ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``index`` and ``rows`` (:func:`~.groups.resolve`'s) with each distinct (row, missed)
    pair of a tensor whose ``missed`` count (steps it had no gradient at) is not 0 as a row
    of its own: the row's values with ``step_offset`` raised by that count. The rows before
    stay where they were (row 0: the optimizer's own values); the new ones follow in
    (row, missed) order."""
    out, keys, _ = _split(index, len(rows), missed)
    if out is index:
        return index, rows
    return out, [*rows, *(_offset_row(rows[r], m) for r, m in keys)]


def _offset_row(row: dict[str, Any], missed: int) -> dict[str, Any]:
    """Group row ``row`` for tensors that missed ``missed`` steps (its offset raised)."""
    return {**row, "step_offset": row.get("step_offset", 0) + missed}


def _split(index: np.ndarray, n_base: int, missed: np.ndarray
           ) -> tuple[np.ndarray, list[tuple[int, int]], list[int]]:
    """Each tensor's row once those that missed steps have rows of their own (``index``
    itself where none did), the (base row, missed) key of each new row in order, and how
    many tensors each new row has."""
    if len(missed) <= _PYTHON_ROWS:  # a few tensors: Python lists (no array op's overhead)
        counts, rows = missed.tolist(), index.tolist()
        pairs = [(r, m) for r, m in zip(rows, counts) if m]
        if not pairs:
            return index, [], []
        keys = sorted(set(pairs))
        at = {k: n_base + j for j, k in enumerate(keys)}
        sizes = [0] * len(keys)
        for i, m in enumerate(counts):
            if m:
                rows[i] = j = at[(rows[i], m)]
                sizes[j - n_base] += 1
        return np.array(rows, dtype=index.dtype), keys, sizes
    sel = np.flatnonzero(missed)
    if not len(sel):
        return index, [], []
    out = index.copy()
    if len(sel) <= _PYTHON_ROWS:
        pairs = list(zip(index[sel].tolist(), missed[sel].tolist()))
        keys = sorted(set(pairs))
        at = {k: j for j, k in enumerate(keys)}
        inverse = [at[p] for p in pairs]
        out[sel] = [n_base + j for j in inverse]
        sizes = [0] * len(keys)
        for j in inverse:
            sizes[j] += 1
        return out, keys, sizes
    span = int(missed.max()) + 1  # (one int per pair: a 1-D unique, ~10x axis=0's speed)
    flat, inverse, counts = np.unique(index[sel] * span + missed[sel], return_inverse=True,
                                      return_counts=True)
    out[sel] = n_base + inverse.reshape(-1)
    keys = list(zip((flat // span).tolist(), (flat % span).tolist()))
    return out, keys, counts.tolist()


def _same_attrs(then: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether an optimizer's attributes ``now`` are still ``then`` (an attribute whose
    ``==`` is elementwise or fails counts as changed)."""
    try:
        return bool(now == then)
    except (TypeError, ValueError):
        return False


class OwnRows:
    """The rows of one state's tensors once those that missed steps count their own
    (see the module docs), for the group rows ``base`` (:attr:`OptimizerState.groups
    <.state.OptimizerState.groups>`: ``(key, index, rows)``) and the ``missed`` counts
    it was made for, kept up to date by :meth:`bump`.

    ``index``: each tensor's row; ``rows``: the base rows, then one per (base row, count)
    pair, in that order (what :func:`own_count_rows` gives); :meth:`views_of`: one
    optimizer per row."""

    __slots__ = ("_at", "_attrs", "_base_views", "_keys", "_opt", "_pool", "_rated", "_rules",
                 "_views", "base", "current", "index", "n_base", "origin", "rows", "sizes")

    def __init__(self, base: tuple, missed: np.ndarray, previous: OwnRows | None = None) -> None:
        self.base = base
        _, index, rows = base
        self.n_base = len(rows)
        self.index, keys, self.sizes = _split(index, self.n_base, missed)
        self.rows = [*rows, *(_offset_row(rows[r], m) for r, m in keys)]
        #: the base row each own row was made from; (base row, count) -> own row
        self.origin = [r for r, _ in keys]
        self._keys = {k: self.n_base + j for j, k in enumerate(keys)}
        self._at: list[int] | None = None  # index as a list (made by the first bump)
        self._opt: Any = None  # the optimizer the views are of, and its attributes then
        self._attrs: dict[str, Any] | None = None
        self._views: list[Any] | None = None
        self._rated: list[tuple[Any, Any]] = []  # (view, how it takes the rate): _new_rate
        self._rules: tuple[list[Any], list[Any]] | None = None  # see _make_rules
        #: earlier own rows' views by their base row, for :meth:`views_of` to reuse
        self._pool: dict[int, list[Any]] = {}
        self._base_views: list[Any] | None = None
        #: False once a bump changed the rows: the next ones are made anew, from this
        self.current = True
        if previous is not None and previous.base is base:  # its views, to reuse
            self._opt, self._attrs, self._rules = previous._opt, previous._attrs, \
                previous._rules
            pool = self._pool
            for b, spare in previous._pool.items():  # (left unused: rows that merged)
                pool[b] = spare[:_SPARE]
            views = previous._views
            if views is None:
                self._base_views = previous._base_views
            else:
                self._base_views = views[:previous.n_base]
                for b, v in zip(previous.origin, views[previous.n_base:]):
                    pool.setdefault(b, []).append(v)

    def bump(self, idx: list[int]) -> bool:
        """Count one more missed step for the tensors ``idx`` (layout positions, each
        once), as ``missed[idx] += 1`` does: True where that keeps which tensors share a
        row (each of them in an own row that they all fill, and no raised count meets
        another row's): the rows' offsets (and their views') are raised in place of
        making them anew; False where the rows change (:attr:`current` then False: the
        next rows are made anew, with this one's views)."""
        if not self.current:  # (counts moved on since it was made)
            return False
        at = self._at
        if at is None:
            at = self._at = self.index.tolist()
        n_base, hit = self.n_base, {}
        for i in idx:
            r = at[i]
            if r < n_base:  # a first missed step: the tensor leaves its group's row
                self.current = False
                return False
            hit[r] = hit.get(r, 0) + 1
        keys, origin, rows = self._keys, self.origin, self.rows
        moved = []
        for r, k in hit.items():
            if k != self.sizes[r - n_base]:  # some of the row's tensors only: it splits
                self.current = False
                return False
            b = origin[r - n_base]
            m = rows[r]["step_offset"] - rows[b].get("step_offset", 0)
            other = keys.get((b, m + 1))
            if other is not None and other not in hit:  # it meets another row: they merge
                self.current = False
                return False
            moved.append((r, b, m))
        rows = self.rows = list(rows)  # (a new list: one handed out stays as it was)
        for _, b, m in moved:
            del keys[(b, m)]
        views = self._views
        for r, b, m in moved:
            keys[(b, m + 1)] = r
            rows[r] = _offset_row(rows[b], m + 1)
            if views is not None:  # (its own copy: set as row_view sets it, unchecked)
                views[r].__dict__["_step_offset"] = rows[r]["step_offset"]
        return True

    def views_of(self, opt: Any) -> list[Any]:
        """One optimizer per row, as :func:`~.groups.views` makes them from :attr:`rows`:
        those made before while ``opt``'s attributes stay as they were then (its learning
        rate apart: a scheduler sets it every step, and the views take it as ``row_view``
        gives it them), else made anew (an own row reusing an earlier one's view of the
        same group row, its offset set)."""
        views = self._views
        same = opt is self._opt and (_same_attrs(self._attrs, opt.__dict__)
                                     or self._new_rate(opt))
        if views is not None and same:
            return list(views)
        pool = self._pool if same else {}
        n_base = self.n_base
        made = list(self._base_views) if same and self._base_views is not None else [
            opt.row_view(dict(over)) if over else opt for over in self.rows[:n_base]]
        for b, row in zip(self.origin, self.rows[n_base:]):
            spare = pool.get(b)
            if spare:  # (a copy of the same group row's view: only its offset differs)
                v = spare.pop()
                v.__dict__["_step_offset"] = row["step_offset"]
            else:
                v = opt.row_view(dict(row))
            made.append(v)
        if not same:
            self._pool = {}  # (what is left of it is kept for the next rows: see __init__)
            self._attrs = dict(opt.__dict__)  # (else the snapshot holds)
        self._base_views, self._opt, self._views = None, opt, made
        # the views that take the optimizer's rate, and how (see _new_rate)
        base, own = self._rules or self._make_rules()
        rated = [*zip(made, base), *zip(made[n_base:], [own[b] for b in self.origin])]
        self._rated = [(v, rule) for v, rule in rated if rule is not None and v is not opt]
        if same and self._rated and "learning_rate" in opt.__dict__:  # (views kept from
            self._set_rate(opt.__dict__["learning_rate"])  # earlier rates)
        return list(made)

    def _make_rules(self) -> tuple[list[Any], list[Any]]:
        """:func:`_rate_rule` of each group row, for its view and for its own rows' (kept
        while the group rows stay, by the rows made after these)."""
        rows = self.base[2]
        self._rules = ([_rate_rule(over, False) for over in rows],
                       [_rate_rule(over, True) for over in rows])
        return self._rules

    def _new_rate(self, opt: Any) -> bool:
        """Whether ``opt``'s attributes are those the views were made with but for its
        learning rate; if so, the views take the new rate as
        :meth:`~.groups.GroupsMixin.row_view` sets it: a group's pinned rate stays, its
        ``lr_scale`` times the new one, else the new one. Only for an optimizer that keeps
        its own rate (no wrapper's: :meth:`~.groups.GroupsMixin.hyper_holders`)."""
        then, now = self._attrs, opt.__dict__
        if then is None or "learning_rate" not in then or "learning_rate" not in now:
            return False
        then["learning_rate"] = now["learning_rate"]  # (a snapshot: ours to change)
        if not _same_attrs(then, now) or len(opt.hyper_holders()) != 1:
            return False
        self._set_rate(now["learning_rate"])
        return True

    def _set_rate(self, lr: Any) -> None:
        """The optimizer's learning rate ``lr`` in the views that take it."""
        for v, rule in self._rated:
            v.__dict__["learning_rate"] = lr if rule is _SAME else lr * rule


#: a view whose learning rate is the optimizer's (see :func:`_rate_rule`)
_SAME = object()


def _rate_rule(over: dict[str, Any], own: bool) -> Any:
    """How the view of a group row with overrides ``over`` (``own``: of an own row made
    from it, always a copy) takes the optimizer's learning rate, as ``row_view`` sets it:
    None where it keeps its own (the optimizer itself, or a rate pinned in the group),
    :data:`_SAME` where it is the optimizer's, else its ``lr_scale`` (times the
    optimizer's)."""
    if "learning_rate" in over or not (over or own):
        return None
    return over.get("lr_scale", _SAME)
