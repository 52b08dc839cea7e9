"""Examples -> token ids with the tokenizer's own chat template; the loss is only on assistant turns.

The conversation is rendered prefix by prefix (messages[:i] with the generation prompt, then messages[:i+1]),
so the text of each assistant turn is an exact difference of two renders and each segment is tokenized on
its own: turn boundaries are exact whatever the template, and `encode_prompt` gives the very same ids as
the prompt part of `encode_example`, so evaluation sees what training saw.

An example with images is encoded with the image-text model's processor: each `<image>` placeholder is
rendered as the model's image text (`image_text`: the processor's image token, wrapped in the
vision-start and vision-end tokens for the Qwen-VL family), and every segment holding image tokens goes
through the processor with its images (loaded as RGB), which expands each image token to the model's
image tokens and returns the image inputs (pixel_values, ...). Image tokens never carry a label. Text
examples are encoded by the tokenizer alone, exactly as without a processor.

The token ids depend on the image (LLaVA-NeXT and Qwen2-VL give larger images more tokens), so encoding
reads every image once; with `defer_images` (always in `encode_dataset`) the pixel tensors are then
dropped and the feature holds a `DeferredImages` instead, which reads and processes the images again
when a batch is built (retain.data.batching): memory then holds the images of a batch, not of a task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jinja2 import TemplateError

from retain.data.batching import DEFERRED_IMAGES, IGNORE_INDEX, PER_TOKEN_KEYS, concat_images
from retain.data.formats import Example
from retain.data.images import IMAGE_PLACEHOLDER, load_image
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


def _where(example: Example, source: str | None = None) -> str:
    where = source or example.meta.get("source", "dataset")
    return f"{where}: example {example.meta.get('index', '?')}"


def image_token(processor: Any) -> str:
    """The token the processor expands into an image's tokens (`<image>` for LLaVA and SmolVLM,
    `<|image_pad|>` for Qwen2-VL)."""
    return getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER


# The Qwen-VL family's processors expand only the image pad token; the chat templates of those models
# write it between these two tokens, which the models were trained on (Qwen3-VL's processor names them,
# Qwen2-VL's and Qwen2.5-VL's only have them in the tokenizer).
_VISION_START, _VISION_END = "<|vision_start|>", "<|vision_end|>"


def image_text(processor: Any) -> str:
    """The text one `<image>` placeholder of the data becomes: the image token, wrapped in the
    vision-start and vision-end tokens when the model has them (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""
    token = image_token(processor)
    start = getattr(processor, "vision_start_token", None) or _VISION_START
    end = getattr(processor, "vision_end_token", None) or _VISION_END
    vocab = processor.tokenizer.get_vocab()
    return f"{start}{token}{end}" if start in vocab and end in vocab else token


def image_token_ids(processor: Any) -> set[int]:
    """The token ids the processor expands an image into (the image token's id)."""
    if processor is None:
        return set()
    ids = {processor.tokenizer.convert_tokens_to_ids(image_token(processor))}
    if getattr(processor, "image_token_id", None) is not None:
        ids.add(int(processor.image_token_id))
    return ids


def _process(processor: Any, text: str, paths: list[str]) -> Any:
    """The processor's outputs for one segment of text with its images (read from disk now)."""
    return processor(
        text=[text],
        images=[load_image(path) for path in paths],
        return_tensors="pt",
        add_special_tokens=False,
    )


def _per_image(inputs: Any) -> dict[str, torch.Tensor]:
    return {
        key: torch.as_tensor(value)
        for key, value in inputs.items()
        if key not in ("input_ids", "attention_mask", "token_type_ids")
        and key not in PER_TOKEN_KEYS
        and value is not None
    }


@dataclass(frozen=True)
class DeferredImages:
    """The per-image inputs (pixel_values, image_sizes, ...) of one example, computed when asked for.

    `segments` are the (text, image paths, token count) of the example's segments that hold images: the
    processor is run on them again, exactly as encoding ran it, and the token count is checked so an image
    replaced on disk since encoding is an error rather than a mismatch inside the model.
    """

    processor: Any = field(repr=False, compare=False)
    segments: tuple[tuple[str, tuple[str, ...], int], ...]
    where: str

    def load(self) -> dict[str, torch.Tensor]:
        per_key: dict[str, list[torch.Tensor]] = {}
        for text, paths, count in self.segments:
            inputs = _process(self.processor, text, list(paths))
            now = len(inputs["input_ids"][0])
            if now != count:
                raise RetainError(
                    f"{self.where}: its images ({', '.join(paths)}) give {now} tokens now but gave {count} "
                    "when the example was encoded; was an image replaced during the run?"
                )
            for key, value in _per_image(inputs).items():
                per_key.setdefault(key, []).append(value)
        return {key: concat_images(values) for key, values in per_key.items()}


# A segment's token ids, whether it is an assistant turn, its per-token and per-image inputs, and for a
# segment with images its (text, paths) so the per-image inputs can be computed again later.
_Piece = tuple[list[int], bool, dict[str, Any], tuple[str, tuple[str, ...]] | None]


def _image_pieces(
    tokenizer: Any,
    processor: Any,
    example: Example,
    messages: list[dict[str, str]],
    generation_prompt: bool,
    defer: bool = False,
) -> list[_Piece]:
    """The segments of an example with images; segments with image tokens go through the processor with
    their images (in the order of `example.images`). With `defer`, the per-image inputs are dropped (the
    piece keeps what computes them again)."""
    if processor is None:
        raise RetainError(
            f"{_where(example)} has images, but the model has no image processor; use an image-text "
            "model (a local LLaVA, Qwen2-VL, SmolVLM, ... folder) or data without images"
        )
    token, text_of_image = image_token(processor), image_text(processor)
    if text_of_image != IMAGE_PLACEHOLDER:
        messages = [
            {**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, text_of_image)} for m in messages
        ]
    pending = list(example.images)
    pieces: list[_Piece] = []
    for text, learned in _segments(tokenizer, messages, generation_prompt):
        count = text.count(token)
        if not count:
            pieces.append((_tokenize(tokenizer, text), learned, {}, None))
            continue
        if count > len(pending):
            raise RetainError(
                f"{_where(example)}: the rendered conversation holds more image tokens ({token}) than the "
                f"example has images ({len(example.images)}); does the chat template write {token} itself?"
            )
        paths, pending = pending[:count], pending[count:]
        inputs = _process(processor, text, paths)
        extras = {key: value for key, value in inputs.items() if key in PER_TOKEN_KEYS and value is not None}
        if not defer:
            extras.update(_per_image(inputs))
        pieces.append((inputs["input_ids"][0].tolist(), learned, extras, (text, tuple(paths))))
    if pending and messages[-1]["role"] == "assistant":  # the whole conversation: every image is used
        raise RetainError(
            f"{_where(example)}: the rendered conversation holds fewer image tokens ({token}) than the "
            f"example has images ({len(example.images)}); does the chat template drop {token}?"
        )
    return pieces


def _assemble(
    tokenizer: Any, pieces: list[_Piece], processor: Any, defer: bool, where: str
) -> tuple[list[int], list[int], int, dict[str, Any]]:
    """(input_ids, labels, prompt_len, image inputs) of the segments in order; no label on image tokens.
    With `defer`, the per-image inputs are one DeferredImages under DEFERRED_IMAGES."""
    image_ids = image_token_ids(processor)
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_len = 0
    per_token: dict[str, list[tuple[int, list[int]]]] = {}
    per_image: dict[str, list[torch.Tensor]] = {}
    sources = []
    for ids, learned, extras, source in pieces:
        if learned:
            prompt_len = len(input_ids)
            labels += [
                IGNORE_INDEX if token in image_ids else label
                for token, label in zip(ids, _assistant_labels(tokenizer, ids), strict=True)
            ]
        else:
            labels += [IGNORE_INDEX] * len(ids)
        for key, value in extras.items():
            if key in PER_TOKEN_KEYS:
                per_token.setdefault(key, []).append((len(input_ids), torch.as_tensor(value)[0].tolist()))
            else:
                per_image.setdefault(key, []).append(value)
        if source is not None:
            sources.append((*source, len(ids)))
        input_ids += ids
    images: dict[str, Any] = {}
    for key, spans in per_token.items():
        values = [0] * len(input_ids)
        for start, span in spans:
            values[start : start + len(span)] = span
        images[key] = values
    for key, tensors in per_image.items():
        images[key] = concat_images(tensors)
    if defer and sources:
        images[DEFERRED_IMAGES] = DeferredImages(processor, tuple(sources), where)
    return input_ids, labels, prompt_len, images


def _encode_full(
    tokenizer: Any, example: Example, processor: Any = None, defer: bool = False, source: str | None = None
) -> tuple[list[int], list[int], int, dict[str, Any]]:
    """(input_ids, labels, prompt_len, image inputs) without truncation; prompt_len counts tokens before the
    last answer; the image inputs are empty for a text example."""
    _check(example)
    if example.images:
        pieces = _image_pieces(tokenizer, processor, example, example.chat_messages, False, defer)
        return _assemble(tokenizer, pieces, processor, defer, _where(example, source))
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
    return input_ids, labels, prompt_len, {}


def _truncate(
    encoded: tuple[list[int], list[int], int, dict[str, Any]], cutoff_len: int, processor: Any, where: str
) -> dict[str, Any]:
    """The feature of one example cut to `cutoff_len` tokens; refused when the cut would split images."""
    input_ids, labels, _, images = encoded
    if images and image_token_ids(processor) & set(input_ids[cutoff_len:]):
        raise RetainError(
            f"{where}: cutoff_len={cutoff_len} would cut its image tokens (the example is {len(input_ids)} "
            f"tokens with its images); raise cutoff_len to {len(input_ids)} or more, or shorten the example"
        )
    feature: dict[str, Any] = {
        "input_ids": input_ids[:cutoff_len],
        "labels": labels[:cutoff_len],
        "attention_mask": [1] * len(input_ids[:cutoff_len]),
    }
    for key, value in images.items():
        feature[key] = value[:cutoff_len] if key in PER_TOKEN_KEYS else value
    return feature


def _too_long(cutoff_len: int, prompt_len: int, where: str) -> RetainError:
    return RetainError(
        f"{where}: the prompt is {prompt_len} tokens, which leaves no room for the answer within "
        f"cutoff_len={cutoff_len}; raise cutoff_len above {prompt_len} or shorten the prompt"
    )


def encode_example(
    tokenizer: Any,
    example: Example,
    cutoff_len: int,
    source: str | None = None,
    processor: Any = None,
    *,
    defer_images: bool = False,
) -> dict[str, Any]:
    """Token ids, labels (-100 outside assistant turns) and attention mask, tail-truncated to cutoff_len;
    for an example with images, also the processor's image inputs (pixel_values, ...), or with
    `defer_images` a DeferredImages that computes them when the batch is built.

    Raises RetainError when the prompt alone fills cutoff_len (truncating it would train on no answer), or
    when the cut would fall after an image token.
    """
    encoded = _encode_full(tokenizer, example, processor, defer_images, source)
    where = _where(example, source)
    if encoded[2] >= cutoff_len:
        raise _too_long(cutoff_len, encoded[2], where)
    return _truncate(encoded, cutoff_len, processor, where)


def render_prompt(tokenizer: Any, example: Example) -> str:
    """The prompt text the model sees at test time: every message but the last, then the generation prompt."""
    return "".join(
        text for text, _ in _segments(tokenizer, example.prompt_messages, add_generation_prompt=True)
    )


def encode_prompt_inputs(
    tokenizer: Any, example: Example, processor: Any = None, *, defer_images: bool = False
) -> dict[str, Any]:
    """The generation prompt's input_ids (identical to the prompt part of `encode_example`'s) and, for an
    example with images, the image inputs of the images in the prompt (with `defer_images`, a
    DeferredImages that computes them when the batch is built: `collate`, `image_batch`)."""
    if example.images:
        pieces = _image_pieces(tokenizer, processor, example, example.prompt_messages, True, defer_images)
        input_ids, _, _, images = _assemble(tokenizer, pieces, processor, defer_images, _where(example))
        return {"input_ids": input_ids, **images}
    ids: list[int] = []
    for text, _ in _segments(tokenizer, example.prompt_messages, add_generation_prompt=True):
        ids += _tokenize(tokenizer, text)
    return {"input_ids": ids}


def encode_prompt(tokenizer: Any, example: Example, processor: Any = None) -> list[int]:
    """Token ids of the generation prompt, identical to the prompt part of `encode_example`'s input_ids."""
    return encode_prompt_inputs(tokenizer, example, processor)["input_ids"]


def encode_dataset(
    tokenizer: Any, examples: Sequence[Example], cutoff_len: int, source: str, processor: Any = None
) -> list[dict[str, Any]]:
    """Encode every example (with `processor`, the image-text model's, for examples with images); if any
    prompt fills cutoff_len, raise once, saying how many and the longest.

    The images of an example are read here for its token ids, but its pixel tensors are not kept: its
    feature holds a DeferredImages that `FeatureDataset` and `collate` turn into them batch by batch.
    """
    encoded = []
    too_long: list[tuple[int, int]] = []
    for position, example in enumerate(examples):
        where = f"{source}: example {example.meta.get('index', position)}"
        full = _encode_full(tokenizer, example, processor, defer=True, source=source)
        if full[2] >= cutoff_len:
            too_long.append((example.meta.get("index", position), full[2]))
            continue
        encoded.append(_truncate(full, cutoff_len, processor, where))
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
