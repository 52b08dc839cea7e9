"""O-LoRA's `CL_Benchmark` layout (Wang et al., EMNLP Findings 2023; github cmnfriend/O-LoRA), with its
exact prompt format and label sets: the "standard" benchmark (orders 1-3, 4 tasks) and the "long
sequence" benchmark (orders 4-6, 15 tasks; orders 4 and 5 come from the MIGU repository, order 6 is
O-LoRA's long.sh).

    CL_Benchmark/<category>/<task>/{train,dev,test,labels}.json
    train.json: [{"sentence": "...", "label": "..."}, ...]     labels.json: ["World", "Sports", ...]

The model input is the one O-LoRA's scripts build (add_task_name, add_dataset_name, single instruction):
`Task:{category}\\nDataset:{task}\\n{instruction}Option: {labels} \\n{sentence}\\nAnswer:` (note the space
before the newline after the options); COPA's sentence already holds its question and options, so its
input is `Task:COPA\\nDataset:COPA\\n{sentence}\\nAnswer:`. The target is the label string.
"""

from __future__ import annotations

import os

from retain.data.benchmarks.base import Benchmark, BenchmarkTask, read_pairs, single_benchmark
from retain.data.dataset_info import read_json
from retain.data.formats import Example
from retain.errors import RetainError

# O-LoRA configs/instruction_config.json, the "single" (first) zero-shot instruction of each category.
INSTRUCTIONS = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? "
    "Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
    "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
    "Choose one from the option.\n",
    "COPA": "",
}
CATEGORIES = {
    "agnews": "TC", "dbpedia": "TC", "yahoo": "TC",
    "amazon": "SC", "yelp": "SC", "IMDB": "SC", "SST-2": "SC",
    "MNLI": "NLI", "CB": "NLI", "RTE": "NLI",
    "QQP": "QQP", "BoolQA": "BoolQA", "COPA": "COPA", "MultiRC": "MultiRC", "WiC": "WiC",
}  # fmt: skip
ORDERS = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "order4": "MNLI CB WiC COPA QQP BoolQA RTE IMDB yelp amazon SST-2 dbpedia agnews MultiRC yahoo".split(),
    "order5": "MultiRC BoolQA WiC MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yelp amazon yahoo".split(),
    "order6": "yelp amazon MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yahoo MultiRC BoolQA WiC".split(),
}


def prompt(task: str, sentence: str, labels: list[str]) -> str:
    """O-LoRA's model input for one instance of `task`."""
    category = CATEGORIES[task]
    if category == "COPA":
        return f"Task:COPA\nDataset:{task}\n{sentence}\nAnswer:"
    return (
        f"Task:{category}\nDataset:{task}\n{INSTRUCTIONS[category]}Option: {', '.join(labels)} \n"
        f"{sentence}\nAnswer:"
    )


def read_labels(path: str) -> list[str]:
    labels = read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise RetainError(f"{path}: expected a non-empty JSON list of label strings")
    return labels


def read_split(task: str, labels_path: str, path: str) -> list[Example]:
    """One split file of `task` as chat examples with O-LoRA's prompt."""
    labels = read_labels(labels_path)
    return read_pairs(
        path, task, ("sentence", "label"), "O-LoRA CL_Benchmark", lambda s: prompt(task, s, labels)
    )


def locate(root: str) -> dict[str, BenchmarkTask]:
    tasks = {}
    for task, category in CATEGORIES.items():
        folder = os.path.join(root, category, task)
        files = {split: os.path.join(folder, f"{split}.json") for split in ("train", "dev", "test", "labels")}
        tasks[task] = BenchmarkTask(
            name=task,
            files=files,
            read=lambda path, task=task, labels=files["labels"]: read_split(task, labels, path),
            read_labels=lambda path=files["labels"]: read_labels(path),
            required=("train", "test", "labels"),
        )
    return tasks


# The layout holds one benchmark, so it answers to that name only.
make_benchmark = single_benchmark(
    Benchmark(
        name="olora",
        layout="olora",
        description="O-LoRA CL_Benchmark: standard (order1-3, 4 tasks), long sequence (order4-6, 15 tasks)",
        orders=ORDERS,
        expected="<category>/<task>/{train,dev,test,labels}.json (O-LoRA's CL_Benchmark folder)",
        locate=locate,
    )
)
