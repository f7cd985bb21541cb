"""The exceptions the CLI turns into one ``mithril CMD: error: ...`` line instead of a
traceback: :class:`CLIError` (a user error, exit status 2, with the usage line) and
:class:`TrainingError` (training had to stop, exit status 1)."""

from __future__ import annotations


class CLIError(Exception):
    """A user error: bad name, bad hyperparameter, unwritable path. Exit status 2, no traceback."""


class TrainingError(Exception):
    """Training stopped on an error it cannot go past: a non-finite gradient with
    ``--nonfinite raise`` (the message names the step, the epoch and the parameters). Exit
    status 1 (as a failed ``--nprocs`` process), after writing the steps completed before it."""
