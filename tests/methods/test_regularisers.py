"""Regularisers against earlier tasks are off on task 1; LwF's teacher and EWC's Fisher and anchors follow
the adapters that other components of a combination add, freeze or switch."""

from __future__ import annotations

import json

import pytest
import torch

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.lwf import LwF
from retain.methods.registry import create_method
from retain.models.adapters import snapshot_trainable, unwrap
from retain.models.forward import forward_with_weights

from ..helpers import crash_then_resume, tiny_config, tiny_context, train_one_task

# Every method whose loss holds a term against earlier tasks, and the names that term is logged under.
REGULARISERS = {
    "ewc": ["ewc/penalty"],
    "lwf": ["lwf/kl"],
    "olora": ["olora/orth"],
    "ilora": ["ilora/consistency", "ilora/buffer_ce"],
}
THREE_TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"]


def _spy(method, ctx):
    """Wrap method.loss and ctx.log: record loss - task loss per call, and every logged value."""
    extras: list[float] = []
    logged: list[tuple[str, float]] = []
    real_loss, real_log = method.loss, ctx.log

    def loss(c, model, batch, outputs):
        total = real_loss(c, model, batch, outputs)
        extras.append(float(total.detach() - outputs.loss.detach()))
        return total

    def log(name, value):
        logged.append((name, float(value.detach() if isinstance(value, torch.Tensor) else value)))
        real_log(name, value)

    method.loss, ctx.log = loss, log
    return extras, logged


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_every_regulariser_is_a_no_op_on_task_1(tmp_path, name):
    ctx, tasks = tiny_context(tmp_path, name)
    method = create_method(name)
    method.setup(ctx)
    method.before_task(ctx, tasks[0])
    extras, logged = _spy(method, ctx)
    # A high learning rate, so that a term toward the starting model would show after the first update.
    train_one_task(ctx, tasks, method, tmp_path / "t", max_steps=4, learning_rate=2e-2)
    assert len(extras) == 4
    assert extras == [0.0] * 4, f"{name} adds {extras} to the task loss on task 1"
    penalties = [(n, v) for n, v in logged if n in REGULARISERS[name]]
    assert all(v == 0.0 for _, v in penalties), f"{name} logs {penalties} on task 1"


def _batch(ctx, task):
    return {k: v.to(ctx.device) for k, v in ctx.collate(ctx.encode(task.train[:4])).items()}


def _logits(model, batch):
    """The logits the LwF teacher compares: the model as it is, no weights replaced."""
    return forward_with_weights(unwrap(model), {}, batch, 0).logits[:, :-1]


@pytest.mark.parametrize(
    ("main", "plus"),
    [
        ("lwf", None),
        ("lwf", "olora"),
        ("olora", "lwf"),
        ("lwf", "conpet"),
        ("conpet", "lwf"),
        ("lwf", "abscl"),
        ("abscl", "lwf"),
    ],
)
def test_lwf_teacher_is_the_model_the_previous_task_ended_with(tmp_path, main, plus):
    """Whatever adapters the other component adds, freezes or switches, the teacher's logits on task 2
    are those of the model as task 1 left it, and stay so through task 2's updates."""
    ctx, tasks = tiny_context(tmp_path)
    method = create_method(main, {"plus": [plus]} if plus else {})
    lwf = next(c for c in method.components if isinstance(c, LwF))
    method.setup(ctx)
    method.before_task(ctx, tasks[0])
    train_one_task(ctx, tasks, method, tmp_path / "t1", max_steps=3, learning_rate=2e-2)
    batch = _batch(ctx, tasks[1])
    with torch.no_grad():
        ended = _logits(ctx.model, batch)
    method.after_task(ctx, tasks[0], tasks[0].train)
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    train_one_task(
        ctx, tasks, method, tmp_path / "t2", examples=tasks[1].train, max_steps=3, learning_rate=2e-2
    )
    assert lwf.teacher, "LwF took no teacher on task 2"
    teacher = lwf.teacher_logits(ctx.model, batch, 0)
    assert torch.allclose(teacher, ended, atol=1e-5), (teacher - ended).abs().max()
    # The student moved away from the teacher: the term is on.
    student = _logits(ctx.model, batch)
    assert not torch.allclose(student, ended, atol=1e-4)


def test_lwf_takes_its_teacher_before_the_first_update_under_gradient_accumulation(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "lwf")
    method = create_method("lwf")
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    start = snapshot_trainable(ctx.model)
    train_one_task(
        ctx, tasks, method, tmp_path / "t", gradient_accumulation_steps=4, max_steps=2, learning_rate=2e-2
    )
    assert method.teacher.keys() == start.keys()
    assert all(torch.equal(method.teacher[n], start[n]) for n in start)
    assert any(not torch.equal(p, start[n]) for n, p in snapshot_trainable(ctx.model).items())


def _task_log(run_dir, index, name):
    return json.loads((run_dir / "tasks" / f"{index}-{name}" / "train_log.json").read_text())


def _values(log, key):
    return [entry[key] for entry in log if key in entry]


@pytest.mark.parametrize(("main", "plus"), [("lwf", "conpet"), ("abscl", "lwf")])
def test_lwf_teacher_survives_a_crash_and_resume(tmp_path, monkeypatch, main, plus):
    """The adapters active while task 1 trained are in LwF's state, so a resumed task 2 distils from
    the same teacher: the same KL at every logging step."""

    def raw(folder):
        return tiny_config(
            tmp_path / folder, main, {"plus": [plus]}, train={"max_steps": 4, "logging_steps": 1}
        )

    run_experiment(config_from_dict(raw("whole")), evaluate=False)
    crash_then_resume(raw("crashed"), monkeypatch)
    whole = _values(_task_log(tmp_path / "whole" / "run", 2, "capital_letters"), "lwf/kl")
    resumed = _values(_task_log(tmp_path / "crashed" / "run", 2, "capital_letters"), "lwf/kl")
    assert len(whole) == 4 and whole[0] > 0
    assert resumed == pytest.approx(whole, rel=1e-4, abs=1e-7)


def _three_task_run(tmp_path, main, params, **train):
    raw = tiny_config(
        tmp_path,
        main,
        params,
        stream={"train_size": 8, "test_size": 2, "tasks": THREE_TASKS},
        train={"max_steps": 3, "per_device_train_batch_size": 2, "logging_steps": 1, **train},
    )
    run_experiment(config_from_dict(raw), evaluate=False)
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("main", "plus"), [("olora", "ewc"), ("ewc", "olora"), ("ewc", "conpet"), ("conpet", "ewc")]
)
def test_ewc_follows_the_adapter_each_task_trains(tmp_path, main, plus):
    """With adapters added and frozen by another component, EWC records a Fisher and anchors for the
    adapter each task trained (and the penalty covers only what is trainable)."""
    run = _three_task_run(tmp_path, main, {"plus": [{"name": plus}]})
    state = torch.load(run / "tasks" / "3-max_number" / "method_state.pt", weights_only=True)["ewc"]
    adapters = {n.split(".")[-2] for n in state["fisher"]}
    assert adapters == {"default", "task2", "task3"}
    assert state["fisher"].keys() == state["anchor"].keys()


@pytest.mark.parametrize(("main", "plus"), [("abscl", "ewc"), ("ewc", "abscl")])
def test_ewc_with_abscl_penalises_the_shared_adapter(tmp_path, main, plus):
    """ABSCL freezes its adapters in its after_task; EWC still records the Fisher of what the task trained
    (the shared and the domain adapter), and on task 2 it pulls the shared adapter back."""
    run = _three_task_run(tmp_path, main, {"plus": [{"name": plus}]})
    state = torch.load(run / "tasks" / "1-parity" / "method_state.pt", weights_only=True)["ewc"]
    assert {n.split(".")[-2] for n in state["fisher"]} == {"default", "domain1"}
    penalties = _values(_task_log(run, 2, "capital_letters"), "ewc/penalty")
    assert penalties and penalties[-1] > 0
