"""Data with images: refused on a text model before anything is written, planned on an image-text model;
stream.image_dir is where relative image paths resolve from."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from retain.config import config_from_dict
from retain.engine.plan import make_plan
from retain.errors import RetainError
from retain.models.tiny import tiny_vlm, tiny_vlm_processor


def _image_data(tmp_path) -> dict:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    for split, count in (("train", 4), ("test", 2)):
        records = [
            {"instruction": f"<image>{split} {i}?", "output": "red", "images": ["red.png"]}
            for i in range(count)
        ]
        (tmp_path / f"{split}.json").write_text(json.dumps(records))
    return {"name": "colours", "train": str(tmp_path / "train.json"), "test": str(tmp_path / "test.json")}


def test_images_on_a_text_model_are_refused_naming_the_task(tmp_path):
    raw = {"model": {"name_or_path": "tiny-random"}, "stream": {"tasks": [_image_data(tmp_path)]}}
    with pytest.raises(RetainError, match="task 'colours' has images, but model tiny-random is a text-only"):
        make_plan(config_from_dict({**raw, "output_dir": str(tmp_path / "run")}))
    assert not (tmp_path / "run").exists()


def _vlm(folder) -> str:
    tiny_vlm().save_pretrained(folder)
    tiny_vlm_processor().save_pretrained(folder)
    return str(folder)


def test_images_on_an_image_text_model_are_planned(tmp_path):
    raw = {"model": {"name_or_path": _vlm(tmp_path / "vlm")}, "stream": {"tasks": [_image_data(tmp_path)]}}
    plan = make_plan(config_from_dict(raw))
    assert plan.tasks[0].test[0].images == [str(tmp_path / "red.png")]


def test_image_dir_resolves_relative_image_paths_from_the_current_directory(tmp_path, monkeypatch):
    task = _image_data(tmp_path)
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "pictures" / "red.png")  # another file, same name
    monkeypatch.chdir(tmp_path)
    raw = {
        "model": {"name_or_path": _vlm(tmp_path / "vlm")},
        "stream": {"tasks": [task], "image_dir": "pictures"},
    }
    plan = make_plan(config_from_dict(raw))
    assert plan.tasks[0].train[0].images == [str(tmp_path / "pictures" / "red.png")]


def test_text_data_is_unaffected(tmp_path):
    plan = make_plan(
        config_from_dict(
            {"model": {"name_or_path": "tiny-random"}, "stream": {"tasks": ["synthetic:parity"]}}
        )
    )
    assert plan.tasks[0].name == "parity"


@pytest.mark.parametrize("method", ["lamol", "ssr", "pseudo_replay"])
def test_methods_that_write_text_only_pseudo_samples_refuse_image_data(tmp_path, method):
    raw = {
        "model": {"name_or_path": "tiny-random"},
        "method": {"name": method},
        "stream": {"tasks": [_image_data(tmp_path)]},
    }
    with pytest.raises(RetainError, match=f"method '{method}' writes text-only pseudo samples"):
        make_plan(config_from_dict(raw))
