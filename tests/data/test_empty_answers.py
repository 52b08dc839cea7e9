"""Records with an empty answer: reported by the data checks with their count, never scored as correct,
and a test set of nothing but empty answers refused."""

from __future__ import annotations

import json

import pytest

from retain.config import config_from_dict
from retain.data.streams import build_stream, load_stream
from retain.errors import RetainError


def _records(answers: list[str]) -> list[dict]:
    return [{"instruction": f"question {i}", "input": "", "output": a} for i, a in enumerate(answers)]


def _config(tmp_path, train: list[str], test: list[str], **stream):
    (tmp_path / "train.json").write_text(json.dumps(_records(train)))
    (tmp_path / "test.json").write_text(json.dumps(_records(test)))
    task = {"name": "t", "train": str(tmp_path / "train.json"), "test": str(tmp_path / "test.json")}
    return config_from_dict({"stream": {"tasks": [task], **stream}})


def test_empty_answers_are_counted_and_left_out_of_the_test_set(tmp_path):
    stream = load_stream(_config(tmp_path, ["a", "", "b", "c"], ["x", "", " ", "y", "z"]))
    (task,) = stream.tasks
    assert [e.reference for e in task.test] == ["x", "y", "z"]
    found = {(f.check, f.count) for f in task.hygiene if f.check == "empty_answers"}
    assert found == {("empty_answers", 1), ("empty_answers", 2)}
    messages = [f.message for f in task.hygiene if f.check == "empty_answers"]
    assert any("2 of 5 test" in m for m in messages) and any("1 of 4 train" in m for m in messages)


def test_without_data_checks_empty_test_answers_are_still_left_out(tmp_path):
    (task,) = build_stream(_config(tmp_path, ["a", "b"], ["x", ""], hygiene=False))
    assert [e.reference for e in task.test] == ["x"]
    assert any("empty answer" in note for note in task.notes)


@pytest.mark.parametrize(
    ("train", "test", "split"), [(["a", "b"], ["", " "], "test"), (["", ""], ["x"], "train")]
)
def test_a_split_of_only_empty_answers_is_an_error(tmp_path, train, test, split):
    with pytest.raises(RetainError, match=f"every {split} example .* empty answer"):
        build_stream(_config(tmp_path, train, test))
