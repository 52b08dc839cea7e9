"""Training strategies on two CPU processes (gloo): FSDP (FSDP2) and DeepSpeed ZeRO give the 1-process run.

The streams here have tasks whose responses all have the same token count (parity: 2, count_letters: 1):
the loss is a per-micro-batch token mean and the processes' means are averaged, which equals one process's
mean over the whole step only when every micro-batch holds as many response tokens (with
train.global_batch_size the examples of a step are the same either way). Tolerances: fp32 on both sides,
the only difference is the order of the gradient reduction, which Adam's normalisation amplifies over the
steps (measured: 9e-7 after task 1, 4e-5 after task 2, on weights up to 0.16), so LoRA weights agree to
2e-4; the matrix agrees to 1e-9 and the greedy predictions line by line.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.engine.evaluate import evaluate_row
from retain.engine.loop import run_experiment
from retain.engine.trainer import _MethodHooks
from retain.methods.base import ContinualMethod

from ..helpers import count_generated_prompts, join_gloo, tiny_config, tiny_context, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("torchrun")]

TASKS = ["synthetic:parity", "synthetic:count_letters"]
# Two tasks of 4 steps, 4 examples a step over both processes (2 each, no accumulation).
SETTINGS = dict(
    stream={"tasks": TASKS, "train_size": 16, "test_size": 4},
    train={"global_batch_size": 4, "max_steps": 4},
    eval={"batch_size": 4, "max_new_tokens": 4},
)
WEIGHTS_ATOL = 2e-4


def _torchrun(config: str, env: dict | None = None, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "retain.cli", "run", config]
    if not wait:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _one_process(tmp_path) -> dict:
    raw = tiny_config(tmp_path / "one", **SETTINGS)
    return run_experiment(config_from_dict(raw))


def _assert_same_run(two_dir, one_dir, one: dict) -> None:
    """The 2-process run in `two_dir` holds the 1-process run's matrix, predictions and weights."""
    two = json.loads((two_dir / "results.json").read_text())
    assert two["num_processes"] == 2
    assert two["batch"] == {"per_device": 2, "processes": 2, "accumulation": 1, "global": 4}
    assert len(two["matrix"]) == len(one["matrix"]) == 3
    for got, want in zip(two["matrix"], one["matrix"], strict=True):
        assert got == pytest.approx(want, abs=1e-9)
    files = sorted(p.relative_to(one_dir) for p in (one_dir / "eval").rglob("*.jsonl"))
    assert len(files) == 6
    for name in files:
        assert (two_dir / name).read_text() == (one_dir / name).read_text(), name
    for task in ("1-parity", "2-count_letters"):
        got = load_file(two_dir / "tasks" / task / "adapter" / "adapter_model.safetensors")
        want = load_file(one_dir / "tasks" / task / "adapter" / "adapter_model.safetensors")
        assert set(got) == set(want)
        for key in want:
            assert torch.allclose(got[key], want[key], atol=WEIGHTS_ATOL), (task, key)
    # Training moved the weights well past the tolerance (LoRA B starts at zero): a run that did not
    # train the same way would show.
    moved = load_file(one_dir / "tasks" / "2-count_letters" / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max() for k, v in moved.items() if "lora_B" in k) > 100 * WEIGHTS_ATOL


# make test compares an FSDP run with one process through migu's state as well
# (test_method_state_equivalence.py, migu-fsdp): weights, method state, losses and predictions.
@pytest.mark.matrix
def test_fsdp_on_two_processes_gives_the_one_process_run(tmp_path):
    config = write_config(
        tmp_path, **{**SETTINGS, "train": {**SETTINGS["train"], "fsdp": "full_shard auto_wrap"}}
    )
    proc = _torchrun(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "run" / "results.json").read_text())
    # FSDP really sharded: on a CPU-only host accelerate alone would have trained under DDP.
    assert two["strategy"] == {
        "name": "fsdp",
        "label": "FSDP",
        "processes": 2,
        "offload": False,
        "sharded_parameters": True,
    }
    one = _one_process(tmp_path)
    _assert_same_run(tmp_path / "run", tmp_path / "one" / "run", one)


@pytest.mark.matrix
def test_fsdp_resumes_after_sigkill_with_the_uninterrupted_results(tmp_path):
    config = write_config(
        tmp_path, **{**SETTINGS, "train": {**SETTINGS["train"], "fsdp": "full_shard auto_wrap"}}
    )
    run = tmp_path / "run"
    proc = _torchrun(config, wait=False)
    # SIGKILL the whole launch (launcher and both ranks) once task 1's checkpoint is written.
    deadline = time.monotonic() + 240
    while not (run / "tasks" / "1-parity").is_dir() and proc.poll() is None:
        assert time.monotonic() < deadline, "task 1's checkpoint never appeared"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists()
    resumed = _torchrun(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    one = _one_process(tmp_path)
    _assert_same_run(run, tmp_path / "one" / "run", one)


DEEPSPEED_JSON = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
}


@pytest.mark.matrix
@pytest.mark.skipif(
    find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install -e '.[deepspeed]')"
)
@pytest.mark.parametrize(("stage", "offload"), [(0, False), (1, False), (2, False), (3, False), (2, True)])
def test_deepspeed_zero_on_two_processes_gives_the_one_process_run(tmp_path, stage, offload):
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even the tiny model's small tensors
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**DEEPSPEED_JSON, "zero_optimization": zero}))
    config = write_config(tmp_path, **{**SETTINGS, "train": {**SETTINGS["train"], "deepspeed": str(path)}})
    proc = _torchrun(config, env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "run" / "results.json").read_text())
    assert two["strategy"]["name"] == f"zero{stage}"
    assert two["strategy"]["sharded_parameters"] is (stage == 3)
    assert two["strategy"]["offload"] is offload
    one = _one_process(tmp_path)
    _assert_same_run(tmp_path / "run", tmp_path / "one" / "run", one)


# --- in-process checks (no launcher) ---------------------------------------------------------------------


def test_strategy_arguments_turn_train_settings_into_trainer_arguments(tmp_path, monkeypatch):
    from retain.engine.strategies import DEFAULT_FSDP_CONFIG, strategy_arguments
    from retain.runtime import Strategy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train = config_from_dict(tiny_config(tmp_path)).train
    assert strategy_arguments(train, Strategy("ddp", 2)) == {"use_cpu": True}
    train.fsdp = "full_shard auto_wrap"
    assert strategy_arguments(train, Strategy("fsdp", 2)) == {
        "use_cpu": True,
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": DEFAULT_FSDP_CONFIG,
    }
    (tmp_path / "fsdp.yaml").write_text("reshard_after_forward: false\nactivation_checkpointing: true\n")
    train.fsdp_config = str(tmp_path / "fsdp.yaml")
    got = strategy_arguments(train, Strategy("fsdp", 2))["fsdp_config"]
    assert got == {"fsdp_version": 2, "reshard_after_forward": False, "activation_checkpointing": True}
    train.fsdp, train.fsdp_config = "", None
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    train.deepspeed = str(tmp_path / "ds.json")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    got = strategy_arguments(train, Strategy("zero2", 2))
    # On a CPU host: DeepSpeed's CPU accelerator, accelerate not told cpu (it would drop DeepSpeed), and the
    # Trainer's torch optimizer instead of DeepSpeedCPUAdam (a C++ build).
    assert got == {
        "deepspeed": {"zero_optimization": {"stage": 2}, "zero_force_ds_cpu_optimizer": False},
        "use_cpu": False,
    }
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    # accelerate launch's DeepSpeed environment without a config file: a ZeRO section of its settings.
    train.deepspeed = None
    env = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}
    zero = strategy_arguments(train, Strategy("zero3", 2, offload=True), env)["deepspeed"]
    assert zero["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert zero["train_batch_size"] == "auto"


class _Recorder(ContinualMethod):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def before_optimizer_step(self, ctx, model) -> None:
        self.calls.append("method")


class _Engine:
    """What of DeepSpeedEngine the hook wrapper uses: step() and the accumulation boundary."""

    def __init__(self, calls: list[str]) -> None:
        self.calls, self.boundary = calls, False

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.boundary

    def step(self) -> None:
        self.calls.append("step")


def test_under_deepspeed_the_method_sees_the_gradients_before_the_engine_steps():
    # accelerate runs engine.step() inside backward; the Trainer's clip and pre-step callbacks come after.
    calls: list[str] = []
    trainer = SimpleNamespace(model="model", is_deepspeed_enabled=True)
    hooks = _MethodHooks(_Recorder(calls), ctx=None, trainer=trainer)
    engine = _Engine(calls)
    hooks._before_deepspeed_steps(engine)
    engine.step()  # inside an accumulation window: DeepSpeed only accumulates
    engine.boundary = True
    engine.step()
    assert calls == ["step", "method", "step"]
    args = SimpleNamespace(max_grad_norm=0.0)
    hooks.on_pre_optimizer_step(args, None, None)  # the Trainer's own pre-step callback: not again
    assert calls == ["step", "method", "step"]


def _lockstep_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    join_gloo(rank, world, init_file)
    generated = count_generated_prompts()  # prompts this process generated answers for
    try:
        out = pathlib.Path(out_dir)
        ctx, tasks = tiny_context(out / f"context{rank}")
        ctx.rank, ctx.world_size = rank, world
        files = [str(out / f"rank{rank}" / f"{t.name}.jsonl") for t in tasks]
        scores = evaluate_row(ContinualMethod(), ctx, 1, files, 5, 4, all_processes=True, lockstep=True)
        (out / f"scores{rank}.json").write_text(json.dumps({"scores": scores, "generated": generated}))
    finally:
        dist.destroy_process_group()


# make test sees lockstep evaluation end to end: migu-fsdp in test_method_state_equivalence.py evaluates
# under FSDP2 and compares every prediction with one process's.
@pytest.mark.matrix
def test_lockstep_evaluation_answers_every_prompt_on_every_process(tmp_path):
    # Under sharded parameters every forward is a collective: each process runs the same batches.
    mp.spawn(_lockstep_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ctx, tasks = tiny_context(tmp_path / "context")
    files = [str(tmp_path / "one" / f"{t.name}.jsonl") for t in tasks]
    one = evaluate_row(ContinualMethod(), ctx, 1, files, 5, 4)
    for rank in range(2):
        got = json.loads((tmp_path / f"scores{rank}.json").read_text())
        assert got == {"scores": one, "generated": [6, 6]}  # all 6 prompts of each task (split: 3 each)
    assert not list((tmp_path / "rank1").rglob("*.jsonl"))  # rank 0 writes
    for task in tasks:
        written = (tmp_path / "rank0" / f"{task.name}.jsonl").read_text()
        assert written == (tmp_path / "one" / f"{task.name}.jsonl").read_text()
