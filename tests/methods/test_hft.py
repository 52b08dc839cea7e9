"""HFT: exactly the chosen half of each layer's matrices is unchanged by a task; the half is drawn anew
per task, from the run's seed."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.methods.base import MethodContext
from retain.methods.common.parameter_groups import Group, layer_groups
from retain.methods.hft import HFT, choose_frozen
from retain.methods.registry import create_method
from retain.models.adapters import apply_finetuning, trainable_parameters
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import assert_same, crash_then_resume, tiny_config, train_one_task

TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"]
NAMES = ["0-init", "1-parity", "2-capital_letters", "3-max_number"]


def context(tmp_path, finetuning_type="full", seed=3):
    config = config_from_dict(
        tiny_config(tmp_path, "hft", model={"finetuning_type": finetuning_type}, seed=seed)
    )
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    return MethodContext.create(model, tokenizer, config, build_stream(config), task_index=1)


def check_half_per_layer(frozen: list[str]) -> None:
    """2 of the 4 attention matrices in every layer; 2 of 3 MLP matrices in half the layers, 1 in the rest."""
    attention = Counter(n.split(".self_attn.")[0] for n in frozen if ".self_attn." in n)
    mlp = Counter(n.split(".mlp.")[0] for n in frozen if ".mlp." in n)
    assert len(attention) == 2 and set(attention.values()) == {2}
    assert sorted(mlp.values()) == [1, 2]


def test_a_full_finetuning_stream_leaves_exactly_the_chosen_half_unchanged(tmp_path):
    raw = tiny_config(tmp_path, "hft", model={"finetuning_type": "full"}, stream={"tasks": TASKS})
    run_experiment(config_from_dict(raw), evaluate=False)
    run = tmp_path / "run" / "tasks"
    weights = [load_file(str(run / n / "model" / "model.safetensors")) for n in NAMES]
    chosen = torch.load(run / NAMES[-1] / "method_state.pt")["chosen"]
    linear = sorted({n.rsplit(".", 1)[0] for n in weights[0] if n.endswith("proj.weight")})
    assert len(linear) == 14  # 2 layers x (4 attention + 3 MLP)
    for t in (1, 2, 3):
        frozen = set(chosen[t])
        assert frozen <= set(linear)
        check_half_per_layer(sorted(frozen))
        for module in linear:
            same = torch.equal(weights[t - 1][f"{module}.weight"], weights[t][f"{module}.weight"])
            assert same == (module in frozen), (t, module)
        # Embeddings and norms lie outside the rule and stay frozen (train_other_params: false).
        others = [n for n in weights[0] if not n.endswith("proj.weight")]
        assert others and all(torch.equal(weights[t - 1][n], weights[t][n]) for n in others)
    # A new half every task.
    assert len({tuple(chosen[t]) for t in (1, 2, 3)}) == 3


def test_under_lora_the_chosen_adapters_are_unchanged_and_the_others_train(tmp_path):
    ctx = context(tmp_path, "lora")
    method = HFT()
    method.training_data(ctx, ctx.tasks[0], ctx.tasks[0].train)
    frozen = set(method.chosen[1])
    check_half_per_layer([n.split("base_model.model.")[-1] for n in frozen])
    groups = {g.name: g for g in layer_groups(ctx.model)}  # the trainable ones: the other half
    assert not (frozen & set(groups)) and len(groups) == len(frozen) == 7
    every = dict(ctx.model.named_parameters())
    before = {n: p.detach().clone() for n, p in every.items() if "lora_" in n}
    train_one_task(ctx, ctx.tasks, method, tmp_path / "t", max_steps=4, learning_rate=5e-2)
    for name, old in before.items():
        module = name.split(".lora_")[0]
        changed = not torch.equal(old, every[name].detach())
        if module in frozen:
            assert not changed, name
        elif ".lora_B." in name:  # A moves only once B is non-zero; B moves from the first step
            assert changed, name
    method.after_task(ctx, ctx.tasks[0], ctx.tasks[0].train)
    assert all(p.requires_grad for n, p in every.items() if "lora_" in n)  # released after the task


def test_the_choice_is_seeded_by_run_and_task_and_differs_between_tasks(tmp_path):
    def choice(seed, task_index):
        ctx = context(tmp_path / f"{seed}-{task_index}", seed=seed)
        ctx.task_index = task_index
        method = HFT()
        method.training_data(ctx, ctx.tasks[0], ctx.tasks[0].train)
        assert set(trainable_parameters(ctx.model)).isdisjoint(
            f"{n}.weight" for n in method.chosen[task_index]
        )
        return method.chosen[task_index]

    assert choice(3, 1) == choice(3, 1)  # resumable: the same draw for the same run and task
    assert len({tuple(choice(3, t)) for t in (1, 2, 3, 4)}) >= 3
    assert choice(3, 1) != choice(4, 1)


def test_the_rule_freezes_half_of_each_category_over_the_layers():
    def groups(layers, attention, mlp):
        return [
            Group(layer=f"layers.{i}", block=block, name=f"layers.{i}.{block}.{j}")
            for i in range(layers)
            for block, count in (("attention", attention), ("feed_forward", mlp))
            for j in range(count)
        ]

    for seed in range(20):
        frozen = choose_frozen(groups(30, 4, 3), 0.5, random.Random(seed))
        per_layer = Counter((g.layer, g.block) for g in frozen)
        assert all(per_layer[(f"layers.{i}", "attention")] == 2 for i in range(30))
        mlp = sorted(per_layer[(f"layers.{i}", "feed_forward")] for i in range(30))
        assert mlp == [1] * 15 + [2] * 15
    # An odd number of layers: the extra one goes to a random side, half on average.
    totals = [len(choose_frozen(groups(3, 0, 3), 0.5, random.Random(s))) for s in range(400)]
    assert set(totals) == {4, 5} and abs(sum(totals) / len(totals) - 4.5) < 0.15


def test_full_finetuning_resumes_after_a_crash_with_the_same_matrix(tmp_path, monkeypatch):
    def raw(folder):
        return tiny_config(
            tmp_path / folder, "hft", model={"finetuning_type": "full"}, stream={"tasks": TASKS}
        )

    expected = run_experiment(config_from_dict(raw("whole")))
    assert_same(crash_then_resume(raw("crashed"), monkeypatch), expected)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_a_bad_fraction_is_refused_naming_the_field(fraction):
    with pytest.raises(RetainError, match="trainable_fraction must be in"):
        create_method("hft", {"trainable_fraction": fraction})
