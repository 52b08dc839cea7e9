"""results.json records what produced it: retain's version and git commit, library versions, hardware."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

import retain
from retain.config import config_from_dict
from retain.engine import provenance
from retain.engine.loop import run_experiment
from tests.helpers import tiny_config

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(folder, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
    ).stdout


def package_in_a_repository(tmp_path):
    """A git repository holding a committed package folder `pkg` and an untracked folder `venv/pkg`."""
    for folder in ("pkg", "venv/pkg"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / ".gitignore").write_text("venv/\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".gitignore", "pkg")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return tmp_path


@needs_git
def test_git_commit_of_a_checkout_and_none_elsewhere(tmp_path, monkeypatch):
    repo = package_in_a_repository(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD").strip()
    assert provenance.git_commit(str(repo / "pkg")) == {"commit": head, "dirty": False}
    (repo / "pkg" / "__init__.py").write_text("x = 1\n")
    assert provenance.git_commit(str(repo / "pkg")) == {"commit": head, "dirty": True}
    # An installed copy inside another project's repository is not retain's checkout.
    assert provenance.git_commit(str(repo / "venv" / "pkg")) is None
    outside = tmp_path / "wheel" / "pkg"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("")
    assert provenance.git_commit(str(outside)) is None
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert provenance.git_commit(str(repo / "pkg")) is None


def test_results_json_records_versions_hardware_and_the_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "git_commit", lambda folder=None: {"commit": "abc", "dirty": False})
    raw = tiny_config(tmp_path)
    results = run_experiment(config_from_dict(raw))
    with open(os.path.join(raw["output_dir"], "results.json"), encoding="utf-8") as handle:
        assert json.load(handle)["provenance"] == results["provenance"]
    record = results["provenance"]
    assert record["retain"] == retain.__version__
    assert record["git"] == {"commit": "abc", "dirty": False}
    assert record["packages"]["torch"] == torch.__version__
    assert set(record["packages"]) >= {"transformers", "peft", "accelerate"}
    assert record["python"].count(".") == 2
    hardware = record["hardware"]
    assert hardware["cpu_cores"] == os.cpu_count()
    assert hardware["gpu_count"] == torch.cuda.device_count() == len(hardware["gpus"])
    assert hardware["bf16"] is False  # tiny_config sets train.bf16: false


def test_provenance_never_fails_a_run(monkeypatch):
    def broken(folder=None):
        raise RuntimeError("odd git")

    monkeypatch.setattr(provenance, "git_commit", broken)
    assert provenance.provenance(bf16=True)["git"] is None
