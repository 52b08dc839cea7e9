"""LLaMA-Factory `dataset_info.json`: dataset names -> local files, formatting, columns and tags.

retain runs offline, so only entries with a local `file_name` (a .json/.jsonl file or a folder of them) load;
hub entries (hf_hub_url, ms_hub_url, ...) fail with a message saying how to make them local.

Multimodal records (LLaMA-Factory's `images` column, LLaVA's `image` key) load with their images as
absolute, checked paths in `Example.images`; see `load_examples` for where relative paths resolve.
"""

from __future__ import annotations

import json
import os
from typing import Any

from retain.data.formats import OPENAI_TAGS, Example, parse_alpaca, parse_sharegpt
from retain.data.images import check_placeholders, resolve_images
from retain.errors import RetainError, did_you_mean

DATASET_INFO = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
_EXTENSIONS = (".json", ".jsonl")
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def _invalid_json(path: str, err: json.JSONDecodeError) -> RetainError:
    return RetainError(
        f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the file"
    )


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise RetainError(f"{path}: not UTF-8 text ({err.reason}); save the file as UTF-8") from err


def read_json(path: str) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column so the user can fix it."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise _invalid_json(path, err) from err


def load_dataset_info(dataset_dir: str) -> dict:
    """Read `<dataset_dir>/dataset_info.json` (a mapping of dataset name -> entry)."""
    path = os.path.join(dataset_dir, DATASET_INFO)
    if not os.path.isfile(path):
        raise RetainError(
            f"{path} does not exist; set dataset_dir to the folder holding {DATASET_INFO}, "
            "or give a path to a .json/.jsonl file instead of a dataset name"
        )
    info = read_json(path)
    if not isinstance(info, dict):
        raise RetainError(
            f"{path}: expected an object mapping dataset names to entries, got {type(info).__name__}"
        )
    return info


def read_records(path: str) -> list[Any]:
    """Records of one .json (a list, or JSON lines under a .json name) or .jsonl file."""
    text = _read_text(path)
    if path.endswith(".jsonl"):
        return _parse_jsonl(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # Many datasets ship JSON lines under a .json name; HF datasets (hence LLaMA-Factory) accepts them.
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, path)
        raise _invalid_json(path, err) from err
    if isinstance(data, dict):
        raise RetainError(
            f"{path}: expected a list of records (or one JSON object per line), got one object "
            f"with keys {', '.join(list(map(str, data))[:8])}; store the records as a JSON list"
        )
    if not isinstance(data, list):
        raise RetainError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _parse_jsonl(text: str, path: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RetainError(
                f"{path}: invalid JSON at line {lineno}, column {err.colno}: {err.msg}; "
                "each line of a JSON lines file must be one JSON object"
            ) from err
    return records


def _files(path: str, name: str) -> list[str]:
    """The data files of an entry: the file itself, or every .json/.jsonl file in a folder (sorted)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, entry) for entry in os.listdir(path) if entry.endswith(_EXTENSIONS))
        if not files:
            raise RetainError(f"dataset '{name}': folder {path} holds no .json or .jsonl files")
        return files
    if not os.path.isfile(path):
        raise RetainError(
            f"dataset '{name}': file {path} does not exist; put the file there or fix file_name"
        )
    if not path.endswith(_EXTENSIONS):
        raise RetainError(
            f"dataset '{name}': {path} is not a .json or .jsonl file; convert it to JSON "
            "(a list of records) or JSON lines"
        )
    return [path]


def _guess_format(record: Any) -> tuple[str, dict, dict]:
    """Formatting, columns and tags for a plain file: sharegpt when records hold a message list."""
    if isinstance(record, dict):
        for column in ("conversations", "messages"):
            messages = record.get(column)
            if isinstance(messages, list):
                first = messages[0] if messages and isinstance(messages[0], dict) else {}
                tags = {}
                if "role" in first and "from" not in first:
                    tags = dict(OPENAI_TAGS)
                return "sharegpt", {"messages": column}, tags
    return "alpaca", {}, {}


def _guess_image_column(records: list[Any]) -> dict:
    """LLaVA-style files name one image per record under "image"; map it when no record uses "images".

    Every record is looked at because LLaVA mixes text-only records (no "image" key) into image data.
    """
    keys = [record for record in records if isinstance(record, dict)]
    if any("images" in record for record in keys) or not any("image" in record for record in keys):
        return {}
    return {"images": "image"}


def _parse_records(
    records: list[Any], path: str, formatting: str, columns: dict, tags: dict, name: str
) -> list[Example]:
    examples = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RetainError(
                f"{path}: record {index} is a {type(record).__name__}, expected an object with named columns"
            )
        if formatting == "sharegpt":
            example = parse_sharegpt(record, columns, tags, path, index)
        else:
            example = parse_alpaca(record, columns, path, index)
        # Only records that carry an images cell: a literal "<image>" in text-only data stays plain text.
        if (columns or {}).get("images", "images") in record:
            check_placeholders(example.messages, example.images, path, index)
        example.meta["dataset"] = name
        examples.append(example)
    return examples


def _resolve_images(examples: list[Example], base_dir: str) -> None:
    """Make every example's image paths absolute (relative ones against `base_dir`) and check the files.

    Runs after num_samples, so records that are dropped cost no file checks.
    """
    checked: dict[str, str | None] = {}
    for example in examples:
        if example.images:
            source, index = example.meta["source"], example.meta["index"]
            example.images = resolve_images(example.images, base_dir, source, index, checked)


def _check_entry(name: str, entry: Any, info_path: str) -> None:
    if not isinstance(entry, dict):
        raise RetainError(f"{info_path}: entry '{name}' must be an object with a file_name")
    if "file_name" not in entry:
        hub = [key for key in _HUB_KEYS if key in entry]
        if hub:
            raise RetainError(
                f"{info_path}: dataset '{name}' is only on a hub ({hub[0]}: {entry[hub[0]]}); retain runs "
                'offline, so download the data file into the dataset folder and set "file_name" in its entry'
            )
        raise RetainError(f"{info_path}: dataset '{name}' has no \"file_name\"; add the data file's path")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise RetainError(
            f"{info_path}: dataset '{name}' has formatting '{formatting}'"
            f"{did_you_mean(str(formatting), FORMATTINGS)}; use one of {', '.join(FORMATTINGS)}"
        )
    if entry.get("ranking"):
        raise RetainError(
            f"{info_path}: dataset '{name}' is preference data (ranking: true); retain trains on "
            "instruction/response pairs, so use a dataset with one response per record"
        )
    for key in ("columns", "tags"):
        if not isinstance(entry.get(key, {}), dict):
            raise RetainError(f"{info_path}: dataset '{name}' \"{key}\" must be an object")


def load_examples(spec: str, dataset_dir: str | None = None, image_dir: str | None = None) -> list[Example]:
    """Load a dataset: `spec` is a name in `<dataset_dir>/dataset_info.json` or a .json/.jsonl file path.

    A plain file is read as alpaca unless its records hold "conversations" or "messages" (sharegpt).
    An entry's optional "num_samples" keeps the first that many records (deterministic, unlike LLaMA-Factory).

    Images: a record's `images` column (a list of paths, or one path; a dataset_info entry may map it with
    "columns": {"images": ...}) fills `Example.images`. In a plain file whose records use LLaVA's "image"
    key (one path) and none use "images", "image" is read instead, so LLaVA / CoIN JSON loads as is.
    Relative image paths resolve against `image_dir` when given (relative to the working directory), else
    against `dataset_dir` for a dataset_info entry (LLaMA-Factory's media_dir default) or the data file's
    folder for a plain file. Each image must exist and open, and each record with an images cell must hold
    exactly one "<image>" per image in its messages; otherwise a RetainError names the file and record.
    """
    candidates = [spec] + ([os.path.join(dataset_dir, spec)] if dataset_dir else [])
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is not None or spec.endswith(_EXTENSIONS):
        if path is None:
            raise RetainError(f"data file {spec} does not exist; fix the path")
        records = read_records(path)
        formatting, columns, tags = _guess_format(records[0] if records else None)
        columns = {**columns, **_guess_image_column(records)}
        examples = _parse_records(records, path, formatting, columns, tags, name=spec)
        if not examples:
            raise RetainError(f"{path} holds no records; add data or pick another file")
        _resolve_images(examples, image_dir or os.path.dirname(os.path.abspath(path)))
        return examples

    if dataset_dir is None:
        raise RetainError(
            f"'{spec}' is not a .json/.jsonl file and no dataset_dir is set; set dataset_dir to the folder "
            f"holding {DATASET_INFO} to load datasets by name"
        )
    info = load_dataset_info(dataset_dir)
    info_path = os.path.join(dataset_dir, DATASET_INFO)
    if spec not in info:
        available = ", ".join(sorted(info)) or "none"
        raise RetainError(
            f"{info_path}: no dataset named '{spec}'{did_you_mean(spec, info)}; available: {available}"
        )
    entry = info[spec]
    _check_entry(spec, entry, info_path)
    formatting = entry.get("formatting", "alpaca")
    examples = []
    for file in _files(os.path.join(dataset_dir, entry["file_name"]), spec):
        records = read_records(file)
        examples += _parse_records(
            records, file, formatting, entry.get("columns", {}), entry.get("tags", {}), spec
        )
    if entry.get("num_samples"):
        examples = examples[: int(entry["num_samples"])]
    if not examples:
        raise RetainError(
            f"dataset '{spec}' ({entry['file_name']} in {dataset_dir}) holds no records; add data"
        )
    _resolve_images(examples, image_dir or dataset_dir)
    return examples
