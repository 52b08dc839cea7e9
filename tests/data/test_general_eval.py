"""stream.eval_only: the config field, the built-in general set, eval-only tasks and their data checks,
and the general-retention metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retain.config import BUILTIN_GENERAL, config_from_dict
from retain.data.general import INSTRUCT_TASK, text_synthetic_tasks
from retain.data.streams import load_stream
from retain.errors import RetainError
from retain.evaluation.metrics import general_retention

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "src" / "retain" / "data"


def _config(eval_only, tasks=("synthetic:parity", "synthetic:reverse"), **stream):
    raw = {
        "model": {"name_or_path": "tiny-random"},
        "stream": {"test_size": 4, "train_size": 8, "tasks": list(tasks), "eval_only": eval_only, **stream},
    }
    return config_from_dict(raw)


def _alpaca(path: Path, records: list[tuple[str, str]]) -> str:
    path.write_text("\n".join(json.dumps({"instruction": q, "output": a}) for q, a in records) + "\n")
    return str(path)


# --- config ----------------------------------------------------------------------------------------------


def test_builtin_shorthand_and_specs_normalise_to_test_sets():
    for value in ("builtin", ["builtin"], [BUILTIN_GENERAL]):
        (entry,) = _config(value).stream.eval_only
        assert (entry.name, entry.train, entry.test, entry.test_size) == ("builtin", "", BUILTIN_GENERAL, 4)
    entry, other = _config(
        ["synthetic:arithmetic", {"name": "mc", "test": "mc.json", "test_size": 2}]
    ).stream.eval_only
    assert (entry.name, entry.test, entry.train) == ("arithmetic", "synthetic:arithmetic", "")
    assert (other.name, other.test, other.test_size) == ("mc", "mc.json", 2)
    assert _config([]).stream.eval_only == []


@pytest.mark.parametrize(
    ("eval_only", "message"),
    [
        (["synthetic:parity"], "'parity' is also a task of the stream"),
        ([{"name": "reverse", "test": "x.json"}], "'reverse' is also a task of the stream"),
        (["synthetic:arithmetic", {"name": "arithmetic", "test": "y.json"}], "used twice"),
        ([{"train": "a.json", "test": "b.json"}], "gives both train"),
        ([{"test": "a.json", "train_size": 3}], "never trained; remove it"),
        (["builtin", "general:builtin"], "listed twice"),
        ([{"name": "x"}], "names no data"),
    ],
)
def test_bad_eval_only_entries_are_refused_naming_the_entry(eval_only, message):
    with pytest.raises(RetainError, match=message) as error:
        _config(eval_only)
    assert "stream.eval_only[" in str(error.value)


# --- the built-in general set ----------------------------------------------------------------------------


def test_builtin_set_is_the_untrained_text_synthetic_tasks_plus_the_instruction_sample():
    stream = load_stream(_config("builtin"))
    names = [t.name for t in stream.eval_only]
    expected = [n for n in text_synthetic_tasks() if n not in ("parity", "reverse")] + [INSTRUCT_TASK]
    assert names == expected and "arithmetic" in names and "shape_kind" not in names  # no image tasks
    assert [t.name for t in stream.tasks] == ["parity", "reverse"]
    for task in stream.eval_only:
        assert task.train == [] and len(task.test) == 4  # stream.test_size applies to each
    instruct = stream.eval_only[-1]
    assert instruct.scorer == "rouge_l" and instruct.labels is None


def test_builtin_set_without_a_test_size_uses_its_own_sizes():
    stream = load_stream(_config("builtin", test_size=None))
    sizes = {t.name: len(t.test) for t in stream.eval_only}
    assert sizes[INSTRUCT_TASK] == 40 and sizes["arithmetic"] == 20


def test_a_users_entry_wins_over_a_builtin_task_of_the_same_name(tmp_path):
    mine = _alpaca(tmp_path / "a.jsonl", [("What is 1 + 1?", "2"), ("What is 2 + 2?", "4")])
    stream = load_stream(_config(["builtin", {"name": "arithmetic", "test": mine}]))
    arithmetic = [t for t in stream.eval_only if t.name == "arithmetic"]
    assert len(arithmetic) == 1 and arithmetic[0].test[0].reference == "2"


def test_the_instruction_sample_is_not_what_gere_replays_and_is_packaged():
    records = [json.loads(line) for line in (DATA / "general_eval.jsonl").read_text().splitlines()]
    assert len(records) == 40 and all(r["output"].strip() for r in records)
    replayed = [json.loads(line) for line in (DATA / "general_samples.jsonl").read_text().splitlines()]
    assert not {r["instruction"] for r in records} & {r["instruction"] for r in replayed}
    assert "data/general_eval.jsonl" in (ROOT / "pyproject.toml").read_text()


# --- eval-only tasks from files, labels and data checks --------------------------------------------------


def test_a_multiple_choice_file_gets_its_label_set_for_rank_mode(tmp_path):
    options = "Question {i}?\nOption: A, B, C, D"
    records = [(options.format(i=i), "ABCD"[i % 4]) for i in range(8)]
    path = _alpaca(tmp_path / "mmlu.jsonl", records)
    (task,) = load_stream(_config([path])).eval_only
    assert task.name == "mmlu" and task.labels == ["A", "B", "C", "D"] and task.train == []
    assert len(task.test) == 4  # stream.test_size applies


def test_an_eval_only_test_set_overlapping_a_stream_training_set_is_a_finding(tmp_path):
    train = [(f"Say {w}.", w) for w in ("one", "two", "three", "four", "five", "six")]
    stream_file = _alpaca(tmp_path / "words.jsonl", train)
    general_file = _alpaca(tmp_path / "general.jsonl", train[:3] + [("Say seven.", "seven")])
    config = _config([general_file], tasks=[stream_file], test_size=None, train_size=None)
    stream = load_stream(config)
    (general,) = stream.eval_only
    overlap = [f for f in general.hygiene if f.check == "test_in_train"]
    assert len(overlap) == 1 and "stream task 'words'" in overlap[0].message
    # Which examples overlap depends on the stream's held-out split; what was trained is what counts.
    trained = {e.messages[0]["content"] for e in stream.tasks[0].train}
    assert overlap[0].count == sum(e.messages[0]["content"] in trained for e in general.test) > 0
    clean = load_stream(_config([general_file], tasks=["synthetic:parity"], test_size=None))
    assert not [f for f in clean.eval_only[0].hygiene if f.check == "test_in_train"]


def test_a_name_shared_with_a_benchmark_or_stream_task_is_refused_at_load(tmp_path):
    # The config check sees stream.tasks; the loader also sees the names a benchmark brings.
    config = _config(["synthetic:arithmetic"])
    config.stream.eval_only[0].name = "parity"
    with pytest.raises(RetainError, match="share a name with a task of the stream"):
        load_stream(config)


def test_a_benchmark_task_as_eval_only_brings_its_test_set_scorer_and_labels(tmp_path):
    # O-LoRA's layout: <benchmark_dir>/<category>/<task>/{train,test,labels}.json.
    folder = tmp_path / "NLI" / "CB"
    folder.mkdir(parents=True)
    labels = ["entailment", "contradiction", "neutral"]
    rows = [{"sentence": f"s{i}", "label": labels[i % 3]} for i in range(6)]
    (folder / "train.json").write_text(json.dumps(rows))
    (folder / "test.json").write_text(json.dumps(rows[:4] + [{"sentence": "odd", "label": "maybe"}]))
    (folder / "labels.json").write_text(json.dumps(labels))
    config = _config(["benchmark:olora/CB"], test_size=None, benchmark_dir=str(tmp_path))
    (task,) = load_stream(config).eval_only
    assert (task.name, len(task.test), task.train, task.scorer) == ("CB", 5, [], "accuracy")
    assert task.labels == labels and "Option: entailment" in task.test[0].messages[0]["content"]
    assert [f.check for f in task.hygiene] == ["labels_outside_set"]


def test_benchmark_specs_must_name_benchmark_and_task():
    with pytest.raises(RetainError, match="benchmark:<benchmark>/<task>"):
        load_stream(_config(["benchmark:olora"]))


# --- general retention -----------------------------------------------------------------------------------


def test_general_retention_by_hand():
    matrix = [[0.8, 0.4], [0.5, 0.6], [0.7, 0.2]]
    result = general_retention(matrix, ["a", "b"])
    a, b, mean = result["tasks"]["a"], result["tasks"]["b"], result["mean"]
    assert a == pytest.approx(
        {"before": 0.8, "last": 0.7, "drop": 0.1, "worst": 0.5, "worst_row": 1, "max_drop": 0.3}
    )
    assert b == pytest.approx(
        {"before": 0.4, "last": 0.2, "drop": 0.2, "worst": 0.2, "worst_row": 2, "max_drop": 0.2}
    )
    # Mean per row: 0.6, 0.55, 0.45.
    assert mean == pytest.approx(
        {"before": 0.6, "last": 0.45, "drop": 0.15, "worst": 0.45, "worst_row": 2, "max_drop": 0.15}
    )


def test_general_retention_with_rows_missing_and_bad_input():
    partial = general_retention([None, [0.5], None])
    assert partial["tasks"]["task1"] == {
        "before": None,
        "last": None,
        "drop": None,
        "worst": 0.5,
        "worst_row": 1,
        "max_drop": None,
    }
    with pytest.raises(RetainError, match=r"general matrix row 1, column 0: 75 is not in \[0, 1\]"):
        general_retention([[0.5], [75]])
    with pytest.raises(RetainError, match="1 task name"):
        general_retention([[0.5, 0.5], [0.5, 0.5]], ["a"])
