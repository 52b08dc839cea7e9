import pytest

from retain.errors import RetainError
from retain.evaluation.scoring import (
    clean_prediction,
    extract_choice,
    get_scorer,
    list_scorers,
    normalize_text,
    register_scorer,
)


def test_builtin_scorers_are_listed():
    assert {"exact", "normalized", "contains", "choice", "rouge_l"} <= set(list_scorers())
    assert list_scorers() == sorted(list_scorers())


def test_unknown_scorer_suggests_and_lists():
    with pytest.raises(RetainError) as info:
        get_scorer("exakt")
    message = str(info.value)
    assert "'exakt'" in message and "did you mean: exact" in message and "rouge_l" in message


def test_register_custom_scorer():
    @register_scorer("test_always_one")
    def always_one(prediction: str, reference: str) -> float:
        return 1.0

    assert get_scorer("test_always_one") is always_one
    assert "test_always_one" in list_scorers()
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("test_always_one")(lambda p, r: 0.0)


@pytest.mark.parametrize(
    "prediction, reference, score",
    [
        ("Paris", "Paris", 1.0),
        ("  Paris\n", "Paris ", 1.0),
        ("paris", "Paris", 0.0),
        ("Paris.", "Paris", 0.0),
    ],
)
def test_exact(prediction, reference, score):
    assert get_scorer("exact")(prediction, reference) == score


def test_normalize_text_keeps_articles():
    assert normalize_text("  The  Quick,\tbrown FOX!! ") == "the quick brown fox"


@pytest.mark.parametrize(
    "prediction, reference, score",
    [
        ("paris.", "Paris", 1.0),
        ("The   Eiffel tower!", "the eiffel tower", 1.0),
        ("Eiffel tower", "the Eiffel tower", 0.0),  # articles are kept
        ("Paris, France", "Paris", 0.0),
    ],
)
def test_normalized(prediction, reference, score):
    assert get_scorer("normalized")(prediction, reference) == score


@pytest.mark.parametrize(
    "prediction, reference, score",
    [
        ("I think it is Paris, France.", "paris france", 1.0),
        ("The answer is 10", "1", 0.0),  # whole words only
        ("The answer is 1.", "1", 1.0),
        ("London", "Paris", 0.0),
        ("", "", 1.0),
        ("something", "", 0.0),
    ],
)
def test_contains(prediction, reference, score):
    assert get_scorer("contains")(prediction, reference) == score


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) Paris", "B"),
        ("C: blue", "C"),
        ("Answer: B", "B"),
        ("answer: (D)", "D"),
        ("The answer is B", "B"),
        ("I think the answer is C.", "C"),
        ("A cat sat on the mat", None),
        ("the answer is a dog", None),
        ("Paris", None),
        ("", None),
    ],
)
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction) == letter


@pytest.mark.parametrize(
    "prediction, reference, score",
    [
        ("B", "B", 1.0),
        ("(b)", "B", 0.0),  # a lower-case letter in a prediction names no option
        ("The answer is B.", "b", 1.0),
        ("Answer: C", "(B)", 0.0),
        ("paris", "Paris", 1.0),
        ("The answer is Paris.", "Paris", 1.0),
        ("(B) Paris", "paris", 1.0),
        ("London", "Paris", 0.0),
    ],
)
def test_choice(prediction, reference, score):
    assert get_scorer("choice")(prediction, reference) == score


def test_rouge_l_hand_computed():
    rouge_l = get_scorer("rouge_l")
    # LCS("the cat sat on mat", "the cat is on the mat") = "the cat on mat" = 4; P = 4/5, R = 4/6.
    p, r = 4 / 5, 4 / 6
    assert rouge_l("The cat sat on mat.", "the cat is on the mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("a b c", "A B C") == 1.0
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "a") == 0.0


@pytest.mark.parametrize("name", ["exact", "normalized", "contains", "choice", "rouge_l"])
def test_scores_are_in_unit_interval(name):
    scorer = get_scorer(name)
    for prediction, reference in [("B", "B"), ("x", "y"), ("the cat", "a cat sat"), ("", "z")]:
        assert 0.0 <= scorer(prediction, reference) <= 1.0


def test_clean_prediction_cuts_at_earliest_stop_string():
    assert clean_prediction("  Paris\nQuestion: next", ["Question:", "\n"]) == "Paris"
    assert clean_prediction(" 42 ### more", ["###"]) == "42"
    assert clean_prediction(" no stop here ", ["###", ""]) == "no stop here"
    assert clean_prediction("text", []) == "text"
