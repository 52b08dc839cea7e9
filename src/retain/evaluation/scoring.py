"""Scorers: functions `(prediction, reference) -> float in [0, 1]`, registered by name.

As in lm-evaluation-harness, a task names its scorer (`exact`, `normalized`, `contains`, `choice`,
`rouge_l`, `accuracy`, `f1`, `edit_sim`, `sari`) and `get_scorer` looks it up; `@register_scorer("my_scorer")`
adds a custom one. The score of a task is the mean of its examples' scores, so every scorer returns a value
in [0, 1]. A scorer registered with `needs_source=True` (SARI compares the prediction with the text it
rewrites) is called as `scorer(prediction, reference, source=...)`; `score` calls either kind uniformly.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

from retain.errors import RetainError, did_you_mean

# `(prediction, reference) -> float`, or `(prediction, reference, *, source) -> float` with needs_source.
Scorer = Callable[..., float]
_F = TypeVar("_F", bound=Callable[..., float])

_SCORERS: dict[str, Scorer] = {}
_NEEDS_SOURCE: set[Scorer] = set()


def register_scorer(name: str, needs_source: bool = False) -> Callable[[_F], _F]:
    """Register a scorer `(prediction, reference) -> float in [0, 1]` under `name`.

    With `needs_source=True` the scorer is called as `scorer(prediction, reference, source=...)`, where
    source is the text the model was asked to work on (the last user message of the example).
    """

    def decorator(fn: _F) -> _F:
        # A second registration under the same name would silently change every task that uses it.
        if name in _SCORERS and _SCORERS[name] is not fn:
            raise ValueError(f"a scorer named {name!r} is already registered ({_SCORERS[name].__qualname__})")
        _SCORERS[name] = fn
        if needs_source:
            _NEEDS_SOURCE.add(fn)
        return fn

    return decorator


def needs_source(scorer: str | Scorer) -> bool:
    """Whether the scorer (or the scorer registered under that name) must be given the source text."""
    return (get_scorer(scorer) if isinstance(scorer, str) else scorer) in _NEEDS_SOURCE


def score(scorer: str | Scorer, prediction: str, reference: str, source: str | None = None) -> float:
    """Call a scorer (by name or function) whichever kind it is: `source` goes only to those that need it."""
    fn = get_scorer(scorer) if isinstance(scorer, str) else scorer
    if fn not in _NEEDS_SOURCE:
        return float(fn(prediction, reference))
    if source is None:
        raise RetainError(f"scorer {fn.__name__!r} needs the source text, and none was given")
    return float(fn(prediction, reference, source=source))


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


def _label_form(text: str) -> str:
    """A label as a model may write it: no surrounding whitespace, no trailing period, any case."""
    return " ".join(text.strip().removesuffix(".").lower().split())


@register_scorer("accuracy")
def accuracy(prediction: str, reference: str) -> float:
    """Classification accuracy (O-LoRA / EasyCL): 1.0 when the prediction is the reference label.

    Case, surrounding whitespace and a trailing period are ignored ("Positive." == "positive"); other
    punctuation is kept, unlike `normalized`, so that labels such as "-1" and "1" stay distinct.
    """
    return float(_label_form(prediction) == _label_form(reference))


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


@register_scorer("f1")
def f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 over the `normalize_text` tokens (a bag of words); two empty texts score 1.0."""
    pred = normalize_text(prediction).split()
    ref = normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    return _f1(common / len(pred), common / len(ref))


def _lcs_chars(a: str, b: str) -> int:
    """Exact character LCS length, bit-parallel (Allison & Dix 1986, Hyyro 2004).

    Bit i of `v` tracks row i of the LCS table over `a`, so each character of `b` is one big-integer update
    instead of len(a) Python steps: a few hundred characters take microseconds, not milliseconds.
    """
    if len(a) < len(b):
        a, b = b, a  # loop over the shorter string
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, char in enumerate(a):
        masks[char] = masks.get(char, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for char in b:
        u = v & masks.get(char, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


@register_scorer("edit_sim")
def edit_sim(prediction: str, reference: str) -> float:
    """Edit similarity of TRACE's Py150 code completion: fuzzywuzzy's `fuzz.ratio` / 100.

    That is the Levenshtein InDel ratio 2 * LCS / (len(prediction) + len(reference)) over raw characters
    (no normalisation: whitespace and case matter in code), exact and unrounded (fuzz.ratio rounds to a
    whole percent). Two empty strings score 1.0.
    """
    total = len(prediction) + len(reference)
    if total == 0:
        return 1.0
    return 2 * _lcs_chars(prediction, reference) / total


_SARI_ORDERS = (1, 2, 3, 4)


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _sari_order(
    source: Counter[tuple[str, ...]],
    prediction: Counter[tuple[str, ...]],
    references: list[Counter[tuple[str, ...]]],
) -> tuple[float, float, float]:
    """(keep F1, delete precision, add F1) for one n-gram order, as Hugging Face's `sari` computes them.

    Source and prediction counts are scaled by the number of references, so that an n-gram counts as
    rightly kept or deleted in proportion to the references that keep or delete it. An empty operation
    (0/0) scores 1.0, so that a prediction equal to the reference scores 1.0 at every order.
    """
    k = len(references)
    ref = sum(references, Counter())
    src = Counter({gram: count * k for gram, count in source.items()})
    pred = Counter({gram: count * k for gram, count in prediction.items()})

    kept = src & pred
    kept_good = kept & ref
    kept_all = src & ref
    keep_p = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(kept_all.values()) if kept_all else 1.0

    deleted = src - pred
    deleted_good = deleted - ref
    # Only deletion precision counts: recall would reward deleting everything the references delete,
    # which over-rewards short outputs (Xu et al., 2016).
    delete_p = sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0

    added = set(prediction) - set(source)
    added_good = added & set(ref)
    added_all = set(ref) - set(source)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(added_all) if added_all else 1.0
    return _f1(keep_p, keep_r), delete_p, _f1(add_p, add_r)


def sari_operations(source: str, prediction: str, references: Sequence[str]) -> tuple[float, float, float]:
    """SARI's (keep, delete, add) scores, each averaged over n-gram orders 1-4 of lowercased words."""
    src, pred = source.lower().split(), prediction.lower().split()
    refs = [reference.lower().split() for reference in references]
    parts = [
        _sari_order(_ngrams(src, n), _ngrams(pred, n), [_ngrams(r, n) for r in refs]) for n in _SARI_ORDERS
    ]
    keep, delete, add = (sum(values) / len(_SARI_ORDERS) for values in zip(*parts, strict=True))
    return keep, delete, add


@register_scorer("sari", needs_source=True)
def sari(prediction: str, reference: str, *, source: str) -> float:
    """SARI (Xu et al., 2016), TRACE's metric for 20Minuten simplification, on a [0, 1] scale.

    The mean of the keep F1, delete precision and add F1 over n-grams of orders 1-4 (see
    `sari_operations`), with Hugging Face `evaluate`'s conventions (which TRACE uses) on one reference.
    Tokens are the lowercased whitespace-separated words; `evaluate` also splits punctuation off words
    first (sacrebleu's 13a tokenizer), so on raw text the two can differ slightly.
    """
    return sum(sari_operations(source, prediction, [reference])) / 3


# The CoIN scorers live in their own module and register themselves on import; importing it here, after
# `register_scorer` exists, makes them known wherever scorers are looked up by name. (vqa imports this module
# back, which works from either side: by then this module has defined what vqa uses.)
import retain.evaluation.vqa  # noqa: E402, F401
