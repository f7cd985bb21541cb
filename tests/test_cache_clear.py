"""``mithril cache`` / :mod:`mithril.utils.cache`: what the kernel and JAX caches hold, and
clearing them (only their own files: a shared folder keeps the rest); after a clear the next
process compiles its kernels again and computes the same numbers."""

from __future__ import annotations

import pytest
from test_kernel_cache import _expected, _run

from mithril.cli.main import main
from mithril.utils import cache


def test_clear_removes_the_kernels_and_the_next_process_compiles_them_again(
        tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cache"
    first = _run(tmp_path, folder, seed=1)
    assert first["misses"] > 0
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(folder))
    (folder / "jax").mkdir()
    for name in ("jit_step-ab12-cache", "jit_step-ab12-atime"):
        (folder / "jax" / name).write_bytes(b"x" * 10)
    mine = [folder / "notes.txt", folder / "kernels" / "README", folder / "jax" / "mine.bin"]
    for p in mine:
        p.write_text("the user's")
    used = cache.usage()
    assert used["kernels"]["files"] > 0 and used["kernels"]["bytes"] > 0
    assert used["jax"] == {"folder": str(folder / "jax"), "files": 2, "bytes": 20}
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"kernels  {folder / 'kernels'}: {used['kernels']['files']} files" in out
    assert f"jax      {folder / 'jax'}: 2 files, 20 B" in out

    assert main(["cache", "clear", "--jax"]) == 0
    assert "jax      2 files removed" in capsys.readouterr().out
    assert cache.usage()["kernels"]["files"] == used["kernels"]["files"]
    assert main(["cache", "clear"]) == 0
    assert cache.usage()["kernels"]["files"] == 0 and cache.usage()["jax"]["files"] == 0
    assert all(p.read_text() == "the user's" for p in mine)  # (not the caches' files)

    again = _run(tmp_path, folder, seed=2)  # compiled again, the same numbers
    assert again["misses"] > 0 and again["hits"] == 0
    assert (again["w"], again["b"]) == _expected(0.5) == (first["w"], first["b"])


def test_bad_use_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["cache", "info", "--jax"])
    assert info.value.code == 2
    assert "--kernels and --jax choose what `mithril cache clear` removes" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="kinds must be a tuple of 'kernels' and 'jax'"):
        cache.clear(("numba",))
