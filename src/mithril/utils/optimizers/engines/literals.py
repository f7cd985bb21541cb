"""Numeric literals in optimizer math, typed as the parameters' float inside numba kernels.

numba types a Python int or float literal as int64 / float64, and NumPy's promotion then
makes ``1 - b1`` (an int and a float32) or ``0.5 * g`` float64: a float32 kernel whose math
writes constants that way computes the whole step in float64, and LLVM does not vectorise
it (LARS's update, written so, ran at half SGD-momentum's speed). JAX, torch and NumPy 2
treat such literals as weak: they take the array's dtype. :func:`typed_literals` gives the
numba kernels the same rule, so a math runs in the parameters' float on every backend:
each int or float literal that is an operand of ``+ - * /`` becomes ``literal(c, p)``, ``c``
in the type of the math's first argument ``p`` (the parameter). Exponents (``x ** 2`` stays
a multiplication), indices, comparisons and call arguments are left as written, and so is
a function whose source cannot be read or that closes over variables.
"""

from __future__ import annotations

import ast
import functools
from typing import Any

from numba import types
from numba.extending import overload
from numba.np import numpy_support

from . import kernel_cache


def literal(c: Any, like: Any) -> Any:
    """``c`` as written (from Python); in numba code, ``c`` in ``like``'s float type."""
    return c


@overload(literal)
def _literal_nb(c, like):  # pragma: no cover - compiled by numba
    if isinstance(like, types.Float):
        cast = numpy_support.as_dtype(like).type
        return lambda c, like: cast(c)
    return lambda c, like: c


_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div)


class _Rewrite(ast.NodeTransformer):
    def __init__(self, like: str) -> None:
        self.like, self.changed = like, False

    def _wrap(self, node: ast.expr) -> ast.expr:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            self.changed = True
            return ast.Call(ast.Name("_mithril_literal", ast.Load()),
                            [node, ast.Name(self.like, ast.Load())], [])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            node.operand = self._wrap(node.operand)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.BinOp:
        self.generic_visit(node)
        if isinstance(node.op, _ARITHMETIC):
            node.left, node.right = self._wrap(node.left), self._wrap(node.right)
        return node


@functools.cache
def typed_literals(fn: Any) -> Any:
    """``fn`` with its arithmetic's literals typed as its first argument (see the module
    docs), compiled beside it; ``fn`` itself where there is nothing to rewrite or its
    source cannot be read. Called from Python, the result computes what ``fn`` does."""
    try:
        src = kernel_cache._source(fn)  # (its decorators, e.g. @staticmethod, dropped)
    except (OSError, TypeError, AttributeError, SyntaxError):  # e.g. a lambda's line
        return fn
    tree = ast.parse(src)
    node = tree.body[0]
    if fn.__code__.co_freevars or not isinstance(node, ast.FunctionDef) or not node.args.args:
        return fn
    rewrite = _Rewrite(node.args.args[0].arg)
    rewrite.visit(node)
    if not rewrite.changed:
        return fn
    ns = {**fn.__globals__, "_mithril_literal": literal}
    kernel_cache.exec_source(ast.unparse(ast.fix_missing_locations(tree)),
                             f"<mithril literals {fn.__qualname__}>", ns)
    out = ns[node.name]
    out.__defaults__, out.__qualname__ = fn.__defaults__, fn.__qualname__
    return out
