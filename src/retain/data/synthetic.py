"""Built-in generated tasks (arithmetic, reverse, parity, ...), deterministic by seed, for quickstarts/tests.

Each task draws short prompts whose instruction states the answer format. A prompt belongs to exactly one
split, decided by a stable hash of the prompt itself, so train and test never share a prompt whatever the
seeds and sizes; the random generator is seeded from (task, seed, split) with hashlib, never hash().
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retain.data.formats import Example
from retain.errors import RetainError, did_you_mean

PREFIX = "synthetic:"
# Buckets of sha256(task, prompt) % 10 per split: 80% of the prompt space trains, 10% validates, 10% tests.
_SPLIT_BUCKETS = {"train": range(2, 10), "validation": range(1, 2), "test": range(0, 1)}
_SPLIT_ALIASES = {"dev": "validation", "val": "validation", "eval": "test"}

Draw = Callable[[random.Random], tuple[str, str, dict[str, Any]]]


@dataclass(frozen=True)
class SyntheticTask:
    """A generated task: `draw(rng)` returns (prompt, answer, meta); `scorer` names the default scorer."""

    name: str
    description: str
    scorer: str
    draw: Draw

    def generate(self, n: int, seed: int, split: str) -> list[Example]:
        """`n` distinct examples of `split` ("train", "validation" or "test"), the same for the same seed."""
        split = _SPLIT_ALIASES.get(split, split)
        if split not in _SPLIT_BUCKETS:
            raise RetainError(
                f"synthetic task '{self.name}': unknown split '{split}'"
                f"{did_you_mean(split, _SPLIT_BUCKETS)}; use one of {', '.join(_SPLIT_BUCKETS)}"
            )
        rng = random.Random(_stable_int(self.name, str(seed), split))
        buckets = _SPLIT_BUCKETS[split]
        examples: list[Example] = []
        seen: set[str] = set()
        # Rejection sampling: every task's prompt space is far larger than 100x any sensible n.
        for _ in range(200 * n + 1000):
            if len(examples) == n:
                break
            prompt, answer, meta = self.draw(rng)
            if prompt in seen or _stable_int(self.name, prompt) % 10 not in buckets:
                continue
            seen.add(prompt)
            meta = {"task": self.name, "split": split, "seed": seed, "index": len(examples), **meta}
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            examples.append(Example(messages=messages, meta=meta))
        if len(examples) < n:
            raise RetainError(
                f"synthetic task '{self.name}' has only {len(examples)} distinct {split} prompts; "
                f"ask for at most {len(examples)} examples"
            )
        return examples


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {}


def _stable_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "big")


def synthetic_task(name: str, description: str, scorer: str = "normalized") -> Callable[[Draw], Draw]:
    """Register a draw function as the synthetic task `name`."""

    def register(draw: Draw) -> Draw:
        SYNTHETIC_TASKS[name] = SyntheticTask(name=name, description=description, scorer=scorer, draw=draw)
        return draw

    return register


def list_synthetic() -> list[SyntheticTask]:
    """All built-in synthetic tasks, sorted by name."""
    return [SYNTHETIC_TASKS[name] for name in sorted(SYNTHETIC_TASKS)]


def load_synthetic(spec: str, n: int, seed: int, split: str) -> list[Example]:
    """Generate `n` examples of the task named by `spec` ("synthetic:<name>")."""
    if not spec.startswith(PREFIX):
        raise RetainError(f"'{spec}' is not a synthetic task spec; write it as {PREFIX}<name>")
    name = spec[len(PREFIX) :]
    if name not in SYNTHETIC_TASKS:
        raise RetainError(
            f"unknown synthetic task '{name}'{did_you_mean(name, SYNTHETIC_TASKS)}; "
            f"available: {', '.join(sorted(SYNTHETIC_TASKS))}"
        )
    return SYNTHETIC_TASKS[name].generate(n, seed, split)


def _word(rng: random.Random, low: int, high: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


@synthetic_task("arithmetic", "add two or three integers from 0 to 99", scorer="exact")
def _arithmetic(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    operands = [rng.randint(0, 99) for _ in range(rng.randint(2, 3))]
    prompt = f"What is {' + '.join(map(str, operands))}? Answer with the number only."
    return prompt, str(sum(operands)), {"operands": operands}


@synthetic_task("reverse", "reverse a short lowercase word letter by letter")
def _reverse(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    word = _word(rng, 3, 6)
    return f"Reverse the letters of '{word}'. Answer with the reversed word only.", word[::-1], {"word": word}


@synthetic_task("parity", "say whether an integer is even or odd")
def _parity(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    number = rng.randint(0, 99999)
    answer = "even" if number % 2 == 0 else "odd"
    return f"Is {number} even or odd? Answer with even or odd.", answer, {"number": number}


@synthetic_task("count_letters", "count how many times a letter occurs in a word", scorer="exact")
def _count_letters(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    # A small alphabet makes repeats common, so answers spread over 0-4 instead of mostly 0 or 1.
    word = _word(rng, 5, 8, alphabet="abcdeklmorst")
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdeklmorst")
    prompt = f"How many times does the letter '{letter}' occur in '{word}'? Answer with the number only."
    return prompt, str(word.count(letter)), {"word": word, "letter": letter}


@synthetic_task("sort_numbers", "sort three to five integers from 0 to 99 ascending, comma separated")
def _sort_numbers(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    prompt = f"Sort {' '.join(map(str, numbers))} ascending. Answer with a comma-separated list."
    return prompt, ", ".join(map(str, sorted(numbers))), {"numbers": numbers}


# (from unit, to unit, factor): integer factors keep every answer an integer.
_CONVERSIONS = [
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("feet", "inches", 12),
    ("liters", "milliliters", 1000),
]


@synthetic_task("unit_conversion", "convert an integer quantity to a smaller unit", scorer="exact")
def _unit_conversion(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    source, target, factor = rng.choice(_CONVERSIONS)
    value = rng.randint(1, 999)
    prompt = f"Convert {value} {source} to {target}. Answer with the number only."
    return prompt, str(value * factor), {"value": value, "from": source, "to": target, "factor": factor}


_SUBJECTS = [
    "The food",
    "The service",
    "The room",
    "The movie",
    "The staff",
    "The hotel",
    "The concert",
    "The book",
    "The coffee",
    "The show",
    "The trip",
    "The game",
]
_POLARITY_WORDS = {
    "positive": [
        "delicious",
        "friendly",
        "wonderful",
        "excellent",
        "charming",
        "comfortable",
        "brilliant",
        "delightful",
        "pleasant",
        "superb",
        "fun",
        "lovely",
    ],
    "negative": [
        "awful",
        "rude",
        "terrible",
        "dirty",
        "boring",
        "cold",
        "disappointing",
        "horrible",
        "noisy",
        "bland",
        "slow",
        "dull",
    ],
}


@synthetic_task("sentiment", "say whether a one-sentence review is positive or negative")
def _sentiment(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    label = rng.choice(sorted(_POLARITY_WORDS))
    first, second = rng.sample(_POLARITY_WORDS[label], 2)
    review = f"{rng.choice(_SUBJECTS)} was {first} and {second}."
    prompt = f"Review: {review} Is the review positive or negative? Answer with positive or negative."
    return prompt, label, {"review": review, "words": [first, second]}


# Exact: the task is the change of case, so a copied lowercase word must not count as correct.
@synthetic_task("capital_letters", "write a lowercase word in capital letters", scorer="exact")
def _capital_letters(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    word = _word(rng, 3, 7)
    return f"Write '{word}' in capital letters. Answer with the word only.", word.upper(), {"word": word}


@synthetic_task("max_number", "pick the largest of three to five integers from 0 to 99", scorer="exact")
def _max_number(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    prompt = f"Which is the largest: {', '.join(map(str, numbers))}? Answer with the number only."
    return prompt, str(max(numbers)), {"numbers": numbers}


# The visual tasks (pictures drawn with Pillow) register themselves in SYNTHETIC_TASKS on import; last, as
# they build on this module's SyntheticTask.
from retain.data import synthetic_visual  # noqa: E402, F401
