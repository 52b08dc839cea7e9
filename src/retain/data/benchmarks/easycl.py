"""EasyCL's benchmark layout, read unchanged: `<benchmark_dir>/<NAME>/benchmark_info.json` names the task
orders, and the LLaMA-Factory `dataset_info.json` beside it names each task's files: `<task>` (train),
`<task>_test` and `<task>_dev`, with paths relative to that folder.

    benchmark/LNT/benchmark_info.json   {"LNT": {"description": ..., "orders": {"order1": [...], ...}}}
    benchmark/LNT/dataset_info.json     {"CB": {"file_name": "CB/CB_train.json", ...}, "CB_test": ...}

The built-in definitions carry EasyCL's published orders, so `retain benchmarks` can list them before the
data is downloaded; when the folder holds a benchmark_info.json, its orders are the ones used. Any other
benchmark in this layout works by name too (`benchmark=MyBench benchmark_dir=...`).
"""

from __future__ import annotations

import functools
import os

from retain.data.benchmarks import olora
from retain.data.benchmarks.base import Benchmark, BenchmarkTask
from retain.data.dataset_info import DATASET_INFO, load_examples, read_json
from retain.errors import RetainError

BENCHMARK_INFO = "benchmark_info.json"

# EasyCL's benchmark/*/benchmark_info.json (ECNU-ICALK/EasyCL @ cbc5bea, 2025-07-03).
_ABSACL = [
    "ApexAD2600Progressive", "CanonG3", "CanonPowerShotSD500", "CanonS100", "Computer",
    "CreativeLabsNomadJukeboxZenXtra40GB", "DiaperChamp", "HitachiRouter", "LinksysRouter", "MicroMP3",
    "NikonCoolpix4300", "Nokia6600", "Nokia6610", "Norton", "Router", "Speaker", "ipod", "laptop", "rest",
]  # fmt: skip
BUILTIN_ORDERS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "ABSACL_ATSC": (
        "aspect-based sentiment classification, 19 product-review domains (EasyCL)",
        {
            "order1": _ABSACL,
            "order2": _ABSACL[10:19] + _ABSACL[0:10],
            "order3": _ABSACL[10:12] + _ABSACL[17:19] + _ABSACL[0:5] + _ABSACL[12:17] + _ABSACL[5:10],
        },
    ),
    "LNT": (
        "large number of tasks: 15 classification and NLI datasets (EasyCL's copy of O-LoRA's long sequence)",
        # EasyCL's LNT orders 1-3 are O-LoRA's long-sequence orders 4-6.
        {f"order{i}": olora.ORDERS[f"order{i + 3}"] for i in (1, 2, 3)},
    ),
    "LFPT5": (
        "4 text-classification datasets (EasyCL's copy of O-LoRA's standard benchmark)",
        {f"order{i}": olora.ORDERS[f"order{i}"] for i in (1, 2, 3)},
    ),
}


def benchmark_folder(root: str, name: str) -> str:
    """The folder holding NAME's benchmark_info.json: `<root>/<name>`, or root itself."""
    nested = os.path.join(root, name)
    if os.path.isfile(os.path.join(nested, BENCHMARK_INFO)) or os.path.isdir(nested):
        return nested
    return root


def read_orders(root: str, name: str) -> tuple[str, dict[str, list[str]]] | None:
    """(description, orders) from the folder's benchmark_info.json, or None when there is no such file."""
    path = os.path.join(benchmark_folder(root, name), BENCHMARK_INFO)
    if not os.path.isfile(path):
        return None
    info = read_json(path)
    entry = info.get(name) if isinstance(info, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("orders"), dict) or not entry["orders"]:
        known = ", ".join(info) if isinstance(info, dict) else "nothing"
        raise RetainError(
            f'{path}: expected {{"{name}": {{"orders": {{"order1": [task, ...]}}}}}}; '
            f"the file defines {known}"
        )
    for order, tasks in entry["orders"].items():
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise RetainError(f"{path}: {name}.orders.{order} must be a list of task names")
    return str(entry.get("description", "")), {k: list(v) for k, v in entry["orders"].items()}


def locate(name: str, root: str) -> dict[str, BenchmarkTask]:
    """Every task of `name` under `root`, with the files its dataset_info.json entries point to."""
    folder = benchmark_folder(root, name)
    info_path = os.path.join(folder, DATASET_INFO)
    if not os.path.isfile(info_path):
        return {}
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise RetainError(f"{info_path}: expected an object mapping dataset names to entries")
    tasks = {}
    for entry, spec in info.items():
        split = spec.get("split", "train") if isinstance(spec, dict) else "train"
        if split != "train" or not isinstance(spec, dict) or "file_name" not in spec:
            continue
        files = {"train": os.path.join(folder, spec["file_name"])}
        for other in ("test", "dev"):
            other_spec = info.get(f"{entry}_{other}")
            if isinstance(other_spec, dict) and "file_name" in other_spec:
                files[other] = os.path.join(folder, other_spec["file_name"])
            else:
                files[other] = os.path.join(folder, f"{entry}_{other} (no entry in {DATASET_INFO})")
        entries = {"train": entry, "test": f"{entry}_test", "dev": f"{entry}_dev"}
        by_path = {path: entries[split] for split, path in files.items()}
        tasks[entry] = BenchmarkTask(
            name=entry,
            files=files,
            read=lambda path, by_path=by_path, folder=folder: load_examples(by_path[path], folder),
        )
    return tasks


def make_benchmark(name: str, root: str | None) -> Benchmark | None:
    """The EasyCL benchmark `name`: built in, or found as `<root>/<name>/benchmark_info.json`."""
    found = read_orders(root, name) if root else None
    if found is None and name not in BUILTIN_ORDERS:
        return None
    description, orders = found or BUILTIN_ORDERS[name]
    return Benchmark(
        name=name,
        layout="easycl",
        description=description or BUILTIN_ORDERS.get(name, ("",))[0],
        orders=orders,
        expected=f"{name}/{BENCHMARK_INFO} + {name}/{DATASET_INFO}",
        locate=functools.partial(locate, name),
    )
