"""What the package declares matches what the repository ships."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_license_file_is_the_license_pyproject_declares():
    # tomllib only exists from Python 3.11; the package supports 3.10.
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^license = "([^"]+)"', pyproject, re.M).group(1)
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    titles = {"Apache-2.0": ("Apache License", "Version 2.0, January 2004")}
    assert declared in titles, f"add the title of {declared} here"
    assert all(part in text for part in titles[declared])
