"""A CoIN-format folder written for tests: every task of the order, LLaVA conversation files for training,
question files for testing, small images under cl_dataset, with CoIN-style prompts.

The prompts follow what CoIN's and LCIA's code shows of the instruction files (the files themselves are
not public in a repository): the human turn of a training record is "<image>\\n" + the test record's
`text`, which is the instance (a question, ScienceQA's context and options, ImageNet's fixed question, a
referring expression) followed by the task's answer-format instruction as the last line. LCIA's
instruct/LoRASelect.py takes that last line as the template (ImageNet: the line after "<image>";
Grounding: the last line up to ':'), and LLaVA's eval scripts add the same suffixes
(model_vqa_science.py: "Answer with the option's letter from the given choices directly."). Instance
texts vary per record as in the real data, including OCR-VQA's recurring question forms ("Who wrote this
book?") and ImageNet's one question for every image.
"""

from __future__ import annotations

import json
import os

from PIL import Image

ORDER = ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA"]
# The scorer of each task, after CoIN's evaluation scripts (ETrain/Eval/LLaVA/CoIN/eval_*.py).
SCORERS = {
    "ScienceQA": "option_letter",
    "TextVQA": "vqa_soft",
    "ImageNet": "substring_either",
    "GQA": "gqa",
    "VizWiz": "vizwiz",
    "Grounding": "grounding_iou",
    "VQAv2": "vqav2",
    "OCRVQA": "ocrvqa",
}
# The test file each task is evaluated on (CoIN's eval scripts; retain.data.benchmarks.coin.EVAL_FILES).
EVAL_FILES = {"TextVQA": "val.json", "VizWiz": "val.json", "VQAv2": "val.json"}

LETTER = "Answer with the option's letter from the given choices directly."
SHORT = "Answer the question using a single word or phrase."
IMAGENET = "What is the object in the image?"
GROUNDING = "Please provide the bounding box coordinate of the region this sentence describes:"
# The instruction every task's prompts share (the template LCIA should group by).
INSTRUCTIONS = {
    "ScienceQA": LETTER,
    "TextVQA": SHORT,
    "ImageNet": f"{IMAGENET}\n{SHORT}",
    "GQA": SHORT,
    "VizWiz": SHORT,
    "Grounding": GROUNDING,
    "VQAv2": SHORT,
    "OCRVQA": SHORT,
}

SCIENCE_TEXT = f"Which animal is a mammal?\nA. shark\nB. whale\n{LETTER}"
TEXTVQA_ANSWERS = ["coca cola"] * 7 + ["coke", "cola", "coca-cola"]
BOX = "[0.1, 0.2, 0.5, 0.6]"

_SCIENCE = [
    ("Which animal is a mammal?\nA. shark\nB. whale", "B"),
    (
        "Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma",
        "A",
    ),
    (
        "Which tense does the sentence use?\nContext: Mona will print her name with care.\nA. present tense\n"
        "B. future tense\nC. past tense",
        "B",
    ),
    ("What is the capital of Utah?\nA. Salt Lake City\nB. Provo\nC. Denver\nD. Boise", "A"),
    ("Which material is this spatula made of?\nA. rubber\nB. cotton", "A"),
    ("Select the solid.\nA. rain\nB. rock\nC. milk", "B"),
    (
        "Is the following trait inherited or acquired?\nContext: Sasha has naturally straight hair.\n"
        "A. acquired\nB. inherited",
        "B",
    ),
    (
        "Which figure of speech is used in this text?\nContext: The wind whispered through the trees.\n"
        "A. simile\nB. personification",
        "B",
    ),
    (
        "Think about the magnetic force between the magnets in each pair. Which of the following "
        "statements is true?\nContext: The images below show two pairs of magnets. All the magnets shown "
        "are made of the same material.\nA. The magnitude of the magnetic force is the same in both pairs.\n"
        "B. The magnitude of the magnetic force is smaller in Pair 1.",
        "A",
    ),
    (
        "Which word would you find on a dictionary page with the following guide words?\nlamb - liquid\n"
        "A. leaf\nB. lunch",
        "A",
    ),
    (
        "Which is a compound sentence?\nA. The cat slept on the mat.\nB. The cat slept, and the dog barked.",
        "B",
    ),
    ("Which ocean is highlighted?\nA. the Indian Ocean\nB. the Arctic Ocean\nC. the Pacific Ocean", "C"),
]
_TEXTVQA = [
    ("what brand is this?", "coca cola"),
    ("what number is on the player's jersey?", "23"),
    ("what time is shown on the clock?", "10:10"),
    ("what does the red sign say?", "stop"),
    ("what is the title of the book?", "dune"),
    ("what year is printed on the coin?", "1998"),
    ("who is the author of the book?", "tolkien"),
    ("what word is written on the mug?", "coffee"),
    ("how much does the item cost?", "4.99"),
    ("what street is this?", "main st"),
    ("what is the name of the restaurant?", "joe's"),
    ("what is the website on the banner?", "www.nasa.gov"),
]
_IMAGENET = [
    "tabby cat", "golden retriever", "espresso", "school bus", "lighthouse", "goldfish",
    "tennis ball", "pizza", "volcano", "umbrella", "acoustic guitar", "teapot",
]  # fmt: skip
_GQA = [
    ("Is the cup on the left or right?", "left"),
    ("What color is the car in front of the building?", "red"),
    ("Are there both plates and forks in this picture?", "yes"),
    ("Who is wearing the hat?", "man"),
    ("Which kind of furniture is to the left of the lamp?", "sofa"),
    ("Is the sky cloudy or clear?", "clear"),
    ("What is the animal on the grass called?", "dog"),
    ("Do you see any trains or buses?", "no"),
    ("What is the woman holding?", "umbrella"),
    ("Is the fence made of wood or metal?", "wood"),
    ("On which side of the photo is the bike?", "right"),
    ("What vehicle is parked near the tree?", "truck"),
]
_VIZWIZ = [
    ("What is this?", "unanswerable"),
    ("What color is this shirt?", "blue"),
    ("Can you tell me what is in this can?", "soup"),
    ("What kind of soda is this?", "pepsi"),
    ("Is this bottle of wine red or white?", "red"),
    ("What is the expiration date on this milk?", "june 5"),
    ("What denomination is this bill?", "20"),
    ("Which button is the power button?", "unanswerable"),
    ("What flavor is this?", "chicken"),
    ("What is on the computer screen?", "email"),
    ("How much does this cost?", "unanswerable"),
    ("What does this box say?", "cereal"),
]
_GROUNDING = [
    ("the red square.", BOX),
    ("man in the blue shirt on the left.", "[0.02, 0.15, 0.31, 0.98]"),
    ("the white car.", "[0.4, 0.5, 0.72, 0.77]"),
    ("giraffe on the right.", "[0.61, 0.08, 0.97, 0.93]"),
    ("bowl closest to you.", "[0.2, 0.6, 0.55, 0.99]"),
    ("the girl holding an umbrella.", "[0.33, 0.12, 0.58, 0.9]"),
    ("middle donut.", "[0.38, 0.35, 0.62, 0.6]"),
    ("zebra in front.", "[0.1, 0.3, 0.7, 0.95]"),
    ("the lamp next to the bed.", "[0.75, 0.1, 0.9, 0.45]"),
    ("elephant on far left.", "[0.0, 0.2, 0.25, 0.8]"),
    ("player wearing number 7.", "[0.45, 0.1, 0.66, 0.88]"),
    ("the dog lying down.", "[0.3, 0.55, 0.8, 0.9]"),
]
_VQAV2 = [
    ("How many people are in the picture?", "2"),
    ("What color is the bus?", "yellow"),
    ("Is the man smiling?", "yes"),
    ("What sport is being played?", "tennis"),
    ("What room is this?", "kitchen"),
    ("Is it raining?", "no"),
    ("What is on the plate?", "pizza"),
    ("What animal is this?", "cat"),
    ("Where is the clock?", "tower"),
    ("Is this a healthy meal?", "yes"),
    ("What is the man holding?", "frisbee"),
    ("How many windows are there?", "4"),
]
# OCR-VQA asks a few question forms about each book cover, so its questions recur across records.
_OCRVQA = [
    ("Who wrote this book?", "Irma S. Rombauer"),
    ("What is the title of this book?", "Joy of Cooking"),
    ("What type of book is this?", "Cookbooks, Food & Wine"),
    ("Is this a comedy book?", "No"),
    ("Who wrote this book?", "Bill Bryson"),
    ("What is the title of this book?", "A Walk in the Woods"),
    ("What type of book is this?", "Travel"),
    ("Is this book related to Travel?", "Yes"),
    ("Who wrote this book?", "Frank Herbert"),
    ("What is the title of this book?", "Dune"),
    ("What type of book is this?", "Science Fiction & Fantasy"),
    ("Is this a sci-fi book?", "Yes"),
]


def _annotation(task: str, answer: str) -> dict:
    return {"answer_bbox": answer, "size": [8, 8]} if task == "Grounding" else {"answer": answer}


def instances(task: str) -> list[tuple[str, dict, str]]:
    """(the test record's `text`, its annotation fields, a prediction its scorer counts as correct) of every
    instance of `task`, in order; the first ones are the test records."""
    if task == "ScienceQA":
        return [(f"{q}\n{LETTER}", {"answer": a}, a) for q, a in _SCIENCE]
    if task == "ImageNet":
        return [(INSTRUCTIONS["ImageNet"], {"answer": a}, a) for a in _IMAGENET]
    if task == "Grounding":
        return [(f"{GROUNDING} {e}", _annotation(task, b), b) for e, b in _GROUNDING]
    pairs = {"TextVQA": _TEXTVQA, "GQA": _GQA, "VizWiz": _VIZWIZ, "VQAv2": _VQAV2, "OCRVQA": _OCRVQA}[task]
    return [(f"{q}\n{SHORT}", {"answer": a}, a) for q, a in pairs]


# task -> (the first test record's text, its annotation fields, a correct prediction)
TESTS = {task: instances(task)[0] for task in ORDER}


def _write(path, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


def _colour(task: str, index: int) -> tuple[int, int, int]:
    seed = sum(map(ord, task)) * 31 + index * 57
    return (seed % 251, (seed * 7) % 253, (seed * 13) % 255)


def coin_fixture(
    root,
    folder: str = "Instructions_Original",
    textvqa_annotations: bool = True,
    skip=(),
    train_size: int = 4,
    test_size: int = 2,
    tasks=ORDER,
    image_size: int = 8,
) -> str:
    """A CoIN folder: <root>/playground/<folder>/<Task>/{train,test|val}.json and <root>/cl_dataset/<Task>/
    <i>.png (one small picture per record). The first `test_size` instances of each task are its test
    records (question_id 100, 101, ...), the next `train_size` its training records; ScienceQA also has
    one text-only training question. `skip` holds (task, "test") pairs whose test file is left out."""
    instructions = os.path.join(root, "playground", folder)
    images = os.path.join(root, "cl_dataset")
    for task in tasks:
        items = instances(task)
        if test_size + train_size > len(items):
            raise ValueError(f"{task} has {len(items)} instances, fewer than {test_size} + {train_size}")
        os.makedirs(os.path.join(images, task), exist_ok=True)
        for i in range(test_size + train_size):
            picture = Image.new("RGB", (image_size, image_size), _colour(task, i))
            picture.save(os.path.join(images, task, f"{i}.png"))
        test = [
            {"question_id": 100 + i, "image": f"{task}/{i}.png", "text": text, **annotation}
            for i, (text, annotation, _) in enumerate(items[:test_size])
        ]
        train = [
            {
                "id": f"{task}-{i}",
                "image": f"{task}/{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{text}"},
                    {"from": "gpt", "value": next(iter(annotation.values()))},
                ],
            }
            for i, (text, annotation, _) in enumerate(items[test_size : test_size + train_size], test_size)
        ]
        if task == "ScienceQA":  # ScienceQA has questions without an image
            train.append(
                {
                    "id": "text-only",
                    "conversations": [
                        {"from": "human", "value": f"Which word is a noun?\nA. run\nB. apple\n{LETTER}"},
                        {"from": "gpt", "value": "B"},
                    ],
                }
            )
        _write(os.path.join(instructions, task, "train.json"), train)
        if (task, "test") not in skip:
            _write(os.path.join(instructions, task, EVAL_FILES.get(task, "test.json")), test)
    if textvqa_annotations and "TextVQA" in tasks:
        data = [
            {"question_id": 100 + i, "answers": TEXTVQA_ANSWERS if i == 0 else [answer] * 10}
            for i, (_, _, answer) in enumerate(instances("TextVQA")[:test_size])
        ]
        _write(os.path.join(images, "TextVQA", "TextVQA_0.5.1_val.json"), {"data": data})
    return str(root)
