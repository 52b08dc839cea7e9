"""Answer-style diversification (`stream.answer_styles`, SEFE's ASD): styles in the configured fractions,
answers still correct, test data untouched, and a changed setting counts as a changed stream on resume."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import yaml

from retain.config import ANSWER_STYLES, config_from_dict
from retain.data.answer_styles import diversify, style_counts
from retain.data.formats import Example
from retain.data.streams import build_stream
from retain.engine.loop import run_experiment
from retain.engine.plan import make_plan
from retain.errors import RetainError

from ..helpers import tiny_config

TASKS = ["synthetic:sentiment", "synthetic:max_number", "synthetic:capital_letters"]
STYLES = {"yes_no": 0.25, "multiple_choice": 0.25, "sentence": 0.125}
YES_NO = re.compile(r'\nIs the answer "(.*)"\? Answer yes or no\.$', re.S)


def _stream(tmp_path, styles=None, seed=3, tasks=TASKS):
    stream = {"tasks": tasks, "train_size": 32, **({"answer_styles": styles} if styles else {})}
    return build_stream(config_from_dict(tiny_config(tmp_path, stream=stream, seed=seed)))


def _check_answer(styled: Example, original: Example, pool: set[str]) -> None:
    """`styled` asks `original`'s question in its style and its answer is still the right one."""
    style, question, reply = styled.meta["answer_style"], styled.messages[-2]["content"], styled.reference
    answer = original.reference
    stem = original.messages[-2]["content"].split(" Answer with")[0]
    assert question.startswith(stem + "\n")
    if style == "yes_no":
        candidate = YES_NO.search(question).group(1)
        assert reply == ("Yes" if candidate == answer else "No") and candidate in pool
    elif style == "multiple_choice":
        options = dict(re.findall(r"^([A-D])\. (.*)$", question, re.M))
        assert question.endswith("Answer with the option's letter from the given choices directly.")
        assert options[reply] == answer and len(set(options.values())) == len(options) >= 2
        assert set(options.values()) <= pool
    else:
        assert question.endswith("\nAnswer in a full sentence.") and reply == f"The answer is {answer}."


def test_the_config_s_styles_are_the_ones_the_transform_writes():
    examples = _stream_examples()
    for style in ANSWER_STYLES:
        styled, notes = diversify(examples, {style: 1.0}, seed=1, task="t")
        assert not notes and all(e.meta["answer_style"] == style for e in styled)


def _stream_examples() -> list[Example]:
    return [
        Example([{"role": "user", "content": f"What is {i} + {i}? Answer with the number only."},
                 {"role": "assistant", "content": str(2 * i)}])
        for i in range(8)
    ]  # fmt: skip


def test_styles_follow_the_fractions_and_answers_stay_correct_on_training_data_only(tmp_path):
    plain = _stream(tmp_path / "plain")
    styled = _stream(tmp_path / "styled", STYLES)
    for before, after in zip(plain, styled, strict=True):
        assert after.test == before.test  # the test split is never rewritten
        assert len(after.train) == len(before.train) == 32
        counts = Counter(e.meta.get("answer_style") for e in after.train)
        assert counts == {"yes_no": 8, "multiple_choice": 8, "sentence": 4, None: 12}
        pool = {e.reference for e in before.train}
        for new, old in zip(after.train, before.train, strict=True):
            if "answer_style" in new.meta:
                _check_answer(new, old, pool)
                assert new.system == old.system
            else:
                assert new == old
        replies = Counter(e.reference for e in after.train if e.meta.get("answer_style") == "yes_no")
        assert replies == {"Yes": 4, "No": 4}  # half of the yes/no questions are true
        letters = Counter(e.reference for e in after.train if e.meta.get("answer_style") == "multiple_choice")
        assert len(letters) >= 2  # the right option is not always in the same place


def test_the_rewrite_is_fixed_by_the_seed(tmp_path):
    first = _stream(tmp_path / "a", STYLES)
    assert _stream(tmp_path / "b", STYLES)[1].train == first[1].train
    other = _stream(tmp_path / "c", STYLES, seed=4)
    assert [e.messages for e in other[1].train] != [e.messages for e in first[1].train]


def test_style_counts_add_up_and_never_exceed_the_examples():
    assert style_counts({"yes_no": 0.5, "sentence": 0.5}, 7) == {
        "yes_no": 4,
        "multiple_choice": 0,
        "sentence": 3,
    }
    assert sum(style_counts({"yes_no": 0.2, "multiple_choice": 0.2, "sentence": 0.2}, 10).values()) == 6
    assert style_counts({}, 10) == dict.fromkeys(ANSWER_STYLES, 0)


def test_a_task_with_one_answer_keeps_its_answers_for_the_styles_that_need_distractors():
    examples = [
        Example([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                 {"role": "user", "content": f"Is {i} a number?"}, {"role": "assistant", "content": "yes"}])
        for i in range(6)
    ]  # fmt: skip
    styled, notes = diversify(examples, {"multiple_choice": 0.5, "sentence": 0.5}, seed=0, task="t")
    assert Counter(e.meta.get("answer_style") for e in styled) == {"sentence": 3, None: 3}
    assert len(notes) == 1 and "3 training example(s) meant for multiple_choice" in notes[0]
    for e in styled:
        assert e.messages[:2] == examples[0].messages[:2]  # earlier turns are never rewritten
    assert diversify(examples, {}, seed=0, task="t") == (examples, [])


@pytest.mark.parametrize(
    ("styles", "needle"),
    [
        ({"yes_n": 0.1}, "unknown answer style 'yes_n'.*did you mean: yes_no"),
        ({"sentence": 1.5}, "stream.answer_styles.sentence must be .* from 0 to 1"),
        ({"sentence": "lots"}, "stream.answer_styles.sentence must be"),
        ({"sentence": True}, "stream.answer_styles.sentence must be"),
        ({"sentence": 0.6, "yes_no": 0.6}, "add up to 1.2.*at most 1"),
        (0.2, "stream.answer_styles must be a mapping"),
    ],
)
def test_bad_answer_styles_are_refused_naming_the_key(tmp_path, styles, needle):
    with pytest.raises(RetainError, match=needle):
        config_from_dict(tiny_config(tmp_path, stream={"answer_styles": styles}))


def test_changed_answer_styles_are_a_changed_stream_on_resume(tmp_path):
    def raw(styles):
        return tiny_config(tmp_path, stream={"answer_styles": styles}, train={"max_steps": 1})

    old, new = raw({"sentence": 0.5}), raw({"sentence": 0.25})
    old_prints = make_plan(config_from_dict(old)).fingerprints()["data"]
    new_prints = make_plan(config_from_dict(new)).fingerprints()["data"]
    for task in old_prints:  # the training data hashes differently, the test data the same
        assert old_prints[task]["train"] != new_prints[task]["train"]
        assert old_prints[task]["test"] == new_prints[task]["test"]
    run_experiment(config_from_dict(old), evaluate=False)
    with pytest.raises(RetainError, match=r"other settings \(stream.answer_styles.sentence: 0.5 -> 0.25"):
        run_experiment(config_from_dict(new), evaluate=False)
    run_experiment(config_from_dict(old), evaluate=False)  # the same setting resumes


def test_a_run_directory_from_before_the_setting_still_resumes(tmp_path):
    raw = tiny_config(tmp_path, train={"max_steps": 1})
    run_experiment(config_from_dict(raw), evaluate=False)
    saved = tmp_path / "run" / "config.yaml"
    tree = yaml.safe_load(saved.read_text())
    assert tree["stream"].pop("answer_styles") is None
    saved.write_text(yaml.safe_dump(tree))
    run_experiment(config_from_dict(raw), evaluate=False)  # the key's absence reads as the setting off
