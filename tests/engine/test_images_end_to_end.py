"""A stream whose data has images trains and evaluates a tiny LLaVA end to end: the images reach the
training forward, generation and rank evaluation, and each prediction record names its images."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from PIL import Image

from retain.config import config_from_dict
from retain.data.encode import encode_prompt_inputs
from retain.data.formats import Example
from retain.data.streams import build_stream
from retain.engine.loop import run_experiment
from retain.evaluation.generate import generate
from retain.evaluation.rank import label_log_likelihoods
from retain.methods.base import MethodContext
from retain.models.adapters import apply_finetuning
from retain.models.forward import response_forward
from retain.models.loading import load_model
from retain.models.tiny import TINY_IMAGE_SIZE, tiny_vlm, tiny_vlm_processor

COLOURS = {"colours": ("red", "blue"), "light": ("white", "black")}
ANSWERS = {"red": "red", "blue": "blue", "white": "light", "black": "dark"}


def _write_stream(tmp_path) -> list[dict]:
    """Two tasks of 28 px squares on grey: the colour of the square decides the answer."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for colour in ANSWERS:
        picture = Image.new("RGB", (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), "grey")
        picture.paste(colour, (6, 6, 22, 22))
        picture.save(images / f"{colour}.png")
    tasks = []
    for task, colours in COLOURS.items():
        # 20 training examples of 2 answers: the answers are the task's label set (rank mode)
        for split, count in (("train", 20), ("test", 2)):
            records = [
                {
                    "instruction": "<image>What is the square?",  # the same words: only the image tells
                    "output": ANSWERS[colours[i % 2]],
                    "images": [f"images/{colours[i % 2]}.png"],  # relative to the file's folder
                }
                for i in range(count)
            ]
            (tmp_path / "data" / f"{task}_{split}.json").write_text(json.dumps(records))
        tasks.append(
            {
                "name": task,
                "train": str(tmp_path / "data" / f"{task}_train.json"),
                "test": str(tmp_path / "data" / f"{task}_test.json"),
                "scorer": "exact",
            }
        )
    return tasks


def _save_vlm(folder) -> str:
    tiny_vlm().save_pretrained(folder)
    tiny_vlm_processor().save_pretrained(folder)
    return str(folder)


def _config(tmp_path, method: str, **eval_section) -> dict:
    return {
        "model": {"name_or_path": _save_vlm(tmp_path / "vlm"), "lora_rank": 4, "lora_alpha": 8},
        "stream": {"tasks": _write_stream(tmp_path)},
        "method": {"name": method},
        "train": {
            "learning_rate": 2e-2,
            "per_device_train_batch_size": 4,
            "max_steps": 3,
            "cutoff_len": 96,
            "logging_steps": 1,
            "bf16": "false",
        },
        "eval": {"max_new_tokens": 4, "batch_size": 2, **eval_section},
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
    }


@pytest.fixture
def generate_calls(monkeypatch):
    """The keyword arguments of every LLaVA generate call (the real generate still runs)."""
    calls = []
    original = transformers.LlavaForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "generate", spy)
    return calls


@pytest.mark.parametrize("method", ["sequential", "replay"])
def test_an_image_stream_trains_and_evaluates_end_to_end(tmp_path, method, generate_calls):
    results = run_experiment(config_from_dict(_config(tmp_path, method)))
    assert results["tasks"] == ["colours", "light"]
    assert len(results["matrix"]) == 3 and all(len(row) == 2 for row in results["matrix"] if row)
    for row in (1, 2):
        for task, colours in COLOURS.items():
            lines = (tmp_path / "run" / "eval" / str(row) / f"{task}.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            assert [r["images"] for r in records] == [
                [str(tmp_path / "data" / "images" / f"{c}.png")] for c in colours
            ]
    # Every generate call got one image per prompt.
    assert generate_calls
    for call in generate_calls:
        assert call["pixel_values"].shape[0] == call["input_ids"].shape[0]


def test_rank_mode_scores_each_prompt_with_its_own_image(tmp_path):
    raw = _config(tmp_path, "sequential", mode="rank")
    run_experiment(config_from_dict(raw))
    for task in COLOURS:
        lines = (tmp_path / "run" / "eval" / "2" / f"{task}.jsonl").read_text().splitlines()
        first, second = (json.loads(line) for line in lines)
        assert first["mode"] == "rank" and first["images"] != second["images"]
        # Same words, different picture: the scores differ only through the image.
        assert first["prompt"] == second["prompt"]
        assert first["label_scores"] != second["label_scores"]


def _context(tmp_path):
    config = config_from_dict(_config(tmp_path, "sequential"))
    model, tokenizer, info = load_model(config.model.name_or_path)
    model = apply_finetuning(model, config.model)
    tasks = build_stream(config)
    ctx = MethodContext.create(model, tokenizer, config, tasks, task_index=1, processor=info.processor)
    return ctx, tasks


def test_the_training_loss_depends_on_the_image(tmp_path):
    ctx, tasks = _context(tmp_path)
    example = tasks[0].train[0]
    other = Example(example.messages, example.system, example.meta, images=[tasks[0].train[1].images[0]])
    assert other.images != example.images
    losses = []
    for item in (example, other, example):
        batch = ctx.collate(ctx.encode([item]))
        assert "pixel_values" in batch
        with torch.no_grad():
            losses.append(float(response_forward(ctx.model, batch).loss))
    assert losses[0] == losses[2] and losses[0] != losses[1]


def test_generation_passes_each_prompt_its_own_image_in_the_sorted_order(tmp_path, generate_calls):
    ctx, tasks = _context(tmp_path)
    # Prompts of different lengths, so sorting longest first reorders them.
    examples = list(tasks[0].test)
    longer = Example(
        [{"role": "user", "content": "<image>Look closely: what is the square?"}, examples[0].messages[-1]],
        images=examples[0].images,
    )
    examples = [examples[1], longer, examples[0]]
    inputs = [encode_prompt_inputs(ctx.tokenizer, e, ctx.processor) for e in examples]
    prompts = [i["input_ids"] for i in inputs]
    images = [{"pixel_values": i["pixel_values"]} for i in inputs]
    batched = generate(ctx.model, ctx.tokenizer, prompts, max_new_tokens=3, batch_size=3, images=images)
    (call,) = generate_calls
    order = sorted(range(3), key=lambda k: len(prompts[k]), reverse=True)
    assert order != [0, 1, 2]
    assert torch.equal(call["pixel_values"], torch.cat([images[k]["pixel_values"] for k in order]))
    singles = [
        generate(ctx.model, ctx.tokenizer, [p], max_new_tokens=3, images=[i])
        for p, i in zip(prompts, images, strict=True)
    ]
    assert batched == [s[0] for s in singles]


def test_ranking_each_pair_in_full_sees_the_image_as_the_shared_prompt_does(tmp_path):
    ctx, tasks = _context(tmp_path)
    examples, labels = tasks[0].test, tasks[0].labels
    assert labels == ["blue", "red"]
    options = {"batch_size": 2, "progress": False, "processor": ctx.processor}
    shared = label_log_likelihoods(ctx.model, ctx.tokenizer, examples, labels, **options)
    pairs = label_log_likelihoods(ctx.model, ctx.tokenizer, examples, labels, share_prompt=False, **options)
    assert torch.allclose(torch.tensor(shared), torch.tensor(pairs), atol=1e-4)
    assert shared[0] != shared[1]  # the same words, another image
