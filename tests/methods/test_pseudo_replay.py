"""Pseudo replay: the model writes samples of earlier tasks from their stored demos, not the current one."""

from __future__ import annotations

import json
import random

import pytest
from peft.tuners.lora import LoraLayer

from retain.config import config_from_dict
from retain.data.streams import Task
from retain.engine.plan import make_plan
from retain.errors import RetainError
from retain.methods.common import pseudo
from retain.methods.pseudo_replay import PseudoReplay, PseudoReplayConfig

from ..helpers import tiny_config, tiny_context


def test_demo_prompt_shows_the_demos_in_a_seeded_order_and_opens_a_new_input(tokenizer):
    ctx_free_demos = [
        pseudo.pseudo_example(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd", None, "t", "x", 1)
        for n in (10, 21, 32)
    ]
    first = tokenizer.decode(pseudo.demo_prompt(tokenizer, ctx_free_demos, random.Random(0)))
    again = tokenizer.decode(pseudo.demo_prompt(tokenizer, ctx_free_demos, random.Random(0)))
    assert first == again
    assert all(f"Input: Is {n} even or odd?\nOutput: " in first for n in (10, 21, 32))
    assert first.endswith("<|im_start|>assistant\nInput:")


def test_parse_demo_completion():
    assert pseudo.parse_demo_completion(" Is 4 even or odd?\nOutput: even") == ("Is 4 even or odd?", "even")
    # the model went on with another example: only the first one counts
    assert pseudo.parse_demo_completion("a\nOutput: b\n\nInput: c\nOutput: d") == ("a", "b")
    for bad in ("no output marker", "\nOutput: b", "a\nOutput:  "):
        assert pseudo.parse_demo_completion(bad) is None
    assert pseudo.parse_demo_completion("a\nOutput:", need_output=False) == ("a", "")


def adapters_disabled(model) -> bool:
    return any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))


class FakeGenerate:
    """Records the decoded prompts and whether the LoRA adapters were disabled; answers with numbered
    parity examples, every third one unparsable."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, prompts, **options):
        self.calls.append(
            {
                "prompts": [tokenizer.decode(p) for p in prompts],
                "disabled": adapters_disabled(model),
                **options,
            }
        )
        return [
            "garbage" if i % 3 == 2 else f"Is {100 + i // 2} even or odd?\nOutput: odd"
            for i in range(len(prompts))
        ]


def test_generates_from_earlier_tasks_demos_only_caps_and_saves_the_memory(tmp_path, monkeypatch):
    fake = FakeGenerate()
    monkeypatch.setattr(pseudo, "generate", fake)
    ctx, tasks = tiny_context(tmp_path, "pseudo_replay")
    ctx.run_dir = str(tmp_path / "run")
    third = Task(name="third", train=tasks[0].train[:8], test=[], scorer="exact")
    ctx.tasks = [*tasks, third]
    method = PseudoReplay(PseudoReplayConfig(num_shots=3, memory_per_task=6))
    assert method.training_data(ctx, tasks[0], tasks[0].train) == tasks[0].train
    method.after_task(ctx, tasks[0], tasks[0].train)
    assert not fake.calls and [d in tasks[0].train for d in method.demos["parity"]] == [True] * 3

    ctx.task_index = 2
    data = method.training_data(ctx, tasks[1], tasks[1].train)
    (call,) = fake.calls
    assert len(call["prompts"]) == 6 and call["do_sample"] and isinstance(call["seed"], int)
    for prompt in call["prompts"]:
        assert all(d.messages[0]["content"] in prompt for d in method.demos["parity"])
        assert not any(e.messages[0]["content"] in prompt for e in tasks[1].train)  # never the current task
    rehearsed = data[len(tasks[1].train) :]
    # 6 generations: 2 unparsable, then "Is 100", "Is 100" (duplicate), "Is 101", "Is 102"
    assert [e.messages[0]["content"] for e in rehearsed] == [f"Is {n} even or odd?" for n in (100, 101, 102)]
    assert {e.meta["pseudo_from"] for e in rehearsed} == {"parity"}
    statuses = [
        json.loads(line)["status"]
        for line in (tmp_path / "run" / "pseudo" / "2-capital_letters.candidates.jsonl")
        .read_text()
        .splitlines()
    ]
    assert sorted(statuses) == ["duplicate", "kept", "kept", "kept", "unparsable", "unparsable"]
    method.after_task(ctx, tasks[1], data)
    assert all("pseudo_from" not in d.meta for d in method.demos["capital_letters"])

    ctx.task_index = 3
    data = method.training_data(ctx, third, third.train)
    prompts = fake.calls[-1]["prompts"]
    assert len(fake.calls) == 2 and len(prompts) == 6  # only capital_letters is new; parity's memory is kept
    for prompt in prompts:
        assert all(d.messages[0]["content"] in prompt for d in method.demos["capital_letters"])
        assert not any(e.messages[0]["content"] in prompt for e in third.train)
    assert method.memory.sizes() == {"parity": 3, "capital_letters": 3}
    assert len(data) == 8 + 6

    restored = PseudoReplay()
    restored.load_state_dict(method.state_dict())
    assert restored.memory.examples() == method.memory.examples() and restored.demos == method.demos


def test_memory_is_capped_and_overlong_samples_are_dropped(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "pseudo_replay")
    memory = pseudo.PseudoMemory()
    made = [pseudo.pseudo_example(f"q{i}", "a", None, "parity", "x", 2) for i in range(10)]
    memory.add("parity", made, 4, random.Random(0))
    assert len(memory.examples()) == 4 and all(e in made for e in memory.examples())
    long = pseudo.pseudo_example("word " * 200, "a", None, "parity", "x", 2)
    assert not pseudo.fits(ctx, long) and pseudo.fits(ctx, made[0])


def test_pseudo_rehearsal_warns_when_no_generation_is_kept(caplog):
    from types import SimpleNamespace

    ctx = SimpleNamespace(log=lambda *args: None)
    with caplog.at_level("WARNING", logger="retain"):
        pseudo.log_kept(ctx, "pseudo_replay", "parity", 0, 64)
    assert "none of 64 generations for task parity" in caplog.text


@pytest.mark.parametrize("generator", ["base", "current"])
def test_generator_is_the_base_model_by_default_or_the_current_one(tmp_path, monkeypatch, generator):
    fake = FakeGenerate()
    monkeypatch.setattr(pseudo, "generate", fake)
    ctx, tasks = tiny_context(tmp_path, "pseudo_replay")
    params = {"num_shots": 2, "memory_per_task": 3}
    if generator == "current":
        params["generator"] = "current"
    method = PseudoReplay(PseudoReplayConfig(**params))
    assert method.config.generator == generator  # "base" is the default
    method.after_task(ctx, tasks[0], tasks[0].train)
    ctx.task_index = 2
    ctx.model.train()
    flags = {n: p.requires_grad for n, p in ctx.model.named_parameters()}
    data = method.training_data(ctx, tasks[1], tasks[1].train)
    (call,) = fake.calls
    # base: generated with the LoRA adapters disabled (and in eval mode); current: adapters on.
    assert call["disabled"] == (generator == "base")
    assert len(data) == len(tasks[1].train) + 1  # "Is 100", its duplicate, garbage
    # Afterwards the model trains as before: adapters on, same trainable parameters, training mode.
    assert not adapters_disabled(ctx.model) and ctx.model.training
    assert {n: p.requires_grad for n, p in ctx.model.named_parameters()} == flags


def test_base_generator_needs_lora(tmp_path):
    raw = tiny_config(tmp_path, "pseudo_replay", model={"finetuning_type": "full"})
    with pytest.raises(RetainError, match="full fine-tuning"):
        make_plan(config_from_dict(raw))
    raw = tiny_config(tmp_path, "pseudo_replay", {"generator": "current"}, model={"finetuning_type": "full"})
    make_plan(config_from_dict(raw))


def test_the_current_generator_is_refused_beside_a_method_that_switches_adapters_at_task_start():
    from retain.errors import RetainError
    from retain.methods.registry import create_method

    with pytest.raises(RetainError, match="pseudo_replay cannot be combined with conpet"):
        create_method("pseudo_replay", {"generator": "current", "plus": ["conpet"]})
    assert create_method("pseudo_replay", {"plus": ["conpet"]}).name == "pseudo_replay+conpet"  # base: fine
