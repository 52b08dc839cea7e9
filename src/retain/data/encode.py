"""Examples -> token ids with the tokenizer's own chat template; the loss is only on assistant turns.

The conversation is rendered prefix by prefix (messages[:i] with the generation prompt, then messages[:i+1]),
so the text of each assistant turn is an exact difference of two renders and each segment is tokenized on
its own: turn boundaries are exact whatever the template, and `encode_prompt` gives the very same ids as
the prompt part of `encode_example`, so evaluation sees what training saw.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from retain.data.batching import IGNORE_INDEX
from retain.data.formats import Example
from retain.errors import RetainError

# The template of tokenizers that bring none (SmolLM2's ChatML, which the tiny test tokenizer also uses).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
logger = logging.getLogger(__name__)


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    # Base models often ship without a template; ChatML is what SmolLM2 and our tiny tokenizer use.
    template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )
    except TemplateError as err:
        raise RetainError(
            f"the tokenizer's chat template cannot render this conversation ({err}); "
            "drop the system message or use a model whose template supports it"
        ) from err


def _suffix(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        # Some templates re-render earlier turns (e.g. strip reasoning), so turns have no fixed boundary.
        raise RetainError(
            "the tokenizer's chat template renders earlier turns differently once later turns are added, "
            "so assistant turns cannot be located exactly; use a model or template without that behaviour"
        )
    return text[len(prefix) :]


def _segments(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """Rendered text split into (text, is_assistant_turn) pieces that concatenate to the full render."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        segments.append((_suffix(done, prompt), False))
        segments.append((_suffix(prompt, full), True))
        done = full
    tail = _render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    segments.append((_suffix(done, tail), False))
    return [(text, learned) for text, learned in segments if text]


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # The template already writes any BOS it wants; add_special_tokens=True would add a second one.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assistant_labels(tokenizer: Any, ids: list[int]) -> list[int]:
    """Labels for one assistant segment: all of it, except whitespace the template writes after the end token.

    ChatML renders "answer<|im_end|>\\n"; the model should learn to stop at <|im_end|>, not to emit "\\n".
    """
    special = set(tokenizer.all_special_ids)
    special |= {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    last_special = max((k for k, token in enumerate(ids) if token in special), default=None)
    if last_special is None or tokenizer.decode(ids[last_special + 1 :]).strip():
        return list(ids)
    return list(ids[: last_special + 1]) + [IGNORE_INDEX] * (len(ids) - last_special - 1)


def _check(example: Example) -> None:
    if not example.messages or example.messages[-1]["role"] != "assistant":
        where = example.meta.get("source", "an example")
        raise RetainError(
            f"{where}: example {example.meta.get('index', '?')} does not end with an assistant turn"
        )


def _encode_full(tokenizer: Any, example: Example) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, prompt_len) without truncation; prompt_len counts tokens before the last answer."""
    _check(example)
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_len = 0
    for text, learned in _segments(tokenizer, example.chat_messages, add_generation_prompt=False):
        ids = _tokenize(tokenizer, text)
        if learned:
            prompt_len = len(input_ids)
            labels += _assistant_labels(tokenizer, ids)
        else:
            labels += [IGNORE_INDEX] * len(ids)
        input_ids += ids
    return input_ids, labels, prompt_len


def _too_long(cutoff_len: int, prompt_len: int, where: str) -> RetainError:
    return RetainError(
        f"{where}: the prompt is {prompt_len} tokens, which leaves no room for the answer within "
        f"cutoff_len={cutoff_len}; raise cutoff_len above {prompt_len} or shorten the prompt"
    )


def encode_example(
    tokenizer: Any, example: Example, cutoff_len: int, source: str | None = None
) -> dict[str, list[int]]:
    """Token ids, labels (-100 outside assistant turns) and attention mask, tail-truncated to cutoff_len.

    Raises RetainError when the prompt alone fills cutoff_len (truncating it would train on no answer).
    """
    input_ids, labels, prompt_len = _encode_full(tokenizer, example)
    if prompt_len >= cutoff_len:
        where = source or example.meta.get("source", "dataset")
        raise _too_long(cutoff_len, prompt_len, f"{where}: example {example.meta.get('index', '?')}")
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def render_prompt(tokenizer: Any, example: Example) -> str:
    """The prompt text the model sees at test time: every message but the last, then the generation prompt."""
    return "".join(
        text for text, _ in _segments(tokenizer, example.prompt_messages, add_generation_prompt=True)
    )


def encode_prompt(tokenizer: Any, example: Example) -> list[int]:
    """Token ids of the generation prompt, identical to the prompt part of `encode_example`'s input_ids."""
    ids: list[int] = []
    for text, _ in _segments(tokenizer, example.prompt_messages, add_generation_prompt=True):
        ids += _tokenize(tokenizer, text)
    return ids


def encode_dataset(
    tokenizer: Any, examples: Sequence[Example], cutoff_len: int, source: str
) -> list[dict[str, list[int]]]:
    """Encode every example; if any prompt fills cutoff_len, raise once, saying how many and the longest."""
    encoded = []
    too_long: list[tuple[int, int]] = []
    for position, example in enumerate(examples):
        input_ids, labels, prompt_len = _encode_full(tokenizer, example)
        if prompt_len >= cutoff_len:
            too_long.append((example.meta.get("index", position), prompt_len))
            continue
        input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        encoded.append({"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)})
    if too_long:
        longest = max(length for _, length in too_long)
        raise RetainError(
            f"{source}: {len(too_long)} of {len(examples)} examples have a prompt of cutoff_len={cutoff_len} "
            f"tokens or more (first: example {too_long[0][0]}, {too_long[0][1]} tokens; longest: {longest} "
            f"tokens); raise cutoff_len above {longest} or shorten those prompts"
        )
    truncated = sum(1 for item in encoded if len(item["input_ids"]) == cutoff_len)
    if truncated:
        logger.info(
            "%s: %d of %d examples truncated to cutoff_len=%d", source, truncated, len(encoded), cutoff_len
        )
    return encoded
