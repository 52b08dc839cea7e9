"""Image paths of multimodal records: shape checks, `<image>` placeholder counts, resolution and validation.

Records name images by path (LLaMA-Factory's `images` column, LLaVA's `image` key). Loading checks each
record up front, so a bad image fails at plan time with the file and record named, not mid-training.
Images are opened with Pillow when it is installed (it reads only the header, so this stays cheap);
without Pillow only existence and read permission are checked.
"""

from __future__ import annotations

import os
from typing import Any

from retain.errors import RetainError

try:
    from PIL import Image, UnidentifiedImageError
except ImportError:  # pillow is optional (matplotlib pulls it in); without it, existence checks only
    Image = None
    UnidentifiedImageError = OSError


class ImageFileError(RetainError):
    """An image a record names is missing or cannot be read (layouts add where their images come from)."""


# LLaMA-Factory's IMAGE_PLACEHOLDER (extras/constants.py), also LLaVA's DEFAULT_IMAGE_TOKEN.
IMAGE_PLACEHOLDER = "<image>"


def image_list(value: Any, source: str, index: int, column: str) -> list[str]:
    """The image paths of one record's images cell: a list of non-empty strings.

    None or a missing cell means no images; a single string is one image (LLaMA-Factory wraps it the same
    way, and LLaVA's `image` key holds one path).
    """
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _shape_error(source, index, column, f"got {type(value).__name__}")
    for position, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            got = "an empty string" if isinstance(item, str) else f"a {type(item).__name__}"
            raise _shape_error(source, index, column, f"item {position} is {got}")
    return list(value)


def _shape_error(source: str, index: int, column: str, detail: str) -> RetainError:
    return RetainError(
        f"{source}: record {index} column '{column}' must be a list of image paths (strings), {detail}; "
        f'fix the record or map the right column with "columns": {{"images": "<column name>"}}'
    )


def count_placeholders(messages: list[dict[str, str]]) -> int:
    """How many `<image>` placeholders the messages hold (every turn, as LLaMA-Factory counts them)."""
    return sum(message["content"].count(IMAGE_PLACEHOLDER) for message in messages)


def check_placeholders(messages: list[dict[str, str]], images: list[str], source: str, index: int) -> None:
    """Each image must have exactly one `<image>` in the text: image-text models splice image i there."""
    found = count_placeholders(messages)
    if found != len(images):
        raise RetainError(
            f"{source}: record {index} has {len(images)} image(s) but {found} '{IMAGE_PLACEHOLDER}' "
            f"placeholder(s) in its messages; put one {IMAGE_PLACEHOLDER} in the user turns per image, "
            "in the order of the images list"
        )


def resolve_image(path: str, base_dir: str) -> str:
    """An absolute path: `path` as is when absolute, else joined to `base_dir` (itself made absolute)."""
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(path)))


def image_problem(path: str) -> str | None:
    """Why the image at absolute `path` cannot be used, or None when it is usable."""
    if not os.path.isfile(path):
        return "does not exist"
    if not os.access(path, os.R_OK):
        return "is not readable (permission denied)"
    if Image is None:
        return None
    try:
        with Image.open(path):
            return None
    except (UnidentifiedImageError, OSError) as err:
        # One line: PIL messages can carry the file name and newlines; keep just the reason.
        reason = " ".join(str(err).split()) or type(err).__name__
        return f"cannot be read as an image ({reason})"


def resolve_images(
    images: list[str],
    base_dir: str,
    source: str,
    index: int,
    checked: dict[str, str | None] | None = None,
) -> list[str]:
    """Absolute, validated paths for one record's images; relative paths resolve against `base_dir`.

    `checked` caches each path's verdict across records, since datasets reuse images (mllm_demo does).
    """
    checked = {} if checked is None else checked
    resolved = []
    for position, raw in enumerate(images):
        path = resolve_image(raw, base_dir)
        if path not in checked:
            checked[path] = image_problem(path)
        if checked[path] is not None:
            raise ImageFileError(
                f"{source}: record {index} image {position} ('{raw}' -> {path}) {checked[path]}; "
                "put the image there, fix the path, or set image_dir to the folder the paths are relative to"
            )
        resolved.append(path)
    return resolved


def load_image(path: str) -> Any:
    """The image at `path` as an RGB PIL image, read into memory (the file is closed on return)."""
    if Image is None:
        raise RetainError(f"reading the image {path} needs Pillow; install it with: pip install pillow")
    with Image.open(path) as image:
        return image.convert("RGB")
