import pytest

from retain.data.encode import encode_example
from retain.data.synthetic import SYNTHETIC_TASKS, list_synthetic, load_synthetic
from retain.data.synthetic_visual import VisualTask
from retain.errors import RetainError

REQUIRED = {"arithmetic", "reverse", "parity", "count_letters", "sort_numbers", "unit_conversion"}
SCORERS = {"exact", "normalized", "contains", "choice", "rouge_l"}
# The per-task tests below are for text tasks (a prompt per instance); the visual tasks, whose prompt is the
# same for every picture and which write pictures into the cache, have theirs in test_synthetic_visual.py.
TEXT_TASKS = sorted(name for name, task in SYNTHETIC_TASKS.items() if not isinstance(task, VisualTask))


def _expected(meta):
    """Recompute each task's answer from its meta, independently of the generator."""
    task = meta["task"]
    if task == "arithmetic":
        return str(sum(meta["operands"]))
    if task == "reverse":
        return "".join(reversed(meta["word"]))
    if task == "parity":
        return "odd" if meta["number"] % 2 else "even"
    if task == "count_letters":
        return str(sum(c == meta["letter"] for c in meta["word"]))
    if task == "sort_numbers":
        return ", ".join(str(n) for n in sorted(meta["numbers"]))
    if task == "unit_conversion":
        factors = {("meters", "centimeters"): 100, ("hours", "minutes"): 60, ("kilograms", "grams"): 1000}
        assert factors.get((meta["from"], meta["to"]), meta["factor"]) == meta["factor"]
        return str(meta["value"] * meta["factor"])
    if task == "capital_letters":
        return meta["word"].upper()
    if task == "max_number":
        return str(max(meta["numbers"]))
    if task == "sentiment":
        positive = {"delicious", "friendly", "wonderful", "excellent", "charming", "comfortable", "brilliant"}
        positive |= {"delightful", "pleasant", "superb", "fun", "lovely"}
        assert all(word in meta["review"] for word in meta["words"])
        return "positive" if set(meta["words"]) <= positive else "negative"
    raise AssertionError(f"no reference answer for {task}")


def _prompts(examples):
    return [e.messages[0]["content"] for e in examples]


def test_registry():
    assert REQUIRED <= set(SYNTHETIC_TASKS)
    assert [t.name for t in list_synthetic()] == sorted(SYNTHETIC_TASKS)
    for task in list_synthetic():
        assert task.scorer in SCORERS and task.description


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_task(name, tokenizer):
    train = load_synthetic(f"synthetic:{name}", 300, seed=0, split="train")
    assert len(train) == 300 and len(set(_prompts(train))) == 300
    assert _prompts(train) == _prompts(load_synthetic(f"synthetic:{name}", 300, seed=0, split="train"))
    assert _prompts(train) != _prompts(load_synthetic(f"synthetic:{name}", 300, seed=1, split="train"))
    test = load_synthetic(f"synthetic:{name}", 100, seed=0, split="test")
    other_seed_test = load_synthetic(f"synthetic:{name}", 100, seed=5, split="test")
    assert not set(_prompts(train)) & set(_prompts(test) + _prompts(other_seed_test))
    for example in train[:50] + test[:50]:
        assert example.reference == _expected(example.meta)
        assert example.meta["task"] == name and example.messages[0]["role"] == "user"
        assert "Answer with" in example.messages[0]["content"]
        assert (
            len(tokenizer(example.messages[0]["content"] + example.reference)["input_ids"]) < 120
        )  # tiny vocabulary: short prompts


def test_prompts_are_distinguishable():
    openings = {
        name: {p.split()[0] + " " + p.split()[1] for p in _prompts(task.generate(20, 0, "train"))}
        for name, task in SYNTHETIC_TASKS.items()
        if name in TEXT_TASKS
    }
    for name, words in openings.items():
        for other, other_words in openings.items():
            assert other == name or not words & other_words


def test_encodes(tokenizer):
    example = load_synthetic("synthetic:parity", 1, seed=0, split="test")[0]
    encoded = encode_example(tokenizer, example, cutoff_len=128)
    learned = [t for t in encoded["labels"] if t != -100]
    assert tokenizer.decode(learned) == example.reference + "<|im_end|>"


def test_errors():
    with pytest.raises(RetainError, match=r"unknown synthetic task 'aritmetic' \(did you mean: arithmetic"):
        load_synthetic("synthetic:aritmetic", 5, 0, "train")
    with pytest.raises(RetainError, match="synthetic:<name>"):
        load_synthetic("arithmetic", 5, 0, "train")
    with pytest.raises(RetainError, match="unknown split 'tset'"):
        load_synthetic("synthetic:parity", 5, 0, "tset")
    assert len(load_synthetic("synthetic:parity", 5, 0, "dev")) == 5


def test_capital_letters_counts_only_the_change_of_case():
    from retain.evaluation.scoring import get_scorer

    scorer = get_scorer(SYNTHETIC_TASKS["capital_letters"].scorer)
    assert scorer("PGWBT", "PGWBT") == 1.0
    assert scorer("pgwbt", "PGWBT") == 0.0  # a copied lowercase word is not the answer


def test_sentiment_labels_are_balanced():
    labels = [e.reference for e in load_synthetic("synthetic:sentiment", 400, seed=0, split="train")]
    assert 150 < labels.count("positive") < 250 and set(labels) == {"positive", "negative"}
