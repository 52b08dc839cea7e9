"""Per-step training overhead of each continual-learning method against `sequential`, in one run.

Every method trains the same stream (synthetic tasks, the same batches) through retain's own loop:
tasks 1..t-1 for a few warm-up steps each (so the method has state: previous adapters, a Fisher, a
memory), then task t for `--steps` steps, whose mean step time (the Trainer's train_runtime / steps)
is compared with `sequential`'s at the same task. Methods are measured in alternating rounds and the
median of the rounds is reported, to damp noise from the shared machine.

    .venv/bin/python benchmarks/method_overhead.py --methods ewc lwf replay --task 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine, median, print_table, write_json  # noqa: E402

from retain.config import config_from_dict  # noqa: E402
from retain.engine.loop import Experiment, make_plan  # noqa: E402
from retain.engine.run_dir import RunDir  # noqa: E402
from retain.methods.registry import available  # noqa: E402


def step_seconds(
    model: str,
    method: str,
    task: int,
    steps: int,
    warm_steps: int,
    folder: str,
    params: dict | None = None,
    finetuning_type: str = "lora",
) -> float:
    """Mean seconds per optimizer step of `method` while training task `task`."""
    raw = {
        "model": {
            "name_or_path": model,
            "finetuning_type": finetuning_type,
            "lora_rank": 8,
            "lora_alpha": 16,
        },
        "stream": {
            "train_size": 8 * max(steps, warm_steps),
            "test_size": 4,
            "system": "Answer briefly.",
            "tasks": [
                "synthetic:parity",
                "synthetic:capital_letters",
                "synthetic:max_number",
                "synthetic:reverse",
            ][: max(task, 1)],
        },
        "method": {"name": method, **(params or {})},
        "train": {
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 8,
            "cutoff_len": 128,
            "logging_steps": 1000,
        },
        "output_dir": os.path.join(folder, method),
    }
    config = config_from_dict(raw)
    plan = make_plan(config)
    experiment = Experiment(plan, RunDir(config.output_dir))
    for index in range(1, len(plan.train_units) + 1):
        config.train.max_steps = steps if index == len(plan.train_units) else warm_steps
        _, log = experiment.train_unit(index)
    runtime = next(entry["train_runtime"] for entry in reversed(log) if "train_runtime" in entry)
    return runtime / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="*", help="methods to compare with sequential (default: all)")
    parser.add_argument("--task", type=int, default=3, help="measure while training this task (1-based)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warm-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default="method_overhead")
    parser.add_argument(
        "--finetuning-type", default="lora", choices=["lora", "full"], help="every side, sequential included"
    )
    parser.add_argument(
        "--method-params",
        default="{}",
        help='JSON settings per method, e.g. \'{"lcia": {"grouping": false}}\' (DEMA on every later task)',
    )
    args = parser.parse_args()

    methods = args.methods or [
        m for m in available() if m not in ("sequential", "multitask") and not m.startswith("_")
    ]
    times: dict[str, list[float]] = {m: [] for m in ["sequential", *methods]}
    settings = json.loads(args.method_params)
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            for method in times:
                seconds = step_seconds(
                    args.model,
                    method,
                    args.task,
                    args.steps,
                    args.warm_steps,
                    os.path.join(folder, str(round_index)),
                    settings.get(method),
                    args.finetuning_type,
                )
                times[method].append(seconds)
                print(f"  round {round_index + 1} {method:12s} {seconds:.3f} s/step", flush=True)
    base = median(times["sequential"])
    rows = {m: {"seconds_per_step": median(t), "ratio": median(t) / base} for m, t in times.items()}
    print(
        f"\nper-step time at task {args.task} vs sequential ({args.model}, {args.finetuning_type}, batch 8, "
        f"{args.steps} steps)"
    )
    print_table(
        [("method", "s/step", "ratio vs sequential")]
        + [(m, f"{r['seconds_per_step']:.3f}", f"{r['ratio']:.2f}") for m, r in rows.items()]
    )
    path = write_json(
        args.output,
        {
            "model": args.model,
            "finetuning_type": args.finetuning_type,
            "task": args.task,
            "steps": args.steps,
            "methods": rows,
            "raw": times,
            "method_params": settings,
            "machine": machine(),
        },
    )
    print(f"wrote {path}")
    print(json.dumps({m: round(r["ratio"], 3) for m, r in rows.items()}))


if __name__ == "__main__":
    main()
