"""``python -m mithril ...`` runs the ``mithril`` command line (see :mod:`mithril.cli`)."""

import sys

from .cli import main

sys.exit(main())
