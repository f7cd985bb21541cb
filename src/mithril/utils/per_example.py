"""Per-example gradients of a compiled model: what differentially private training
(:class:`~mithril.utils.optimizers.DifferentiallyPrivate`, :class:`~.optimizers.DPSGD`)
clips one by one.

``per_example_gradients(compiled, params, data, loss)["w"][i]`` is the gradient of ``loss``
evaluated on example ``i`` alone (``data[k][i:i+1]`` for every batched key ``k``): the
model runs on a batch of one, so a loss that averages over its batch (CrossEntropy's and
SquaredError's default ``"mean"``) is that example's own loss, and a summed one too. (The
gradient of the whole batch's mean loss is the mean of these rows; of its summed loss,
their sum.) This is ``torch.func.vmap(torch.func.grad(loss_of_one))`` over the batch and
optax's input convention for ``optax.contrib.dpsgd`` (the batch axis first).

How each backend computes them: JAX maps the model's own jitted forward+VJP over the
examples with ``jax.vmap`` (one program per model, loss and input signature); NumPy and
torch evaluate the examples one at a time (the model's forward and backward at batch size
one, the gradients copied into the rows of the result).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import KeyMismatchError, ShapeError

__all__ = ["per_example_gradients"]

#: JAX: the vmapped, jitted program per evaluator (a rebuilt program has a new one)
_VMAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: the input signatures found to run at a batch of one, per compiled model
_ONE_FITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _checked(compiled: Any, params: Mapping[str, Any], data: Mapping[str, Any], loss: str,
             unbatched: frozenset[str]) -> tuple[dict, dict, int, dict]:
    """The model's checks of ``params`` and ``data``, at the batch's size and at a batch of
    one: (params, inputs, batch size, cotangents), or the error naming what is wrong."""
    from .training import _loss_key

    if getattr(compiled, "_program", None) is None:
        raise ShapeError("per_example_gradients: the model was compiled without shapes; "
                         "compile it with shapes whose batch dimension is None (e.g. "
                         "shapes={'input': [None, 8]}) so it runs at a batch of one too")
    prog = compiled.program
    if prog.has_context:
        raise TypeError("per_example_gradients: the model has Dropout or BatchNorm (random "
                        "masks or batch statistics), whose per-example gradients are not those "
                        "of the example alone; compile a model without them")
    _loss_key(compiled, loss, "per_example_gradients")
    if not isinstance(data, Mapping):
        raise TypeError("per_example_gradients: data must be a dict of arrays keyed by input")
    unknown = sorted(unbatched - set(data))
    if unknown:
        raise KeyMismatchError(f"per_example_gradients: unbatched keys {unknown} are not in "
                               f"the data (keys: {sorted(data)})")
    batched = {k: v for k, v in data.items() if k not in unbatched}
    if not batched:
        raise ValueError("per_example_gradients: no batched input (every data key is in "
                         "unbatched)")
    sizes = {k: tuple(getattr(v, "shape", ())) for k, v in batched.items()}
    flat = sorted(k for k, s in sizes.items() if len(s) == 0)
    if flat:
        raise ShapeError(f"per_example_gradients: data {flat} have no batch axis (shape ()); "
                         f"pass such inputs in unbatched=")
    n = {s[0] for s in sizes.values()}
    if len(n) != 1:
        raise ShapeError("per_example_gradients: the batched inputs disagree on the batch size "
                         f"(axis 0): {', '.join(f'{k!r} {s}' for k, s in sizes.items())}")
    b = n.pop()
    ps, ins, _, _ = compiled._prepare(params, data, partial=False)
    if b == 0:  # (a Poisson-sampled batch may be empty: no rows, nothing to run)
        return ps, ins, b, {}
    # (the program must take a batch of one, which a fixed batch size does not: a question of
    # the inputs' shapes and dtypes, asked once per signature; the values passed above)
    sig = (id(prog), tuple((k, tuple(v.shape), str(v.dtype)) for k, v in ins.items()))
    seen = _ONE_FITS.setdefault(compiled, set())
    if sig not in seen:
        try:
            outs = compiled._check_concrete({**ins, **{k: ins[k][:1] for k in batched}})
        except ShapeError as e:
            raise ShapeError(f"per_example_gradients: the model does not run on a batch of "
                             f"one example (compile it with shapes whose batch dimension is "
                             f"None): {e}") from None
        got = outs.get(loss)  # (a shape unknown when compiled: NumPy summed a non-scalar)
        if got is not None and tuple(got) != ():
            raise ShapeError(f"per_example_gradients: the loss {loss!r} must be a scalar "
                             f"output, it has shape {tuple(got)} for one example")
        seen.add(sig)
    return ps, ins, b, compiled._cotangents({loss: 1.0})


def per_example_gradients(compiled: Any, params: Mapping[str, Any], data: Mapping[str, Any],
                          loss: str = "final_cost", *, unbatched: Iterable[str] = ()
                          ) -> dict[str, Any]:
    """The gradient of output ``loss`` (a scalar output, ``"final_cost"`` of a
    :class:`~mithril.models.TrainModel` by default) for each example of ``data`` alone (the
    module docs): ``{param: array of shape (batch, *param's shape)}`` for every trainable
    parameter, in the backend's arrays (zeros for a parameter the loss does not reach).

    Every key of ``data`` is split along axis 0 (all of the same length, the batch) but
    those in ``unbatched``, which every example sees whole. An empty batch (Poisson sampling
    may draw one) has rows of shape ``(0, *param's shape)``. The model must run at a batch
    of one (compiled with a ``None`` batch dimension) and hold no Dropout or BatchNorm. The
    params and data are checked as ``evaluate`` checks them; the model's state (its random
    step counter) does not change."""
    ps, ins, b, cots = _checked(compiled, params, data, loss, frozenset(unbatched))
    if b == 0:  # (every parameter's rows: none)
        be = compiled.backend
        return {k: be.zeros((0, *tuple(v.shape)), dtype=_dtype_name(v)) for k, v in ps.items()
                if k in compiled.parameter_shapes}
    batched = [k for k in data if k not in frozenset(unbatched)]
    if compiled.backend.name == "jax":
        return _jax_rows(compiled, ps, ins, cots, batched)
    if compiled.backend.name == "torch":  # (autograd's gradients are new tensors: stacked)
        import torch

        rows = _rows(compiled, ps, ins, cots, batched, {k: ins[k].split(1) for k in batched})
        return {n: torch.stack(gs) for n, gs in rows.items()}
    import numpy as np

    out: dict[str, Any] = {}
    for i in range(b):  # (rows copied as they come: the next pass may reuse a buffer)
        one = {**ins, **{k: ins[k][i:i + 1] for k in batched}}
        for name, g in compiled._evaluate(ps, one, cots, None)[1].items():
            if name not in out:
                out[name] = np.empty((b, *g.shape), dtype=g.dtype)
            out[name][i] = g
    return out


def _dtype_name(array: Any) -> str:
    return str(array.dtype).removeprefix("torch.")


def _rows(compiled: Any, ps: dict, ins: dict, cots: dict, batched: list[str],
          pieces: dict[str, Any]) -> dict[str, list[Any]]:
    """Each example's gradients (a list per parameter), from its ``pieces`` (batches of one)."""
    out: dict[str, list[Any]] = {}
    for i in range(len(next(iter(pieces.values())))):
        one = {**ins, **{k: pieces[k][i] for k in batched}}
        for name, g in compiled._evaluate(ps, one, cots, None)[1].items():
            out.setdefault(name, []).append(g)
    return out


def _jax_rows(compiled: Any, ps: dict, ins: dict, cots: dict, batched: list[str]) -> dict:
    """``jax.vmap`` of the model's forward+VJP over the examples, each a batch of one."""
    import jax

    ev = compiled._eval
    key = (tuple(sorted(batched)), tuple(sorted(cots)))
    progs = _VMAPPED.setdefault(ev, {})
    if key not in progs:
        def rows(ptuple: tuple, many: dict, whole: dict, cots: dict) -> Any:
            def one(example: dict) -> Any:
                return ev._fwd_vjp(ptuple, {**whole, **example}, cots)[1]

            return jax.vmap(one)({k: v[:, None] for k, v in many.items()})  # (batches of one)

        progs[key] = jax.jit(rows)
    many = {k: ins[k] for k in batched}
    whole = {k: v for k, v in ins.items() if k not in many}
    grads = progs[key](tuple(ps[k] for k in ev.names), many, whole, cots)
    return dict(zip(ev.names, grads, strict=True))
