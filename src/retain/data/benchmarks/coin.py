"""CoIN's layout (Chen et al., "CoIN: A Benchmark of Continual Instruction tuNing for Multimodel Large
Language Model", 2024; github zackschen/CoIN, reused by JingyangQiao/CoIN), read in place: eight image-text
tasks, each a folder of LLaVA-format instruction files, with the images under a separate image root.

    <benchmark_dir>/playground/Instructions_Original/<Task>/train.json   (LLaVA conversations)
    <benchmark_dir>/playground/Instructions_Original/<Task>/test.json    (or val.json, see below)
    <benchmark_dir>/cl_dataset/...                                       (images; record paths are relative)

`benchmark_dir` may also be the instruction folder itself (the one holding ScienceQA/, TextVQA/, ...), or
hold it without `playground/`; the image root is `stream.image_dir` when set, else the first `cl_dataset`
found at benchmark_dir, beside the instruction folder or one level above it. JingyangQiao/CoIN names the
original instructions `playground/Instructions`; that name is found too.

What the reference repositories show (zackschen/CoIN, its README and scripts/LLaVA/{Train,Eval}/*.sh and
ETrain/Eval/LLaVA/CoIN/*.py; JingyangQiao/CoIN, its README and scripts/CoIN/{Train,Eval}*/*.sh):

- Order: the training scripts are numbered and chain each task's output into the next one as
  `previous_task_model_path`: ScienceQA, TextVQA, ImageNet, GQA, VizWiz, Grounding, VQAv2, OCRVQA.
- Files: training reads `<Task>/train.json` with `--image_folder ./cl_dataset`. Evaluation reads
  `<Task>/test.json`, except TextVQA, VizWiz and VQAv2, which are evaluated on `<Task>/val.json`.
- Training records are LLaVA conversations (`image`, `conversations` with "<image>\\n" in the human turn);
  records without `image` are text-only (ScienceQA has such questions).
- Test records are question files, not conversations: `question_id`, `image`, `text` (the question with its
  answer-format instruction) and the annotation: `answer` (one string) for every task but Grounding, which
  has `answer_bbox` and the image `size` (CoIN's create_prompt.py and the LAVIS CoIN_EvalDataset read exactly
  these keys; eval_ImagetNet/ocrvqa/vizwiz/vqav2.py score against `answer`, eval_grounding.py against
  `answer_bbox`). The model prompt is "<image>\\n" + text, as model_vqa.py builds it; an "<image>" already in
  the text is removed first, as model_vqa_science.py does.
- Instruction variants are sibling folders of the same layout: Instructions_Original, Instructions_Diverse
  and Instructions_10Type (the Hugging Face dataset Zacks-Chen/CoIN; earlier Instructions_Type1/_Type2).
  `benchmark=CoIN` reads the original instructions, `benchmark=CoIN-Diverse` reads Instructions_Diverse, and
  so on for any `CoIN-<Variant>` (the name is case-insensitive).

Scorers and the reference each test record becomes (the scorers are in retain.evaluation.vqa):

- ScienceQA `option_letter`: `answer` when it is an option letter ("B", "(B)", "B."); an answer that is an
  option's text is turned into the letter of the matching "X. text" line of the question.
- TextVQA `vqa_soft`: the ten human answers of TextVQA's own annotation file
  `cl_dataset/TextVQA/TextVQA_0.5.1_val.json` (what eval_textvqa.py scores against), as a JSON list, when
  that file is there; otherwise the single `answer` (vqa_soft then is an exact match after VQA
  normalisation, and a warning says so).
- ImageNet `substring_either`, GQA `gqa`, VizWiz `vizwiz`, VQAv2 `vqav2`, OCRVQA `ocrvqa`: `answer` as is.
- Grounding `grounding_iou`: `answer_bbox` as is, "[x1, y1, x2, y2]" in 0-1 coordinates of the padded
  square image (eval_grounding.py uses it unconverted); it is checked when the file is read.

Not confirmed (the instruction files themselves were not available to read): the exact text of each task's
instructions, whether ScienceQA's `answer` is always a letter (the scorers of CoIN take the letter from
ScienceQA's problems.json instead; an answer that is neither a letter nor an option's text is an error
here), and the exact form of the image paths inside the records (taken as relative to cl_dataset, which
is what `--image_folder ./cl_dataset` implies). GQA is scored by CoIN against GQA's testdev_balanced
questions file, VizWiz and VQAv2 against the `answer` of val.json; here every task but TextVQA uses its
file's `answer`. The `Multitask` folder of the dataset (joint training data) is not a task of the order.
Images that are not there fail when the task is read (before anything trains), naming the image root
and where it came from (stream.image_dir or the cl_dataset folder found).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re

from retain.data.benchmarks.base import Benchmark, BenchmarkTask
from retain.data.dataset_info import load_examples, read_json, read_records
from retain.data.formats import Example
from retain.data.images import IMAGE_PLACEHOLDER, ImageFileError, image_list, resolve_images
from retain.errors import RetainError

logger = logging.getLogger(__name__)

LAYOUT = "coin"
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
# The order of CoIN's numbered training scripts (scripts/LLaVA/Train/1_Science.sh ... 8_OCRVQA.sh).
ORDERS = {"order1": list(SCORERS)}
# The tasks CoIN's evaluation scripts run on val.json; the others use test.json.
EVAL_FILES = {"TextVQA": "val.json", "VizWiz": "val.json", "VQAv2": "val.json"}
IMAGE_ROOT = "cl_dataset"
PLAYGROUND = "playground"
# TextVQA's official annotation file, under the image root; it holds the ten answers of each question.
TEXTVQA_ANNOTATIONS = os.path.join("TextVQA", "TextVQA_0.5.1_val.json")
DEFAULT_VARIANT = "Original"
# The instruction variants published with CoIN (Hugging Face Zacks-Chen/CoIN, now and in earlier revisions).
VARIANTS = ("Original", "Diverse", "10Type", "Type1", "Type2")

_NAME = re.compile(r"^coin(?:[-_:](?P<variant>[A-Za-z0-9]+))?$", re.IGNORECASE)
_LETTER = re.compile(r"^\(?([A-Za-z])\)?\.?$")
_OPTION = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$", re.MULTILINE)


def variant_folders(variant: str) -> list[str]:
    """The instruction folder names a variant may have (the README and scripts spell them differently)."""
    names = [f"Instructions_{variant}", f"Instruction_{variant}"]
    if variant.lower() == DEFAULT_VARIANT.lower():
        names.append("Instructions")  # JingyangQiao/CoIN's name for the original instructions
    return names


def _child(folder: str, name: str) -> str | None:
    """`folder/name` when it is a folder, matching the name case-insensitively."""
    exact = os.path.join(folder, name)
    if os.path.isdir(exact):
        return exact
    if not os.path.isdir(folder):
        return None
    for entry in os.listdir(folder):
        if entry.lower() == name.lower() and os.path.isdir(os.path.join(folder, entry)):
            return os.path.join(folder, entry)
    return None


def _holds_tasks(folder: str) -> bool:
    return any(os.path.isdir(os.path.join(folder, task)) for task in SCORERS)


def instruction_folder(root: str, variant: str) -> str:
    """The folder holding the task folders: under playground/, under root, or root itself; when none exists,
    the scripts' path `<root>/playground/Instructions_<Variant>` (so messages name where files belong)."""
    for base in (os.path.join(root, PLAYGROUND), root):
        for name in variant_folders(variant):
            found = _child(base, name)
            if found:
                return found
    if _holds_tasks(root):
        return root
    return os.path.join(root, PLAYGROUND, variant_folders(variant)[0])


def image_root(root: str, instructions: str) -> str:
    """The folder that image paths are relative to: the first cl_dataset at root, beside the instruction
    folder or above it; `<root>/cl_dataset` when there is none."""
    parent = os.path.dirname(os.path.abspath(instructions))
    for base in (root, parent, os.path.dirname(parent)):
        found = _child(base, IMAGE_ROOT)
        if found:
            return os.path.abspath(found)
    return os.path.abspath(os.path.join(root, IMAGE_ROOT))


@functools.lru_cache(maxsize=4)
def textvqa_answers(path: str) -> dict[str, list[str]]:
    """question_id -> the ten human answers, from TextVQA's annotation file ({"data": [...]})."""
    data = read_json(path)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise RetainError(
            f'{path}: expected TextVQA\'s annotation file, {{"data": [{{"question_id", "answers"}}]}}'
        )
    return {
        str(entry["question_id"]): [str(a) for a in entry["answers"]]
        for entry in entries
        if isinstance(entry, dict) and "question_id" in entry and isinstance(entry.get("answers"), list)
    }


def science_letter(answer: str, question: str, where: str) -> str:
    """ScienceQA's reference as the option letter `option_letter` expects."""
    match = _LETTER.match(answer.strip())
    if match:
        return match.group(1).upper()
    for letter, text in _OPTION.findall(question):
        if text.strip().lower() == answer.strip().lower():
            return letter
    raise RetainError(
        f"{where}: ScienceQA answer {answer!r} is neither an option letter nor the text of an option "
        "('A. ...') of the question; CoIN's ScienceQA is scored by option letter"
    )


def check_box(reference: str, where: str) -> str:
    """A Grounding reference as CoIN writes `answer_bbox`: "[x1, y1, x2, y2]", four finite numbers with
    x1 < x2 and y1 < y2 (what the `grounding_iou` scorer reads; checked here so a bad box fails on load)."""
    parts = reference.replace("[", "").replace("]", "").split(",")
    try:
        values = [float(part) for part in parts] if len(parts) == 4 else []
    except ValueError:
        values = []
    if (
        len(values) != 4
        or not all(map(math.isfinite, values))
        or values[2] <= values[0]
        or values[3] <= values[1]
    ):
        raise RetainError(
            f"{where}: Grounding box {reference!r} is not [x1, y1, x2, y2] with x1 < x2 and y1 < y2, "
            "which the grounding_iou scorer needs"
        )
    return reference


def _prompt(text: str, has_image: bool) -> str:
    """The user turn as CoIN's model_vqa.py builds it: "<image>\\n" + the question (for a record with an
    image), any "<image>" already in the text removed first."""
    question = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question


def _reference(task: str, record: dict, path: str, index: int, textvqa: dict[str, list[str]] | None) -> str:
    where = f"{path}: record {index}"
    if task == "Grounding" and "answer_bbox" in record:
        return check_box(str(record["answer_bbox"]), where)
    if "answer" not in record:
        wanted = '"answer_bbox" (or "answer")' if task == "Grounding" else '"answer"'
        raise RetainError(
            f"{where} has no {wanted}; CoIN test records are {{question_id, image, text, answer}}"
        )
    answer = str(record["answer"])
    if task == "ScienceQA":
        return science_letter(answer, str(record.get("text", "")), where)
    if task == "TextVQA" and textvqa is not None:
        answers = textvqa.get(str(record.get("question_id")))
        if answers:
            return json.dumps(answers)
    return check_box(answer, where) if task == "Grounding" else answer


def _image_error(err: ImageFileError, images: str, origin: str) -> ImageFileError:
    """A missing or unreadable image reported with the image root and where the root came from."""
    if not os.path.isdir(images):
        return ImageFileError(
            f"{err}. CoIN's image folder {images} ({origin}) does not exist; put CoIN's images there "
            "(cl_dataset/ of the dataset) or set stream.image_dir to the folder holding them"
        )
    return ImageFileError(
        f"{err}. CoIN's images are read from {images} ({origin}); set stream.image_dir to the folder "
        "the records' image paths are relative to if that is the wrong one"
    )


def read_test(task: str, path: str, images: str, origin: str = "the cl_dataset folder") -> list[Example]:
    """A CoIN question file ({question_id, image, text, answer | answer_bbox}) as one-turn examples whose
    reference is encoded for the task's scorer, image paths resolved against `images` (found as `origin`
    says). A file of LLaVA conversations is read as training data."""
    records = read_records(path)
    if records and isinstance(records[0], dict) and "conversations" in records[0]:
        return read_train(task, path, images, origin)
    textvqa = None
    if task == "TextVQA":
        annotations = os.path.join(images, TEXTVQA_ANNOTATIONS)
        if os.path.isfile(annotations):
            textvqa = textvqa_answers(annotations)
        else:
            logger.warning(
                "CoIN TextVQA: %s not found, so each question is scored against its one `answer` "
                "(exact match after VQA normalisation) instead of the ten human answers",
                annotations,
            )
    examples = []
    checked: dict[str, str | None] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "text" not in record:
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise RetainError(
                f'{path}: record {index} needs "text" and "answer" (CoIN question file), got {got}'
            )
        paths = image_list(record.get("image"), path, index, "image")
        messages = [
            {"role": "user", "content": _prompt(str(record["text"]), bool(paths))},
            {"role": "assistant", "content": _reference(task, record, path, index, textvqa)},
        ]
        meta = {"dataset": task, "source": path, "index": index}
        if "question_id" in record:
            meta["question_id"] = record["question_id"]
        try:
            resolved = resolve_images(paths, images, path, index, checked) if paths else []
        except ImageFileError as err:
            raise _image_error(err, images, origin) from None
        examples.append(Example(messages, meta=meta, images=resolved))
    if not examples:
        raise RetainError(f"{path} holds no records")
    return examples


def read_train(task: str, path: str, images: str, origin: str = "the cl_dataset folder") -> list[Example]:
    """A LLaVA conversation file, images resolved against the image root `images` (found as `origin` says)."""
    try:
        examples = load_examples(path, image_dir=images)
    except ImageFileError as err:
        raise _image_error(err, images, origin) from None
    for example in examples:
        example.meta["dataset"] = task
    return examples


def locate(variant: str, root: str, image_dir: str | None = None) -> dict[str, BenchmarkTask]:
    """Every task's files under `root`; images are read from `image_dir` (stream.image_dir) when given, else
    from the cl_dataset folder found by `image_root`."""
    instructions = instruction_folder(root, variant)
    if image_dir:
        images, origin = os.path.abspath(image_dir), "stream.image_dir"
    else:
        images = image_root(root, instructions)
        found = os.path.isdir(images)
        origin = f"the {IMAGE_ROOT} folder found" if found else f"no {IMAGE_ROOT} folder found, the default"
    tasks = {}
    for task, scorer in SCORERS.items():
        folder = _child(instructions, task) or os.path.join(instructions, task)
        files = {
            "train": os.path.join(folder, "train.json"),
            "test": os.path.join(folder, EVAL_FILES.get(task, "test.json")),
        }
        tasks[task] = BenchmarkTask(
            name=task,
            files=files,
            read=lambda path, task=task, test=files["test"]: (
                read_test(task, path, images, origin)
                if path == test
                else read_train(task, path, images, origin)
            ),
            scorer=scorer,
        )
    return tasks


def make_benchmark(name: str, root: str | None) -> Benchmark | None:
    """CoIN (`CoIN`, or `CoIN-<Variant>` for the Instructions_<Variant> folder), for any case of the name."""
    match = _NAME.match(name.strip())
    if not match:
        return None
    given = match.group("variant") or DEFAULT_VARIANT
    variant = next((known for known in VARIANTS if known.lower() == given.lower()), given)
    canonical = "CoIN" if variant.lower() == DEFAULT_VARIANT.lower() else f"CoIN-{variant}"
    folder = variant_folders(variant)[0]
    evaluated = ", ".join(EVAL_FILES)
    return Benchmark(
        name=canonical,
        layout=LAYOUT,
        description=(
            "CoIN: 8 image-text instruction tasks (science QA, text VQA, ImageNet, GQA, VizWiz, RefCOCO "
            f"grounding, VQAv2, OCR-VQA) for an image-text model; {folder} instructions"
        ),
        orders=ORDERS,
        expected=(
            f"{PLAYGROUND}/{folder}/<task>/{{train,test}}.json (val.json for {evaluated}) + {IMAGE_ROOT}/ "
            f"(images; {TEXTVQA_ANNOTATIONS} for TextVQA's ten answers)"
        ),
        locate=functools.partial(locate, variant),
        reads_images=True,
    )
