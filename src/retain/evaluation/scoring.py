"""Scorers: functions `(prediction, reference) -> float in [0, 1]`, registered by name.

As in lm-evaluation-harness, a task names its scorer (`exact`, `normalized`, `contains`, `choice`,
`rouge_l`) and `get_scorer` looks it up; `@register_scorer("my_scorer")` adds a custom one. The score of a
task is the mean of its examples' scores, so every scorer returns a value in [0, 1].
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

from retain.errors import RetainError, did_you_mean

Scorer = Callable[[str, str], float]

_SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register a scorer `(prediction, reference) -> float in [0, 1]` under `name`."""

    def decorator(fn: Scorer) -> Scorer:
        # A second registration under the same name would silently change every task that uses it.
        if name in _SCORERS and _SCORERS[name] is not fn:
            raise ValueError(f"a scorer named {name!r} is already registered ({_SCORERS[name].__qualname__})")
        _SCORERS[name] = fn
        return fn

    return decorator


def get_scorer(name: str) -> Scorer:
    """Return the scorer registered as `name`; an unknown name is a RetainError listing the known ones."""
    try:
        return _SCORERS[name]
    except KeyError:
        raise RetainError(
            f"unknown scorer {name!r}{did_you_mean(name, _SCORERS)}; available scorers: "
            f"{', '.join(list_scorers())}. Use one of them, or register your own with @register_scorer."
        ) from None


def list_scorers() -> list[str]:
    """Names of all registered scorers, sorted."""
    return sorted(_SCORERS)


def clean_prediction(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string, then strip surrounding whitespace."""
    cut = len(text)
    for stop in stop_strings:
        if stop:  # an empty stop string would cut everything
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut].strip()


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation without article removal: lowercase, drop punctuation, collapse spaces."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


@register_scorer("exact")
def exact(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference are equal after stripping surrounding whitespace."""
    return float(prediction.strip() == reference.strip())


@register_scorer("normalized")
def normalized(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference are equal after `normalize_text` (case, punctuation, spaces)."""
    return float(normalize_text(prediction) == normalize_text(reference))


@register_scorer("contains")
def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalized reference occurs in the normalized prediction as whole words.

    Whole words, so that the reference "1" is not found in the prediction "10".
    """
    ref = normalize_text(reference)
    pred = normalize_text(prediction)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


# Option letters a model writes: "B", "(B)", "B.", "B)", "B: Paris" at the start of the answer.
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])(?:\)|[.:)](?=\s|$)|$)")
# "Answer: B", "The answer is (B)", "option C", "choice D" anywhere in the answer.
_ANSWER_LETTER = re.compile(
    r"(?:answer(?:\s+is)?|option|choice)\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE
)
# A reference given as a letter: "b", "B", "(B)", "B." (case-insensitive: datasets are inconsistent).
_REFERENCE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?[.:)]?\s*$")
# What to strip before comparing a prediction with a label: an "answer is" prefix and an option marker.
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?\s*:?\s*", re.IGNORECASE)
_OPTION_MARKER = re.compile(r"^\s*\(?[A-Z](?:\)|[.:)](?=\s|$))\s*")


def extract_choice(prediction: str) -> str | None:
    """The option letter ("A".."Z") a prediction states, or None when it states none."""
    match = _LEADING_LETTER.match(prediction)
    if match is None:
        match = _ANSWER_LETTER.search(prediction)
    # The letter must be upper case even after "answer is": "the answer is a dog" names no option.
    if match is None or not match.group(1).isupper():
        return None
    return match.group(1)


@register_scorer("choice")
def choice(prediction: str, reference: str) -> float:
    """Multiple choice: the reference is an option letter or the option's label.

    With a letter, 1.0 when the prediction states that letter ("B", "(B)", "B.", "Answer: B",
    "The answer is B"). With a label, 1.0 when the prediction, less an "answer is" prefix and an option
    marker, equals the label case-insensitively (after `normalize_text`).
    """
    letter = _REFERENCE_LETTER.match(reference)
    if letter is not None:
        return float(extract_choice(prediction) == letter.group(1).upper())
    label = normalize_text(reference)
    answer = _OPTION_MARKER.sub("", _ANSWER_PREFIX.sub("", prediction, count=1), count=1)
    return float(normalize_text(answer) == label or normalize_text(prediction) == label)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time and O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            current.append(previous[j] + 1 if token_a == token_b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


@register_scorer("rouge_l")
def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004): LCS-based F-measure over whitespace tokens of the normalized texts.

    Same as `rouge_score`'s rougeL F-measure (beta = 1) without stemming; two empty texts score 1.0.
    """
    pred = normalize_text(prediction).split()
    ref = normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
