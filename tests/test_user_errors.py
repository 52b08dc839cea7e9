"""Every user mistake, through the real `retain` command: exit code 2, exactly one `error:` line on
stderr, no traceback, and an existing run directory left byte for byte as it was.

One tiny run (1 task, 2 steps) is built once for the module. Most cases call `retain.cli.main` in this
process (a subprocess costs about 3-5 s of imports each); the cases marked `subprocess` run the real
command, so that logging set-up, exit code and stderr are checked end to end for each kind of mistake.
Cases about permissions run the command without root's power to write anywhere when the tests run as root
(setpriv drops those capabilities), and so always in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from PIL import Image

from retain.config import config_from_dict
from retain.engine.loop import run_experiment

from .helpers import ENV, RETAIN, retain, retain_in_process, tiny_config


def file_hashes(folder: str) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) with the SHA-256 of its bytes."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return out


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str, absent: tuple[str, ...] = ()) -> None:
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    for needle in absent:
        assert needle not in lines[0], lines[0]


@pytest.fixture(scope="module")
def world():
    """A world-readable folder holding one finished tiny run, its config, and the inputs of the cases."""
    base = tempfile.mkdtemp(prefix="retain-user-errors-")
    os.chmod(base, 0o755)
    raw = tiny_config(
        Path(base),
        stream={"train_size": 8, "test_size": 4, "tasks": ["synthetic:parity"]},
        train={"max_steps": 2},
    )
    config = os.path.join(base, "config.yaml")
    with open(config, "w") as handle:
        yaml.safe_dump(raw, handle)
    run_experiment(config_from_dict(raw))  # in process: the cases below start the real command

    data = os.path.join(base, "data")
    os.makedirs(data)
    record = {"instruction": "say hi", "input": "", "output": "hi"}
    files = {
        "good.json": json.dumps([record] * 4),
        "broken.json": '[{"instruction": "x", "output": "y"},\n {"instruction": oops}]',
        "nocol.json": json.dumps([{"instruction": "x"}]),
        "empty.json": "[]",
        "blank_answers.json": json.dumps(
            [{"instruction": f"q{i}", "input": "", "output": ""} for i in range(4)]
        ),
    }
    for split, count in (("with_image", 4), ("with_image_test", 2)):
        records = [
            {"instruction": f"<image>{split} {i}?", "output": "red", "images": ["red.png"]}
            for i in range(count)
        ]
        files[f"{split}.json"] = json.dumps(records)
    Image.new("RGB", (8, 8), "red").save(os.path.join(data, "red.png"))
    for name, text in files.items():
        with open(os.path.join(data, name), "w") as handle:
            handle.write(text)
    info = {name.rsplit(".", 1)[0]: {"file_name": name} for name in files}
    with open(os.path.join(data, "dataset_info.json"), "w") as handle:
        json.dump(info, handle)
    with open(os.path.join(base, "bad.yaml"), "w") as handle:
        handle.write("model: [unclosed\n")
    with open(os.path.join(base, "a_file"), "w") as handle:
        handle.write("not a folder")
    os.makedirs(os.path.join(base, "config_only_model"))
    with open(os.path.join(base, "config_only_model", "config.json"), "w") as handle:
        json.dump({"model_type": "llama"}, handle)
    # A config whose relative dataset_dir exists beside it but not from where retain runs.
    os.makedirs(os.path.join(base, "beside", "data_beside"))
    with open(os.path.join(base, "beside", "c.yaml"), "w") as handle:
        yaml.safe_dump({**raw, "stream": {**raw["stream"], "dataset_dir": "data_beside"}}, handle)
    os.makedirs(os.path.join(base, "locked"))
    os.chmod(os.path.join(base, "locked"), 0o555)
    before = file_hashes(raw["output_dir"])
    yield {"base": base, "config": config, "run": raw["output_dir"], "data": data, "hashes": before}
    for root, dirs, _ in os.walk(base):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class Case:
    """One mistake: the command's arguments (`{config}`, `{run}`, `{data}`, `{base}` are filled in), the
    texts its error line must hold, and whether it runs against the existing run (which must not change)."""

    id: str
    args: list[str]
    needles: list[str] = field(default_factory=list)
    absent: tuple[str, ...] = ()
    existing: bool = True  # run against the existing run directory: every file of it stays as it was
    read_only: bool = False  # the run directory is made read-only (and root's override is dropped)
    unprivileged: bool = False  # run without root's override of permissions (implied by read_only)
    subprocess: bool = False  # run the real `retain` command rather than `retain.cli.main` in this process
    xfail: str = ""


def run_case(*overrides: str) -> list[str]:
    return ["run", "{config}", *overrides]


CASES = [
    # Config values: refused when the config is read, naming the key.
    Case(
        "unknown-method",
        run_case("method.name=replya"),
        ["unknown method 'replya'", "did you mean: replay"],
        subprocess=True,
    ),
    Case(
        "misspelt-key", run_case("train.learnig_rate=1e-4"), ["learnig_rate", "did you mean: learning_rate"]
    ),
    Case(
        "lr-scheduler",
        run_case("lr_scheduler_type=bogus"),
        ["config: train.lr_scheduler_type", "bogus", "cosine"],
    ),
    Case("warmup-ratio", run_case("warmup_ratio=-0.5"), ["config: train.warmup_ratio", "-0.5"]),
    Case("seed", run_case("seed=-1"), ["config: seed", "-1"]),
    Case(
        "lora-dropout",
        run_case("lora_dropout=1.5"),
        ["config: model.lora_dropout", "1.5"],
        absent=("lora_target",),
    ),
    Case("max-steps-zero", run_case("max_steps=0"), ["config: train.max_steps", "-1"]),
    Case("max-steps-below-minus-one", run_case("max_steps=-2"), ["config: train.max_steps", "-2"]),
    Case("lora-alpha", run_case("lora_alpha=-16"), ["config: model.lora_alpha", "-16"]),
    Case("weight-decay", run_case("train.weight_decay=-0.1"), ["config: train.weight_decay", "-0.1"]),
    Case("max-grad-norm", run_case("train.max_grad_norm=-1"), ["config: train.max_grad_norm", "-1"]),
    Case("lora-layers-syntax", run_case("model.lora_layers=top"), ["config: model.lora_layers", "top"]),
    Case(
        "lora-layers-beyond-the-model",
        run_case("model.lora_layers=last:9", "output_dir={base}/layers_run"),
        ["config: model.lora_layers", "it has 2"],
        existing=False,
    ),
    Case(
        "global-batch-with-accumulation",
        run_case("train.global_batch_size=8", "gradient_accumulation_steps=2"),
        ["train.global_batch_size", "not both"],
    ),
    Case("output-dir-placeholder", run_case("output_dir={base}/{{model}}"), ["output_dir", "{{model}}"]),
    Case(
        "dataset-dir-beside-the-config",
        ["run", "{base}/beside/c.yaml"],
        ["stream.dataset_dir", "data_beside", "resolve from where retain runs"],
        existing=False,
    ),
    Case("train-size", run_case("stream.train_size=-3"), ["train_size", "positive"]),
    Case("test-size", run_case("stream.test_size=0"), ["test_size", "positive"]),
    Case("cutoff-len", run_case("train.cutoff_len=8"), ["cutoff_len"]),
    # Data: unknown names, missing or malformed files, records that cannot be scored.
    Case("unknown-dataset", run_case("stream.tasks=[nope_dataset]"), ["nope_dataset"]),
    Case("unknown-synthetic", run_case("stream.tasks=[synthetic:parityy]"), ["parityy", "parity"]),
    Case("missing-file", run_case("stream.tasks=[/nonexistent/file.json]"), ["/nonexistent/file.json"]),
    Case(
        "broken-json",
        run_case("stream.dataset_dir={data}", "stream.tasks=[broken]"),
        ["broken.json", "line 2"],
        subprocess=True,
    ),
    Case(
        "missing-column",
        run_case("stream.dataset_dir={data}", "stream.tasks=[nocol]"),
        ["nocol.json", "output"],
    ),
    Case("empty-file", run_case("stream.dataset_dir={data}", "stream.tasks=[empty]"), ["empty.json"]),
    Case(
        "unknown-name", run_case("stream.dataset_dir={data}", "stream.tasks=[missing_name]"), ["missing_name"]
    ),
    Case(
        "all-answers-empty",
        run_case(
            "stream.dataset_dir={data}", "stream.tasks=[{{name: blank, train: good, test: blank_answers}}]"
        ),
        ["blank_answers", "empty"],
    ),
    Case(
        "images-on-a-text-model",
        run_case(
            "stream.dataset_dir={data}",
            "stream.tasks=[{{name: img, train: with_image, test: with_image_test}}]",
        ),
        ["task 'img' has images", "text-only model"],
    ),
    Case(
        "model-folder-without-weights",
        run_case("model.name_or_path={base}/config_only_model"),
        ["config_only_model"],
    ),
    # Config files.
    Case("malformed-yaml", ["run", "{base}/bad.yaml"], ["bad.yaml", "line"], existing=False),
    Case("missing-config", ["run", "{base}/absent.yaml"], ["absent.yaml"], existing=False),
    # Paths: where the run is written.
    Case("output-dir-is-a-file", run_case("output_dir={base}/a_file"), ["{base}/a_file", "output_dir"]),
    Case(
        "output-dir-unwritable",
        run_case("output_dir={base}/locked/run"),
        ["{base}/locked", "output_dir"],
        unprivileged=True,
    ),
    Case("output-dir-read-only", run_case(), ["{run}", "output_dir"], read_only=True),
    Case("eval-read-only-run", ["eval", "{run}"], ["{run}"], read_only=True),
    # Commands.
    Case("compare-without-runs", ["compare"], ["run_dirs"], existing=False),
]


def _fill(text: str, world: dict) -> str:
    return text.format(config=world["config"], run=world["run"], data=world["data"], base=world["base"])


def _set_writable(folder: str, writable: bool) -> None:
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files, ""]:
            path = os.path.join(root, name) if name else root
            mode = os.stat(path).st_mode
            os.chmod(
                path,
                mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH),
            )


# Root passes every permission check through these capabilities; without them it obeys the mode bits.
DROP_ROOT_OVERRIDES = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def _run_unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    """The command without root's power to write anywhere, so that a read-only folder stops it."""
    if os.geteuid() != 0:
        return retain(*args)
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made read-only to root")
    return subprocess.run(
        [*DROP_ROOT_OVERRIDES, *RETAIN, *args], capture_output=True, text=True, env=ENV, timeout=300
    )


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
        for c in CASES
    ],
)
def test_user_error(world, case, capsys):
    args = [_fill(a, world) for a in case.args]
    needles = [_fill(n, world) for n in case.needles]
    if case.read_only:
        _set_writable(world["run"], False)
        try:
            proc = _run_unprivileged(args)
        finally:
            _set_writable(world["run"], True)
    elif case.unprivileged:
        proc = _run_unprivileged(args)
    elif case.subprocess:
        proc = retain(*args)
    else:
        proc = retain_in_process(*args, capsys=capsys)
    assert_user_error(proc, *needles, absent=case.absent)
    if case.existing:
        assert file_hashes(world["run"]) == world["hashes"]
    assert not os.path.exists(os.path.join(world["base"], "locked", "run"))
