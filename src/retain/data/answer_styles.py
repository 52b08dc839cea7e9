"""Answer-style diversification (ASD) of a task's training data, from SEFE (Chen et al., ICML 2025,
"SEFE: Superficial and Essential Forgetting Eliminator for Multimodal Continual Instruction Tuning";
github jinpeng0528/SEFE).

SEFE calls it superficial forgetting when a model still knows an earlier task but answers it in the style
of the tasks after it. ASD rewrites X% of every task's training examples (the paper's X = 20, shared
equally by the formats a task does not already use) into other answer formats, so that all tasks train
on similarly mixed styles and no task's single style takes over. `stream.answer_styles` switches it on
for any method: {style: fraction of the task's training examples}; the rest keep their answer as it is
(the short answer). Only training data is rewritten: test prompts and references stay as they were, so
scores measure the task's own format.

Deviation: the paper has an LLM write the formats (yes/no and multiple-choice distractors, brief and
detailed explanations). retain has no such model at hand, so the rewrite is rule-based and deterministic
(seeded by the run seed and the task name):
- yes_no: 'Is the answer "C"? Answer yes or no.' -> Yes / No, where C is the true answer for half of the
  examples and another answer of the task for the other half;
- multiple_choice: the true answer among up to three other answers of the task, in lettered options ->
  the letter of the true one;
- sentence: 'Answer in a full sentence.' -> 'The answer is A.' (it stands in for the paper's brief and
  detailed explanations, which rules cannot write).
The distractors are drawn from the task's own training answers, so an example is rewritten only into the
styles its task can support: yes_no and multiple_choice need a task with two distinct answers or more;
examples that cannot take their style keep their answer and the task says how many (a note). A trailing
answer-format instruction of the question ('Answer with the number only.') is dropped before the style's
own instruction is added, so that the two do not contradict each other.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable
from dataclasses import replace

from retain.config import ANSWER_STYLES
from retain.data.formats import Example

MAX_OPTIONS = 4  # multiple choice: the answer and up to three distractors, as in the paper's prompts
# A question's own format instruction: its last sentence, when that starts like 'Answer with the number
# only.' or 'Answer the question using a single word or phrase.'.
_FORMAT_INSTRUCTION = re.compile(
    r"\s*\bAnswer (?:with|using|in|only|briefly|the question)\b[^.?!\n]*[.?!]?\s*$"
)
STYLES_NEEDING_DISTRACTORS = ("yes_no", "multiple_choice")


def _rng(*parts: object) -> random.Random:
    """A generator seeded by `parts` (not by Python's salted hash), so runs and resumes agree."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _key(answer: str) -> str:
    """Answers that differ only in case or surrounding space are the same answer."""
    return " ".join(answer.split()).casefold()


def _question(text: str) -> str:
    """The question without a trailing answer-format instruction (kept when it is all there is)."""
    stripped = _FORMAT_INSTRUCTION.sub("", text).rstrip()
    return stripped or text.rstrip()


def _distractors(answer: str, pool: list[str], count: int, rng: random.Random) -> list[str]:
    """Up to `count` answers of the task that differ from `answer`."""
    others = [a for a in pool if _key(a) != _key(answer)]
    return rng.sample(others, min(count, len(others)))


def _yes_no(question: str, answer: str, pool: list[str], rng: random.Random, true: bool) -> tuple | None:
    if true:
        candidate = answer
    else:
        wrong = _distractors(answer, pool, 1, rng)
        if not wrong:
            return None
        candidate = wrong[0]
    prompt = f'{question}\nIs the answer "{candidate}"? Answer yes or no.'
    return prompt, "Yes" if true else "No"


def _multiple_choice(question: str, answer: str, pool: list[str], rng: random.Random) -> tuple | None:
    wrong = _distractors(answer, pool, MAX_OPTIONS - 1, rng)
    if not wrong:
        return None
    options = [answer, *wrong]
    rng.shuffle(options)
    letters = string.ascii_uppercase
    lines = "\n".join(f"{letters[i]}. {option}" for i, option in enumerate(options))
    prompt = (
        f"{question}\nOptions:\n{lines}\nAnswer with the option's letter from the given choices directly."
    )
    return prompt, letters[options.index(answer)]


def _sentence(question: str, answer: str) -> tuple:
    end = "" if answer.rstrip().endswith((".", "!", "?")) else "."
    return f"{question}\nAnswer in a full sentence.", f"The answer is {answer.strip()}{end}"


def _restyle(example: Example, style: str, pool: list[str], rng: random.Random, true: bool) -> Example | None:
    """`example` with its last question and answer in `style`, or None when the task cannot support it."""
    messages = example.messages
    if len(messages) < 2 or messages[-2].get("role") != "user" or not example.reference.strip():
        return None
    if style in STYLES_NEEDING_DISTRACTORS and len(pool) < 2:
        return None
    question, answer = _question(messages[-2]["content"]), example.reference.strip()
    rewrite: dict[str, Callable[[], tuple | None]] = {
        "yes_no": lambda: _yes_no(question, answer, pool, rng, true),
        "multiple_choice": lambda: _multiple_choice(question, answer, pool, rng),
        "sentence": lambda: _sentence(question, answer),
    }
    styled = rewrite[style]()
    if styled is None:
        return None
    prompt, reply = styled
    head = [dict(m) for m in messages[:-2]]
    turns = [{**messages[-2], "content": prompt}, {**messages[-1], "content": reply}]
    return replace(example, messages=head + turns, meta={**example.meta, "answer_style": style})


def style_counts(fractions: dict[str, float], total: int) -> dict[str, int]:
    """How many of `total` examples each style gets: the cumulative fractions rounded, so the counts add
    up to round(sum of fractions * total) and never exceed `total`."""
    counts, done, cumulative = {}, 0, 0.0
    for style in ANSWER_STYLES:
        cumulative += fractions.get(style, 0.0)
        end = min(total, round(cumulative * total))
        counts[style] = end - done
        done = end
    return counts


def diversify(
    examples: list[Example], fractions: dict[str, float], seed: int, task: str
) -> tuple[list[Example], list[str]]:
    """The training examples with the given fraction rewritten into each answer style, in their order,
    and notes for the task (examples whose task cannot support their style keep their answer)."""
    if not examples or not any(fractions.values()):
        return examples, []
    # The distractor pool: the task's distinct answers, in first-seen order (a stable sample space).
    pool = list({_key(e.reference): e.reference.strip() for e in examples if e.reference.strip()}.values())
    order = list(range(len(examples)))
    _rng(seed, task, "answer_styles").shuffle(order)
    out = list(examples)
    kept: dict[str, int] = {}
    start = 0
    for style, count in style_counts(fractions, len(examples)).items():
        for position, index in enumerate(order[start : start + count]):
            rng = _rng(seed, task, "answer_styles", index)
            # Alternating over a shuffled order: half of the yes/no questions are true, half false.
            styled = _restyle(examples[index], style, pool, rng, true=position % 2 == 0)
            if styled is None:
                kept[style] = kept.get(style, 0) + 1
            else:
                out[index] = styled
        start += count
    notes = [
        f"answer styles: {n} training example(s) meant for {style} keep their answer: "
        + (
            "the task has fewer than two distinct answers to draw distractors from, or "
            if style in STYLES_NEEDING_DISTRACTORS
            else ""
        )
        + "the example ends in no question and answer to rewrite"
        for style, n in kept.items()
    ]
    return out, notes
