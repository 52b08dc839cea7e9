"""Scorers of the CoIN multimodal continual-instruction-tuning benchmark, as plain text scorers.

CoIN (Chen et al., 2024; github.com/zackschen/CoIN, also in JingyangQiao/CoIN) evaluates eight tasks,
each with its own script. The scripts compare the generated text with the annotation, so the images are not
needed to score: every scorer here is `(prediction, reference) -> float in [0, 1]`. The reference paths below
are those of zackschen/CoIN (`ETrain/Eval/LLaVA/CoIN/...`); JingyangQiao/CoIN has the same logic in
`llava/eval/CoIN/...` and `llava/eval/m4c_evaluator.py`.

- `option_letter` (ScienceQA): the first option letter of the text is the answer (eval_science_qa.py).
- `vqa_soft` (TextVQA): leave-one-out soft accuracy over ten answers (eval_textvqa.py, m4c_evaluator.py).
- `substring_either` (ImageNet): answer in prediction or prediction in answer (eval_ImagetNet.py).
- `gqa` (GQA): lowercased, trailing periods dropped, exact (convert_gqa_for_eval.py, eval_gqa.py).
- `vqav2`, `vizwiz` (VQAv2, VizWiz): case-insensitive exact match (eval_vqav2.py, eval_vizwiz.py).
- `grounding_iou` (Grounding, RefCOCO boxes): IoU of the boxes > 0.5 (eval_grounding.py).
- `ocrvqa` (OCR-VQA): case-insensitive exact, "Unanswerable" scores 0 (eval_ocrvqa.py).

VizWiz and VQAv2 are *not* scored with the VQA soft accuracy in CoIN: eval_vizwiz.py and eval_vqav2.py
import `TextVQAAccuracyEvaluator` but never use it; they compare `pred.upper() == answer.upper()` with the
single `answer` field of CoIN's converted annotation files. `vqa_soft` scores them the official way.

Common deviation: predictions and references are stripped of surrounding whitespace. CoIN's generation
scripts (model_vqa.py etc.) already strip the generated text, so this changes nothing on CoIN's own outputs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from retain.errors import RetainError
from retain.evaluation.scoring import register_scorer

# ---------------------------------------------------------------------------------------------------------
# VQA answer normalisation (EvalAIAnswerProcessor in ETrain/Eval/LLaVA/CoIN/m4c_evaluator.py, itself taken
# from facebookresearch/mmf and the official VQA evaluation).

# Contractions as the VQA evaluation writes them. Annotators and models often drop an apostrophe, so each form
# is also looked up with any one of its apostrophes missing ("dont", "couldnt've", "couldn'tve"). The official
# table has exactly those variants, no more: "couldntve" (two apostrophes missing) is left alone, and so are
# ordinary words such as "shed", "well" or "its" (no "she'd", "we'll", "it's" forms are listed).
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _one_apostrophe_dropped(word: str) -> list[str]:
    return [word[:i] + word[i + 1 :] for i, char in enumerate(word) if char == "'"]


_CONTRACTIONS: dict[str, str] = {
    variant: word for word in _CONTRACTED for variant in _one_apostrophe_dropped(word)
}
# The official table also maps "somebody'd" to "somebodyd" (the reverse of every other entry); kept so that
# answers normalise the same way. Its upper-case entries ("Im", "Ive", "Id've") never match lowercased text
# and are therefore left out.
_CONTRACTIONS["somebody'd"] = "somebodyd"

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The punctuation the VQA evaluation handles; others (' : . * # $ % & ^ | ~) are kept, except periods below.
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# A period not followed by a digit is dropped, so "3.5" keeps its decimal point and "dog." loses its period.
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer as the VQA / TextVQA evaluation (EvalAI) does, before comparing answers.

    Lowercase; drop "," and "?"; split "'s" off its word; then each VQA punctuation mark is deleted when the
    text has it next to a space (as in "black / white") and replaced by a space otherwise ("black/white");
    periods not followed by a digit are dropped; number words up to ten become digits ("none" -> "0");
    the articles a / an / the are removed; contractions missing an apostrophe get it back ("dont" -> "don't").

    Follows `EvalAIAnswerProcessor` in ETrain/Eval/LLaVA/CoIN/m4c_evaluator.py. Deviation: that code passes
    `re.UNICODE` where `re.sub` expects a count, so it drops at most 32 periods; here all of them are dropped.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Whether a mark touches a space is decided on the text before any mark is replaced, as EvalAI does.
    # (EvalAI also deletes every mark when the text has a comma between digits, but commas are gone by now.)
    original = text
    for mark in _VQA_PUNCTUATION:
        spaced = mark + " " in original or " " + mark in original
        text = text.replace(mark, "" if spaced else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def parse_vqa_answers(reference: str) -> list[str]:
    """The human answers a `vqa_soft` reference holds: a JSON list of strings, or else one plain answer.

    `'["two", "2", "2"]'` is three answers; `'2'` and `'[not json'` are a single answer each.
    """
    text = reference.strip()
    if text.startswith("["):
        try:
            answers = json.loads(text)
        except json.JSONDecodeError:
            answers = None
        if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
            return answers
    return [text]


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of a prediction against the human answers (normally ten).

    For each answer left out in turn, the prediction scores min(1, matches among the other answers / 3); the
    accuracy is the mean over the left-out answers. With ten answers that is 0.3 for 1 match, 0.6 for 2,
    0.9 for 3 and 1.0 for 4 or more. `TextVQAAccuracyEvaluator._compute_answer_scores` in
    ETrain/Eval/LLaVA/CoIN/m4c_evaluator.py computes it (and asserts exactly ten answers).

    Deviations, for references that do not hold ten answers: n answers give the mean over n leave-one-out
    subsets (so two answers that agree give 1/3, three give 2/3), and a single answer is taken as the
    annotators' unanimous answer, i.e. exact match after normalisation (ten identical answers score 1.0 on a
    match; one answer left out of itself would always score 0).
    """
    if not answers:
        raise RetainError("vqa_soft needs at least one reference answer; the reference holds none")
    predicted = normalize_vqa_answer(prediction)
    normalized = [normalize_vqa_answer(answer) for answer in answers]
    matches = sum(answer == predicted for answer in normalized)
    if len(normalized) == 1:
        return float(matches)
    # Leaving out a matching answer leaves matches - 1 among the others, a non-matching one leaves matches.
    left_out_match = matches * min(1.0, (matches - 1) / 3)
    left_out_other = (len(normalized) - matches) * min(1.0, matches / 3)
    return (left_out_match + left_out_other) / len(normalized)


@register_scorer("vqa_soft")
def vqa_soft(prediction: str, reference: str) -> float:
    """TextVQA / VQA soft accuracy (CoIN's TextVQA metric, ETrain/Eval/LLaVA/CoIN/eval_textvqa.py).

    The reference is the JSON list of the human answers (`'["2", "two", ...]'`), or one plain answer; both
    sides are normalised with `normalize_vqa_answer`. See `vqa_soft_accuracy` for the formula.
    """
    return vqa_soft_accuracy(prediction, parse_vqa_answers(reference))


# ---------------------------------------------------------------------------------------------------------
# ScienceQA (ETrain/Eval/LLaVA/CoIN/eval_science_qa.py).

_SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
# The first one-character word anywhere in the text: "B" in "The answer is B.", "C" in "(C)".
_SINGLE_CHARACTER_WORD = re.compile(r"\b(\w)\b")


def extract_option_letter(prediction: str) -> str | None:
    """The option letter CoIN reads from a ScienceQA answer, or None (CoIN's "FAILED").

    In CoIN's order: the whole text when it is one of A-E; the first character when the text starts with
    "A. " .. "E. "; otherwise the first one-character word of the text, upper-cased. The last rule takes
    what it finds: "I think B" gives "I" and "a dog" gives "A", as in CoIN.
    """
    text = prediction.strip()
    if text in _SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in _SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    match = _SINGLE_CHARACTER_WORD.search(text)
    return match.group(1).upper() if match is not None else None


@register_scorer("option_letter")
def option_letter(prediction: str, reference: str) -> float:
    """ScienceQA accuracy as CoIN scores it: 1.0 when the extracted letter is the reference letter.

    The reference is the answer's letter ("B"; "b", "(B)" and "B." are accepted). See
    `extract_option_letter` for how the letter is read (ETrain/Eval/LLaVA/CoIN/eval_science_qa.py); a text
    with no letter, or with a letter beyond the question's choices, is wrong there, as it is here.
    """
    letter = reference.strip().strip("().").upper()
    if len(letter) != 1 or not ("A" <= letter <= "Z"):
        raise RetainError(f"option_letter needs an option letter as the reference, got {reference!r}")
    return float(extract_option_letter(prediction) == letter)


# ---------------------------------------------------------------------------------------------------------
# ImageNet (ETrain/Eval/LLaVA/CoIN/eval_ImagetNet.py).


@register_scorer("substring_either")
def substring_either(prediction: str, reference: str) -> float:
    """ImageNet accuracy as CoIN scores it: the reference occurs in the prediction or the other way round.

    Case-sensitive and without normalisation, as in ETrain/Eval/LLaVA/CoIN/eval_ImagetNet.py, so a short
    prediction inside the label ("cat" for "tabby cat") counts as right. Deviation: an empty prediction
    scores 0.0; CoIN counts it right, since the empty string occurs in every label.
    """
    pred, ref = prediction.strip(), reference.strip()
    if not pred:
        return 0.0
    return float(ref in pred or pred in ref)


# ---------------------------------------------------------------------------------------------------------
# GQA, VizWiz, VQAv2, OCR-VQA: exact matches, each with CoIN's own normalisation.


@register_scorer("gqa")
def gqa(prediction: str, reference: str) -> float:
    """GQA accuracy as CoIN scores it: the lowercased prediction, less trailing periods, is the answer.

    ETrain/Eval/LLaVA/CoIN/convert_gqa_for_eval.py turns each output into `text.rstrip('.').lower()` and
    eval_gqa.py (the official GQA script) compares it with the answer by `==`. Deviation: the reference is
    lowercased too; GQA's answers already are, so this changes nothing on GQA.
    """
    return float(prediction.strip().rstrip(".").lower() == reference.strip().lower())


@register_scorer("vqav2")
def vqav2(prediction: str, reference: str) -> float:
    """VQAv2 / VizWiz accuracy as CoIN scores them: case-insensitive exact match with one answer.

    ETrain/Eval/LLaVA/CoIN/eval_vqav2.py and eval_vizwiz.py compare `pred.upper() == answer.upper()` with the
    single `answer` of CoIN's annotation (not the ten-answer soft accuracy; use `vqa_soft` for that). The
    reference is that one answer; no punctuation or article normalisation is applied.
    """
    return float(prediction.strip().upper() == reference.strip().upper())


# The same rule under the VizWiz name, so that each task names its own benchmark.
vizwiz = register_scorer("vizwiz")(vqav2)


@register_scorer("ocrvqa")
def ocrvqa(prediction: str, reference: str) -> float:
    """OCR-VQA accuracy as CoIN scores it: case-insensitive exact match; "Unanswerable" answers score 0.

    ETrain/Eval/LLaVA/CoIN/eval_ocrvqa.py skips (but still counts in the total) every prediction that
    contains "Unanswerable" (case-sensitive, anywhere in the text), then compares `pred.lower() ==
    answer.lower()`.
    """
    if "Unanswerable" in prediction:
        return 0.0
    return float(prediction.strip().lower() == reference.strip().lower())


# ---------------------------------------------------------------------------------------------------------
# Grounding (ETrain/Eval/LLaVA/CoIN/eval_grounding.py).

Box = tuple[float, float, float, float]


def parse_box(text: str) -> Box | None:
    """A box "[x1, y1, x2, y2]" as four finite floats with x1 < x2 and y1 < y2, or None if it is not one.

    As CoIN, the square brackets are removed (wherever they are) and the rest is split at commas. Deviation:
    CoIN then cuts the first and last character off the text (`pred_bbox[1:-1]`), which on LLaVA's
    "[0.12, 0.30, 0.56, 0.78]" reads the last coordinate as 0.7; the full numbers are read here. A box
    with no area (x2 <= x1 or y2 <= y1) is rejected, where CoIN computes an IoU from signed sizes.
    """
    parts = text.replace("[", "").replace("]", "").split(",")
    if len(parts) != 4:
        return None
    try:
        values = [float(part) for part in parts]
    except ValueError:
        return None
    return _checked_box(values)


def _checked_box(values: Sequence[float]) -> Box | None:
    """The four values as a box when they are finite and the box has an area, else None."""
    x1, y1, x2, y2 = values
    if not all(math.isfinite(v) for v in values) or x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (`calculate_iou` in eval_grounding.py)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def to_padded_square(box: Sequence[float], width: float, height: float, xywh: bool = False) -> Box:
    """A pixel box of a width x height image, in 0-1 coordinates of the image padded to a square.

    LLaVA pads an image to a square (`expand2square`: the image centred, the shorter side padded equally on
    both sides) and its RefCOCO boxes are normalised to that square. `change_bbox` in
    ETrain/Eval/LLaVA/CoIN/eval_grounding.py does this conversion from a COCO (x, y, w, h) box: shift the
    shorter axis by (long - short) / 2, divide by the long side. It uses a float offset where expand2square
    pastes at the integer offset (long - short) // 2; the float offset is used here, as in change_bbox.
    """
    x1, y1, a, b = (float(v) for v in box)
    x2, y2 = (x1 + a, y1 + b) if xywh else (a, b)
    side = max(width, height)
    dx, dy = (side - width) / 2, (side - height) / 2
    return (x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side


def parse_grounding_reference(reference: str) -> Box:
    """The reference box of `grounding_iou` in padded-square 0-1 coordinates; a malformed one is an error.

    Either "[x1, y1, x2, y2]" already in those coordinates (as CoIN's `answer_bbox` and LLaVA's RefCOCO data
    give it), or a JSON object `{"box": [x1, y1, x2, y2], "width": W, "height": H}` with the box in pixels of
    the original W x H image, converted with `to_padded_square`; `"format": "xywh"` marks a COCO
    (x, y, w, h) box.
    """
    text = reference.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
            xywh = {"xyxy": False, "xywh": True}[spec.get("format", "xyxy")]
            box = [float(v) for v in spec["box"]]
            width, height = float(spec["width"]), float(spec["height"])
            if len(box) != 4 or not (width > 0 and height > 0):
                raise ValueError("need four coordinates and a positive width and height")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise RetainError(
                f"grounding_iou: cannot read the reference {reference!r} ({error}); write it as "
                '{"box": [x1, y1, x2, y2], "width": W, "height": H} in pixels, or as "[x1, y1, x2, y2]" '
                "in 0-1 coordinates of the padded square image"
            ) from None
        parsed = _checked_box(to_padded_square(box, width, height, xywh))
    else:
        parsed = parse_box(text)
    if parsed is None:
        raise RetainError(
            f"grounding_iou: the reference {reference!r} is not a box [x1, y1, x2, y2] "
            "with x1 < x2 and y1 < y2"
        )
    return parsed


@register_scorer("grounding_iou")
def grounding_iou(prediction: str, reference: str) -> float:
    """Grounding accuracy as CoIN scores it: 1.0 when the predicted box overlaps the reference with IoU > 0.5.

    The prediction is "[x1, y1, x2, y2]" in 0-1 coordinates of the padded square image (what LLaVA is
    trained to write); one that does not parse (see `parse_box`) scores 0.0, as CoIN skips it but counts it.
    For the reference see `parse_grounding_reference`. CoIN's eval_grounding.py multiplies both boxes by
    max(width, height) before the IoU, which does not change the IoU, so a reference in 0-1 coordinates
    needs no image size; the size matters only to convert a pixel box (`change_bbox`, which CoIN defines but
    leaves commented out since its `answer_bbox` is already normalised).
    """
    target = parse_grounding_reference(reference)
    predicted = parse_box(prediction.strip())
    if predicted is None:
        return 0.0
    return float(box_iou(predicted, target) > 0.5)
