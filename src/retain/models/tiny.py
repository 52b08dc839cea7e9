"""Tiny, randomly initialised models and tokenizers built in-process, for tests and dry runs.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on a fixed corpus in a few
milliseconds, with a ChatML chat template like SmolLM2's, and the model is a 2-layer Llama. The tiny
image-text model (`tiny_vlm`, `tiny_vlm_processor`) is a LLaVA: a 1-layer CLIP vision tower on 28 px
images, a projector, and the same 2-layer Llama; each image becomes TINY_IMAGE_TOKENS `<image>` tokens.
"""

from __future__ import annotations

import functools
import string

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from retain.data.encode import CHATML_TEMPLATE

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the sum of these numbers answer with a number",
    "reverse the word sort the numbers count the letters even odd parity",
    "system user assistant you are a helpful assistant",
    string.ascii_letters + string.digits + string.punctuation,
] * 4


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~384 tokens) with a ChatML chat template; `<|im_end|>` is EOS and PAD."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


TINY_LAYERS = 2


def _tiny_text_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return LlamaConfig(**{**settings, **overrides})  # overrides may replace any of these


def tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **overrides
) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, randomly initialised from `seed` (builds in milliseconds);
    `overrides` replace LlamaConfig settings (hidden_size, attn_implementation, ...)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = _tiny_text_config(tokenizer, **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


IMAGE_TOKEN = "<image>"
TINY_IMAGE_SIZE = 28
TINY_PATCH = 14
TINY_IMAGE_TOKENS = (TINY_IMAGE_SIZE // TINY_PATCH) ** 2  # 4: the CLS feature is dropped


def tiny_vlm_tokenizer() -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` with the special token `<image>` added (its id is the last one)."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def tiny_vlm_processor() -> LlavaProcessor:
    """A LlavaProcessor for `tiny_vlm`: 28 px RGB images (resized and center-cropped, CLIP-normalised)
    and `tiny_vlm_tokenizer`; it expands each `<image>` in the text to TINY_IMAGE_TOKENS tokens."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = TINY_IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_vlm_tokenizer(),
        patch_size=TINY_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
    )


def tiny_vlm(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **overrides
) -> LlavaForConditionalGeneration:
    """A LLaVA: a 1-layer CLIP vision tower (hidden size 16, 28 px images, 14 px patches), a 2-layer MLP
    projector and the 2-layer Llama of `tiny_model`, randomly initialised from `seed` (milliseconds).
    `tokenizer` must hold `<image>` (default: `tiny_vlm_tokenizer()`); `overrides` go to LlavaConfig."""
    tokenizer = tokenizer or tiny_vlm_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,  # not TINY_LAYERS: tests tell the towers' layer counts apart
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH,
        projection_dim=16,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_tiny_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=TINY_IMAGE_TOKENS,
        vision_feature_layer=-1,  # the last layer: every vision weight takes part in the forward
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()
