"""Data checks on image data: the same question about another picture is neither a duplicate nor a test
prompt leaked from training; the same question about the same picture is both. Text data is checked as
before."""

from __future__ import annotations

import json

from PIL import Image

from retain.config import config_from_dict
from retain.data.formats import Example
from retain.data.hygiene import check_task
from retain.data.streams import load_stream


def _vqa(image: str | None, question: str = "What colour is the car?", answer: str = "red") -> Example:
    prefix = "<image>" if image else ""
    messages = [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
    return Example(messages, images=[image] if image else [])


def _checks(findings) -> dict[str, int]:
    return {f.check: f.count for f in findings}


def test_the_same_question_about_other_pictures_is_no_duplicate_and_no_leak():
    train = [_vqa(f"/data/train/{i}.jpg") for i in range(3)]
    test = [_vqa(f"/data/val/{i}.jpg") for i in range(2)]
    dev = [_vqa(f"/data/dev/{i}.jpg") for i in range(2)]
    assert _checks(check_task("vqa", train, test, dev)) == {}


def test_the_same_question_about_the_same_picture_is_a_duplicate_and_a_leak():
    train = [_vqa("/data/a.jpg"), _vqa("/data/./a.jpg"), _vqa("/data/b.jpg")]
    test = [_vqa("/data/b.jpg", answer="blue"), _vqa("/data/c.jpg")]
    findings = check_task("vqa", train, test, dev=list(test))
    assert _checks(findings) == {"duplicates": 1, "test_in_train": 1, "dev_equals_test": 2}
    leak = next(f for f in findings if f.check == "test_in_train")
    assert "1 of 2 test prompts" in leak.message and "(0 with the same answer)" in leak.message


def test_an_image_example_is_not_the_text_example_with_the_same_words():
    text, pictured = _vqa(None, "<image>What?"), _vqa("/data/a.jpg", "What?")
    assert text.messages == pictured.messages
    assert _checks(check_task("t", [text, pictured], [])) == {}


def test_text_data_is_checked_as_before():
    train = [_vqa(None), _vqa(None), _vqa(None, "Other?")]
    test = [_vqa(None, answer="blue")]
    assert _checks(check_task("t", train, test)) == {"duplicates": 1, "test_in_train": 1}


def test_a_loaded_image_task_reports_duplicates_by_picture(tmp_path):
    (tmp_path / "pics").mkdir()
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (4, 4), colour).save(tmp_path / "pics" / f"{name}.png")
    records = [
        {"instruction": "<image>Colour?", "output": "red", "images": [f"pics/{name}.png"]}
        for name in ("a", "b", "a")
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    (tmp_path / "test.json").write_text(json.dumps([{**records[1], "output": "red"}]))
    task = {"name": "t", "train": str(tmp_path / "train.json"), "test": str(tmp_path / "test.json")}
    (loaded,) = load_stream(config_from_dict({"stream": {"tasks": [task]}})).tasks
    assert {f.check: f.count for f in loaded.hygiene} == {"duplicates": 1, "test_in_train": 1}
