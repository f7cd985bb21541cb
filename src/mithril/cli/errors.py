"""The one exception the CLI turns into an argparse-style error (``mithril CMD: error: ...``)."""

from __future__ import annotations


class CLIError(Exception):
    """A user error: bad name, bad hyperparameter, unwritable path. Exit status 2, no traceback."""
