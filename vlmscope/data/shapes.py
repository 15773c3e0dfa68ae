"""The shapes world: seeded synthetic images of coloured shapes on a grid, with Q&A and labels.

Small enough that a tiny VLM learns it in minutes, and labelled per image patch, so a circuit
or attribution result can be checked against ground truth ("does attribution mass fall on the
patches of the triangle the question asks about?").

An image is a grid of cells (64x64 px, 16 px cells -> 4x4 by default); each object fills the
middle of one cell, objects never share a cell, shapes are drawn without anti-aliasing in
exact RGB colours, so every pixel is either background or one object's colour. Each sample has
one question of a type from ``QUESTION_TYPES`` (balanced: every block of ``len(types)``
consecutive samples holds each type once) and a one- or two-word answer from a small
vocabulary (`answer_vocabulary`), plus a caption.

`write_dataset(out_dir, n, seed, split)` writes, in ``out_dir``:

- ``{split}.parquet``: columns ``id`` (str), ``messages`` (chat format: the user turn is an
  image part then the question, the assistant turn the answer), ``images`` (list of PNG bytes,
  one per row) -- the chat schema `open_dataset(out_dir, split=split)` reads;
- ``{split}.labels.jsonl``: one JSON object per row, same order and ``id``: the objects
  ``{shape, colour, size, cell: [r, c], bbox: [x0, y0, x1, y1] (exclusive end), patches:
  [[r, c], ...], coverage: [...]}``, ``patch_size``, ``question_type``, ``question``,
  ``answer``, ``query`` (the attributes the question names), ``target`` (indices of the objects
  the question is about) and ``caption``;
- ``{split}.info.json``: the generator config, seed, row count and answer vocabulary.

Determinism: sample i of a split depends only on (seed, split, i), so the same arguments give
the same bytes, any prefix of a longer run equals a shorter run, and splits draw from disjoint
seed streams (a scene may still repeat across splits by chance: the world is small).
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 0),
    "purple": (150, 40, 200),
    "orange": (250, 130, 10),
}
SIZES: tuple[str, ...] = ("small", "large")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "exists", "position")
ALL_QUESTION_TYPES: tuple[str, ...] = (*QUESTION_TYPES, "caption")
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


@dataclass(frozen=True)
class ShapesConfig:
    """How the world looks; defaults give 64x64 images, a 4x4 grid and 8 px label patches."""

    image_size: int = 64
    cell_size: int = 16
    patch_size: int = 8
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    max_objects: int = 4
    max_count: int = 3
    min_coverage: float = 0.2
    """A patch is labelled with an object when at least this fraction of it is the object."""
    question_types: tuple[str, ...] = QUESTION_TYPES
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.image_size % self.cell_size or self.cell_size < 6:
            raise ValueError("image_size must be a multiple of cell_size, and cell_size >= 6")
        if self.patch_size < 1:
            raise ValueError("patch_size must be >= 1")
        if unknown := set(self.shapes) - set(SHAPES):
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {SHAPES}")
        if unknown := set(self.colours) - set(COLOURS):
            raise ValueError(f"unknown colours {sorted(unknown)}; known: {list(COLOURS)}")
        if unknown := set(self.question_types) - set(ALL_QUESTION_TYPES):
            raise ValueError(f"unknown question types {sorted(unknown)}")
        if len(self.shapes) < 2 or len(self.colours) < 2 or not self.question_types:
            raise ValueError("need at least 2 shapes, 2 colours and 1 question type")
        if not 1 <= self.max_objects <= self.grid**2:
            raise ValueError(f"max_objects must be in 1..{self.grid**2}")
        if not 1 <= self.max_count <= min(self.max_objects, len(NUMBER_WORDS) - 1):
            raise ValueError("max_count must be in 1..max_objects (and <= 10)")
        if tuple(self.background) in {COLOURS[c] for c in self.colours}:
            raise ValueError("background must differ from every shape colour")

    @property
    def grid(self) -> int:
        """Cells per side."""
        return self.image_size // self.cell_size


@dataclass
class ShapeObject:
    """One drawn shape and the label patches it covers (for the sample's patch size)."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    bbox: tuple[int, int, int, int]
    patches: list[tuple[int, int]] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "cell": list(self.cell),
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


def position_word(cell: tuple[int, int], grid: int) -> str:
    """Where a cell is: "top left", "bottom right", ... ("top"/"left"/"center" on odd grids)."""
    r, c = cell
    mid = grid // 2
    vert = "middle" if grid % 2 and r == mid else ("top" if r < mid else "bottom")
    horiz = "center" if grid % 2 and c == mid else ("left" if c < mid else "right")
    if vert == "middle":
        return horiz
    if horiz == "center":
        return vert
    return f"{vert} {horiz}"


def _size_px(size: str, cell: int) -> int:
    """Side of the box a shape is drawn in; same parity as the cell, so it centres exactly."""
    if size == "large":
        return cell - 2 * max(1, cell // 16)
    s = int(cell * 0.625)
    return s - (cell - s) % 2


def shape_box(cell: tuple[int, int], size: str, cell_size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end exclusive: the box a shape of this size is drawn in, in its cell."""
    s = _size_px(size, cell_size)
    x0 = cell[1] * cell_size + (cell_size - s) // 2
    y0 = cell[0] * cell_size + (cell_size - s) // 2
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
    rows, cols = -(-h // patch_size), -(-w // patch_size)
    p = patch_size
    out = np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            out[r, c] = mask[r * p : (r + 1) * p, c * p : (c + 1) * p].mean()
    return out


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
    g = config.grid
    positions = sorted({position_word((r, c), g) for r in range(g) for c in range(g)})
    return [
        *config.colours,
        *config.shapes,
        *NUMBER_WORDS[: config.max_count + 1],
        "yes",
        "no",
        *positions,
    ]


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
    """Objects being placed: specs (shape, colour) get distinct random cells and sizes."""

    def __init__(self, rng: np.random.Generator, config: ShapesConfig) -> None:
        self.rng, self.config = rng, config
        self.specs: list[tuple[str, str]] = []

    def pick(self, options: tuple[str, ...] | list[str]) -> str:
        return str(options[int(self.rng.integers(len(options)))])

    def add(self, shape: str, colour: str) -> int:
        self.specs.append((shape, colour))
        return len(self.specs) - 1

    def add_random(self, n: int, allowed: Any) -> None:
        """n objects drawn uniformly among the (shape, colour) pairs ``allowed`` accepts."""
        pairs = [(s, c) for s in self.config.shapes for c in self.config.colours if allowed(s, c)]
        for _ in range(n):
            self.add(*pairs[int(self.rng.integers(len(pairs)))])

    def build(self) -> list[ShapeObject]:
        """Objects in distinct random cells, listed in reading order (so an index says nothing
        about which object the question is about)."""
        g, cs = self.config.grid, self.config.cell_size
        cells = self.rng.choice(g * g, size=len(self.specs), replace=False)
        objects = []
        for (shape, colour), cell_id in zip(self.specs, cells, strict=True):
            cell = (int(cell_id) // g, int(cell_id) % g)
            size = self.pick(SIZES)
            objects.append(ShapeObject(shape, colour, size, cell, shape_box(cell, size, cs)))
        return sorted(objects, key=lambda o: o.cell)


def _make_sample(seed: int, split: str, index: int, config: ShapesConfig) -> ShapesSample:
    qtype = _question_type(seed, split, index, config.question_types)
    rng = _seed(seed, split, 0, index)
    sc = _Scene(rng, config)
    m = config.max_objects

    def extra(lo: int, hi: int) -> int:
        """Number of distractors in lo..hi."""
        return int(rng.integers(lo, hi + 1)) if hi >= lo else 0

    query: dict[str, str]
    if qtype == "colour":
        shape, colour = sc.pick(config.shapes), sc.pick(config.colours)
        sc.add(shape, colour)
        sc.add_random(extra(0, m - 1), lambda s, c: s != shape)
        query, question, answer = {"shape": shape}, f"What colour is the {shape}?", colour
    elif qtype == "shape":
        shape, colour = sc.pick(config.shapes), sc.pick(config.colours)
        sc.add(shape, colour)
        sc.add_random(extra(0, m - 1), lambda s, c: c != colour)
        query, question, answer = {"colour": colour}, f"What shape is the {colour} object?", shape
    elif qtype == "count":
        shape = sc.pick(config.shapes)
        k = int(rng.integers(0, config.max_count + 1))
        for _ in range(k):
            sc.add(shape, sc.pick(config.colours))
        sc.add_random(extra(1 if k == 0 else 0, m - k), lambda s, c: s != shape)
        query, answer = {"shape": shape}, NUMBER_WORDS[k]
        question = f"How many {plural(shape)} are there?"
    elif qtype == "exists":
        shape, colour = sc.pick(config.shapes), sc.pick(config.colours)
        yes = bool(rng.integers(2))
        if yes:
            sc.add(shape, colour)
        else:  # hard negatives: same colour or same shape, half the time
            if rng.integers(2):
                sc.add_random(1, lambda s, c: (s == shape) != (c == colour))
        sc.add_random(
            extra(0 if len(sc.specs) else 1, m - len(sc.specs)),
            lambda s, c: (s, c) != (shape, colour),
        )
        query, answer = {"shape": shape, "colour": colour}, "yes" if yes else "no"
        question = f"Is there {article(colour)} {colour} {shape}?"
    elif qtype == "position":
        shape, colour = sc.pick(config.shapes), sc.pick(config.colours)
        sc.add(shape, colour)
        sc.add_random(extra(0, m - 1), lambda s, c: (s, c) != (shape, colour))
        query, question = {"shape": shape, "colour": colour}, f"Where is the {colour} {shape}?"
        answer = ""  # known once the scene has cells
    else:  # caption
        sc.add_random(extra(1, m), lambda s, c: True)
        query, question = {}, "Describe the image."
        answer = ""

    objects = sc.build()
    image = render(objects, config)
    cap = caption(objects)
    # The objects the question is about: those matching every attribute it names.
    target = [i for i, o in enumerate(objects) if all(getattr(o, k) == v for k, v in query.items())]
    if qtype == "position":
        answer = position_word(objects[target[0]].cell, config.grid)
    elif qtype == "caption":
        answer = cap
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
    )


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
        "version": 1,
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
