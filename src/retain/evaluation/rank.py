"""Rank evaluation: pick the label of a classification task with the highest log-likelihood, no generation.

Each (prompt, label) pair is encoded exactly as training encodes that answer (`encode_example`: the chat
template's prompt, then the label and the end-of-turn token, which carry the loss), so a label's score is
the summed log-probability of precisely the tokens training teaches. Everything goes through the model's
own forward, so LoRA/PEFT models and routed methods rank with the weights they generate with.

By default each prompt is run once: a batch of left-padded prompts (`collate`) is one forward that fills
the KV cache and gives every label's first token, then each label's remaining tokens are one short
forward on that cache, which is cropped back to the prompt afterwards. Running every (prompt, label) pair
in full (`share_prompt=False`, and the fallback for caches that cannot be cropped) costs one prompt pass
per label: with two labels it is barely faster than generating, with ten it is several times slower.

Image-text models: prompts carry their images (read from disk batch by batch, `collate`). The answer
tokens on the cache are placed where the model itself would place them, including M-RoPE models
(Qwen2-VL, Qwen2.5-VL) whose text positions after an image trail its token count (`_answer_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retain.data.batching import IGNORE_INDEX, PER_TOKEN_KEYS, TEXT_KEYS, collate
from retain.data.encode import encode_example, encode_prompt_inputs
from retain.data.formats import Example
from retain.errors import RetainError
from retain.models.forward import model_inputs, response_forward

# Prompts are never truncated at evaluation (generation does not truncate them either).
_NO_CUTOFF = 1 << 30


def encode_choice(tokenizer: Any, example: Example, label: str, processor: Any = None) -> dict[str, Any]:
    """Token ids and labels of `example`'s prompt answered with `label`, ending at the last learned token.

    Whatever the template writes after the end-of-turn token (ChatML's "\\n") has no label, so it is cut:
    the answers of a left-padded batch then all end in the last column.
    """
    messages = example.messages[:-1] + [{"role": "assistant", "content": label}]
    answered = replace(example, messages=messages)
    encoded = encode_example(tokenizer, answered, _NO_CUTOFF, processor=processor, defer_images=True)
    ids, labels = encoded["input_ids"], encoded["labels"]
    end = max((k for k, token in enumerate(labels) if token != IGNORE_INDEX), default=-1) + 1
    if end == 0:
        raise RetainError(f"rank evaluation: the label {label!r} encodes to no answer tokens")
    images = {
        key: value[:end] if key in PER_TOKEN_KEYS else value
        for key, value in encoded.items()
        if key not in ("input_ids", "labels", "attention_mask")
    }
    return {"input_ids": ids[:end], "labels": labels[:end], **images}


def encode_answers(
    tokenizer: Any, example: Example, labels: Sequence[str], processor: Any = None
) -> tuple[list[int], list[list[int]], dict[str, Any]]:
    """The prompt's token ids, per label the answer tokens that follow them in `encode_choice`, and the
    prompt's image inputs (empty for a text example)."""
    # The images are read again batch by batch (collate), not held for the whole test set.
    inputs = encode_prompt_inputs(tokenizer, example, processor, defer_images=True)
    prompt = inputs["input_ids"]
    images = {key: value for key, value in inputs.items() if key not in TEXT_KEYS}
    answers = []
    for label in labels:
        ids = encode_choice(tokenizer, example, label, processor)["input_ids"]
        # encode.py guarantees this; a template that broke it would score the wrong tokens silently.
        if ids[: len(prompt)] != prompt or len(ids) == len(prompt):
            raise RetainError(
                f"rank evaluation: the chat template renders the prompt differently once the answer "
                f"{label!r} follows it, so the answer tokens cannot be located"
            )
        answers.append(ids[len(prompt) :])
    return prompt, answers, images


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row summed -log p of the targets (IGNORE_INDEX: skipped), in fp32 whatever the autocast dtype."""
    per_token = F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_token.sum(dim=1)


def _croppable(cache: Any) -> bool:
    """Whether cropping the cache back to the prompts restores it exactly."""
    if not hasattr(cache, "crop"):
        return False
    flag = getattr(cache, "is_croppable", None)
    if flag is not None:
        return bool(flag)
    # Older transformers: sliding-window layers drop old states, so cropping cannot bring them back.
    return not any(getattr(cache, "is_sliding", None) or [])


def _answer_positions(
    model: Any, batch: dict[str, torch.Tensor], count: int, device: torch.device
) -> torch.Tensor | None:
    """The positions of the first `count` answer tokens after each prompt of `batch` (just run), or None
    when they cannot be known.

    Text positions continue from the prompt's length. An M-RoPE model (Qwen2-VL and its successors, whose
    image batches carry image_grid_thw) numbers an image by its grid rather than its token count, so the
    text after it sits `rope_deltas` positions off; the model keeps the offsets of its last prompt forward
    (as its own generation reads them). Without exactly one such record the answers are not scored on the
    cache (None).
    """
    lengths = batch["attention_mask"].sum(dim=1, keepdim=True)
    positions = lengths + torch.arange(count, device=device)
    if "image_grid_thw" not in batch:
        return positions
    deltas = [
        module.rope_deltas
        for module in model.modules()
        if isinstance(getattr(module, "rope_deltas", None), torch.Tensor)
    ]
    if len(deltas) != 1 or deltas[0].shape != lengths.shape:
        return None
    return positions + deltas[0].to(device)


def _shared_prompt_batch(
    model: Any,
    prompts: list[list[int]],
    answers: list[list[list[int]]],
    pad_id: int,
    device: torch.device,
    images: list[dict[str, Any]],
) -> list[list[float]] | None:
    """Scores of every label for one batch of prompts, each prompt run once (with its images, which the
    answers then read through the cache); None if the cache cannot crop."""
    features = [
        {"input_ids": p, "labels": [IGNORE_INDEX] * len(p), **i} for p, i in zip(prompts, images, strict=True)
    ]
    batch = collate(features, pad_id)
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    out = model(**model_inputs(batch), logits_to_keep=1, use_cache=True)
    cache = out.past_key_values
    if not _croppable(cache):
        return None
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # p(first answer token | prompt)
    longest_answer = max(len(a) for row in answers for a in row)
    positions = _answer_positions(model, batch, longest_answer, device)
    if positions is None:
        return None
    scores = torch.zeros(len(prompts), len(answers[0]))
    for j in range(len(answers[0])):
        rows = [a[j] for a in answers]
        longest = max(len(r) for r in rows)
        # Right-padded: every answer starts right after its prompt; padding only follows real tokens.
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        targets = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = targets[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        ids, targets, mask = ids.to(device), targets.to(device), mask.to(device)
        ll = first.gather(1, ids[:, :1]).squeeze(1)
        if longest > 1:
            # The last answer token predicts nothing we score, so it is not fed.
            follow = model(
                input_ids=ids[:, :-1],
                attention_mask=torch.cat([batch["attention_mask"], mask[:, :-1]], dim=1),
                position_ids=positions[:, : longest - 1],
                past_key_values=cache,
                use_cache=True,
            )
            ll = ll - _nll(follow.logits, targets[:, 1:])
            # Back to the prompts alone for the next label (a negative count: tokens to drop, in every
            # transformers version).
            cache.crop(-(longest - 1))
        scores[:, j] = ll.cpu()
    return scores.tolist()


def _pair_batch(
    model: Any,
    pairs: list[tuple[list[int], list[int], dict[str, Any]]],
    pad_id: int,
    device: torch.device,
) -> list[float]:
    """Scores of (prompt, answer, prompt's image inputs) triples, each run in full: left-padded, one
    forward (`response_forward`)."""
    features = [
        {
            "input_ids": p + a,
            "labels": [IGNORE_INDEX] * len(p) + a,
            # per-token image inputs cover the prompt; the answer holds no image token
            **{key: list(v) + [0] * len(a) if key in PER_TOKEN_KEYS else v for key, v in i.items()},
        }
        for p, a, i in pairs
    ]
    batch = collate(features, pad_token_id=pad_id)
    outputs = response_forward(model, {name: tensor.to(device) for name, tensor in batch.items()})
    return (-_nll(outputs.logits, outputs.labels)).tolist()


# per example: prompt ids, answer ids per label, the prompt's image inputs
Encoded = list[tuple[list[int], list[list[int]], dict[str, Any]]]


def _score_shared(
    model: Any,
    encoded: Encoded,
    scores: list[list[float]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    bar: Any,
) -> bool:
    """Fill `scores` running each prompt once; False (nothing filled) when the cache cannot be cropped."""
    # Longest first: batches of similar lengths waste little on padding; a memory error shows at once.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = _shared_prompt_batch(
            model,
            [encoded[i][0] for i in batch],
            [encoded[i][1] for i in batch],
            pad_id,
            device,
            [encoded[i][2] for i in batch],
        )
        if rows is None:  # e.g. a sliding-window cache; the first batch already tells
            return False
        for i, row in zip(batch, rows, strict=True):
            scores[i] = row
        bar.update(sum(len(encoded[i][1]) for i in batch))
    return True


def _score_pairs(
    model: Any,
    encoded: Encoded,
    scores: list[list[float]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    bar: Any,
) -> None:
    """Fill `scores` running every (prompt, answer) pair in full, longest first."""
    pairs = [(i, j) for i, (_, answers, _) in enumerate(encoded) for j in range(len(answers))]
    pairs.sort(key=lambda ij: len(encoded[ij[0]][0]) + len(encoded[ij[0]][1][ij[1]]), reverse=True)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        values = _pair_batch(
            model, [(encoded[i][0], encoded[i][1][j], encoded[i][2]) for i, j in batch], pad_id, device
        )
        for (i, j), value in zip(batch, values, strict=True):
            scores[i][j] = value
        bar.update(len(batch))


def label_log_likelihoods(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "ranking",
    share_prompt: bool = True,
    processor: Any = None,
) -> list[list[float]]:
    """For each example, the summed log-probability of each label's answer tokens, in `labels`' order.

    Every forward pass holds at most `batch_size` sequences: prompts (then their answers) when the prompt
    is shared, (prompt, label) pairs otherwise. The model is put in eval mode for the call and back in
    train mode afterwards if it was training; autocast, if any, is the caller's. Examples with images
    need `processor` (the image-text model's): each prompt is scored with its images.
    """
    if batch_size < 1:
        raise RetainError(f"rank evaluation: batch_size is {batch_size}; set it to 1 or more")
    if not labels:
        raise RetainError("rank evaluation: the task has no labels to rank")
    encoded = [encode_answers(tokenizer, example, labels, processor) for example in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    device = _device(model)
    n = len(labels)
    scores: list[list[float]] = [[0.0] * n for _ in examples]
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=len(examples) * n, desc=desc, unit="answer", disable=not progress, leave=False) as bar,
        ):
            shared = share_prompt and _score_shared(model, encoded, scores, batch_size, pad_id, device, bar)
            if not shared:
                _score_pairs(model, encoded, scores, batch_size, pad_id, device, bar)
    finally:
        if was_training:
            model.train()
    return scores


def rank_labels(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "ranking",
    share_prompt: bool = True,
    processor: Any = None,
) -> tuple[list[str], list[list[float]]]:
    """The most likely label of each example (the first one on ties) and every label's log-likelihood."""
    scores = label_log_likelihoods(
        model, tokenizer, examples, labels, batch_size, progress, desc, share_prompt, processor
    )
    chosen = [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
    return chosen, scores
