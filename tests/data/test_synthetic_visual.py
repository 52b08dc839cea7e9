"""The built-in visual synthetic tasks: deterministic pictures in the cache, disjoint splits, answers that
only the picture tells (checked from the pixels, independently of the generator)."""

import collections
import os

import pytest
from PIL import Image

from retain.data.images import IMAGE_PLACEHOLDER, check_placeholders
from retain.data.synthetic import SYNTHETIC_TASKS, load_synthetic
from retain.data.synthetic_visual import IMAGE_SIZE, VisualTask, cache_root
from retain.models.loading import cache_dir

VISUAL = sorted(name for name, task in SYNTHETIC_TASKS.items() if isinstance(task, VisualTask))
LABELS = {
    "shape_colour": {"red", "green", "blue", "yellow"},
    "count_shapes": {"1", "2", "3", "4", "5"},
    "shape_position": {"left", "right", "top", "bottom"},
    "shape_kind": {"circle", "square", "triangle"},
    "digit": {str(d) for d in range(10)},
}
RGB = {(220, 30, 30): "red", (30, 150, 40): "green", (30, 70, 220): "blue", (235, 195, 0): "yellow"}
WHITE = (255, 255, 255)
# Seven-segment digits by their lit segments (a top, b upper right, c lower right, d bottom, e lower left,
# f upper left, g middle), written out here again rather than imported.
DIGITS = {
    "abcdef": "0",
    "bc": "1",
    "abdeg": "2",
    "abcdg": "3",
    "bcfg": "4",
    "acdfg": "5",
    "acdefg": "6",
    "abc": "7",
    "abcdefg": "8",
    "abcdfg": "9",
}
GENERATED_META = {"task", "split", "seed", "index", "images"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test writes its pictures into its own cache folder, never the user's."""
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _ink(path):
    """The non-background pixels of a picture: {(x, y): (r, g, b)}."""
    with Image.open(path) as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.format == "PNG"
        pixels = image.convert("RGB").load()
    return {
        (x, y): pixels[x, y] for x in range(IMAGE_SIZE) for y in range(IMAGE_SIZE) if pixels[x, y] != WHITE
    }


def _components(points):
    """How many 4-connected blobs the points make."""
    left, count = set(points), 0
    while left:
        count += 1
        stack = [left.pop()]
        while stack:
            x, y = stack.pop()
            for near in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if near in left:
                    left.remove(near)
                    stack.append(near)
    return count


def _answer_from_picture(task, path, meta):
    """The answer read off the picture's pixels (plus, for a digit, where its box is)."""
    ink = _ink(path)
    xs, ys = [x for x, _ in ink], [y for _, y in ink]
    if task == "shape_colour":
        (colour,) = set(ink.values())
        return RGB[colour]
    if task == "count_shapes":
        return str(_components(ink))
    if task == "shape_position":
        dx = sum(xs) / len(xs) - (IMAGE_SIZE - 1) / 2
        dy = sum(ys) / len(ys) - (IMAGE_SIZE - 1) / 2
        if abs(dx) > abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"
    if task == "shape_kind":
        filled = len(ink) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
        return "square" if filled > 0.95 else "circle" if filled > 0.7 else "triangle"
    if task == "digit":
        # Probe the middle of each segment's place inside the digit's box (from the scene: a 1 lights only
        # its right side, so the ink alone does not tell where the box is).
        (shape,) = meta["shapes"]
        height, width = shape["size"], shape["size"] // 2 + 4
        x0 = shape["x"] - width // 2
        y0 = shape["y"] - height // 2
        x1, y1 = x0 + width - 1, y0 + height - 1
        t = max(2, height // 8)
        xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
        probes = {
            "a": (xm, y0 + t // 2),
            "b": (x1 - t // 2, (y0 + ym) // 2),
            "c": (x1 - t // 2, (ym + y1) // 2),
            "d": (xm, y1 - t // 2),
            "e": (x0 + t // 2, (ym + y1) // 2),
            "f": (x0 + t // 2, (y0 + ym) // 2),
            "g": (xm, ym),
        }
        return DIGITS["".join(s for s, point in probes.items() if point in ink)]
    raise AssertionError(f"no reference answer for {task}")


def _answer_from_meta(task, meta):
    """The answer recomputed from the drawn scene's parameters."""
    shapes = meta["shapes"]
    if task == "shape_colour":
        return shapes[0]["colour"]
    if task == "count_shapes":
        return str(len(shapes))
    if task == "shape_position":
        dx, dy = shapes[0]["x"] - IMAGE_SIZE / 2, shapes[0]["y"] - IMAGE_SIZE / 2
        return ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom")
    if task == "shape_kind":
        return shapes[0]["kind"]
    if task == "digit":
        return str(shapes[0]["digit"])
    raise AssertionError(f"no reference answer for {task}")


def _scene(example):
    return repr(sorted((k, v) for k, v in example.meta.items() if k not in GENERATED_META))


def test_the_visual_tasks_are_registered():
    assert set(LABELS) <= set(VISUAL)
    assert cache_root() == cache_dir()  # the data layer's copy of the models' rule


@pytest.mark.parametrize("name", VISUAL)
def test_task(name, cache):
    spec = f"synthetic:{name}"
    train = load_synthetic(spec, 300, seed=0, split="train")
    test = load_synthetic(spec, 60, seed=0, split="test")
    other_seed_test = load_synthetic(spec, 60, seed=5, split="test")
    assert len(train) == 300 and len({_scene(e) for e in train}) == 300
    # Train and test never share a drawn scene, whatever the seeds.
    assert not {_scene(e) for e in train} & {_scene(e) for e in test + other_seed_test}
    prompts = {e.messages[0]["content"] for e in train + test}
    assert len(prompts) == 1  # the same words for every instance: only the picture tells the answer
    (prompt,) = prompts
    assert prompt.count(IMAGE_PLACEHOLDER) == 1 and "Answer with" in prompt
    labels = collections.Counter(e.reference for e in train)
    assert set(labels) == LABELS[name]
    assert min(labels.values()) > 0.6 * 300 / len(LABELS[name])  # balanced
    for example in train[:60] + test:
        assert example.meta["task"] == name and example.messages[0]["role"] == "user"
        assert len(example.images) == 1 and os.path.isabs(example.images[0])
        assert example.images[0].startswith(str(cache / "visual" / name) + os.sep)
        check_placeholders(example.messages, example.images, name, example.meta["index"])
        assert example.reference == _answer_from_meta(name, example.meta)
        assert example.reference == _answer_from_picture(name, example.images[0], example.meta)


@pytest.mark.parametrize("name", VISUAL)
def test_pictures_are_deterministic_by_seed(name, tmp_path, monkeypatch):
    def pictures(folder, seed):
        monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / folder))
        examples = load_synthetic(f"synthetic:{name}", 20, seed=seed, split="train")
        return [e.messages for e in examples], [open(e.images[0], "rb").read() for e in examples]

    first = pictures("one", 0)
    assert pictures("two", 0) == first  # the same bytes, drawn afresh into another cache
    assert pictures("three", 1)[1] != first[1]


def test_the_cache_is_reused(cache):
    first = load_synthetic("synthetic:count_shapes", 30, seed=2, split="train")
    paths = [e.images[0] for e in first]
    folder = os.path.dirname(paths[0])
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in paths)  # no temporary left
    stamps = {p: os.stat(p).st_mtime_ns for p in paths}
    os.utime(paths[0], ns=(1, 1))
    stamps[paths[0]] = 1
    again = load_synthetic("synthetic:count_shapes", 30, seed=2, split="train")
    assert again == first
    assert {p: os.stat(p).st_mtime_ns for p in paths} == stamps  # nothing written the second time
    # A picture of the wrong size (or not a picture) is drawn again.
    Image.new("RGB", (8, 8)).save(paths[1])
    with open(paths[2], "wb") as file:
        file.write(b"not a png")
    load_synthetic("synthetic:count_shapes", 30, seed=2, split="train")
    for path in paths[1:3]:
        with Image.open(path) as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in paths)


def test_the_digest_does_not_depend_on_the_cache_folder(tmp_path, monkeypatch):
    from retain.engine.plan import examples_digest

    digests = []
    for folder in ("one", "two"):
        monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / folder))
        digests.append(examples_digest(load_synthetic("synthetic:shape_kind", 10, seed=0, split="test")))
    assert digests[0] == digests[1]


def test_prompts_are_distinguishable_from_every_task():
    """No two tasks' prompts open with the same two words (the text tasks' rule, visual ones included)."""
    openings = {
        name: {" ".join(e.messages[0]["content"].split()[:2]) for e in task.generate(20, 0, "train")}
        for name, task in SYNTHETIC_TASKS.items()
    }
    for name in VISUAL:
        for other, other_words in openings.items():
            assert other == name or not openings[name] & other_words


def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    from retain.errors import RetainError

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RETAIN_CACHE", str(blocker))
    with pytest.raises(RetainError, match="set RETAIN_CACHE to a writable folder"):
        load_synthetic("synthetic:digit", 2, seed=0, split="train")
