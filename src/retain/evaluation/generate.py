"""Batched generation (evaluation, pseudo-sample synthesis): left padding, KV cache, eos and stop strings.

Prompts are token ids (already formatted with the chat template). They are sorted longest first so that
each batch holds prompts of similar length and little compute goes to padding; the answers come back in
the prompts' order. Greedy decoding with left padding and an attention mask gives the same answers as
generating one prompt at a time, which the tests check. Sampling (`do_sample=True`, for methods that
synthesize rehearsal data) is seeded: the same prompts, batch size and seed give the same samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from retain.data.batching import image_batch, left_pad
from retain.errors import RetainError
from retain.evaluation.scoring import clean_prediction

CHAT_END_TOKEN = "<|im_end|>"


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, ChatML's end token, and the model's own eos."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if CHAT_END_TOKEN in tokenizer.get_vocab():
        ids.append(int(tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN)))
    # Chat models often end turns with a token other than the tokenizer's eos (Llama 3's <|eot_id|>).
    generation_config = getattr(model, "generation_config", None)
    model_eos = getattr(generation_config, "eos_token_id", None)
    if model_eos is not None:
        ids.extend(int(i) for i in (model_eos if isinstance(model_eos, list | tuple) else [model_eos]))
    return list(dict.fromkeys(ids))


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _decoding_options(
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
) -> dict[str, Any]:
    """Keyword arguments for `model.generate`: greedy, or sampling with exactly the cuts asked for."""
    options: dict[str, Any] = {"do_sample": False}
    if do_sample:
        if temperature <= 0:
            raise RetainError(f"generation: temperature is {temperature}; sampling needs a temperature > 0")
        if top_k is not None and top_k < 1:
            raise RetainError(f"generation: top_k is {top_k}; set it to 1 or more, or None for no cut")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise RetainError(f"generation: top_p is {top_p}; set it in (0, 1], or None for no cut")
        # Explicit values override what the model's generation_config would add (often top_k=50).
        options = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
    if repetition_penalty is not None:
        if repetition_penalty <= 0:
            raise RetainError(f"generation: repetition_penalty is {repetition_penalty}; it must be > 0")
        options["repetition_penalty"] = repetition_penalty
    return options


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for the block and give the caller's random state back afterwards."""
    if seed is None:
        yield
        return
    on_device = device.type != "cpu"
    with torch.random.fork_rng(
        devices=[device] if on_device else [], device_type=device.type if on_device else None
    ):
        torch.manual_seed(seed)
        yield


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
    desc: str = "generating",
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    images: Sequence[dict[str, Any]] | None = None,
) -> list[str]:
    """Answers to tokenized prompts, in the prompts' order, cut at eos and at the stop strings.

    Greedy by default. With `do_sample=True` tokens are sampled at `temperature`, restricted to the
    `top_k` most likely (None: no top-k cut) and to the `top_p` nucleus (None: none); the model's own
    generation_config does not add other cuts. `seed` seeds the sampling without touching the caller's
    random state (torch's global generator is forked for the call); `repetition_penalty` (> 1 discourages
    repeats) applies to both modes. Works with any model that has `.generate` (transformers models,
    PEFT-wrapped models). The model is put in eval mode for the call and back in train mode afterwards if
    it was training.

    `images`, for an image-text model, holds each prompt's image inputs (pixel_values, ...: the image
    keys of `retain.data.encode.encode_prompt_inputs`, deferred or not; an empty dict for a prompt without
    images); each batch reads and passes those of its prompts, in the batch's order, to `generate`.
    """
    if max_new_tokens < 1:
        raise RetainError(f"generation: max_new_tokens is {max_new_tokens}; set it to 1 or more")
    if batch_size < 1:
        raise RetainError(f"generation: batch_size is {batch_size}; set it to 1 or more")
    decoding = _decoding_options(do_sample, temperature, top_k, top_p, repetition_penalty)
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise RetainError(
                f"generation: prompt {index} has no tokens; check the task's data and the cutoff length"
            )
    if images is not None and len(images) != len(prompts):
        raise RetainError(f"generation: {len(images)} image inputs for {len(prompts)} prompts")
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0] if eos_ids else 0
    device = _device(model)
    # Longest first: batches of similar lengths waste little on padding, and a memory error shows at once.
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]), reverse=True)
    answers: list[str] = [""] * len(prompts)

    was_training = model.training
    model.eval()
    try:
        with (
            _seeded(seed, device),
            torch.inference_mode(),
            tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar,
        ):
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                input_ids, attention_mask = left_pad([prompts[k] for k in batch], pad_id)
                width = input_ids.shape[1]
                pictures = image_batch([images[k] for k in batch], width) if images is not None else {}
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **{key: value.to(device) for key, value in pictures.items()},
                    max_new_tokens=max_new_tokens,
                    use_cache=True,
                    **decoding,
                    eos_token_id=eos_ids or None,
                    pad_token_id=pad_id,
                )
                for row, k in enumerate(batch):
                    new_tokens = output[row, width:].tolist()
                    # Cut at the first eos ourselves: after it come pad tokens, which need not be special.
                    for position, token in enumerate(new_tokens):
                        if token in eos_ids:
                            new_tokens = new_tokens[:position]
                            break
                    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
                    answers[k] = clean_prediction(text, stop_strings)
                bar.update(len(batch))
    finally:
        if was_training:
            model.train()
    return answers


def generate_one_by_one(model: Any, tokenizer: Any, prompts: list[list[int]], **options: Any) -> list[str]:
    """`generate` one prompt at a time (no padding): the reference the batched generation must match."""
    return generate(model, tokenizer, prompts, **{**options, "batch_size": 1})
