"""Helpers shared by the benchmark scripts: output folder, JSON writing, table printing, machine info."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from typing import Any

import torch

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def machine() -> dict[str, Any]:
    """What the numbers were measured on (ratios are only comparable on the same kind of machine)."""
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write_json(name: str, payload: dict[str, Any]) -> str:
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"{name}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    return path


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row) if i > 0]
        print("  ".join(cells))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def quiet_libraries() -> None:
    """Silence transformers' and torch's advisory warnings so the benchmark tables stay readable."""
    import logging
    import warnings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def launch(
    processes: int, threads: int, arguments: list[str], what: str, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run `python arguments...` in `processes` fresh processes (torchrun beyond one), `threads` threads
    each; exits with the stderr's tail naming `what` when it fails, or when it outlives `timeout` seconds
    (a hung collective would otherwise hang the benchmark)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    # A session of its own, so that a timeout can stop torchrun's workers too, not only torchrun.
    child = subprocess.Popen(
        [*launcher, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        sys.exit(f"{what} did not finish within {timeout:.0f} s:\n{stderr[-3000:]}")
    proc = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    if proc.returncode != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
