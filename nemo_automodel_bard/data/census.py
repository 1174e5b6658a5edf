"""The "census" task: the embedded default data set (shapes on a 4 x 4 grid, listed, then counted).

Every image is a 4 x 4 board of 32 x 32-pixel cells (128 x 128 RGB, one Qwen3-VL vision token per cell),
drawn with the shapes task's renderer (:mod:`nemo_automodel_bard.data.shapes`): between 10 and 16 cells hold
one filled shape (circle, square, triangle, cross) in one of six colours. The answer has four parts:

1. every object in reading order (row by row), ``"<color> <shape> <row> <col>"``, joined by ``", "``;
2. the number of objects of each colour present, in **any** order (``"red 3, blue 2, green 1"``);
3. the number of objects of each shape present, in **any** order;
4. the total, ``"total 12"``.

Parts end with ``". "``, the answer with ``"."``::

    red circle 1 1, blue cross 1 3, ... green square 4 4. blue 4, red 3, green 2. cross 5, circle 4. total 9.

Why this task: answers run 64-192 word-level tokens (mean about 100, so a 32-token block decodes about a
third of an answer); the counts are computed from the listing (tokens inside a block depend on each other);
and parts 2 and 3 have many valid forms: the reference draws one order per sample, so the model learns a
distribution over orders, and decoding a block in parallel can mix two of them (a colour twice, another never)
-- the failure that makes large blocks harder than small ones, and where a small-block teacher, which sees
more of the answer so far, knows more than the single gold order. :func:`exact_match` accepts every order.

Splits: ``train``, ``validation`` and ``test`` are disjoint by construction -- a layout (its list of
``(color, shape, row, col)``) belongs to the split its stable hash bucket names (1 in 10 validation, 1 in 10
test), and each split rejection-samples layouts until the bucket matches. Every default of the main job is
chosen on ``validation``; ``test`` is only reported.

Everything is a pure function of ``(seed, split, index)`` (blake2b-derived RNGs, never Python's ``hash()``).

Example:
    >>> task = CensusTask(seed=0)
    >>> s = task.sample("train", 0)
    >>> s.image.size
    (128, 128)
    >>> exact_match(s.answer, s.answer), 64 <= approx_word_tokens(s.answer) <= 192
    (True, True)
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from PIL import Image

from .shapes import COLORS, SHAPES, ShapesObject, ShapesTask, approx_word_tokens, format_answer

__all__ = [
    "CENSUS_PROMPTS",
    "CENSUS_SPLITS",
    "CensusAnswer",
    "CensusChatDataset",
    "CensusSample",
    "CensusTask",
    "census_corpus",
    "census_dataset",
    "exact_match",
    "field_score",
    "format_census",
    "layout_split",
    "parse_census",
    "score",
]

CENSUS_SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Paraphrases of the one question (the task is the same for all of them).
CENSUS_PROMPTS: tuple[str, ...] = (
    "List every shape as color shape row column, then count each color, each shape and the total.",
    "Name each shape as color shape row column, then count each color, each shape and the total.",
    "Describe every shape in the grid as color shape row column, then count colors, shapes and the total.",
)
GRID = 4
IMAGE_SIZE = 128
MIN_OBJECTS = 10
MAX_OBJECTS = 16
_BUCKETS = 10  # bucket 0: test, bucket 1: validation, the rest: train
_FORMAT_VERSION = "census-v1"


def _digest(*parts: Any) -> int:
    key = "/".join(str(p) for p in (_FORMAT_VERSION, *parts)).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def layout_split(objects: Sequence[Sequence]) -> str:
    """The split a layout belongs to (``train``, ``validation`` or ``test``), from a stable hash of it.

    Example:
        >>> layout_split([("red", "circle", 1, 1)]) in CENSUS_SPLITS
        True
    """
    bucket = _digest("split", format_answer(objects)) % _BUCKETS
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@dataclass(frozen=True)
class CensusAnswer:
    """A parsed answer: the objects (as written), colour and shape counts (as written), the total."""

    objects: tuple[tuple[str, str, int, int], ...]
    colors: tuple[tuple[str, int], ...]
    shapes: tuple[tuple[str, int], ...]
    total: Optional[int]


def format_census(objects: Sequence[Sequence], color_order: Sequence[str], shape_order: Sequence[str]) -> str:
    """The answer text for ``objects`` (reading order) with the counts written in the given orders (each a
    permutation of the colours / shapes present).

    Example:
        >>> objs = [("red", "circle", 1, 1), ("blue", "cross", 2, 3), ("red", "cross", 4, 4)]
        >>> format_census(objs, ["red", "blue"], ["cross", "circle"])
        'red circle 1 1, blue cross 2 3, red cross 4 4. red 2, blue 1. cross 2, circle 1. total 3.'
    """
    colors = Counter(o[0] for o in objects)
    shapes = Counter(o[1] for o in objects)
    if sorted(color_order) != sorted(colors) or sorted(shape_order) != sorted(shapes):
        raise ValueError("format_census: the count orders must list exactly the colours / shapes present")
    listing = format_answer(objects)[:-1]
    color_part = ", ".join(f"{c} {colors[c]}" for c in color_order)
    shape_part = ", ".join(f"{s} {shapes[s]}" for s in shape_order)
    return f"{listing}. {color_part}. {shape_part}. total {len(objects)}."


_OBJECT_RE = re.compile(r"^([a-z]+) ([a-z]+) (\d+) (\d+)$")
_COUNT_RE = re.compile(r"^([a-z]+) (\d+)$")


def _items(part: str) -> list[str]:
    return [p.strip() for p in part.split(",") if p.strip()]


def parse_census(text: str) -> Optional[CensusAnswer]:
    """Parse an answer into a :class:`CensusAnswer` (``None`` if it does not have the four parts).

    Case and extra whitespace are ignored; an item that does not parse is kept as ``None`` so that it counts
    as wrong in :func:`field_score`.

    Example:
        >>> a = parse_census("Red circle 1 1 , blue cross 2 3. blue 1, red 1. circle 1, cross 1. total 2.")
        >>> a.objects, a.colors, a.total
        ((('red', 'circle', 1, 1), ('blue', 'cross', 2, 3)), (('blue', 1), ('red', 1)), 2)
        >>> parse_census("red circle 1 1.") is None
        True
    """
    if not isinstance(text, str):
        return None
    t = re.sub(r"\s+", " ", text.strip().lower())
    parts = [p.strip() for p in re.split(r"\.(?:\s|$)", t)]
    parts = [p for p in parts if p]
    if len(parts) != 4 or not parts[3].startswith("total"):
        return None

    def objects(part: str) -> tuple:
        out = []
        for item in _items(part):
            m = _OBJECT_RE.match(item)
            out.append((m.group(1), m.group(2), int(m.group(3)), int(m.group(4))) if m else None)
        return tuple(out)

    def counts(part: str) -> tuple:
        out = []
        for item in _items(part):
            m = _COUNT_RE.match(item)
            out.append((m.group(1), int(m.group(2))) if m else None)
        return tuple(out)

    total = re.fullmatch(r"total (\d+)", parts[3])
    return CensusAnswer(objects(parts[0]), counts(parts[1]), counts(parts[2]), int(total.group(1)) if total else None)


def exact_match(pred: str, ref: str) -> bool:
    """Is ``pred`` a right answer? The listing must equal the reference's (reading order), the colour and the
    shape counts must hold the reference's entries in any order, each once, and the total must be right.

    Example:
        >>> ref = "red circle 1 1, blue cross 2 3. red 1, blue 1. circle 1, cross 1. total 2."
        >>> exact_match("red circle 1 1, blue cross 2 3. blue 1, red 1. cross 1, circle 1. total 2.", ref)
        True
        >>> exact_match("red circle 1 1, blue cross 2 3. blue 1, blue 1. cross 1, circle 1. total 2.", ref)
        False
    """
    p, r = parse_census(pred), parse_census(ref)
    if p is None or r is None:
        return False
    return (p.objects == r.objects and p.total == r.total and None not in p.colors and None not in p.shapes
            and len(p.colors) == len(r.colors) and set(p.colors) == set(r.colors)
            and len(p.shapes) == len(r.shapes) and set(p.shapes) == set(r.shapes))


def field_score(pred: str, ref: str) -> float:
    """Share of the reference's fields that the prediction gets right, in ``[0, 1]``: each object (as a
    multiset), each colour count, each shape count and the total is one field; the denominator of each part is
    ``max(#reference, #predicted)`` items, so extra, repeated or malformed items cost.

    Example:
        >>> ref = "red circle 1 1, blue cross 2 3. red 1, blue 1. circle 1, cross 1. total 2."
        >>> field_score(ref, ref)
        1.0
        >>> field_score("red circle 1 1, blue cross 2 3. red 1, red 1. circle 1, cross 1. total 3.", ref)
        0.7142857142857143
    """
    r = parse_census(ref)
    if r is None:
        raise ValueError(f"field_score: unparsable reference {ref!r}")
    p = parse_census(pred)
    if p is None:
        return 0.0
    hits = denom = 0
    for mine, theirs in ((p.objects, r.objects), (p.colors, r.colors), (p.shapes, r.shapes)):
        matched = Counter(x for x in mine if x is not None) & Counter(theirs)
        hits += sum(matched.values())
        denom += max(len(mine), len(theirs))
    hits += int(p.total == r.total)
    return hits / (denom + 1)


def score(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean exact match, mean field score, parse rate and count over paired predictions and references.

    Example:
        >>> refs = ["red circle 1 1. red 1. circle 1. total 1."]
        >>> score(refs, refs)
        {'exact_match': 1.0, 'field_accuracy': 1.0, 'parsed': 1.0, 'n': 1}
    """
    if len(preds) != len(refs):
        raise ValueError(f"score: {len(preds)} predictions but {len(refs)} references")
    n = len(refs)
    if n == 0:
        return {"exact_match": 0.0, "field_accuracy": 0.0, "parsed": 0.0, "n": 0}
    return {"exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
            "field_accuracy": sum(field_score(p, r) for p, r in zip(preds, refs)) / n,
            "parsed": sum(parse_census(p) is not None for p in preds) / n, "n": n}


@dataclass
class CensusSample:
    """One sample: image, objects (reading order), prompt and reference answer."""

    image: Image.Image
    objects: list[tuple[str, str, int, int]]
    prompt: str
    answer: str
    index: int
    split: str

    def to_messages(self, image_ref: Any = None) -> dict[str, Any]:
        """The sample as a chat record (``image_ref``: a path or the PIL image; default the image)."""
        return {"messages": [
            {"role": "user", "content": [{"type": "image", "image": self.image if image_ref is None else image_ref},
                                         {"type": "text", "text": self.prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": self.answer}]}]}


class CensusTask:
    """Deterministic generator of the census task (see the module docstring).

    Example:
        >>> task = CensusTask(seed=0)
        >>> a, b = task.sample("test", 3), task.sample("test", 3)
        >>> a.answer == b.answer and a.image.tobytes() == b.image.tobytes()
        True
        >>> layout_split(a.objects)
        'test'
    """

    def __init__(self, seed: int = 0, paraphrase: bool = True):
        self.seed = int(seed)
        self.paraphrase = bool(paraphrase)
        self.grid, self.image_size = GRID, IMAGE_SIZE
        self._renderer = ShapesTask(seed=seed, image_size=IMAGE_SIZE, grid=GRID)

    def __repr__(self) -> str:
        return f"CensusTask(seed={self.seed})"

    @staticmethod
    def _check(split: str, index: int) -> None:
        if split not in CENSUS_SPLITS:
            raise ValueError(f"CensusTask: split must be one of {CENSUS_SPLITS}, got {split!r}")
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"CensusTask: index must be a non-negative int, got {index!r}")

    def _draw(self, split: str, index: int) -> tuple[list[ShapesObject], random.Random]:
        self._check(split, index)
        for attempt in range(10_000):
            rng = random.Random(_digest(self.seed, "layout", split, index, attempt))
            n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
            cells = sorted(rng.sample(range(GRID * GRID), n))
            objs = []
            for c in cells:
                color, shape = rng.choice(COLORS), rng.choice(SHAPES)
                size, dx, dy = self._renderer._jitter(rng)
                objs.append(ShapesObject(color, shape, c // GRID + 1, c % GRID + 1, size, dx, dy))
            if layout_split([o.key for o in objs]) == split:
                return objs, rng
        raise RuntimeError(f"CensusTask: no {split} layout found for index {index}")  # pragma: no cover

    def _text(self, objs: list[ShapesObject], rng: random.Random) -> tuple[str, str]:
        keys = [o.key for o in objs]
        prompt = rng.choice(CENSUS_PROMPTS) if self.paraphrase else CENSUS_PROMPTS[0]
        colors = sorted({k[0] for k in keys}, key=COLORS.index)
        shapes = sorted({k[1] for k in keys}, key=SHAPES.index)
        rng.shuffle(colors)
        rng.shuffle(shapes)
        return prompt, format_census(keys, colors, shapes)

    def layout(self, split: str, index: int) -> list[tuple[str, str, int, int]]:
        """The objects of a sample in reading order, without rendering."""
        return [o.key for o in self._draw(split, index)[0]]

    def text(self, split: str, index: int) -> tuple[str, str]:
        """``(prompt, answer)`` without rendering the image."""
        return self._text(*self._draw(split, index))

    def sample(self, split: str, index: int) -> CensusSample:
        """Render sample ``index`` of ``split``."""
        objs, rng = self._draw(split, index)
        prompt, answer = self._text(objs, rng)
        return CensusSample(self._renderer.render(objs), [o.key for o in objs], prompt, answer, int(index), split)


def census_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """``n`` ``"<prompt> <answer>"`` training-split strings (for the tiny tokenizer's merges; no rendering)."""
    task = CensusTask(seed=seed)
    return [" ".join(task.text("train", i)) for i in range(n)]


class CensusChatDataset:
    """The census task as chat records with inline PIL images and an ``index`` (the task index, which seeds
    the diffusion noise). ``offset``: the records are the task's samples ``offset .. offset + size - 1``.

    Example:
        >>> ds = CensusChatDataset(split="validation", size=2)
        >>> ds[1]["index"], ds[1]["messages"][0]["content"][0]["image"].size
        (1, (128, 128))
    """

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, offset: int = 0) -> None:
        CensusTask._check(split, 0)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"CensusChatDataset: size must be a non-negative int, got {size!r}")
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"CensusChatDataset: offset must be a non-negative int, got {offset!r}")
        self.split, self.size, self.seed, self.offset = split, size, int(seed), offset
        self.task = CensusTask(seed=seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"CensusChatDataset({self.split!r}): index {index} out of range for size {self.size}")
        sample = self.task.sample(self.split, self.offset + index)
        return {**sample.to_messages(), "index": self.offset + index}

    def __repr__(self) -> str:
        return f"CensusChatDataset(split={self.split!r}, size={self.size}, seed={self.seed}, offset={self.offset})"


def census_dataset(split: str = "train", size: int = 1000, seed: int = 0, offset: int = 0) -> CensusChatDataset:
    """Factory for :class:`CensusChatDataset` (``_target_``-friendly)."""
    return CensusChatDataset(split=split, size=int(size), seed=seed, offset=int(offset))


def answer_lengths(n: int = 500, split: str = "train", seed: int = 0) -> dict[str, float]:
    """Word-level answer length statistics over ``n`` samples (min, mean, max)."""
    task = CensusTask(seed=seed)
    lengths = [approx_word_tokens(task.text(split, i)[1]) for i in range(n)]
    return {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}
