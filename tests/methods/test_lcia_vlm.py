"""LCIA on a tiny LLaVA with a trained projector, on a CoIN-format stream of three tasks: TextVQA opens
group 1, ImageNet group 2, GQA retrains group 1 with DEMA. The projector's weights are blended by DEMA
like the LoRA's (the reference's EMA loop covers every trainable parameter), checkpointed with them, and
a run killed before GQA resumes to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.engine import loop
from retain.engine.loop import run_experiment
from retain.methods.lcia import LCIA
from retain.models.tiny import tiny_vlm, tiny_vlm_processor

from ..coin_fixture import coin_fixture
from ..helpers import assert_same

TASKS = ["TextVQA", "ImageNet", "GQA"]
GQA_DIR = "3-GQA"
PROJECTOR = "multi_modal_projector."


def _config(tmp_path, run: str = "run", **method) -> dict:
    vlm = tmp_path / "vlm"
    if not vlm.exists():
        tiny_vlm().save_pretrained(vlm)
        tiny_vlm_processor().save_pretrained(vlm)
    coin = tmp_path / "coin"
    if not coin.exists():
        coin_fixture(coin, tasks=TASKS, train_size=6, test_size=2)
    return {
        "model": {"name_or_path": str(vlm), "lora_rank": 4, "lora_alpha": 8, "train_projector": True},
        "stream": {"benchmark": "CoIN", "benchmark_dir": str(coin), "tasks": TASKS},
        "method": {"name": "lcia", **method},
        "train": {
            "learning_rate": 2e-2,
            "per_device_train_batch_size": 2,
            "max_steps": 4,
            "cutoff_len": 128,
            "logging_steps": 1,
            "bf16": "false",
        },
        "eval": {"max_new_tokens": 3, "batch_size": 2},
        "output_dir": str(tmp_path / run),
        "seed": 3,
    }


def _projector(folder) -> dict[str, torch.Tensor]:
    saved = load_file(folder / "adapter" / "trainable_base.safetensors")
    assert saved and all(PROJECTOR in name for name in saved)
    return saved


def _reference_dema(steps: list[tuple[dict, dict]], c: float = 2.0, fallback: float = 0.01) -> dict:
    """The reference's ema_update over recorded (gradient, weights after the step) pairs, written out
    independently of retain's DynamicEMA: theta* starts as the weights after step 1 (whose alpha is the
    fallback: there is no previous gradient), then alpha = c (1 + |g|) / (|theta - theta*| |g - g_prev|)."""
    ema: dict[str, torch.Tensor] = {}
    previous: dict[str, torch.Tensor] = {}
    for grads, values in steps:
        for name, value in values.items():
            grad = grads[name].double()
            if name not in ema:
                ema[name] = value.double().clone()
            else:
                a = (value.double() - ema[name]).abs().sum()
                b = grad.abs().sum()
                d = (grad - previous[name]).abs().sum()
                alpha = float(c * (1 + b) / (a * d)) if float(a * d) > 0 else fallback
                alpha = alpha if 0 < alpha < 1 else fallback
                ema[name] = (1 - alpha) * ema[name] + alpha * value.double()
            previous[name] = grad
    return ema


def test_dema_blends_the_projector_and_the_checkpoint_holds_the_blend(tmp_path, monkeypatch):
    """During GQA (group 1 retrained), every step's gradient and weights of the projector are recorded; the
    projector saved after GQA must equal the reference's DEMA over them, not the raw trained weights."""
    steps: list[tuple[dict, dict]] = []
    grads: dict[str, torch.Tensor] = {}
    capture, update = LCIA.before_optimizer_step, LCIA.after_optimizer_step

    def projector_params(method):
        return {n: p for n, p in method.params.items() if PROJECTOR in n}

    def spy_capture(self, ctx, model):
        if self.ema is not None:
            grads.clear()
            grads.update({n: p.grad.detach().clone() for n, p in projector_params(self).items()})
        capture(self, ctx, model)

    def spy_update(self, ctx, model):
        if self.ema is not None:
            steps.append((dict(grads), {n: p.detach().clone() for n, p in projector_params(self).items()}))
        update(self, ctx, model)

    monkeypatch.setattr(LCIA, "before_optimizer_step", spy_capture)
    monkeypatch.setattr(LCIA, "after_optimizer_step", spy_update)
    run_experiment(config_from_dict(_config(tmp_path, keep_raw=True)))

    run = tmp_path / "run"
    book = json.loads((run / "lcia_codebook.json").read_text())
    assert [g["tasks"] for g in book["groups"]] == [["TextVQA", "GQA"], ["ImageNet"]]
    assert [t["dema"] for t in book["tasks"]] == [False, False, True]
    assert book["tasks"][2]["dema_tensors"]["base"] == 4  # the projector's two weights and two biases
    assert len(steps) == 4 and len(steps[0][1]) == 4

    saved = _projector(run / "tasks" / GQA_DIR)
    before = _projector(run / "tasks" / "2-ImageNet")
    expected = _reference_dema(steps)
    raw = steps[-1][1]  # the weights after GQA's last step
    state = torch.load(run / "tasks" / GQA_DIR / "method_state.pt", weights_only=True)
    for name, value in saved.items():
        assert torch.allclose(value.double(), expected[name], atol=1e-6), name
        assert torch.equal(state["raw"]["default"][name], raw[name].float())  # keep_raw holds the raw one
        assert not torch.allclose(value, before[name])  # GQA trained it
    assert sum(float((saved[n] - raw[n]).abs().sum()) for n in saved) > 1e-4  # the blend is not the raw


def test_new_groups_train_the_projector_without_dema(tmp_path):
    """Tasks that open a group train plainly (the reference runs them with --dema False), the projector
    included: the codebook records no DEMA tensors for them."""
    run_experiment(config_from_dict(_config(tmp_path, dema_on_new_group=False)))
    book = json.loads((tmp_path / "run" / "lcia_codebook.json").read_text())
    assert ["dema_tensors" in t for t in book["tasks"]] == [False, False, True]
    first = _projector(tmp_path / "run" / "tasks" / "1-TextVQA")
    initial = {n.split("base_model.model.", 1)[-1]: p for n, p in tiny_vlm().named_parameters()}
    assert any(not torch.allclose(v, initial[n.split("base_model.model.", 1)[-1]]) for n, v in first.items())


class Crash(RuntimeError):
    pass


def test_a_run_killed_before_the_dema_task_resumes_to_the_same_projector(tmp_path, monkeypatch):
    whole = run_experiment(config_from_dict(_config(tmp_path, "whole")))
    real_train = loop.Experiment.train_unit

    def crash_in_task_3(self, index):
        if index == 3:
            raise Crash("killed during GQA")
        return real_train(self, index)

    monkeypatch.setattr(loop.Experiment, "train_unit", crash_in_task_3)
    with pytest.raises(Crash):
        run_experiment(config_from_dict(_config(tmp_path, "crashed")))
    monkeypatch.setattr(loop.Experiment, "train_unit", real_train)
    resumed = run_experiment(config_from_dict(_config(tmp_path, "crashed")))
    assert_same(resumed, whole)
    for folder in ("2-ImageNet", GQA_DIR):
        want = _projector(tmp_path / "whole" / "tasks" / folder)
        got = _projector(tmp_path / "crashed" / "tasks" / folder)
        assert all(torch.equal(got[n], want[n]) for n in want), folder
    book = json.loads((tmp_path / "crashed" / "lcia_codebook.json").read_text())
    assert book == json.loads((tmp_path / "whole" / "lcia_codebook.json").read_text())
