import pytest
import torch

from retain.errors import RetainError
from retain.evaluation.generate import eos_token_ids, generate, generate_one_by_one
from retain.models.tiny import tiny_model

TEXTS = [
    "the quick brown fox",
    "a",
    "reverse the word sort the numbers count the letters even odd parity",
    "what is the sum",
    "system user",
]


@pytest.fixture
def lively_model(tokenizer):
    # The default tiny model repeats the prompt's last token ("\n"); larger random weights give varied
    # answers, so that batched and one-by-one generation have something to disagree about.
    return tiny_model(tokenizer, initializer_range=0.3)


@pytest.fixture
def prompts(tokenizer):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)[
            "input_ids"
        ]
        for t in TEXTS
    ]


def _raw_new_tokens(model, prompt, max_new_tokens):
    """Greedy continuation of one prompt that never stops at eos, as a reference."""
    # An explicit mask: the prompt contains <|im_end|>, which is also the pad token, and without a mask
    # transformers would take it for padding.
    input_ids = torch.tensor([prompt])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return output[0, len(prompt) :].tolist()


def test_batched_equals_one_by_one(lively_model, tokenizer, prompts):
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths, so padding is exercised
    batched = generate(lively_model, tokenizer, prompts, max_new_tokens=16, batch_size=3, progress=False)
    single = generate_one_by_one(lively_model, tokenizer, prompts, max_new_tokens=16, progress=False)
    assert batched == single
    assert len(set(batched)) == len(batched)  # answers differ, so a lost order would show


def test_order_is_restored(lively_model, tokenizer, prompts):
    answers = generate(lively_model, tokenizer, prompts, max_new_tokens=8, batch_size=4, progress=False)
    for prompt, answer in zip(prompts, answers, strict=True):
        expected = tokenizer.decode(_raw_new_tokens(lively_model, prompt, 8), skip_special_tokens=True)
        assert answer == expected.strip()


def test_stops_at_eos_in_a_batch(lively_model, tokenizer, prompts):
    # Make a token that the model produces mid-answer an eos: every answer must end just before it.
    raw = _raw_new_tokens(lively_model, prompts[0], 12)
    stop_token = raw[5]
    lively_model.generation_config.eos_token_id = stop_token
    answers = generate(lively_model, tokenizer, prompts, max_new_tokens=12, batch_size=5, progress=False)
    expected = tokenizer.decode(raw[: raw.index(stop_token)], skip_special_tokens=True).strip()
    assert answers[0] == expected
    single = generate_one_by_one(lively_model, tokenizer, prompts, max_new_tokens=12, progress=False)
    assert answers == single


def test_eos_ids_include_chat_end_token(model, tokenizer):
    ids = eos_token_ids(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.eos_token_id in ids
    assert len(ids) == len(set(ids))


def test_stop_strings_cut_the_answer(lively_model, tokenizer, prompts):
    full = generate(lively_model, tokenizer, prompts[:1], max_new_tokens=16, progress=False)[0]
    stop = full[4:6]
    cut = generate(
        lively_model, tokenizer, prompts[:1], max_new_tokens=16, stop_strings=[stop], progress=False
    )
    assert cut[0] == full[: full.index(stop)].strip()


def test_restores_train_mode(model, tokenizer, prompts):
    model.train()
    generate(model, tokenizer, prompts[:2], max_new_tokens=2, progress=False)
    assert model.training
    model.eval()
    generate(model, tokenizer, prompts[:2], max_new_tokens=2, progress=False)
    assert not model.training


def test_default_tiny_model_answers_blank(model, tokenizer, prompts):
    # Its greedy answer is a run of newlines; stripped, that is an empty prediction.
    assert generate(model, tokenizer, prompts, max_new_tokens=4, progress=True, desc="test") == [""] * len(
        prompts
    )


def test_empty_inputs(model, tokenizer):
    assert generate(model, tokenizer, [], progress=False) == []
    with pytest.raises(RetainError, match="prompt 1 has no tokens"):
        generate(model, tokenizer, [[1, 2], []], progress=False)
    with pytest.raises(RetainError, match="max_new_tokens"):
        generate(model, tokenizer, [[1, 2]], max_new_tokens=0, progress=False)


def test_peft_wrapped_model(lively_model, tokenizer, prompts):
    peft = pytest.importorskip("peft")
    plain = generate(lively_model, tokenizer, prompts, max_new_tokens=8, progress=False)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    wrapped = peft.get_peft_model(lively_model, config)
    # A fresh LoRA adapter is the identity (B = 0), so the answers do not change.
    assert generate(wrapped, tokenizer, prompts, max_new_tokens=8, batch_size=2, progress=False) == plain


def test_sampling_is_seeded_and_leaves_the_callers_random_state_alone(lively_model, tokenizer, prompts):
    sample = dict(max_new_tokens=12, batch_size=2, progress=False, do_sample=True, temperature=1.0)
    state = torch.random.get_rng_state()
    first = generate(lively_model, tokenizer, prompts, seed=7, **sample)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert generate(lively_model, tokenizer, prompts, seed=7, **sample) == first
    assert generate(lively_model, tokenizer, prompts, seed=8, **sample) != first
    greedy = generate(lively_model, tokenizer, prompts, max_new_tokens=12, batch_size=2, progress=False)
    assert first != greedy


def test_top_k_1_sampling_is_greedy(lively_model, tokenizer, prompts):
    greedy = generate(lively_model, tokenizer, prompts, max_new_tokens=10, progress=False)
    sampled = generate(
        lively_model, tokenizer, prompts, max_new_tokens=10, progress=False, do_sample=True, top_k=1, seed=3
    )
    assert sampled == greedy


def test_sampling_options_are_checked(model, tokenizer):
    for bad in ({"temperature": 0.0}, {"top_k": 0}, {"top_p": 1.5}, {"repetition_penalty": 0.0}):
        with pytest.raises(RetainError, match=next(iter(bad))):
            generate(model, tokenizer, [[1, 2]], progress=False, do_sample=True, **bad)
