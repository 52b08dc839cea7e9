import pytest

from retain.data.batching import IGNORE_INDEX
from retain.data.encode import encode_dataset, encode_example, encode_prompt, render_prompt
from retain.data.formats import Example
from retain.errors import RetainError


def _learned(tokenizer, encoded):
    return tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])


def _single(question="What is 2 + 2?", answer="4", system=None, **meta):
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Example(messages=messages, system=system, meta=meta)


def test_labels_cover_only_the_answer_and_end_token(tokenizer):
    encoded = encode_example(tokenizer, _single(answer="the answer"), cutoff_len=256)
    assert _learned(tokenizer, encoded) == "the answer<|im_end|>"
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["attention_mask"])
    assert set(encoded["attention_mask"]) == {1}
    text = tokenizer.decode(encoded["input_ids"])
    assert text == tokenizer.apply_chat_template(_single(answer="the answer").chat_messages, tokenize=False)
    # The answer's labels are its own input ids (the causal shift happens in the model).
    learned = [i for i, t in enumerate(encoded["labels"]) if t != IGNORE_INDEX]
    assert [encoded["input_ids"][i] for i in learned] == [encoded["labels"][i] for i in learned]


def test_multi_turn_learns_every_assistant_turn(tokenizer):
    example = Example(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "sum 1 2"},
            {"role": "assistant", "content": "3"},
        ],
        system="Be brief.",
    )
    encoded = encode_example(tokenizer, example, cutoff_len=256)
    assert _learned(tokenizer, encoded) == "hello<|im_end|>3<|im_end|>"
    assert "Be brief." in tokenizer.decode(encoded["input_ids"])


def test_prompt_matches_training_prefix(tokenizer):
    example = _single()
    encoded = encode_example(tokenizer, example, cutoff_len=256)
    prompt = encode_prompt(tokenizer, example)
    assert encoded["input_ids"][: len(prompt)] == prompt
    assert all(t == IGNORE_INDEX for t in encoded["labels"][: len(prompt)])
    assert encoded["labels"][len(prompt)] != IGNORE_INDEX
    assert render_prompt(tokenizer, example).endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(prompt) == render_prompt(tokenizer, example)


def test_no_template_falls_back_to_chatml(tokenizer):
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, _single()).startswith("<|im_start|>system\n")
    assert _learned(tokenizer, encode_example(tokenizer, _single(answer="ok"), 256)) == "ok<|im_end|>"


def test_truncation_keeps_the_prompt_and_cuts_the_tail(tokenizer):
    example = _single(answer="a long answer " * 20)
    prompt_len = len(encode_prompt(tokenizer, example))
    encoded = encode_example(tokenizer, example, cutoff_len=prompt_len + 3)
    assert len(encoded["input_ids"]) == prompt_len + 3
    assert sum(t != IGNORE_INDEX for t in encoded["labels"]) == 3


def test_prompt_too_long_raises_with_fix(tokenizer):
    example = _single(index=7)
    prompt_len = len(encode_prompt(tokenizer, example))
    with pytest.raises(RetainError) as err:
        encode_example(tokenizer, example, cutoff_len=prompt_len, source="tasks/qa.json")
    message = str(err.value)
    assert "tasks/qa.json: example 7" in message
    assert f"cutoff_len={prompt_len}" in message and f"{prompt_len} tokens" in message
    assert "raise cutoff_len" in message


def test_encode_dataset_reports_count_and_longest(tokenizer):
    examples = [
        _single(q, index=i) for i, q in enumerate(["short", "a much longer question " * 6, "x " * 30])
    ]
    assert len(encode_dataset(tokenizer, examples, cutoff_len=512, source="mix")) == 3
    short_len = len(encode_prompt(tokenizer, examples[0]))
    longest = max(len(encode_prompt(tokenizer, e)) for e in examples)
    with pytest.raises(RetainError) as err:
        encode_dataset(tokenizer, examples, cutoff_len=short_len + 2, source="mix")
    message = str(err.value)
    assert message.startswith("mix: 2 of 3 examples")
    assert "first: example 1" in message and f"longest: {longest} tokens" in message


def test_example_without_final_answer_raises(tokenizer):
    example = Example(messages=[{"role": "user", "content": "hi"}], meta={"source": "d.json", "index": 2})
    with pytest.raises(RetainError, match="d.json: example 2 does not end with an assistant turn"):
        encode_example(tokenizer, example, 64)
