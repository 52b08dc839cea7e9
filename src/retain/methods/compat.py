"""The methods x strategies compatibility table, generated from each method's `refused_strategies` and
from the runs that checked a cell (`VERIFIED`).

`compatibility_markdown()` writes docs/compatibility.md and `readme_block()` the table between the README's
markers; `retain methods --strategies` prints the same table. tests/methods/test_strategy_support.py fails
when either file is stale, and checks that every test named in VERIFIED exists and names its method.

A cell is one of: run (a test trains the method under the strategy; the machine is named), declared (no
refusal, but no run here checked it: every strategy that needs a GPU or DeepSpeed, which this project's
test machine lacks), refused (with the reason as a footnote). Only run cells carry the check mark.
"""

from __future__ import annotations

from dataclasses import dataclass

from retain.methods.base import ContinualMethod
from retain.methods.registry import available
from retain.runtime import Strategy

# The table's columns: the strategy each stands for, on 2 processes (what "more than one" needs).
COLUMNS: list[tuple[str, Strategy]] = [
    ("single", Strategy("single", 1)),
    ("DDP", Strategy("ddp", 2)),
    ("FSDP", Strategy("fsdp", 2)),
    ("ZeRO-0", Strategy("zero0", 2)),
    ("ZeRO-1", Strategy("zero1", 2)),
    ("ZeRO-2", Strategy("zero2", 2)),
    ("ZeRO-3", Strategy("zero3", 2)),
    ("ZeRO-2 + offload", Strategy("zero2", 2, offload=True)),
]
RUN, DECLARED, REFUSED = "✓", "○", "✗"
EVERY_METHOD = "*"
_LOOP = "tests/engine/test_loop.py::test_every_method_runs_a_two_task_stream_and_resumes_after_a_crash"
_DDP_RUN = "tests/engine/test_distributed.py::test_torchrun_two_processes_runs_the_same_config"
_DDP_BATCH = (
    "tests/engine/test_distributed.py::test_a_global_batch_size_keeps_the_step_size_under_two_processes"
)
_DDP_MORE = "tests/methods/test_strategy_support.py::test_the_other_methods_run_under_ddp"
_FSDP_RUN = "tests/engine/test_strategies.py::test_fsdp_on_two_processes_gives_the_one_process_run"
_STATE = "tests/engine/test_method_state_equivalence.py::test_two_processes_end_with_the_one_process_state"
_ZERO_RUN = "tests/engine/test_strategies.py::test_deepspeed_zero_on_two_processes_gives_the_one_process_run"
CPU, CPU2, FSDP2_CPU = "CPU", "CPU, gloo, 2 processes", "CPU, gloo, 2 processes, FSDP2"
ZERO_CPU = "CPU, gloo, 2 processes, DeepSpeed 0.19.8 (torch AdamW)"

# Strategy key (its name, "+offload" when offloaded) -> method -> (test node id, machine): the run that
# trained the method under the strategy.
VERIFIED: dict[str, dict[str, tuple[str, str]]] = {
    "single": {EVERY_METHOD: (_LOOP, CPU)},
    "ddp": {
        **{m: (_DDP_RUN, CPU2) for m in ("replay", "olora", "ilora", "clmoe")},
        # Weights, method state, step losses and predictions equal to the 1-process run's.
        **{m: (_STATE, CPU2) for m in ("gem", "lcia")},
        "sequential": (_DDP_BATCH, CPU2),
        **{
            m: (_DDP_MORE, CPU2)
            for m in (
                "multitask",
                "lwf",
                "hft",
                "lines",
                "merge",
                "moelora",
                "osft",
                "coso",
                "sefe",
                "gere",
                "conpet",
                "lamol",
                "pseudo_replay",
                "ssr",
                "rft",
                "ewc",
                "agem",
                "migu",
            )
        },
    },
    # Both compare the 2-process run with the 1-process run (matrix, predictions, weights or method state).
    "fsdp": {"sequential": (_FSDP_RUN, FSDP2_CPU), "migu": (_STATE, FSDP2_CPU)},
    # The same comparison under each ZeRO stage (make test-matrix, which installs DeepSpeed).
    **{
        key: {"sequential": (_ZERO_RUN, ZERO_CPU)}
        for key in ("zero0", "zero1", "zero2", "zero3", "zero2+offload")
    },
}


@dataclass(frozen=True)
class Cell:
    mark: str  # RUN, DECLARED or REFUSED
    detail: str = ""  # the run (test and machine) or the refusal's reason


def cell(method: type[ContinualMethod], strategy: Strategy) -> Cell:
    """What the table says of `method` under `strategy` (from the class: no method is built)."""
    reason = method.declared_refusal(strategy)
    if reason:
        return Cell(REFUSED, reason)
    runs = VERIFIED.get(strategy.name + ("+offload" if strategy.offload else ""), {})
    run = runs.get(method.name) or runs.get(EVERY_METHOD)
    return Cell(RUN, f"{run[0]} ({run[1]})") if run else Cell(DECLARED)


def builtin_methods() -> dict[str, type[ContinualMethod]]:
    """The methods retain ships: the generated docs leave out plugins and test doubles registered in the
    same process (they would renumber the footnotes)."""
    return {name: cls for name, cls in available().items() if cls.__module__.startswith("retain.methods.")}


def _rows(methods: dict[str, type[ContinualMethod]]) -> tuple[list[list[str]], list[str]]:
    """The table's rows (method, then one mark per column) and its footnotes (each distinct reason once)."""
    notes: list[str] = []
    rows = []
    for name, method in methods.items():
        row = [f"`{name}`"]
        for _, strategy in COLUMNS:
            found = cell(method, strategy)
            if found.mark == REFUSED:
                if found.detail not in notes:
                    notes.append(found.detail)
                row.append(f"{REFUSED}{notes.index(found.detail) + 1}")
            else:
                row.append(found.mark)
        rows.append(row)
    return rows, notes


LEGEND = (
    f"{RUN} trained under the strategy by a test, which compared it with the 1-process run where it says so "
    "(the runs are listed in docs/compatibility.md; all on CPU, none on a GPU; the ZeRO runs need DeepSpeed, "
    f"which `make test-matrix` installs); {DECLARED} not refused, but no run here trained the method under "
    f"the strategy (no GPU was at hand); {REFUSED}n refused when the config is read, for reason n. Columns "
    "other than single are on 2 or more processes; ZeRO-2 + offload keeps the optimizer state in CPU RAM "
    "(FSDP and ZeRO-3 with offload refuse what their column refuses)."
)


def table_markdown(methods: dict[str, type[ContinualMethod]] | None = None) -> str:
    """The table, its legend and its footnotes (the README's block): of `methods`, by default the built-in
    ones."""
    rows, notes = _rows(builtin_methods() if methods is None else methods)
    header = ["method", *(label for label, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", LEGEND, ""]
    lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def runs_markdown() -> str:
    """Each run cell's evidence: strategy, methods, test, machine."""
    lines = ["| strategy | methods | test | machine |", "|---|---|---|---|"]
    for strategy, runs in VERIFIED.items():
        by_test: dict[tuple[str, str], list[str]] = {}
        for method, run in runs.items():
            by_test.setdefault(run, []).append("every method" if method == EVERY_METHOD else f"`{method}`")
        for (test, machine), methods in by_test.items():
            lines.append(f"| {strategy} | {', '.join(methods)} | `{test}` | {machine} |")
    return "\n".join(lines) + "\n"


README_START = "<!-- compatibility table: generated by retain.methods.compat.readme_block(); do not edit -->"
README_END = "<!-- end of the compatibility table -->"


def readme_block() -> str:
    """The README's block, markers included."""
    return f"{README_START}\n{table_markdown()}{README_END}"


def compatibility_markdown() -> str:
    """docs/compatibility.md."""
    return "\n".join(
        [
            "# Methods x strategies",
            "",
            "<!-- Generated by retain.methods.compat.compatibility_markdown(); edit the methods' "
            "refused_strategies or VERIFIED in src/retain/methods/compat.py, then regenerate:",
            "python -c 'from retain.methods.compat import compatibility_markdown as m; "
            'open("docs/compatibility.md", "w").write(m())\' -->',
            "",
            "Each method declares the strategies it cannot run under correctly (`refused_strategies` in its "
            "class, a strategy or a family: sharded-params = FSDP, ZeRO-3; sharded-grads = FSDP, ZeRO-2/3; "
            "deepspeed = ZeRO-0..3; multiprocess = more than one process). `retain run` refuses such a "
            "combination when it reads the config, before any model loads, naming the reason; "
            "`retain run --dry-run` shows the strategy and the memory it needs per process.",
            "",
            "The strategy comes from `train.deepspeed` (a DeepSpeed JSON), `train.fsdp`, or the "
            "`accelerate launch` config; otherwise DDP under torchrun with more than one process.",
            "",
            table_markdown(),
            "## The runs behind the check marks",
            "",
            runs_markdown(),
        ]
    )
