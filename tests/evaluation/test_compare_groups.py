"""`retain compare` groups runs that are seeds of one setting: mean, sample std and a Student-t 95% interval
per metric, checked against numbers computed by hand; runs of different settings keep one row each."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from retain.evaluation.compare import (
    T_975,
    Stats,
    compare_markdown,
    group_runs,
    load_runs,
    overlap_notes,
    sort_groups,
    t_critical,
)


def fake_run(root, name: str, last: float, method: str = "lwf", seed: int = 1, **settings) -> str:
    """A finished one-task run directory: results.json with R = [[0], [last]] and its config.yaml."""
    folder = root / name
    folder.mkdir(parents=True)
    results = {"tasks": ["t1"], "matrix": [[0.0], [last]], "method": method, "timings": {"train_s/1": 2.0}}
    (folder / "results.json").write_text(json.dumps(results))
    config = {
        "model": {"name_or_path": "tiny-random"},
        "method": {"name": method, "params": {}},
        "stream": {"benchmark_order": settings.pop("order", "")},
        "train": {"learning_rate": settings.pop("lr", 1e-4)},
        "output_dir": str(folder),
        "seed": seed,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return str(folder)


def test_stats_match_hand_computed_mean_std_and_t_interval():
    # 0.5, 0.6, 0.7: mean 0.6; sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1; t(0.975, 2) = 4.3027,
    # half-width 4.3027 * 0.1 / sqrt(3) = 0.248417.
    stats = Stats.of([0.5, 0.6, 0.7])
    assert stats.n == 3 and stats.mean == pytest.approx(0.6) and stats.std == pytest.approx(0.1)
    assert stats.low == pytest.approx(0.6 - 0.248417, abs=1e-6)
    assert stats.high == pytest.approx(0.6 + 0.248417, abs=1e-6)
    # Two values 0.2, 0.3: std 0.0707107, t(0.975, 1) = 12.7062, half-width 12.7062 * 0.05 = 0.63531.
    pair = Stats.of([0.2, None, 0.3])
    assert pair.n == 2 and pair.low == pytest.approx(0.25 - 0.63531, abs=1e-5)
    one = Stats.of([0.4])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 0.4, None, None, None)
    assert Stats.of([None]).mean is None


def test_t_table_agrees_with_scipy_and_the_expansion_beyond_30():
    stats = pytest.importorskip("scipy.stats")
    for dof in (*range(1, 31), 31, 45, 100, 1000):
        assert t_critical(dof) == pytest.approx(float(stats.t.ppf(0.975, dof)), abs=1e-4), dof
    assert len(T_975) == 30
    with pytest.raises(ValueError):
        t_critical(0)


def test_groups_seeds_of_one_setting_and_names_them_by_what_differs(tmp_path):
    dirs = [
        fake_run(tmp_path, "a1", 0.5, seed=1, order="order1"),
        fake_run(tmp_path, "a2", 0.6, seed=2, order="order1"),
        fake_run(tmp_path, "a3", 0.7, seed=3, order="order1"),
        fake_run(tmp_path, "b1", 0.2, seed=1, order="order2"),
        fake_run(tmp_path, "b2", 0.3, seed=2, order="order2"),
        fake_run(tmp_path, "c1", 0.9, method="ewc", seed=1, order="order1"),
    ]
    groups = group_runs(load_runs(dirs))
    assert [(g.name, g.n) for g in groups] == [("lwf, order1", 3), ("lwf, order2", 2), ("ewc, order1", 1)]
    assert groups[0].metrics["last"].mean == pytest.approx(0.6)
    assert groups[0].differs == {"method.name": "lwf", "stream.benchmark_order": "order1"}
    assert [g.name for g in sort_groups(groups, "last")] == ["ewc, order1", "lwf, order1", "lwf, order2"]
    assert groups[0].seconds.mean == pytest.approx(2.0)


def test_overlap_notes_say_which_differences_are_within_seed_noise(tmp_path):
    dirs = [fake_run(tmp_path, f"a{i}", v, seed=i) for i, v in enumerate([0.5, 0.6, 0.7])]
    dirs += [fake_run(tmp_path, f"b{i}", v, method="ewc", seed=i) for i, v in enumerate([0.2, 0.3])]
    dirs += [fake_run(tmp_path, f"c{i}", v, method="replay", seed=i) for i, v in enumerate([0.9, 0.91, 0.92])]
    groups = sort_groups(group_runs(load_runs(dirs)), "last")
    # replay [0.875, 0.945], lwf [0.352, 0.848], ewc [-0.385, 0.885]: replay-ewc and lwf-ewc overlap.
    notes = overlap_notes(groups, "last")
    assert "replay and ewc: intervals overlap; the difference is within seed noise" in notes
    assert "lwf and ewc: intervals overlap; the difference is within seed noise" in notes
    assert not any(n.startswith("replay and lwf") for n in notes)
    assert notes[-1] == "intervals apart (the difference exceeds seed noise): replay vs lwf"


def test_compare_groups_only_when_two_runs_share_a_setting(tmp_path):
    a = fake_run(tmp_path, "a1", 0.5, seed=1)
    b = fake_run(tmp_path, "b1", 0.3, seed=1, lr=2e-4)
    per_run = compare_markdown([a, b])
    assert per_run.startswith("| run | method |") and "| a1 | lwf | 1 | 50.0 |" in per_run
    forced = compare_markdown([a, b], group=True)
    assert "| learning_rate=0.0001 | lwf | 1 | 1 | 50.0 |" in forced
    seeds = [a, fake_run(tmp_path, "a2", 0.7, seed=2), b]
    grouped = compare_markdown(seeds)
    half = 12.7062 * math.sqrt(0.02) / math.sqrt(2)  # std of 0.5, 0.7 is sqrt(0.02)
    cell = f"60.0 ± {100 * math.sqrt(0.02):.1f} [{100 * (0.6 - half):.1f}, {100 * (0.6 + half):.1f}]"
    assert f"| learning_rate=0.0001 | lwf | 2 | 1 | {cell} |" in grouped, grouped
    assert "| learning_rate=0.0002 | lwf | 1 | 1 | 30.0 |" in grouped
    assert compare_markdown(seeds, group=False).startswith("| run |")


def test_runs_without_config_yaml_stay_apart(tmp_path):
    a = fake_run(tmp_path, "a1", 0.5)
    b = fake_run(tmp_path, "a2", 0.6, seed=2)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.json").write_text(json.dumps({"tasks": ["t1"], "matrix": [[0.0], [0.4]], "method": "x"}))
    groups = group_runs(load_runs([a, b, str(bare), str(bare / "results.json")]))
    assert [(g.name, g.n) for g in groups] == [("lwf", 2), ("bare", 1), ("bare", 1)]


def test_repeated_folder_names_are_told_apart_by_their_path(tmp_path):
    runs = load_runs([fake_run(tmp_path / "lwf", "seed1", 0.5), fake_run(tmp_path / "ewc", "seed1", 0.4)])
    assert [r.name for r in runs] == [os.path.join("lwf", "seed1"), os.path.join("ewc", "seed1")]


def test_a_setting_missing_from_an_older_config_counts_at_its_default(tmp_path):
    """A run made before a setting existed groups with later runs that have it at its default, and not
    with runs that set it to something else."""
    old = fake_run(tmp_path, "old", 0.5, seed=1)
    new = fake_run(tmp_path, "new", 0.7, seed=2)
    other = fake_run(tmp_path, "other", 0.9, seed=3)
    for folder, eval_only in ((new, []), (other, ["synthetic:parity"])):
        config = yaml.safe_load(open(os.path.join(folder, "config.yaml")))
        config["stream"]["eval_only"] = eval_only
        with open(os.path.join(folder, "config.yaml"), "w") as handle:
            yaml.safe_dump(config, handle)
    groups = group_runs(load_runs([old, new, other]))
    assert sorted(g.n for g in groups) == [1, 2]


def test_many_overlapping_pairs_are_counted_and_the_apart_ones_named(tmp_path):
    dirs = []
    for method in ["a", "b", "c", "d", "e"]:
        dirs += [fake_run(tmp_path, f"{method}{i}", 0.5 + 0.1 * i, method=method, seed=i) for i in range(3)]
    dirs += [fake_run(tmp_path, f"top{i}", v, method="top", seed=i) for i, v in enumerate([0.99, 0.995, 1.0])]
    groups = sort_groups(group_runs(load_runs(dirs)), "last")
    notes = overlap_notes(groups, "last")
    # The five wide groups overlap each other (10 pairs); "top" is apart from all of them.
    assert notes[0] == "10 of 15 pairs: intervals overlap; those differences are within seed noise"
    assert notes[-1].startswith("intervals apart (the difference exceeds seed noise): top vs ")
    assert notes[-1].count(" vs ") == 5 and len(notes) == 2
