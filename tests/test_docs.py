"""The documentation stays true: every ```python block of docs/*.md runs, every `mithril ...`
command line shown parses, links between pages resolve, and the guide has its sections."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
def blocks(language: str) -> list[tuple[str, str]]:
    """(id "page.md:line", code) of every fenced block in ``language``."""
    out = []
    for page in [*PAGES, ROOT / "README.md"]:
        if not page.exists():
            continue
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == language:
                line = text.count("\n", 0, m.start()) + 1
                out.append((f"{page.relative_to(ROOT)}:{line}", m.group(2)))
    return out


PYTHON = blocks("python")
SHELL = [b for lang in ("bash", "console", "sh", "shell") for b in blocks(lang)]


def test_docs_exist():
    names = {p.name for p in PAGES}
    assert {"optimizers.md", "cli-train.md", "cli-compare.md", "cli-plot-schedule.md"} <= names
    assert len(PYTHON) >= 15


@pytest.mark.parametrize("where, code", PYTHON, ids=[w for w, _ in PYTHON])
def test_python_block_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    from mithril.utils.optimizers.engines import threads

    monkeypatch.setattr(threads, "_threads", threads._threads)  # undo set_num_threads
    x64 = _jax_x64()
    try:
        exec(compile(code, where, "exec"), {"__name__": "__docs__"})
    finally:  # a block's JaxBackend(dtype="float64") turns x64 on (documented): not for the
        if _jax_x64() != x64:  # worker's later tests
            import jax

            jax.config.update("jax_enable_x64", x64)


def _jax_x64() -> bool:
    import sys

    jax = sys.modules.get("jax")
    return jax is not None and bool(jax.config.jax_enable_x64)


def command_lines(code: str) -> list[str]:
    """Lines that run the CLI (``mithril ...`` / ``python -m mithril ...``), joined over
    backslash continuations, without a ``$`` prompt."""
    text = code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip().removeprefix("$ ")
        if line.startswith("mithril ") or line.startswith("python -m mithril "):
            out.append(line)
    return out


COMMANDS = [(w, c) for w, code in SHELL for c in command_lines(code)]


@pytest.mark.parametrize("where, line", COMMANDS, ids=[f"{w} {c[:60]}" for w, c in COMMANDS])
def test_shown_command_lines_are_valid(where, line, tmp_path, monkeypatch, capsys):
    """Each command shown is accepted: train/compare check every setting with --dry-run
    (nothing is trained), plot-schedule runs for real into a temporary folder, and so does
    cache (on a cache folder of its own)."""
    from mithril.cli import main

    argv = shlex.split(line, comments=True)
    argv = argv[3:] if argv[0] == "python" else argv[1:]
    monkeypatch.chdir(tmp_path)
    if argv[0] == "cache":
        monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path / "cache"))
    else:
        argv += ["--out", "out.png"] if argv[0] == "plot-schedule" else ["--dry-run"]
    try:
        assert main(argv) == 0
    except SystemExit as e:  # pragma: no cover - shows which line is wrong
        raise AssertionError(f"{where}: `{line}` fails: {capsys.readouterr().err}") from e


def test_every_command_has_a_page_and_examples():
    commands = {line.split()[1] for _, line in COMMANDS if line.startswith("mithril ")}
    assert {"train", "compare", "plot-schedule", "cache"} <= commands


GUIDE_SECTIONS = ["Overview", "Basic Optimization", "Using Optimizer Classes",
                  "Available Optimizers", "Learning Rate Scheduling", "Custom Optimizers",
                  "Backend-Specific Optimizers", "Advanced techniques", "Weight decay",
                  "Gradient clipping", "Learning-rate warm-up", "Mixed precision",
                  "Multi-Optimizer Training", "Best Practices"]


def test_guide_has_the_sections_of_the_seed_guide():
    headings = re.findall(r"^#+ (.+)$", (DOCS / "optimizers.md").read_text(), re.M)
    for section in GUIDE_SECTIONS:
        assert section in headings, section


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
