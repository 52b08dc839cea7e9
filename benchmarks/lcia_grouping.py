"""LCIA's grouping and routing on a stream, without training: which group each task joins, which tasks
retrain a group with DEMA, and how many test instances are routed to their own task's group.

Grouping and routing depend only on the prompts, so the decisions are taken exactly as in a run (the
method's before_task / after_task / eval_routes) on a tiny random model, in seconds. Give `retain run`'s
config and overrides:

    .venv/bin/python benchmarks/lcia_grouping.py examples/lcia.yaml
    .venv/bin/python benchmarks/lcia_grouping.py examples/study_lnt.yaml method.name=lcia \\
        benchmark_dir=../shared/data/easycl_benchmarks/benchmark
    .venv/bin/python benchmarks/lcia_grouping.py examples/study_lnt.yaml method.name=lcia \\
        benchmark_dir=../shared/data/easycl_benchmarks/benchmark 'tasks=[SST-2,agnews,IMDB]' \\
        method.template=masked method.aggregate=mean      # the reference's rule, for comparison
    .venv/bin/python benchmarks/lcia_grouping.py examples/lcia.yaml benchmark=CoIN benchmark_dir=<CoIN>

Without a config, `--coin-fixture DIR` writes the tests' CoIN-format folder (tests/coin_fixture.py: all
eight tasks with CoIN-style prompts, `--train-size` training records each) into DIR and reports on it:

    .venv/bin/python benchmarks/lcia_grouping.py --coin-fixture /tmp/coin --train-size 10
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import write_json  # noqa: E402

from retain.config import RunConfig, config_from_dict, load_config  # noqa: E402
from retain.data.streams import load_stream  # noqa: E402
from retain.methods.base import MethodContext  # noqa: E402
from retain.methods.registry import create_method  # noqa: E402
from retain.models.adapters import apply_finetuning  # noqa: E402
from retain.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402


def coin_fixture_config(folder: str, train_size: int, overrides: list[str]) -> RunConfig:
    """LCIA on the tests' CoIN-format folder, written into `folder`."""
    sys.path.insert(0, os.path.dirname(HERE))
    from tests.coin_fixture import coin_fixture

    coin_fixture(folder, train_size=train_size)
    raw = {"stream": {"benchmark": "CoIN", "benchmark_dir": folder}, "method": {"name": "lcia"}}
    return config_from_dict(raw, overrides=overrides)


def grouping_report(config: RunConfig, source: str, overrides: list[str]) -> dict:
    config.model.finetuning_type = "lora"
    method = create_method(config.method.name, config.method.params)
    if method.name != "lcia":
        raise SystemExit(f"{source}: method is '{method.name}'; add method.name=lcia")
    tasks = load_stream(config).tasks
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    ctx = MethodContext.create(model, tokenizer, config, tasks)
    for index, task in enumerate(tasks, 1):
        ctx.task_index = index
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)
    group_of = {name: g["adapter"] for g in method.groups for name in g["tasks"]}
    routing = {}
    for task in tasks:
        routes = method.eval_routes(ctx, task)
        routing[task.name] = sum(r == group_of[task.name] for r in routes) / len(routes)
    return {
        "config": source,
        "overrides": overrides,
        "settings": {
            k: getattr(method.config, k) for k in ("template", "aggregate", "threshold", "similarity")
        },
        "groups": [{"adapter": g["adapter"], "tasks": g["tasks"]} for g in method.groups],
        "tasks": [
            {
                "task": r["task"],
                "group": r["group"],
                "new_group": r["new_group"],
                "dema": r["dema"],
                "scores": r["scores"],
                "templates": r["templates"],
            }
            for r in method.history
        ],
        "routing_accuracy": routing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="retain run's config (not with --coin-fixture)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--coin-fixture", metavar="DIR", help="write the tests' CoIN-format folder here")
    parser.add_argument("--train-size", type=int, default=10, help="--coin-fixture: training records")
    parser.add_argument("--name", default="lcia_grouping", help="benchmarks/out/<name>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.coin_fixture:
        overrides = ([args.config] if args.config else []) + args.overrides
        config = coin_fixture_config(args.coin_fixture, args.train_size, overrides)
        report = grouping_report(config, f"--coin-fixture {args.coin_fixture}", overrides)
    elif args.config:
        report = grouping_report(load_config(args.config, args.overrides), args.config, args.overrides)
    else:
        parser.error("give a config or --coin-fixture DIR")
    print(f"settings: {report['settings']}")
    for record in report["tasks"]:
        decision = (
            "new group"
            if record["new_group"]
            else "retrains the group (DEMA)"
            if record["dema"]
            else "retrains"
        )
        print(f"  {record['task']:>16} -> group {record['group']} ({decision}); scores {record['scores']}")
        print(f"  {'':>16}    templates {record['templates']}")
    print(f"groups: {len(report['groups'])}: " + "; ".join(", ".join(g["tasks"]) for g in report["groups"]))
    mean = sum(report["routing_accuracy"].values()) / len(report["routing_accuracy"])
    print(
        "routing accuracy (test instances sent to their own task's group): "
        + ", ".join(f"{t} {a:.0%}" for t, a in report["routing_accuracy"].items())
        + f"; mean {mean:.0%}"
    )
    print(f"written: {write_json(args.name, report)}")


if __name__ == "__main__":
    main()
