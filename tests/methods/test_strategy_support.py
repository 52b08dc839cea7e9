"""Methods declare the strategies they cannot run under (ContinualMethod.refused_strategies); the plan
refuses such a run when the config is read, and docs/compatibility.md is generated from the declarations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retain.config import config_from_dict
from retain.engine.plan import make_plan
from retain.errors import RetainError
from retain.methods import compat
from retain.methods.base import ContinualMethod
from retain.methods.registry import available, create_method
from retain.runtime import STRATEGIES, STRATEGY_FAMILIES, Strategy

from ..helpers import tiny_config, write_config


def _deepspeed(tmp_path, stage: int) -> str:
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return str(path)


def test_a_family_refuses_every_strategy_that_has_the_property():
    class ReadsGradients(ContinualMethod):
        name = "reads_gradients"
        refused_strategies = {"sharded-grads": "it reads full gradients"}

    method = ReadsGradients()
    refused = {name for name in STRATEGIES if method.strategy_refusal(Strategy(name, 2))}
    assert refused == {"fsdp", "zero2", "zero3"}
    reason = method.strategy_refusal(Strategy("zero2", 2, offload=True))
    assert reason == "method 'reads_gradients' is refused under ZeRO-2 + offload: it reads full gradients"


def test_a_misspelt_strategy_key_fails_when_the_class_is_defined():
    with pytest.raises(TypeError, match="unknown key"):

        class Typo(ContinualMethod):
            refused_strategies = {"sharded-gradients": "typo"}


def test_every_registered_declaration_uses_known_keys_and_gives_a_reason():
    known = set(STRATEGIES) | set(STRATEGY_FAMILIES)
    for name, cls in available().items():
        for key, reason in cls.refused_strategies.items():
            assert key in known, (name, key)
            assert len(reason) > 20 and not reason.endswith("."), (name, key, reason)


def test_a_combination_is_refused_when_any_component_is():
    combined = create_method("replay", {"plus": ["abscl"]})
    assert "method 'abscl' is refused under DDP" in combined.strategy_refusal(Strategy("ddp", 2))
    assert combined.strategy_refusal(Strategy("single")) is None


def test_the_plan_refuses_a_method_under_a_strategy_it_declares_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = config_from_dict(tiny_config(tmp_path, method="abscl"))
    with pytest.raises(RetainError, match="method 'abscl' is refused under DDP: its replay pass"):
        make_plan(config)


def test_the_plan_resolves_the_strategy_from_train_deepspeed(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = config_from_dict(tiny_config(tmp_path, train={"deepspeed": _deepspeed(tmp_path, 1)}))
    plan = make_plan(config)
    assert plan.strategy == Strategy("zero1", 2) and plan.batch.processes == 2


# Methods the torchrun tests of tests/engine/test_distributed.py do not run (they run replay, olora, ilora,
# lcia, clmoe, gem and sequential); abscl refuses more than one process. compat.VERIFIED names this test.
OTHER_DDP_METHODS = [
    "multitask", "lwf", "hft", "lines", "merge", "moelora", "osft", "coso", "sefe", "gere", "conpet", "lamol",
    "pseudo_replay", "ssr", "rft", "ewc", "agem", "migu",
]  # fmt: skip
# Generation-based methods sized down (as tests/engine/test_loop.py does): the tiny model never stops.
SMALL = {
    "ssr": {"candidates_per_task": 16, "memory_per_task": 8},
    "pseudo_replay": {"memory_per_task": 8},
    "lamol": {"memory_per_task": 8},
    "rft": {"num_generations": 2, "filter_rollouts": 2},
    "ewc": {"fisher_samples": 8},
}


@pytest.mark.distributed
@pytest.mark.matrix
@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("method", OTHER_DDP_METHODS)
def test_the_other_methods_run_under_ddp(tmp_path, method):
    config = write_config(tmp_path, method=method, params=SMALL.get(method, {}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*run, "-m", "retain.cli", "run", config], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["num_processes"] == 2
    assert len(results["matrix"]) == (2 if method == "multitask" else 3)


# The generated table: docs/compatibility.md and the README's block are current, and every check mark
# names a run that exists.

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = (
    "python -c 'from retain.methods.compat import compatibility_markdown as m; "
    'open("docs/compatibility.md", "w").write(m())\''
)


def test_docs_compatibility_md_is_generated_from_the_declarations():
    current = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    assert current == compat.compatibility_markdown(), f"docs/compatibility.md is stale; run {REGENERATE}"


def test_the_readme_block_is_generated_from_the_declarations():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert compat.README_START in readme and compat.README_END in readme, "README has no compatibility block"
    start = readme.index(compat.README_START)
    block = readme[start : readme.index(compat.README_END, start) + len(compat.README_END)]
    assert block == compat.readme_block(), (
        "README's compatibility table is stale; replace the block between its markers with "
        "retain.methods.compat.readme_block()"
    )


def test_every_check_mark_names_a_test_that_runs_that_method():
    methods = available()
    for strategy, runs in compat.VERIFIED.items():
        for method, (node, machine) in runs.items():
            path, _, function = node.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            assert f"def {function}(" in source, node
            if method == compat.EVERY_METHOD:
                assert "available()" in source, node  # the test runs every registered method
            else:
                # sequential is the method of tests.helpers.tiny_config when a test names none
                named = f'"{method}"' in source or method == "sequential"
                assert method in methods and named, (strategy, method, node)
                name, _, offload = strategy.partition("+")
                declared = methods[method].declared_refusal(Strategy(name, 2, offload=bool(offload)))
                assert declared is None, (strategy, method)
            assert machine.startswith(("CPU", "GPU")), machine


def test_a_refused_cell_shows_its_reason_and_a_declared_one_no_check_mark():
    table = compat.table_markdown()
    osft = next(line for line in table.splitlines() if line.startswith("| `osft`"))
    assert compat.REFUSED in osft and compat.DECLARED not in osft.split("|")[3]
    assert available()["osft"].refused_strategies["sharded-params"] in table
    sequential = next(line for line in table.splitlines() if line.startswith("| `sequential`"))
    cells = [c.strip() for c in sequential.strip("|").split("|")][1:]
    assert cells == [compat.RUN] * len(compat.COLUMNS)  # every column has a run of sequential
    hft = next(line for line in table.splitlines() if line.startswith("| `hft`"))
    assert compat.DECLARED in hft  # DDP only: no run of hft under FSDP or ZeRO


def test_a_registered_plugin_shows_in_the_cli_table_but_not_in_the_generated_docs(monkeypatch):
    from retain.methods import registry

    class Plugin(ContinualMethod):
        name = "_a_plugin"  # sorts before every built-in: its refusal would take footnote 1
        refused_strategies = {"multiprocess": "a plugin's own reason, long enough to be a reason"}

    monkeypatch.setitem(registry._METHODS, "_a_plugin", Plugin)
    assert compat.compatibility_markdown() == (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    assert "| `_a_plugin` |" in compat.table_markdown(available())
    assert "a plugin's own reason" not in compat.table_markdown()
