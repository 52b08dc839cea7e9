"""CoIN's layout on a folder written by tests/coin_fixture.py: instruction files under
playground/Instructions_Original, images under cl_dataset, every task of the order with a few records and
tiny PNGs."""

from __future__ import annotations

import json
import os

import pytest

from retain.config import config_from_dict
from retain.data.benchmarks import benchmark_tasks, coin, find_benchmark, select_tasks
from retain.data.streams import load_stream
from retain.errors import RetainError
from retain.evaluation.scoring import get_scorer

from ..coin_fixture import ORDER, SCIENCE_TEXT, TEXTVQA_ANSWERS, coin_fixture, instances
from ..helpers import retain


def _load(root, **stream) -> dict:
    config = config_from_dict({"stream": {"benchmark": "CoIN", "benchmark_dir": root, **stream}})
    return {task.name: task for task in load_stream(config).tasks}


def test_coin_is_found_in_any_case_with_the_official_order():
    for name in ("CoIN", "coin", "COIN"):
        benchmark = find_benchmark(name, "")
        assert benchmark.name == "CoIN" and benchmark.layout == "coin"
        assert benchmark.orders == {"order1": ORDER}
    assert find_benchmark("coin-diverse", "").name == "CoIN-Diverse"
    assert "Instructions_Diverse" in find_benchmark("CoIN-Diverse", "").expected


def test_every_task_loads_with_absolute_images_its_scorer_and_a_reference_its_scorer_accepts(tmp_path):
    root = coin_fixture(tmp_path)
    tasks = _load(root)
    assert list(tasks) == ORDER
    for name, task in tasks.items():
        assert task.scorer == coin.SCORERS[name]
        assert len(task.test) == 2
        for i, example in enumerate(task.test):
            assert example.images == [str(tmp_path / "cl_dataset" / name / f"{i}.png")]
            assert example.messages[0]["content"].startswith("<image>\n")
            assert get_scorer(task.scorer)(instances(name)[i][2], example.reference) == 1.0, name
        for example in task.train:
            assert all(os.path.isabs(path) and os.path.isfile(path) for path in example.images)
    assert json.loads(tasks["TextVQA"].test[0].reference) == TEXTVQA_ANSWERS
    assert tasks["Grounding"].test[0].reference == "[0.1, 0.2, 0.5, 0.6]"
    # The text-only ScienceQA question stays text-only.
    assert [e.images for e in tasks["ScienceQA"].train].count([]) == 1
    # A wrong answer scores 0 through the same scorers.
    assert get_scorer("option_letter")("A", tasks["ScienceQA"].test[0].reference) == 0.0
    assert get_scorer("grounding_iou")("[0.6, 0.6, 0.9, 0.9]", tasks["Grounding"].test[0].reference) == 0.0


def test_eval_files_follow_coins_scripts(tmp_path):
    located = find_benchmark("CoIN", str(tmp_path)).locate(str(tmp_path))
    folder = tmp_path / "playground" / "Instructions_Original"
    assert located["TextVQA"].files["test"] == str(folder / "TextVQA" / "val.json")
    assert located["ScienceQA"].files["test"] == str(folder / "ScienceQA" / "test.json")
    assert {name for name, task in located.items() if task.files["test"].endswith("val.json")} == {
        "TextVQA",
        "VizWiz",
        "VQAv2",
    }


def test_a_missing_file_is_reported_with_what_the_layout_needs(tmp_path):
    root = coin_fixture(tmp_path, skip={("VizWiz", "test")})
    benchmark = find_benchmark("CoIN", root)
    names = select_tasks(benchmark, "", [], None)
    with pytest.raises(RetainError) as error:
        benchmark_tasks(benchmark, root, names, allow_missing=False)
    message = str(error.value)
    assert "VizWiz" in message and os.path.join("VizWiz", "val.json") in message
    assert "train/test" in message and "playground/Instructions_Original" in message
    kept, warnings = benchmark_tasks(benchmark, root, names, allow_missing=True)
    assert [t.name for t in kept] == [n for n in ORDER if n != "VizWiz"] and "VizWiz" in warnings[0]


def test_textvqa_without_its_annotation_file_scores_the_single_answer(tmp_path):
    tasks = _load(coin_fixture(tmp_path, textvqa_annotations=False), tasks=["TextVQA"])
    reference = tasks["TextVQA"].test[0].reference
    assert reference == "coca cola"
    assert get_scorer("vqa_soft")("Coca Cola", reference) == 1.0


def test_the_instruction_folder_itself_and_a_variant_folder_are_found(tmp_path):
    root = coin_fixture(tmp_path, folder="Instructions_Diverse")
    tasks = {
        t.name: t
        for t in load_stream(
            config_from_dict({"stream": {"benchmark": "CoIN-Diverse", "benchmark_dir": root}})
        ).tasks
    }
    assert list(tasks) == ORDER
    # benchmark_dir = the instruction folder: the images are found at ../../cl_dataset.
    inner = str(tmp_path / "playground" / "Instructions_Diverse")
    located = find_benchmark("CoIN", inner).locate(inner)
    first = located["GQA"].read(located["GQA"].files["test"])[0]
    assert first.images == [str(tmp_path / "cl_dataset" / "GQA" / "0.png")]


def test_science_answers_as_option_text_become_letters_and_bad_ones_are_named(tmp_path):
    assert coin.science_letter("whale", SCIENCE_TEXT, "f") == "B"
    assert coin.science_letter("(b)", SCIENCE_TEXT, "f") == "B"
    with pytest.raises(RetainError, match="neither an option letter"):
        coin.science_letter("dolphin", SCIENCE_TEXT, "f")


def test_malformed_test_records_name_the_file(tmp_path):
    root = coin_fixture(tmp_path)
    path = tmp_path / "playground" / "Instructions_Original" / "Grounding" / "test.json"
    path.write_text(
        json.dumps(
            [
                {
                    "question_id": 1,
                    "image": "Grounding/0.png",
                    "text": "box?",
                    "answer_bbox": "[0.5, 0.5, 0.1, 0.1]",
                }
            ]
        )
    )
    with pytest.raises(RetainError, match="grounding_iou"):
        _load(root, tasks=["Grounding"])
    path.write_text(json.dumps([{"question_id": 1, "image": "Grounding/0.png", "question": "box?"}]))
    with pytest.raises(RetainError, match=r"test\.json: record 0 needs \"text\""):
        _load(root, tasks=["Grounding"])


def test_benchmarks_command_lists_coin_and_its_present_files(tmp_path):
    everything = retain("benchmarks")
    assert everything.returncode == 0 and "CoIN" in everything.stdout
    root = coin_fixture(tmp_path, skip={("OCRVQA", "test")})
    listed = retain("benchmarks", "CoIN", "--dir", root)
    assert listed.returncode == 0, listed.stderr
    assert "7/8 complete" in listed.stdout and "OCRVQA" in listed.stdout
    assert " -> ".join(ORDER) in " ".join(listed.stdout.split())  # the console may wrap the line


def test_make_plan_on_coin_with_a_tiny_llava(tmp_path):
    from retain.engine.plan import make_plan
    from retain.models.tiny import tiny_vlm, tiny_vlm_processor

    root = coin_fixture(tmp_path / "coin")
    tiny_vlm().save_pretrained(tmp_path / "vlm")
    tiny_vlm_processor().save_pretrained(tmp_path / "vlm")
    raw = {
        "model": {"name_or_path": str(tmp_path / "vlm")},
        "stream": {"benchmark": "CoIN", "benchmark_dir": root, "max_tasks": 3},
        "output_dir": str(tmp_path / "run"),
    }
    plan = make_plan(config_from_dict(raw))
    assert [t.name for t in plan.tasks] == ORDER[:3]
    assert plan.stream.benchmark["layout"] == "coin"
    assert plan.tasks[1].test[0].images == [str(tmp_path / "coin" / "cl_dataset" / "TextVQA" / "0.png")]
