"""ConPET: the selector is really trained on prompt features, routes each instance, and is saved per task."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.common.routing import prompt_features
from retain.methods.conpet import ConPET, ConPETConfig, TaskSelector, train_selector
from retain.models.adapters import adapter_state, peft_model

from ..helpers import tiny_config, tiny_context


def test_selector_learns_the_task_of_tiny_model_prompt_features(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "conpet")
    features = torch.cat([prompt_features(ctx, t.train) for t in tasks])
    labels = torch.cat([torch.full((len(t.train),), i) for i, t in enumerate(tasks)])
    # The features come from the base model: the same whatever the adapters hold.
    with torch.no_grad():
        for p in adapter_state(ctx.model, "default").values():
            p.add_(0.5)
    assert torch.allclose(prompt_features(ctx, tasks[0].train), features[: len(tasks[0].train)])
    torch.manual_seed(0)
    selector = TaskSelector(features.shape[1], 2)
    initial = {k: v.clone() for k, v in selector.state_dict().items()}
    loss = train_selector(selector, features, labels, 2, ConPETConfig(selector_steps=50), seed=0)
    accuracy = float((selector(features).argmax(-1) == labels).float().mean())
    assert accuracy > 0.9 and loss < 0.3  # chance is 0.5
    assert all(not torch.equal(initial[k], v) for k, v in selector.state_dict().items())


def test_conpet_routes_each_instance_and_restores_the_selector(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "conpet")
    method = ConPET(ConPETConfig(selector_steps=50))
    for index, task in enumerate(tasks, start=1):
        ctx.task_index = index
        method.before_task(ctx, task)
        assert [n for n, p in peft_model(ctx.model).named_parameters() if p.requires_grad]
        own = "default" if index == 1 else f"task{index}"
        assert all(f".{own}." in n for n, p in ctx.model.named_parameters() if p.requires_grad)
        method.after_task(ctx, task, task.train)
    assert ctx.logged["conpet/selector_train_accuracy"][-1] > 0.9
    routes = [method.eval_routes(ctx, task) for task in tasks]
    assert sum(r == "default" for r in routes[0]) >= 5 and sum(r == "task2" for r in routes[1]) >= 5
    restored = ConPET(ConPETConfig(selector_steps=50))
    restored.load_state_dict(method.state_dict())
    assert [restored.eval_routes(ctx, task) for task in tasks] == routes
    assert set(peft_model(ctx.model).active_adapters) == {"task2"}  # the last route activated
    restored.activate_route(ctx, "default")
    assert list(peft_model(ctx.model).active_adapters) == ["default"]
    both = ConPET(ConPETConfig(top_k=2))
    both.load_state_dict(method.state_dict())
    assert set(both.eval_routes(ctx, tasks[0])) == {"default+task2"}
    both.activate_route(ctx, "default+task2")
    assert set(peft_model(ctx.model).active_adapters) == {"default", "task2"}
    assert not any(p.requires_grad for p in ctx.model.parameters())


def test_conpet_run_keeps_old_adapters_and_saves_the_selector_per_task(tmp_path):
    config = config_from_dict(tiny_config(tmp_path, "conpet", {"selector_steps": 50}))
    run_experiment(config)
    run = tmp_path / "run" / "tasks"
    # task 1 trains 'default' (no untrained adapter is saved), task 2 its own adapter
    first = load_file(run / "1-parity" / "adapter" / "adapter_model.safetensors")
    second = load_file(run / "2-capital_letters" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(float(v.abs().sum()) > 0 for k, v in first.items() if "lora_B" in k)
    assert not (run / "1-parity" / "adapter" / "task1").exists()
    assert not (run / "1-parity" / "adapter" / "task2").exists()
    assert (run / "2-capital_letters" / "adapter" / "task2" / "adapter_model.safetensors").is_file()
    states = [torch.load(run / d / "method_state.pt") for d in ("1-parity", "2-capital_letters")]
    assert states[0]["adapters"] == ["default"] and states[1]["adapters"] == ["default", "task2"]
    assert not torch.equal(states[0]["selector"]["net.weight"], states[1]["selector"]["net.weight"])
    # Row 2 answers each test instance through the adapter the selector chose, recorded per prediction.
    for task, adapter in (("parity", "default"), ("capital_letters", "task2")):
        path = os.path.join(tmp_path, "run", "eval", "2", f"{task}.jsonl")
        with open(path, encoding="utf-8") as handle:
            routes = [json.loads(line)["route"] for line in handle]
        assert sum(r == adapter for r in routes) >= len(routes) - 1
