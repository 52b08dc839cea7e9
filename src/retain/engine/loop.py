"""The continual loop: for each task, before_task -> train -> after_task -> checkpoint -> evaluate all tasks.

Everything that can fail on user input is checked by the plan (retain.engine.plan) before the run
directory is touched. A run that is killed resumes after its last completed task (the checkpoint and
state.json are written atomically) and reaches the same results as an uninterrupted one, because every
task is seeded from (seed, task index) and restarts from the saved weights and method state.
docs/architecture.md draws the states a run goes through.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from transformers import TrainingArguments, set_seed

from retain.config import RunConfig, report_to
from retain.data.batching import FeatureDataset
from retain.data.encode import encode_dataset
from retain.data.streams import Task
from retain.engine.evaluate import evaluate_row
from retain.engine.plan import Plan, check_encoding, make_plan
from retain.engine.provenance import provenance
from retain.engine.run_dir import RunDir, RunState
from retain.engine.strategies import fix_cpu_deepspeed, full_weights, is_sharded, strategy_arguments
from retain.engine.trackers import Tracking, open_tracking
from retain.engine.trainer import ContinualTrainer
from retain.errors import RetainError
from retain.evaluation.html_report import write_html_report
from retain.evaluation.metrics import general_retention
from retain.evaluation.report import build_results, write_report
from retain.methods.base import MethodContext
from retain.models.adapters import adapter_names, apply_finetuning
from retain.models.loading import load_encoders, load_model
from retain.runtime import (
    BatchLayout,
    Strategy,
    batch_layout,
    frozen_heap,
    process_state,
    resolve_strategy,
    use_bf16,
)

logger = logging.getLogger(__name__)


def training_arguments(
    config: RunConfig,
    run_dir: RunDir,
    index: int,
    bf16: bool,
    batch: BatchLayout,
    strategy: Strategy | None = None,
) -> TrainingArguments:
    """The Trainer's arguments for unit `index`; `strategy` (default: single/DDP by the launcher) adds
    FSDP's or DeepSpeed's (retain.engine.strategies)."""
    train = config.train
    strategy = strategy or Strategy("ddp" if batch.processes > 1 else "single", batch.processes)
    # transformers 5 folds warmup_ratio into warmup_steps (a float < 1 is a ratio, >= 1 steps); 4.x has
    # both, and its warmup_steps > 0 overrides the ratio, as train.warmup_steps does.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = (
        {"warmup_ratio": train.warmup_ratio, "warmup_steps": train.warmup_steps}
        if "warmup_ratio" in fields
        else {"warmup_steps": train.warmup_steps if train.warmup_steps > 0 else train.warmup_ratio}
    )
    args = TrainingArguments(
        **warmup,
        **strategy_arguments(train, strategy),
        output_dir=os.path.join(run_dir.path, "tasks", ".trainer"),
        per_device_train_batch_size=batch.per_device,
        gradient_accumulation_steps=batch.accumulation,
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        lr_scheduler_type=train.lr_scheduler_type,
        weight_decay=train.weight_decay,
        optim=train.optim,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        save_strategy="no",
        # Trackers get one run per stream (retain.engine.trackers), not transformers' run per Trainer.
        report_to=[],
        # gradient_checkpointing stays off here: train.gradient_checkpointing is switched on the model when
        # it is loaded (with what PEFT needs), and the Trainer would switch it again.
        bf16=bf16,
        seed=config.seed + index,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    fix_cpu_deepspeed(args)
    return args


class Experiment:
    """A run in progress: the model, the method and the run directory, driven task by task."""

    def __init__(self, plan: Plan, run_dir: RunDir) -> None:
        self.plan, self.config, self.run_dir = plan, plan.config, run_dir
        self.method = plan.method
        self.processes = process_state()
        self.batch = plan.batch or batch_layout(self.config.train, self.processes.num_processes)
        self.strategy = getattr(plan, "strategy", None) or resolve_strategy(self.config)
        model, tokenizer, info = load_model(self.config.model.name_or_path, self.config.model)
        set_seed(self.config.seed)
        self.model = apply_finetuning(
            model, self.config.model, gradient_checkpointing=self.config.train.gradient_checkpointing
        )
        self.tokenizer = tokenizer
        self.processor = info.processor  # None for a text model
        self.load_seconds = info.seconds
        self.model_cache_hit = info.cache_hit
        self.ctx = MethodContext.create(
            self.model,
            tokenizer,
            self.config,
            plan.tasks,
            run_dir=run_dir.path,
            rank=self.processes.process_index,
            world_size=self.processes.num_processes,
            bf16=use_bf16(self.config),
            processor=info.processor,
        )
        self.method.setup(self.ctx)
        self.tracking = Tracking()  # the stream's trackers, opened by run_experiment on the main process
        self.loaded = 0  # which unit's end state the model and method hold (0: before training)
        self.sharded = False  # whether training left the parameters sharded (FSDP, ZeRO-3)

    @property
    def is_main(self) -> bool:
        return self.processes.is_main_process

    def unit_name(self, index: int) -> str:
        return "init" if index == 0 else self.plan.train_units[index - 1].name

    def restore(self, index: int) -> None:
        """Put the model and the method in the state saved after unit `index` (0: before training)."""
        if index == self.loaded:
            return
        if is_sharded(self.model):
            # Not reached by a run: checkpoints load before the session's first task shards the model.
            raise RetainError(
                f"cannot load the checkpoint of unit {index} into a model sharded by {self.strategy.label}; "
                "start a new process to resume the run"
            )
        method_state = self.run_dir.load_checkpoint(index, self.unit_name(index), self.model)
        self.method.load_state_dict(method_state)
        self.ctx.task_index = index
        self.method.restore(self.ctx)
        self.loaded = index

    def saved_log(self, index: int) -> list[dict]:
        """The training log saved with unit `index`'s checkpoint."""
        path = os.path.join(self.run_dir.task_dir(index, self.unit_name(index)), "train_log.json")
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def checkpoint(self, index: int, log: list[dict]) -> None:
        # Every process gathers the sharded weights (FSDP, ZeRO-3) and the method state; rank 0 writes.
        method_state = self.method.state_dict()
        with full_weights(self.model):
            if self.is_main:
                self.run_dir.save_checkpoint(index, self.unit_name(index), self.model, method_state, log)
            self.processes.wait_for_everyone()

    def train_unit(self, index: int) -> tuple[dict[str, float], list[dict]]:
        """Train unit `index` (1-based) with the method's hooks; returns its seconds and the training log.

        The seconds are `prepare_s` (the method's before_task and training_data, where rollout filters,
        pseudo-sample generation and subspace decompositions run, plus tokenising) and `train_s` (the
        Trainer and after_task), so a method's cost is counted wherever its rule does the work."""
        unit = self.plan.train_units[index - 1]
        self.ctx.task_index = index
        set_seed(self.config.seed + index)
        prepare_start = time.perf_counter()
        self.method.before_task(self.ctx, unit)
        data = self.method.training_data(self.ctx, unit, unit.train)
        features = encode_dataset(
            self.tokenizer,
            data,
            self.config.train.cutoff_len,
            source=f"task '{unit.name}'",
            processor=self.processor,
        )
        trainer = ContinualTrainer(
            model=self.model,
            args=training_arguments(
                self.config, self.run_dir, index, self.ctx.bf16, self.batch, self.strategy
            ),
            train_dataset=FeatureDataset(features),
            data_collator=self.ctx.collate,
            callbacks=[self.tracking.callback(index)] if self.tracking.active else None,
            method=self.method,
            ctx=self.ctx,
            progress_label=f"task {index}/{len(self.plan.train_units)} {unit.name}",
        )
        start = time.perf_counter()
        prepare_seconds = start - prepare_start
        trainer.train()
        self.sharded = is_sharded(self.model)
        # accelerate wraps forward in autocast for mixed precision; evaluation sets its own precision.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        self.ctx.logged.clear()  # what was logged after the last logging step belongs to no record
        self.method.after_task(self.ctx, unit, data)
        self.loaded = index
        seconds = time.perf_counter() - start
        log = list(trainer.state.log_history)
        after = {name: sum(float(x) for x in v) / len(v) for name, v in self.ctx.logged.items() if v}
        self.ctx.logged.clear()
        if after:
            log.append({"after_task": after})
        self.tracking.trained(index, log)
        return {"prepare_s": prepare_seconds, "train_s": seconds}, log

    def evaluate(self, row: int, general: bool = False) -> list[float]:
        """Row `row` of the matrix (the state after unit `row`); with `general`, that row of the eval-only
        tasks' scores instead. Every process answers a share of the prompts and gets the row's scores; the
        main process writes the predictions."""
        self.restore(row)
        tasks = self.plan.eval_only if general else self.plan.tasks
        files = [self.run_dir.eval_file(row, task.name, general) for task in tasks]
        scores = evaluate_row(
            self.method,
            self.ctx,
            row,
            files,
            self.config.eval.max_new_tokens,
            self.config.eval.batch_size,
            all_processes=True,
            lockstep=self.strategy.shards_parameters,
            tasks=tasks,
        )
        if self.is_main:
            self.tracking.row(row, [task.name for task in tasks], scores, general=general)
        self.processes.wait_for_everyone()
        return scores

    def strategy_record(self) -> dict:
        """What state.json and results.json record of the strategy the last unit trained under."""
        strategy = self.strategy
        return {
            "name": strategy.name,
            "label": strategy.label,
            "processes": strategy.processes,
            "offload": strategy.offload,
            "sharded_parameters": self.sharded,
        }

    def save_state(self, state: RunState) -> None:
        if self.is_main:
            self.run_dir.save_state(state)
        self.processes.wait_for_everyone()


def _results(plan: Plan, state: RunState) -> dict:
    config = plan.config
    extra = {
        "model": config.model.name_or_path,
        "finetuning_type": config.model.finetuning_type,
        "method_params": config.method.params,
        "task_id_at_test": plan.method.needs_task_id_at_test,
        "seed": config.seed,
        "num_processes": state.num_processes,
        "batch": batch_layout(config.train, state.num_processes).to_dict(),
        "adapters": state.adapters,
        "strategy": state.strategy,
        "train_sizes": {t.name: len(t.train) for t in plan.tasks},
        "test_sizes": {t.name: len(t.test) for t in plan.tasks},
        "eval_mode": {t.name: _eval_mode(config, t) for t in plan.tasks},
        "data_checks": {
            "warnings": plan.stream.warnings if plan.stream else [],
            "findings": [f.to_dict() for t in plan.tasks + plan.eval_only for f in t.hygiene],
        },
    }
    if plan.eval_only:
        names = [t.name for t in plan.eval_only]
        matrix = state.general_matrix(len(plan.train_units) + 1)
        extra["general"] = {"tasks": names, "matrix": matrix, "metrics": general_retention(matrix, names)}
        extra["general"]["test_sizes"] = {t.name: len(t.test) for t in plan.eval_only}
        extra["general"]["eval_mode"] = {t.name: _eval_mode(config, t) for t in plan.eval_only}
    if plan.stream and plan.stream.benchmark:
        extra["benchmark"] = plan.stream.benchmark
    extra["provenance"] = provenance(use_bf16(config))
    return build_results(
        [t.name for t in plan.tasks],
        state.matrix(len(plan.train_units) + 1),
        plan.method.name,
        dict(state.timings),
        extra=extra,
        joint=plan.joint,
    )


def run_experiment(config: RunConfig, *, train: bool = True, evaluate: bool = True) -> dict | None:
    """Run (or resume) the whole stream; returns results.json's content when evaluation ran."""
    with frozen_heap():
        return _run_experiment(config, train=train, evaluate=evaluate)


def _run_experiment(config: RunConfig, *, train: bool, evaluate: bool) -> dict | None:
    wall = time.perf_counter()
    plan = make_plan(config)
    check_encoding(plan, *load_encoders(config.model.name_or_path, config.model.trust_remote_code))
    run_dir = RunDir(config.output_dir)
    fingerprints = plan.fingerprints()
    run_dir.check_not_foreign()  # before a lock file is put into someone else's folder
    processes = process_state()
    # Lock first, then check: a second start on the same folder is told another process holds it, and
    # what the check sees cannot change under it. A folder holding only lock files and temporaries, or a
    # start that never recorded its initial checkpoint (a stub), is taken over.
    with run_dir.lock(processes.process_index):
        run_dir.check_resumable(config, fingerprints, plan.data_source)
        processes.wait_for_everyone()
        if processes.is_main_process:
            run_dir.take_over()
        processes.wait_for_everyone()
        experiment = Experiment(plan, run_dir)
        state = run_dir.load_state() if run_dir.exists() else None
        resumed = state is not None
        processes.wait_for_everyone()
        if state is None:
            state = RunState(tasks=[t.name for t in plan.tasks])
            if experiment.is_main:
                state = run_dir.initialise(config, state.tasks, fingerprints)
            processes.wait_for_everyone()
        state.fingerprints = fingerprints  # checked above; recorded now if the state file predates them
        other_count = state.trained > 0 and state.num_processes != processes.num_processes
        if other_count and train and config.train.global_batch_size is None:
            if state.trained < len(plan.train_units):
                raise RetainError(
                    f"{run_dir.path} trained with {state.num_processes} process(es) and this start has "
                    f"{processes.num_processes}: each process adds a per-device batch, so the remaining "
                    f"tasks would train with another step size; resume with {state.num_processes} "
                    "process(es), or start a new run with train.global_batch_size set"
                )
        state.num_processes = processes.num_processes
        timings = state.timings
        timings["model_load_s"] = round(experiment.load_seconds, 3)
        if state.trained < 0:
            experiment.checkpoint(0, [])
            state.trained = 0
            experiment.save_state(state)
        elif state.trained > 0 or state.rows:
            done = ", ".join(sorted(state.rows, key=int)) or "none"
            logger.info(
                "resuming %s: %d task(s) trained, rows evaluated: %s", run_dir.path, state.trained, done
            )
        if experiment.is_main and report_to(config.train):
            logs = [experiment.saved_log(i) for i in range(1, state.trained + 1)]
            experiment.tracking = open_tracking(config, run_dir.path, logs, resumed)
        try:
            results = _train_and_evaluate(experiment, state, train=train, evaluate=evaluate, wall=wall)
        except BaseException:
            experiment.tracking.close(failed=True)
            raise
        experiment.tracking.close()
        return results


def _train_and_evaluate(
    experiment: Experiment, state: RunState, *, train: bool, evaluate: bool, wall: float
) -> dict | None:
    """Train the units not trained yet and evaluate the rows not evaluated yet, saving the state after
    each; then write results.json (when evaluating) and return its content."""
    plan, config, timings = experiment.plan, experiment.config, state.timings
    if evaluate and config.eval.before_training and not state.has_row(0):
        start = time.perf_counter()
        state.set_row(0, experiment.evaluate(0))
        timings["eval_s/0"] = round(time.perf_counter() - start, 3)
        experiment.save_state(state)
    if evaluate and config.eval.before_training:
        _evaluate_general(experiment, state, 0)
        _write_page(experiment, state)
    units = plan.train_units if train else plan.train_units[: state.trained]
    for index in range(1, len(units) + 1):
        if index > state.trained:
            experiment.restore(index - 1)
            spent, log = experiment.train_unit(index)
            timings.update({f"{part}/{index}": round(seconds, 3) for part, seconds in spent.items()})
            experiment.checkpoint(index, log)
            state.trained = index
            state.strategy = experiment.strategy_record()
            experiment.save_state(state)
        if evaluate and not state.has_row(index):
            start = time.perf_counter()
            state.set_row(index, experiment.evaluate(index))
            timings[f"eval_s/{index}"] = round(time.perf_counter() - start, 3)
            experiment.save_state(state)
        if evaluate:
            _evaluate_general(experiment, state, index)
            _write_page(experiment, state)
    timings["last_session_s"] = round(time.perf_counter() - wall, 3)
    experiment.restore(len(units))
    state.adapters = adapter_names(experiment.model)
    experiment.save_state(state)
    if not evaluate:
        return None
    results = _results(plan, state)
    if experiment.is_main:
        write_report(experiment.run_dir.path, results)
        experiment.tracking.metrics(results["metrics"])
    experiment.processes.wait_for_everyone()
    return results


def _eval_mode(config: RunConfig, task: Task) -> str:
    """How `task` is scored: "rank" (its label set ranked by log-likelihood) or "generate"."""
    return "rank" if config.eval.mode == "rank" and task.labels else "generate"


def _write_page(experiment: Experiment, state: RunState) -> None:
    """report.html as the run stands (it fills in as the run goes, row by row, eval-only rows included)."""
    if experiment.is_main:
        write_html_report(experiment.run_dir.path, _results(experiment.plan, state))


def _evaluate_general(experiment: Experiment, state: RunState, row: int) -> None:
    """Score the eval-only tasks in row `row` unless done (a resumed run fills the rows it lacks)."""
    if not experiment.plan.eval_only or str(row) in state.general_rows:
        return
    start = time.perf_counter()
    state.general_rows[str(row)] = experiment.evaluate(row, general=True)
    state.timings[f"eval_general_s/{row}"] = round(time.perf_counter() - start, 3)
    experiment.save_state(state)
