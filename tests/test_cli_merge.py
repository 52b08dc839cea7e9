"""`retain merge RUN_DIR` and `retain lines RUN_DIR`: post-hoc edits of a finished run, saved, evaluated."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel

from retain.cli import main
from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.common.task_vectors import lora_task_vector, merge_task_vectors
from retain.models.tiny import tiny_model, tiny_tokenizer

from .helpers import tiny_config

THREE_TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"]
# Eval-only tasks ride along, so the post-hoc edits are checked to score them as the run did.
STREAM = {"tasks": THREE_TASKS, "eval_only": ["synthetic:reverse"]}


@pytest.fixture(scope="module")
def merge_run(tmp_path_factory):
    """A 3-task run of the merge method (task arithmetic), with its results."""
    tmp = tmp_path_factory.mktemp("merge_run")
    raw = tiny_config(tmp, "merge", {"how": "task_arithmetic"}, stream=STREAM)
    return raw["output_dir"], run_experiment(config_from_dict(raw))


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sequential_run")
    raw = tiny_config(tmp, "sequential", stream=STREAM)
    return raw["output_dir"], run_experiment(config_from_dict(raw))


def read(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def predictions(folder, task):
    """The predictions in an eval file (the tiny model scores 0 everywhere; its text tells models apart)."""
    with open(os.path.join(folder, f"{task}.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line)["prediction"] for line in handle]


def test_merging_with_the_run_s_own_settings_reproduces_its_last_row(merge_run):
    run_dir, results = merge_run
    assert main(["merge", run_dir, "--how", "task_arithmetic"]) == 0
    out = os.path.join(run_dir, "merges", "task_arithmetic")
    merged = read(os.path.join(out, "results.json"))
    assert merged["task_vectors"] == ["default", "task2", "task3"] and merged["lam"] == pytest.approx(1 / 3)
    assert [merged["scores"][t] for t in merged["tasks"]] == pytest.approx(results["matrix"][3])
    for task in merged["tasks"]:
        assert predictions(os.path.join(out, "eval"), task) == predictions(
            os.path.join(run_dir, "eval", "3"), task
        )
    assert merged["general_scores"] == {"reverse": pytest.approx(results["general"]["matrix"][3][0])}
    assert predictions(os.path.join(out, "eval", "general"), "reverse") == predictions(
        os.path.join(run_dir, "eval", "3", "general"), "reverse"
    )


def test_the_merged_adapter_loads_with_peft_and_holds_the_ties_merge(merge_run):
    run_dir, _ = merge_run
    assert main(["merge", run_dir, "--how", "ties", "--weights", "1,1,2", "--density", "0.5"]) == 0
    out = os.path.join(run_dir, "merges", "ties")
    merged = read(os.path.join(out, "results.json"))
    assert merged["weights"] == [1.0, 1.0, 2.0] and merged["density"] == 0.5
    assert set(merged["scores"]) == {"parity", "capital_letters", "max_number"}
    loaded = PeftModel.from_pretrained(tiny_model(tiny_tokenizer()), os.path.join(out, "adapter"))
    deltas = lora_task_vector(loaded, "default")
    run = PeftModel.from_pretrained(
        tiny_model(tiny_tokenizer()), os.path.join(run_dir, "tasks", "3-max_number", "adapter")
    )
    taus = []
    for name in ("default", "task2", "task3"):
        if name != "default":
            run.load_adapter(
                os.path.join(run_dir, "tasks", "3-max_number", "adapter", name), adapter_name=name
            )
        taus.append(lora_task_vector(run, name))
    want = merge_task_vectors(taus, "ties", weights=[1, 1, 2], density=0.5)
    assert set(deltas) == set(want)
    assert all(torch.allclose(deltas[n], want[n], atol=1e-6) for n in want)


def test_a_single_adapter_run_is_refused_with_the_folder_and_the_fix(sequential_run, capsys):
    run_dir, _ = sequential_run
    assert main(["merge", run_dir]) == 2
    err = capsys.readouterr().err
    assert "tasks/3-max_number/adapter holds one adapter" in err
    assert "method.name=merge" in err and "--from checkpoints" in err


def test_merging_checkpoints_with_only_the_last_weighted_gives_the_last_model(sequential_run):
    run_dir, results = sequential_run
    args = ["merge", run_dir, "--from", "checkpoints", "--how", "task_arithmetic", "--weights", "0,0,1"]
    assert main([*args, "--lam", "1", "--name", "last"]) == 0
    merged = read(os.path.join(run_dir, "merges", "last", "results.json"))
    assert [merged["scores"][t] for t in merged["tasks"]] == pytest.approx(results["matrix"][3])
    out = os.path.join(run_dir, "merges", "last", "eval")
    for task in merged["tasks"]:
        assert predictions(out, task) == predictions(os.path.join(run_dir, "eval", "3"), task)


def test_lines_with_alpha_1_and_beta_0_is_the_run_itself(sequential_run):
    run_dir, results = sequential_run
    assert main(["lines", run_dir, "--alpha", "1", "--beta", "0", "--name", "identity"]) == 0
    edited = read(os.path.join(run_dir, "lines", "identity", "results.json"))
    for got, want in zip(edited["matrix"][1:], results["matrix"][1:], strict=True):
        assert got == pytest.approx(want)
    assert edited["metrics"]["bwt"] == pytest.approx(results["metrics"]["bwt"])
    for row in (1, 2, 3):
        for task in edited["tasks"]:
            got = predictions(os.path.join(run_dir, "lines", "identity", "eval", str(row)), task)
            assert got == predictions(os.path.join(run_dir, "eval", str(row)), task)
    for got, want in zip(edited["general"]["matrix"], results["general"]["matrix"], strict=True):
        assert got == pytest.approx(want)
    got = predictions(os.path.join(run_dir, "lines", "identity", "eval", "3", "general"), "reverse")
    assert got == predictions(os.path.join(run_dir, "eval", "3", "general"), "reverse")


def test_lines_changes_what_the_model_answers(sequential_run):
    run_dir, _ = sequential_run
    assert main(["lines", run_dir, "--alpha", "0", "--beta", "0", "--last-only", "--name", "zero"]) == 0
    # alpha = beta = 0 removes the whole update: the base model answers
    out = os.path.join(run_dir, "lines", "zero", "eval", "3")
    tasks = read(os.path.join(run_dir, "lines", "zero", "results.json"))["tasks"]
    assert any(predictions(out, t) != predictions(os.path.join(run_dir, "eval", "3"), t) for t in tasks)


def test_lines_scales_each_checkpoint_and_saves_the_last_edited_adapter(sequential_run):
    run_dir, _ = sequential_run
    assert main(["lines", run_dir, "--alpha", "0.25"]) == 0
    out = os.path.join(run_dir, "lines", "alpha0.25-beta0.75")
    edited = read(os.path.join(out, "results.json"))
    assert edited["beta"] == pytest.approx(0.75) and all(row is not None for row in edited["matrix"][1:])
    tokenizer = tiny_tokenizer()
    scaled = lora_task_vector(
        PeftModel.from_pretrained(tiny_model(tokenizer), os.path.join(out, "adapter")), "default"
    )
    original = lora_task_vector(
        PeftModel.from_pretrained(
            tiny_model(tokenizer), os.path.join(run_dir, "tasks", "3-max_number", "adapter")
        ),
        "default",
    )
    for name, value in scaled.items():
        factor = 0.25 if ".layers.0." in name else 1.0  # 2 blocks: alpha, alpha + beta
        assert torch.allclose(value, factor * original[name], atol=1e-6)


def test_a_full_finetuning_run_has_no_adapters_to_merge(tmp_path, capsys):
    raw = tiny_config(tmp_path, "sequential", model={"finetuning_type": "full"}, train={"max_steps": 1})
    run_experiment(config_from_dict(raw), evaluate=False)
    assert main(["merge", raw["output_dir"]]) == 2
    assert "no adapters to merge" in capsys.readouterr().err
