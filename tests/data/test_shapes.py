"""Shapes world: determinism, labels checked against decoded pixels, answers against the scene,
and the written dataset read back through open_dataset; v1 (the shipped toy's world, the
default) and v2."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlmscope.data import open_dataset
from vlmscope.data.shapes import (
    COLOURS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    RELATIONS,
    SHAPES,
    V1_QUESTION_TYPES,
    ShapesConfig,
    ShapesSample,
    answer_vocabulary,
    ask,
    generate,
    load_labels,
    object_patches,
    phrasing_indices,
    phrasings,
    write_dataset,
)

CONFIG = ShapesConfig(version=1)
V2 = ShapesConfig(version=2)
V1_DIGEST = "8b247efbb22527f19e10550450bf85389e0403c323f7317775fd89f070f4cd9e"


@pytest.fixture(scope="module")
def samples() -> list[ShapesSample]:
    return generate(250, seed=7, config=CONFIG)


@pytest.fixture(scope="module")
def samples_v2() -> list[ShapesSample]:
    return generate(280, seed=7, config=V2)


def test_default_world_is_v2_as_shipped_and_v1_has_not_drifted() -> None:
    """The shipped toy is trained on v2, the default world; v1 (the first toy's) stays as it
    was, so its figures can be reproduced. The digest was taken from the v1 generator before
    v2 existed (commit 58a5b63)."""
    assert ShapesConfig() == V2 and ShapesConfig().version == 2
    digest = hashlib.sha256()
    for s in generate(20, seed=0, split="heldout", config=CONFIG):
        digest.update(s.png + s.question.encode() + s.answer.encode())
    assert digest.hexdigest() == V1_DIGEST


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


@pytest.mark.parametrize("version", [1, 2])
def test_labels_agree_with_pixels(
    version: int, samples: list[ShapesSample], samples_v2: list[ShapesSample]
) -> None:
    config = CONFIG if version == 1 else V2
    bg = config.background
    unit = config.cell_size if version == 1 else config.patch_size  # px per grid place
    for s in samples if version == 1 else samples_v2[:140]:
        pixels = decode(s)
        np.testing.assert_array_equal(pixels, np.asarray(s.image))
        outside = np.ones(pixels.shape[:2], bool)
        for obj in s.objects:
            rgb = COLOURS[obj.colour]
            x0, y0, x1, y1 = obj.bbox
            outside[y0:y1, x0:x1] = False
            box = pixels[y0:y1, x0:x1].reshape(-1, 3)
            assert {tuple(v) for v in box} <= {rgb, bg}, (s.id, obj)  # exact, aliased colours
            lo, hi = unit * np.array(obj.cell), unit * (np.array(obj.cell) + obj.span)
            assert lo[0] <= y0 < y1 <= hi[0] and lo[1] <= x0 < x1 <= hi[1], (s.id, obj)
            chosen, frac = colour_patches(pixels, obj.bbox, rgb, config.patch_size)
            assert set(obj.patches) == chosen, (s.id, obj)
            assert obj.coverage == [round(float(frac[p]), 4) for p in obj.patches]
        assert (pixels[outside] == bg).all()
        assert len({o.cell for o in s.objects}) == len(s.objects) <= config.n_objects
        if version == 2:  # blocks never overlap, so no patch is labelled twice
            patches = [p for o in s.objects for p in o.patches]
            assert len(set(patches)) == len(patches)
    # another patch size (not dividing the image) re-renders the same masks
    for s in (samples if version == 1 else samples_v2)[:20]:
        pixels = decode(s)
        for obj in s.objects:
            chosen, _ = colour_patches(pixels, obj.bbox, COLOURS[obj.colour], 14)
            assert set(object_patches(obj, config, patch_size=14)) == chosen


def test_answers_agree_with_scene(samples: list[ShapesSample]) -> None:
    vocab = set(answer_vocabulary())
    assert Counter(s.question_type for s in samples) == {t: 50 for t in V1_QUESTION_TYPES}
    answers: dict[str, set[str]] = {t: set() for t in V1_QUESTION_TYPES}
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
        version=1,
        image_size=48,
        cell_size=16,
        patch_size=16,
        question_types=(*V1_QUESTION_TYPES, "caption"),
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
        ShapesConfig(version=1, max_count=5)
    with pytest.raises(ValueError, match="version"):
        ShapesConfig(version=3)
    with pytest.raises(ValueError, match="question types"):
        ShapesConfig(version=1, question_types=("relation",))  # a v2 type asked of v1
    with pytest.raises(ValueError, match="one wording"):
        ShapesConfig(version=1, phrasings="heldout")
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(version=2, max_objects=17)  # more 2x2 blocks than an 8x8 grid holds
    with pytest.raises(ValueError, match="too small"):
        ShapesConfig(version=2, image_size=48)  # 6x6 patches: no room for two 4x4 blocks


# --------------------------------------------------------------------------------------------
# v2: relations, counting by colour and shape, the grammar of paraphrases


def check_answer(s: ShapesSample | Any, objs: list[Any], qtype: str, half: float) -> None:
    """The answer recomputed from the objects' pixel boxes (not from their grid cells)."""
    q = s.query
    if qtype in ("colour", "shape"):
        (i,) = s.target
        assert s.answer == getattr(objs[i], qtype)
    elif qtype in ("count_shape", "count_colour"):
        key = qtype.split("_")[1]
        assert s.answer == NUMBER_WORDS[sum(getattr(o, key) == q[key] for o in objs)]
    elif qtype == "exists":
        found = any((o.shape, o.colour) == (q["shape"], q["colour"]) for o in objs)
        assert s.answer == ("yes" if found else "no")
    elif qtype == "position":
        (i,) = s.target
        x0, y0, x1, y1 = objs[i].bbox
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        assert cy != half and cx != half
        want = ("top" if cy < half else "bottom") + " " + ("left" if cx < half else "right")
        assert s.answer == want
    elif qtype == "relation":
        a, b = (
            [o for o in objs if all(getattr(o, k) == q[k] for k in ("shape", "colour") if k in q)],
            [o for o in objs if all(getattr(o, k) == q["other_" + k] for k in ("shape", "colour")
                                   if "other_" + k in q)],
        )  # fmt: skip
        assert len(a) == len(b) == 1, s
        (a0, ay0, a1, ay1), (b0, by0, b1, by1) = a[0].bbox, b[0].bbox
        holds = {"left": a1 <= b0, "right": b1 <= a0, "above": ay1 <= by0, "below": by1 <= ay0}
        horizontal = q["relation"] in ("left", "right")
        # the two objects are apart along the asked axis, so the answer is never borderline
        assert (
            (holds["left"] or holds["right"]) if horizontal else (holds["above"] or holds["below"])
        )
        assert s.answer == ("yes" if holds[q["relation"]] else "no")
        assert sorted(s.target) == sorted(objs.index(o) for o in (a[0], b[0]))


def test_v2_answers_agree_with_scene(samples_v2: list[ShapesSample]) -> None:
    vocab = set(answer_vocabulary(V2))
    assert Counter(s.question_type for s in samples_v2) == {t: 40 for t in QUESTION_TYPES}
    answers: dict[str, set[str]] = {t: set() for t in QUESTION_TYPES}
    for s in samples_v2:
        assert s.answer in vocab and not s.heldout_phrasing
        answers[s.question_type].add(s.answer)
        for word in s.query.values():
            if word not in RELATIONS:
                assert word in s.question, (word, s.question)
        check_answer(s, s.objects, s.question_type, V2.image_size / 2)
    assert answers["count_shape"] == answers["count_colour"] == set(NUMBER_WORDS[:6])
    assert answers["relation"] == answers["exists"] == {"yes", "no"}
    assert len(answers["position"]) == 4 and answers["shape"] == set(SHAPES)
    assert Counter(len(s.objects) for s in samples_v2).keys() == {1, 2, 3, 4, 5}
    assert {o.size for s in samples_v2 for o in s.objects} == {"small", "medium", "large"}


def test_ask_answers_agree_with_scene(samples_v2: list[ShapesSample]) -> None:
    rng = np.random.default_rng(0)
    asked = Counter()
    for s in samples_v2[:120]:
        for qtype in QUESTION_TYPES:
            q = ask(s.objects, qtype, rng, V2)
            if q is not None:
                asked[qtype] += 1
                check_answer(q, s.objects, qtype, V2.image_size / 2)
    assert all(asked[t] > 30 for t in QUESTION_TYPES), asked


def test_heldout_phrasings_are_new_combinations_of_known_words() -> None:
    import re

    for qtype in QUESTION_TYPES:
        every, held = phrasings(qtype)
        train = phrasing_indices(qtype, "train")
        assert 0 in train and not held & set(train) and len(held) + len(train) == len(every)
        assert 0.2 <= len(held) / len(every) <= 0.25
        known = set().union(*(re.findall(r"[A-Za-z]+|\{\w+\}", every[i]) for i in train))
        for i in held:
            assert set(re.findall(r"[A-Za-z]+|\{\w+\}", every[i])) <= known
    out = generate(70, seed=2, split="heldout", config=ShapesConfig(version=2, phrasings="heldout"))
    assert all(s.heldout_phrasing and s.phrasing in phrasings(s.question_type)[1] for s in out)
    same = generate(70, seed=2, split="heldout", config=V2)  # same scenes, training wordings
    assert [s.png for s in same] == [s.png for s in out]
    assert all(a.answer == b.answer for a, b in zip(same, out, strict=True))
