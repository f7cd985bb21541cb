"""A model compiled for one backend: parameters, evaluation and gradients."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..backends.backend import Backend
from ..errors import InputValueError, KeyMismatchError, ShapeError
from ..models.context import RunContext
from ..models.model import Model
from ..models.operator import Operator, fmt
from .array_checks import check_array, handed_out, warn_traced_random
from .concrete_checks import ConcreteChecksMixin
from .key_names import key_names, keyed_by_name
from .list_inputs import ListInputsMixin, ListLengthError
from .listing import program_listing, summary_text, write_listing
from .output_gradients import OutputGradientsMixin, _check_keys, _distinct
from .program import Program, build_program
from .steady import SteadyCallsMixin


def signature(arrays: Mapping[str, Any]) -> tuple | None:
    """Each key with its array's type, shape and dtype, in order (None where a value is not
    an array): what the checks of a call's arrays depend on, short of their values."""
    try:
        return tuple([(k, type(v), v.shape, v.dtype) for k, v in arrays.items()])
    except AttributeError:
        return None


class CompiledModel(SteadyCallsMixin, ConcreteChecksMixin, OutputGradientsMixin):
    """What :func:`mithril.compile` returns.

    ``evaluate(params, inputs)`` returns a dict of outputs;
    ``evaluate(params, inputs, output_gradients=...)`` returns ``(outputs, gradients)``
    where ``gradients[name]`` is the vector-Jacobian product for parameter ``name``
    (outputs missing from ``output_gradients`` get zero cotangents).

    **Modes, randomness and state** (models with ``Dropout`` / ``BatchNorm*``):

    * ``inference`` (set by ``compile(..., inference=...)``, default ``False``) is the default
      mode; ``evaluate(..., training=True/False)`` overrides it for one call. Training mode:
      Dropout drops and BatchNorm normalises by the batch statistics (and updates its running
      ones); inference mode: Dropout is the identity and BatchNorm uses the running statistics.
    * Dropout masks are a hash of ``(seed, step, block, element)``, the same on every backend
      (:mod:`mithril.models.context`). ``seed`` is the backend's seed at compile time;
      ``step`` counts the training-mode evaluations of a model that draws random bits: each
      such ``evaluate`` uses the current ``step`` and then adds one. ``evaluate(...,
      step=n)`` uses ``n`` instead and leaves the counter alone (say, to give the forward
      and a separate gradient pass the same mask, or inside your own ``jax.jit``).
      Setting ``compiled.seed`` / ``compiled.step`` replays a run.
    * State (BatchNorm's running statistics, ``state_shapes``) is never kept inside: start
      from ``initial_state_dict`` and pass ``evaluate(..., state=state)``, which then returns
      the new state last: ``(outputs, state)`` or ``(outputs, gradients, state)``. A model
      with state needs it on every call; without ``state=`` (and a model without state)
      ``evaluate`` returns what it always has.
    """

    def __init__(self, model: Model | Operator, backend: Backend,
                 shapes: Mapping[str, Any] | None = None, jit: bool = True,
                 trainable_keys: Any = (), inference: bool = False, constant_keys: Any = None,
                 data_keys: Any = (), discard_keys: Any = (),
                 file_path: str | os.PathLike[str] | None = None) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a mithril Backend, got {type(backend).__name__}")
        if not isinstance(inference, (bool, np.bool_)):
            raise TypeError(f"compile(inference=...) must be a bool, got {inference!r}")
        if isinstance(model, Model) and not model.output_keys:  # as published (a KeyError)
            raise KeyMismatchError("compile: the model has no outputs (no blocks, or none exposed)")
        self.backend = backend
        self.jit = jit
        self.inference = bool(inference)
        self.file_path = file_path
        #: the random stream: masks are a function of (seed, step); see the class docstring
        self.seed: int = int(backend.seed)
        self.step: int = 0
        self._params: dict[str, Any] | None = None
        self._program: Program | None = None
        self._last_prepared: tuple | None = None  # see _prepare
        self._last_cots: tuple | None = None  # see _cotangents
        # keys may be connection objects (model.input), as published: named here
        self._build = dict(model=model, trainable_keys=key_names(model, trainable_keys, "trainable_keys"),
                           data_keys=key_names(model, data_keys, "data_keys"),
                           constant_keys=keyed_by_name(model, constant_keys, "constant_keys"),
                           discard_keys=key_names(model, discard_keys, "discard_keys"))
        shapes = keyed_by_name(model, shapes, "shapes")
        try:
            self._set_program(build_program(shapes=shapes, **self._build))  # type: ignore[arg-type]
        except ShapeError as e:
            # as published, a model compiled without any shapes may wait for its first
            # evaluate's inputs to give them; anything else is an error now
            if shapes or not (str(e).startswith("cannot infer the shape of parameter")
                              or isinstance(e, ListLengthError)):
                raise
            self._deferred = e
            self._write_deferred_listing()

    def _set_program(self, prog: Program) -> None:
        self._program = prog
        self._last_prepared = self._last_cots = None
        self._steady = self._steady_fwd = self._steady_ins = None  # (see .steady)
        self._eval = self.backend.evaluator(prog, self.jit)
        self._consts = {k: self.backend.array(v) for k, v in prog.constants.items()}
        if self.file_path is not None:
            write_listing(self.file_path, self.listing())

    @property
    def program(self) -> Program:
        """The flattened program. A model compiled without shapes whose parameter shapes
        depend on its inputs' has none until the first ``evaluate(params, inputs)``: until
        then this is the ``ShapeError`` saying so."""
        if self._program is None:
            raise ShapeError(f"{self._deferred}; or call evaluate(params, inputs) first: a model "
                             "compiled without shapes is built for its first inputs' shapes")
        return self._program

    def listing(self) -> str:
        """A readable listing of the program (what ``compile(file_path=...)`` writes): inputs,
        parameters, one line per operator and the outputs, every line a ``#`` comment."""
        return program_listing(self.program, self.backend, self.jit)

    def _build_for(self, inputs: Mapping[str, Any]) -> None:
        """Build a deferred program for the shapes of ``inputs`` (see :attr:`program`)."""
        shapes = {k: tuple(getattr(v, "shape", None) or np.shape(v)) for k, v in inputs.items()}
        self._set_program(build_program(shapes=shapes, **self._build))  # type: ignore[arg-type]

    # -- description -----------------------------------------------------------------
    @property
    def input_keys(self) -> tuple[str, ...]:
        return self._program_inputs

    @property
    def _program_inputs(self) -> tuple[str, ...]:  # (a list input's elements one by one)
        return tuple(k for k in self.program.inputs if k not in self.program.constants)

    @property
    def output_keys(self) -> tuple[str, ...]:
        return tuple(self.program.outputs)

    @property
    def shapes(self) -> dict[str, tuple | None]:
        p = self.program
        return {**{k: p.input_shape(k) for k in self._program_inputs}, **{k: p.output_shape(k) for k in p.outputs},
                **p.param_shapes}

    @property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.program.param_shapes)

    def reached_parameters(self, outputs: str | Iterable[str] | None = None) -> tuple[str, ...]:
        """The parameters (trainable inputs included, in ``parameter_shapes`` order) that the
        outputs ``outputs`` (a key, keys, or None: every output) depend on: those whose
        gradient ``evaluate(..., output_gradients={...})`` can make nonzero when only these
        outputs have cotangents. The others get zeros there, where torch leaves their
        ``.grad`` None (and ``torch.optim`` skips them). Read from the program's structure,
        not from values: a parameter met through a zero derivative (a dead ReLU) counts, as
        torch gives it a zero ``.grad``. Model state (BatchNorm's running statistics) is no
        parameter. Cached per set of outputs."""
        p = self.program
        keys = tuple(p.outputs) if outputs is None else (outputs,) if isinstance(outputs, str) \
            else tuple(outputs)
        unknown = sorted(str(k) for k in keys if k not in p.outputs)
        if unknown:
            raise KeyMismatchError(f"reached_parameters: unknown output key(s) {unknown} (the "
                                   f"outputs are {sorted(p.outputs)})")
        return p.reached_params(keys)

    def get_shapes(self) -> dict[str, list[int | None] | None]:
        """The shapes of the inputs, outputs and parameters as lists (``None``: a free
        dimension), as the published ``get_shapes()``."""
        return {k: None if s is None else list(s) for k, s in self.shapes.items()}

    def summary(self, depth: int | None = None, shapes: bool = True, print_info: bool = True,
                name: str | None = None, *, print_fn: Any = print) -> str | None:
        """A table of layers, output shapes and parameter counts: printed (with
        ``print_fn``) and ``None`` returned, or returned and not printed when
        ``print_info=False`` or ``print_fn=None``. ``depth=k`` folds the rows into the
        blocks ``k`` levels down (``depth=1``: one row per top-level block; default: one row
        per operator); ``shapes=False`` leaves out the shape column; ``name`` titles it."""
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise ValueError(f"summary(depth=...) must be an int >= 1 or None, got {depth!r}")
        text = summary_text(self.program, self.backend, depth, shapes, name,
                            inference=self.inference, seed=self.seed, step=self.step)
        if print_fn is None or not print_info:
            return text
        print_fn(text)
        return None

    # -- parameters --------------------------------------------------------------------
    def randomize_params(self, excluded_keys: Any = None) -> dict[str, Any]:
        """Fresh parameters from the backend's generator (see ``backend.set_seed``); those
        named in ``excluded_keys`` (as published) are neither drawn nor returned, nor is
        ``get_parameters`` then changed. An unknown name is a ``KeyMismatchError``."""
        shapes = self.program.param_shapes
        if excluded_keys is None:
            excluded: set[str] = set()
        else:
            excluded = {excluded_keys} if isinstance(excluded_keys, str) else set(excluded_keys)
            unknown = sorted(map(str, excluded - set(shapes)))
            if unknown:
                raise KeyMismatchError(f"randomize_params(excluded_keys=...): unknown key(s) "
                                       f"{unknown} (the parameters are {sorted(shapes)})")
        params = {name: self.backend.init_param(shape, self.program.param_init[name])
                  for name, shape in shapes.items() if name not in excluded}
        if not excluded:
            self._params = params
        return handed_out(self.backend, params)

    def get_parameters(self) -> dict[str, Any]:
        """The model's parameters (initialised on first call), keyed by name."""
        if self._params is None:
            self.randomize_params()
        return handed_out(self.backend, self._params)  # type: ignore[arg-type]

    # -- state -------------------------------------------------------------------------
    @property
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the model state arrays (BatchNorm's running statistics), keyed by name."""
        return dict(self.program.state_shapes)

    @property
    def initial_state_dict(self) -> dict[str, Any]:
        """A fresh initial state, as torch initialises its buffers: running means 0, running
        variances 1, ``num_batches_tracked`` 0 (integer)."""
        b, p = self.backend, self.program
        out = {}
        for name, shape in p.state_shapes.items():
            kind = p.state_init[name]
            if kind == "int_zeros":
                out[name] = b.array(np.zeros(shape, dtype=np.int64), b.int_dtype)
            else:
                out[name] = b.init_param(shape, kind)
        return out

    def _validate_state(self, state: Any) -> dict[str, Any]:
        p = self.program
        if not isinstance(state, Mapping):
            raise TypeError(f"evaluate(state=...) must be a dict keyed by name, got {type(state).__name__}")
        _check_keys(state, p.state_shapes, "state")
        fdtype = self.backend.native_dtype()
        return {k: self._check_array("state", k, state[k], shape,
                                     "int" if p.state_init[k] == "int_zeros" else "float", fdtype)
                for k, shape in p.state_shapes.items()}

    def _run_context(self, training: Any, state: Any, step: Any) -> RunContext | None:
        """The mode, randomness and state of one call, checked (``None``: the program has no
        context operators, and no state was given)."""
        p = self.program
        if training is None:
            training = not self.inference
        elif not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"evaluate(training=...) must be a bool, got {training!r}")
        if step is not None and not hasattr(step, "dtype") and (
                not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0):
            raise ValueError(f"evaluate(step=...) must be an int >= 0, got {step!r}")
        if state is None:
            if p.state_shapes:
                raise KeyMismatchError(
                    f"this model keeps state {sorted(p.state_shapes)}: pass "
                    "state=compiled.initial_state_dict to evaluate(..., state=...) or to a "
                    "train step's step(..., state=...), and keep the state it returns")
        else:
            state = self._validate_state(state)
        if not p.has_context:
            return None
        use = self.step if step is None else step
        if step is None and training and p.has_random:
            self.step += 1
        return RunContext(bool(training), self.seed, use, state)

    # -- evaluation --------------------------------------------------------------------
    def _check_array(self, kind: str, key: str, x: Any, pattern: tuple | None, want: str,
                     fdtype: Any, also: str | None = None) -> Any:
        """``x`` checked and converted for this backend (see :func:`check_array`)."""
        return check_array(self.backend, kind, key, x, pattern, want, fdtype, also)

    def _validate(self, params: Mapping[str, Any], inputs: Mapping[str, Any]) -> tuple[dict, dict]:
        ps, ins, _, _ = self._prepare(params, inputs, partial=False)
        return ps, ins

    def _prepare(self, params: Mapping[str, Any], inputs: Mapping[str, Any],
                 partial: bool) -> tuple[dict, dict, Program, dict]:
        """Checked params and inputs, and the program to run: the whole one, or with
        ``partial`` and some inputs left out, the part that computes the outputs those inputs
        do not feed (prediction without labels)."""
        p = self.program
        if not isinstance(params, Mapping) or not isinstance(inputs, Mapping):
            raise TypeError("evaluate(params, inputs): both must be dicts keyed by name")
        # a loop calls with arrays of the keys, types, shapes and dtypes of its last call:
        # those passed every check but the value checks unchanged (nothing was converted)
        sig = (partial, signature(params), signature(inputs))
        last = self._last_prepared
        if sig[1] is not None and sig[2] is not None and last is not None and last[0] == sig:
            ins = dict(inputs)
            ins.update(self._consts)
            return dict(params), ins, last[1], self._check_concrete(ins, last[1])
        gone = sorted(k for k in (*params, *inputs) if k in p.pruned)
        if gone:  # (else "unknown key": say why it is unknown)
            raise KeyMismatchError(f"evaluate: {gone} only fed blocks that compile(discard_keys=...) "
                                   "dropped; leave them out")
        folded = sorted(k for k in inputs if k in p.constants and k not in self._program_inputs)
        if folded:  # (the published Mithril ignores them: a ported loop passes them again)
            raise KeyMismatchError(f"evaluate: {folded} are constants (compile(constant_keys=...) "
                                   "or IOKey(value=...)) folded in at compile time; leave them out")
        _check_keys(params, p.param_shapes, "params")
        _check_keys(inputs, self._program_inputs, "inputs", allow_missing=partial)
        if partial and len(inputs) < len(self._program_inputs):
            p = self._partial(frozenset(k for k in self._program_inputs if k not in inputs))
        check, fdtype = self._check_array, self.backend.native_dtype()
        ps = {k: check("parameter", k, params[k], shape, "float", fdtype)
              for k, shape in p.param_shapes.items()}
        ins = {k: check("input", k, v, p.input_shape(k), p.input_kinds[k], fdtype)
               for k, v in inputs.items()}
        ins.update(self._consts)
        out_shapes = self._check_concrete(ins, p)
        if (sig[1] is not None and sig[2] is not None and list(ps) == list(params)
                and all(ps[k] is v for k, v in params.items())
                and all(ins[k] is v for k, v in inputs.items())):
            self._last_prepared = (sig, p)
        return ps, ins, p, out_shapes

    def _partial(self, missing: frozenset[str]) -> Program:
        """The program without the inputs ``missing``: only the outputs they do not feed,
        and only the nodes those outputs need (cached, with its evaluator, per set)."""
        cache = self.__dict__.setdefault("_partials", {})
        if missing in cache:
            return cache[missing][0]
        p = self.program
        lost = {p.inputs[k] for k in missing}
        for node in p.nodes:
            if any(w in lost for w in node.ins.values()):
                lost.add(node.out)
        outs = {k: w for k, w in p.outputs.items() if w not in lost}
        if not outs:
            raise KeyMismatchError(f"inputs: missing key(s) {sorted(missing)}: every output "
                                   f"{sorted(p.outputs)} needs them (expected keys: "
                                   f"{sorted(self._program_inputs)})")
        need = set(outs.values())
        nodes = []
        for node in reversed(p.nodes):
            if node.out in need:
                nodes.append(node)
                need.update(node.ins.values())
        sub = dataclasses.replace(p, nodes=nodes[::-1], outputs=outs,
                                  inputs={k: w for k, w in p.inputs.items() if k not in missing})
        cache[missing] = (sub, self.backend.evaluator(sub, self.jit))
        return sub

    def _evaluator_of(self, prog: Program) -> Any:
        if prog is self.program:
            return self._eval
        return next(ev for q, ev in self.__dict__["_partials"].values() if q is prog)

    def scalar_output(self) -> str:
        """The output ``evaluate(..., output_gradients=True)`` differentiates: ``final_cost``
        (a :class:`~mithril.models.TrainModel`), else the model's single output, which must
        be a scalar."""
        outs = self.program.outputs
        key = "final_cost" if "final_cost" in outs else next(iter(outs)) if len(outs) == 1 else None
        if key is None:
            raise KeyMismatchError(f"output_gradients=True differentiates 'final_cost' or the single "
                                   f"output; this model has outputs {sorted(outs)}: give a dict of "
                                   "output gradients instead")
        shape = self.program.output_shape(key)
        if shape is not None and shape != ():
            raise ShapeError(f"output_gradients=True needs a scalar output; '{key}' has shape "
                             f"{fmt(shape)}: give a dict of output gradients instead")
        return key

    def evaluate_gradients(self, params: Mapping[str, Any] | None = None,
                           inputs: Mapping[str, Any] | None = None,
                           output_gradients: Mapping[str, Any] | bool = True, *,
                           data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The gradients alone (the published ``evaluate_gradients``)."""
        return self.evaluate(params, inputs, output_gradients, data=data)[1]

    def evaluate(self, params: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, Any] | None = None,
                 output_gradients: Mapping[str, Any] | bool | None = None, *,
                 data: Mapping[str, Any] | None = None,
                 state: Mapping[str, Any] | None = None, training: bool | None = None,
                 step: int | None = None) -> Any:
        """Outputs, or ``(outputs, gradients)`` when ``output_gradients`` is given: a dict of
        output cotangents, or ``True`` for the gradient of ``final_cost`` (or of the single
        scalar output), i.e. a cotangent of 1 for it.

        ``params`` may be left out for a model without parameters; ``data=`` is the
        published name of ``inputs``. Inputs may be left out when some outputs do not need
        them (a prediction without labels): only those outputs are computed and returned.

        ``state``: the model state (see :attr:`initial_state_dict`); when given, the new
        state is returned last, ``(outputs, state)`` or ``(outputs, gradients, state)``; a
        model with state requires it. ``training``: this call's mode (default: training
        unless compiled with ``inference=True``). ``step``: the random step to use (default:
        the model's counter, which a training-mode call then advances). Everything is
        checked before anything runs or the counter moves."""
        if data is None and state is None and training is None and step is None:
            # (a loop's steady state: see .steady)
            got = self._steady_evaluate(params, inputs, output_gradients)
            if got is not None:
                return got
        if data is not None:
            if inputs is not None:
                raise TypeError("evaluate(): give the inputs once, as inputs or as data=")
            inputs = data
        built_here = self._program is None and bool(inputs)
        if built_here:
            self._build_for(inputs)
        try:
            return self._call(params, inputs, output_gradients, state, training, step)
        except BaseException:
            if built_here:  # a call that raises changes nothing: the program it built for its
                self._unbuild()  # (refused) inputs' shapes would refuse every later call
            raise

    def _unbuild(self) -> None:
        """Back to a deferred program (see :attr:`program`), as before the first evaluate."""
        self._program = None
        self._last_prepared = self._last_cots = None
        self._steady = self._steady_fwd = self._steady_ins = None  # (see .steady)
        self._write_deferred_listing()

    def _write_deferred_listing(self) -> None:
        if self.file_path is not None:
            write_listing(self.file_path, program_listing(None, self.backend, self.jit, note=(
                f"Not built yet: {self._deferred}. The first evaluate builds the program for the "
                "shapes of its inputs and rewrites this file.")))

    def _call(self, params: Any, inputs: Any, output_gradients: Any, state: Any,
              training: Any, step: Any) -> Any:
        """:meth:`evaluate` once the program is built."""
        given = params, inputs, output_gradients
        if output_gradients is True:
            output_gradients = {self.scalar_output(): 1.0}
        elif output_gradients is False:
            output_gradients = None
        elif output_gradients is not None and not isinstance(output_gradients, Mapping):
            raise TypeError("evaluate(output_gradients=...) must be a dict of output cotangents "
                            f"keyed by output name, or True, got {type(output_gradients).__name__}")
        params, inputs, prog, out_shapes = self._prepare(
            {} if params is None else params, {} if inputs is None else inputs, partial=True)
        if output_gradients is not None and prog is not self.program:
            lost = sorted(set(output_gradients) - set(prog.outputs))
            if lost:
                raise KeyMismatchError(f"output_gradients: output(s) {lost} need the inputs "
                                       f"{sorted(set(self._program_inputs) - set(inputs))}, not given")
        if output_gradients is not None:
            self._check_differentiable(output_gradients, inputs, prog)
        cots = None if output_gradients is None else self._cotangents(output_gradients)
        if cots is not None:
            self._check_bound(cots, out_shapes)
        given_state = state
        step_before = self.step
        run = self._run_context(training, state, step)
        if run is not None and step is None and run.training and self.program.has_random:
            warn_traced_random(params, inputs)
        try:
            result = self._evaluate(params, inputs, cots, run, self._evaluator_of(prog))
            if cots is not None:
                result = (result[0], _distinct(result[1], cots), *result[2:])
        except BaseException:
            self.step = step_before
            raise
        if given_state is None:
            if run is None and training is None and step is None and prog is self.program:
                self._keep_steady(given, params, inputs, output_gradients, cots)
            return result
        new_state = dict(run.state) if run is not None else {}
        if run is not None:
            new_state.update(run.new_state)
        return (*result, new_state) if isinstance(result, tuple) else (result, new_state)

    def _evaluate(self, params: dict[str, Any], inputs: dict[str, Any],
                  cots: dict[str, Any] | None, run: RunContext | None, ev: Any = None) -> Any:
        ev = self._eval if ev is None else ev
        try:
            if cots is None:
                return (ev.forward(params, inputs, run) if run is not None
                        else ev.forward(params, inputs))
            if run is None:
                return ev.forward_vjp(params, inputs, cots)
            return ev.forward_vjp(params, inputs, cots, run)
        except InputValueError:  # an operator refused values it checks itself (NumPy): the
            prog = getattr(ev, "prog", None)  # compiler's checks name the data key
            if prog is not None:
                self._check_concrete(inputs, prog, every_value=True)
            raise


class ListInputsCompiledModel(ListInputsMixin, CompiledModel):
    """A :class:`CompiledModel` whose list inputs take lists (:mod:`.list_inputs`)."""


def compile(model: Model | Operator, backend: Backend, shapes: Mapping[str, Any] | None = None,
            jit: bool = True, *, trainable_keys: Any = (), inference: bool = False,
            constant_keys: Mapping[str, Any] | None = None, data_keys: Any = (),
            discard_keys: Any = (), file_path: str | os.PathLike[str] | None = None,
            safe_shapes: bool = True, safe_names: bool = True,
            use_short_namings: bool = True) -> CompiledModel:
    """Flatten ``model``, infer every shape and build its evaluation for ``backend``.

    ``shapes`` declares terminal shapes (``None`` entries are free dimensions);
    ``jit`` compiles the forward and forward+VJP with ``jax.jit`` on JAX;
    ``trainable_keys`` names inputs to treat as parameters (given in ``params``, with
    gradients), as the published Mithril's ``compile(trainable_keys=...)``;
    ``inference=True`` makes inference the default mode of ``evaluate`` (Dropout off,
    BatchNorm on its running statistics; gradients are still available);
    ``constant_keys`` ({name: value}) folds values in for inputs (no longer given to
    ``evaluate``); ``data_keys`` keeps inputs as data, also those that feed a parameter role
    (``connect(weight="w")``), which are parameters otherwise; ``discard_keys`` drops outputs.
    ``constant_keys``, ``data_keys`` and ``trainable_keys`` may also name a parameter by its
    compiled name (``"linear_0.weight"``): a constant, a data input, or (already) trainable.
    ``file_path`` writes a readable listing of the program there (:meth:`CompiledModel.listing`;
    no code is generated here, unlike the published Mithril).

    Without any ``shapes`` (nor shapes declared on the model) a model whose parameter shapes
    follow from its inputs' is built at its first ``evaluate(params, inputs)``, for those
    inputs' shapes, as the published Mithril allows; until then ``randomize_params`` and the
    shape queries raise the ``ShapeError``.

    ``safe_shapes``, ``safe_names``, ``use_short_namings``: the published switches for its
    generated code, accepted (bools) and without effect: shapes are always checked here.
    """
    for flag, value in (("safe_shapes", safe_shapes), ("safe_names", safe_names),
                        ("use_short_namings", use_short_namings)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"compile({flag}=...) must be a bool, got {value!r}")
    return ListInputsCompiledModel(
        model, backend, shapes=shapes, jit=jit, trainable_keys=trainable_keys, inference=inference,
        constant_keys=constant_keys, data_keys=data_keys, discard_keys=discard_keys, file_path=file_path)
