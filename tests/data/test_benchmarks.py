"""Benchmark layouts (EasyCL, O-LoRA, TRACE) on fixture files written here, and on ../shared/data if there."""

from __future__ import annotations

import json
import os

import pytest

from retain.config import config_from_dict
from retain.data.benchmarks import easycl, find_benchmark, olora, select_tasks
from retain.data.streams import load_stream
from retain.errors import RetainError

from ..helpers import SHARED_DATA, retain, write_config

SHARED = os.path.join(SHARED_DATA, "easycl_benchmarks", "benchmark")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(SHARED), reason="../shared/data/easycl_benchmarks is not beside the repository"
)


def _write(path, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


def _alpaca(n: int, labels: list[str], offset: int = 0, options: bool = True) -> list[dict]:
    instruction = "Classify the sentiment." + (f"\nOption: {', '.join(labels)}" if options else "")
    return [
        {
            "instruction": instruction,
            "input": f"review number {i + offset}",
            "output": labels[i % len(labels)],
        }
        for i in range(n)
    ]


def easycl_fixture(root, name: str = "MINI", dev_equals_test: bool = True, missing_test: str = "") -> str:
    """An EasyCL benchmark folder: <root>/<name>/{benchmark_info,dataset_info}.json plus task files."""
    folder = os.path.join(root, name)
    tasks = ["alpha", "beta", "gamma"]
    _write(
        os.path.join(folder, "benchmark_info.json"),
        {name: {"description": "fixture", "orders": {"order1": tasks, "order2": tasks[::-1]}}},
    )
    info = {}
    for k, task in enumerate(tasks):
        labels = ["good", "bad"] if k != 2 else ["x", "y", "z"]
        test = _alpaca(6, labels, offset=1000)
        files = {"train": _alpaca(30, labels), "test": test, "dev": test if dev_equals_test else test[:3]}
        for split, records in files.items():
            entry = task if split == "train" else f"{task}_{split}"
            info[entry] = {"file_name": f"{task}/{task}_{split}.json", "formatting": "alpaca", "split": split}
            if not (split == "test" and task == missing_test):
                _write(os.path.join(folder, task, f"{task}_{split}.json"), records)
    _write(os.path.join(folder, "dataset_info.json"), info)
    return str(root)


def olora_fixture(root) -> str:
    """O-LoRA's CL_Benchmark/<category>/<task>/{train,dev,test,labels}.json for two tasks."""
    for task, category, labels in (("CB", "NLI", ["entailment", "contradiction", "neutral"]),
                                   ("COPA", "COPA", ["A", "B"])):  # fmt: skip
        folder = os.path.join(root, category, task)
        rows = [
            {"sentence": f"sentence 1: s{i}\nsentence 2: t{i}", "label": labels[i % len(labels)]}
            for i in range(12)
        ]
        _write(os.path.join(folder, "train.json"), rows)
        _write(os.path.join(folder, "test.json"), rows[:4] + [{"sentence": "odd one", "label": "maybe"}])
        _write(os.path.join(folder, "labels.json"), labels)
    return str(root)


def trace_fixture(root) -> str:
    for task in ("C-STANCE", "FOMC"):
        for split in ("train", "eval", "test"):
            rows = [{"prompt": f"{task} question {i}? Answer:", "answer": "ABC"[i % 3]} for i in range(9)]
            _write(os.path.join(root, task, f"{split}.json"), rows)
    return str(root)


def _config(**stream) -> object:
    return config_from_dict({"model": {"name_or_path": "tiny-random"}, "stream": stream})


def test_easycl_layout_reads_orders_files_and_labels(tmp_path):
    root = easycl_fixture(tmp_path)
    stream = load_stream(_config(benchmark="MINI", benchmark_dir=root, benchmark_order="order2", max_tasks=2))
    assert [t.name for t in stream.tasks] == ["gamma", "beta"]
    gamma = stream.tasks[0]
    assert gamma.labels == ["x", "y", "z"] and gamma.scorer == "accuracy"
    assert (len(gamma.train), len(gamma.test)) == (30, 6)
    assert gamma.test[0].reference == "x" and "review number 1000" in gamma.test[0].messages[0]["content"]
    assert stream.benchmark["order"] == "order2" and stream.benchmark["layout"] == "easycl"


def test_dev_equal_to_test_is_reported(tmp_path):
    stream = load_stream(_config(benchmark="MINI", benchmark_dir=easycl_fixture(tmp_path), max_tasks=1))
    checks = {f.check: f for f in stream.tasks[0].hygiene}
    assert "dev_equals_test" in checks and checks["dev_equals_test"].count == 6
    clean = load_stream(
        _config(
            benchmark="MINI", benchmark_dir=easycl_fixture(tmp_path / "b", dev_equals_test=False), max_tasks=1
        )
    )
    assert not [f for f in clean.tasks[0].hygiene if f.check == "dev_equals_test"]


def test_tasks_selection_keeps_the_order_and_rejects_unknown_names(tmp_path):
    root = easycl_fixture(tmp_path)
    stream = load_stream(_config(benchmark="MINI", benchmark_dir=root, tasks=["gamma", "alpha"]))
    assert [t.name for t in stream.tasks] == ["alpha", "gamma"]
    with pytest.raises(RetainError, match="not in MINI order1.*did you mean: alpha"):
        load_stream(_config(benchmark="MINI", benchmark_dir=root, tasks=["alpah"]))
    with pytest.raises(RetainError, match="no order 'order9'.*order1, order2"):
        load_stream(_config(benchmark="MINI", benchmark_dir=root, benchmark_order="order9"))


def test_missing_files_are_reported_before_training_or_dropped_with_allow_missing(tmp_path):
    root = easycl_fixture(tmp_path, missing_test="beta")
    with pytest.raises(RetainError) as error:
        load_stream(_config(benchmark="MINI", benchmark_dir=root))
    message = str(error.value)
    assert "beta" in message and "beta_test.json" in message and "allow_missing=true" in message
    stream = load_stream(_config(benchmark="MINI", benchmark_dir=root, allow_missing=True))
    assert [t.name for t in stream.tasks] == ["alpha", "gamma"]
    assert len(stream.warnings) == 1 and "beta" in stream.warnings[0]


def test_unknown_benchmark_and_missing_dir_are_clear_errors(tmp_path):
    with pytest.raises(RetainError, match="unknown benchmark 'LTN'.*did you mean: LNT"):
        load_stream(_config(benchmark="LTN", benchmark_dir=str(tmp_path)))
    with pytest.raises(RetainError, match="needs benchmark_dir"):
        load_stream(_config(benchmark="olora"))
    with pytest.raises(RetainError, match="is not a folder"):
        load_stream(_config(benchmark="olora", benchmark_dir=str(tmp_path / "nope")))


def test_olora_layout_uses_the_exact_prompt_and_label_set(tmp_path):
    root = olora_fixture(tmp_path)
    stream = load_stream(
        _config(benchmark="olora", benchmark_dir=root, benchmark_order="order4", tasks=["CB", "COPA"])
    )
    cb, copa = stream.tasks
    assert cb.labels == ["entailment", "contradiction", "neutral"]
    assert cb.train[0].messages[0]["content"] == (
        "Task:NLI\nDataset:CB\n"
        'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
        "Choose one from the option.\nOption: entailment, contradiction, neutral \n"
        "sentence 1: s0\nsentence 2: t0\nAnswer:"
    )
    assert (
        copa.train[0].messages[0]["content"]
        == "Task:COPA\nDataset:COPA\nsentence 1: s0\nsentence 2: t0\nAnswer:"
    )
    outside = [f for f in cb.hygiene if f.check == "labels_outside_set"]
    assert outside and outside[0].count == 1 and "maybe" in outside[0].message
    leaked = [f for f in cb.hygiene if f.check == "test_in_train"]
    assert leaked and leaked[0].count == 4


def test_olora_orders_match_the_papers():
    benchmark = find_benchmark("olora", "")
    assert benchmark.orders["order1"] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert [len(o) for o in benchmark.orders.values()] == [4, 4, 4, 15, 15, 15]
    assert all(sorted(benchmark.orders[f"order{i}"]) == sorted(olora.CATEGORIES) for i in (4, 5, 6))


def test_trace_layout_and_scorers(tmp_path):
    root = trace_fixture(tmp_path)
    stream = load_stream(_config(benchmark="TRACE", benchmark_dir=root, max_tasks=2, train_size=5))
    assert [t.name for t in stream.tasks] == ["C-STANCE", "FOMC"]
    assert stream.tasks[0].train[0].messages[1]["content"] in "ABC" and len(stream.tasks[0].train) == 5
    assert {f.check for f in stream.tasks[0].hygiene} >= {"dev_equals_test", "test_in_train"}
    benchmark = find_benchmark("TRACE", root)
    located = benchmark.locate(root)
    assert located["Py150"].scorer == "edit_sim" and located["20Minuten"].scorer == "sari"
    assert located["MeetingBank"].scorer == "rouge_l"


def test_train_and_test_sizes_subsample_deterministically(tmp_path):
    root = easycl_fixture(tmp_path)
    a = load_stream(_config(benchmark="MINI", benchmark_dir=root, train_size=7, test_size=3, max_tasks=1))
    b = load_stream(_config(benchmark="MINI", benchmark_dir=root, train_size=7, test_size=3, max_tasks=1))
    assert len(a.tasks[0].train) == 7 and len(a.tasks[0].test) == 3
    assert [e.messages for e in a.tasks[0].train] == [e.messages for e in b.tasks[0].train]


def test_select_tasks_max_tasks():
    benchmark = find_benchmark("LNT", "")
    assert select_tasks(benchmark, "", [], 4) == ["MNLI", "CB", "WiC", "COPA"]


@needs_shared
def test_builtin_easycl_orders_equal_the_shipped_benchmark_info():
    for name in easycl.BUILTIN_ORDERS:
        assert easycl.read_orders(SHARED, name)[1] == easycl.BUILTIN_ORDERS[name][1]


@needs_shared
def test_shared_lnt_slice_loads_and_reports_dev_equals_test():
    stream = load_stream(
        _config(benchmark="LNT", benchmark_dir=SHARED, max_tasks=4, train_size=50, test_size=10)
    )
    assert [t.name for t in stream.tasks] == ["MNLI", "CB", "WiC", "COPA"]
    assert all(any(f.check == "dev_equals_test" for f in t.hygiene) for t in stream.tasks)
    assert stream.tasks[1].labels == ["entailment", "contradiction", "neutral"]
    # MNLI's test file holds unlabeled examples ('-'): outside the label set its instruction declares.
    assert any(f.check == "labels_outside_set" and "'-'" in f.message for f in stream.tasks[0].hygiene)


@needs_shared
def test_shared_lnt_order2_misses_multirc_test_file():
    with pytest.raises(RetainError, match="MultiRC.*MultiRC_test.json"):
        load_stream(_config(benchmark="LNT", benchmark_dir=SHARED, benchmark_order="order2", max_tasks=2))


def test_benchmark_run_end_to_end_reports_benchmark_checks_and_compares(tmp_path):
    """`retain run` on a fixture benchmark, then `retain compare` over two runs built from results.json."""
    root = easycl_fixture(tmp_path / "data")
    config = write_config(tmp_path, stream={"train_size": 8, "test_size": 4, "tasks": []})
    dry = retain("run", config, "benchmark=MINI", f"benchmark_dir={root}", "max_tasks=2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "benchmark MINI (easycl), order1" in dry.stdout and "dev split is identical" in dry.stdout
    done = retain("run", config, "benchmark=MINI", f"benchmark_dir={root}", "max_tasks=2", "eval.mode=rank")
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks"] == ["alpha", "beta"] and results["benchmark"]["name"] == "MINI"
    assert results["eval_mode"] == {"alpha": "rank", "beta": "rank"}
    assert {f["check"] for f in results["data_checks"]["findings"]} == {"dev_equals_test"}
    report = (run_dir / "report.md").read_text()
    assert "## Benchmark" in report and "## Data checks" in report and "log-likelihood" in report

    other = tmp_path / "other"
    other.mkdir()
    worse = dict(results, method="replay", matrix=[[0, 0], [0.5, 0], [0.25, 0.5]], timings={"train_s/1": 2.0})
    (other / "results.json").write_text(json.dumps(worse))
    table = retain(
        "compare", str(run_dir), str(other), "--sort", "forgetting", "--output", str(tmp_path / "t.md")
    )
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2 and (tmp_path / "t.md").read_text() == table.stdout
    forgetting = [float(r.split("|")[8]) for r in rows]
    assert forgetting == sorted(forgetting)
    replay_row = next(r for r in rows if "| replay |" in r)
    # Metrics come from the matrix: R = [[0,0],[.5,0],[.25,.5]] -> Last 37.5, BWT -25.0, forgetting 25.0.
    assert "| 37.5 |" in replay_row and "| -25.0 |" in replay_row and replay_row.rstrip().endswith("| 2 |")
    (tmp_path / "run.log").write_text("a log, not a run")
    globbed = retain("compare", str(run_dir), str(tmp_path / "run.log"))
    assert globbed.returncode == 0 and "skipped 1 file" in globbed.stderr and "| run |" in globbed.stdout
    bad = retain("compare", str(run_dir), "--sort", "lst")
    assert bad.returncode == 2 and "did you mean: last" in bad.stderr


def test_benchmarks_command_lists_definitions_and_present_files(tmp_path):
    root = easycl_fixture(tmp_path, missing_test="beta")
    listed = retain("benchmarks", "MINI", "--dir", root)
    assert listed.returncode == 0, listed.stderr
    assert "2/3 complete" in listed.stdout and "beta" in listed.stdout
    assert "order2: gamma -> beta -> alpha" in listed.stdout
    everything = retain("benchmarks")
    assert all(name in everything.stdout for name in ("ABSACL_ATSC", "LNT", "LFPT5", "olora", "TRACE"))


def test_hygiene_counts_duplicates_and_unseen_labels():
    from retain.data.formats import Example
    from retain.data.hygiene import check_task

    def ex(q: str, a: str) -> Example:
        return Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}])

    train = [ex("a", "pos"), ex("a", "pos"), ex("b", "neg"), ex("c", "neg")]
    test = [ex("d", "neutral"), ex("e", "pos"), ex("e", "pos")]
    findings = {
        f.check: f for f in check_task("t", train, test, labels=["neg", "pos"], labels_declared=False)
    }
    assert findings.keys() == {"duplicates", "unseen_test_labels"}
    assert findings["unseen_test_labels"].count == 1 and "neutral" in findings["unseen_test_labels"].message
    duplicates = [f for f in check_task("t", train, test) if f.check == "duplicates"]
    assert [f.count for f in duplicates] == [1, 1]
    assert check_task("t", train[2:], test[:2], labels=["neg", "pos", "neutral"]) == []


def test_malformed_layout_records_name_the_file_and_the_fields(tmp_path):
    root = olora_fixture(tmp_path)
    _write(os.path.join(root, "NLI", "CB", "train.json"), [{"text": "no sentence"}])
    with pytest.raises(RetainError, match=r'CB/train.json: record 0 needs "sentence" and "label"'):
        load_stream(_config(benchmark="olora", benchmark_dir=root, benchmark_order="order4", tasks=["CB"]))
