"""Data with images: refused on a text model, and (until images reach training) on an image-text model,
before anything is written."""

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


def test_images_on_an_image_text_model_are_refused_until_they_reach_the_model(tmp_path):
    folder = tmp_path / "vlm"
    tiny_vlm().save_pretrained(folder)
    tiny_vlm_processor().save_pretrained(folder)
    raw = {"model": {"name_or_path": str(folder)}, "stream": {"tasks": [_image_data(tmp_path)]}}
    with pytest.raises(RetainError, match="cannot yet train or evaluate an image-text model"):
        make_plan(config_from_dict(raw))


def test_text_data_is_unaffected(tmp_path):
    plan = make_plan(
        config_from_dict(
            {"model": {"name_or_path": "tiny-random"}, "stream": {"tasks": ["synthetic:parity"]}}
        )
    )
    assert plan.tasks[0].name == "parity"
