"""TRACE's layout (Wang et al., "TRACE: A Comprehensive Benchmark for Continual Learning in Large Language
Models", 2023; github BeyonderXX/TRACE): one folder per task, each with `train.json`, `eval.json` and
`test.json`, every record `{"prompt": ..., "answer": ...}` (the prompt already holds the task's
instruction). `benchmark_dir` is the folder holding the task folders (e.g. LLM-CL-Benchmark_5000).

Each task is scored with the metric TRACE reports for it: accuracy for C-STANCE, FOMC, ScienceQA and the
two NumGLUE tasks, ROUGE-L for MeetingBank, edit similarity for Py150 and SARI for 20Minuten.
"""

from __future__ import annotations

import os

from retain.data.benchmarks.base import Benchmark, BenchmarkTask, read_pairs, single_benchmark
from retain.data.formats import Example

SCORERS = {
    "C-STANCE": "accuracy",
    "FOMC": "accuracy",
    "MeetingBank": "rouge_l",
    "Py150": "edit_sim",
    "ScienceQA": "accuracy",
    "NumGLUE-cm": "accuracy",
    "NumGLUE-ds": "accuracy",
    "20Minuten": "sari",
}
# The order of the TRACE paper's main experiments.
ORDERS = {"order1": list(SCORERS)}


def read_split(task: str, path: str) -> list[Example]:
    return read_pairs(path, task, ("prompt", "answer"), "TRACE")


def locate(root: str) -> dict[str, BenchmarkTask]:
    tasks = {}
    for task, scorer in SCORERS.items():
        folder = os.path.join(root, task)
        tasks[task] = BenchmarkTask(
            name=task,
            files={
                "train": os.path.join(folder, "train.json"),
                "dev": os.path.join(folder, "eval.json"),
                "test": os.path.join(folder, "test.json"),
            },
            read=lambda path, task=task: read_split(task, path),
            scorer=scorer,
        )
    return tasks


# The layout holds one benchmark, so it answers to that name only.
make_benchmark = single_benchmark(
    Benchmark(
        name="TRACE",
        layout="trace",
        description="TRACE: 8 tasks (stance, finance, summarization, code, science QA, math, simplification)",
        orders=ORDERS,
        expected="<task>/{train,eval,test}.json (e.g. TRACE's LLM-CL-Benchmark_5000 folder)",
        locate=locate,
    )
)
