"""Evaluate the model on every task of the stream: one row of the accuracy matrix per call.

This lives in the engine, not in evaluation/, because it asks the method which model (or which route of
a routed method) answers each prompt; evaluation/ only generates, ranks and scores.

With `eval.mode: generate` every task's test prompts are answered by greedy generation. With
`eval.mode: rank`, a task with a label set (`Task.labels`) is answered by ranking its labels by
log-likelihood instead (retain.evaluation.rank); tasks without labels are still generated.

With an image-text model (`ctx.processor`), each prompt's images go to the model with it in both modes,
and each prediction record names its prompt's images.

Under several processes (`all_processes=True`: every rank calls `evaluate_row` for the row), each
process answers a share of every task's prompts (`share`), route by route for a routed method, and the
answers are gathered back into test order (`assemble`) on every process; rank 0 writes the predictions.
The recorded predictions are those of one process in fp32: greedy answers and label scores do not depend
on which other prompts share a batch (left padding under an attention mask), only on the weights, which
every process holds alike.

When the parameters are sharded (FSDP, DeepSpeed ZeRO-3: `lockstep=True`), every forward pass is a
collective, so the processes cannot answer shares of different sizes, nor stop generating at different
steps: each process answers every prompt in the same batches (the forwards gather the shards in step),
nothing is gathered afterwards, and rank 0 writes. The answers are one process's answers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from retain.data.batching import TEXT_KEYS
from retain.data.encode import encode_prompt_inputs
from retain.errors import RetainError
from retain.evaluation.generate import generate
from retain.evaluation.rank import rank_labels
from retain.evaluation.scoring import needs_source, score
from retain.io import write_text_atomic
from retain.methods.base import ContinualMethod, MethodContext

T = TypeVar("T")
# answer(model, indices of the test examples to answer, progress-bar suffix) -> one result per index
Answerer = Callable[[nn.Module, list[int], str], list[T]]


def share(lengths: Sequence[int], members: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The test indices among `members` that process `rank` of `world_size` answers, in index order.

    Taken longest prompt first (`lengths[i]`: prompt i's tokens), process r answers every `world_size`-th
    from the r-th, so every process gets prompts of every length and the processes finish together. Each
    member goes to exactly one process; with one process, all of them in their order.
    """
    order = sorted(members, key=lambda i: lengths[i], reverse=True)
    return sorted(order[rank::world_size])


def assemble(shares: Sequence[Sequence[tuple[int, T]]], count: int) -> list[T]:
    """The results of `count` test examples in test order, from each process's (test index, result) pairs."""
    results: list[Any] = [None] * count
    filled = [False] * count
    for pairs in shares:
        for index, result in pairs:
            results[index] = result
            filled[index] = True
    missing = [i for i, done in enumerate(filled) if not done]
    if missing:
        # A process answered with routes or a test set other than rank 0's: a bug, never a user error.
        raise RetainError(f"evaluation: no process answered test examples {missing[:10]} of {count}")
    return results


def _answered(
    method: ContinualMethod,
    ctx: MethodContext,
    task,
    routes: list[str] | None,
    answer: Answerer[T],
    lengths: list[int] | None,
) -> list[tuple[int, T]]:
    """(test index, result) of the examples of `task` this process answers, route by route when the
    method routes instances: all of them, or with `lengths` (the prompts' token counts) its `share`."""
    every = list(range(len(task.test)))
    groups: dict[str | None, list[int]] = (
        {None: every}
        if routes is None
        else {r: [i for i in every if routes[i] == r] for r in dict.fromkeys(routes)}
    )
    pairs: list[tuple[int, T]] = []
    for route, members in groups.items():
        # Every process switches the model, even one with nothing to answer: all hold the same state.
        model = method.eval_model(ctx, task) if route is None else method.activate_route(ctx, route)
        chosen = members if lengths is None else share(lengths, members, ctx.rank, ctx.world_size)
        if chosen:
            suffix = "" if route is None else f" [{route}]"
            pairs.extend(zip(chosen, answer(model, chosen, suffix), strict=True))
    return pairs


def _generated(
    ctx: MethodContext, task, inputs: list[dict[str, Any]], row: int, progress: bool, **generation: Any
) -> Answerer[str]:
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
            progress=progress,
            images=[images[i] for i in members] if with_images else None,
            **generation,
        )

    return answer


def _ranked(
    ctx: MethodContext, task, labels: list[str], row: int, batch_size: int, progress: bool
) -> Answerer[tuple[str, list[float]]]:
    def answer(model: nn.Module, members: list[int], suffix: str) -> list[tuple[str, list[float]]]:
        chosen, scores = rank_labels(
            model,
            ctx.tokenizer,
            [task.test[i] for i in members],
            labels,
            batch_size=batch_size,
            progress=progress,
            desc=f"eval row {row}: {task.name}{suffix} (rank)",
            processor=ctx.processor,
        )
        return list(zip(chosen, scores, strict=True))

    return answer


def _from_rank_0(value: T) -> T:
    """Rank 0's `value` on every process."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(pairs: list[tuple[int, T]], count: int, world_size: int | None) -> list[T]:
    """Every process's answers in test order (`world_size` None: this process answered them all)."""
    if world_size is None:
        return assemble([pairs], count)
    shares: list[Any] = [None] * world_size
    dist.all_gather_object(shares, pairs)
    return assemble(shares, count)


def evaluate_row(
    method: ContinualMethod,
    ctx: MethodContext,
    row: int,
    out_files: list[str],
    max_new_tokens: int,
    batch_size: int,
    *,
    all_processes: bool = False,
    lockstep: bool = False,
    tasks: list | None = None,
) -> list[float]:
    """Score every task's test set; write one JSONL of predictions per task; return the mean scores.

    `tasks` defaults to the stream's (`ctx.tasks`); the eval-only tasks (`stream.eval_only`) are passed
    here instead, and each method answers them as it answers a task it has not trained (a router routes
    their instances as any others, CL-MoE uses its instance router alone).

    `batch_size` is prompts per batch (per process) in both modes (rank mode scores every label of a
    batch's prompts); the model answers under bf16 autocast when the run trains in bf16 (`ctx.bf16`).
    With `all_processes`, every one of the `ctx.world_size` processes calls this for the row: each answers
    its share of the prompts, all return the same scores, and only rank 0 writes (and shows progress);
    with `lockstep` too, each answers all the prompts in the same batches (for sharded parameters).
    """
    spread = all_processes and ctx.world_size > 1
    if spread and not (dist.is_available() and dist.is_initialized()):
        raise RetainError(
            f"evaluation: ctx.world_size is {ctx.world_size} but torch.distributed is not initialised; "
            "launch with torchrun or accelerate launch, or evaluate without all_processes"
        )
    main = not spread or ctx.rank == 0
    split = spread and not lockstep  # each process answers a share of the prompts
    scores_row = []
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if ctx.bf16 else contextlib.nullcontext()
    rank_mode = ctx.config.eval.mode == "rank"
    for task, out_file in zip(ctx.tasks if tasks is None else tasks, out_files, strict=True):
        # Duplicate labels would only split ties; the order is kept so ties go to the first label.
        labels = list(dict.fromkeys(task.labels or [])) if rank_mode else []
        routes = method.eval_routes(ctx, task)
        if spread:
            # Every process routes alike; rank 0's routes are the ones recorded, so all answer by them.
            routes = _from_rank_0(routes)
        # The prompts (images deferred): generation answers them, and the shares are cut by their lengths.
        inputs = (
            [encode_prompt_inputs(ctx.tokenizer, e, ctx.processor, defer_images=True) for e in task.test]
            if split or not labels
            else []
        )
        lengths = [len(item["input_ids"]) for item in inputs] if split else None
        with autocast:
            if labels:
                answer = _ranked(ctx, task, labels, row, batch_size, main)
            else:
                answer = _generated(
                    ctx, task, inputs, row, main, max_new_tokens=max_new_tokens, batch_size=batch_size
                )
            pairs = _answered(method, ctx, task, routes, answer, lengths)
        answers = _gathered(pairs, len(task.test), ctx.world_size if split else None)
        label_scores: list[list[float]] | None = None
        if labels:
            predictions = [label for label, _ in answers]
            label_scores = [scores for _, scores in answers]
        else:
            predictions = answers
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
        if main:
            os.makedirs(os.path.dirname(out_file), exist_ok=True)
            write_text_atomic(out_file, "\n".join(lines) + "\n")
        scores_row.append(sum(scores) / len(scores) if scores else 0.0)
    return scores_row
