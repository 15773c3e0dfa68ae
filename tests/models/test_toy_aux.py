"""The toy's per-patch auxiliary targets, checked against the shapes world's own per-patch labels
and against the image's pixels; the projector tap against `get_image_features`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from vlmscope.data.shapes import COLOURS, POSITIONS, ShapeObject, ShapesConfig, generate
from vlmscope.models.toy.aux import IGNORE, PatchHead, ProjectorTap, collate_labels, patch_labels
from vlmscope.models.toy.train import build_toy, sample_stream

V2 = ShapesConfig(version=2)


def test_patch_labels_agree_with_the_worlds_labels_and_pixels() -> None:
    for s in generate(40, seed=3, split="aux", config=V2):
        lab = patch_labels(s.objects, V2)
        g, p = V2.grid, V2.patch_size
        pixels = np.asarray(s.image)
        shapes_of = Counter(o.shape for o in s.objects)
        colours_of = Counter(o.colour for o in s.objects)
        labelled = set()
        for o in s.objects:
            for r, c in o.patches:  # the world's label patches (coverage >= 20%)
                i = r * g + c
                labelled.add(i)
                assert lab["shape"][i] == 1 + V2.shapes.index(o.shape)
                assert lab["colour"][i] == 1 + V2.colours.index(o.colour)
                assert lab["count_shape"][i] == shapes_of[o.shape]
                assert lab["count_colour"][i] == colours_of[o.colour]
                # the object's colour really is drawn in that patch
                cell = pixels[r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1, 3)
                assert (cell == COLOURS[o.colour]).all(-1).any()
                centre = lab["centre"][i] * (g / 2) + g / 2
                np.testing.assert_allclose(centre, o.centre)
                quadrant = lab["quadrant"][i]
                assert quadrant == IGNORE or POSITIONS[quadrant] == _quadrant(o.centre, g)
        # a patch without any object pixel is background in every task
        for i in range(g * g):
            r, c = divmod(i, g)
            cell = pixels[r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1, 3)
            if (cell == 255).all() and i not in labelled:
                inside = any(
                    o.cell[0] <= r < o.cell[0] + o.span and o.cell[1] <= c < o.cell[1] + o.span
                    for o in s.objects
                )
                if not inside:
                    assert lab["shape"][i] == 0 and lab["colour"][i] == 0
                    assert lab["count_shape"][i] == IGNORE and np.isnan(lab["centre"][i]).all()


def _quadrant(centre: tuple[float, float], g: int) -> str:
    r, c = centre
    return ("top " if r < g / 2 else "bottom ") + ("left" if c < g / 2 else "right")


def test_tap_reads_the_image_tokens_and_the_head_learns_them() -> None:
    model, processor = build_toy(seed=0)
    samples = generate(8, seed=4, split="aux", config=V2)
    pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")
    tap = ProjectorTap(model)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    tap.remove()
    assert tap.output is not None and tap.output.shape == (8, V2.grid**2, 128)
    torch.testing.assert_close(torch.stack(list(feats)), tap.output)
    # a linear head fitted on frozen features drives its loss down (the labels are learnable)
    labels = collate_labels([patch_labels(s.objects, V2) for s in samples])
    head = PatchHead(128, V2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    x = tap.output.detach()
    losses = []
    for _ in range(30):
        loss, _ = head.loss(x, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_question_word_labels_name_the_questions_objects() -> None:
    """Each target sits on the word that names an object (or a counted attribute) inside its
    own question, after the image; its labels are those of the object the world says the
    question is about (`Question.target`), or the count the question's answer states."""
    from vlmscope.data.shapes import NUMBER_WORDS, QUESTION_TYPES
    from vlmscope.models.toy.train import Stage, TrainBatches

    _, processor = build_toy(seed=0)
    tok = processor.tokenizer
    stages = (Stage(0.0, 5, QUESTION_TYPES),)
    # four turns per picture, so the labels of later turns' words are checked too
    data = TrainBatches(processor, 0, 2, 6, stages, questions=4, word_labels=True)
    seen = Counter()
    for step, batch in enumerate(data):
        items = list(sample_stream(processor, 0, 2, 6, stages, questions=4))
        items = items[step * 6 : (step + 1) * 6]
        assert batch.word_at is not None and batch.words is not None
        for k, (row, pos) in enumerate(batch.word_at.tolist()):
            s, qs, _, turn = items[row]
            ids = batch.inputs["input_ids"][row]
            i = next(j for j in range(len(qs)) if int((turn == j).nonzero()[0]) > pos)
            q = qs[i]
            assert i == 0 or int((turn == i - 1).nonzero()[-1]) < pos  # inside question i
            word = tok.decode(ids[pos]).strip()
            assert word and word in q.text
            lab = {key: v[k] for key, v in batch.words.items()}
            if q.type in ("count_shape", "count_colour"):
                assert NUMBER_WORDS[int(lab[q.type])] == q.answer
                seen["count"] += 1
            elif q.type in ("colour", "shape", "position"):
                (o,) = [s.objects[t] for t in q.target]
                assert int(lab["colour"]) == 1 + V2.colours.index(o.colour)
                assert int(lab["shape"]) == 1 + V2.shapes.index(o.shape)
                centre = lab["centre"].numpy() * (V2.grid / 2) + V2.grid / 2
                np.testing.assert_allclose(centre, o.centre)
                seen["object"] += 1
    assert seen["count"] >= 2 and seen["object"] >= 6, seen


def test_match_labels_mark_the_objects_the_question_is_about() -> None:
    """1 on the blocks of the world's own targets of a question (`Question.target`), 2 on a
    relation's second object, whose place against the first gives the world's answer; 0
    elsewhere (all 0 when the answer is zero or "no" for a missing object)."""
    from vlmscope.data.shapes import QUESTION_TYPES, ask, relation_holds
    from vlmscope.models.toy.aux import match_labels

    rng = np.random.default_rng(0)
    seen = Counter()
    for s in generate(60, seed=5, split="aux", config=V2):
        for qtype in QUESTION_TYPES:
            q = ask(s.objects, qtype, rng, V2)
            if q is None:
                continue
            lab = match_labels(q, s.objects, V2).reshape(V2.grid, V2.grid)
            want = np.zeros_like(lab)
            for t in q.target:
                o = s.objects[t]
                r, c = o.cell
                second = qtype == "relation" and o.shape == q.query["other_shape"]
                want[r : r + o.span, c : c + o.span] = 2 if second else 1
            np.testing.assert_array_equal(lab, want)
            if qtype == "relation":
                a, b = (s.objects[t] for t in q.target)
                if lab[a.cell] == 2:
                    a, b = b, a
                assert relation_holds(a, b, q.query["relation"]) == (q.answer == "yes")
            if q.answer in ("zero", "no") and qtype != "relation":
                assert not lab.any()
            seen[qtype] += 1
    assert len(seen) == len(QUESTION_TYPES), seen


def _obj(shape: str, colour: str, cell: tuple[int, int], span: int = 2) -> ShapeObject:
    r, c = cell
    return ShapeObject(shape, colour, "small", cell, (c * 8, r * 8, (c + span) * 8, (r + span) * 8),
                       span=span)  # fmt: skip


def test_relation_labels_on_a_hand_built_scene() -> None:
    """Per axis, 0 when the first named object's block ends before the second's begins, 1
    when after, IGNORE when the blocks overlap along it; named by shape or by colour and
    shape; nothing for other question types."""
    from vlmscope.data.shapes import Question
    from vlmscope.models.toy.aux import relation_centres, relation_labels

    def rel(query: dict[str, str]) -> Question:
        return Question("relation", "?", "yes", query, [], 0, False)

    circle = _obj("circle", "red", (0, 0))  # rows 0-1, columns 0-1
    square = _obj("square", "blue", (4, 5), span=3)  # rows 4-6, columns 5-7
    cross = _obj("cross", "green", (1, 3))  # rows 1-2 (overlaps the circle's), columns 3-4
    blue_circle = _obj("circle", "blue", (6, 0))  # rows 6-7, columns 0-1
    scene = [circle, square, cross, blue_circle]
    by_shape = {"shape": "square", "other_shape": "cross", "relation": "left"}
    assert relation_labels(rel(by_shape), scene).tolist() == [1, 1]  # square below, right
    first = {"shape": "circle", "colour": "red", "other_shape": "square", "other_colour": "blue"}
    assert relation_labels(rel(first), scene).tolist() == [0, 0]  # red circle above, left
    second = {"shape": "cross", "colour": "green", "other_shape": "circle", "other_colour": "red"}
    assert relation_labels(rel(second), scene).tolist() == [IGNORE, 1]  # same rows; right
    third = {"shape": "circle", "colour": "blue", "other_shape": "circle", "other_colour": "red"}
    assert relation_labels(rel(third), scene).tolist() == [1, IGNORE]  # below; same columns
    colour_q = Question("colour", "?", "red", {"shape": "circle"}, [0], 0, False)
    assert relation_labels(colour_q, scene).tolist() == [IGNORE, IGNORE]
    # centres (row, col) of A then B, in patches, scaled from the 8x8 grid to [-1, 1]
    want = (np.array([2.0, 4.0, 1.0, 1.0]) - 4) / 4  # green cross (2, 4), red circle (1, 1)
    np.testing.assert_allclose(relation_centres(rel(second), scene, V2), want)
    want = (np.array([5.5, 6.5, 2.0, 4.0]) - 4) / 4  # square (5.5, 6.5), cross (2, 4)
    np.testing.assert_allclose(relation_centres(rel(by_shape), scene, V2), want)
    assert np.isnan(relation_centres(colour_q, scene, V2)).all()


def test_relation_word_label_on_hand_built_questions() -> None:
    """The relation word asked, as a class (left 0, right 1, above 2, below 3), taken from the
    question's structure whatever its wording; nothing for other question types; a relation
    question without a known relation word is refused."""
    from vlmscope.data.shapes import Question
    from vlmscope.models.toy.aux import relation_word_label

    pair = {"shape": "circle", "other_shape": "square"}
    want = {"left": 0, "right": 1, "above": 2, "below": 3}
    texts = {
        "left": "Is the circle on the left of the square?",
        "right": "Is the circle right of the square?",
        "above": "Is the circle higher than the square?",
        "below": "Is the circle under the square?",
    }
    for relation, label in want.items():
        q = Question("relation", texts[relation], "no", pair | {"relation": relation}, [], 2, True)
        assert relation_word_label(q) == label, relation
    colour_q = Question("colour", "What colour is the circle?", "red", {"shape": "circle"}, [0],
                        0, False)  # fmt: skip
    assert relation_word_label(colour_q) == IGNORE
    with pytest.raises(ValueError, match="'Is the circle near the square\\?'"):
        relation_word_label(Question("relation", "Is the circle near the square?", "no",
                                     pair | {"relation": "near"}, [], 0, False))  # fmt: skip


def test_relation_labels_at_the_answer_position_agree_with_the_worlds_answers() -> None:
    """In a training batch of relation questions, each row's labels sit with the token after
    which the answer is generated, and the label on the asked axis gives the world's yes/no
    through the relation word (left/above: A before B)."""
    from vlmscope.models.toy.train import Stage, TrainBatches, answer_positions

    _, processor = build_toy(seed=0, question_first=True)
    tok = processor.tokenizer
    stages = (Stage(0.0, 5, ("relation", "colour")),)
    batch = next(iter(TrainBatches(processor, 0, 1, 12, stages, relation_labels=True)))
    assert batch.relation is not None and batch.relation_word is not None
    pos = answer_positions(batch.turn)
    items = list(sample_stream(processor, 0, 1, 12, stages))
    seen = 0
    for row, (_, qs, _, _) in enumerate(items):
        ids = batch.inputs["input_ids"][row]
        assert tok.decode(ids[: pos[row] + 1]).endswith("ASSISTANT:")
        assert tok.decode(ids[pos[row] + 1]).strip() == qs[0].answer
        lab = batch.relation[row].tolist()
        word = int(batch.relation_word[row])
        if qs[0].type != "relation":
            assert lab == [IGNORE, IGNORE]
            assert word == IGNORE
            continue
        # the class of the relation word, read independently from the question's text
        text = qs[0].text.lower()
        wordings = [
            ("left of",),
            ("right of",),
            ("above", "over", "higher"),
            ("below", "under", "lower"),
        ]
        said = [i for i, w in enumerate(wordings) if any(x in text for x in w)]
        assert said == [word], (text, word)
        relation = qs[0].query["relation"]
        axis = 1 if relation in ("left", "right") else 0
        before = relation in ("left", "above")
        assert lab[axis] != IGNORE  # the world only asks about objects apart on that axis
        assert (lab[axis] == 0) == (before == (qs[0].answer == "yes"))
        seen += 1
    assert seen >= 4, seen
