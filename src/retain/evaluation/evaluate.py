"""Evaluate the model on every task of the stream: one row of the accuracy matrix per call."""

from __future__ import annotations

import contextlib
import json
import os

import torch

from retain.data.encode import encode_prompt
from retain.evaluation.generate import generate
from retain.evaluation.report import write_text_atomic
from retain.evaluation.scoring import get_scorer
from retain.methods.base import ContinualMethod, MethodContext


def _answer(
    method: ContinualMethod, ctx: MethodContext, task, prompts, routes, row, **generation
) -> list[str]:
    """Predictions for `prompts`, generated route by route when the method routes instances."""
    if routes is None:
        model = method.eval_model(ctx, task)
        return generate(model, ctx.tokenizer, prompts, desc=f"eval row {row}: {task.name}", **generation)
    predictions = [""] * len(prompts)
    for route in dict.fromkeys(routes):
        members = [i for i, r in enumerate(routes) if r == route]
        model = method.activate_route(ctx, route)
        answers = generate(
            model,
            ctx.tokenizer,
            [prompts[i] for i in members],
            desc=f"eval row {row}: {task.name} [{route}]",
            **generation,
        )
        for i, answer in zip(members, answers, strict=True):
            predictions[i] = answer
    return predictions


def evaluate_row(
    method: ContinualMethod,
    ctx: MethodContext,
    row: int,
    out_files: list[str],
    max_new_tokens: int,
    batch_size: int,
    bf16: bool = False,
) -> list[float]:
    """Score every task's test set; write one JSONL of predictions per task; return the mean scores."""
    scores_row = []
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for task, out_file in zip(ctx.tasks, out_files, strict=True):
        prompts = [encode_prompt(ctx.tokenizer, example) for example in task.test]
        routes = method.eval_routes(ctx, task)
        with autocast:
            predictions = _answer(
                method, ctx, task, prompts, routes, row, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        scorer = get_scorer(task.scorer)
        lines, scores = [], []
        for i, (example, prediction) in enumerate(zip(task.test, predictions, strict=True)):
            score = float(scorer(prediction, example.reference))
            scores.append(score)
            record = {
                "prompt": example.prompt_messages,
                "prediction": prediction,
                "reference": example.reference,
                "score": score,
            }
            if routes is not None:
                record["route"] = routes[i]
            lines.append(json.dumps(record, ensure_ascii=False))
        os.makedirs(os.path.dirname(out_file), exist_ok=True)
        write_text_atomic(out_file, "\n".join(lines) + "\n")
        scores_row.append(sum(scores) / len(scores) if scores else 0.0)
    return scores_row
