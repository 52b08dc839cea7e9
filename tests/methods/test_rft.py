"""RFT (GRPO + rollout-based instance filtering): rewards come from the task's scorer, advantages are
group-normalised, all-right and all-wrong groups are filtered out, and one policy-gradient step raises the
log-probability of the above-mean completions of a tiny model."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.data.encode import encode_prompt
from retain.data.formats import Example
from retain.data.streams import build_stream
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.methods import rft
from retain.methods.base import MethodContext
from retain.methods.common.rewards import (
    extract_tagged,
    format_reward,
    group_advantages,
    is_learnable,
    task_reward,
)
from retain.methods.registry import create_method
from retain.methods.rft import RFT, RFTConfig, completion_logps, grpo_objective
from retain.models.adapters import trainable_parameters
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import assert_same, crash_then_resume, tiny_config, tiny_context


def _ids(ctx, text: str) -> list[int]:
    """Completion token ids of `text`, ended as the model ends an answer."""
    return ctx.tokenizer.encode(text, add_special_tokens=False) + [
        ctx.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]


def _scripted(monkeypatch, answers: dict[tuple[int, ...], list[list[int]]]) -> list[int]:
    """Replace the rollout sampler: each prompt's n-th occurrence gets the n-th scripted completion."""
    calls = []

    def sample(model, tokenizer, prompts, **options):
        seen: dict[tuple[int, ...], int] = {}
        out = []
        for prompt in prompts:
            key = tuple(prompt)
            n = seen.get(key, 0)
            seen[key] = n + 1
            out.append(answers[key][n])
        calls.append(len(prompts))
        return out

    monkeypatch.setattr(rft, "sample_completions", sample)
    return calls


def test_rewards_are_the_tasks_scores_and_advantages_are_group_normalised(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "rft")
    task = tasks[1]  # capital_letters, scored by exact match
    example = task.train[0]
    method = RFT(RFTConfig())
    right, wrong = _ids(ctx, example.reference), _ids(ctx, example.reference.lower() + "x")
    rewards = method._rewards(ctx, example, task.scorer, [right, wrong, right, wrong])
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    # parity is scored by normalized match: case and punctuation do not count there, but do for exact.
    parity = tasks[0].train[0]
    assert method._rewards(ctx, parity, tasks[0].scorer, [_ids(ctx, parity.reference.upper() + ".")]) == [1.0]
    assert method._rewards(ctx, example, task.scorer, [_ids(ctx, example.reference + ".")]) == [0.0]
    # The optional format reward is added with its weight: a one-word answer earns it, right or wrong.
    shaped = RFT(RFTConfig(format_weight=0.5, format_pattern=r"\S+"))
    assert shaped._rewards(ctx, example, task.scorer, [right, _ids(ctx, "NO"), _ids(ctx, "two words")]) == [
        1.5,
        0.5,
        0.0,
    ]
    groups = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(groups)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv, expected)
    assert adv[0].tolist() == pytest.approx([0.866, -0.866, 0.866, -0.866], abs=1e-3)
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(adv[2], torch.zeros(4))  # a constant group carries no signal
    assert torch.allclose(group_advantages(groups, scale=False), groups - groups.mean(1, keepdim=True))


def test_format_reward_and_tagged_answers():
    assert (
        format_reward("<think>x</think> <answer>7</answer>", r"<think>.*</think>\s*<answer>.*</answer>") == 1
    )
    assert format_reward("7", r"<think>.*</think>\s*<answer>.*</answer>") == 0
    assert extract_tagged("<think>6?</think><answer> 7 </answer>", "answer") == "7"
    assert extract_tagged("7", "answer") == "7"
    example = Example([{"role": "user", "content": "3+4"}, {"role": "assistant", "content": "7"}])
    assert task_reward("exact", "<answer>7</answer>", example, "answer") == 1.0
    assert task_reward("exact", "<answer>7</answer>", example) == 0.0


def test_the_filter_drops_instances_whose_rollouts_are_all_right_or_all_wrong(tmp_path, monkeypatch):
    ctx, tasks = tiny_context(tmp_path, "rft")
    task = tasks[1]
    data = task.train[:3]
    right = [_ids(ctx, e.reference) for e in data]
    wrong = _ids(ctx, "nope")
    answers = {
        tuple(encode_prompt(ctx.tokenizer, data[0])): [right[0]] * 4,  # all right
        tuple(encode_prompt(ctx.tokenizer, data[1])): [wrong] * 4,  # all wrong
        tuple(encode_prompt(ctx.tokenizer, data[2])): [right[2], wrong, wrong, wrong],  # mixed
    }
    _scripted(monkeypatch, answers)
    kept = {}
    for rule in ("both", "all_wrong", "all_right", "none"):
        method = RFT(RFTConfig(filter_rule=rule, filter_rollouts=4))
        kept[rule] = [data.index(e) for e in method.training_data(ctx, task, data)]
    assert kept == {"both": [2], "all_wrong": [0, 2], "all_right": [1, 2], "none": [0, 1, 2]}
    assert RFT(RFTConfig(filter_rollouts=0)).training_data(ctx, task, data) == data
    assert is_learnable([0.5, 0.5], "both", threshold=0.5) is False  # all right at a lower threshold
    assert is_learnable([0.5, 0.4], "both", threshold=0.5) is True


def test_nothing_left_after_filtering_trains_on_every_instance(tmp_path, monkeypatch):
    ctx, tasks = tiny_context(tmp_path, "rft")
    task = tasks[1]
    data = task.train[:2]
    _scripted(monkeypatch, {tuple(encode_prompt(ctx.tokenizer, e)): [_ids(ctx, "no")] * 4 for e in data})
    assert RFT(RFTConfig(filter_rollouts=4)).training_data(ctx, task, data) == data


def _step(ctx, method, batch, lr=0.5):
    params = list(trainable_parameters(ctx.model).values())
    for p in params:
        p.grad = None
    outputs = ctx.forward(ctx.model, batch)
    loss = method.loss(ctx, ctx.model, batch, outputs)
    loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(lr * p.grad)
    return loss


def test_one_policy_gradient_step_raises_the_above_mean_completions(tmp_path, monkeypatch):
    ctx, tasks = tiny_context(tmp_path, "rft")
    task = tasks[1]
    example = task.train[0]
    prompt = encode_prompt(ctx.tokenizer, example)
    right, wrong = _ids(ctx, example.reference), _ids(ctx, "abc")
    calls = _scripted(monkeypatch, {tuple(prompt): [right, wrong, wrong, wrong]})
    method = RFT(RFTConfig(num_generations=4, filter_rollouts=0))
    batch = ctx.collate(ctx.encode(method.training_data(ctx, task, [example])))
    pad = ctx.tokenizer.pad_token_id

    def logps():
        with torch.no_grad():
            values, _ = completion_logps(ctx.model, [prompt, prompt], [right, wrong], pad)
        return values.sum(1)

    before = logps()
    for _ in range(3):
        _step(ctx, method, batch, lr=0.2)
    after = logps()
    assert calls == [4, 4, 4]  # G completions of the one prompt per step
    assert after[0] > before[0] + 1e-3  # the right completion (above the group mean) is more likely
    assert after[1] < before[1] - 1e-3  # the wrong one less
    assert ctx.logged["rft/reward"][0] == pytest.approx(0.25)


def test_a_group_that_is_all_right_gives_no_gradient(tmp_path, monkeypatch):
    ctx, tasks = tiny_context(tmp_path, "rft")
    task = tasks[1]
    example = task.train[0]
    right = _ids(ctx, example.reference)
    _scripted(monkeypatch, {tuple(encode_prompt(ctx.tokenizer, example)): [right] * 4})
    method = RFT(RFTConfig(filter_rollouts=0))
    batch = ctx.collate(ctx.encode(method.training_data(ctx, task, [example])))
    loss = _step(ctx, method, batch)
    assert loss.item() == 0.0
    grads = [p.grad for p in trainable_parameters(ctx.model).values() if p.grad is not None]
    assert all(float(g.abs().sum()) == 0.0 for g in grads)
    assert ctx.logged["rft/zero_std_groups"][-1] == 1.0


def test_the_ratio_is_clipped_and_the_kl_is_to_the_model_without_adapters(tmp_path, monkeypatch):
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    # ratio e > 1 + eps: with a positive advantage the clipped term is the min and has no gradient ...
    grpo_objective(logps, logps.detach() - 1.0, torch.tensor([1.0]), mask, epsilon=0.2).backward()
    assert torch.equal(logps.grad, torch.zeros(1, 2))
    # ... with a negative one the unclipped term is, and it does.
    logps.grad = None
    grpo_objective(logps, logps.detach() - 1.0, torch.tensor([-1.0]), mask, epsilon=0.2).backward()
    assert float(logps.grad.abs().sum()) > 0
    same = grpo_objective(
        logps, logps.detach(), torch.tensor([0.0]), mask, epsilon=0.2, beta=1.0, ref_logps=logps
    )
    assert same.item() == 0.0
    token = grpo_objective(
        logps, logps.detach(), torch.tensor([2.0]), mask, epsilon=0.2, loss_type="token", tokens=4
    )
    assert token.item() == pytest.approx(-2.0 * 2 / 4)

    ctx, tasks = tiny_context(tmp_path, "rft")
    task = tasks[1]
    example = task.train[0]
    right = _ids(ctx, example.reference)
    _scripted(monkeypatch, {tuple(encode_prompt(ctx.tokenizer, example)): [right] * 4})
    method = RFT(RFTConfig(filter_rollouts=0, beta=0.5))
    batch = ctx.collate(ctx.encode(method.training_data(ctx, task, [example])))
    # LoRA starts at B = 0, so the policy is the reference: zero KL, and zero advantage (all right).
    assert _step(ctx, method, batch, lr=0.0).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in trainable_parameters(ctx.model).values():
            p.add_(0.3 * torch.randn_like(p))
    assert _step(ctx, method, batch, lr=0.0).item() > 1e-4  # only the KL to the adapter-free model is left


def test_settings_are_checked(tmp_path):
    with pytest.raises(RetainError, match="method.num_generations"):
        create_method("rft", {"num_generations": 1})
    with pytest.raises(RetainError, match="method.filter_rollouts"):
        create_method("rft", {"filter_rollouts": 1})
    with pytest.raises(RetainError, match="method.filter_rule must be one of"):
        create_method("rft", {"filter_rule": "some"})
    config = config_from_dict(tiny_config(tmp_path, "rft", {"beta": 0.1}, model={"finetuning_type": "full"}))
    tokenizer = tiny_tokenizer()
    ctx = MethodContext.create(tiny_model(tokenizer), tokenizer, config, build_stream(config))
    with pytest.raises(RetainError, match="method.beta > 0 needs a reference model"):
        create_method("rft", {"beta": 0.1}).setup(ctx)


def test_examples_of_earlier_tasks_are_scored_by_their_own_scorer(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "rft")
    ctx.task_index = 2
    method = RFT(RFTConfig(filter_rollouts=0))
    mixed = tasks[1].train[:2] + tasks[0].train[:1]
    method.training_data(ctx, tasks[1], mixed)
    batch = ctx.collate(ctx.encode(mixed))
    assert [scorer for _, _, scorer in method._lookup(batch)] == [tasks[1].scorer] * 2 + [tasks[0].scorer]
    assert tasks[0].scorer != tasks[1].scorer
    with pytest.raises(RetainError, match="list rft after"):
        method._lookup(ctx.collate(ctx.encode(tasks[0].train[1:2])))


def test_a_three_task_stream_learns_from_partial_rewards_and_resumes_to_the_same_matrix(
    tmp_path, monkeypatch
):
    """With a partial-credit scorer the tiny model's rollouts differ in reward, so GRPO moves the adapter;
    a run killed in task 2 resumes to the same matrix."""
    tasks = [
        {"name": name, "train": f"synthetic:{name}", "scorer": "edit_sim"}
        for name in ("reverse", "parity", "capital_letters")
    ]
    params = {"num_generations": 2, "filter_rollouts": 2, "correct_threshold": 0.3}

    def raw(folder):
        return tiny_config(tmp_path / folder, "rft", params, stream={"tasks": tasks}, train={"max_steps": 4})

    expected = run_experiment(config_from_dict(raw("whole")))
    run = tmp_path / "whole" / "run" / "tasks"
    adapters = [
        load_file(str(run / f"{i}-{name}" / "adapter" / "adapter_model.safetensors"))
        for i, name in ((0, "init"), (1, "reverse"), (2, "parity"), (3, "capital_letters"))
    ]
    for before, after in itertools.pairwise(adapters):
        assert sum(float((before[k] - after[k]).abs().sum()) for k in before) > 0
    assert_same(crash_then_resume(raw("crashed"), monkeypatch), expected)
