"""CoIN scorers (retain.evaluation.vqa): every expected value is worked out by hand from CoIN's rules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from retain.errors import RetainError
from retain.evaluation.scoring import get_scorer, list_scorers, needs_source, score
from retain.evaluation.vqa import (
    box_iou,
    extract_option_letter,
    normalize_vqa_answer,
    parse_box,
    parse_vqa_answers,
    to_padded_square,
    vqa_soft_accuracy,
)

COIN_SCORERS = ("vqa_soft", "option_letter", "substring_either", "gqa", "vqav2", "vizwiz", "ocrvqa")


def test_importing_scoring_alone_registers_the_coin_scorers():
    # A fresh interpreter, so that this test module's own import of retain.evaluation.vqa does not count.
    code = "from retain.evaluation.scoring import list_scorers; print(' '.join(list_scorers()))"
    names = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert set(COIN_SCORERS) | {"grounding_iou"} <= set(names.split())
    assert set(COIN_SCORERS) <= set(list_scorers())
    assert not any(needs_source(name) for name in (*COIN_SCORERS, "grounding_iou"))
    assert get_scorer("vizwiz") is get_scorer("vqav2")  # one rule in CoIN, two task names


# --- VQA answer normalisation and soft accuracy (m4c_evaluator.py) ---------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Dog.", "dog"),  # lowercase, article removed, final period dropped
        ("a cat", "cat"),
        ("Three", "3"),  # number words become digits
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero to ten
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # commas are deleted
        ("really?", "really"),
        ("black/white", "black white"),  # a mark between letters becomes a space
        ("x-ray - scan", "xray scan"),  # a mark next to a space anywhere: that mark is deleted everywhere
        ("dont", "don't"),  # contractions get their apostrophe back
        ("couldnt've", "couldn't've"),
        ("couldntve", "couldntve"),  # two apostrophes missing: not in the table
        ("shed", "shed"),  # an ordinary word, not "she'd"
        ("what's", "what 's"),  # "'s" is split off its word
        ("  yes\n", "yes"),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


def _ten(matching: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize(
    "matches, expected",
    # mean over the 10 left-out answers of min(1, matches among the other 9 / 3):
    # m=1: (1*0 + 9*1/3)/10; m=2: (2*1/3 + 8*2/3)/10; m=3: (3*2/3 + 7*1)/10; m=4: (4*1 + 6*1)/10
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_soft_ten_answers(matches, expected):
    assert vqa_soft_accuracy("2", _ten(matches)) == pytest.approx(expected)
    assert get_scorer("vqa_soft")("2", json.dumps(_ten(matches))) == pytest.approx(expected)


def test_vqa_soft_normalises_both_sides():
    # "Two." and "the 2" both normalise to "2": one match of ten is 0.3, not 1.0.
    answers = ["the 2"] + ["three"] * 9
    assert get_scorer("vqa_soft")("Two.", json.dumps(answers)) == pytest.approx(0.3)
    assert get_scorer("vqa_soft")("3", json.dumps(answers)) == pytest.approx(1.0)
    assert get_scorer("vqa_soft")("four", json.dumps(answers)) == 0.0


def test_vqa_soft_fewer_than_ten_answers():
    # 5 answers, 2 match: (2 * min(1, 1/3) + 3 * min(1, 2/3)) / 5 = (2/3 + 2) / 5 = 8/15.
    assert vqa_soft_accuracy("dog", ["dog", "dog", "cat", "cat", "cow"]) == pytest.approx(8 / 15)
    # 3 answers, all match: each left-out subset has 2 matches, 2/3.
    assert vqa_soft_accuracy("dog", ["dog", "dog", "dog"]) == pytest.approx(2 / 3)
    # 2 answers, 1 match: (1 * 0 + 1 * 1/3) / 2 = 1/6.
    assert vqa_soft_accuracy("dog", ["dog", "cat"]) == pytest.approx(1 / 6)


def test_vqa_soft_single_answer_is_exact_match_after_normalisation():
    scorer = get_scorer("vqa_soft")
    assert scorer("Two", "2") == 1.0
    assert scorer("The red car.", "red car") == 1.0
    assert scorer("blue car", "red car") == 0.0
    assert scorer("2", '["2"]') == 1.0


def test_parse_vqa_answers():
    assert parse_vqa_answers('["two", "2", "2"]') == ["two", "2", "2"]
    assert parse_vqa_answers(" yes ") == ["yes"]
    assert parse_vqa_answers("[not json") == ["[not json"]
    assert parse_vqa_answers("[1, 2]") == ["[1, 2]"]  # not a list of strings: one answer
    assert parse_vqa_answers("[]") == ["[]"]
    with pytest.raises(RetainError):
        vqa_soft_accuracy("x", [])


# --- ScienceQA option letter (eval_science_qa.py) -----------------------------------------------------


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("C", "C"),  # the whole text is an option
        ("D. 5 m", "D"),  # "X. " at the start
        ("The answer is E.", "E"),  # the first one-character word
        ("(C)", "C"),
        ("b", "B"),  # upper-cased
        ("I think it is B", "I"),  # CoIN's rule takes the first one-character word, whatever it is
        ("a dog", "A"),
        ("42", None),  # "42" is one word: no one-character word
        ("Paris", None),
        ("", None),
    ],
)
def test_extract_option_letter(prediction, letter):
    assert extract_option_letter(prediction) == letter


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("B", "B", 1.0),
        ("B. Paris", "B", 1.0),
        ("The answer is B.", "B", 1.0),
        ("(C)", "C", 1.0),
        ("(C)", "B", 0.0),
        ("b", "B", 1.0),
        ("B", "(b)", 1.0),  # reference forms "(b)", "B." are accepted
        ("B", "B.", 1.0),
        ("I think it is B", "B", 0.0),  # reads "I"
        ("a dog", "A", 1.0),
        ("1", "A", 0.0),
        ("", "A", 0.0),  # CoIN's "FAILED"
    ],
)
def test_option_letter(prediction, reference, expected):
    assert get_scorer("option_letter")(prediction, reference) == expected


def test_option_letter_rejects_a_reference_that_is_not_a_letter():
    with pytest.raises(RetainError, match="option letter"):
        get_scorer("option_letter")("B", "Paris")


# --- ImageNet (eval_ImagetNet.py) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("tabby cat", "tabby cat", 1.0),
        ("a photo of a tabby cat", "tabby cat", 1.0),  # reference in prediction
        ("cat", "tabby cat", 1.0),  # prediction in reference
        ("  tabby cat\n", "tabby cat", 1.0),
        ("Tabby cat", "tabby cat", 0.0),  # case-sensitive, as CoIN
        ("tabby  cat", "tabby cat", 0.0),  # no whitespace normalisation inside
        ("dog", "tabby cat", 0.0),
        ("", "tabby cat", 0.0),  # deviation: CoIN counts the empty prediction right
    ],
)
def test_substring_either(prediction, reference, expected):
    assert get_scorer("substring_either")(prediction, reference) == expected


# --- GQA, VQAv2 / VizWiz, OCR-VQA: exact matches -----------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("yes", "yes", 1.0),
        ("Yes.", "yes", 1.0),  # lowercased, trailing period dropped
        ("Left...", "left", 1.0),  # every trailing period
        ("yes, it is", "yes", 0.0),
        ("the table", "table", 0.0),  # no article removal
        ("2", "two", 0.0),  # no number words
        ("ye.s", "yes", 0.0),
    ],
)
def test_gqa(prediction, reference, expected):
    assert get_scorer("gqa")(prediction, reference) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("YES", "yes", 1.0),
        ("Unanswerable", "unanswerable", 1.0),
        (" red \n", "Red", 1.0),
        ("yes.", "yes", 0.0),  # no punctuation handling, unlike vqa_soft
        ("two", "2", 0.0),
        ("a red car", "red car", 0.0),
    ],
)
def test_vqav2_and_vizwiz(prediction, reference, expected):
    assert get_scorer("vqav2")(prediction, reference) == expected
    assert get_scorer("vizwiz")(prediction, reference) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("Harry Potter", "harry potter", 1.0),
        ("Fiction", "fiction", 1.0),
        ("Unanswerable", "Unanswerable", 0.0),  # CoIN skips it (and still counts it)
        ("Maybe Unanswerable here", "fiction", 0.0),
        ("unanswerable", "unanswerable", 1.0),  # the skip is case-sensitive
        ("Harry Potter.", "harry potter", 0.0),
    ],
)
def test_ocrvqa(prediction, reference, expected):
    assert get_scorer("ocrvqa")(prediction, reference) == expected


# --- Grounding (eval_grounding.py) -------------------------------------------------------------------------


def test_box_iou_hand_computed():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 0.5, 1), (0, 0, 1, 1)) == 0.5  # intersection 0.5, union 1
    # intersection 0.4 * 0.4 = 0.16, union 0.36 + 0.36 - 0.16 = 0.56
    assert box_iou((0, 0, 0.6, 0.6), (0.2, 0.2, 0.8, 0.8)) == pytest.approx(0.16 / 0.56)
    assert box_iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0  # touching corners


def test_grounding_identical_boxes():
    scorer = get_scorer("grounding_iou")
    assert scorer("[0.1, 0.2, 0.5, 0.6]", "[0.1, 0.2, 0.5, 0.6]") == 1.0
    assert scorer("  [0.1,0.2,0.5,0.6]\n", "[0.1, 0.2, 0.5, 0.6]") == 1.0


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("[0, 0, 0.51, 1]", 1.0),  # IoU 0.51
        ("[0, 0, 0.5, 1]", 0.0),  # IoU 0.5 exactly
        ("[0, 0, 0.49, 1]", 0.0),  # IoU 0.49
        ("[0.2, 0.2, 0.8, 0.8]", 0.0),  # IoU 0.36
        ("[1.5, 1.5, 2, 2]", 0.0),  # disjoint
    ],
)
def test_grounding_threshold(prediction, expected):
    assert get_scorer("grounding_iou")(prediction, "[0, 0, 1, 1]") == expected


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        "no box here",
        "[0.1, 0.2, 0.3]",  # three numbers
        "[0.1, 0.2, 0.3, 0.4, 0.5]",
        "[a, b, c, d]",
        "[0.5, 0.5, 0.1, 0.1]",  # corners swapped: no area
        "[nan, 0, 1, 1]",
        "[0, 0, inf, 1]",
        "0.1 0.2 0.5 0.6",  # no commas
    ],
)
def test_grounding_unparsable_prediction_scores_zero(prediction):
    assert parse_box(prediction) is None
    assert get_scorer("grounding_iou")(prediction, "[0.1, 0.2, 0.5, 0.6]") == 0.0


def test_parse_box_reads_every_digit():
    # CoIN's `[1:-1]` cut would read the last coordinate as 0.7.
    assert parse_box("[0.12, 0.30, 0.56, 0.78]") == (0.12, 0.3, 0.56, 0.78)


def test_to_padded_square_hand_computed():
    # 200 x 100 landscape: padded to 200 x 200, the image shifted down by 50.
    assert to_padded_square([50, 25, 150, 75], 200, 100) == (0.25, 0.375, 0.75, 0.625)
    # 100 x 200 portrait, COCO (x, y, w, h) = (10, 20, 40, 60): corners (10, 20, 50, 80), shifted right by 50.
    assert to_padded_square([10, 20, 40, 60], 100, 200, xywh=True) == pytest.approx((0.3, 0.1, 0.5, 0.4))
    assert to_padded_square([10, 20, 30, 40], 100, 100) == pytest.approx((0.1, 0.2, 0.3, 0.4))


def test_grounding_reference_with_image_size_is_padded():
    reference = json.dumps({"box": [50, 25, 150, 75], "width": 200, "height": 100})
    scorer = get_scorer("grounding_iou")
    assert scorer("[0.25, 0.375, 0.75, 0.625]", reference) == 1.0
    # Normalised by 200 without the padding shift: the boxes do not overlap.
    assert scorer("[0.25, 0.125, 0.75, 0.375]", reference) == 0.0
    # Each axis normalised by its own side (x / 200, y / 100): IoU exactly 0.5 with the padded box.
    assert box_iou((0.25, 0.25, 0.75, 0.75), (0.25, 0.375, 0.75, 0.625)) == 0.5
    assert scorer("[0.25, 0.25, 0.75, 0.75]", reference) == 0.0
    coco = json.dumps({"box": [10, 20, 40, 60], "width": 100, "height": 200, "format": "xywh"})
    assert scorer("[0.3, 0.1, 0.5, 0.4]", coco) == 1.0
    assert score("grounding_iou", "[0.3, 0.1, 0.5, 0.4]", coco) == 1.0


@pytest.mark.parametrize(
    "reference",
    [
        "{not json",
        '{"box": [1, 2, 3], "width": 10, "height": 10}',
        '{"box": [1, 2, 3, 4]}',
        '{"box": [1, 2, 3, 4], "width": 0, "height": 10}',
        '{"box": [0, 0, 1, 1], "width": 10, "height": 10, "format": "cxcywh"}',
        '{"box": [5, 5, 1, 1], "width": 10, "height": 10}',
        "[0.5, 0.5, 0.1, 0.1]",
        "a dog",
    ],
)
def test_grounding_malformed_reference_is_an_error(reference):
    with pytest.raises(RetainError, match="grounding_iou"):
        get_scorer("grounding_iou")("[0, 0, 1, 1]", reference)
