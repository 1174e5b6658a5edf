"""Deterministic synthetic "shapes on a grid" visual task (the embedded default data set).

Every image is a ``grid`` x ``grid`` board (default 3 x 3 cells of 32 x 32 pixels, i.e. 96 x 96 RGB) on a
plain dark background.  Between 4 and 9 cells hold one filled shape (circle, square, triangle or cross) in
one of six very distinct colours; the others are empty.  The user asks for every shape, and the reference
answer lists the objects in reading order (row-major), each as ``"<color> <shape> <row> <col>"`` with
1-based row and column, joined with ``", "`` and ending with ``"."``::

    red circle 1 1, blue cross 1 3, yellow square 2 2, green triangle 3 1.

An object costs five word-level tokens (four words and a separator), so answers are 20 to 45 tokens long.

Everything is a pure function of ``(seed, split, index)``: the per-sample RNG is derived from a stable
``hashlib.blake2b`` digest, never from Python's ``hash()``.  The ``"train"`` and ``"heldout"`` splits are
disjoint *by construction*: a layout (the list of ``(color, shape, row, col)`` objects) belongs to the
held-out split exactly when a blake2b hash of the layout falls in a fixed 10 % bucket, and each split
rejection-samples layouts until the bucket matches.  Hence no held-out layout (and so no held-out image)
can ever occur in training, for any seed.

Only the standard library, numpy and PIL are used here (torch is not required).

Example:
    >>> task = ShapesTask(seed=0)
    >>> s = task.sample("train", 0)
    >>> s.image.size
    (96, 96)
    >>> parse_answer(s.answer) == s.objects
    True
    >>> 20 <= approx_word_tokens(s.answer) <= 60
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWER_ORDERS",
    "COLORS",
    "COLOR_RGB",
    "SHAPES",
    "BACKGROUND_RGB",
    "PROMPTS",
    "SUBSET_PROMPTS",
    "SUBSET_SIZE",
    "VIDEO_PROMPT",
    "TASK_VOCABULARY",
    "SPLITS",
    "ShapesObject",
    "ShapesSample",
    "ShapesTask",
    "ShapesDataset",
    "approx_word_tokens",
    "cell_labels",
    "format_answer",
    "layout_key",
    "layout_split",
    "parse_answer",
    "exact_match",
    "field_accuracy",
    "score",
    "task_corpus",
    "valid_subset",
    "write_jsonl",
    "video_to_messages",
    "render_examples",
]

# ----------------------------------------------------------------------------------------------------------
# Fixed vocabulary
# ----------------------------------------------------------------------------------------------------------

#: Colour names and their RGB values (chosen to be far apart from each other and from the background).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (245, 225, 40),
    "purple": (160, 60, 210),
    "orange": (250, 140, 20),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUND_RGB: tuple[int, int, int] = (24, 24, 32)

#: Paraphrases of the single image question (the task is identical for all of them).
PROMPTS: tuple[str, ...] = (
    "List every shape in the image as color shape row column.",
    "Name each shape in the image as color shape row column.",
    "Describe every shape in the grid as color shape row column.",
)
#: The question asked about a video (the grid fills up over the frames).
VIDEO_PROMPT: str = "List every shape in the last frame as color shape row column."

SPLITS: tuple[str, ...] = ("train", "heldout")
#: What an answer lists, in which order (:class:`ShapesTask` ``order``).
ANSWER_ORDERS: tuple[str, ...] = ("reading", "random", "subset")
#: Objects named by an ``order="subset"`` answer.
SUBSET_SIZE = 3
#: Prompts of ``order="subset"`` samples (paraphrases of one question, as :data:`PROMPTS`). Their answers
#: name each object's cell first (``"<row> <col> <color> <shape>"``): the choice of object is then the
#: cell, and colour and shape are looked up there, as in the reading-order task.
SUBSET_PROMPTS: tuple[str, ...] = tuple(
    p.replace("every shape", f"{SUBSET_SIZE} shapes").replace("each shape", f"{SUBSET_SIZE} shapes")
    .replace("color shape row column", "row column color shape") for p in PROMPTS)

MIN_OBJECTS = 4
MAX_OBJECTS = 9
MAX_GRID = 9  # rows/columns are written as single digits 1..9
_HELDOUT_BUCKETS = 10  # 1 bucket in 10 of the layout hash space is held out
_FORMAT_VERSION = "shapes-v1"

_TOKEN_RE = re.compile(r"[A-Za-z]+|\d|[^\w\s]")


def approx_word_tokens(text: str) -> int:
    """Count word-level tokens: every alphabetic word, every single digit and every punctuation mark is one.

    Example:
        >>> approx_word_tokens("red circle 1 2, blue cross 3 3.")
        10
    """
    return len(_TOKEN_RE.findall(text))


def _build_vocabulary() -> list[str]:
    words: list[str] = []
    for text in (*PROMPTS, VIDEO_PROMPT):
        words.extend(w.lower() for w in _TOKEN_RE.findall(text))
    words.extend(COLORS)
    words.extend(SHAPES)
    words.extend(str(d) for d in range(1, MAX_GRID + 1))
    words.extend([",", "."])
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


#: Every word, digit and punctuation mark that can appear in prompts and answers (no duplicates).
TASK_VOCABULARY: list[str] = _build_vocabulary()

# ----------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapesObject:
    """One drawn object with its rendering jitter (``size`` and offsets in pixels)."""

    color: str
    shape: str
    row: int
    col: int
    size: int
    dx: int
    dy: int

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.color, self.shape, self.row, self.col)


@dataclass
class ShapesSample:
    """One sample: the rendered image, its objects (reading order), prompt and reference answer.

    ``objects`` holds ``(color, shape, row, col)`` tuples with 1-based row and column.

    Example:
        >>> s = ShapesTask(seed=0).sample("train", 3)
        >>> m = s.to_messages("images/train_000003.png")
        >>> [turn["role"] for turn in m["messages"]]
        ['user', 'assistant']
        >>> m["messages"][0]["content"][0]
        {'type': 'image', 'image': 'images/train_000003.png'}
        >>> m["messages"][1]["content"][0]["text"] == s.answer
        True
    """

    image: Image.Image
    objects: list[tuple[str, str, int, int]]
    prompt: str
    answer: str
    index: int
    split: str
    drawn: list[ShapesObject] = field(default_factory=list, repr=False)

    def to_messages(self, image_ref: Union[Image.Image, str, None] = None) -> dict[str, Any]:
        """Return the published chat record; ``image_ref`` is a PIL image or a path (default: ``self.image``)."""
        ref = self.image if image_ref is None else image_ref
        return {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": ref},
                        {"type": "text", "text": self.prompt},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": self.answer}]},
            ]
        }


def format_answer(objects: Iterable[Sequence], reading_order: bool = True, cell_first: bool = False) -> str:
    """Format ``(color, shape, row, col)`` objects as the reference answer (sorted into reading order,
    or in the given order with ``reading_order=False``); ``cell_first`` writes each as ``row col color shape``.

    Example:
        >>> format_answer([("blue", "cross", 2, 1), ("red", "circle", 1, 3)])
        'red circle 1 3, blue cross 2 1.'
        >>> format_answer([("blue", "cross", 2, 1), ("red", "circle", 1, 3)], reading_order=False)
        'blue cross 2 1, red circle 1 3.'
        >>> format_answer([("blue", "cross", 2, 1)], cell_first=True)
        '2 1 blue cross.'
    """
    objs = [(str(c), str(s), int(r), int(k)) for c, s, r, k in objects]
    if reading_order:
        objs.sort(key=lambda o: (o[2], o[3]))
    if cell_first:
        return ", ".join(f"{r} {k} {c} {s}" for c, s, r, k in objs) + "."
    return ", ".join(f"{c} {s} {r} {k}" for c, s, r, k in objs) + "."


def video_to_messages(frames: Union[Sequence[Image.Image], Sequence[str], str], prompt: str, answer: str) -> dict:
    """Chat record for a video sample (``{"type": "video", "video": frames}`` in the user turn).

    Example:
        >>> frames, prompt, answer = ShapesTask(seed=0).sample_video("train", 0, num_frames=2)
        >>> m = video_to_messages(frames, prompt, answer)
        >>> m["messages"][0]["content"][0]["type"], len(m["messages"][0]["content"][0]["video"])
        ('video', 2)
    """
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video", "video": frames}, {"type": "text", "text": prompt}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


# ----------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------


def _rng_for(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded from a stable blake2b digest of ``parts`` (never Python's ``hash()``)."""
    key = "/".join(str(p) for p in (_FORMAT_VERSION, *parts)).encode("utf-8")
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return random.Random(seed)


def layout_key(objects: Iterable[Sequence]) -> str:
    """Canonical string of a layout (objects sorted into reading order); equal layouts give equal keys.

    Example:
        >>> layout_key([("red", "circle", 1, 2)])
        'red circle 1 2'
    """
    return format_answer(objects)[:-1]


def layout_split(objects: Iterable[Sequence]) -> str:
    """The split (``"train"`` or ``"heldout"``) a layout belongs to, from a stable hash of its key."""
    digest = hashlib.blake2b(("split/" + layout_key(objects)).encode("utf-8"), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % _HELDOUT_BUCKETS == 0 else "train"


class ShapesTask:
    """Deterministic generator of the shapes task.

    Args:
        seed: task seed; together with ``(split, index)`` it fixes every pixel and every word.
        image_size: side of the square RGB image in pixels (must be divisible by ``grid``).
        grid: cells per side (2..9); objects per image are ``4 .. min(9, grid * grid)``.
        paraphrase: if True (default) the prompt is drawn from :data:`PROMPTS`, otherwise ``PROMPTS[0]``.
        order: ``"reading"`` (default) lists the objects row by row; ``"random"`` lists them in an order
            drawn per sample (fixed by ``(seed, split, index)``). Random order makes the answer ambiguous
            to a model that has not seen the earlier items -- the case where a small-block teacher's extra
            context carries information that the gold token alone does not (see docs/swd.md).
            ``"subset"`` asks for :data:`SUBSET_SIZE` shapes (:data:`SUBSET_PROMPTS`) and answers with a
            subset drawn per sample, in reading order, each object written cell first (``"1 3 red
            cross"``): every token is uncertain given the image (which objects?), but a valid answer only
            needs "later in reading order than the previous one".
            Score it with :func:`valid_subset` against the image's full layout. Images are the same
            in every order.

    Example:
        >>> task = ShapesTask(seed=0)
        >>> a, b = task.sample("heldout", 7), task.sample("heldout", 7)
        >>> a.answer == b.answer and a.image.tobytes() == b.image.tobytes()
        True
        >>> task.layout("heldout", 7) == a.objects
        True
    """

    def __init__(self, seed: int = 0, image_size: int = 96, grid: int = 3, paraphrase: bool = True,
                 order: str = "reading"):
        if order not in ANSWER_ORDERS:
            raise ValueError(f"ShapesTask: order must be one of {ANSWER_ORDERS}, got {order!r}")
        if not isinstance(grid, int) or not 2 <= grid <= MAX_GRID:
            raise ValueError(f"ShapesTask: grid must be an int in [2, {MAX_GRID}], got {grid!r}")
        if not isinstance(image_size, int) or image_size % grid != 0:
            raise ValueError(f"ShapesTask: image_size ({image_size!r}) must be an int divisible by grid ({grid})")
        if image_size // grid < 12:
            raise ValueError(f"ShapesTask: cells of {image_size // grid} px are too small (need >= 12)")
        self.seed = int(seed)
        self.image_size = image_size
        self.grid = grid
        self.cell = image_size // grid
        self.paraphrase = bool(paraphrase)
        self.order = order
        self.min_objects = min(MIN_OBJECTS, grid * grid)
        self.max_objects = min(MAX_OBJECTS, grid * grid)

    def __repr__(self) -> str:
        order = "" if self.order == "reading" else f", order={self.order!r}"
        return f"ShapesTask(seed={self.seed}, image_size={self.image_size}, grid={self.grid}{order})"

    # -- layouts --------------------------------------------------------------------------------------------

    @staticmethod
    def _check(split: str, index: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"ShapesTask: split must be one of {SPLITS}, got {split!r}")
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"ShapesTask: index must be a non-negative int, got {index!r}")

    def _draw_objects(self, stream: str, split: str, index: int) -> tuple[list[ShapesObject], random.Random]:
        """Rejection-sample a layout whose hash bucket matches ``split``; return objects and the RNG."""
        self._check(split, index)
        for attempt in range(10_000):
            rng = _rng_for(self.seed, self.grid, stream, split, int(index), attempt)
            n = rng.randint(self.min_objects, self.max_objects)
            cells = sorted(rng.sample(range(self.grid * self.grid), n))
            objs = []
            for c in cells:
                color, shape = rng.choice(COLORS), rng.choice(SHAPES)
                size, dx, dy = self._jitter(rng)
                objs.append(ShapesObject(color, shape, c // self.grid + 1, c % self.grid + 1, size, dx, dy))
            if layout_split(o.key for o in objs) == split:
                return objs, rng
        raise RuntimeError(f"ShapesTask: no {split} layout found for index {index}")  # pragma: no cover

    def _jitter(self, rng: random.Random) -> tuple[int, int, int]:
        cell = self.cell
        size = int(round(cell * rng.uniform(0.62, 0.78)))
        max_off = max(0, min(cell // 32, (cell - size) // 2 - 2))  # +-1 px for 32 px cells
        return size, rng.randint(-max_off, max_off), rng.randint(-max_off, max_off)

    def layout(self, split: str, index: int) -> list[tuple[str, str, int, int]]:
        """The ``(color, shape, row, col)`` objects of a sample in reading order, without rendering."""
        objs, _ = self._draw_objects("image", split, index)
        return [o.key for o in objs]

    # -- rendering ------------------------------------------------------------------------------------------

    def render(self, objects: Iterable[ShapesObject]) -> Image.Image:
        """Draw objects (with their jitter) on a blank board and return a ``RGB`` PIL image."""
        img = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND_RGB)
        draw = ImageDraw.Draw(img)
        for o in objects:
            self._draw_one(draw, o)
        return img

    def _draw_one(self, draw: ImageDraw.ImageDraw, o: ShapesObject) -> None:
        cell, s = self.cell, o.size
        x0 = (o.col - 1) * cell + (cell - s) // 2 + o.dx
        y0 = (o.row - 1) * cell + (cell - s) // 2 + o.dy
        x1, y1 = x0 + s - 1, y0 + s - 1  # PIL boxes are inclusive
        rgb = COLOR_RGB[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=rgb)
        elif o.shape == "square":
            inset = max(1, s // 10)  # a square a bit smaller than its box so its area matches the others
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=rgb)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
        elif o.shape == "cross":
            t = max(3, int(math.ceil(s / 3)))
            a = x0 + (s - t) // 2
            b = y0 + (s - t) // 2
            draw.rectangle((a, y0, a + t - 1, y1), fill=rgb)
            draw.rectangle((x0, b, x1, b + t - 1), fill=rgb)
        else:  # pragma: no cover - guarded by SHAPES
            raise ValueError(f"unknown shape {o.shape!r}")

    # -- samples --------------------------------------------------------------------------------------------

    def _prompt(self, rng: random.Random) -> str:
        prompts = SUBSET_PROMPTS if self.order == "subset" else PROMPTS
        return rng.choice(prompts) if self.paraphrase else prompts[0]

    def _answer(self, keys: list[tuple[str, str, int, int]], split: str, index: int) -> str:
        if self.order == "reading":
            return format_answer(keys)
        if self.order == "subset":
            chosen = _rng_for(self.seed, self.grid, "subset", split, int(index)).sample(range(len(keys)), SUBSET_SIZE)
            return format_answer([keys[i] for i in sorted(chosen)], cell_first=True)
        keys = list(keys)
        _rng_for(self.seed, self.grid, "order", split, int(index)).shuffle(keys)  # own stream: images unchanged
        return format_answer(keys, reading_order=False)

    def sample(self, split: str, index: int) -> ShapesSample:
        """Render sample ``index`` of ``split`` (``"train"`` or ``"heldout"``)."""
        objs, rng = self._draw_objects("image", split, index)
        prompt = self._prompt(rng)
        keys = [o.key for o in objs]
        return ShapesSample(
            image=self.render(objs),
            objects=keys,
            prompt=prompt,
            answer=self._answer(keys, split, index),
            index=int(index),
            split=split,
            drawn=objs,
        )

    def text(self, split: str, index: int) -> tuple[str, str]:
        """``(prompt, answer)`` of a sample without rendering its image (fast; used for corpora)."""
        objs, rng = self._draw_objects("image", split, index)
        return self._prompt(rng), self._answer([o.key for o in objs], split, index)

    def sample_video(
        self, split: str, index: int, num_frames: int = 4
    ) -> tuple[list[Image.Image], str, str]:
        """A short video in which the grid fills up; the question asks for every shape in the last frame.

        The objects of the final layout appear one group at a time, in a random order, so that frame ``k``
        shows the first ``ceil((k + 1) * n / num_frames)`` of them; the last frame shows all ``n`` and the
        answer lists them exactly as in the image task.  Frames have the image size.  Video samples come from
        their own seed stream and obey the same train/held-out layout partition.

        Example:
            >>> frames, prompt, answer = ShapesTask(seed=0).sample_video("train", 1, num_frames=4)
            >>> len(frames), frames[0].size, prompt == VIDEO_PROMPT
            (4, (96, 96), True)
        """
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"sample_video: num_frames must be a positive int, got {num_frames!r}")
        objs, rng = self._draw_objects("video", split, index)
        order = list(objs)
        rng.shuffle(order)
        n = len(order)
        frames = [self.render(order[: int(math.ceil((k + 1) * n / num_frames))]) for k in range(num_frames)]
        return frames, VIDEO_PROMPT, format_answer(o.key for o in objs)


# ----------------------------------------------------------------------------------------------------------
# Datasets and files
# ----------------------------------------------------------------------------------------------------------


class ShapesDataset:
    """Torch-style map dataset of chat records with the PIL image inline.

    Example:
        >>> ds = ShapesDataset(ShapesTask(seed=0), "heldout", 5)
        >>> len(ds), ds[4]["messages"][0]["content"][0]["image"].size
        (5, (96, 96))
    """

    def __init__(self, task: ShapesTask, split: str, size: int):
        ShapesTask._check(split, 0)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"ShapesDataset: size must be a non-negative int, got {size!r}")
        self.task, self.split, self.size = task, split, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"ShapesDataset({self.split!r}): index {index} out of range for size {self.size}")
        s = self.task.sample(self.split, index)
        return s.to_messages(s.image)


def write_jsonl(task: ShapesTask, split: str, size: int, out_dir: Union[str, Path]) -> Path:
    """Write ``size`` samples as PNGs under ``out_dir/images/`` plus ``out_dir/<split>.jsonl``.

    Each JSONL line is one published chat record whose image is a path *relative to* ``out_dir``
    (``images/<split>_<index:06d>.png``).  Returns the path of the JSONL file.

    Example:
        >>> import tempfile, json
        >>> d = tempfile.mkdtemp()
        >>> p = write_jsonl(ShapesTask(seed=0), "heldout", 2, d)
        >>> rec = json.loads(p.read_text().splitlines()[0])
        >>> rec["messages"][0]["content"][0]["image"]
        'images/heldout_000000.png'
    """
    ShapesTask._check(split, 0)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(size):
            s = task.sample(split, i)
            rel = f"images/{split}_{i:06d}.png"
            s.image.save(out / rel, format="PNG")
            f.write(json.dumps(s.to_messages(rel), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def task_corpus(n: int = 2000, seed: int = 0, grid: int = 3) -> list[str]:
    """``n`` ``"<prompt> <answer>"`` strings from the training split (every 4th one uses the video prompt).

    Used to train a tiny BPE tokenizer so that the task words become single tokens.  No image is rendered.

    Example:
        >>> corpus = task_corpus(8)
        >>> len(corpus), corpus[3].startswith(VIDEO_PROMPT)
        (8, True)
    """
    task = ShapesTask(seed=seed, grid=grid, image_size=32 * grid)
    out = []
    for i in range(n):
        prompt, answer = task.text("train", i)
        if i % 4 == 3:
            prompt = VIDEO_PROMPT
        out.append(f"{prompt} {answer}")
    return out


def cell_labels(objects: Iterable[Sequence[Any]], grid: int = 3) -> tuple[list[int], list[int]]:
    """Per-cell class ids of a layout, in reading order (row-major): ``(colors, shapes)``.

    ``0`` marks an empty cell; otherwise ``1 + COLORS.index(color)`` and ``1 + SHAPES.index(shape)``.
    ``objects`` holds ``(color, shape, row, col)`` tuples (``ShapesSample.objects``).

    Example:
        >>> cell_labels([("red", "cross", 1, 2)], grid=2)
        ([0, 1, 0, 0], [0, 4, 0, 0])
    """
    colors, shapes = [0] * (grid * grid), [0] * (grid * grid)
    for color, shape, row, col in objects:
        if not (1 <= row <= grid and 1 <= col <= grid):
            raise ValueError(f"cell_labels: object {(color, shape, row, col)} is outside a {grid}x{grid} grid")
        cell = (row - 1) * grid + (col - 1)
        colors[cell] = 1 + COLORS.index(color)
        shapes[cell] = 1 + SHAPES.index(shape)
    return colors, shapes


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------

_SEP_RE = re.compile(r"[,;\n]")


def _parse_chunks(text: str, cell_first: bool = False) -> list[Union[tuple[str, str, int, int], None]]:
    """Split an answer into per-object chunks; each is a parsed ``(color, shape, row, col)`` tuple or None
    when malformed (``cell_first``: items are written ``row col color shape``)."""
    body = text.strip().lower()
    body = re.sub(r"[.\s]+$", "", body)  # trailing period(s)
    if not body:
        return []
    chunks = []
    for part in _SEP_RE.split(body):
        words = part.split()
        if not words:
            continue
        if cell_first and len(words) == 4:
            words = words[2:] + words[:2]
        if (
            len(words) == 4
            and words[0] in COLOR_RGB
            and words[1] in SHAPES
            and words[2].isdigit()
            and words[3].isdigit()
            and int(words[2]) >= 1
            and int(words[3]) >= 1
        ):
            chunks.append((words[0], words[1], int(words[2]), int(words[3])))
        else:
            chunks.append(None)
    return chunks


def parse_answer(text: str, cell_first: bool = False) -> Union[list[tuple[str, str, int, int]], None]:
    """Parse ``"color shape row col, ..."`` (``cell_first``: ``"row col color shape, ..."``) into a list of
    ``(color, shape, row, col)`` tuples; None if empty or any item is malformed.

    Case and extra whitespace are ignored, ``;`` or newlines also separate items, the final period is optional.

    Example:
        >>> parse_answer("  Red circle 1  2 ,blue cross 3 3 . ")
        [('red', 'circle', 1, 2), ('blue', 'cross', 3, 3)]
        >>> parse_answer("red circle one two.") is None
        True
        >>> parse_answer("1 2 red circle.", cell_first=True)
        [('red', 'circle', 1, 2)]
    """
    if not isinstance(text, str):
        return None
    chunks = _parse_chunks(text, cell_first)
    if not chunks or any(c is None for c in chunks):
        return None
    return chunks  # type: ignore[return-value]


def _normalise(text: str) -> str:
    t = text.strip().lower().replace(";", ",")
    t = re.sub(r"\s*([,.])\s*", r"\1 ", t)
    t = re.sub(r"\s+", " ", t).strip()
    return re.sub(r"[.\s]+$", "", t)


def exact_match(pred: str, ref: str, order: str = "reading") -> bool:
    """Is ``pred`` a right answer?  ``order`` is the task's (:class:`ShapesTask`):

    * ``"reading"``: normalised string match (case, whitespace, ``;`` vs ``,`` and the final period are
      ignored);
    * ``"random"``: the parsed objects are equal as multisets;
    * ``"subset"``: ``ref`` is the image's *whole* layout and ``pred`` must be a valid subset answer
      (:func:`valid_subset`).

    Example:
        >>> exact_match("Red circle 1 2 ,  blue cross 3 3", "red circle 1 2, blue cross 3 3.")
        True
        >>> exact_match("red circle 1 2.", "red circle 1 3.")
        False
        >>> exact_match("blue cross 3 3, red circle 1 2.", "red circle 1 2, blue cross 3 3.", order="random")
        True
    """
    if order not in ANSWER_ORDERS:
        raise ValueError(f"exact_match: order must be one of {ANSWER_ORDERS}, got {order!r}")
    if order == "reading":
        return _normalise(pred) == _normalise(ref)
    if order == "subset":
        return valid_subset(pred, ref)
    p, r = parse_answer(pred), parse_answer(ref)
    return p is not None and r is not None and Counter(p) == Counter(r)


def valid_subset(pred: str, layout: Union[str, Sequence[Sequence]], size: int = SUBSET_SIZE) -> bool:
    """Is ``pred`` a right answer to an ``order="subset"`` question about an image with this ``layout``
    (``"color shape row col, ..."``, as :func:`format_answer`): exactly ``size`` well-formed objects written
    cell first (``"row col color shape"``), each one of the image's, no repeats, in reading order?

    Example:
        >>> layout = "red circle 1 1, blue cross 1 2, green square 2 2, red cross 3 1."
        >>> valid_subset("1 1 red circle, 2 2 green square, 3 1 red cross.", layout)
        True
        >>> valid_subset("2 2 green square, 1 1 red circle, 3 1 red cross.", layout)  # not in reading order
        False
        >>> valid_subset("1 1 red circle, 1 2 blue square, 3 1 red cross.", layout)  # no blue square
        False
    """
    objects = parse_answer(pred, cell_first=True)
    cells = _parse_chunks(layout) if isinstance(layout, str) else [tuple(o) for o in layout]
    if objects is None or len(objects) != size or any(c is None for c in cells):
        return False
    positions = [(o[2], o[3]) for o in objects]
    return set(objects) <= set(cells) and all(a < b for a, b in zip(positions, positions[1:]))


def field_accuracy(pred: Union[str, Sequence[Sequence]], ref: Union[str, Sequence[Sequence]]) -> float:
    """Fraction of reference objects predicted exactly (colour, shape, row and column), in ``[0, 1]``.

    Matching is order-insensitive (multiset); the denominator is ``max(#reference, #predicted items)``,
    so extra or malformed predicted items are penalised.  Malformed items in a prediction count as wrong
    items but do not void the well-formed ones.

    Example:
        >>> field_accuracy("red circle 1 1, blue cross 1 2.", "red circle 1 1, blue square 1 2.")
        0.5
        >>> field_accuracy("red circle 1 1, red circle 2 2.", "red circle 1 1.")
        0.5
    """
    pred_chunks = _parse_chunks(pred) if isinstance(pred, str) else [tuple(p) for p in pred]
    ref_objs = _parse_chunks(ref) if isinstance(ref, str) else [tuple(r) for r in ref]
    if any(r is None for r in ref_objs):
        raise ValueError(f"field_accuracy: unparsable reference {ref!r}")
    denom = max(len(ref_objs), len(pred_chunks))
    if denom == 0:
        return 1.0
    hits = Counter(p for p in pred_chunks if p is not None) & Counter(ref_objs)
    return sum(hits.values()) / denom


def score(preds: Sequence[str], refs: Sequence[str], order: str = "reading") -> dict[str, float]:
    """Mean exact match, mean field accuracy, parse rate and count over paired predictions and references
    (``order``: the task's, see :func:`exact_match`).  For ``order="subset"`` each reference is the image's
    whole layout and field accuracy is the share of the :data:`SUBSET_SIZE` asked-for objects (or of the
    predicted items, if more) that are distinct objects of the image.

    Example:
        >>> refs = ["red circle 1 1, blue cross 1 2.", "green square 2 2."]
        >>> score(refs, refs)
        {'exact_match': 1.0, 'field_accuracy': 1.0, 'parsed': 1.0, 'n': 2}
    """
    if len(preds) != len(refs):
        raise ValueError(f"score: {len(preds)} predictions but {len(refs)} references")
    n = len(refs)
    if n == 0:
        return {"exact_match": 0.0, "field_accuracy": 0.0, "parsed": 0.0, "n": 0}
    em = sum(exact_match(p, r, order) for p, r in zip(preds, refs)) / n
    if order == "subset":
        fa = sum(_subset_field_accuracy(p, r) for p, r in zip(preds, refs)) / n
    else:
        fa = sum(field_accuracy(p, r) for p, r in zip(preds, refs)) / n
    parsed = sum(parse_answer(p, cell_first=order == "subset") is not None for p in preds) / n
    return {"exact_match": em, "field_accuracy": fa, "parsed": parsed, "n": n}


def _subset_field_accuracy(pred: str, layout: str, size: int = SUBSET_SIZE) -> float:
    chunks = _parse_chunks(pred, cell_first=True)
    hits = set(c for c in chunks if c is not None) & set(_parse_chunks(layout))
    return len(hits) / max(size, len(chunks))


# ----------------------------------------------------------------------------------------------------------
# Pictures for the docs
# ----------------------------------------------------------------------------------------------------------


def render_examples(
    path: Union[str, Path], task: Union[ShapesTask, None] = None, n: int = 4, split: str = "train", scale: int = 3
) -> Path:
    """Save a strip of ``n`` upscaled example images with their answers written underneath as one PNG.

    Example:
        >>> import tempfile, os
        >>> p = render_examples(os.path.join(tempfile.mkdtemp(), "ex.png"), n=2)
        >>> p.exists()
        True
    """
    task = task or ShapesTask(seed=0)
    samples = [task.sample(split, i) for i in range(n)]
    side = task.image_size * scale
    pad, line_h, chars = 12, 12, max(20, side // 6)
    wrapped = []
    for s in samples:
        words, lines, cur = s.answer.split(" "), [], ""
        for w in words:
            if cur and len(cur) + 1 + len(w) > chars:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        lines.append(cur)
        wrapped.append(lines)
    text_h = line_h * (max(len(w) for w in wrapped) + 1)
    sheet = Image.new("RGB", (n * (side + pad) + pad, side + 2 * pad + text_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (s, lines) in enumerate(zip(samples, wrapped)):
        x = pad + i * (side + pad)
        sheet.paste(s.image.resize((side, side), Image.NEAREST), (x, pad))
        draw.text((x, side + pad + 2), f"{split} #{s.index}", fill=(90, 90, 90))
        for j, line in enumerate(lines):
            draw.text((x, side + pad + 2 + line_h * (j + 1)), line, fill=(0, 0, 0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


if __name__ == "__main__":  # python -m nemo_automodel_bard.data.shapes [out.png]
    import sys

    print(render_examples(sys.argv[1] if len(sys.argv) > 1 else "docs/img/shapes_examples.png"))
