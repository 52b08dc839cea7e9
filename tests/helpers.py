"""Shared builders for tests: tiny configs, a method context around a tiny LoRA model, the `retain`
command, a crash-and-resume run, result comparison. Test files import from here, never from each other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.engine import loop
from retain.engine.loop import run_experiment
from retain.methods.base import ContinualMethod, MethodContext
from retain.models.adapters import apply_finetuning
from retain.models.tiny import tiny_model, tiny_tokenizer

# ../shared/data: real public data beside the repository (read in place, never copied into it).
SHARED_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")

RETAIN = [sys.executable, "-m", "retain.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def join_gloo(rank: int, world: int, init_file: str) -> None:
    """Join a spawned worker to a `world`-process gloo group through `init_file`, one thread each."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def count_generated_prompts() -> list[int]:
    """Make the evaluator's `generate` record how many prompts each call answers; returns that record.
    For a spawned worker only: the wrapper is never removed."""
    import retain.engine.evaluate as evaluate_module

    generated: list[int] = []
    real_generate = evaluate_module.generate

    def counted(model, tokenizer, prompts, **options):
        generated.append(len(prompts))
        return real_generate(model, tokenizer, prompts, **options)

    evaluate_module.generate = counted
    return generated


def tiny_config(tmp_path, method: str = "sequential", params: dict | None = None, **sections) -> dict:
    """A 2-task stream on the tiny random model that trains in about a second."""
    raw = {
        "model": {"name_or_path": "tiny-random", "lora_rank": 4, "lora_alpha": 8},
        "stream": {
            "train_size": 32,
            "test_size": 6,
            "tasks": ["synthetic:parity", "synthetic:capital_letters"],
        },
        "method": {"name": method, **(params or {})},
        "train": {
            "learning_rate": 2e-2,
            "per_device_train_batch_size": 4,
            "max_steps": 6,
            "cutoff_len": 96,
            "logging_steps": 2,
            "bf16": "false",
        },
        "eval": {"max_new_tokens": 6, "batch_size": 8},
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def tiny_context(tmp_path, method: str = "sequential", params: dict | None = None, **sections):
    """(ctx, tasks) with the tiny model (LoRA-wrapped unless `model` says otherwise), as the loop builds them;
    `sections` override tiny_config's."""
    config = config_from_dict(tiny_config(tmp_path, method, params, **sections))
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    tasks = build_stream(config)
    ctx = MethodContext.create(model, tokenizer, config, tasks, task_index=1)
    return ctx, tasks


def write_config(tmp_path, name="config.yaml", **kwargs) -> str:
    """tiny_config(tmp_path, **kwargs) written as YAML to tmp_path / name; returns its path."""
    raw = tiny_config(tmp_path, **kwargs)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def retain(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run the `retain` command in a subprocess."""
    return subprocess.run([*RETAIN, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


def retain_in_process(*args: str, capsys) -> subprocess.CompletedProcess:
    """`retain.cli.main(args)` in this process (no 3-5 s of imports per call), shaped like `retain`'s
    result. For commands that only read and print; runs that train go through the real command."""
    from retain.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["retain", *args], code, captured.out, captured.err)


class Crash(RuntimeError):
    pass


def crash_then_resume(raw: dict, monkeypatch, crash: bool = True) -> dict:
    """Run `raw` with a crash at the start of task 2, then run it again; returns the final results."""
    real_train = loop.Experiment.train_unit

    def crash_in_task_2(self, index):
        if index == 2:
            raise Crash("killed during task 2")
        return real_train(self, index)

    if crash:
        monkeypatch.setattr(loop.Experiment, "train_unit", crash_in_task_2)
        with pytest.raises(Crash):
            run_experiment(config_from_dict(raw))
        assert not os.path.exists(os.path.join(raw["output_dir"], "results.json"))
        monkeypatch.setattr(loop.Experiment, "train_unit", real_train)
    return run_experiment(config_from_dict(raw))


def assert_same(got: dict, want: dict) -> None:
    """Two results.json contents hold the same accuracy matrix and metrics."""
    assert len(got["matrix"]) == len(want["matrix"])
    for row, expected in zip(got["matrix"], want["matrix"], strict=True):
        assert row == pytest.approx(expected, abs=1e-6)
    assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-6)


def set_gradient(ctx, loss_fn) -> list:
    """Clear the trainable parameters' gradients, backpropagate `loss_fn()`, return the parameters."""
    from retain.models.adapters import trainable_parameters

    params = list(trainable_parameters(ctx.model).values())
    for p in params:
        p.grad = None
    loss_fn().backward()
    return params


def train_one_task(ctx, tasks, method, folder, examples=None, progress_label: str = "", **arguments):
    """Run a ContinualTrainer with `method` on `examples` (default: the first task's training set);
    `arguments` override TrainingArguments; `progress_label` names the task on the progress bar."""
    from transformers import TrainingArguments

    from retain.data.batching import FeatureDataset
    from retain.engine.trainer import ContinualTrainer

    settings = dict(
        output_dir=str(folder),
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = ContinualTrainer(
        model=ctx.model,
        args=TrainingArguments(**{**settings, **arguments}),
        train_dataset=FeatureDataset(ctx.encode(tasks[0].train if examples is None else examples)),
        data_collator=ctx.collate,
        method=method,
        ctx=ctx,
        **({"progress_label": progress_label} if progress_label else {}),
    )
    trainer.train()
    return trainer


class AlternatingRoutes(ContinualMethod):
    """Routes even test instances to 'a' and odd ones to 'b', recording the activations."""

    def __init__(self):
        super().__init__()
        self.activated: list[str] = []

    def eval_routes(self, ctx, task):
        return ["a" if i % 2 == 0 else "b" for i in range(len(task.test))]

    def activate_route(self, ctx, route):
        self.activated.append(route)
        return ctx.model
