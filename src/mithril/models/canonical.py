"""The canonical input and output of a block: the terminals ``model += block`` wires (see
:mod:`mithril.models.model`; ``Model.set_cin`` / ``set_cout`` choose them for a model)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

from .operator import Operator

Block = Any  # Operator | Model


def cin_key(block: Block) -> str | None:
    """The terminal of ``block`` that ``+=`` wires to the previous output: its canonical input."""
    from .model import Model

    if isinstance(block, Model) and block._cin is not None and block._cin.name in block.input_keys:
        return block._cin.name
    refs = getattr(block, "shape_args", None) if isinstance(block, Operator) else None
    ins = [k for k in block.terminals if k not in block.output_keys  # (not a shape wire's)
           and (refs is None or k not in refs.keys)]
    return ins[0] if ins else None


def cout_key(block: Block, hidden: AbstractSet[str] = frozenset()) -> str | None:
    """The terminal of ``block`` that becomes its parent's latest output: its canonical output."""
    from .model import Model

    if isinstance(block, Model) and block._cout is not None and block._cout.name in block.output_keys:
        return block._cout.name
    shown = [k for k in block.output_keys if k not in hidden]
    if not shown:
        return None
    return "output" if "output" in shown else shown[0]
