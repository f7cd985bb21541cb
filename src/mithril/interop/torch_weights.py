"""A trained ``torch.nn.Module``'s weights in a compiled Mithril model, and back.

:func:`params_from_torch` turns a torch ``state_dict`` (a module, a mapping of tensors, a
``.safetensors`` / ``.bin`` / ``.pt`` file, a Hugging Face sharded index or model folder) into
the compiled model's ``params`` and ``state`` (BatchNorm's ``running_mean``, ``running_var``,
``num_batches_tracked``); :func:`params_to_torch` gives a ``state_dict`` that
``module.load_state_dict(..., strict=True)`` takes.

Layouts: every Mithril block keeps torch's layout, so the values copy over as they are:
``Linear`` (out, in), convolutions (out, in/groups, k…), transposed ones (in, out/groups, k…),
``Embedding`` (num, dim), attention's packed ``in_proj_weight`` (3E, E) with q, k, v rows in
that order (or ``q/k/v_proj_weight`` with kdim / vdim), the recurrent gates in torch's order
(i, f, g, o; r, z, n). Only the names differ; :func:`torch_names` finds them:

* ``names`` (torch name → Mithril name) first: a dict, whose keys are torch parameter names or
  module paths (``{"encoder.layers.0": "transformer_block_0"}`` maps everything under it,
  spelled as below), a list of ``(regex, replacement)`` pairs (the first whose regex matches a
  whole name or module path, as ``re.fullmatch``, wins; ``\\1`` refers to its groups), or a
  callable (a torch name → a Mithril name, or ``None``).
* Then the rest by structure. Each side is cut into units: a recurrent layer (torch's
  ``weight_ih_l1_reverse`` is ``l1_reverse.weight_ih``, a one-layer one-direction layer's or a
  cell's is ``recurrence.weight_ih``, as :mod:`mithril.models.recurrent_state_dict`), a
  transformer layer (``nn.TransformerEncoderLayer``'s ``self_attn`` / ``linear1`` / ``linear2``
  / ``norm1`` / ``norm2`` are ``TransformerBlock``'s ``multi_head_attention`` / ``linear_0`` /
  ``linear_1`` / ``layer_norm_0`` / ``layer_norm_1``; the decoder's ``multihead_attn`` and
  ``norm3`` are ``multi_head_attention_1`` and ``layer_norm_2``), an attention
  (``out_proj.weight`` is ``out_proj_weight``), or else one module (``conv.weight`` and
  ``conv.bias``). A torch unit and a Mithril unit with the same names and shapes are paired
  when no other unit on either side has them too; otherwise they are ambiguous and the error
  lists them with the ``names`` that pair them in order, to check and pass.

Hugging Face checkpoints: ``transpose=`` picks entries stored (in, out) (GPT-2's ``Conv1D``),
swapped before pairing and back on export; ``ignore=`` drops entries before pairing (an older
GPT-2 file's mask buffers); tied names (one tensor under two names, as an embedding shared with
the LM head) pair as one entry when the model ties them (one key connected to both blocks),
else as two, and an export of two different values into one tied tensor is refused.

Every mismatch is an error naming the torch name, the Mithril name and both shapes or dtypes
(``KeyMismatchError``: missing, unexpected, ambiguous; ``ShapeError``; ``DTypeError``), raised
before anything is converted. Nothing is changed in place: the results are new arrays (never
views of the torch tensors)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from ..models.recurrent_state_dict import ROLES
from .torch_weights_concat import Concat, merged, split
from .torch_weights_files import Entry, Patterns, entry, read_state_dict, tied, transposed

__all__ = ["TorchWeights", "params_from_torch", "params_to_torch", "torch_names"]

Names = Mapping[str, str] | Sequence[tuple[str, str]] | Callable[[str], "str | None"] | None
_RROLES = "|".join(ROLES + ("weight_hr",))
_TORCH_REC = re.compile(rf"(?:(?P<p>.+)\.)?(?P<role>{_RROLES})_l(?P<k>\d+)(?P<rev>_reverse)?")
_TORCH_CELL = re.compile(rf"(?:(?P<p>.+)\.)?(?P<role>{'|'.join(ROLES)})")
_OURS_REC = re.compile(rf"(?:(?P<p>.+)\.)?(?P<l>l\d+(?:_reverse)?|recurrence)\.(?P<role>{_RROLES})")
_ENCODER = {"self_attn": "multi_head_attention", "linear1": "linear_0", "linear2": "linear_1",
            "norm1": "layer_norm_0", "norm2": "layer_norm_1"}
_DECODER = {**_ENCODER, "self_attn": "multi_head_attention_0",
            "multihead_attn": "multi_head_attention_1", "norm3": "layer_norm_2"}
_BLOCKS = (frozenset(_ENCODER.values()), frozenset(_DECODER.values()))
_MHA = {"out_proj.weight": "out_proj_weight", "out_proj.bias": "out_proj_bias"}
_MHA_KEYS = {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
             "v_proj_weight", "bias_k", "bias_v", "out_proj.weight", "out_proj.bias"}


class TorchWeights(NamedTuple):
    """What :func:`params_from_torch` returns: ``params`` and ``state`` (BatchNorm's running
    statistics; ``{}`` for a model without state), each keyed by Mithril name."""

    params: dict[str, Any]
    state: dict[str, Any]


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def _under(key: str, prefix: str) -> str | None:
    """``key`` relative to the module path ``prefix`` (``None``: not under it)."""
    if not prefix:
        return key
    return key[len(prefix) + 1:] if key.startswith(prefix + ".") else None


def _prefixes(key: str) -> list[str]:
    """``key`` and its module paths, longest first, then ``""``."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]


# -- units: (module path, name inside it in Mithril's spelling) -----------------------------
def _torch_units(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each torch name as (unit, relative name in Mithril's spelling); see the module docstring."""
    have, out = set(keys), {}
    rec: dict[str, list[tuple[str, re.Match]]] = {}
    for k in keys:
        if m := _TORCH_REC.fullmatch(k):
            rec.setdefault(m["p"] or "", []).append((k, m))
    for p, items in rec.items():
        one = all(m["k"] == "0" and not m["rev"] for _, m in items)
        for k, m in items:
            out[k] = (p, ("recurrence" if one else f"l{m['k']}{m['rev'] or ''}") + "." + m["role"])
    for k in keys:  # transformer layers
        for tail in ("self_attn.in_proj_weight", "self_attn.q_proj_weight"):
            p = k[:-len(tail)].rstrip(".") if k.endswith(tail) else None
            if p is None or (p and not k.endswith("." + tail)) or not all(
                    _join(p, n) in have for n in ("linear1.weight", "norm1.weight")):
                continue
            table = _DECODER if _join(p, "multihead_attn.out_proj.weight") in have else _ENCODER
            for j in keys:
                rel = _under(j, p)
                head, _, rest = (rel or "").partition(".")
                if rel is not None and j not in out and head in table:
                    out[j] = (p, f"{table[head]}.{_MHA.get(rest, rest)}")
    for k in keys:  # attentions on their own
        if k.endswith("out_proj.weight") and k not in out:
            p = k[:-len("out_proj.weight")].rstrip(".")
            if any(_join(p, n) in have for n in ("in_proj_weight", "q_proj_weight")):
                for j in keys:
                    rel = _under(j, p)
                    if rel in _MHA_KEYS and j not in out:
                        out[j] = (p, _MHA.get(rel, rel))
    for k in keys:  # cells, then plain modules
        if k not in out:
            m = _TORCH_CELL.fullmatch(k)
            p = (m["p"] or "") if m else ""
            if m and all(_join(p, r) in have for r in ROLES[:2]):
                out[k] = (p, "recurrence." + m["role"])
            else:
                parent, _, leaf = k.rpartition(".")
                out[k] = (parent, leaf)
    return {k: out[k] for k in keys}


def _our_units(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each Mithril name as (unit, relative name): a recurrent block, a transformer block, or
    the parameter's own module."""
    out: dict[str, tuple[str, str]] = {}
    children: dict[str, set[str]] = {}
    for k in keys:
        for p in _prefixes(k)[1:]:
            rel = _under(k, p)
            if rel is not None and "." in rel:
                children.setdefault(p, set()).add(rel.split(".")[0])
    blocks = {p for p, c in children.items() if c in _BLOCKS}
    for k in keys:
        p = next((p for p in _prefixes(k)[1:] if p in blocks), None)
        if p is not None:
            out[k] = (p, _under(k, p) or k)
        elif m := _OURS_REC.fullmatch(k):
            out[k] = (m["p"] or "", f"{m['l']}.{m['role']}")
        else:
            parent, _, leaf = k.rpartition(".")
            out[k] = (parent, leaf)
    return out


# -- the mapping ------------------------------------------------------------------------------
def _explicit(names: Names, torch_keys: list[str], targets: Mapping[str, Any], who: str,
              one: Mapping[str, str] | None = None,
              ) -> tuple[dict[str, str], dict[tuple[str, str], list[str]]]:
    """``{torch name: Mithril name}`` for the torch names that ``names`` maps one by one, and
    ``{(torch module path, Mithril module path): [the torch names under it]}`` for those it
    maps by module path."""
    if names is None:
        return {}, {}
    used: set[str] = set()
    if isinstance(names, Mapping):
        bad = [k for k, v in names.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"{who}: names must map str to str, got {bad[0]!r}: "
                            f"{names[bad[0]]!r}")

        def look(k: str) -> tuple[str, str] | None:
            p = next((p for p in _prefixes(k) if p in names), None)
            return None if p is None else (p, names[p])
        rules: list[Any] = list(names)
    elif callable(names):
        def look(k: str) -> tuple[str, str] | None:
            v = names(k)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{who}: names({k!r}) must return a str or None, got {v!r}")
            return None if v is None else (k, v)
        rules = []
    elif isinstance(names, Sequence) and not isinstance(names, str) and all(
            isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(x, str) for x in r)
            for r in names):
        try:
            pairs = [(re.compile(a), b) for a, b in names]
        except re.error as e:
            raise ValueError(f"{who}: names holds a bad regex: {e}") from None

        def look(k: str) -> tuple[str, str] | None:
            for pattern, repl in pairs:
                for p in _prefixes(k):
                    if m := pattern.fullmatch(p):
                        used.add(pattern.pattern)
                        return p, m.expand(repl)
            return None
        rules = [a for a, _ in names]
    else:
        raise TypeError(f"{who}: names must be a dict, a list of (regex, replacement) pairs or "
                        f"a callable, got {type(names).__name__}")
    out: dict[str, str] = {}
    groups: dict[tuple[str, str], list[str]] = {}
    hits = set()
    for k in torch_keys:
        if hit := look(k):
            hits.add(hit[0])
            if hit[0] == k:
                out[k] = hit[1]
            else:
                groups.setdefault(hit, []).append(k)
    unused = [r for r in rules if r not in (hits if isinstance(names, Mapping) else used)]
    if unused:
        raise KeyMismatchError(f"{who}: names {unused} match(es) no name or module path of the "
                               f"torch state_dict")
    paths = {p for k in targets for p in _prefixes(k)}
    wrong = {k: (v, targets) for k, v in out.items() if v not in targets}
    wrong.update({t: (m, paths) for t, m in groups if m not in paths})
    if wrong:
        lines = [f"torch '{k}' -> '{v}' (closest: {difflib.get_close_matches(v, near, 3)})"
                 for k, (v, near) in list(wrong.items())[:3]]
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise KeyMismatchError(f"{who}: names map to no Mithril parameter, state or module "
                               "path: " + "; ".join(lines) + more)
    twice: dict[str, str] = {}
    for t, m in groups:
        if m in twice:
            raise KeyMismatchError(f"{who}: names map torch module paths '{twice[m]}' and '{t}' "
                                   f"both to Mithril '{m}'")
        twice[m] = t
    for k, v in out.items():  # a name sent where a module path sends another
        for (tp, mp), ks in groups.items():
            rel = _under(v, mp)
            j = _join(tp, rel) if rel is not None and _under(k, tp) is None else None
            if j in ks:
                raise KeyMismatchError(f"{who}: names map torch '{k}' and '{j}' (by the module "
                                       f"path '{tp}' -> '{mp}') both to Mithril '{v}'")
    seen: dict[str, str] = {}
    one = one or {}
    for k, v in out.items():
        if v in seen and one.get(k, k) != one.get(seen[v], seen[v]):
            raise KeyMismatchError(f"{who}: names map torch '{seen[v]}' and '{k}' both to "
                                   f"Mithril '{v}' (two tensors, not one tied tensor)")
        seen[v] = k
    return out, groups


def _pair_units(tu: dict[str, tuple[str, str]], ou: dict[str, tuple[str, str]],
                t_shape: Callable[[str], tuple], o_shape: Callable[[str], tuple],
                out: dict[str, str]) -> list[tuple[bool, str]]:
    """Add to ``out`` (the pairs ``names`` gave) the torch units' pairs, and return the
    problems found. A torch unit with a name that ``names`` sent into a Mithril unit follows
    it there; the others pair with a Mithril unit of the same names and shapes where
    unambiguous, then (for the messages) of the same names. A problem is (whether it is an
    ambiguity, its text)."""
    taken = set(out.values())
    t_group: dict[str, dict[str, str]] = {}
    o_group: dict[str, dict[str, str]] = {}
    for k, (u, r) in tu.items():
        t_group.setdefault(u, {})[r] = k
    for k, (u, r) in ou.items():
        o_group.setdefault(u, {})[r] = k
    for g in t_group.values():
        sent = {ou[out[k]][0] for k in g.values() if out.get(k) in ou}
        if len(sent) == 1:
            o = o_group.get(sent.pop(), {})
            out.update({k: o[r] for r, k in g.items()
                        if k not in out and r in o and o[r] not in taken})
            taken.update(out.values())
    for groups, done in ((t_group, set(out)), (o_group, taken)):
        for u in list(groups):
            groups[u] = {r: k for r, k in groups[u].items() if k not in done}
            if not groups[u]:
                del groups[u]
    problems: list[tuple[bool, str]] = []

    def sig(group: dict[str, str], shape: Callable[[str], tuple], exact: bool) -> tuple:
        return tuple(sorted((r, shape(k) if exact else ()) for r, k in group.items()))

    for exact in (True, False):
        ts: dict[tuple, list[str]] = {}
        os_: dict[tuple, list[str]] = {}
        for u, g in t_group.items():
            ts.setdefault(sig(g, t_shape, exact), []).append(u)
        for u, g in o_group.items():
            os_.setdefault(sig(g, o_shape, exact), []).append(u)
        for s_, tlist in ts.items():
            olist = os_.get(s_, [])
            if len(tlist) == len(olist) == 1:
                t, o = tlist[0], olist[0]
                out.update({k: o_group[o][r] for r, k in t_group.pop(t).items()})
                o_group.pop(o)
            elif olist and exact:
                pairs = dict(zip(tlist, olist))
                problems.append((True, f"ambiguous: torch {tlist} and Mithril {olist} hold the "
                                       f"same names and shapes; pair them with names=, e.g. "
                                       f"{pairs}"))
                for t in tlist:
                    t_group.pop(t)
                for o in olist:
                    o_group.pop(o)
    for t, g in list(t_group.items()):  # a unit with a name more or less: say which
        def near(o: dict[str, str], g: dict[str, str] = g) -> bool:
            common = set(g) & set(o)
            return bool(common) and (set(g) <= set(o) or set(o) <= set(g)) and all(
                t_shape(g[r]) == o_shape(o[r]) for r in common)
        cands = [u for u, o in o_group.items() if near(o)]
        if len(cands) == 1 and sum(near(o_group[cands[0]], h) for h in t_group.values()) == 1:
            o = o_group.pop(cands[0])
            del t_group[t]
            out.update({k: o[r] for r, k in g.items() if r in o})
            problems += [(False, f"torch module '{t}' lacks the entry for Mithril '{k}' "
                                 f"{o_shape(k)}") for r, k in o.items() if r not in g]
            problems += [(False, f"unexpected torch key '{k}' {t_shape(k)} (Mithril "
                                 f"'{cands[0]}' has no '{r}')") for r, k in g.items() if r not in o]
    for g in t_group.values():
        problems += [(False, f"unexpected torch key '{k}' {t_shape(k)}") for k in g.values()]
    for g in o_group.values():
        problems += [(False, f"missing Mithril key '{k}' {o_shape(k)}") for k in g.values()]
    return problems


def _units(keys: list[str], path: str, cut: Callable) -> dict[str, tuple[str, str]]:
    """``cut`` (:func:`_torch_units` or :func:`_our_units`) of ``keys`` seen from the module
    ``path``, the units named in full."""
    rel = [_under(k, path) or k for k in keys]
    units = cut(rel)
    return {k: (_join(path, units[r][0]), units[r][1]) for k, r in zip(keys, rel)}


def _pairs(targets: Mapping[str, Any], theirs: dict[str, Entry], keys: list[str],
           out: dict[str, str], groups: dict[tuple[str, str], list[str]],
           ) -> tuple[dict[str, str], list[tuple[bool, str]]]:
    """The pairs of the torch names ``keys`` (``out``, ``groups``: what ``names`` gave) and the
    problems found. A module path that ``names`` maps is paired on its own (the torch names
    under it with the Mithril names under its target), deepest first, then the rest."""
    have = set(keys)
    out = {k: v for k, v in out.items() if k in have}
    groups = {g: [k for k in ks if k in have] for g, ks in groups.items()}
    shape_t, shape_o = (lambda k: theirs[k].shape), (lambda k: tuple(targets[k]))
    problems: list[tuple[bool, str]] = []
    claimed, grouped = set(), {k for ks in groups.values() for k in ks}
    scopes = [(tp, mp, ks) for (tp, mp), ks in sorted(groups.items(), key=lambda g: -len(g[0][0]))]
    scopes.append(("", "", [k for k in keys if k not in grouped]))
    for tp, mp, scope in scopes:
        ours = [k for k in targets if _under(k, mp) is not None and k not in claimed]
        inside, have = set(ours), set(scope)
        scope = scope + [k for k in keys if out.get(k) in inside and k not in have]
        problems += _pair_units(_units(scope, tp, _torch_units), _units(ours, mp, _our_units),
                                shape_t, shape_o, out)
        claimed.update(ours)
    return out, problems


def _read(source: Any, who: str, transpose: Patterns, ignore: Patterns, concat: Concat,
          ) -> tuple[dict[str, Entry], frozenset[str], dict[str, str], dict, list[str]]:
    """``source``'s entries less ``ignore``, ``transpose``d, ``concat``enated; the names
    swapped, the pairs ``concat`` gives, the merged entries' parts, the names in order."""
    theirs, turned = transposed(read_state_dict(source, who), transpose, who, ignore)
    order = list(theirs)
    theirs, fixed, rows = merged(theirs, concat, who)
    return theirs, frozenset(turned), fixed, rows, order


def _mapping(compiled: Any, theirs: dict[str, Entry], names: Names, who: str,
             strict: bool = True, turned: frozenset[str] = frozenset(),
             fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{torch name: Mithril name}`` for every entry of ``theirs``, checked: every Mithril
    parameter and state entry paired once, with the same shape (``strict=False``: those
    paired; the others left out, ambiguities and shapes still errors). Tied torch names (one
    tensor under several names) pair as separate entries when the model keeps them apart,
    else as one (the others follow the first, or the one ``names`` maps). ``turned``: the
    names seen transposed (for the messages). ``fixed``: the pairs ``concat`` gives."""
    targets = {**compiled.parameter_shapes, **compiled.state_shapes}
    ties = tied(theirs)
    one = {k: first for first, ks in ties.items() for k in ks}
    fixed = fixed or {}
    out, groups = _explicit(names, [k for k in theirs if k not in fixed], targets, who, one)
    for k, v in fixed.items():
        if v not in targets or v in out.values():
            why = "names gives it too" if v in targets else \
                f"the model lacks it (closest: {difflib.get_close_matches(v, targets, 3)})"
            raise KeyMismatchError(f"{who}: concat stacks torch '{k}' into Mithril '{v}': {why}")
    out.update(fixed)
    tries = [(_pairs(targets, theirs, list(theirs), out, groups), {})]
    if ties:  # the same tensor once: the others follow the one kept
        keep = {first: next((k for k in ks if k in out), first) for first, ks in ties.items()}
        follow = {k: keep[one[k]] for k in one if k != keep[one[k]]}
        tries.append((_pairs(targets, theirs, [k for k in theirs if k not in follow], out,
                             groups), follow))

    def texts(problems: list[tuple[bool, str]]) -> list[str]:
        return [text for ambiguous, text in problems if ambiguous or strict]
    (pairs, problems), follow = min(tries, key=lambda t: len(texts(t[0][1])))
    pairs.update({k: pairs[f] for k, f in follow.items() if f in pairs})
    shapes = [f"torch '{k}' {theirs[k].shape}{' (transposed)' if k in turned else ''} vs "
              f"Mithril '{v}' {tuple(targets[v])}"
              for k, v in pairs.items() if theirs[k].shape != tuple(targets[v])]
    if any(len(theirs[k].shape) == 2 and theirs[k].shape[::-1] == tuple(targets[v])
           != theirs[k].shape for k, v in pairs.items() if k not in turned):
        shapes.append("a weight stored (in, out), as Hugging Face's Conv1D, takes transpose= "
                      "(regexes of its torch names)")
    found = texts(problems)
    if not pairs and theirs and targets:  # strict=False would hand back nothing, silently
        found = found or [text for _, text in problems][:6] + ["no entry pairs: a "
                                                               "state_dict of another model?"]
    if found:
        hint = "" if all(a for a, _ in problems) else (
            " (names= pairs entries by name; strict=False leaves out those with no pair)")
        raise KeyMismatchError(f"{who}: the torch state_dict does not match the model: "
                               + "; ".join(found + shapes) + hint)
    if shapes:
        raise ShapeError(f"{who}: shapes differ: " + "; ".join(shapes))
    return {k: pairs[k] for k in theirs if k in pairs}


def torch_names(compiled: Any, state_dict: Any, names: Names = None, *,
                transpose: Patterns = None, ignore: Patterns = None,
                concat: Concat = None) -> dict[str, str]:
    """``{torch name: Mithril name}`` pairing every entry of ``state_dict`` (a module, a
    mapping, or a file; see :func:`params_from_torch`) with a parameter or state entry of
    ``compiled``, as the module docstring describes; an error if they do not pair up. A
    ``concat`` group is one entry, named ``"a+b+c"``."""
    theirs, turned, fixed, _, _ = _read(state_dict, "torch_names", transpose, ignore, concat)
    return _mapping(compiled, theirs, names, "torch_names", turned=turned, fixed=fixed)


def _float_kind(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def params_from_torch(compiled: Any, state_dict: Any, names: Names = None, *,
                      cast: bool = False, strict: bool = True,
                      transpose: Patterns = None, ignore: Patterns = None,
                      concat: Concat = None) -> TorchWeights:
    r"""``compiled``'s params and state from a torch ``state_dict``: a ``torch.nn.Module``, a
    mapping of tensors or NumPy arrays, or the path of a ``.safetensors`` file, a
    ``torch.save``d ``.bin`` / ``.pt`` / ``.pth`` file, a sharded ``*.index.json`` or a
    Hugging Face model folder. ``names``: see the module docstring. The values are
    copied into ``compiled.backend``'s arrays; floats must have the model's dtype unless
    ``cast=True`` (then e.g. float32 or bfloat16 weights are converted; torch's
    ``load_state_dict`` casts silently). ``strict=False`` (as torch's): torch entries with no
    Mithril counterpart are left out, and so are the Mithril names none pairs with (a new
    head: ``{**compiled.get_parameters(), **params}`` fills them in); shapes, dtypes and
    ambiguities are still errors. ``transpose``: a regex, a list of them (each matched as
    ``re.fullmatch``) or a callable (torch name -> bool) picking the entries whose last two
    axes are swapped first (Hugging Face GPT-2's ``Conv1D`` keeps its weight (in, out):
    ``transpose=r".*\.c_(attn|proj|fc)\.weight"``); they are paired by the swapped shape.
    Tied weights (one tensor under two names, as a ``state_dict`` gives an embedding shared
    with the LM head) load into a model that ties them too (one parameter reached from both
    blocks: the same key connected to both ``weight`` terminals) or into two parameters.
    ``ignore`` (the same forms): torch entries left out before pairing, as ``transformers``'
    ``_keys_to_ignore_on_load_unexpected`` (an older GPT-2 file's ``attn.bias`` /
    ``attn.masked_bias`` causal-mask buffers: ``ignore=r".*\.attn\.(masked_)?bias"``); unlike
    ``strict=False`` every Mithril name must still be paired. ``concat``: ``{Mithril name:
    [torch names]}`` whose rows are stacked into it (BERT's ``query`` / ``key`` / ``value``
    into ``in_proj_weight``; :mod:`.torch_weights_concat`). Returns
    ``TorchWeights(params, state)``."""
    who = "params_from_torch"
    theirs, turned, fixed, _, _ = _read(state_dict, who, transpose, ignore, concat)
    mapping = _mapping(compiled, theirs, names, who, strict, turned, fixed)
    b = compiled.backend
    fname = str(b.dtype)  # NumPy has no bfloat16: such a model's values go through float32
    fdtype, idtype = np.dtype(np.float32 if fname == "bfloat16" else fname), np.dtype(np.int64)
    is_int = {k: compiled.program.state_init.get(k) == "int_zeros" for k in mapping.values()}
    bad = []
    for k, v in mapping.items():
        got = theirs[k].dtype
        if is_int[v]:
            ok = got.startswith(("int", "uint"))
            want = "an integer dtype"
        else:
            ok = got == fname or (cast and _float_kind(got))
            want = fname + ("" if cast else " (or cast=True)")
        if not ok:
            bad.append(f"torch '{k}' is {got}, Mithril '{v}' takes {want}")
    if bad:
        raise DTypeError(f"{who}: " + "; ".join(bad))
    params, state = {}, {}
    for k, v in mapping.items():
        a = theirs[k].numpy(idtype if is_int[v] else fdtype)
        (state if v in compiled.state_shapes else params)[v] = \
            b.array(a, b.int_dtype) if is_int[v] else b.array(a)
    return TorchWeights({k: params[k] for k in compiled.parameter_shapes if k in params},
                        {k: state[k] for k in compiled.state_shapes if k in state})


def _torch_dtype(dtype: Any, who: str) -> Any:
    """``dtype`` (``None``, a torch floating dtype or its name: ``"bfloat16"``) as a torch
    dtype or ``None``."""
    import torch

    if dtype is None:
        return None
    got = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(got, torch.dtype) or not got.is_floating_point:
        raise TypeError(f"{who}: dtype must be a torch floating dtype or its name (e.g. "
                        f"'float32', 'bfloat16'), got {dtype!r}")
    return got


def _check_ties(compiled: Any, ours: Mapping[str, Any], mapping: Mapping[str, str],
                ties: Mapping[str, list[str]], who: str) -> None:
    """Refuse different values for the names of one tied torch tensor: ``load_state_dict``
    would copy each into it in turn and keep the last one, silently."""
    for names in ties.values():
        mine = list(dict.fromkeys(mapping[k] for k in names if k in mapping))
        values = [np.asarray(compiled.backend.to_numpy(ours[m])) for m in mine]
        if any(not np.array_equal(values[0], v) for v in values[1:]):
            raise KeyMismatchError(
                f"{who}: torch {' and '.join(repr(k) for k in names)} are one tensor (tied) in "
                f"like, but Mithril {' and '.join(repr(m) for m in mine)} differ: "
                "load_state_dict would keep only the last; tie them in the model (one key "
                "connected to both blocks) or export into an untied module")


def params_to_torch(compiled: Any, params: Mapping[str, Any], names: Names = None, *,
                    like: Any = None, state: Mapping[str, Any] | None = None,
                    strict: bool = True, dtype: Any = None, transpose: Patterns = None,
                    ignore: Patterns = None, concat: Concat = None) -> dict[str, Any]:
    """``params`` (and ``state``, required when ``compiled`` keeps some: BatchNorm's running
    statistics) as a torch ``state_dict`` (CPU tensors of the model's dtype, or floats cast to
    ``dtype``: ``"float32"``, ``torch.bfloat16``, …; integer counters stay integers; new
    contiguous memory), in ``like``'s order, for ``module.load_state_dict(..., strict=True)``
    or ``safetensors.torch.save_file``. ``like``: the torch module (or its ``state_dict``, or a
    file) whose names to use, paired as in :func:`params_from_torch` (with the same ``names``
    and ``transpose``: those entries are swapped back); tied names of ``like`` each get the
    value. Without ``like``, ``names`` must be a dict of full torch names covering every
    Mithril name. ``strict=False`` (with ``like``): the entries of either side with no pair
    are left out (load with ``strict=False``); so are ``like``'s entries that ``ignore`` picks.
    ``concat`` (with ``like``): the Mithril entry split back into its torch entries' rows."""
    import torch

    who = "params_to_torch"
    if not isinstance(params, Mapping):
        raise TypeError(f"{who}: params must be a dict keyed by Mithril name, got "
                        f"{type(params).__name__}")
    if state is None and compiled.state_shapes:
        raise KeyMismatchError(f"{who}: the model keeps state {sorted(compiled.state_shapes)}: "
                               "pass state=... (the state evaluate returned)")
    ours = {**params, **(state or {})}
    want = {**compiled.parameter_shapes, **compiled.state_shapes}
    missing, unexpected = sorted(set(want) - set(ours)), sorted(set(ours) - set(want))
    if missing or unexpected:
        raise KeyMismatchError(f"{who}: missing Mithril key(s) {missing}, unexpected key(s) "
                               f"{unexpected}")
    shapes = [f"'{k}' {tuple(v.shape)} (the model's: {tuple(want[k])})"
              for k, v in ours.items() if tuple(v.shape) != tuple(want[k])]
    if shapes:
        raise ShapeError(f"{who}: shapes differ: " + "; ".join(shapes))
    # the model's dtype by default: a torch backend's bfloat16 comes out of to_numpy as float32
    cast = _torch_dtype(dtype, who) or _torch_dtype(str(compiled.backend.dtype), who)
    if like is not None:
        theirs, turned, fixed, rows, order = _read(like, who, transpose, ignore, concat)
        mapping = _mapping(compiled, theirs, names, who, strict, turned, fixed)
        _check_ties(compiled, ours, mapping, tied(theirs), who)
    elif concat:
        raise TypeError(f"{who}: concat needs like= (the torch entries' rows to split into)")
    elif isinstance(names, Mapping) and set(names.values()) == set(want) and all(
            isinstance(k, str) for k in names):
        mapping = dict(names)
        turned = frozenset(transposed({k: entry(np.empty(want[v])) for k, v in mapping.items()},
                                      transpose, who)[1])
        rows, order = {}, list(mapping)
    else:
        raise TypeError(f"{who}: give like= (the torch module or its state_dict, whose names "
                        "to use), or names= as a dict of every torch name to its Mithril name")
    b, out = compiled.backend, {}
    for name, v in mapping.items():
        for k, a in split(name, np.asarray(b.to_numpy(ours[v])), rows).items():
            a = np.swapaxes(a, -1, -2) if k in turned else a
            exact = a.dtype.name == "bfloat16"  # ml_dtypes': via float32 (exact), then back
            t = torch.from_numpy(np.array(a, np.float32 if exact else None, copy=True,
                                          order="C"))
            t = t.to(torch.bfloat16) if exact else t
            out[k] = t.to(cast) if t.is_floating_point() else t
    return {k: out[k] for k in order if k in out}
