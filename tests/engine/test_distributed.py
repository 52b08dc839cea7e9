"""Two processes on the CPU (gloo): the same config runs under torchrun, and the EWC Fisher is reduced."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retain.methods.ewc import diagonal_fisher

from ..helpers import join_gloo, tiny_context, write_config

# One worker runs these one after another: two torchrun jobs at once overload two cores.
pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("torchrun")]


def _torchrun(config: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "retain.cli",
        "run",
        config,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


# sequential runs in test_a_global_batch_size_keeps_the_step_size_under_two_processes and EWC's Fisher in
# test_the_fisher_is_all_reduced_so_two_ranks_match_one_process; GEM's and LCIA's state is compared with one
# process's in test_method_state_equivalence (make test). These plain runs, like the other methods' in
# tests/methods/test_strategy_support.py, belong to the matrix: about 30 s of two cores each.
@pytest.mark.matrix
@pytest.mark.parametrize("method", ["replay", "olora", "ilora", "clmoe", "lcia", "gem"])
def test_torchrun_two_processes_runs_the_same_config(tmp_path, method):
    params = {"fisher_samples": 8} if method == "ewc" else {}
    proc = _torchrun(write_config(tmp_path, method=method, params=params))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["batch"] == {"per_device": 4, "processes": 2, "accumulation": 1, "global": 8}
    assert len(results["matrix"]) == 3
    assert (run / "tasks" / "2-capital_letters" / "adapter" / "adapter_model.safetensors").is_file()
    if method == "ewc":
        state = torch.load(run / "tasks" / "2-capital_letters" / "method_state.pt")
        assert state["fisher"] and sum(float(f.sum()) for f in state["fisher"].values()) > 0


def test_a_global_batch_size_keeps_the_step_size_under_two_processes(tmp_path):
    proc = _torchrun(write_config(tmp_path, train={"global_batch_size": 4}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["batch"] == {"per_device": 2, "processes": 2, "accumulation": 1, "global": 4}
    # The Trainer used the derived batch: 6 steps of 4 examples over both ranks are 0.75 of the 32
    # training examples (with 4 per device on each rank it would be 1.5 epochs).
    log = json.loads((tmp_path / "run" / "tasks" / "1-parity" / "train_log.json").read_text())
    epochs = [entry["epoch"] for entry in log if entry.get("step") == 6 and "epoch" in entry]
    assert epochs and epochs[-1] == pytest.approx(0.75)


def _fisher_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    join_gloo(rank, world, init_file)
    try:
        ctx, tasks = tiny_context(pathlib.Path(out_dir))
        ctx.rank, ctx.world_size = rank, world
        fisher = diagonal_fisher(ctx, tasks[0].train[:8])
        if rank == 0:
            torch.save(fisher, os.path.join(out_dir, "fisher.pt"))
    finally:
        dist.destroy_process_group()


def test_the_fisher_is_all_reduced_so_two_ranks_match_one_process(tmp_path):
    mp.spawn(_fisher_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "fisher.pt")
    ctx, tasks = tiny_context(tmp_path)
    one = diagonal_fisher(ctx, tasks[0].train[:8])
    assert set(one) == set(two)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-12), name
