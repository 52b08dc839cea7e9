"""CoIN reads its images from `stream.image_dir` when set, instead of the cl_dataset folder it finds, and
names the image folder (and where it came from) when images are missing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from retain.config import config_from_dict
from retain.data.benchmarks import coin, find_benchmark
from retain.data.streams import load_stream
from retain.errors import RetainError

TASKS = ("ScienceQA", "ImageNet", "GQA", "VQAv2", "OCRVQA")


def coin_fixture(root) -> str:
    """A few CoIN tasks: <root>/playground/Instructions_Original/<Task>/{train,test|val}.json, and two
    images per task under <root>/cl_dataset/<Task>/ (named 0.png and 1.png, which the tests look for)."""
    for task in TASKS:
        folder = os.path.join(root, "cl_dataset", task)
        os.makedirs(folder)
        for i, colour in enumerate(("red", "blue")):
            Image.new("RGB", (8, 8), colour).save(os.path.join(folder, f"{i}.png"))
        train = [
            {
                "id": f"{task}-{i}",
                "image": f"{task}/{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\nWhat is it? ({i})"},
                    {"from": "gpt", "value": "A"},
                ],
            }
            for i in range(2)
        ]
        test = [
            {"question_id": i, "image": f"{task}/{i}.png", "text": "What is it?", "answer": "A"}
            for i in range(2)
        ]
        instructions = os.path.join(root, "playground", "Instructions_Original", task)
        os.makedirs(instructions)
        for name, records in (("train.json", train), (coin.EVAL_FILES.get(task, "test.json"), test)):
            with open(os.path.join(instructions, name), "w", encoding="utf-8") as handle:
                json.dump(records, handle)
    return str(root)


def _read(root: str, image_dir: str | None = None, task: str = "GQA"):
    located = find_benchmark("CoIN", root).locate(root, image_dir=image_dir)
    item = located[task]
    return item.read(item.files["train"]), item.read(item.files["test"])


def _recolour(folder, colour: str) -> None:
    """Every PNG under `folder` repainted, so which folder an image came from can be told apart."""
    for base, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".png"):
                Image.new("RGB", (8, 8), colour).save(os.path.join(base, name))


def test_image_dir_replaces_the_cl_dataset_folder_for_train_and_test(tmp_path):
    root = coin_fixture(tmp_path / "coin")
    elsewhere = tmp_path / "images"
    shutil.copytree(tmp_path / "coin" / "cl_dataset", elsewhere)
    _recolour(elsewhere, "green")
    train, test = _read(root, str(elsewhere))
    for example in train + test:
        (path,) = example.images
        assert path.startswith(str(elsewhere) + os.sep)
        with Image.open(path) as image:
            assert image.getpixel((0, 0)) == (0, 128, 0)
    # Without it, the cl_dataset folder under benchmark_dir as before.
    train, test = _read(root)
    assert all(e.images[0].startswith(str(tmp_path / "coin" / "cl_dataset")) for e in train + test)


def test_a_relative_image_dir_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    root = coin_fixture(tmp_path / "coin")
    shutil.move(tmp_path / "coin" / "cl_dataset", tmp_path / "pictures")
    monkeypatch.chdir(tmp_path)
    train, _ = _read(root, "pictures", task="ImageNet")
    assert train[0].images == [str(tmp_path / "pictures" / "ImageNet" / "0.png")]


def test_images_missing_from_image_dir_name_that_folder(tmp_path):
    root = coin_fixture(tmp_path / "coin")
    empty = tmp_path / "other"
    empty.mkdir()
    for task, split in (("GQA", "train"), ("VQAv2", "test")):
        item = find_benchmark("CoIN", root).locate(root, image_dir=str(empty))[task]
        with pytest.raises(RetainError) as error:
            item.read(item.files[split])
        message = str(error.value)
        assert f"images are read from {empty} (stream.image_dir)" in message
        assert os.path.join(task, "0.png") in message and "does not exist" in message


def test_a_missing_image_root_is_named_with_where_it_was_looked_for(tmp_path):
    root = coin_fixture(tmp_path / "coin")
    shutil.rmtree(tmp_path / "coin" / "cl_dataset")
    with pytest.raises(RetainError, match=r"image folder .*coin/cl_dataset \(no cl_dataset folder found"):
        _read(root, task="ScienceQA")
    missing = tmp_path / "nowhere"
    with pytest.raises(RetainError, match=rf"image folder {missing} \(stream.image_dir\) does not exist"):
        _read(root, str(missing), task=TASKS[-1])


def test_the_config_s_image_dir_reaches_the_coin_layout(tmp_path):
    root = coin_fixture(tmp_path / "coin")
    shutil.move(os.path.join(root, "cl_dataset"), tmp_path / "pics")
    raw = {
        "stream": {
            "benchmark": "CoIN",
            "benchmark_dir": root,
            "image_dir": str(tmp_path / "pics"),
            "tasks": ["GQA"],
        }
    }
    (task,) = load_stream(config_from_dict(raw)).tasks
    assert task.train and all(e.images[0].startswith(str(tmp_path / "pics")) for e in task.train + task.test)
