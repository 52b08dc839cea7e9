"""eval.mode rank: labels ranked by log-likelihood in batches, per route; unlabeled tasks still generate."""

from __future__ import annotations

import json

import pytest
import torch

from retain.data.batching import IGNORE_INDEX
from retain.data.encode import encode_example
from retain.data.formats import Example
from retain.data.synthetic import load_synthetic
from retain.engine.evaluate import evaluate_row
from retain.evaluation.rank import encode_choice, label_log_likelihoods, rank_labels
from retain.evaluation.scoring import accuracy, sari
from retain.methods.base import ContinualMethod
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import AlternatingRoutes, tiny_context

# Different token lengths, so batches mix answers of 2 to 6 tokens (with the end-of-turn token).
LABELS = ["even", "odd", "neither of them", "x"]


def _answered(example: Example, label: str) -> Example:
    return Example(example.messages[:-1] + [{"role": "assistant", "content": label}], example.system)


def _log_likelihood_alone(model, tokenizer, example: Example, label: str) -> float:
    """One prompt, one label, no padding: sum of log p over the tokens training puts loss on."""
    encoded = encode_example(tokenizer, _answered(example, label), cutoff_len=4096)
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(
        float(logprobs[t - 1, ids[0, t]])
        for t, label_id in enumerate(encoded["labels"])
        if label_id != IGNORE_INDEX
    )


def test_choice_tokens_are_the_trained_answer_tokens():
    tokenizer = tiny_tokenizer()
    example = load_synthetic("synthetic:parity", 1, seed=0, split="test")[0]
    lengths = set()
    for label in LABELS:
        full = encode_example(tokenizer, _answered(example, label), cutoff_len=4096)
        choice = encode_choice(tokenizer, example, label)
        learned = [t for t in full["labels"] if t != IGNORE_INDEX]
        assert [t for t in choice["labels"] if t != IGNORE_INDEX] == learned
        assert choice["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert choice["input_ids"] == full["input_ids"][: len(choice["input_ids"])]
        lengths.add(len(learned))
    assert len(lengths) > 2


def _setting():
    tokenizer = tiny_tokenizer()
    # Larger initial weights make the random model's preferences depend on the prompt, not only on length.
    model = tiny_model(tokenizer, seed=2, initializer_range=0.5)
    examples = load_synthetic("synthetic:parity", 5, seed=0, split="test")
    examples += load_synthetic("synthetic:capital_letters", 3, seed=0, split="test")  # other prompt lengths
    expected = [[_log_likelihood_alone(model, tokenizer, e, label) for label in LABELS] for e in examples]
    return tokenizer, model, examples, expected


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "full-pairs"])
def test_batched_ranking_matches_one_prompt_at_a_time(share_prompt):
    tokenizer, model, examples, expected = _setting()
    # Batches of 3 prompts or 5 pairs: every batch mixes prompts and answers of different lengths.
    scores = label_log_likelihoods(
        model, tokenizer, examples, LABELS, batch_size=3 if share_prompt else 5, share_prompt=share_prompt
    )
    assert scores == [pytest.approx(row, abs=1e-4) for row in expected]
    chosen, _ = rank_labels(model, tokenizer, examples, LABELS, batch_size=7, share_prompt=share_prompt)
    assert chosen == [LABELS[max(range(len(LABELS)), key=row.__getitem__)] for row in expected]
    assert len(set(chosen)) > 1  # the argmax is not the same label everywhere
    assert not model.training


def test_caches_that_cannot_crop_fall_back_to_full_pairs(monkeypatch):
    from transformers.cache_utils import Cache

    tokenizer, model, examples, expected = _setting()
    monkeypatch.setattr(Cache, "is_croppable", property(lambda self: False))
    scores = label_log_likelihoods(model, tokenizer, examples, LABELS, batch_size=4, progress=False)
    assert scores == [pytest.approx(row, abs=1e-4) for row in expected]


@pytest.mark.parametrize("method", [ContinualMethod(), AlternatingRoutes()], ids=["plain", "routed"])
def test_rank_mode_writes_label_scores_and_scores_the_argmax(tmp_path, method):
    ctx, tasks = tiny_context(tmp_path)
    ctx.config.eval.mode = "rank"
    tasks[0].labels = ["even", "odd", "even"]  # a duplicate label is ranked once
    tasks[0].scorer = "accuracy"
    files = [str(tmp_path / f"{t.name}.jsonl") for t in tasks]
    row = evaluate_row(method, ctx, 1, files, max_new_tokens=4, batch_size=3)

    records = [json.loads(line) for line in open(files[0])]
    _, direct = rank_labels(ctx.model, ctx.tokenizer, tasks[0].test, ["even", "odd"], progress=False)
    for record, scores in zip(records, direct, strict=True):
        assert record["mode"] == "rank"
        assert list(record["label_scores"]) == ["even", "odd"]
        assert list(record["label_scores"].values()) == pytest.approx(scores, abs=1e-3)
        assert record["prediction"] == max(record["label_scores"], key=record["label_scores"].get)
        assert record["score"] == accuracy(record["prediction"], record["reference"])
    assert row[0] == pytest.approx(sum(r["score"] for r in records) / len(records))
    if isinstance(method, AlternatingRoutes):
        assert [r["route"] for r in records] == ["a" if i % 2 == 0 else "b" for i in range(len(records))]
        assert method.activated == ["a", "b", "a", "b"]  # each route once per task, in both modes
    # The second task has no labels: generated as usual.
    generated = json.loads(open(files[1]).readline())
    assert "mode" not in generated and "label_scores" not in generated


def test_tasks_without_labels_generate_in_rank_mode(tmp_path):
    ctx, tasks = tiny_context(tmp_path)
    generate_files = [str(tmp_path / "generate" / f"{t.name}.jsonl") for t in tasks]
    rank_files = [str(tmp_path / "rank" / f"{t.name}.jsonl") for t in tasks]
    generated_row = evaluate_row(ContinualMethod(), ctx, 0, generate_files, max_new_tokens=4, batch_size=8)
    ctx.config.eval.mode = "rank"
    ranked_row = evaluate_row(ContinualMethod(), ctx, 0, rank_files, max_new_tokens=4, batch_size=8)
    assert ranked_row == generated_row
    for generate_file, rank_file in zip(generate_files, rank_files, strict=True):
        assert open(generate_file).read() == open(rank_file).read()


def test_source_scorers_get_the_last_user_message(tmp_path):
    ctx, tasks = tiny_context(tmp_path)
    tasks[1].scorer = "sari"
    files = [str(tmp_path / f"{t.name}.jsonl") for t in tasks]
    row = evaluate_row(ContinualMethod(), ctx, 0, files, max_new_tokens=4, batch_size=8)
    records = [json.loads(line) for line in open(files[1])]
    expected = [sari(r["prediction"], r["reference"], source=r["prompt"][-1]["content"]) for r in records]
    assert [r["score"] for r in records] == pytest.approx(expected)
    assert row[1] == pytest.approx(sum(expected) / len(expected))
