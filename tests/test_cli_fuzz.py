"""Random command lines: every one either runs (train/compare as ``--dry-run``) or ends with
argparse's usage message and exit status 2, never a traceback.

The flags are those of the real parsers; the values mix valid ones with the nasty ones
(negative, huge, non-finite, empty, paths, NUL bytes, unknown names, ``name:key=value`` specs).
``pytest -m slow`` runs the same property on ten times as many command lines.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mithril.cli import build_parser, main

COMMANDS = ("train", "compare", "plot-schedule")
#: flags whose values the fuzzer leaves alone: where files go (forced into a temporary folder)
SKIP = {"--help", "-h", "--out", "--version"}

VALUES = [
    "-5", "-1", "0", "1", "2", "3", "7", "0.5", "1.5", "1e-3", "-0.0", "1e400", "-1e400",
    "nan", "NaN", "inf", "-inf", "1" + "0" * 400, "4294967296", "0x10", "1_000", "١",
    "", " ", "abc", "\x00", "../x", "/", "a/b", "..", ".", "runs", "-", "--",
    "adam", "sgd", "cosine", "step", "plateau", "onecycle", "none", "torch", "jax", "numpy",
    "float32", "bf16", "relu", "skip", "linear",
    "step:step_size=-1", "step:step_size=10", "cosine:t_max=nan", "multistep:milestones=[2,1]",
    "adam:lr=nan", "sgd:lr=0.1,momentum=0.9,nesterov", "adam:beta1=2", "adam:scheduler=step",
    "adam:speed=3", "sgd:lr=1e400", "rmsprop:", ":", "adam:lr", "adam:lr=1,lr=2",
]


#: mostly the list above (about a third of them valid somewhere), sometimes anything
VALUE = st.one_of(st.sampled_from(VALUES), st.sampled_from(VALUES), st.sampled_from(VALUES),
                  st.sampled_from(VALUES), st.sampled_from(VALUES), st.sampled_from(VALUES),
                  st.text(max_size=8), st.integers(-10**30, 10**30).map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr))


def _good(action: argparse.Action) -> tuple[str, ...]:
    """Values of the flag's own kind, so that many lines get past parsing into the checks
    that need the whole configuration (optimizer, schedule, data split)."""
    if action.choices:
        return tuple(action.choices)
    kind = getattr(action.type, "__name__", "")
    if kind == "int":
        return ("1", "2", "3", "5", "10")
    if kind in ("finite_float", "positive_float", "fraction"):
        return ("0.1", "0.5", "0.9", "1e-3", "2")
    return ("adam", "step", "cosine:t_max=20", "onecycle", "sgd:lr=0.1", "x")


def _flags(command: str) -> list[tuple[str, bool, tuple[str, ...]]]:
    """(option string, takes a value, values of its kind) of every flag of ``command``."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for action in sub.choices[command]._actions:
        for flag in action.option_strings:
            if flag not in SKIP:
                out.append((flag, action.nargs != 0, _good(action)))
    return out


FLAGS = {c: _flags(c) for c in COMMANDS}


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(COMMANDS))
    argv = [command]
    for _ in range(draw(st.integers(0, 4))):
        flag, takes_value, good = draw(st.sampled_from(FLAGS[command]))
        argv.append(flag)
        if takes_value:
            n = draw(st.sampled_from([1, 1, 1, 2, 0]))
            argv += [draw(st.sampled_from(good) if draw(st.booleans()) else VALUE)
                     for _ in range(n)]
    if draw(st.integers(0, 7)) == 0:  # a stray positional or unknown flag now and then
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(["extra", "--nope"])))
    return argv


def run_cli(argv: list[str], out_dir: Path) -> tuple[int, str]:
    """``main(argv)`` with nothing trained or written outside ``out_dir``:
    (exit status, stderr)."""
    if argv[0] == "plot-schedule":
        argv = [*argv, "--out", str(out_dir / "s.png")]  # the last --out wins
    else:
        argv = [*argv, "--dry-run", "--out", str(out_dir / "run")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
    return status, err.getvalue()


def check(argv: list[str], out_dir: Path) -> None:
    status, err = run_cli(argv, out_dir)
    assert "Traceback" not in err
    if status != 0:
        assert status == 2, (argv, status, err)
        assert err.startswith("usage: mithril"), (argv, err)  # the command's usage or the top's
        assert "error: " in err, (argv, err)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture
def quiet_figures(monkeypatch):
    """plot-schedule draws nothing (matplotlib would take most of the time): the property is
    about the command line, and the drawing is tested in test_cli.py."""
    from mithril.cli import schedule

    def no_figure(values, path, title, marks=()):
        Path(path).write_bytes(b"")
        return path

    monkeypatch.setattr(schedule, "schedule_figure", no_figure)


FUZZ = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=200, **FUZZ)
@given(argv=command_lines())
def test_random_command_lines_parse_or_exit_2(argv, out_dir, quiet_figures, monkeypatch):
    monkeypatch.chdir(out_dir)  # a stray relative path would land here
    check(argv, out_dir)


@pytest.mark.slow
@settings(max_examples=2000, **FUZZ)
@given(argv=command_lines())
def test_random_command_lines_parse_or_exit_2_slow(argv, out_dir, quiet_figures, monkeypatch):
    monkeypatch.chdir(out_dir)
    check(argv, out_dir)


def test_the_fuzzer_reaches_both_outcomes(out_dir, quiet_figures, monkeypatch):
    """The property is not vacuous: known lines give 0 and 2."""
    monkeypatch.chdir(out_dir)
    assert run_cli(["train", "--epochs", "1"], out_dir)[0] == 0
    status, err = run_cli(["train", "--seed", "-5"], out_dir)
    assert status == 2 and "argument --seed: must be between 0 and 4294967295" in err
    status, err = run_cli(["compare", "--configs", "adam:lr=nan"], out_dir)
    assert status == 2 and "must be a finite number" in err
