"""What a cached kernel's key is made of (:mod:`.kernel_cache`): a deterministic description
of the code a kernel runs and of everything it refers to (its bytecode and constants,
defaults, closure cells, the globals it loads, the modules and numba ``@overload``s behind
them), so that changing the math anywhere it reaches gives another key and a recompile,
while the same code in another process gives the same key."""

from __future__ import annotations

import hashlib
import sys
import types
from typing import Any

import numpy as np

# modules whose code is keyed by version, not read: the interpreter's and the compiler's
_VERSIONED = {"numpy", "numba", "llvmlite"}


def _names(code: types.CodeType) -> set[str]:
    """Every global name ``code`` and the code nested in it may load."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names(c)
    return out


def _external(module: str | None) -> bool:
    top = (module or "").split(".", 1)[0]
    return top in _VERSIONED or top in sys.stdlib_module_names or top == "builtins"


class _Fingerprint:
    """A deterministic description of objects a kernel refers to (see the module doc)."""

    def __init__(self) -> None:
        self._seen: dict[int, str] = {}

    def code(self, code: types.CodeType) -> str:
        consts = [self.code(c) if isinstance(c, types.CodeType) else self.of(c)
                  for c in code.co_consts]
        return repr((code.co_qualname if hasattr(code, "co_qualname") else code.co_name,
                     code.co_code.hex(), code.co_names, code.co_varnames, code.co_freevars,
                     code.co_cellvars, code.co_argcount, code.co_kwonlyargcount,
                     code.co_flags, consts))

    def globals_of(self, names: set[str], ns: dict[str, Any]) -> str:
        """The names of ``names`` bound in ``ns``; for a module of user or mithril code,
        the attributes of it named in ``names`` too (``module.helper(...)``)."""
        parts = []
        for n in sorted(names):
            if n not in ns or (n.startswith("__") and n.endswith("__")):
                continue
            v = ns[n]
            parts.append(f"{n}={self.of(v)}")
            if isinstance(v, types.ModuleType) and not _external(v.__name__):
                parts += [f"{n}.{a}={self.of(getattr(v, a))}" for a in sorted(names) if hasattr(v, a)]
        return ";".join(parts)

    @staticmethod
    def overloads(fn: Any) -> list[Any]:
        """The implementations numba ``@overload``s register for ``fn`` (public or not)."""
        return _overload_map().get(id(fn), [])

    def function(self, fn: types.FunctionType) -> str:
        if _external(fn.__module__):
            return f"fn:{fn.__module__}.{fn.__qualname__}"
        cells = []
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                cells.append(f"{name}={self.of(cell.cell_contents)}")
            except ValueError:  # an empty cell
                cells.append(f"{name}=<empty>")
        return "fn:" + "|".join((
            fn.__module__ or "", self.code(fn.__code__), self.of(fn.__defaults__),
            self.of(fn.__kwdefaults__), ";".join(cells),
            self.globals_of(_names(fn.__code__), fn.__globals__),
            ";".join(self.of(o) for o in self.overloads(fn))))

    def of(self, obj: Any) -> str:
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
            return f"{type(obj).__name__}:{obj!r}"
        if isinstance(obj, (tuple, list, frozenset, set)):
            items = [self.of(o) for o in obj]
            return f"{type(obj).__name__}({','.join(sorted(items) if isinstance(obj, (set, frozenset)) else items)})"
        if isinstance(obj, dict):
            return "dict(" + ",".join(f"{self.of(k)}:{self.of(v)}" for k, v in obj.items()) + ")"
        if isinstance(obj, np.ndarray):
            return f"array:{obj.dtype}:{obj.shape}:{hashlib.sha256(obj.tobytes()).hexdigest()}"
        if isinstance(obj, np.dtype):
            return f"dtype:{obj}"
        if isinstance(obj, types.ModuleType):
            top = obj.__name__.split(".", 1)[0]
            return f"module:{obj.__name__}:{getattr(sys.modules.get(top), '__version__', '')}"
        if isinstance(obj, type):
            return f"type:{obj.__module__}.{obj.__qualname__}"
        key = id(obj)
        if key in self._seen:  # recursion (or a shared helper): named once
            return self._seen[key] or f"<recursive {getattr(obj, '__qualname__', '?')}>"
        self._seen[key] = ""
        if isinstance(obj, types.FunctionType):
            out = self.function(obj)
        elif hasattr(obj, "py_func") and hasattr(obj, "targetoptions"):  # a numba dispatcher
            opts = sorted(f"{k}={self.of(v)}" for k, v in obj.targetoptions.items())
            out = f"dispatcher:{opts}:{self.of(obj.py_func)}"
        elif hasattr(obj, "_defn") and callable(obj._defn):  # a numba @intrinsic
            out = f"intrinsic:{self.of(obj._defn)}"
        elif isinstance(obj, types.BuiltinFunctionType) or _external(type(obj).__module__):
            r = repr(obj)
            out = f"{type(obj).__module__}.{type(obj).__qualname__}:{'' if ' at 0x' in r else r}"
        else:
            out = f"object:{type(obj).__module__}.{type(obj).__qualname__}"
            r = repr(obj)
            if " at 0x" not in r:
                out += f":{r}"
        self._seen[key] = hashlib.sha256(out.encode()).hexdigest()
        return out


#: (registrations seen, {id(function): its @overload implementations}), built once and
#: again only when numba's registry has grown (a scan of it costs ~1 ms a kernel)
_OVERLOADS: tuple[int, dict[int, list[Any]]] = (-1, {})


def _overload_map() -> dict[int, list[Any]]:
    global _OVERLOADS
    try:
        from numba.core.typing.templates import builtin_registry

        regs = builtin_registry.globals
        if _OVERLOADS[0] != len(regs):
            out: dict[int, list[Any]] = {}
            for f, ty in list(regs):
                for t in getattr(ty, "templates", ()):
                    impl = getattr(t, "_overload_func", None)
                    if impl is not None:
                        out.setdefault(id(f), []).append(impl)
            _OVERLOADS = (len(regs), out)
    except Exception:  # pragma: no cover - numba internals moved
        pass
    return _OVERLOADS[1]
