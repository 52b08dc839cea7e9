"""Combined methods: replay + EWC and replay + LwF from one config; impossible combinations refused."""

from __future__ import annotations

import json

import pytest
import torch

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.methods.combine import Combined
from retain.methods.registry import create_method
from retain.models.adapters import trainable_parameters

from ..helpers import tiny_config, tiny_context


def test_replay_plus_ewc_mixes_memory_and_adds_the_penalty(tmp_path):
    ctx, tasks = tiny_context(tmp_path)
    params = {"memory_size": 4, "replay_ratio": 0.5, "plus": [{"name": "ewc", "ewc_lambda": 1e3}]}
    method = create_method("replay", params)
    assert isinstance(method, Combined) and method.name == "replay+ewc"
    replay, ewc = method.components
    method.after_task(ctx, tasks[0], tasks[0].train)
    assert replay.memory and ewc.fisher
    ctx.task_index = 2
    data = method.training_data(ctx, tasks[1], tasks[1].train)
    assert sum("replayed_from" in e.meta for e in data) == len(tasks[1].train)
    # Move the weights away from the anchor: the total is the task loss plus the (non-zero) EWC penalty.
    with torch.no_grad():
        for p in trainable_parameters(ctx.model).values():
            p.add_(0.01)
    batch = ctx.collate(ctx.encode(data[:4]))
    outputs = ctx.forward(ctx.model, batch)
    penalty = ewc.penalty(ctx.model).item()
    assert penalty > 0
    total = method.loss(ctx, ctx.model, batch, outputs)
    assert total.item() == pytest.approx(outputs.loss.item() + penalty, rel=1e-5)
    restored = create_method("replay", {"memory_size": 4, "replay_ratio": 0.5, "plus": ["ewc"]})
    restored.load_state_dict(method.state_dict())
    assert len(restored.components[0].memory["parity"]) == 4 and restored.components[1].fisher


@pytest.mark.parametrize("plus", ["ewc", "lwf"])
def test_combined_runs_a_stream_and_logs_both_terms(tmp_path, plus):
    raw = tiny_config(tmp_path, "replay", {"memory_size": 4, "plus": [plus]})
    results = run_experiment(config_from_dict(raw))
    assert results["method"] == f"replay+{plus}"
    log = json.loads((tmp_path / "run" / "tasks" / "2-capital_letters" / "train_log.json").read_text())
    keys = {k for entry in log for k in entry}
    assert "replay/examples" in keys and (("ewc/penalty" in keys) if plus == "ewc" else ("lwf/kl" in keys))


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("multitask", {"plus": ["ewc"]}, "cannot be combined"),
        ("ewc", {"plus": ["ewc"]}, "listed twice"),
        ("olora", {"plus": ["lcia"]}, "both decide which adapters"),
        ("replay", {"plus": ["nope"]}, "unknown method 'nope'"),
        ("replay", {"plus": [{"name": "ewc", "ewc_lamda": 1}]}, "did you mean: ewc_lambda"),
    ],
)
def test_impossible_combinations_are_refused_when_the_config_is_read(name, params, needle):
    with pytest.raises(RetainError, match=needle):
        create_method(name, params)
