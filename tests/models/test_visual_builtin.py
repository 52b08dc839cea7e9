"""The built-in image-text model `smollm2-135m-vision`: its scenes, captions and labels, the two build
stages (an encoder that learns to see, an alignment that moves only the projector and the encoder), the
saved folder that loads like any LLaVA, and the cache that builds once."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from PIL import Image

from retain.data.synthetic import _SPLIT_BUCKETS, SYNTHETIC_TASKS, _stable_int
from retain.data.synthetic_visual import scene_key
from retain.models import loading, visual_builtin
from retain.models.tiny import tiny_model, tiny_tokenizer, tiny_vlm_tokenizer
from retain.models.vision import is_image_text_model, load_image_text_model
from retain.models.visual_builtin import (
    ATTRIBUTES,
    VisionBuildSettings,
    build_scenes,
    build_visual_model,
    caption,
    scene_labels,
    side_of,
    train_encoder,
)
from tests.helpers import retain

SMALL = VisionBuildSettings(
    image_size=32,
    patch_size=16,
    hidden_size=32,
    layers=1,
    heads=2,
    scenes_per_task=24,
    encoder_steps=2,
    encoder_batch=8,
    align_steps=2,
    align_batch=4,
    bf16=False,
)


def _shape(kind="circle", colour="red", x=10, y=32, size=12, **extra):
    return {"kind": kind, "colour": colour, "x": x, "y": y, "size": size, **extra}


def test_side_of_a_shape_is_the_nearest_side_or_the_middle():
    assert side_of(_shape(x=10, y=32)) == "left"
    assert side_of(_shape(x=55, y=30)) == "right"
    assert side_of(_shape(x=30, y=5)) == "top"
    assert side_of(_shape(x=34, y=60)) == "bottom"
    assert side_of(_shape(x=35, y=29)) == "middle"


def test_scene_labels_name_only_what_the_scene_shows():
    one = scene_labels([_shape(kind="triangle", colour="blue", x=60, y=32)])
    assert one == {"colour": 0, "kind": 2, "side": 1, "count": 0}
    assert ATTRIBUTES["colour"][0] == "blue" and ATTRIBUTES["kind"][2] == "triangle"
    digit = scene_labels([_shape(kind="digit", colour="green", digit=7, x=32, y=32)])
    assert digit == {"colour": 1, "kind": 3, "side": 4, "digit": 7}  # a digit is not counted as a shape
    many = scene_labels([_shape(), _shape(colour="blue", x=50)])
    assert many == {"count": 1}  # two shapes have no single colour, kind or side


def test_captions_name_every_attribute():
    assert (
        caption([_shape(kind="digit", colour="green", digit=7, x=32, y=32)])
        == "A green digit 7 at the middle."
    )
    two = caption([_shape(), _shape(kind="square", colour="blue", x=50)])
    assert two == "2 shapes: a red circle, a blue square."
    single = caption([_shape(x=10)])
    assert single in ("A red circle at the left.", "1 shape: a red circle.")


def test_the_build_never_sees_a_test_scene():
    examples = build_scenes(SMALL)
    assert len(examples) == 5 * SMALL.scenes_per_task
    assert {example.meta["split"] for example in examples} == {"train"}
    # The split hash of each scene (the rule the tasks use) puts it in a train bucket.
    for example in examples:
        task = SYNTHETIC_TASKS[example.meta["task"]]
        prompt = example.messages[0]["content"]
        key = scene_key(prompt, {"shapes": example.meta["shapes"]})
        assert _stable_int(task.name, key) % 10 in _SPLIT_BUCKETS["train"]


def test_the_vision_encoder_learns_the_colours():
    settings = replace(SMALL, scenes_per_task=60, encoder_steps=80, encoder_batch=32, encoder_lr=3e-3)
    processor = visual_builtin.make_processor(tiny_vlm_tokenizer(), settings)
    scenes = [e.meta["shapes"] for e in build_scenes(settings)]
    _, accuracy = train_encoder(settings, processor.image_processor, scenes)
    assert accuracy["colour"] >= 0.6  # chance is 0.25


def test_the_image_token_is_added_whole_and_leaves_the_other_tokens_alone():
    tokenizer = tiny_tokenizer()
    before = dict(tokenizer.get_vocab())
    visual_builtin.add_image_token(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<image>") == len(before)
    assert tokenizer("a<image>b")["input_ids"].count(len(before)) == 1
    assert all(tokenizer.get_vocab()[token] == i for token, i in before.items())


def _tiny_language_model(_path):
    tokenizer = tiny_vlm_tokenizer()
    return tiny_model(tokenizer), tokenizer


def test_a_build_aligns_the_projector_and_leaves_the_language_model_alone(tmp_path, monkeypatch):
    settings = replace(SMALL, align_steps=12, align_batch=8, align_lr=1e-2)
    language_model, tokenizer = _tiny_language_model(None)
    before = {k: v.clone() for k, v in language_model.state_dict().items()}
    monkeypatch.setattr(visual_builtin, "_load_language_model", lambda path: (language_model, tokenizer))
    record = build_visual_model("unused", str(tmp_path / "vlm"), settings)
    assert record["caption_loss_after"] < record["caption_loss_before"]
    assert not os.path.exists(str(tmp_path / "vlm") + f".encoder-{visual_builtin.BUILD_VERSION}")
    folder = tmp_path / "vlm"
    assert json.loads((folder / "build.json").read_text())["build_version"] == visual_builtin.BUILD_VERSION
    assert is_image_text_model(str(folder))
    model, processor = load_image_text_model(str(folder))
    # The language model is frozen: its weights (the image token's new row aside) are as loaded.
    saved = model.model.language_model.state_dict()
    for name, value in before.items():
        if not name.startswith("model."):
            continue
        got = saved[name.removeprefix("model.")]
        if name == "model.embed_tokens.weight":
            got = got[: value.shape[0]]
        assert torch.equal(got, value), name
    # The processor turns one <image> into one token per patch.
    ids = processor(text="<image>hi", images=[Image.new("RGB", (64, 64))])["input_ids"][0]
    assert list(ids).count(processor.tokenizer.convert_tokens_to_ids("<image>")) == settings.image_tokens


def test_the_built_model_is_cached_and_rebuilt_when_the_recipe_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / "cache"))
    builds = []

    def fake_build(base_dir, target, settings=None):
        builds.append(base_dir)
        os.makedirs(target, exist_ok=True)
        (tmp_path / "cache" / "models" / visual_builtin.NAME / "config.json").write_text("{}")
        record = {"build_version": visual_builtin.BUILD_VERSION, "total_seconds": 1.0}
        (tmp_path / "cache" / "models" / visual_builtin.NAME / "build.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(visual_builtin, "build_visual_model", fake_build)
    monkeypatch.setattr(loading, "resolve_builtin", _resolve_base_only(loading.resolve_builtin, tmp_path))
    path, hit = loading.resolve_builtin(visual_builtin.NAME)
    assert (hit, len(builds)) == (False, 1) and builds == [str(tmp_path / "base")]
    assert loading.resolve_builtin(visual_builtin.NAME) == (path, True) and len(builds) == 1
    monkeypatch.setattr(visual_builtin, "BUILD_VERSION", "older")
    assert loading.resolve_builtin(visual_builtin.NAME)[1] is False and len(builds) == 2


def _resolve_base_only(real, tmp_path):
    def resolve(name):
        if name == visual_builtin.BASE:
            return str(tmp_path / "base"), True
        return real(name)

    return resolve


def test_planning_needs_no_build(tmp_path, monkeypatch):
    """`--dry-run` (and the plan) get the processor from the language model's tokenizer: nothing is built."""
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(visual_builtin, "build_visual_model", pytest.fail)
    base = tmp_path / "base"
    tiny_vlm_tokenizer().save_pretrained(base)  # any tokenizer folder stands in for SmolLM2's
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 7}))
    monkeypatch.setattr(loading, "resolve_builtin", _resolve_base_only(loading.resolve_builtin, tmp_path))
    tokenizer, processor = loading.load_encoders(visual_builtin.NAME)
    assert processor is not None and "<image>" in tokenizer.get_vocab()
    assert loading.model_layer_count(visual_builtin.NAME) == 7


@pytest.mark.slow
def test_the_visual_quickstart_plans_through_the_cli(tmp_path):
    """The shipped example reads and plans (no model is built or loaded by --dry-run)."""
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "multimodal_quickstart.yaml")
    result = retain("run", os.path.abspath(example), "--dry-run", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "shape_colour" in result.stdout and "count_shapes" in result.stdout
