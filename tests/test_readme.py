"""The README's tour, as a newcomer types it after `make demo`: the paths it names are the ones the
commands produce, and its `retain run` lines are accepted (as dry runs: nothing trains here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from retain.config import load_config

from .helpers import retain_in_process

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _tour_lines() -> list[str]:
    block = README.split("### Running", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_the_tour_names_the_run_directories_the_demo_and_its_variants_write(monkeypatch):
    monkeypatch.chdir(ROOT)
    demo = load_config("examples/quickstart.yaml").output_dir
    replay = load_config("examples/quickstart.yaml", ["method.name=replay"]).output_dir
    assert (demo, replay) == ("runs/quickstart/sequential", "runs/quickstart/replay")
    assert f"writes `{demo}/`" in README
    lines = _tour_lines()
    assert f"retain eval {demo}" in lines
    assert f"retain metrics {replay}/results.json" in lines


def test_the_setup_says_how_to_reach_the_installed_command():
    assert "source .venv/bin/activate" in README
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "$(VENV)/bin/activate" in makefile.split("demo:", 1)[1].split("\n\n", 1)[0]


@pytest.mark.parametrize("line", [line for line in _tour_lines() if re.match(r"retain run examples/", line)])
def test_each_run_line_of_the_tour_is_accepted(line, monkeypatch, capsys):
    args = shlex.split(line)[1:]
    if "--dry-run" not in args:
        args.append("--dry-run")
    monkeypatch.chdir(ROOT)
    proc = retain_in_process(*args, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "dry run: nothing was trained" in proc.stdout
