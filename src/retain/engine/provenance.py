"""What produced a result: retain's version and git commit, the library versions and the hardware.

results.json records it under `provenance`; gathering it never fails a run (an unknown item is None).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

import torch

import retain

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(folder: str | None = None) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout that holds retain's own source files (`folder`: the retain
    package), or None when retain is installed from a wheel or git is missing."""
    folder = folder or os.path.dirname(os.path.abspath(retain.__file__))

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", folder, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        # An installed copy inside some other repository (a virtual environment in a project) is not
        # retain's checkout: the package's own files must be tracked there.
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware(bf16: bool) -> dict[str, Any]:
    """The CPU, the GPUs this process sees and whether training and evaluation ran under bf16."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpus": gpus,
        "gpu_count": len(gpus),
        "cuda": torch.version.cuda if gpus else None,
        "bf16": bf16,
    }


def provenance(bf16: bool) -> dict[str, Any]:
    """retain's version and git checkout, python, the library versions and the hardware, as JSON values.

    It describes the process that writes results.json; a resumed run may have trained earlier tasks on
    another machine."""
    try:
        source = git_commit()
    except Exception:  # provenance never fails a run
        source = None
    return {
        "retain": retain.__version__,
        "git": source,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "hardware": hardware(bf16),
    }
