"""Built-in generated visual tasks (shape colour, count, position, kind, digit), drawn with Pillow.

They are `synthetic:<name>` tasks like the text ones (`retain.data.synthetic`), registered in the same
SYNTHETIC_TASKS registry, so a quickstart of an image-text model needs no download. Each example is one
small picture and one fixed question per task with a single `<image>` placeholder: the words are the same
for every instance, so only the picture tells the answer.

A draw function returns (prompt, answer, scene): the scene lists the drawn shapes (JSON values) and fully
decides the picture. Splits, determinism and de-duplication follow the text tasks, with the scene in place
of the prompt: a scene belongs to exactly one split by a stable hash, and the generator is seeded from
(task, seed, split). Pictures are rendered once into retain's cache folder,
`<cache>/visual/<task>/<split>-<seed>/<index>-<scene hash>.png`, and reused while present with the right
size; each is written to a temporary file and renamed, so a killed run never leaves half a PNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image, ImageDraw

from retain.data.formats import Example
from retain.data.images import IMAGE_PLACEHOLDER
from retain.data.synthetic import SYNTHETIC_TASKS, Draw, SyntheticTask
from retain.errors import RetainError

IMAGE_SIZE = 64  # pixels per side; image-text processors resize to their encoder's input size
# Bump when a picture of the same scene would be drawn differently: the file names change with it.
RENDER_VERSION = "1"
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (220, 30, 30), "green": (30, 150, 40), "blue": (30, 70, 220), "yellow": (235, 195, 0)}
KINDS = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
# Lit segments of a seven-segment digit: a top, b upper right, c lower right, d bottom, e lower left,
# f upper left, g middle.
SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}
_MARGIN = 2  # every shape stays this many pixels inside the canvas

Scene = dict[str, Any]


def cache_root() -> str:
    """retain's cache folder: $RETAIN_CACHE, else $XDG_CACHE_HOME/retain, else ~/.cache/retain.

    The same rule as retain.models.loading.cache_dir, repeated here so the data layer imports no models.
    """
    root = os.environ.get("RETAIN_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "retain")
    return root


@dataclass(frozen=True)
class VisualTask(SyntheticTask):
    """A generated task whose examples carry one picture: `draw(rng)` returns (prompt, answer, scene) and
    `render(scene)` draws the scene as an IMAGE_SIZE x IMAGE_SIZE RGB picture."""

    render: Callable[[Scene], Image.Image]

    def generate(self, n: int, seed: int, split: str) -> list[Example]:
        """`n` distinct examples of `split`, each with its picture on disk, the same for the same seed."""
        prompts: dict[str, str] = {}

        def keyed(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
            prompt, answer, scene = self.draw(rng)
            key = scene_key(prompt, scene)
            prompts[key] = prompt
            return key, answer, scene

        # The text generator on scene keys: the same seeding, split buckets, de-duplication and errors.
        keyed_task = SyntheticTask(self.name, self.description, self.scorer, keyed)
        examples = []
        for example in keyed_task.generate(n, seed, split):
            key = example.messages[0]["content"]
            meta = example.meta
            relative = os.path.join(
                "visual", self.name, f"{meta['split']}-{seed}", f"{meta['index']}-{_short_hash(key)}.png"
            )
            path = os.path.abspath(os.path.join(cache_root(), relative))
            _ensure_picture(path, lambda key=key: self.render(json.loads(key)["scene"]))
            messages = [{**example.messages[0], "content": prompts[key]}, example.messages[1]]
            # meta["images"] holds the path as written (here: relative to the cache folder), as for files.
            examples.append(
                replace(example, messages=messages, meta={**meta, "images": [relative]}, images=[path])
            )
        return examples


def scene_key(prompt: str, scene: Scene) -> str:
    """Canonical text of one example's content: what de-duplication and the split hash look at."""
    return json.dumps({"prompt": prompt, "scene": scene}, sort_keys=True, separators=(",", ":"))


def _short_hash(key: str) -> str:
    return hashlib.sha256(f"{RENDER_VERSION}\0{IMAGE_SIZE}\0{key}".encode()).hexdigest()[:12]


def _usable(path: str) -> bool:
    try:
        with Image.open(path) as image:
            return image.size == (IMAGE_SIZE, IMAGE_SIZE)
    except (FileNotFoundError, OSError):
        return False


def _ensure_picture(path: str, render: Callable[[], Image.Image]) -> None:
    """Write the picture to `path` unless a picture of the right size is already there (atomically)."""
    if _usable(path):
        return
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".", suffix=".png.tmp")
    except OSError as err:
        raise RetainError(
            f"cannot write the synthetic task pictures into {folder} ({err.strerror or err}); "
            "set RETAIN_CACHE to a writable folder"
        ) from err
    try:
        with os.fdopen(handle, "wb") as file:
            render().save(file, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def visual_task(
    name: str,
    description: str,
    scorer: str = "normalized",
    render: Callable[[Scene], Image.Image] | None = None,
) -> Callable[[Draw], Draw]:
    """Register a draw function as the visual synthetic task `name` (pictures drawn by `render`)."""

    def register(draw: Draw) -> Draw:
        SYNTHETIC_TASKS[name] = VisualTask(
            name=name, description=description, scorer=scorer, draw=draw, render=render or render_scene
        )
        return draw

    return register


def render_scene(scene: Scene) -> Image.Image:
    """The scene's shapes on a white IMAGE_SIZE square; each shape is centred on (x, y), `size` wide."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for shape in scene["shapes"]:
        colour = COLOURS[shape["colour"]]
        x0, y0, x1, y1 = shape_box(shape)
        if shape["kind"] == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape["kind"] == "square":
            pen.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape["kind"] == "triangle":
            pen.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
        elif shape["kind"] == "digit":
            for segment in SEGMENTS[shape["digit"]]:
                pen.rectangle(segment_box(shape, segment), fill=colour)
        else:
            raise ValueError(f"unknown shape kind {shape['kind']!r}")
    return image


def shape_box(shape: dict[str, Any]) -> tuple[int, int, int, int]:
    """The inclusive pixel box (x0, y0, x1, y1) of a shape; a digit is `size` tall and half as wide."""
    height = shape["size"]
    width = digit_width(height) if shape["kind"] == "digit" else height
    x0, y0 = shape["x"] - width // 2, shape["y"] - height // 2
    return x0, y0, x0 + width - 1, y0 + height - 1


def digit_width(height: int) -> int:
    return height // 2 + 4


def digit_stroke(height: int) -> int:
    return max(2, height // 8)


def segment_box(shape: dict[str, Any], segment: str) -> tuple[int, int, int, int]:
    """The inclusive pixel box of one segment of a drawn digit."""
    x0, y0, x1, y1 = shape_box(shape)
    t = digit_stroke(shape["size"])
    middle = (y0 + y1) // 2
    return {
        "a": (x0, y0, x1, y0 + t - 1),
        "b": (x1 - t + 1, y0, x1, middle),
        "c": (x1 - t + 1, middle, x1, y1),
        "d": (x0, y1 - t + 1, x1, y1),
        "e": (x0, middle, x0 + t - 1, y1),
        "f": (x0, y0, x0 + t - 1, middle),
        "g": (x0, middle - t // 2, x1, middle - t // 2 + t - 1),
    }[segment]


def _shape(rng: random.Random, kind: str, colour: str, size: int, x: int | None = None, y: int | None = None):
    """A shape of `size` at (x, y), or at a random place fully inside the canvas when not given."""
    shape = {"kind": kind, "colour": colour, "size": size, "x": 0, "y": 0}
    x0, y0, x1, y1 = shape_box(shape)  # offsets of the box around a centre at (0, 0)
    shape["x"] = x if x is not None else rng.randint(_MARGIN - x0, IMAGE_SIZE - 1 - _MARGIN - x1)
    shape["y"] = y if y is not None else rng.randint(_MARGIN - y0, IMAGE_SIZE - 1 - _MARGIN - y1)
    return shape


def _prompt(question: str, answer_format: str) -> str:
    return f"{IMAGE_PLACEHOLDER}\n{question} Answer with {answer_format}."


@visual_task("shape_colour", "say the colour of the one shape in a picture")
def _shape_colour(rng: random.Random) -> tuple[str, str, Scene]:
    colour = rng.choice(sorted(COLOURS))
    shape = _shape(rng, rng.choice(KINDS), colour, rng.randint(12, 30))
    return _prompt("Which colour is the shape?", "red, green, blue or yellow"), colour, {"shapes": [shape]}


@visual_task("count_shapes", "count the one to five shapes in a picture", scorer="exact")
def _count_shapes(rng: random.Random) -> tuple[str, str, Scene]:
    count = rng.randint(1, 5)
    while True:  # rejection: the shapes never touch, so each one is seen apart (a few tries at most)
        shapes = [
            _shape(rng, rng.choice(KINDS), rng.choice(sorted(COLOURS)), rng.randint(9, 14))
            for _ in range(count)
        ]
        if all(_apart(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1 :]):
            break
    return _prompt("How many shapes are there?", "the number only"), str(count), {"shapes": shapes}


def _apart(a: dict[str, Any], b: dict[str, Any], gap: int = 3) -> bool:
    ax0, ay0, ax1, ay1 = shape_box(a)
    bx0, by0, bx1, by1 = shape_box(b)
    return ax1 + gap < bx0 or bx1 + gap < ax0 or ay1 + gap < by0 or by1 + gap < ay0


@visual_task("shape_position", "say on which side of a picture its one shape is")
def _shape_position(rng: random.Random) -> tuple[str, str, Scene]:
    position = rng.choice(POSITIONS)
    size = rng.randint(10, 18)
    centre = IMAGE_SIZE // 2
    # Near the middle of one edge: the centre is at least 12 px off the middle across and at most 6 along.
    along = rng.randint(centre - 6, centre + 6)
    across = rng.randint(size // 2 + _MARGIN, centre - 12)
    if position in ("right", "bottom"):
        across = IMAGE_SIZE - 1 - across
    x, y = (across, along) if position in ("left", "right") else (along, across)
    shape = _shape(rng, rng.choice(KINDS), rng.choice(sorted(COLOURS)), size, x, y)
    prompt = _prompt("Where is the shape?", "left, right, top or bottom")
    return prompt, position, {"shapes": [shape]}


@visual_task("shape_kind", "say whether the one shape in a picture is a circle, square or triangle")
def _shape_kind(rng: random.Random) -> tuple[str, str, Scene]:
    kind = rng.choice(KINDS)
    shape = _shape(rng, kind, rng.choice(sorted(COLOURS)), rng.randint(16, 30))
    return _prompt("What shape is drawn?", "circle, square or triangle"), kind, {"shapes": [shape]}


@visual_task("digit", "read a seven-segment digit drawn in a picture", scorer="exact")
def _digit(rng: random.Random) -> tuple[str, str, Scene]:
    digit = rng.randint(0, 9)
    shape = _shape(rng, "digit", rng.choice(sorted(COLOURS)), rng.randint(26, 40))
    shape["digit"] = digit
    return _prompt("Read the digit.", "the digit only"), str(digit), {"shapes": [shape]}
