"""The `retain` command: run, train, eval, metrics, config, methods, benchmarks, compare, merge, lines,
export.

User mistakes (bad config, data or paths) print one `error:` line on stderr and exit with code 2, with
no traceback and without touching an existing run directory.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import sys
import warnings

from retain import __version__
from retain.errors import RetainError

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one `error:` line (usage included) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        usage = " ".join(self.format_usage().split())
        print(f"error: {message} ({usage}; {self.prog} -h for help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _writable_folder(path: str, what: str, fix: str) -> None:
    """Refuse a folder the run cannot be written to: a file in its place, or no write permission on
    it (or, when it does not exist yet, on the nearest folder above it that does)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RetainError(f"{what} {path} is a file, not a folder; {fix}")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RetainError(f"{what} {path} cannot be created: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in {existing})"
        raise RetainError(f"{what} {path} is not writable{where}: permission denied; {fix}")


# OSErrors that are about the user's paths (permissions, a file where a folder should be, a full or
# read-only disk), with what to do about each; any other OSError is a bug and keeps its traceback.
PATH_ERRORS = {
    errno.EACCES: "check the permissions of that path, or choose another output_dir",
    errno.EPERM: "check the permissions of that path, or choose another output_dir",
    errno.EROFS: "the file system is read-only; choose another output_dir",
    errno.ENOSPC: "the disk is full; free some space or choose another output_dir",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another output_dir",
    errno.EEXIST: "a file stands where a folder is needed; move it or choose another output_dir",
    errno.ENOTDIR: "a file stands where a folder is needed; move it or choose another output_dir",
    errno.EISDIR: "a folder stands where a file is needed; move it or choose another path",
}


def path_error_message(exc: OSError) -> str | None:
    """The one-line message for an OSError on a user's path, or None when it is not one (a bug)."""
    if exc.errno not in PATH_ERRORS or not exc.filename:
        return None
    path = os.path.abspath(os.fsdecode(exc.filename))
    return f"{path}: {exc.strerror or 'cannot access'}; {PATH_ERRORS[exc.errno]}"


def _console():
    from rich.console import Console

    return Console()


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("retain").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _load(args: argparse.Namespace):
    from retain.config import load_config

    return load_config(args.config, args.overrides)


def print_plan(plan) -> None:
    """The --dry-run output: tasks, method, sizes, output paths."""
    from rich.table import Table

    config = plan.config
    console = _console()
    console.print(
        f"[bold]model[/bold] {config.model.name_or_path} ({config.model.finetuning_type}"
        + (
            f", rank {config.model.lora_rank}, targets {config.model.lora_target})"
            if config.model.finetuning_type == "lora"
            else ")"
        )
    )
    settings = "; ".join(
        f"{c.name} {c.config}" if c.config is not None else c.name for c in plan.method.components
    )
    console.print(f"[bold]method[/bold] {settings}")
    console.print(f"[bold]strategy[/bold] {plan.strategy.describe()}")
    console.print(f"[bold]batch[/bold] {plan.batch.describe()}")
    if plan.batch.processes > 1 and config.train.global_batch_size is None:
        console.print(
            f"  note: {plan.batch.processes} processes make each step {plan.batch.processes}x larger "
            "than one process would; set train.global_batch_size to keep the step the same"
        )
    benchmark = plan.stream.benchmark if plan.stream else None
    if benchmark:
        console.print(
            f"[bold]benchmark[/bold] {benchmark['name']} ({benchmark['layout']}), {benchmark['order']}, "
            f"from {benchmark['dir']}"
        )
    table = Table(title="task stream")
    for column in ("#", "task", "train", "test", "scorer", "labels", "steps"):
        table.add_column(column)
    batch = plan.batch.global_batch
    for i, unit in enumerate(plan.train_units, 1):
        steps = (
            config.train.max_steps
            if config.train.max_steps > 0
            else math.ceil(len(unit.train) / batch * config.train.num_train_epochs)
        )
        tests = plan.tasks if plan.joint else [unit]
        table.add_row(
            str(i),
            unit.name,
            str(len(unit.train)),
            str(sum(len(t.test) for t in tests)),
            ", ".join(sorted({t.scorer for t in tests})),
            "-" if unit.labels is None else str(len(unit.labels)),
            str(steps),
        )
    console.print(table)
    if plan.eval_only:
        general = ", ".join(f"{t.name} ({len(t.test)} test, {t.scorer})" for t in plan.eval_only)
        console.print(f"[bold]eval only[/bold] (scored in every row, never trained): {general}")
    if config.eval.mode == "rank":
        ranked = [t.name for t in plan.tasks + plan.eval_only if t.labels]
        console.print(
            f"[bold]eval[/bold] rank mode (label log-likelihood) for: {', '.join(ranked) or 'none'}"
        )
    for warning in plan.stream.warnings if plan.stream else []:
        console.print(f"[yellow]warning[/yellow] {warning}")
    for task in plan.tasks + plan.eval_only:
        for finding in task.hygiene:
            console.print(f"[yellow]data check[/yellow] {task.name}: {finding.message}")
    memory = plan.memory()
    if memory is None:
        console.print("[bold]memory[/bold] not estimated: the built-in model is converted on its first run")
    else:
        for line in memory.describe():
            console.print(line, markup=False, highlight=False)
    out = os.path.abspath(config.output_dir)
    console.print(
        f"[bold]output[/bold] {out}/ (config.yaml, state.json, tasks/<k>-<task>/, eval/<k>/<task>.jsonl, "
        "results.json, report.md, accuracy_matrix.png)"
    )
    console.print("dry run: nothing was trained")


def cmd_run(args: argparse.Namespace, train: bool = True, evaluate: bool = True) -> int:
    from retain.engine.loop import make_plan, run_experiment

    config = _load(args)
    if getattr(args, "dry_run", False):
        print_plan(make_plan(config))
        return 0
    _writable_folder(
        config.output_dir, "output_dir", "choose another output_dir (output_dir=PATH on the command line)"
    )
    results = run_experiment(config, train=train, evaluate=evaluate)
    if results is not None and int(os.environ.get("RANK", "0")) == 0:
        from retain.evaluation.report import print_report

        print_report(results, _console())
        if results.get("adapters"):
            _console().print(f"adapters: {len(results['adapters'])} ({', '.join(results['adapters'])})")
        _console().print(f"run directory: {os.path.abspath(config.output_dir)}")
        _console().print(f"report: {os.path.abspath(os.path.join(config.output_dir, 'report.html'))}")
    elif results is None:
        _console().print(
            f"trained; checkpoints in {os.path.abspath(config.output_dir)}/tasks "
            f"(evaluate with: retain eval {config.output_dir})"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from retain.config import config_from_dict, read_yaml
    from retain.engine.loop import run_experiment
    from retain.evaluation.report import print_report

    if args.overrides:
        return _eval_with_overrides(args)
    config_file = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise RetainError(f"{args.run_dir} is not a retain run directory (no config.yaml)")
    raw = read_yaml(config_file)
    raw["output_dir"] = args.run_dir.replace("{", "{{").replace("}", "}}")  # a path, not a pattern
    config = config_from_dict(raw, source=config_file)
    # Evaluation writes eval/, state.json, results.json and report.md into the run directory.
    _writable_folder(
        args.run_dir, "run directory", "retain eval writes its results there: make it writable, or copy it"
    )
    results = run_experiment(config, train=False, evaluate=True)
    if results is not None and int(os.environ.get("RANK", "0")) == 0:
        print_report(results, _console())
    return 0


def _eval_label(overrides: list[str]) -> str:
    """A folder name for a set of eval.* overrides: `mode=rank,max_new_tokens=64`."""
    parts = [o.split("=", 1)[0].removeprefix("eval.") + "=" + o.split("=", 1)[1] for o in sorted(overrides)]
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", ",".join(parts))[:120]


def _eval_with_overrides(args: argparse.Namespace) -> int:
    """Every trained row again under other eval.* settings, into evals/<name>/ (the recorded rows stay)."""
    from retain.config import config_from_dict, config_to_dict, parse_overrides, read_yaml
    from retain.evaluation.report import build_results, print_report
    from retain.io import write_json_atomic

    changed = parse_overrides(args.overrides)
    others = sorted(k for k in changed if k != "eval")
    if others:
        raise RetainError(
            f"retain eval RUN_DIR takes only eval.* settings (got {', '.join(others)}): the others decide "
            "how the run trained and are fixed in its config.yaml; start a new run to change them"
        )
    config, folder, state = _open_run(args.run_dir)
    raw = read_yaml(folder.config_path)
    raw["output_dir"] = config.output_dir.replace("{", "{{").replace("}", "}}")
    config = config_from_dict(raw, source=folder.config_path, overrides=args.overrides)
    name = args.name or _eval_label(args.overrides)
    out = os.path.join(folder.path, "evals", name)
    _writable_folder(folder.path, "run directory", "retain eval writes evals/ there: make it writable")
    experiment = _experiment(config, folder)
    tasks = [t.name for t in experiment.plan.tasks]
    first = 0 if config.eval.before_training else 1
    matrix: list[list[float] | None] = [None] * (state.trained + 1)
    general: list[list[float] | None] = [None] * (state.trained + 1)
    _replace_folder(out)
    for row in range(first, state.trained + 1):
        experiment.restore(row)
        row_dir = os.path.join(out, "eval", str(row))
        matrix[row] = _evaluate_into(experiment, experiment.method, row, row_dir)
        if experiment.plan.eval_only:
            general[row] = _evaluate_into(experiment, experiment.method, row, row_dir, general=True)
    results = build_results(
        tasks,
        matrix,
        config.method.name,
        {},
        extra={
            "eval": config_to_dict(config)["eval"],
            "overrides": list(args.overrides),
            "run_dir": folder.path,
            **_general_results(experiment, general),
        },
        joint=experiment.plan.joint,
    )
    write_json_atomic(os.path.join(out, "results.json"), results)
    print_report(results, _console())
    _console().print(f"rows under {', '.join(args.overrides)}: {out} (the run's recorded rows are unchanged)")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from retain.evaluation.metrics import compute_metrics
    from retain.evaluation.report import load_matrix_file, print_report

    data = load_matrix_file(args.file)
    metrics = compute_metrics(data["matrix"], joint=bool(data.get("joint", False)))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print_report({**data, "metrics": metrics, "method": data.get("method", "?")}, _console())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`retain config [SECTION]`: each setting's key, type, default, help and LLaMA-Factory/EasyCL names."""
    from retain.config import config_reference

    print(config_reference(args.section), end="")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from retain.methods.registry import available, describe

    if args.strategies:
        from retain.methods.compat import table_markdown

        print(table_markdown(available()), end="")  # registered plugins too
        return 0

    table = Table(title="continual-learning methods")
    table.add_column("method", style="bold")
    table.add_column("summary")
    table.add_column("hyper-parameters (default)")
    for name, cls in available().items():
        params = "\n".join(f"{p}={d!r}  {h}" for p, d, h in describe(cls)) or "-"
        table.add_row(name, cls.summary, params)
    _console().print(table)
    return 0


def cmd_benchmarks(args: argparse.Namespace) -> int:
    from rich.table import Table

    from retain.data.benchmarks import BUILTIN, benchmark_dir, find_benchmark

    root = benchmark_dir(args.dir or "")
    console = _console()
    benchmarks = [find_benchmark(name, root) for name in args.names or BUILTIN]
    table = Table(
        title="benchmarks" + (f" (data: {root})" if root else " (no --dir / $RETAIN_BENCHMARK_DIR)")
    )
    for column in ("benchmark", "layout", "tasks", "orders", "expected under the data folder", "present"):
        table.add_column(column, overflow="fold")
    for benchmark in benchmarks:
        present = "-"
        if root and os.path.isdir(root):
            located = benchmark.locate(root)
            incomplete = [t for t in benchmark.task_names if t not in located or located[t].missing()]
            present = f"{len(benchmark.task_names) - len(incomplete)}/{len(benchmark.task_names)} complete"
            if incomplete:
                present += "; missing files: " + ", ".join(incomplete)
        table.add_row(
            benchmark.name,
            benchmark.layout,
            str(len(benchmark.task_names)),
            ", ".join(f"{order} ({len(tasks)})" for order, tasks in benchmark.orders.items()),
            benchmark.expected,
            present,
        )
    console.print(table)
    if args.names:
        for benchmark in benchmarks:
            console.print(f"[bold]{benchmark.name}[/bold]: {benchmark.description}")
            for order, tasks in benchmark.orders.items():
                console.print(f"  {order}: {' -> '.join(tasks)}")
    else:
        console.print("task orders: retain benchmarks NAME")
    console.print(
        "run: retain run CONFIG benchmark=NAME benchmark_order=order1 benchmark_dir=PATH "
        "[max_tasks=N | tasks=[a,b]]",
        markup=False,
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from retain.evaluation.compare import compare_markdown

    table = compare_markdown(args.run_dirs, sort=args.sort, group=args.group)
    if args.output:
        from retain.io import write_text_atomic

        write_text_atomic(args.output, table)
    print(table, end="")
    if args.html:
        from retain.evaluation.html_compare import write_compare_html

        path = write_compare_html(args.run_dirs, args.html, sort=args.sort)
        print(f"compare page: {os.path.abspath(path)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from retain.evaluation.html_report import write_html_report

    print(f"report: {os.path.abspath(write_html_report(args.run_dir))}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from retain.engine.sweep import describe, plan_sweep, run_sweep
    from retain.evaluation.compare import check_sort

    check_sort(args.sort)
    plan = plan_sweep(
        args.config,
        args.overrides,
        seeds=args.seeds,
        orders=args.orders,
        methods=args.methods,
        parent=args.parent,
        parallel=args.parallel,
    )
    if args.dry_run:
        print(describe(plan), end="")
        return 0
    _writable_folder(plan.parent, "sweep folder", "choose another one (--parent PATH)")
    outcomes = run_sweep(plan, sort=args.sort)
    summary = os.path.join(plan.parent, "summary.md")
    with open(summary, encoding="utf-8") as handle:
        print(handle.read(), end="")
    print(f"summary: {summary} (and summary.json, summary.html)")
    # Failed runs are in the summary; a non-zero code tells a script that some of them need another go.
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _open_run(run_dir: str):
    """A finished (or partly trained) run, opened for post-hoc edits: (config, RunDir, state)."""
    from retain.engine.posthoc import open_run

    return open_run(run_dir)


def _experiment(config, folder):
    """The run's model, method and evaluation context, as `retain eval` builds them."""
    from retain.engine.loop import Experiment
    from retain.engine.posthoc import open_plan

    plan = open_plan(config)
    if plan.joint:
        raise RetainError(f"{folder.path} trained all tasks jointly (multitask): there is no stream to edit")
    return Experiment(plan, folder)


def _evaluate_into(experiment, method, row: int, out_dir: str, general: bool = False) -> list[float]:
    """One row of scores on every task of the run, with its evaluation settings; predictions in out_dir.
    With `general`, the run's eval-only tasks (stream.eval_only) instead, into out_dir/general/ as the run
    itself lays them out."""
    from retain.engine.evaluate import evaluate_row

    config = experiment.config
    tasks = experiment.plan.eval_only if general else experiment.plan.tasks
    folder = os.path.join(out_dir, "general") if general else out_dir
    files = [os.path.join(folder, f"{task.name}.jsonl") for task in tasks]
    return evaluate_row(
        method, experiment.ctx, row, files, config.eval.max_new_tokens, config.eval.batch_size, tasks=tasks
    )


def _general_results(experiment, matrix: list[list[float] | None]) -> dict:
    """results.json's `general` section (eval-only tasks: their matrix and retention metrics), or {} when
    the run has no eval-only tasks."""
    from retain.evaluation.metrics import general_retention

    if not experiment.plan.eval_only:
        return {}
    names = [t.name for t in experiment.plan.eval_only]
    return {"general": {"tasks": names, "matrix": matrix, "metrics": general_retention(matrix, names)}}


def _replace_folder(path: str) -> None:
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def _print_scores(title: str, tasks: list[str], columns: dict[str, list[float | None]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task")
    for name in columns:
        table.add_column(name, justify="right")
    for i, task in enumerate(tasks):
        table.add_row(task, *("-" if c[i] is None else f"{c[i]:.2f}" for c in columns.values()))
    _console().print(table)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge a run's per-task adapters into one adapter, save it, evaluate it on every task."""
    from retain.io import write_json_atomic
    from retain.methods.base import ContinualMethod
    from retain.methods.common.task_vectors import (
        MERGE_HOWS,
        add_dense_adapter,
        lora_task_vector,
        merge_adapters,
        merge_task_vectors,
        save_adapter,
    )
    from retain.methods.merge import MERGED, default_lam
    from retain.models.adapters import activate_adapters, adapter_names

    if args.how not in MERGE_HOWS:
        raise RetainError(f"--how '{args.how}' is unknown; use one of {', '.join(MERGE_HOWS)}")
    config, folder, state = _open_run(args.run_dir)
    if config.model.finetuning_type != "lora":
        raise RetainError(
            f"{folder.path} fine-tuned the full model (model.finetuning_type: full), so it has no "
            "adapters to merge; retain merge needs a LoRA run (model.finetuning_type: lora)"
        )
    _writable_folder(folder.path, "run directory", "retain merge writes merges/ there: make it writable")
    experiment = _experiment(config, folder)
    last = state.trained
    experiment.restore(last)
    checkpoint = os.path.join(folder.task_dir(last, experiment.unit_name(last)), "adapter")
    adapters = [a for a in adapter_names(experiment.model) if a != MERGED]
    source = args.source
    if source == "auto":
        source = "adapters" if len(adapters) >= 2 else "checkpoints"
        if source == "checkpoints" and last >= 2:
            raise RetainError(
                f"{checkpoint} holds one adapter ({', '.join(adapters)}), not one per task: method "
                f"'{config.method.name}' trains a single adapter through the stream. Train with "
                "method.name=merge (one adapter per task, kept in every checkpoint), or merge this run's "
                "checkpoints after each task (task vector k = the model after task k) with --from checkpoints"
            )
    if source == "adapters":
        names = adapters
        if len(names) < 2:
            raise RetainError(
                f"{checkpoint} holds one adapter ({', '.join(names)}); retain merge --from adapters needs "
                "one per task: train with method.name=merge, or use --from checkpoints"
            )
    else:
        names = [f"{k}-{experiment.unit_name(k)}" for k in range(1, last + 1)]
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise RetainError(
            f"--weights has {len(weights)} value(s) but there are {len(names)} task vectors "
            f"({', '.join(names)})"
        )
    lam = args.lam if args.lam is not None else default_lam(args.how, len(names))
    seed = config.seed + last if args.seed is None else args.seed  # the merge method's DARE seed
    settings = dict(weights=weights, lam=lam, density=args.density, drop_rate=args.drop_rate, seed=seed)
    if source == "adapters":
        merge_adapters(experiment.model, names, args.how, MERGED, **settings)
    else:
        vectors = []
        for k in range(1, last + 1):
            experiment.restore(k)
            vectors.append(lora_task_vector(experiment.model, "default"))
        merged = merge_task_vectors(vectors, args.how, **settings)
        add_dense_adapter(experiment.model, MERGED, merged, like="default")
    activate_adapters(experiment.model, active=[MERGED], trainable=[])
    out = os.path.join(folder.path, "merges", args.name or args.how)
    _replace_folder(out)
    save_adapter(experiment.model, MERGED, os.path.join(out, "adapter"))
    scores = _evaluate_into(experiment, ContinualMethod(), last, os.path.join(out, "eval"))
    general_names = [t.name for t in experiment.plan.eval_only]
    general = (
        _evaluate_into(experiment, ContinualMethod(), last, os.path.join(out, "eval"), general=True)
        if general_names
        else []
    )
    tasks = [t.name for t in experiment.plan.tasks]
    run_row = state.rows.get(str(last))
    result = {
        "how": args.how,
        "source": source,
        "task_vectors": names,
        **settings,
        "adapter": os.path.join(out, "adapter"),
        "tasks": tasks,
        "scores": dict(zip(tasks, scores, strict=True)),
        "average": sum(scores) / len(scores),
        "run_last_row": run_row,
    }
    if general_names:
        result["general_scores"] = dict(zip(general_names, general, strict=True))
        result["run_general_last_row"] = state.general_rows.get(str(last))
    write_json_atomic(os.path.join(out, "results.json"), result)
    _print_scores(
        f"{args.how} merge of {len(names)} task vectors ({source})",
        tasks,
        {"merged": scores, f"run row {last}": list(run_row) if run_row else [None] * len(tasks)},
    )
    _console().print(f"average {result['average']:.2f}; adapter and predictions: {out}")
    return 0


def cmd_lines(args: argparse.Namespace) -> int:
    """Apply LiNeS to each checkpoint of a run and evaluate it: the run's matrix under LiNeS."""
    from retain.evaluation.metrics import compute_metrics
    from retain.io import write_json_atomic
    from retain.methods.common.task_vectors import lines_scale_full, lines_scale_lora, save_adapter
    from retain.models.adapters import adapter_names, save_trainable, trainable_parameters

    config, folder, state = _open_run(args.run_dir)
    _writable_folder(folder.path, "run directory", "retain lines writes lines/ there: make it writable")
    beta = 1.0 - args.alpha if args.beta is None else args.beta
    experiment = _experiment(config, folder)
    # theta_0 for full fine-tuning: the model as loaded, before any checkpoint.
    base = (
        {}
        if adapter_names(experiment.model)
        else {n: p.detach().float().cpu().clone() for n, p in trainable_parameters(experiment.model).items()}
    )
    last = state.trained
    rows = [last] if args.last_only else list(range(1, last + 1))
    out = os.path.join(folder.path, "lines", args.name or f"alpha{args.alpha:g}-beta{beta:g}")
    _replace_folder(out)
    matrix: list[list[float] | None] = [state.rows.get("0")] + [None] * last
    general: list[list[float] | None] = [state.general_rows.get("0")] + [None] * last
    for k in rows:
        experiment.restore(k)
        adapters = adapter_names(experiment.model)
        if adapters:
            lines_scale_lora(experiment.model, adapters, args.alpha, beta)
        else:
            lines_scale_full(experiment.model, base, args.alpha, beta)
        experiment.method.restore(experiment.ctx)  # re-apply the method's adapter activity after the edit
        row_dir = os.path.join(out, "eval", str(k))
        matrix[k] = _evaluate_into(experiment, experiment.method, k, row_dir)
        if experiment.plan.eval_only:
            general[k] = _evaluate_into(experiment, experiment.method, k, row_dir, general=True)
        if k == last:
            target = os.path.join(out, "model" if not adapters else "adapter")
            if adapters and len(adapters) == 1:
                save_adapter(experiment.model, adapters[0], target)
            else:
                save_trainable(experiment.model, target)
        experiment.loaded = -1  # the model no longer holds checkpoint k as saved
    tasks = [t.name for t in experiment.plan.tasks]
    complete = all(row is not None for row in matrix[1:])
    metrics = compute_metrics(matrix) if complete else {}
    run_matrix = state.matrix(last + 1)
    result = {
        "alpha": args.alpha,
        "beta": beta,
        "tasks": tasks,
        "matrix": matrix,
        "metrics": metrics,
        "run_matrix": run_matrix,
        "run_metrics": compute_metrics(run_matrix) if all(r is not None for r in run_matrix[1:]) else {},
        **_general_results(experiment, general),
    }
    write_json_atomic(os.path.join(out, "results.json"), result)
    _print_scores(
        f"LiNeS alpha {args.alpha:g}, beta {beta:g}: scores after task {last}",
        tasks,
        {"LiNeS": matrix[last], "run": run_matrix[last]},
    )
    if metrics:
        shown = ", ".join(
            f"{name} {value:.2f} (run {result['run_metrics'].get(name, float('nan')) or 0:.2f})"
            for name, value in metrics.items()
            if value is not None
        )
        _console().print(shown)
    _console().print(f"matrix, predictions and the edited weights: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the model a run evaluated after task k, loadable with plain PEFT or transformers."""
    from retain.engine.export import export_run

    _writable_folder(args.output, "--output", "choose another folder")
    record = export_run(args.run_dir, args.output, task=args.task, merge=args.merge)
    _console().print(
        f"exported {record['description']}: the model evaluated after task {record['task']} "
        f"({record['task_name']}), in {record['path']} (README.md there says how to load it)",
        markup=False,
    )
    return 0


def _close_process_group() -> None:
    """Leave torchrun's process group cleanly: a gloo group alive at interpreter exit can abort a rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="retain", description="Continual instruction tuning of language models.")
    parser.add_argument("--version", action="version", version=f"retain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config file (see examples/)")
        p.add_argument(
            "overrides", nargs="*", help="dotted overrides: method.name=replay train.learning_rate=1e-4"
        )

    run = sub.add_parser("run", help="train each task, evaluate after each, report the metrics")
    with_config(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan; train nothing")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train each task and save its checkpoint; no evaluation")
    with_config(train)
    train.add_argument("--dry-run", action="store_true", help="print the plan; train nothing")
    train.set_defaults(func=lambda a: cmd_run(a, train=True, evaluate=False))

    ev = sub.add_parser(
        "eval",
        help="evaluate a run directory's saved per-task checkpoints; with eval.* overrides, every row again "
        "under those settings into RUN_DIR/evals/<name>/",
    )
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", help="eval.key=value settings, e.g. eval.mode=rank")
    ev.add_argument("--name", default="", help="the folder under evals/ (default: from the overrides)")
    ev.set_defaults(func=cmd_eval)

    metrics = sub.add_parser("metrics", help='CL metrics from results.json or any JSON holding "matrix"')
    metrics.add_argument("file")
    metrics.add_argument("--json", action="store_true", help="print the metrics as JSON")
    metrics.set_defaults(func=cmd_metrics)

    config = sub.add_parser(
        "config", help="list every config key with its type, default, help and LLaMA-Factory/EasyCL names"
    )
    config.add_argument(
        "section", nargs="?", default="", help="one of run, model, stream, task, method, train, eval"
    )
    config.set_defaults(func=cmd_config)

    methods = sub.add_parser("methods", help="list the methods and their hyper-parameters")
    methods.add_argument(
        "--strategies",
        action="store_true",
        help="print the methods x strategies table instead (single, DDP, FSDP, ZeRO-0..3, offload)",
    )
    methods.set_defaults(func=cmd_methods)

    benchmarks = sub.add_parser("benchmarks", help="list the built-in benchmarks and which files are present")
    benchmarks.add_argument("names", nargs="*", help="only these benchmarks")
    benchmarks.add_argument("--dir", help="benchmark data folder to check (default: $RETAIN_BENCHMARK_DIR)")
    benchmarks.set_defaults(func=cmd_benchmarks)

    compare = sub.add_parser("compare", help="one markdown table of several runs, sorted by a metric")
    compare.add_argument("run_dirs", nargs="+", help="run directories (or their results.json)")
    compare.add_argument("--sort", default="last", help="last, avg, bwt, fwt, forgetting, time or name")
    compare.add_argument("--output", help="also write the table to this markdown file")
    compare.add_argument(
        "--html", metavar="OUT.html", help="also write the compare page: metrics, BWT-vs-Last plot, matrices"
    )
    compare.add_argument(
        "--group",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one row per setting, its seeds as mean ± std [95%% interval] (default: when two runs differ "
        "only in seed)",
    )
    compare.set_defaults(func=cmd_compare)

    sweep = sub.add_parser(
        "sweep", help="run a config for every method x order x seed, then one summary with 95%% intervals"
    )
    with_config(sweep)
    sweep.add_argument("--seeds", help="N seeds from the config's seed on, or a list such as 1,2,3")
    sweep.add_argument(
        "--orders", help="benchmark orders (order1,order2) or permutations of stream.tasks (2-0-1,0-1-2)"
    )
    sweep.add_argument("--methods", help="method names, comma-separated (default: the config's method)")
    sweep.add_argument("--parent", help="the folder that holds the runs (default: runs/<config>-sweep)")
    sweep.add_argument(
        "--parallel", type=int, help="runs at a time, each its own process with cores/N threads (default 1)"
    )
    sweep.add_argument("--sort", default="last", help="the metric the summary sorts by and compares")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and which are done; run none")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="write a run's report.html again (runs made before it existed)")
    report.add_argument("run_dir", help="a run directory")
    report.set_defaults(func=cmd_report)

    merge = sub.add_parser(
        "merge", help="merge a run's per-task adapters (task arithmetic, TIES, DARE), save and evaluate it"
    )
    merge.add_argument("run_dir")
    merge.add_argument("--how", default="ties", help="task_arithmetic, ties, dare_linear or dare_ties")
    merge.add_argument("--weights", help="per-task weights, comma-separated (default: 1 each)")
    merge.add_argument(
        "--lam", type=float, help="scale of the merged vector (default: 1/T or 1, as the method)"
    )
    merge.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each vector kept")
    merge.add_argument("--drop-rate", type=float, default=0.5, help="DARE: probability of dropping an entry")
    merge.add_argument("--seed", type=int, help="DARE: seed of the drop masks (default: the run's seed + T)")
    merge.add_argument(
        "--from",
        dest="source",
        choices=["auto", "adapters", "checkpoints"],
        default="auto",
        help="task vectors: the last checkpoint's per-task adapters, or each task's checkpoint",
    )
    merge.add_argument("--name", help="subfolder of <run_dir>/merges/ (default: the --how value)")
    merge.set_defaults(func=cmd_merge)

    lines = sub.add_parser("lines", help="apply LiNeS layer scaling to a run's checkpoints and evaluate them")
    lines.add_argument("run_dir")
    lines.add_argument("--alpha", type=float, default=0.5, help="scale of the shallowest block's update")
    lines.add_argument("--beta", type=float, help="extra scale of the deepest block (default: 1 - alpha)")
    lines.add_argument("--last-only", action="store_true", help="only the checkpoint after the last task")
    lines.add_argument("--name", help="subfolder of <run_dir>/lines/ (default: alpha<a>-beta<b>)")
    lines.set_defaults(func=cmd_lines)

    export = sub.add_parser(
        "export", help="write the model a run evaluated after a task, loadable with PEFT or transformers"
    )
    export.add_argument("run_dir")
    export.add_argument("--task", type=int, help="export the model after this task (default: the last)")
    export.add_argument(
        "--merge", action="store_true", help="merge the LoRA into the base weights: a full transformers model"
    )
    export.add_argument("--output", required=True, help="a new or empty folder to write the model to")
    export.set_defaults(func=cmd_export)
    for command in sub.choices.values():
        # `retain run CONFIG -v` as well as `retain -v run CONFIG`; SUPPRESS keeps a -v given before.
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`run CONFIG --dry-run a.b=1`), which plain parse_args refuses.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except RetainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        message = path_error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to resume after the last completed task", file=sys.stderr
        )
        return 130
    finally:
        _close_process_group()


if __name__ == "__main__":
    sys.exit(main())
