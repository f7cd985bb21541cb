"""Command-line interface: ``mithril train``, ``mithril compare``, ``mithril plot-schedule``.

Needs the ``cli`` extra (tqdm, matplotlib, scikit-learn): ``pip install 'mithril[cli]'``.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
