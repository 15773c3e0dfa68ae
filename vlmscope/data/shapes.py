"""The shapes world: seeded synthetic images of coloured shapes, with Q&A and per-patch labels.

Small enough that a tiny VLM learns it in minutes, and labelled per image patch, so a circuit
or attribution result can be checked against ground truth ("does attribution mass fall on the
patches of the triangle the question asks about?").

Two worlds, picked by ``ShapesConfig.version``:

- **v1** (the world of the first shipped toy VLM, kept so its figures can be reproduced,
  ``ShapesConfig(version=1)``): a 64x64 image is a 4x4 grid of 16 px cells, each object is
  small or large and fills the middle of one cell, up to 4 objects, question types
  ``V1_QUESTION_TYPES`` (``count`` counts a shape), one wording per type (the first phrasing
  below), positions the quadrant of the object's cell. Labels use 8 px patches.
- **v2** (``DEFAULT_VERSION``: the world the shipped toy VLM is trained on, which the demo and
  the ``shapes:N`` datasets use): described below.

Version 2. A 64x64 image is an 8x8 grid of 8 px patches. Each object occupies a
square block of patches, 2x2, 3x3 or 4x4 (sizes ``small``, ``medium``, ``large``), at any
free place of the grid; blocks never overlap, so no patch holds two objects, and the shape is
drawn inside its block with a 1 px margin, without anti-aliasing, in an exact RGB colour:
every pixel is background or one object's colour, and a patch's label is exact. A scene holds
1 to 5 objects (`ShapesConfig.max_objects`).

Each sample has one question of a type from ``QUESTION_TYPES`` (balanced: every block of
``len(types)`` consecutive samples holds each type once):

- ``colour`` "What colour is the circle?", ``shape`` "What shape is the red object?";
- ``count_shape`` "How many squares are there?", ``count_colour`` "How many red objects are
  there?" (answers ``zero`` .. ``five``, drawn uniformly);
- ``exists`` "Is there a red circle?" (half the negatives share the colour or the shape);
- ``position`` "Where is the red circle?" (the quadrant of the object's centre: ``top left``
  ..., never on a midline);
- ``relation`` "Is the circle left of the square?" (left of, right of, above, below; the two
  objects' blocks are apart along the asked axis; yes and no equally often).

Questions come from a grammar of paraphrases (`phrasings`): each type has templates with
alternatives, expanded into whole phrasings, and a fixed quarter of them (`phrasings`)
is held out: ``ShapesConfig.phrasings`` picks ``train`` (the default), ``heldout`` or ``all``.
Every word of a held-out phrasing occurs in some training phrasing of the same type, so a
held-out phrasing is a new combination of known words. The first phrasing of each type (the
wordings above) is always a training one.

`write_dataset(out_dir, n, seed, split)` writes, in ``out_dir``:

- ``{split}.parquet``: columns ``id`` (str), ``messages`` (chat format: the user turn is an
  image part then the question, the assistant turn the answer), ``images`` (list of PNG bytes,
  one per row) -- the chat schema `open_dataset(out_dir, split=split)` reads;
- ``{split}.labels.jsonl``: one JSON object per row, same order and ``id``: the objects
  ``{shape, colour, size, cell: [r, c] (top-left patch of its block), span (patches per side),
  bbox: [x0, y0, x1, y1] (exclusive end), patches: [[r, c], ...], coverage: [...]}``,
  ``patch_size``, ``question_type``, ``question``, ``phrasing`` (index into the type's
  phrasings), ``heldout_phrasing``, ``answer``, ``query`` (the attributes the question names),
  ``target`` (indices of the objects the question is about) and ``caption``;
- ``{split}.info.json``: the generator config, seed, row count and answer vocabulary.

Determinism: sample i of a split depends only on (seed, split, i), so the same arguments give
the same bytes, any prefix of a longer run equals a shorter run, and splits draw from disjoint
seed streams (a scene may still repeat across splits by chance).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

VERSIONS: tuple[int, ...] = (1, 2)
DEFAULT_VERSION = 2
"""The world `ShapesConfig()` builds: the one the shipped toy VLM was trained on (demo,
`shapes:N` datasets). The version is written to ``info.json``."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 0),
    "purple": (150, 40, 200),
    "orange": (250, 130, 10),
}
SIZES: dict[str, int] = {"small": 2, "medium": 3, "large": 4}
"""Size name -> side of the object's block, in patches."""
SIZE_WEIGHTS: dict[str, float] = {"small": 0.45, "medium": 0.35, "large": 0.2}
QUESTION_TYPES: tuple[str, ...] = (
    "colour",
    "shape",
    "count_shape",
    "count_colour",
    "exists",
    "position",
    "relation",
)
ALL_QUESTION_TYPES: tuple[str, ...] = (*QUESTION_TYPES, "caption")
"""The v2 world's question types and captions (v1's are `V1_QUESTION_TYPES`)."""
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
_PLURALS = {"cross": "crosses"}
PHRASING_SETS: tuple[str, ...] = ("train", "heldout", "all")
V1_SIZES: tuple[str, ...] = ("small", "large")
V1_QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "exists", "position")
_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"sizes": V1_SIZES, "max_objects": 4, "max_count": 3, "question_types": V1_QUESTION_TYPES},
    2: {"sizes": tuple(SIZES), "max_objects": 5, "max_count": 5, "question_types": QUESTION_TYPES},
}


@dataclass(frozen=True)
class ShapesConfig:
    """How the world looks. ``version`` picks the world (see the module doc); fields left at
    None take that version's defaults: v2 has 64x64 images, an 8x8 grid of 8 px patches, three
    sizes, up to 5 objects and seven question types; v1 a 4x4 grid of 16 px cells (8 px label
    patches), two sizes, up to 4 objects and five question types in one wording each."""

    version: int = DEFAULT_VERSION
    image_size: int = 64
    patch_size: int = 8
    """Side of a label patch in px; in v2 also of a grid patch (objects' blocks align to it)."""
    cell_size: int = 16
    """v1 only: side of a grid cell in px (one object per cell)."""
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] | None = None
    max_objects: int | None = None
    max_count: int | None = None
    """Counting answers are drawn uniformly from zero .. max_count."""
    min_coverage: float = 0.2
    """A patch is labelled with an object when at least this fraction of it is the object."""
    question_types: tuple[str, ...] | None = None
    phrasings: str = "train"
    """Which paraphrases questions use: ``train``, ``heldout`` (never trained on) or ``all``
    (v2; v1 has one wording per type, ``train``)."""
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"unknown shapes-world version {self.version!r}; known: {VERSIONS}")
        for name, value in _DEFAULTS[self.version].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        self._check_common()
        if self.version == 1:
            self._check_v1()
        else:
            self._check_v2()

    def _check_common(self) -> None:
        if unknown := set(self.shapes) - set(SHAPES):
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {SHAPES}")
        if unknown := set(self.colours) - set(COLOURS):
            raise ValueError(f"unknown colours {sorted(unknown)}; known: {list(COLOURS)}")
        known = (*_DEFAULTS[self.version]["question_types"], "caption")
        if unknown := set(self.question_types or ()) - set(known):
            raise ValueError(f"unknown v{self.version} question types {sorted(unknown)}")
        if len(self.shapes) < 2 or len(self.colours) < 2 or not self.question_types:
            raise ValueError("need at least 2 shapes, 2 colours and 1 question type")
        if not self.sizes:
            raise ValueError("need at least 1 size")
        if self.phrasings not in PHRASING_SETS:
            raise ValueError(f"phrasings must be one of {PHRASING_SETS}, got {self.phrasings!r}")
        if tuple(self.background) in {COLOURS[c] for c in self.colours}:
            raise ValueError("background must differ from every shape colour")

    def _check_v1(self) -> None:
        if self.image_size % self.cell_size or self.cell_size < 6:
            raise ValueError("image_size must be a multiple of cell_size, and cell_size >= 6")
        if self.patch_size < 1:
            raise ValueError("patch_size must be >= 1")
        if unknown := set(self.sizes or ()) - set(V1_SIZES):
            raise ValueError(f"unknown v1 sizes {sorted(unknown)}; known: {list(V1_SIZES)}")
        self._check_counts(self.grid**2)
        if self.phrasings != "train":
            raise ValueError("the v1 world has one wording per question type: phrasings='train'")

    def _check_v2(self) -> None:
        if self.patch_size < 4 or self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size, and patch_size >= 4")
        if unknown := set(self.sizes or ()) - set(SIZES):
            raise ValueError(f"unknown sizes {sorted(unknown)}; known: {list(SIZES)}")
        sides = [SIZES[s] for s in self.sizes or ()]
        if self.grid < 2 * max(sides):
            raise ValueError(f"a {self.grid}x{self.grid} grid is too small for {self.sizes}")
        self._check_counts((self.grid // min(sides)) ** 2)
        if "relation" in (self.question_types or ()) and self.n_objects < 2:
            raise ValueError("relation questions need max_objects >= 2")

    def _check_counts(self, most: int) -> None:
        if not 1 <= self.n_objects <= most:
            raise ValueError(f"max_objects must be in 1..{most}")
        if not 1 <= self.n_count <= min(self.n_objects, len(NUMBER_WORDS) - 1):
            raise ValueError("max_count must be in 1..max_objects (and <= 10)")

    @property
    def n_objects(self) -> int:
        """`max_objects` as an int (it is never None after construction)."""
        return int(self.max_objects or 0)

    @property
    def n_count(self) -> int:
        """`max_count` as an int."""
        return int(self.max_count or 0)

    @property
    def types(self) -> tuple[str, ...]:
        """`question_types` (never None after construction)."""
        return tuple(self.question_types or ())

    @property
    def size_names(self) -> tuple[str, ...]:
        """`sizes` (never None after construction)."""
        return tuple(self.sizes or ())

    @property
    def grid(self) -> int:
        """Places per side: patches (v2) or cells (v1)."""
        return self.image_size // (self.cell_size if self.version == 1 else self.patch_size)


@dataclass
class ShapeObject:
    """One drawn shape, its block and the label patches it covers (for the sample's patch
    size)."""

    shape: str
    colour: str
    size: str
    #: v2: top-left patch (row, col) of the object's block; v1: its cell.
    cell: tuple[int, int]
    bbox: tuple[int, int, int, int]
    patches: list[tuple[int, int]] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)
    #: side of the block in grid places (patches in v2; 1 cell in v1).
    span: int = 1

    @property
    def centre(self) -> tuple[float, float]:
        """(row, col) of the block's centre, in patches."""
        return (self.cell[0] + self.span / 2, self.cell[1] + self.span / 2)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "cell": list(self.cell),
            "span": self.span,
            "bbox": list(self.bbox),
            "patches": [list(p) for p in self.patches],
            "coverage": self.coverage,
        }


@dataclass
class ShapesSample:
    """One image with its objects, one question/answer about it and a caption."""

    id: str
    split: str
    index: int
    image: Image.Image
    png: bytes
    objects: list[ShapeObject]
    question_type: str
    question: str
    answer: str
    query: dict[str, str]
    target: list[int]
    caption: str
    patch_size: int
    phrasing: int = 0
    heldout_phrasing: bool = False

    def messages(self) -> list[dict[str, Any]]:
        """Chat-format conversation: image + question from the user, answer from the assistant."""
        return [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.question}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": self.answer}]},
        ]

    def label(self) -> dict[str, Any]:
        """The row of ``labels.jsonl``."""
        return {
            "id": self.id,
            "split": self.split,
            "index": self.index,
            "image_size": list(self.image.size),
            "patch_size": self.patch_size,
            "question_type": self.question_type,
            "question": self.question,
            "phrasing": self.phrasing,
            "heldout_phrasing": self.heldout_phrasing,
            "answer": self.answer,
            "query": self.query,
            "target": self.target,
            "caption": self.caption,
            "objects": [o.to_json() for o in self.objects],
        }


# --------------------------------------------------------------------------------------------
# Drawing and labels


def article(word: str) -> str:
    """The indefinite article ("a" or "an") for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    """English plural of a shape word."""
    return _PLURALS.get(shape, shape + "s")


def position_word(centre: tuple[float, float], grid: int) -> str:
    """The quadrant of a point given in patches ("top left", ..., "bottom right"); a point on
    a midline has none (ValueError): the generator never asks about one."""
    r, c = centre
    mid = grid / 2
    if r == mid or c == mid:
        raise ValueError(f"{centre} lies on a midline of the {grid}x{grid} grid")
    return f"{'top' if r < mid else 'bottom'} {'left' if c < mid else 'right'}"


def cell_position(cell: tuple[int, int], grid: int) -> str:
    """v1: where a cell is: "top left", ... ("top"/"left"/"center" on odd grids)."""
    r, c = cell
    mid = grid // 2
    vert = "middle" if grid % 2 and r == mid else ("top" if r < mid else "bottom")
    horiz = "center" if grid % 2 and c == mid else ("left" if c < mid else "right")
    if vert == "middle":
        return horiz
    if horiz == "center":
        return vert
    return f"{vert} {horiz}"


def _v1_positions(grid: int) -> list[str]:
    return sorted({cell_position((r, c), grid) for r in range(grid) for c in range(grid)})


def block_box(cell: tuple[int, int], span: int, patch_size: int) -> tuple[int, int, int, int]:
    """v2: (x0, y0, x1, y1), end exclusive: where a shape is drawn in its block of span x span
    patches whose top-left patch is `cell` (1 px margin)."""
    x0 = cell[1] * patch_size + 1
    y0 = cell[0] * patch_size + 1
    s = span * patch_size - 2
    return (x0, y0, x0 + s, y0 + s)


def shape_mask(shape: str, box: tuple[int, int, int, int], image_size: int) -> np.ndarray:
    """Boolean (H, W) mask of a shape drawn (aliased) in ``box``."""
    x0, y0, x1, y1 = box
    xe, ye = x1 - 1, y1 - 1  # PIL coordinates are inclusive
    cx, cy = (x0 + xe) / 2, (y0 + ye) / 2
    im = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([x0, y0, xe, ye], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, ye), (xe, ye), (cx, y0)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=255)
    elif shape == "cross":
        a = (x1 - x0) // 3
        draw.rectangle([x0 + a, y0, xe - a, ye], fill=255)
        draw.rectangle([x0, y0 + a, xe, ye - a], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(im) > 0


def patch_coverage(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Fraction of each patch (ceil(H/p) x ceil(W/p) grid; edge patches may be partial)."""
    h, w = mask.shape
    p = patch_size
    rows, cols = -(-h // p), -(-w // p)
    if h % p == 0 and w % p == 0:
        return mask.reshape(rows, p, cols, p).mean((1, 3))
    pad = ((0, rows * p - h), (0, cols * p - w))
    hits = np.pad(mask.astype(np.float64), pad).reshape(rows, p, cols, p).sum((1, 3))
    area = np.pad(np.ones((h, w)), pad).reshape(rows, p, cols, p).sum((1, 3))
    return hits / area


def covered_patches(
    mask: np.ndarray, patch_size: int, min_coverage: float
) -> tuple[list[tuple[int, int]], list[float]]:
    """Patches at least ``min_coverage`` covered, row-major; the best patch if none is."""
    cov = patch_coverage(mask, patch_size)
    idx = np.argwhere(cov >= min_coverage)
    if len(idx) == 0 and cov.max() > 0:
        idx = np.argwhere(cov == cov.max())[:1]  # a tiny shape still gets its best patch
    patches = [(int(r), int(c)) for r, c in idx]
    return patches, [round(float(cov[p]), 4) for p in patches]


def object_patches(
    obj: ShapeObject, config: ShapesConfig, patch_size: int | None = None
) -> list[tuple[int, int]]:
    """Label patches of an object for any patch size (re-renders its mask)."""
    mask = shape_mask(obj.shape, obj.bbox, config.image_size)
    return covered_patches(mask, patch_size or config.patch_size, config.min_coverage)[0]


def render(objects: list[ShapeObject], config: ShapesConfig) -> Image.Image:
    """Draw the objects on the background and fill in their label patches."""
    arr = np.empty((config.image_size, config.image_size, 3), np.uint8)
    arr[:] = config.background
    for obj in objects:
        mask = shape_mask(obj.shape, obj.bbox, config.image_size)
        arr[mask] = COLOURS[obj.colour]
        obj.patches, obj.coverage = covered_patches(mask, config.patch_size, config.min_coverage)
    return Image.fromarray(arr, "RGB")


def caption(objects: list[ShapeObject]) -> str:
    """Caption like "A red circle and two blue squares.": reading order, equal objects grouped."""
    order = sorted(objects, key=lambda o: o.cell)
    groups: dict[tuple[str, str], int] = {}
    for o in order:
        groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
    phrases = [
        f"{article(colour)} {colour} {shape}"
        if n == 1
        else f"{NUMBER_WORDS[n]} {colour} {plural(shape)}"
        for (colour, shape), n in groups.items()
    ]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def answer_vocabulary(config: ShapesConfig | None = None) -> list[str]:
    """Every answer a non-caption question can have under ``config``."""
    config = config or ShapesConfig()
    return [
        *config.colours,
        *config.shapes,
        *NUMBER_WORDS[: config.n_count + 1],
        "yes",
        "no",
        *(_v1_positions(config.grid) if config.version == 1 else POSITIONS),
    ]


# --------------------------------------------------------------------------------------------
# The grammar of paraphrases

#: Per question type, templates: ``[a|b]`` is a choice, ``{slot}`` is filled from the scene.
#: Slots: shape, shapes (plural), colour, a (article of the colour), A and B (the two objects
#: of a relation), rel0 .. rel2 (three wordings of the asked relation). Every template is
#: also asked with each of `_PREFIXES` in front.
GRAMMAR: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the {shape}?",
        "What color is the {shape}?",
        "What is the [colour|color] of the {shape}?",
        "Which [colour|color] is the {shape}?",
        "What [colour|color] does the {shape} have?",
        "Name the [colour|color] of the {shape}.",
    ),
    "shape": (
        "What shape is the {colour} object?",
        "What shape is the {colour} [thing|item]?",
        "What is the shape of the {colour} [object|thing|item]?",
        "Which shape is the {colour} [object|thing|item]?",
        "What shape does the {colour} [object|thing|item] have?",
        "Name the shape of the {colour} [object|thing|item].",
    ),
    "count_shape": (
        "How many {shapes} are there?",
        "How many {shapes} are [in the image|in the picture]?",
        "How many {shapes} [do you see|can you see]?",
        "Count the {shapes}.",
        "What is the number of {shapes}?",
        "Count the {shapes} [in the image|in the picture].",
    ),
    "count_colour": (
        "How many {colour} objects are there?",
        "How many {colour} [things|items] are there?",
        "How many {colour} [objects|things|items] are [in the image|in the picture]?",
        "How many {colour} [objects|things|items] [do you see|can you see]?",
        "Count the {colour} [objects|things|items].",
        "What is the number of {colour} [objects|things|items]?",
    ),
    "exists": (
        "Is there {a} {colour} {shape}?",
        "Is there {a} {colour} {shape} [in the image|in the picture]?",
        "[Do you see|Can you see] {a} {colour} {shape}?",
        "Does the [image|picture] [contain|show] {a} {colour} {shape}?",
        "Is {a} {colour} {shape} [present|visible]?",
    ),
    "position": (
        "Where is the {colour} {shape}?",
        "Where is the {colour} {shape} [in the image|in the picture]?",
        "In which [part|corner] of the [image|picture] is the {colour} {shape}?",
        "Which [part|corner] of the [image|picture] is the {colour} {shape} in?",
        "Where [do you see|can you see] the {colour} {shape}?",
    ),
    "relation": (
        "Is {A} {rel0} {B}?",
        "Is {A} [{rel1}|{rel2}] {B}?",
        "Is {A} [located|placed] [{rel0}|{rel1}|{rel2}] {B}?",
        "Does {A} [appear|sit] [{rel0}|{rel1}|{rel2}] {B}?",
        "Is it true that {A} is [{rel0}|{rel1}|{rel2}] {B}?",
    ),
}
_PREFIXES: tuple[str, ...] = ("", "Look at the image. ", "Question: ")
#: rel0 .. rel2 of each relation.
RELATION_WORDS: dict[str, tuple[str, str, str]] = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "lower than"),
}
HELDOUT_FRACTION = 0.25
_CHOICE = re.compile(r"\[([^\[\]]*)\]")


def _expand(template: str) -> list[str]:
    """Every phrasing of one template: each ``[a|b]`` choice taken every way, in order."""
    parts = _CHOICE.split(template)  # literal, choice, literal, choice, ...
    options = [p.split("|") if i % 2 else [p] for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*options)]


def _words(phrasing: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+|\{\w+\}", phrasing))


@cache
def phrasings(question_type: str) -> tuple[tuple[str, ...], frozenset[int]]:
    """(every phrasing of a question type, indices of the held-out ones).

    Phrasings are the templates' expansions, each with every prefix. A fixed quarter is held
    out, chosen by a seeded shuffle under two rules: the first phrasing (the canonical
    wording) stays in training, and every word of a held-out phrasing keeps occurring in some
    training phrasing. The choice does not depend on any data seed.
    """
    if question_type not in GRAMMAR:
        raise ValueError(f"no phrasings for question type {question_type!r}")
    base = [p for t in GRAMMAR[question_type] for p in _expand(t)]
    every = tuple(pre + p for p in base for pre in _PREFIXES)
    rng = np.random.default_rng(zlib.crc32(question_type.encode()))
    order = [int(i) for i in rng.permutation(len(every)) if i != 0]
    held: set[int] = set()
    want = int(len(every) * HELDOUT_FRACTION)
    for i in order:
        if len(held) >= want:
            break
        rest = [every[j] for j in range(len(every)) if j != i and j not in held]
        known = set().union(*(_words(p) for p in rest))
        if _words(every[i]) <= known:
            held.add(i)
    return every, frozenset(held)


def phrasing_indices(question_type: str, which: str) -> list[int]:
    """Indices of the phrasings of `which` set (``train``, ``heldout`` or ``all``)."""
    every, held = phrasings(question_type)
    if which == "all":
        return list(range(len(every)))
    if which not in PHRASING_SETS:
        raise ValueError(f"phrasings must be one of {PHRASING_SETS}, got {which!r}")
    return [i for i in range(len(every)) if (i in held) == (which == "heldout")]


def fill(phrasing: str, **slots: str) -> str:
    """A phrasing with its slots filled; the first letter is upper case."""
    text = phrasing.format(**slots)
    return text[0].upper() + text[1:]


# --------------------------------------------------------------------------------------------
# Scenes and questions


def _seed(seed: int, split: str, *rest: int) -> np.random.Generator:
    # crc32 of the split name keeps splits' streams apart and is stable across processes.
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode()), *rest]))


def _question_type(seed: int, split: str, index: int, types: tuple[str, ...]) -> str:
    """Each block of len(types) samples holds every type once, in a seeded order."""
    block, k = divmod(index, len(types))
    perm = _seed(seed, split, 1, block).permutation(len(types))
    return types[int(perm[k])]


class _Scene:
    """Objects being placed: specs (shape, colour) get sizes and free blocks of the grid."""

    def __init__(self, rng: np.random.Generator, config: ShapesConfig) -> None:
        self.rng, self.config = rng, config
        self.specs: list[tuple[str, str]] = []

    def pick(self, options: tuple[str, ...] | list[str]) -> str:
        return str(options[int(self.rng.integers(len(options)))])

    def add(self, shape: str, colour: str) -> int:
        self.specs.append((shape, colour))
        return len(self.specs) - 1

    def add_random(self, n: int, allowed: Callable[[str, str], bool]) -> None:
        """n objects drawn uniformly among the (shape, colour) pairs ``allowed`` accepts."""
        pairs = [(s, c) for s in self.config.shapes for c in self.config.colours if allowed(s, c)]
        for _ in range(n):
            self.add(*pairs[int(self.rng.integers(len(pairs)))])

    def _sizes(self, attempt: int) -> list[str]:
        sizes = list(self.config.size_names)
        if attempt >= 40:  # a crowded scene that would not fit: the smallest size only
            smallest = min(sizes, key=SIZES.__getitem__)
            return [smallest] * len(self.specs)
        p = np.array([SIZE_WEIGHTS[s] for s in sizes])
        return [sizes[int(i)] for i in self.rng.choice(len(sizes), len(self.specs), p=p / p.sum())]

    def _place(self, sizes: list[str]) -> list[tuple[int, int]] | None:
        """Top-left patches of non-overlapping blocks, largest first; None if they do not fit."""
        g = self.config.grid
        free = np.ones((g, g), bool)
        cells: list[tuple[int, int]] = [(0, 0)] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: -SIZES[sizes[i]]):
            k = SIZES[sizes[i]]
            # Occupied patches in every k x k window, from the summed-area table.
            sat = np.zeros((g + 1, g + 1), np.int64)
            sat[1:, 1:] = (~free).cumsum(0).cumsum(1)
            busy = sat[k:, k:] - sat[:-k, k:] - sat[k:, :-k] + sat[:-k, :-k]
            fits = np.argwhere(busy == 0)
            if len(fits) == 0:
                return None
            r, c = (int(v) for v in fits[int(self.rng.integers(len(fits)))])
            free[r : r + k, c : c + k] = False
            cells[i] = (r, c)
        return cells

    def build(
        self, accept: Callable[[list[ShapeObject]], bool] = lambda objs: True
    ) -> list[ShapeObject]:
        """Objects (spec order) in free random blocks, redrawn until `accept` takes them."""
        if self.config.version == 1:
            return self._build_v1()
        p = self.config.patch_size
        for attempt in range(400):
            sizes = self._sizes(attempt)
            cells = self._place(sizes)
            if cells is None:
                continue
            objects = [
                ShapeObject(
                    shape, colour, size, cell, block_box(cell, SIZES[size], p), span=SIZES[size]
                )
                for (shape, colour), size, cell in zip(self.specs, sizes, cells, strict=True)
            ]
            if accept(objects):
                return objects
        raise RuntimeError(f"could not place {self.specs} under the question's constraints")

    def _build_v1(self) -> list[ShapeObject]:
        """v1: objects (spec order) in distinct random cells, of random sizes, centred in
        their cell; the same random draws as the v1 generator, so the same scenes."""
        g, cs = self.config.grid, self.config.cell_size
        cells = self.rng.choice(g * g, size=len(self.specs), replace=False)
        objects = []
        for (shape, colour), cell_id in zip(self.specs, cells, strict=True):
            cell = (int(cell_id) // g, int(cell_id) % g)
            size = self.pick(self.config.size_names)
            objects.append(ShapeObject(shape, colour, size, cell, shape_box(cell, size, cs)))
        return objects


def shape_box(cell: tuple[int, int], size: str, cell_size: int) -> tuple[int, int, int, int]:
    """v1: (x0, y0, x1, y1), end exclusive: the box a shape of this size is drawn in, centred
    in its cell (same parity as the cell)."""
    s = cell_size - 2 * max(1, cell_size // 16) if size == "large" else int(cell_size * 0.625)
    s -= (cell_size - s) % 2
    x0 = cell[1] * cell_size + (cell_size - s) // 2
    y0 = cell[0] * cell_size + (cell_size - s) // 2
    return (x0, y0, x0 + s, y0 + s)


def _apart(a: ShapeObject, b: ShapeObject, axis: int) -> bool:
    """The two blocks do not overlap along `axis` (0: rows, 1: columns)."""
    return a.cell[axis] + a.span <= b.cell[axis] or b.cell[axis] + b.span <= a.cell[axis]


def relation_axis(relation: str) -> int:
    """The axis a relation word compares along (0: rows for above/below, 1: columns)."""
    return 1 if relation in ("left", "right") else 0


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Whether `a` is `relation` ("left", "right", "above", "below") of `b`: its block ends
    before the other's begins along that axis."""
    if relation == "left":
        return a.cell[1] + a.span <= b.cell[1]
    if relation == "right":
        return b.cell[1] + b.span <= a.cell[1]
    if relation == "above":
        return a.cell[0] + a.span <= b.cell[0]
    if relation == "below":
        return b.cell[0] + b.span <= a.cell[0]
    raise ValueError(f"unknown relation {relation!r}")


def _on_midline(obj: ShapeObject, grid: int) -> bool:
    return grid / 2 in obj.centre


def _make_sample(seed: int, split: str, index: int, config: ShapesConfig) -> ShapesSample:
    qtype = _question_type(seed, split, index, config.types)
    rng = _seed(seed, split, 0, index)
    sc = _Scene(rng, config)
    m, g = config.n_objects, config.grid

    def extra(lo: int, hi: int) -> int:
        """Number of distractors in lo..hi."""
        return int(rng.integers(lo, hi + 1)) if hi >= lo else 0

    slots: dict[str, str] = {}
    query: dict[str, str]

    def accept(objs: list[ShapeObject]) -> bool:
        return True

    answer = ""
    if qtype == "colour":
        shape, colour = sc.pick(config.shapes), sc.pick(config.colours)
        sc.add(shape, colour)
        sc.add_random(extra(0, m - 1), lambda s, c: s != shape)
        query, answer, slots = {"shape": shape}, colour, {"shape": shape}
    elif qtype == "shape":
        shape, colour = sc.pick(config.shapes), sc.pick(config.colours)
        sc.add(shape, colour)
        sc.add_random(extra(0, m - 1), lambda s, c: c != colour)
        query, answer, slots = {"colour": colour}, shape, {"colour": colour}
    elif qtype in ("count", "count_shape", "count_colour"):
        by_shape = qtype != "count_colour"
        word = sc.pick(config.shapes if by_shape else config.colours)
        k = int(rng.integers(0, config.n_count + 1))
        for _ in range(k):
            if by_shape:
                sc.add(word, sc.pick(config.colours))
            else:
                sc.add(sc.pick(config.shapes), word)
        key = "shape" if by_shape else "colour"
        sc.add_random(
            extra(1 if k == 0 else 0, m - k),
            lambda s, c: (s if by_shape else c) != word,
        )
        query, answer = {key: word}, NUMBER_WORDS[k]
        slots = {"shapes": plural(word)} if by_shape else {"colour": word}
    elif qtype == "exists":
        shape, colour = sc.pick(config.shapes), sc.pick(config.colours)
        yes = bool(rng.integers(2))
        if yes:
            sc.add(shape, colour)
        elif rng.integers(2):  # hard negatives: same colour or same shape, half the time
            sc.add_random(1, lambda s, c: (s == shape) != (c == colour))
        sc.add_random(
            extra(0 if len(sc.specs) else 1, m - len(sc.specs)),
            lambda s, c: (s, c) != (shape, colour),
        )
        query, answer = {"shape": shape, "colour": colour}, "yes" if yes else "no"
        slots = {"shape": shape, "colour": colour, "a": article(colour)}
    elif qtype == "position":
        shape, colour = sc.pick(config.shapes), sc.pick(config.colours)
        sc.add(shape, colour)
        sc.add_random(extra(0, m - 1), lambda s, c: (s, c) != (shape, colour))
        query, slots = {"shape": shape, "colour": colour}, {"shape": shape, "colour": colour}

        def accept(objs: list[ShapeObject]) -> bool:
            return not _on_midline(objs[0], g)

    elif qtype == "relation":
        relation = sc.pick(RELATIONS)
        yes = bool(rng.integers(2))
        shape_a, shape_b = (str(s) for s in rng.choice(config.shapes, 2, replace=False))
        colour_a, colour_b = sc.pick(config.colours), sc.pick(config.colours)
        sc.add(shape_a, colour_a)
        sc.add(shape_b, colour_b)
        with_colour = bool(rng.integers(2))  # "the red circle" rather than "the circle"
        if with_colour:
            named = {(shape_a, colour_a), (shape_b, colour_b)}
            sc.add_random(extra(0, m - 2), lambda s, c: (s, c) not in named)
            query = {"shape": shape_a, "colour": colour_a}
            query |= {"other_shape": shape_b, "other_colour": colour_b}
            slots = {"A": f"the {colour_a} {shape_a}", "B": f"the {colour_b} {shape_b}"}
        else:
            sc.add_random(extra(0, m - 2), lambda s, c: s not in (shape_a, shape_b))
            query = {"shape": shape_a, "other_shape": shape_b}
            slots = {"A": f"the {shape_a}", "B": f"the {shape_b}"}
        query["relation"] = relation
        slots |= dict(zip(("rel0", "rel1", "rel2"), RELATION_WORDS[relation], strict=True))
        axis = relation_axis(relation)

        def accept(objs: list[ShapeObject]) -> bool:
            a, b = objs[0], objs[1]
            return _apart(a, b, axis) and relation_holds(a, b, relation) == yes

        answer = "yes" if yes else "no"
    else:  # caption
        sc.add_random(extra(1, m), lambda s, c: True)
        query = {}

    placed = sc.build(accept)
    first = placed[0]
    objects = sorted(placed, key=lambda o: o.cell)  # reading order: an index tells nothing
    image = render(objects, config)
    cap = caption(objects)
    target = _targets(objects, qtype, query)
    if qtype == "position":
        answer = (
            cell_position(first.cell, g) if config.version == 1 else position_word(first.centre, g)
        )
    if qtype == "caption":
        question, answer, phrasing, held = "Describe the image.", cap, 0, False
    else:
        question, phrasing, held = _phrase(qtype, slots, rng, config)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return ShapesSample(
        id=f"{split}-{index:06d}",
        split=split,
        index=index,
        image=image,
        png=buf.getvalue(),
        objects=objects,
        question_type=qtype,
        question=question,
        answer=answer,
        query=query,
        target=target,
        caption=cap,
        patch_size=config.patch_size,
        phrasing=phrasing,
        heldout_phrasing=held,
    )


def _phrase(
    qtype: str, slots: dict[str, str], rng: np.random.Generator, config: ShapesConfig
) -> tuple[str, int, bool]:
    """(question text, phrasing index, whether it is held out): a phrasing of the config's
    set, drawn uniformly, with the slots filled; v1 asks the first (canonical) phrasing and
    draws nothing."""
    if config.version == 1:
        return (
            fill(phrasings("count_shape" if qtype == "count" else qtype)[0][0], **slots),
            0,
            False,
        )
    allowed = phrasing_indices(qtype, config.phrasings)
    phrasing = allowed[int(rng.integers(len(allowed)))]
    every, heldout = phrasings(qtype)
    return fill(every[phrasing], **slots), phrasing, phrasing in heldout


@dataclass
class Question:
    """A question about an existing scene (see `ask`)."""

    type: str
    text: str
    answer: str
    query: dict[str, str]
    target: list[int]
    phrasing: int
    heldout_phrasing: bool


def ask(
    objects: list[ShapeObject],
    qtype: str,
    rng: np.random.Generator,
    config: ShapesConfig | None = None,
) -> Question | None:
    """A random question of type `qtype` about a given scene, or None when the scene has
    nothing to ask it about (no object with a unique shape for ``colour``, ...).

    The scene-first counterpart of the samples' question-first generation: it lets several
    questions share one image (the toy's training asks a few per picture). Answers are less
    balanced than the samples' (counts are mostly small), so counts ask about a present
    attribute three times in four, and ``exists`` asks about a present object half the time.
    """
    config = config or ShapesConfig(version=2)
    if config.version == 1:
        raise ValueError("ask: scene-first questions exist in the v2 world only (version=2)")
    objs = objects

    def pick(options: list[Any]) -> Any:
        return options[int(rng.integers(len(options)))] if options else None

    n_shape = {s: sum(o.shape == s for o in objs) for s in config.shapes}
    n_colour = {c: sum(o.colour == c for o in objs) for c in config.colours}
    pairs = {(o.shape, o.colour) for o in objs}
    unique = [o for o in objs if sum((p.shape, p.colour) == (o.shape, o.colour) for p in objs) == 1]
    slots: dict[str, str]
    if qtype == "colour":
        o = pick([o for o in objs if n_shape[o.shape] == 1])
        if o is None:
            return None
        query, answer, slots = {"shape": o.shape}, o.colour, {"shape": o.shape}
    elif qtype == "shape":
        o = pick([o for o in objs if n_colour[o.colour] == 1])
        if o is None:
            return None
        query, answer, slots = {"colour": o.colour}, o.shape, {"colour": o.colour}
    elif qtype in ("count_shape", "count_colour"):
        key = "shape" if qtype == "count_shape" else "colour"
        present = sorted({getattr(o, key) for o in objs})
        every = list(config.shapes if key == "shape" else config.colours)
        word = pick(present) if rng.random() < 0.75 else pick(every)
        k = sum(getattr(o, key) == word for o in objs)
        if k > config.n_count:
            return None
        query, answer = {key: word}, NUMBER_WORDS[k]
        slots = {"shapes": plural(word)} if key == "shape" else {"colour": word}
    elif qtype == "exists":
        if rng.integers(2):
            o = pick(objs)
            shape, colour = o.shape, o.colour
        else:
            absent = [(s, c) for s in config.shapes for c in config.colours if (s, c) not in pairs]
            hard = [(s, c) for s, c in absent if n_shape[s] or n_colour[c]]
            chosen = pick(hard if hard and rng.integers(2) else absent)
            if chosen is None:
                return None
            shape, colour = chosen
        query = {"shape": shape, "colour": colour}
        answer = "yes" if (shape, colour) in pairs else "no"
        slots = {"shape": shape, "colour": colour, "a": article(colour)}
    elif qtype == "position":
        o = pick([o for o in unique if not _on_midline(o, config.grid)])
        if o is None:
            return None
        query = {"shape": o.shape, "colour": o.colour}
        answer, slots = position_word(o.centre, config.grid), dict(query)
    elif qtype == "relation":
        with_colour = bool(rng.integers(2))
        named = unique if with_colour else [o for o in objs if n_shape[o.shape] == 1]
        options = [
            (a, b, axis)
            for a in named
            for b in named
            if a.shape != b.shape
            for axis in (0, 1)
            if _apart(a, b, axis)
        ]
        chosen = pick(options)
        if chosen is None:
            return None
        a, b, axis = chosen
        relation = pick(["above", "below"] if axis == 0 else ["left", "right"])
        query = {"shape": a.shape, "other_shape": b.shape}
        if with_colour:
            query |= {"colour": a.colour, "other_colour": b.colour}
            slots = {"A": f"the {a.colour} {a.shape}", "B": f"the {b.colour} {b.shape}"}
        else:
            slots = {"A": f"the {a.shape}", "B": f"the {b.shape}"}
        query["relation"] = relation
        slots |= dict(zip(("rel0", "rel1", "rel2"), RELATION_WORDS[relation], strict=True))
        answer = "yes" if relation_holds(a, b, relation) else "no"
    else:
        raise ValueError(f"ask: unknown question type {qtype!r}")
    text, phrasing, held = _phrase(qtype, slots, rng, config)
    return Question(qtype, text, answer, query, _targets(objs, qtype, query), phrasing, held)


def _matching(objects: Sequence[ShapeObject], query: dict[str, str], prefix: str = "") -> list[int]:
    """Indices of the objects with every shape and colour the query names under `prefix`
    ("": the first object it names; "other_": a relation's second)."""
    want = {k[len(prefix) :]: v for k, v in query.items() if k.startswith(prefix)}
    want = {k: v for k, v in want.items() if k in ("shape", "colour")}
    return [i for i, o in enumerate(objects) if all(getattr(o, k) == v for k, v in want.items())]


def _targets(objects: list[ShapeObject], qtype: str, query: dict[str, str]) -> list[int]:
    """Indices of the objects a question is about: those matching every attribute it names;
    for a relation, its two objects."""
    found = _matching(objects, query)
    if qtype != "relation":
        return found
    return sorted(found + _matching(objects, query, "other_"))


def relation_objects(
    objects: Sequence[ShapeObject], query: dict[str, str]
) -> tuple[ShapeObject, ShapeObject]:
    """The first and the second object a relation question's `query` names, in that order
    (each unique in its scene)."""
    found = [_matching(objects, query, prefix) for prefix in ("", "other_")]
    if any(len(f) != 1 for f in found):
        raise ValueError(f"relation {query}: its two objects are not each unique in the scene")
    return objects[found[0][0]], objects[found[1][0]]


def iter_samples(
    n: int, seed: int = 0, split: str = "train", config: ShapesConfig | None = None, start: int = 0
) -> Iterator[ShapesSample]:
    """Samples start .. start+n-1 of a split, one at a time (constant memory)."""
    config = config or ShapesConfig()
    for i in range(start, start + n):
        yield _make_sample(seed, split, i, config)


def generate(
    n: int, seed: int = 0, split: str = "train", config: ShapesConfig | None = None, start: int = 0
) -> list[ShapesSample]:
    """n samples of a split; deterministic in (seed, split, index)."""
    return list(iter_samples(n, seed, split, config, start))


def example_with_one(
    shape: str = "circle", seed: int = 1, split: str = "attribution", n_scan: int = 400
) -> ShapesSample:
    """The first sample of a split whose scene holds exactly one object of `shape` (the demo's
    attribution image, and the one `vlmscope zoo shapes-image` writes)."""
    for s in iter_samples(n_scan, seed=seed, split=split):
        if sum(o.shape == shape for o in s.objects) == 1:
            return s
    raise ValueError(f"no scene with exactly one {shape} among {n_scan} samples of {split!r}")


# --------------------------------------------------------------------------------------------
# Writing


def _arrow_schema() -> Any:
    import pyarrow as pa

    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    return pa.schema(
        [("id", pa.string()), ("messages", pa.list_(message)), ("images", pa.list_(pa.binary()))]
    )


def write_dataset(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    split: str = "train",
    config: ShapesConfig | None = None,
    row_group_size: int = 256,
) -> Path:
    """Write a split (Parquet in the chat schema + labels + info, see module doc); returns the
    Parquet path. Rows are generated and written one row group at a time; files appear
    atomically (written under a temporary name, then renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = config or ShapesConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{split}.{k}" for k in ("parquet", "labels.jsonl", "info.json")}
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    schema = _arrow_schema()
    with pq.ParquetWriter(tmp["parquet"], schema) as writer, open(tmp["labels.jsonl"], "w") as lf:
        for start in range(0, n, row_group_size):
            samples = generate(min(row_group_size, n - start), seed, split, config, start)
            table = pa.Table.from_pylist(
                [{"id": s.id, "messages": s.messages(), "images": [s.png]} for s in samples],
                schema=schema,
            )
            writer.write_table(table, row_group_size=row_group_size)
            for s in samples:
                lf.write(json.dumps(s.label(), sort_keys=True) + "\n")
    info = {
        "generator": "vlmscope.data.shapes",
        "version": config.version,
        "split": split,
        "n": n,
        "seed": seed,
        "config": asdict(config),
        "colours_rgb": {c: list(COLOURS[c]) for c in config.colours},
        "answer_vocabulary": answer_vocabulary(config),
        "files": {k: p.name for k, p in paths.items() if k != "info.json"},
    }
    tmp["info.json"].write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    for k, p in paths.items():
        os.replace(tmp[k], p)
    return paths["parquet"]


def load_labels(out_dir: str | os.PathLike[str], split: str = "train") -> list[dict[str, Any]]:
    """The label rows of a written split, in row order (join to Records on ``id``)."""
    with open(Path(out_dir) / f"{split}.labels.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
