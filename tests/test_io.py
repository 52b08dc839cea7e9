"""retain.io's locks: exclusive between open files, released on unlock or close, and the only place that
touches a platform's locking module (so that the package imports on Windows, where fcntl does not exist)."""

from __future__ import annotations

import ast
from pathlib import Path

from retain.io import try_lock, unlock

SRC = Path(__file__).resolve().parents[1] / "src" / "retain"


def test_a_held_lock_refuses_a_second_open_file_until_it_is_released(tmp_path):
    path = tmp_path / ".lock"
    with open(path, "a+") as first, open(path, "a+") as second:
        assert try_lock(first)
        assert not try_lock(second)
        unlock(first)
        assert try_lock(second)
        unlock(second)


def test_closing_the_file_releases_its_lock(tmp_path):
    path = tmp_path / ".lock"
    first = open(path, "a+")
    assert try_lock(first)
    first.close()
    with open(path, "a+") as second:
        assert try_lock(second)


def test_only_retain_io_imports_a_platform_locking_module():
    importers = []
    for file in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] in ("fcntl", "msvcrt") for name in names):
                importers.append(str(file.relative_to(SRC)))
    assert sorted(set(importers)) == ["io.py"]
