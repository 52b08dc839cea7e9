"""LAMOL: the LM loss on "__gen_<task>__ -> question __ans__ answer", and self-generated pseudo samples."""

from __future__ import annotations

import json
import os

import pytest
import torch

from retain.config import config_from_dict
from retain.data.streams import Task
from retain.engine.loop import run_experiment
from retain.methods.common import pseudo
from retain.methods.lamol import LAMOL, LAMOLConfig, gen_marker, generation_example, parse_generation
from retain.models.adapters import trainable_parameters

from ..helpers import tiny_config, tiny_context

GOOD = "Is 42 even or odd? Answer with even or odd.\n__ans__\neven"
BAD = "Is 7 even or odd? no separator here"


def test_parse_generation_needs_the_answer_marker_and_both_parts():
    assert parse_generation(GOOD) == ("Is 42 even or odd? Answer with even or odd.", "even")
    assert parse_generation("q __ans__ a __ans__ b") == ("q", "a")
    for bad in (BAD, "__ans__ even", "question __ans__  ", ""):
        assert parse_generation(bad) is None


def test_lm_loss_is_added_with_its_weight_and_has_a_gradient(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "lamol")
    example = tasks[0].train[0]
    lm = generation_example(example, "parity")
    assert lm.messages[0]["content"] == gen_marker("parity") == "__gen_parity__"
    assert lm.reference == f"{example.messages[0]['content']}\n__ans__\n{example.reference}"
    params = list(trainable_parameters(ctx.model).values())
    for lm_lambda in (0.25, 1.0):
        method = LAMOL(LAMOLConfig(lm_lambda=lm_lambda))
        data = method.training_data(ctx, tasks[0], tasks[0].train)
        assert data == tasks[0].train  # task 1: nothing to rehearse yet
        batch = ctx.collate(ctx.encode(data[:4]))
        outputs = ctx.forward(ctx.model, batch)
        total = method.loss(ctx, ctx.model, batch, outputs)
        lm_loss = ctx.logged["lamol/lm_loss"][-1]
        assert float(lm_loss) > 0
        assert total.item() == pytest.approx(outputs.loss.item() + lm_lambda * float(lm_loss), rel=1e-6)
        # the LM term reaches the weights: the gradient differs from the QA loss's alone
        qa_grad = torch.autograd.grad(outputs.loss, params, retain_graph=True)
        total_grad = torch.autograd.grad(total, params)
        assert any(not torch.allclose(a, b) for a, b in zip(qa_grad, total_grad, strict=True))
    off = LAMOL(LAMOLConfig(lm_lambda=0.0))
    off.training_data(ctx, tasks[0], tasks[0].train)
    assert off.loss(ctx, ctx.model, batch, outputs) is outputs.loss


class FakeGenerate:
    """Stands in for retain.evaluation.generate.generate: records the calls, answers from `texts`."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def __call__(self, model, tokenizer, prompts, **options):
        self.calls.append({"prompts": [tokenizer.decode(p) for p in prompts], **options})
        return [self.texts[i % len(self.texts)] for i in range(len(prompts))]


def test_pseudo_samples_of_task1_enter_task2_training_data_and_accumulate(tmp_path, monkeypatch):
    fake = FakeGenerate([GOOD, BAD, GOOD.replace("42", "43").replace("even\n", "odd\n")])
    monkeypatch.setattr(pseudo, "generate", fake)
    ctx, tasks = tiny_context(tmp_path, "lamol")
    ctx.run_dir = str(tmp_path / "run")
    method = LAMOL(LAMOLConfig(memory_per_task=6))
    method.training_data(ctx, tasks[0], tasks[0].train)
    assert not fake.calls  # nothing is generated before task 1

    ctx.task_index = 2
    data = method.training_data(ctx, tasks[1], tasks[1].train)
    (call,) = fake.calls
    assert len(call["prompts"]) == 7  # ceil(0.2 x 32), all for task 1
    assert all("__gen_parity__" in p for p in call["prompts"])
    assert call["do_sample"] and call["top_k"] == 20 and call["temperature"] == 1.0
    assert isinstance(call["seed"], int)
    rehearsed = data[len(tasks[1].train) :]
    assert data[: len(tasks[1].train)] == tasks[1].train
    assert len(rehearsed) == 5  # 7 generations, 2 without the separator
    assert {e.meta["pseudo_from"] for e in rehearsed} == {"parity"}
    assert rehearsed[0].messages == [
        {"role": "user", "content": "Is 42 even or odd? Answer with even or odd."},
        {"role": "assistant", "content": "even"},
    ]
    assert ctx.logged["lamol/kept_fraction"][-1] == pytest.approx(5 / 7)
    # pseudo samples get the LM loss too, after their own task's marker
    lm = method._lm_features[tuple(ctx.encode([rehearsed[0]])[0]["input_ids"])]
    assert "__gen_parity__" in ctx.tokenizer.decode(lm["input_ids"])
    folder = tmp_path / "run" / "pseudo"
    rehearsed = [json.loads(line) for line in (folder / "2-capital_letters.jsonl").read_text().splitlines()]
    assert len(rehearsed) == 5 and rehearsed[0]["meta"]["pseudo_from"] == "parity"
    candidates = (folder / "2-capital_letters.candidates.jsonl").read_text().splitlines()
    assert [json.loads(c)["status"] for c in candidates].count("unparsable") == 2

    third = Task(name="third", train=tasks[0].train[:10], test=[], scorer="exact")
    ctx.tasks = [*tasks, third]
    ctx.task_index = 3
    fake.texts = [GOOD]
    data = method.training_data(ctx, third, third.train)
    prompts = fake.calls[-1]["prompts"]
    assert len(prompts) == 2 and "__gen_parity__" in prompts[0] and "__gen_capital_letters__" in prompts[1]
    sizes = method.memory.sizes()
    assert sizes == {"parity": 6, "capital_letters": 1}  # 5 + 1 accumulated, capped at 6
    assert len(data) == 10 + 7
    method.config.memory_per_task = 0
    method.training_data(ctx, third, third.train)
    assert method.memory.sizes() == {"parity": 7, "capital_letters": 2}  # no cap: everything accumulates

    restored = LAMOL(LAMOLConfig(memory_per_task=6))
    restored.load_state_dict(method.state_dict())
    assert restored.memory.examples() == method.memory.examples()
    assert restored.systems == method.systems


def test_a_run_samples_task1_examples_before_task2_and_saves_them(tmp_path):
    run_experiment(config_from_dict(tiny_config(tmp_path, "lamol")))
    path = os.path.join(tmp_path, "run", "pseudo", "2-capital_letters.candidates.jsonl")
    records = [json.loads(line) for line in open(path, encoding="utf-8").read().split("\n") if line]
    assert len(records) == 7 and {r["from_task"] for r in records} == {"parity"}
    assert not os.path.exists(os.path.join(tmp_path, "run", "pseudo", "1-parity.candidates.jsonl"))
