"""The error messages the CLI pages show are the ones the commands print: every
``$ mithril ...`` line of a ```text block in docs/cli-*.md that is followed by its
``mithril CMD: error: ...`` line is run (it fails before any training) and its last stderr
line compared with the page's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mithril.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```text\n(.*?)^```", re.S | re.M)
#: shown lines that depend on the machine, not on the command (a module missing here)
MACHINE_DEPENDENT = ("missing module",)


def shown_errors() -> list[tuple[str, str, str]]:
    """(page:line, command, the error line shown after it) of every CLI page."""
    out = []
    for page in sorted(DOCS.glob("cli-*.md")):
        text = page.read_text()
        for block in FENCE.finditer(text):
            lines = block.group(1).splitlines()
            for i, line in enumerate(lines):
                if not line.startswith("$ mithril "):
                    continue
                rest = [x for x in lines[i + 1:] if not x.startswith("usage:")]
                shown = rest[0] if rest else ""
                if re.match(r"mithril [\w-]+: error: ", shown) and \
                        not any(m in shown for m in MACHINE_DEPENDENT):
                    where = f"{page.name}:{text.count(chr(10), 0, block.start()) + i + 2}"
                    out.append((where, line[2:], shown))
    return out


ERRORS = shown_errors()


def test_the_pages_show_errors():
    assert len(ERRORS) >= 10


@pytest.mark.parametrize("where, command, shown", ERRORS, ids=[w for w, _, _ in ERRORS])
def test_shown_error_is_printed(where, command, shown, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing is written, but a wrong line must not write here
    argv = shlex.split(command)[1:]
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    assert status != 0, f"{where}: `{command}` succeeds"
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    assert printed == shown, f"{where}: `{command}`"
