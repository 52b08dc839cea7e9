import json
import os

import pytest

from retain.data import images as images_module
from retain.data.dataset_info import load_examples
from retain.data.formats import Example, parse_alpaca, parse_sharegpt
from retain.errors import RetainError

from ..helpers import SHARED_DATA

LLAMAFACTORY = os.path.join(SHARED_DATA, "llamafactory")
OPENAI = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def _png(path):
    """A tiny real PNG when Pillow is there (so it opens), else placeholder bytes (existence checks only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if images_module.Image is not None:
        images_module.Image.new("RGB", (2, 2), (255, 0, 0)).save(path)
    else:
        path.write_bytes(b"not checked without pillow")
    return str(path)


def _chat(user, answer="A"):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _llava(image, question="What is it?", answer="A cat"):
    record = {
        "id": "1",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}" if image else question},
            {"from": "gpt", "value": answer},
        ],
    }
    if image:
        record["image"] = image
    return record


@pytest.fixture
def mm_dir(tmp_path):
    """A dataset_dir with images under pics/ and multimodal sharegpt and alpaca entries."""
    _png(tmp_path / "pics" / "a.png")
    _png(tmp_path / "pics" / "b.png")
    _write(
        tmp_path / "chat.json",
        [
            {
                "messages": _chat("<image>Who?") + _chat("And <image>?"),
                "images": ["pics/a.png", "pics/b.png"],
            },
            {"messages": _chat("No picture here"), "images": []},
        ],
    )
    _write(tmp_path / "qa.json", [{"instruction": "<image>Describe", "output": "Red", "pic": "pics/a.png"}])
    info = {
        # The images column by its default name: retain reads it unmapped (LLaMA-Factory needs the mapping).
        "chat": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": OPENAI,
        },
        "chat_mapped": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": OPENAI,
        },
        "qa": {"file_name": "qa.json", "columns": {"images": "pic"}},
    }
    _write(tmp_path / "dataset_info.json", info)
    return tmp_path


def test_example_images_default_and_serialization():
    example = Example(_chat("Hi"), "S", {"k": 1})
    assert example.images == []
    assert example.to_dict() == {"messages": _chat("Hi"), "system": "S", "meta": {"k": 1}}
    assert Example.from_dict(example.to_dict()) == example
    with_images = Example(messages=_chat("<image>Hi"), images=["/x/a.png"])
    assert with_images.to_dict()["images"] == ["/x/a.png"]
    assert Example.from_dict(with_images.to_dict()).images == ["/x/a.png"]


def test_parsers_keep_images_as_written():
    record = {"messages": _chat("<image>Hi"), "images": "one.png"}
    example = parse_sharegpt(record, {"messages": "messages"}, OPENAI, "m.json", 0)
    assert example.images == ["one.png"]
    alpaca = parse_alpaca({"instruction": "x", "output": "y"}, {}, "a.json", 0)
    assert alpaca.images == [] and "images" not in alpaca.meta


@pytest.mark.parametrize(
    ("value", "detail"),
    [({"path": "a.png"}, "got dict"), (["a.png", 3], "item 1 is a int"), ([""], "item 0 is an empty string")],
)
def test_images_not_a_list_of_strings(value, detail):
    record = {"instruction": "<image>x", "output": "y", "images": value}
    with pytest.raises(RetainError) as err:
        parse_alpaca(record, {}, "a.json", 4)
    message = str(err.value)
    assert message.startswith("a.json: record 4 column 'images' must be a list of image paths (strings)")
    assert detail in message and '"columns": {"images"' in message and "\n" not in message


@pytest.mark.parametrize("name", ["chat", "chat_mapped"])
def test_sharegpt_entry_resolves_against_dataset_dir(mm_dir, name):
    first, second = load_examples(name, str(mm_dir))
    assert first.images == [str(mm_dir / "pics" / "a.png"), str(mm_dir / "pics" / "b.png")]
    assert first.meta["images"] == ["pics/a.png", "pics/b.png"]  # as written, for existing readers
    assert second.images == [] and second.reference == "A"


def test_alpaca_entry_with_images_column(mm_dir):
    (example,) = load_examples("qa", str(mm_dir))
    assert example.images == [str(mm_dir / "pics" / "a.png")]
    assert example.messages[0]["content"] == "<image>Describe"


def test_image_dir_overrides_dataset_dir(mm_dir, tmp_path):
    other = tmp_path / "elsewhere"
    _png(other / "pics" / "a.png")
    _png(other / "pics" / "b.png")
    (example, _) = load_examples("chat", str(mm_dir), image_dir=str(other))
    assert example.images[0] == str(other / "pics" / "a.png")


def test_llava_file_by_path(tmp_path):
    _png(tmp_path / "coco" / "1.jpg")
    absolute = _png(tmp_path / "abs" / "2.png")
    path = _write(
        tmp_path / "llava.json",
        [_llava("coco/1.jpg"), _llava(None, "Text only <image> mention"), _llava(absolute)],
    )
    first, text_only, third = load_examples(path)
    assert first.images == [str(tmp_path / "coco" / "1.jpg")]
    assert first.messages == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A cat"},
    ]
    assert text_only.images == [] and "<image>" in text_only.messages[0]["content"]
    assert third.images == [absolute]


def test_llava_file_with_image_dir(tmp_path):
    _png(tmp_path / "images" / "coco" / "1.jpg")
    path = _write(tmp_path / "data" / "coin.json", [_llava("coco/1.jpg")])
    with pytest.raises(RetainError, match=r"coin.json: record 0 image 0 .*does not exist.*set image_dir"):
        load_examples(path)
    (example,) = load_examples(path, image_dir=str(tmp_path / "images"))
    assert example.images == [str(tmp_path / "images" / "coco" / "1.jpg")]


def test_text_only_data_unaffected(tmp_path):
    path = _write(tmp_path / "t.json", [{"instruction": "Write <image> literally", "output": "ok"}])
    (example,) = load_examples(path)
    assert example.images == [] and example.to_dict().keys() == {"messages", "system", "meta"}


def test_missing_image_error(tmp_path):
    path = _write(tmp_path / "m.json", [_llava("gone.png")])
    with pytest.raises(RetainError) as err:
        load_examples(path)
    expected = (
        f"{path}: record 0 image 0 ('gone.png' -> {tmp_path / 'gone.png'}) does not exist; "
        "put the image there, fix the path, or set image_dir to the folder the paths are relative to"
    )
    assert str(err.value) == expected


@pytest.mark.skipif(images_module.Image is None, reason="pillow is not installed: only existence is checked")
def test_unreadable_image_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    path = _write(tmp_path / "m.json", [_llava("broken.png")])
    with pytest.raises(RetainError, match=r"m.json: record 0 image 0 .* cannot be read as an image") as err:
        load_examples(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("user", "images", "match"),
    [
        ("<image><image>Two?", ["a.png"], r"record 0 has 1 image\(s\) but 2 '<image>' placeholder\(s\)"),
        ("None?", ["a.png"], r"record 0 has 1 image\(s\) but 0 '<image>'"),
        ("<image>Where?", [], r"record 0 has 0 image\(s\) but 1 '<image>'"),
    ],
)
def test_placeholder_count_error(tmp_path, user, images, match):
    _png(tmp_path / "a.png")
    path = _write(tmp_path / "p.json", [{"messages": _chat(user), "images": images}])
    with pytest.raises(RetainError, match=rf"p.json: {match}.*one <image> in the user turns per image"):
        load_examples(path)


def test_num_samples_skips_checks_of_dropped_records(tmp_path):
    _png(tmp_path / "a.png")
    _write(tmp_path / "d.json", [_llava("a.png"), _llava("missing.png")])
    entry = {
        "file_name": "d.json",
        "formatting": "sharegpt",
        "columns": {"images": "image"},
        "num_samples": 1,
    }
    _write(tmp_path / "dataset_info.json", {"d": entry})
    (example,) = load_examples("d", str(tmp_path))
    assert example.images == [str(tmp_path / "a.png")]


@pytest.mark.skipif(
    not os.path.isdir(LLAMAFACTORY),
    reason=f"real data folder {LLAMAFACTORY} is absent (it lives beside the repository, never in it)",
)
def test_llamafactory_mllm_demo():
    examples = load_examples("mllm_demo", LLAMAFACTORY)
    assert len(examples) == 6
    first = examples[0]
    demo = os.path.join(LLAMAFACTORY, "mllm_demo_data")
    assert first.images == [os.path.join(demo, "1.jpg")] * 2
    assert [m["content"].count("<image>") for m in first.messages] == [1, 0, 1, 0]
    assert all(os.path.isabs(p) and os.path.isfile(p) for e in examples for p in e.images)
    assert all(len(e.images) == sum(m["content"].count("<image>") for m in e.messages) for e in examples)
