"""Evaluate the model on every task of the stream: one row of the accuracy matrix per call.

This lives in the engine, not in evaluation/, because it asks the method which model (or which route of
a routed method) answers each prompt; evaluation/ only generates, ranks and scores.

With `eval.mode: generate` every task's test prompts are answered by greedy generation. With
`eval.mode: rank`, a task with a label set (`Task.labels`) is answered by ranking its labels by
log-likelihood instead (retain.evaluation.rank); tasks without labels are still generated.

With an image-text model (`ctx.processor`), each prompt's images go to the model with it in both modes,
and each prediction record names its prompt's images.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from retain.data.batching import TEXT_KEYS
from retain.data.encode import encode_prompt_inputs
from retain.evaluation.generate import generate
from retain.evaluation.rank import rank_labels
from retain.evaluation.scoring import needs_source, score
from retain.io import write_text_atomic
from retain.methods.base import ContinualMethod, MethodContext

T = TypeVar("T")
# answer(model, indices of the test examples to answer, progress-bar suffix) -> one result per index
Answerer = Callable[[nn.Module, list[int], str], list[T]]


def _by_route(
    method: ContinualMethod, ctx: MethodContext, task, routes: list[str] | None, answer: Answerer[T]
) -> list[T]:
    """Results for every test example of `task`, answered route by route when the method routes instances."""
    if routes is None:
        return answer(method.eval_model(ctx, task), list(range(len(task.test))), "")
    results: list[Any] = [None] * len(task.test)
    for route in dict.fromkeys(routes):
        members = [i for i, r in enumerate(routes) if r == route]
        model = method.activate_route(ctx, route)
        for i, result in zip(members, answer(model, members, f" [{route}]"), strict=True):
            results[i] = result
    return results


def _generated(ctx: MethodContext, task, row: int, **generation: Any) -> Answerer[str]:
    inputs = [
        encode_prompt_inputs(ctx.tokenizer, example, ctx.processor, defer_images=True)
        for example in task.test
    ]
    prompts = [item["input_ids"] for item in inputs]
    images = [{key: value for key, value in item.items() if key not in TEXT_KEYS} for item in inputs]
    with_images = any(images)

    def answer(model: nn.Module, members: list[int], suffix: str) -> list[str]:
        desc = f"eval row {row}: {task.name}{suffix}"
        return generate(
            model,
            ctx.tokenizer,
            [prompts[i] for i in members],
            desc=desc,
            images=[images[i] for i in members] if with_images else None,
            **generation,
        )

    return answer


def _ranked(
    ctx: MethodContext, task, labels: list[str], row: int, batch_size: int
) -> Answerer[tuple[str, list[float]]]:
    def answer(model: nn.Module, members: list[int], suffix: str) -> list[tuple[str, list[float]]]:
        chosen, scores = rank_labels(
            model,
            ctx.tokenizer,
            [task.test[i] for i in members],
            labels,
            batch_size=batch_size,
            desc=f"eval row {row}: {task.name}{suffix} (rank)",
            processor=ctx.processor,
        )
        return list(zip(chosen, scores, strict=True))

    return answer


def evaluate_row(
    method: ContinualMethod,
    ctx: MethodContext,
    row: int,
    out_files: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[float]:
    """Score every task's test set; write one JSONL of predictions per task; return the mean scores.

    `batch_size` is prompts per batch in both modes (rank mode scores every label of a batch's prompts);
    the model answers under bf16 autocast when the run trains in bf16 (`ctx.bf16`).
    """
    scores_row = []
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if ctx.bf16 else contextlib.nullcontext()
    rank_mode = ctx.config.eval.mode == "rank"
    for task, out_file in zip(ctx.tasks, out_files, strict=True):
        # Duplicate labels would only split ties; the order is kept so ties go to the first label.
        labels = list(dict.fromkeys(task.labels or [])) if rank_mode else []
        routes = method.eval_routes(ctx, task)
        label_scores: list[list[float]] | None = None
        with autocast:
            if labels:
                ranked = _by_route(method, ctx, task, routes, _ranked(ctx, task, labels, row, batch_size))
                predictions = [label for label, _ in ranked]
                label_scores = [scores for _, scores in ranked]
            else:
                answer = _generated(ctx, task, row, max_new_tokens=max_new_tokens, batch_size=batch_size)
                predictions = _by_route(method, ctx, task, routes, answer)
        with_source = needs_source(task.scorer)
        lines, scores = [], []
        for i, (example, prediction) in enumerate(zip(task.test, predictions, strict=True)):
            # The source of a rewriting task (SARI) is the text the model was given: the last user turn.
            source = example.prompt_messages[-1]["content"] if with_source else None
            value = score(task.scorer, prediction, example.reference, source)
            scores.append(value)
            record: dict[str, Any] = {
                "prompt": example.prompt_messages,
                **({"images": example.images} if example.images else {}),
                "prediction": prediction,
                "reference": example.reference,
                "score": value,
            }
            if label_scores is not None:
                record["mode"] = "rank"
                record["label_scores"] = {
                    label: round(ll, 4) for label, ll in zip(labels, label_scores[i], strict=True)
                }
            if routes is not None:
                record["route"] = routes[i]
            lines.append(json.dumps(record, ensure_ascii=False))
        os.makedirs(os.path.dirname(out_file), exist_ok=True)
        write_text_atomic(out_file, "\n".join(lines) + "\n")
        scores_row.append(sum(scores) / len(scores) if scores else 0.0)
    return scores_row
