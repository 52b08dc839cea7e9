"""Tiny, randomly initialised models and tokenizers built in-process, for tests and dry runs.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on a fixed corpus in a few
milliseconds, with a ChatML chat template like SmolLM2's, and the model is a 2-layer Llama.
"""

from __future__ import annotations

import functools
import string

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **overrides
) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, randomly initialised from `seed` (builds in milliseconds)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
