"""Shapes world: determinism, labels checked against decoded pixels, answers against the scene,
and the written dataset read back through open_dataset."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmscope.data import open_dataset
from vlmscope.data.shapes import (
    ALL_QUESTION_TYPES,
    COLOURS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    ShapesConfig,
    ShapesSample,
    answer_vocabulary,
    generate,
    load_labels,
    object_patches,
    write_dataset,
)

CONFIG = ShapesConfig()


@pytest.fixture(scope="module")
def samples() -> list[ShapesSample]:
    return generate(250, seed=7)


def decode(sample: ShapesSample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample.png)).convert("RGB"))


def colour_patches(
    pixels: np.ndarray, bbox: list[int] | tuple[int, ...], rgb: tuple[int, int, int], p: int
) -> tuple[set[tuple[int, int]], np.ndarray]:
    """Patches whose pixels are at least min_coverage this object's colour, read from the image
    (inside the object's box: objects never share a cell, but two may share a colour)."""
    x0, y0, x1, y1 = bbox
    mine = np.zeros(pixels.shape[:2], bool)
    mine[y0:y1, x0:x1] = (pixels[y0:y1, x0:x1] == rgb).all(-1)
    h, w = mine.shape
    frac = np.array(
        [
            [mine[r * p : (r + 1) * p, c * p : (c + 1) * p].mean() for c in range(-(-w // p))]
            for r in range(-(-h // p))
        ]
    )
    chosen = {(int(r), int(c)) for r, c in np.argwhere(frac >= CONFIG.min_coverage)}
    if not chosen:  # the documented fallback: a tiny shape keeps its best patch
        chosen = {tuple(int(v) for v in np.unravel_index(frac.argmax(), frac.shape))}
    return chosen, frac


def test_determinism_prefixes_and_splits(tmp_path: Path) -> None:
    a, b = generate(12, seed=3), generate(12, seed=3)
    assert [s.png for s in a] == [s.png for s in b]
    assert [s.label() for s in a] == [s.label() for s in b]
    assert [s.png for s in generate(5, seed=3)] == [s.png for s in a[:5]]
    assert [s.png for s in generate(4, seed=3, start=8)] == [s.png for s in a[8:]]
    assert [s.png for s in generate(12, seed=4)] != [s.png for s in a]
    test = generate(12, seed=3, split="test")
    assert [s.png for s in test] != [s.png for s in a] and test[0].id == "test-000000"
    for d in ("x", "y"):
        write_dataset(tmp_path / d, 40, seed=3, row_group_size=16)
    for name in ("train.parquet", "train.labels.jsonl", "train.info.json"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


def test_labels_agree_with_pixels(samples: list[ShapesSample]) -> None:
    bg = CONFIG.background
    for s in samples:
        pixels = decode(s)
        np.testing.assert_array_equal(pixels, np.asarray(s.image))
        outside = np.ones(pixels.shape[:2], bool)
        for obj in s.objects:
            rgb = COLOURS[obj.colour]
            x0, y0, x1, y1 = obj.bbox
            outside[y0:y1, x0:x1] = False
            box = pixels[y0:y1, x0:x1].reshape(-1, 3)
            assert {tuple(v) for v in box} <= {rgb, bg}, (s.id, obj)  # exact, aliased colours
            r, c = obj.cell
            cs = CONFIG.cell_size
            assert r * cs <= y0 < y1 <= (r + 1) * cs and c * cs <= x0 < x1 <= (c + 1) * cs
            chosen, frac = colour_patches(pixels, obj.bbox, rgb, CONFIG.patch_size)
            assert set(obj.patches) == chosen, (s.id, obj)
            assert obj.coverage == [round(float(frac[p]), 4) for p in obj.patches]
        assert (pixels[outside] == bg).all()
        assert len({o.cell for o in s.objects}) == len(s.objects) <= CONFIG.max_objects
    # another patch size (not dividing the image) re-renders the same masks
    for s in samples[:20]:
        pixels = decode(s)
        for obj in s.objects:
            chosen, _ = colour_patches(pixels, obj.bbox, COLOURS[obj.colour], 14)
            assert set(object_patches(obj, CONFIG, patch_size=14)) == chosen


def test_answers_agree_with_scene(samples: list[ShapesSample]) -> None:
    vocab = set(answer_vocabulary())
    assert Counter(s.question_type for s in samples) == {t: 50 for t in QUESTION_TYPES}
    answers: dict[str, set[str]] = {t: set() for t in QUESTION_TYPES}
    half = CONFIG.grid / 2
    for s in samples:
        objs = s.objects
        assert s.answer in vocab
        answers[s.question_type].add(s.answer)
        for word in s.query.values():
            assert word in s.question
        matching = [
            i for i, o in enumerate(objs) if all(getattr(o, k) == v for k, v in s.query.items())
        ]
        assert s.target == matching
        if s.question_type == "colour":
            assert len(matching) == 1 and s.answer == objs[matching[0]].colour
        elif s.question_type == "shape":
            assert len(matching) == 1 and s.answer == objs[matching[0]].shape
        elif s.question_type == "count":
            assert s.answer == NUMBER_WORDS[sum(o.shape == s.query["shape"] for o in objs)]
        elif s.question_type == "exists":
            assert s.answer == ("yes" if matching else "no")
        elif s.question_type == "position":
            (i,) = matching
            r, c = objs[i].cell
            want = ("top" if r < half else "bottom") + " " + ("left" if c < half else "right")
            assert s.answer == want
        assert s.caption.endswith(".") and all(o.colour in s.caption for o in objs)
        assert s.messages()[0]["content"][1]["text"] == s.question
    # every answer of each kind occurs: balanced enough for a tiny model to learn all of them
    assert answers["colour"] == set(COLOURS) and answers["exists"] == {"yes", "no"}
    assert answers["count"] == {"zero", "one", "two", "three"}
    assert len(answers["position"]) == 4 and len(answers["shape"]) == 5


def test_written_dataset_reads_back(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, 30, seed=1, row_group_size=8)
    write_dataset(tmp_path, 10, seed=1, split="test")
    assert path == tmp_path / "train.parquet"
    samples = generate(30, seed=1)
    ds = open_dataset(tmp_path, "chat", split="train")
    assert len(ds) == 30
    records = list(ds)
    assert ds.stats.bad == 0 and len(records) == 30
    labels = load_labels(tmp_path)
    for rec, s, lab in zip(records, samples, labels, strict=True):
        assert rec.source_id == s.id == lab["id"]
        assert rec.messages == s.messages()
        assert len(rec.images) == 1
        np.testing.assert_array_equal(np.asarray(rec.images[0]), np.asarray(s.image))
        assert lab == s.label()
    test = list(open_dataset(tmp_path, split="test"))
    assert [r.source_id for r in test] == [f"test-{i:06d}" for i in range(10)]
    assert [r.position for r in ds.skip(25)] == [25, 26, 27, 28, 29]


def test_config_and_caption_questions() -> None:
    cfg = ShapesConfig(
        image_size=48, cell_size=16, patch_size=16, question_types=ALL_QUESTION_TYPES
    )
    out = generate(12, seed=0, config=cfg)
    caps = [s for s in out if s.question_type == "caption"]
    assert len(caps) == 2 and all(s.answer == s.caption for s in caps)
    assert all(s.image.size == (48, 48) for s in out)
    vocab = answer_vocabulary(cfg)  # a 3x3 grid has a middle row and column
    assert {"center", "top", "left", "top left"} <= set(vocab)
    assert all(s.answer in vocab for s in out if s.question_type != "caption")
    with pytest.raises(ValueError):
        ShapesConfig(image_size=60)
    with pytest.raises(ValueError):
        ShapesConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError):
        ShapesConfig(max_count=5)
