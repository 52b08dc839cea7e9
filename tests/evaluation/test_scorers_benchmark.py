"""Scorers of the continual-learning benchmarks: accuracy, token F1, edit similarity (Py150) and SARI."""

from __future__ import annotations

import random
import time

import pytest

from retain.errors import RetainError
from retain.evaluation.scoring import (
    _lcs_length,
    get_scorer,
    list_scorers,
    needs_source,
    register_scorer,
    sari_operations,
    score,
)


def test_benchmark_scorers_are_listed():
    assert {"accuracy", "f1", "edit_sim", "sari"} <= set(list_scorers())
    assert needs_source("sari") and not needs_source("accuracy") and not needs_source(get_scorer("f1"))


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("Positive.", "positive", 1.0),
        ("  positive \n", "Positive", 1.0),
        ("NOT_ENTAILMENT", "not_entailment", 1.0),
        ("positive", "negative", 0.0),
        ("-1", "1", 0.0),  # signs are kept: `normalized` would call these equal
        ("positive review", "positive", 0.0),
        ("", "", 1.0),
    ],
)
def test_accuracy(prediction, reference, expected):
    assert get_scorer("accuracy")(prediction, reference) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("the cat sat", "The cat sat.", 1.0),
        ("cat", "the cat sat", 0.5),  # precision 1, recall 1/3
        ("a a b", "a b b", 2 / 3),  # bag of words: 2 common tokens of 3
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("", "cat", 0.0),
    ],
)
def test_token_f1(prediction, reference, expected):
    assert get_scorer("f1")(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    "a, b, fuzz_ratio",
    [
        # The values fuzzywuzzy's README gives for fuzz.ratio (which rounds to whole percent).
        ("this is a test", "this is a test!", 97),
        ("fuzzy wuzzy was a bear", "wuzzy fuzzy was a bear", 91),
        ("abc", "abc", 100),
        ("abc", "xyz", 0),
    ],
)
def test_edit_sim_is_fuzz_ratio(a, b, fuzz_ratio):
    assert round(100 * get_scorer("edit_sim")(a, b)) == fuzz_ratio


def test_edit_sim_empty_strings():
    edit_sim = get_scorer("edit_sim")
    assert edit_sim("", "") == 1.0
    assert edit_sim("", "x = 1") == 0.0 and edit_sim("x = 1", "") == 0.0


def test_edit_sim_matches_exact_lcs_dynamic_programming():
    rng = random.Random(0)
    edit_sim = get_scorer("edit_sim")
    for _ in range(200):
        a = "".join(rng.choice("ab c(x)") for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice("ab c(x)") for _ in range(rng.randint(0, 40)))
        expected = 2 * _lcs_length(list(a), list(b)) / (len(a) + len(b)) if a or b else 1.0
        assert edit_sim(a, b) == pytest.approx(expected, abs=1e-12)


def test_edit_sim_is_fast_on_code_lines():
    rng = random.Random(1)
    code = "self.x = foo(bar, 1)\n"
    pairs = [
        ("".join(rng.choice(code) for _ in range(400)), "".join(rng.choice(code) for _ in range(300)))
        for _ in range(50)
    ]
    edit_sim = get_scorer("edit_sim")
    start = time.perf_counter()
    for a, b in pairs:
        edit_sim(a, b)
    # Bit-parallel LCS: about 0.1 ms per pair here (the plain DP takes about 15 ms).
    assert time.perf_counter() - start < 0.5


def test_sari_hand_computed_case():
    # source "a b c", prediction "a c d", reference "a d" (computed by hand with 0/0 = 1):
    # keep  = (2/3 [unigrams: P 1/2, R 1] + 1 + 1 + 1) / 4 = 11/12
    # delete = (1 + 1 + 1 + 1) / 4 = 1
    # add   = (1 + 0 [bigrams ac, cd: none in ref] + 0 [acd not in ref, nothing to add] + 1) / 4 = 1/2
    keep, delete, add = sari_operations("a b c", "a c d", ["a d"])
    assert (keep, delete, add) == pytest.approx((11 / 12, 1.0, 0.5))
    assert get_scorer("sari")("a c d", "a d", source="a b c") == pytest.approx(29 / 36)


def test_sari_matches_huggingface_evaluate_example():
    # The example of Hugging Face evaluate's `sari` (3 references, text already 13a-tokenized): 26.9536...
    keep, delete, add = sari_operations(
        "About 95 species are currently accepted .",
        "About 95 you now get in .",
        [
            "About 95 species are currently known .",
            "About 95 species are now accepted .",
            "95 species are now accepted .",
        ],
    )
    assert (keep + delete + add) / 3 == pytest.approx(0.26953601953601954, abs=1e-12)


def test_sari_properties():
    # No word repeats in the source: a repeated source word the reference keeps once counts as partly
    # wrongly deleted (as in the reference implementations), so even the reference itself scores below 1.
    source = "the committee has decided to postpone our meeting until further notice"
    reference = "the meeting is put off for now"
    sari = get_scorer("sari")
    # Copying the source adds nothing, so the add score is 0 wherever the reference adds n-grams.
    _, _, add = sari_operations(source, source, [reference])
    assert add == 0.0
    assert sari(reference, reference, source=source) == pytest.approx(1.0)
    assert sari(reference, reference, source=source) > sari(source, reference, source=source)
    assert sari("The Meeting is put OFF for now", reference, source=source) == pytest.approx(1.0)
    for prediction in ("", "meeting", source, "completely unrelated words here"):
        assert 0.0 <= sari(prediction, reference, source=source) <= 1.0


def test_score_passes_the_source_only_to_scorers_that_need_it():
    assert score("exact", "a", "a", source="ignored") == 1.0
    assert score("sari", "a c d", "a d", "a b c") == pytest.approx(29 / 36)
    with pytest.raises(RetainError, match="needs the source"):
        score("sari", "a", "a")

    @register_scorer("test_source_echo", needs_source=True)
    def source_echo(prediction: str, reference: str, *, source: str) -> float:
        return float(source == "src")

    assert needs_source("test_source_echo")
    assert score(source_echo, "p", "r", "src") == 1.0 and score("test_source_echo", "p", "r", "x") == 0.0
