"""A model with its training objective: losses, regularizers and metrics around a model.

``TrainModel(model)`` keeps every terminal of ``model`` and, once compiled, adds the scalar
output ``final_cost``, as the published Mithril's ``TrainModel``:

* ``add_loss(loss, reduce_steps=[Mean()], key_name=None, coef=None, **connections)``: the
  loss's inputs are connected by name to outputs of the model (at least one) or to new data
  inputs (``target="target"``); its output is reduced by each step in turn and scaled by
  ``coef``.
* ``add_regularization(L2() or L1(), coef, input=<name or re.Pattern>)``: ``input`` names a
  parameter (``"linear.weight"``) or an input of the model; a pattern adds the regularizer
  once for every parameter whose name it matches (``re.search``). ``coef`` scales it.
* ``add_metric(model, reduce_steps=None, key_name=..., **connections)``: another output,
  not part of ``final_cost``.
* ``set_loss_combiner(Mean() or Sum())``: how the reduced losses are combined (``Sum``).

``final_cost`` = combiner(reduced losses) + Σ coef·R(x) / g(x), where ``g(x)`` is the
geometric mean, over the losses that depend on ``x``, of each loss's reduced size: the
product of the sizes of the axes its ``Mean``, ``Min`` and ``Max`` steps reduce (``Sum``
reduces count 1). A regularizer of something no loss depends on is not divided. With one
loss reduced by ``Mean()`` this is coef·R(x)/N, so the regularizer's weight does not grow
with the batch.

Parameter names are those of the model compiled alone: the objective's blocks live under
``objective``. The model must be complete before it is wrapped (its blocks are shared).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import KeyMismatchError
from .model import IOKey, Model, Terminal
from .operator import Operator
from .reductions import Max, Mean, Min, Sum

FINAL_COST = "final_cost"


# -- the objective's operators ---------------------------------------------------------------------
class ParameterRef(Operator):
    """Reads the parameter named ``parameter`` (made by another block) as its output: the compiler
    shares it, so gradients through this operator add to that parameter's."""

    inputs: tuple[str, ...] = ()

    def __init__(self, parameter: str) -> None:  # (not name=: every operator's path name)
        self.param_names = {"value": parameter}

    def infer_shape(self, shapes):
        return shapes.get("value")

    def forward(self, xp: Any, value: Any) -> Any:
        return value

    def vjp(self, g, out, args, wrt):
        return {"value": g}

    def __repr__(self) -> str:
        return f"ParameterRef({self.param_names['value']!r})"


def _reduced_size(shape: Sequence[int], axis: Any) -> int:
    """How many entries a reduction over ``axis`` (None: all) folds into one."""
    if axis is None:
        return math.prod(int(d) for d in shape)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return math.prod(int(shape[a]) for a in axes)


class Scale(Operator):
    """input · coef (a Python float: keeps the input's dtype on every backend)."""

    def __init__(self, coef: float) -> None:
        self.coef = coef

    def forward(self, xp: Any, input: Any) -> Any:
        return input * self.coef

    def vjp(self, g, out, args, wrt):
        return {"input": g * self.coef}


class RegularizerScale(Operator):
    """coef · input / g, g the geometric mean over ``groups`` (one per loss that depends on the
    regularized key) of the product of the sizes its reductions fold. ``groups`` holds
    (terminal, axis) pairs: the terminals read the arrays those reductions take."""

    def __init__(self, coef: float, groups: Sequence[Sequence[tuple[str, Any]]]) -> None:
        self.coef, self.groups = coef, [list(g) for g in groups]
        self.inputs = ("input", *(k for g in self.groups for k, _ in g))

    def infer_shape(self, shapes):
        return shapes.get("input")

    def _factor(self, arrays: dict[str, Any]) -> float:
        if not self.groups:
            return self.coef
        sizes = [math.prod(_reduced_size(tuple(arrays[k].shape), a) for k, a in g) for g in self.groups]
        total = float(math.prod(sizes))
        geo = total if len(sizes) == 1 else total ** (1.0 / len(sizes))
        with np.errstate(divide="ignore", invalid="ignore"):  # (an empty batch: inf, as torch's)
            return float(np.float64(self.coef) / geo)

    def forward(self, xp: Any, input: Any, **sized: Any) -> Any:
        return input * self._factor(sized)

    def vjp(self, g, out, args, wrt):
        return {"input": g * self._factor(args)}


class FinalCost(Operator):
    """combiner(losses) + Σ regularizers: ``Sum`` adds every entry of every loss, ``Mean``
    divides that by their number (the published Mithril concatenates the losses and reduces)."""

    def __init__(self, n_losses: int, n_regs: int, mean: bool) -> None:
        self.n_losses, self.n_regs, self.mean = n_losses, n_regs, mean
        self.inputs = (*(f"loss{i}" for i in range(n_losses)), *(f"reg{j}" for j in range(n_regs)))

    def infer_shape(self, shapes):
        return ()

    def _count(self, args: dict[str, Any]) -> int:
        return sum(math.prod(int(d) for d in args[f"loss{i}"].shape) for i in range(self.n_losses))

    def forward(self, xp: Any, **args: Any) -> Any:
        total = None
        for i in range(self.n_losses):
            s = xp.sum(args[f"loss{i}"])
            total = s if total is None else total + s
        if self.mean:
            total = total / self._count(args)
        for j in range(self.n_regs):
            total = total + xp.sum(args[f"reg{j}"])
        return total

    def vjp(self, g, out, args, wrt):
        with np.errstate(divide="ignore"):  # (no entry at all: inf, as torch's and JAX's)
            scale = float(1.0 / np.float64(self._count(args))) if self.mean else 1.0
        res = {}
        for k in wrt:
            x = np.asarray(args[k])
            res[k] = np.broadcast_to(g * scale if k.startswith("loss") else g, x.shape).astype(x.dtype)
        return res


class Objective(Model):
    """The losses, regularizers and metrics of a :class:`TrainModel` (its ``objective`` block)."""


# -- TrainModel --------------------------------------------------------------------------------------
@dataclass
class _Term:
    """A loss or a metric: a block, how its inputs connect, its reduce steps and output name."""

    block: Operator | Model
    out: str
    connections: dict[str, str | IOKey]
    steps: list[Operator | Model]
    key_name: str | None = None
    coef: float | None = None


@dataclass
class _Reg:
    block: Operator | Model
    out: str
    reg_key: str
    target: str
    is_param: bool
    coef: float
    connections: dict[str, str | IOKey] = field(default_factory=dict)
    key_name: str | None = None


def _single_output(block: Any, what: str) -> str:
    outs = tuple(block.output_keys)
    if len(outs) != 1:
        raise ValueError(f"{what}: {type(block).__name__} must have one output, it has {list(outs)}")
    return outs[0]


def _input_keys(block: Any) -> list[str]:
    outs = set(block.output_keys)
    return [k for k in block.terminals if k not in outs]


def _has_parameters(block: Any) -> bool:
    if isinstance(block, Operator):
        return bool(block.param_init) or bool(block.state_init)
    from ..compiler.program import _Builder

    b = _Builder()
    b.flatten(block, {}, "")
    return any(n.op.param_init or n.op.state_init for n in b.nodes)


def _name_of(v: str | IOKey) -> str | None:
    return v.name if isinstance(v, IOKey) else v


def _as_coef(coef: Any, what: str) -> float:
    if isinstance(coef, IOKey) and coef.name is None and coef.value is not None:
        coef = coef.value  # (the published coef=Tensor(0.1), a constant)
    try:
        c = float(np.asarray(coef))
    except (TypeError, ValueError):
        raise TypeError(f"{what}: coef must be a number, got {coef!r}") from None
    if not math.isfinite(c):
        raise ValueError(f"{what}: coef must be finite, got {coef!r}")
    return c


class TrainModel(Model):
    """``model`` with losses, regularizers and metrics; compiled, it has the scalar output
    ``final_cost`` (see the module docstring for the rule)."""

    def __init__(self, model: Model | Operator) -> None:
        super().__init__()
        if isinstance(model, TrainModel):
            raise TypeError("TrainModel(model): model is already a TrainModel")
        if isinstance(model, Operator):
            wrapped = Model()
            wrapped |= model
            model = wrapped
        if not isinstance(model, Model):
            raise TypeError(f"TrainModel(model): expected a Model or an operator, got {type(model).__name__}")
        if getattr(model, "_used", False):
            raise ValueError(f"{model!r} is already part of a model; create a new instance")
        if FINAL_COST in model.conns:
            raise KeyMismatchError(f"'{FINAL_COST}' is the TrainModel's output: the model cannot use "
                                   "that name")
        model._used = True
        self._model = model
        self.blocks = list(model.blocks)
        self.conns = dict(model.conns)
        self._last_output, self._cin, self._cout = model._last_output, model._cin, model._cout
        self._losses: list[_Term] = []
        self._metrics: list[_Term] = []
        self._regs: list[_Reg] = []
        self._mean_combiner = False
        self._finalized = False
        self._graph: tuple[list[str], dict[str, frozenset[str]]] | None = None
        self._model_ops: set[int] = set()  # (the model's operators, by id: _analysis)

    # -- what the model offers ---------------------------------------------------------------
    def _analysis(self) -> tuple[list[str], dict[str, frozenset[str]]]:
        """The model's parameter names (as the compiler will name them) and, for each of its
        terminals, the parameters and inputs it depends on."""
        if self._graph is None:
            from ..compiler.program import _Builder, _optional_params, _toposort

            model = self._model
            b = _Builder()
            b.flatten(model, {}, "")
            nodes = _toposort(b.nodes, b.names)
            terminals = set(model.terminals) | set(model.output_keys)
            top = {name: i for i, name in enumerate(b.names) if name in terminals}
            deps: dict[int, frozenset[str]] = {top[k]: frozenset({k}) for k in model.input_keys}
            produced = {node.out for node in nodes}
            # an input declared differentiable is a parameter (compile makes it trainable)
            params: list[str] = [k for k in model.input_keys
                                 if getattr(model.conns.get(k), "differentiable", None) is True]
            for node in nodes:
                shared = getattr(node.op, "param_names", None) or {}
                own = []
                for k in node.op.param_init:
                    if k in shared:
                        continue
                    if k in node.ins:  # a role given a wire: the parameter is named as it,
                        w = node.ins[k]  # unless a block computes it, it is a constant
                        name = b.names[w]  # or it is declared not differentiable (data)
                        if w in produced or w in b.consts or getattr(
                                model.conns.get(name), "differentiable", None) is False:
                            continue
                        if name not in params and name not in own:
                            own.append(name)
                    elif k not in _optional_params(node.op):
                        own.append(f"{node.path}.{k}")
                params += own
                d = set(own) | set(shared.values())
                for w in node.ins.values():
                    d |= deps.get(w, frozenset())
                deps[node.out] = frozenset(d)
            self._graph = params, {k: deps.get(w, frozenset()) for k, w in top.items()}
            self._model_ops = {id(node.op) for node in nodes}
        return self._graph

    @property
    def parameter_names(self) -> list[str]:
        """The model's parameter names, as ``compile`` will name them."""
        return list(self._analysis()[0])

    def _check_open(self, what: str) -> None:
        if self._finalized:
            raise ValueError(f"{what}: this TrainModel has been compiled; no more losses, "
                             "regularizers or metrics can be added")

    def _check_key_name(self, key_name: str | None, what: str, connections: Any = ()) -> None:
        if key_name is None:
            return
        if not isinstance(key_name, str):
            raise TypeError(f"{what}: key_name must be a str, got {type(key_name).__name__}")
        taken = set(self.conns) | {FINAL_COST} | {t.key_name for t in (*self._losses, *self._metrics)} \
            | {r.key_name for r in self._regs}
        if key_name in taken:
            raise KeyMismatchError(f"{what}: key_name '{key_name}' is already a terminal of the model")
        # (an input a term reads, target='aux': the output would feed it)
        read = [c for t in (*self._losses, *self._metrics, *self._regs) for c in t.connections.values()]
        if key_name in {_name_of(v) for v in (*read, *connections) if isinstance(v, (str, IOKey))}:
            raise KeyMismatchError(f"{what}: key_name '{key_name}' is already the name of an input "
                                   "that a loss, metric or regularizer reads")

    def _terminal_name(self, t: Terminal, what: str) -> str:
        """The name of the terminal a connection object (``model.cout``) refers to."""
        c = self._resolve(t, what)
        if c.name is None or self.conns.get(c.name) is not c or not c.exposed:
            raise KeyMismatchError(f"{what}: {t!r} is an internal wire; make it an output first "
                                   "with expose_keys(name=...)")
        return c.name

    def _reg_target(self, t: Terminal, what: str) -> str:
        """The name of the parameter or input a connection object (``lin.weight``,
        ``model.input``) refers to; looked up only, so that a refused one changes nothing."""
        from ..compiler.program import _Builder

        if t.block is self._model or t.block is self:
            return str(t.key)
        for block, mapping in getattr(self._model, "blocks", ()):
            c = mapping.get(t.key) if block is t.block else None
            if c is not None and c.name is not None:  # bound to a named wire ("w", "input")
                return c.name
        b = _Builder()
        b.flatten(self._model, {}, "")
        for node in b.nodes:  # a parameter role: its compiled name
            if node.op is t.block and t.key in (getattr(node.op, "param_init", None) or ()):
                if t.key in node.ins:  # given a wire deeper down (weight="w"): named as it
                    return b.names[node.ins[t.key]]
                return f"{node.path}.{t.key}"
        raise KeyMismatchError(f"{what}: {t!r} is not a parameter or input of the model")

    def _term(self, what: str, block: Any, steps: Sequence[Any] | None, key_name: str | None,
              connections: dict[str, Any], need_output: bool) -> _Term:
        if not isinstance(block, (Operator, Model)) or isinstance(block, TrainModel):
            raise TypeError(f"{what}: expected an operator or a Model, got {type(block).__name__}")
        connections = {k: self._terminal_name(v, what) if isinstance(v, Terminal) else v
                       for k, v in connections.items()}
        out = _single_output(block, what)
        if out in connections:
            raise KeyMismatchError(f"{what}: '{out}' is the output of {type(block).__name__}; "
                                   "name it with key_name=")
        unknown = sorted(set(connections) - set(block.terminals))
        if unknown:
            raise KeyMismatchError(f"{what}: {type(block).__name__} has no input(s) {unknown}; its "
                                   f"inputs are {_input_keys(block)}")
        missing = [k for k in _input_keys(block) if k not in connections]
        if missing:
            raise KeyMismatchError(f"{what}: input(s) {missing} of {type(block).__name__} are not "
                                   "connected; connect each to an output of the model or to a new "
                                   "data input (e.g. target='target')")
        for k, v in connections.items():
            if isinstance(v, (int, float, np.ndarray)) and not isinstance(v, bool):
                connections[k] = v = IOKey(value=v)
            if isinstance(v, IOKey) and v.name is None and v.value is not None:
                continue  # a constant (the published right=Tensor(0.0))
            if not isinstance(v, (str, IOKey)) or _name_of(v) is None:
                raise TypeError(f"{what}: connection '{k}' must be a name (a str or a named IOKey) "
                                f"or a constant, got {v!r}")
            if _name_of(v) == FINAL_COST or (isinstance(v, str) and v.startswith("$")):
                raise KeyMismatchError(f"{what}: connection '{k}' cannot use the name {v!r}")
        self._check_visible(connections, what)
        outputs = set(self._model.output_keys)
        if need_output and not {_name_of(v) for v in connections.values()} & outputs:
            raise KeyMismatchError(
                f"{what}: none of the connections {dict((k, _name_of(v)) for k, v in connections.items())} "
                f"names an output of the model; its outputs are {sorted(outputs)}")
        if isinstance(steps, (Operator, Model)):
            steps = [steps]  # (one step, not in a list)
        elif steps is not None and not isinstance(steps, Sequence) or isinstance(steps, str):
            raise TypeError(f"{what}: reduce_steps must be a list of reductions (e.g. [Mean()]), "
                            f"got {steps!r}")
        steps = list(steps) if steps else []
        for s in steps:
            if not isinstance(s, (Operator, Model)):
                raise TypeError(f"{what}: a reduce step must be an operator or a Model, got {s!r}")
            _single_output(s, f"{what} (reduce step)")
            if len(_input_keys(s)) != 1:
                raise ValueError(f"{what}: reduce step {s!r} must have one input, it has {_input_keys(s)}")
        self._check_key_name(key_name, what, connections.values())
        block, *steps = self._fresh([block, *steps], what)
        return _Term(block, out, dict(connections), steps, key_name)

    def _check_visible(self, connections: dict[str, Any], what: str) -> None:
        """Refuses a name that is an internal wire of the model (``expose=False``): outside
        the model it is hidden, so the name would neither be that wire nor a new input."""
        hidden = set(self._model.conns) - set(self._model.terminals) - set(self._model.output_keys)
        for k, v in connections.items():
            if isinstance(v, (str, IOKey)) and _name_of(v) in hidden:
                raise KeyMismatchError(f"{what}: connection '{k}': '{_name_of(v)}' is an internal wire "
                                       "of the model (expose=False); make it an output with "
                                       "expose_keys(...) to read it, or name a new input otherwise")

    def _fresh(self, blocks: Sequence[Any], what: str) -> list[Any]:
        """``blocks``, each copied where this TrainModel (or the list itself) holds that
        instance already: one criterion for two losses, one ``reduce_steps`` list for several
        (as torch's ``crit = nn.MSELoss()`` called twice). A block with parameters or state
        is refused instead: a copy would not share them."""
        self._analysis()
        held = set(self._model_ops) | {id(b) for t in (*self._losses, *self._metrics)
                                       for b in (t.block, *t.steps)} | {id(r.block) for r in self._regs}
        fresh = []
        for block in blocks:
            if id(block) in held or getattr(block, "_used", False):
                if _has_parameters(block):
                    raise ValueError(f"{what}: {block!r} is already part of this TrainModel and has "
                                     "parameters or state; create a new instance")
                block = copy.deepcopy(block)
            held.add(id(block))
            fresh.append(block)
        return fresh

    # -- the published API ---------------------------------------------------------------------
    def add_loss(self, loss: Operator | Model, reduce_steps: Sequence[Any] | None = None,
                 key_name: str | None = None, coef: float | None = None,
                 **connections: str | IOKey) -> None:
        """Add ``loss`` (connected by ``connections``), reduced by ``reduce_steps`` (default
        ``[Mean()]``) and scaled by ``coef``; ``key_name`` also makes the reduced loss an output."""
        self._check_open("add_loss")
        term = self._term("add_loss", loss, reduce_steps or [Mean()], key_name, connections, True)
        if coef is not None:
            term.coef = _as_coef(coef, "add_loss")
        self._losses.append(term)

    def add_regularization(self, model: Operator | Model, coef: float, reg_key: str | None = None,
                           key_name: str | None = None, **connections: Any) -> None:
        """Add ``coef · model(x)`` for ``x`` the parameter or input named in ``connections``
        (``input="linear.weight"``), or for every parameter a ``re.Pattern`` matches."""
        what = "add_regularization"
        self._check_open(what)
        if not isinstance(model, (Operator, Model)) or isinstance(model, TrainModel):
            raise TypeError(f"{what}: expected an operator or a Model, got {type(model).__name__}")
        c = _as_coef(coef, what)
        out = _single_output(model, what)
        ins = _input_keys(model)
        if reg_key is None:
            reg_key = ins[0] if ins else None
        if reg_key not in ins:
            raise KeyMismatchError(f"{what}: reg_key {reg_key!r} is not an input of "
                                   f"{type(model).__name__}; its inputs are {ins}")
        if set(connections) != set(ins):
            raise KeyMismatchError(f"{what}: connect exactly the inputs {ins} of {type(model).__name__}, "
                                   f"got {sorted(connections)}")
        others = {k: v for k, v in connections.items() if k != reg_key}
        for k, v in others.items():
            if not isinstance(v, (str, IOKey)) or _name_of(v) is None:
                raise TypeError(f"{what}: connection '{k}' must be a name, got {v!r}")
        self._check_visible(others, what)
        params, _ = self._analysis()
        sel = connections[reg_key]
        if isinstance(sel, Terminal):  # as published: input=lin.weight
            sel = self._reg_target(sel, what)
        if isinstance(sel, re.Pattern):
            # (a parameter role given a named wire is that input: Layer(...).connect(weight="w0"))
            targets = [(p, p not in self._model.input_keys) for p in params if sel.search(p)]
            if not targets:
                raise KeyMismatchError(f"{what}: the pattern {sel.pattern!r} matches no parameter; the "
                                       f"parameters are {params}")
        elif isinstance(sel, str):
            if sel in params and sel not in self._model.input_keys:
                targets = [(sel, True)]
            elif sel in self._model.input_keys:
                targets = [(sel, False)]
            else:
                raise KeyMismatchError(f"{what}: '{sel}' names no parameter or input of the model; "
                                       f"the parameters are {params}, the inputs "
                                       f"{list(self._model.input_keys)}")
        else:
            raise TypeError(f"{what}: '{reg_key}' must be a parameter name or a re.Pattern, got {sel!r}")
        if key_name is not None and len(targets) > 1:
            raise ValueError(f"{what}: key_name names one output, but the pattern matches "
                             f"{[t for t, _ in targets]}")
        self._check_key_name(key_name, what, others.values())
        (model,) = self._fresh([model], what)
        for i, (target, is_param) in enumerate(targets):
            block = model if i == 0 and len(targets) == 1 else copy.deepcopy(model)
            self._regs.append(_Reg(block, out, reg_key, target, is_param, c, dict(others), key_name))

    def add_metric(self, model: Operator | Model, reduce_steps: Sequence[Any] | None = None,
                   key_name: str | None = None, **connections: str | IOKey) -> None:
        """Add the output ``key_name`` (default ``metric_<i>``): ``model`` on the connected
        names, reduced by ``reduce_steps`` (default none). It is not part of ``final_cost``."""
        self._check_open("add_metric")
        i = len(self._metrics)
        while key_name is None:  # the first metric_<i> no terminal or term uses
            try:
                self._check_key_name(f"metric_{i}", "add_metric", connections.values())
                key_name = f"metric_{i}"
            except KeyMismatchError:
                i += 1
        self._metrics.append(self._term("add_metric", model, reduce_steps, key_name, connections, False))

    def set_loss_combiner(self, combiner: Any) -> None:
        """``Sum()`` (the default) adds the reduced losses; ``Mean()`` averages them."""
        self._check_open("set_loss_combiner")
        if isinstance(combiner, (Mean, Sum)) and combiner.axis is None:
            self._mean_combiner = isinstance(combiner, Mean)
        elif combiner in ("mean", "sum"):
            self._mean_combiner = combiner == "mean"
        else:
            raise ValueError(f"set_loss_combiner: expected Mean() or Sum(), got {combiner!r}")

    def _add(self, item: Any, chain: bool) -> Model:
        raise TypeError("a TrainModel cannot be extended with |= or +=; build the model first, "
                        "then wrap it")

    # -- compile time -----------------------------------------------------------------------------
    def _finalize_for_compile(self) -> None:
        """Add the objective block (called by ``compile``; once)."""
        if self._finalized:
            return
        Model._finalize_for_compile(self)  # (lists: see Model's)
        if not self._losses:
            raise ValueError("TrainModel: add at least one loss (add_loss) before compiling")
        _, deps = self._analysis()
        obj = Objective()
        loss_names, loss_deps, loss_refs = [], [], []
        for i, term in enumerate(self._losses):
            name, refs = self._chain(obj, term, f"$loss{i}")
            loss_names.append(name)
            loss_refs.append(refs)
            used: set[str] = set()
            for v in term.connections.values():
                used |= deps.get(_name_of(v) or "", frozenset())
            loss_deps.append(used)
        for i, term in enumerate(self._metrics):
            self._chain(obj, term, f"$metric{i}")
        reg_names = []
        for j, reg in enumerate(self._regs):
            target = reg.target
            if reg.is_param:
                target = f"$reg{j}_x"
                obj |= ParameterRef(reg.target).connect(output=IOKey(target, expose=False))
            # key_name shows the regularizer's own value R(x), as published; final_cost
            # takes it scaled (coef and the losses' sizes) through an internal wire
            raw = reg.key_name or f"$reg{j}_raw"
            obj |= reg.block.connect(**{reg.reg_key: target}, **reg.connections,
                                     **{reg.out: raw if reg.key_name else IOKey(raw, expose=False)})
            groups = [loss_refs[i] for i in range(len(self._losses)) if reg.target in loss_deps[i]]
            scale = RegularizerScale(reg.coef, [[(f"s{i}_{k}", a) for k, (_, a) in enumerate(g)]
                                                 for i, g in enumerate(groups)])
            sized = {f"s{i}_{k}": w for i, g in enumerate(groups) for k, (w, _) in enumerate(g)}
            name = f"$reg{j}"
            obj |= scale.connect(input=raw, **sized, output=IOKey(name, expose=False))
            reg_names.append(name)
        final = FinalCost(len(loss_names), len(reg_names), self._mean_combiner)
        obj |= final.connect(**{f"loss{i}": n for i, n in enumerate(loss_names)},
                             **{f"reg{j}": n for j, n in enumerate(reg_names)}, output=FINAL_COST)
        Model._add(self, obj.connect(**{k: k for k in obj.terminals}), chain=False)
        hints = getattr(self._model, "_width_hints", None)
        if hints is not None:  # (ManyToOne: its output layer's width from a loss's target)
            for term in self._losses:
                given = {k: _name_of(v) for k, v in term.connections.items()}
                if given.get("target") in self.conns and given.get("input") is not None:
                    hints(self, given["input"], self.conns[given["target"]])
        self._finalized = True

    @staticmethod
    def _chain(obj: Model, term: _Term, tag: str) -> tuple[str, list[tuple[str, Any]]]:
        """Add ``term``'s block, reduce steps and coef to ``obj``; returns the name of the last
        output and, per Mean/Min/Max step, the wire it reduces with its axis."""
        stages: list[tuple[Any, str, str]] = [
            (s, _input_keys(s)[0], _single_output(s, "reduce step")) for s in term.steps]
        if term.coef is not None:
            stages.append((Scale(term.coef), "input", "output"))
        cur = f"{tag}_0" if stages or not term.key_name else term.key_name
        obj |= term.block.connect(**term.connections,
                                  **{term.out: cur if cur == term.key_name else IOKey(cur, expose=False)})
        refs = []
        for n, (block, ikey, okey) in enumerate(stages):
            last = n == len(stages) - 1
            nxt = term.key_name if last and term.key_name else f"{tag}_{n + 1}"
            obj |= block.connect(**{ikey: cur, okey: nxt if nxt == term.key_name else IOKey(nxt, expose=False)})
            if isinstance(block, (Mean, Min, Max)):
                refs.append((cur, block.axis))
            cur = nxt
        return cur, refs
