"""Combined methods: replay + EWC and replay + LwF from one config; every accepted pair of a regulariser or
rehearsal method with an adapter or routing method runs a 3-task stream; impossible combinations refused."""

from __future__ import annotations

import json

import pytest
import torch

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.methods.combine import Combined
from retain.methods.registry import available, create_method
from retain.models.adapters import trainable_parameters

from ..helpers import tiny_config, tiny_context


def test_replay_plus_ewc_mixes_memory_and_adds_the_penalty(tmp_path):
    ctx, tasks = tiny_context(tmp_path)
    params = {"memory_size": 4, "replay_ratio": 0.5, "plus": [{"name": "ewc", "ewc_lambda": 1e3}]}
    method = create_method("replay", params)
    assert isinstance(method, Combined) and method.name == "replay+ewc"
    replay, ewc = method.components
    method.after_task(ctx, tasks[0], tasks[0].train)
    assert replay.memory and ewc.fisher
    ctx.task_index = 2
    data = method.training_data(ctx, tasks[1], tasks[1].train)
    assert sum("replayed_from" in e.meta for e in data) == len(tasks[1].train)
    # Move the weights away from the anchor: the total is the task loss plus the (non-zero) EWC penalty.
    with torch.no_grad():
        for p in trainable_parameters(ctx.model).values():
            p.add_(0.01)
    batch = ctx.collate(ctx.encode(data[:4]))
    outputs = ctx.forward(ctx.model, batch)
    penalty = ewc.penalty(ctx.model).item()
    assert penalty > 0
    total = method.loss(ctx, ctx.model, batch, outputs)
    assert total.item() == pytest.approx(outputs.loss.item() + penalty, rel=1e-5)
    restored = create_method("replay", {"memory_size": 4, "replay_ratio": 0.5, "plus": ["ewc"]})
    restored.load_state_dict(method.state_dict())
    assert len(restored.components[0].memory["parity"]) == 4 and restored.components[1].fisher


@pytest.mark.parametrize("plus", ["ewc", "lwf"])
def test_combined_runs_a_stream_and_logs_both_terms(tmp_path, plus):
    raw = tiny_config(tmp_path, "replay", {"memory_size": 4, "plus": [plus]})
    results = run_experiment(config_from_dict(raw))
    assert results["method"] == f"replay+{plus}"
    log = json.loads((tmp_path / "run" / "tasks" / "2-capital_letters" / "train_log.json").read_text())
    keys = {k for entry in log for k in entry}
    assert "replay/examples" in keys and (("ewc/penalty" in keys) if plus == "ewc" else ("lwf/kl" in keys))


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("multitask", {"plus": ["ewc"]}, "cannot be combined"),
        ("ewc", {"plus": ["ewc"]}, "listed twice"),
        ("olora", {"plus": ["lcia"]}, "both decide which adapters"),
        ("replay", {"plus": ["nope"]}, "unknown method 'nope'"),
        ("replay", {"plus": [{"name": "ewc", "ewc_lamda": 1}]}, "did you mean: ewc_lambda"),
        ("lamol", {"plus": ["conpet"]}, "lamol cannot be combined with conpet: lamol generates"),
        ("abscl", {"plus": ["ssr"]}, "ssr cannot be combined with abscl: ssr generates"),
    ],
)
def test_impossible_combinations_are_refused_when_the_config_is_read(name, params, needle):
    with pytest.raises(RetainError, match=needle):
        create_method(name, params)


CLASSES = {name: cls for name, cls in available().items() if not name.startswith("_")}
# Generation-based methods sized down (the tiny model never stops generating), memories kept small.
SMALL = {
    "abscl": {"memory_size": 4, "stats_samples": 8},
    "agem": {"memory_size": 4, "memory_batch_size": 2},
    "conpet": {"memory_per_task": 8, "selector_steps": 5},
    "ewc": {"fisher_samples": 4},
    "gem": {"memory_size": 4, "memory_batch_size": 2},
    "gere": {"num_samples": 8},
    "ilora": {"buffer_size": 8},
    "lamol": {"memory_per_task": 2},
    "pseudo_replay": {"memory_per_task": 2},
    "replay": {"memory_size": 4},
    "ssr": {"candidates_per_task": 4, "memory_per_task": 2},
}
GENERATES = {n for n, c in CLASSES.items() if getattr(c, "needs_previous_model_at_start", False)}
SWITCHES = {n for n, c in CLASSES.items() if getattr(c, "switches_adapters", False)}


def _refusal(main: str, plus: str) -> str | None:
    """The reason a pair is refused, as the message words it, or None if it is accepted."""
    if main == plus:
        return "is listed twice"
    if "multitask" in (main, plus):
        return "trains once on all tasks and cannot be combined"
    if CLASSES[main].decides_eval_model and CLASSES[plus].decides_eval_model:
        return f"{main} and {plus} both decide which adapters answer"
    for needs, breaks in ((main, plus), (plus, main)):
        if needs in GENERATES and breaks in SWITCHES:
            return (
                f"{needs} cannot be combined with {breaks}: {needs} generates its pseudo samples from the "
                f"model a task starts from, but {breaks} switches the active adapters"
            )
    return None


def test_every_pair_is_accepted_or_refused_with_its_reason():
    refused = 0
    for main in CLASSES:
        for plus in CLASSES:
            reason = _refusal(main, plus)
            if reason is None:
                assert create_method(main, {"plus": [plus]}).name == f"{main}+{plus}"
                continue
            refused += 1
            with pytest.raises(RetainError) as error:
                create_method(main, {"plus": [plus]})
            assert reason in str(error.value)
    assert refused < len(CLASSES) ** 2 // 2  # most pairs are accepted


# Every accepted pair of a regulariser or rehearsal method with an adapter, EMA or routing method (the
# components that add, freeze, switch or route adapters), as {name: <adapter method>, plus: [<other>]};
# (a, b) means {name: a, plus: [b]}. All pairs in both orders would take minutes: the reverse order is run
# for MIGU here, and for LwF and EWC (whose before_task and after_task meet the adapter changes) in
# tests/methods/test_regularisers.py.
ADAPTING = sorted(n for n, c in CLASSES.items() if c.decides_eval_model)
PROTECTING = sorted(
    n for n, c in CLASSES.items() if not c.decides_eval_model and n not in ("sequential", "multitask")
)
PAIRS = [(a, b) for a in ADAPTING for b in PROTECTING] + [("migu", a) for a in ADAPTING]
PAIRS = [pair for pair in PAIRS if _refusal(*pair) is None]


def covering(pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """A few of `pairs` in which every method appears in every role (main, plus) it has in `pairs`: greedy,
    each pick meeting as many unseen roles as possible, so no one method is paired with all the others."""
    unseen = {("main", a) for a, _ in pairs} | {("plus", b) for _, b in pairs}
    chosen: set[tuple[str, str]] = set()
    uses: dict[str, int] = {}
    while unseen:
        best = max(pairs, key=lambda p: (len({("main", p[0]), ("plus", p[1])} & unseen), -uses.get(p[0], 0)))
        chosen.add(best)
        uses[best[0]] = uses.get(best[0], 0) + 1
        unseen -= {("main", best[0]), ("plus", best[1])}
    return chosen


# `make test` runs the covering pairs (each method in each role once); `make test-matrix` runs them all.
COVERING = covering(PAIRS)


def test_make_test_runs_every_method_of_the_pairs_in_each_of_its_roles():
    assert {a for a, _ in COVERING} == {a for a, _ in PAIRS}
    assert {b for _, b in COVERING} == {b for _, b in PAIRS}
    assert len(COVERING) < len(PAIRS) // 4
    assert max(sum(a == main for a, _ in COVERING) for main in ADAPTING if main != "migu") <= 3


@pytest.mark.parametrize(
    ("main", "plus"),
    [pytest.param(a, b, marks=() if (a, b) in COVERING else pytest.mark.matrix) for a, b in PAIRS],
    ids=[f"{a}+{b}" for a, b in PAIRS],
)
def test_accepted_pair_runs_a_three_task_stream(tmp_path, main, plus):
    params = {**SMALL.get(main, {}), "plus": [{"name": plus, **SMALL.get(plus, {})}]}
    raw = tiny_config(
        tmp_path,
        main,
        params,
        stream={
            "train_size": 8,
            "test_size": 2,
            "tasks": ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"],
        },
        train={"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1},
        eval={"max_new_tokens": 2, "before_training": False},
    )
    results = run_experiment(config_from_dict(raw))
    assert results["method"] == f"{main}+{plus}"
    assert [len(row) for row in results["matrix"][1:]] == [3, 3, 3]
    assert all(score is not None for row in results["matrix"][1:] for score in row)
    if "lwf" in (main, plus):  # the teacher is the previous task's model, never the student itself
        log = json.loads((tmp_path / "run" / "tasks" / "3-max_number" / "train_log.json").read_text())
        assert max(entry.get("lwf/kl", 0.0) for entry in log) > 0
