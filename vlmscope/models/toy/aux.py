"""Per-patch auxiliary targets for training the toy VLM's vision pathway (training only).

The answer loss reaches the vision tower only through the language model, a few answer tokens
per picture: the image pathway forms slowly, and binding (which object is the circle, where is
it, how many are red) waits for it. The shapes world knows, for every patch, the object whose
block holds it, so a throwaway linear head on the projector's outputs can be trained to read
per patch:

- ``shape`` and ``colour`` of the patch's object (0: background);
- ``count_shape`` / ``count_colour``: how many objects of the scene share that object's shape
  / colour (1 .. 5; background patches are ignored);
- ``quadrant`` of the object's centre (ignored on a midline and on background);
- ``centre``: the object's centre (row, column) in patches, scaled to [-1, 1] (regression).

With p_i the projector output of patch i and W the head, the loss is
``sum_task CE(W_task p_i, y_task,i)`` averaged over labelled patches, plus the mean squared
error of the centre, times a weight. The head is never saved: the shipped model stays an
unmodified Hugging Face LLaVA, and what the auxiliary loss changes is only where the vision
tower's and the projector's weights go (features the language model can read with one
attention lookup).

The same head shape serves a second, optional target on the decoder's side
(`question_word_labels`): at the word of a question that names an object ("circle" in "What
colour is the circle?"), the decoder's hidden state after a chosen layer is trained to give
that object's labels, so finding the named object is learnt at the word, one attention hop,
before the answer position has to read it (only words after the image can see it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from vlmscope.data import shapes

IGNORE = -100
"""Label of a patch a task says nothing about (cross-entropy's ignore index)."""


def class_counts(config: shapes.ShapesConfig) -> dict[str, int]:
    """Classes of each classification task under `config`."""
    return {
        "shape": 1 + len(config.shapes),
        "colour": 1 + len(config.colours),
        "count_shape": 1 + config.n_objects,
        "count_colour": 1 + config.n_objects,
        "quadrant": len(shapes.POSITIONS),
    }


def patch_labels(
    objects: Sequence[shapes.ShapeObject], config: shapes.ShapesConfig
) -> dict[str, np.ndarray]:
    """Per-patch targets of one v2 scene, row-major over the grid: int64 ``[grid * grid]`` per
    classification task (`IGNORE` where it says nothing) and float32 ``centre`` ``[grid *
    grid, 2]`` (NaN on background)."""
    if config.version < 2:
        raise ValueError("patch_labels: auxiliary targets exist for the v2 world only")
    g = config.grid
    out = {k: np.full((g, g), IGNORE, np.int64) for k in class_counts(config)}
    out["shape"][:] = 0
    out["colour"][:] = 0
    centre = np.full((g, g, 2), np.nan, np.float32)
    n_shape = {s: sum(o.shape == s for o in objects) for s in config.shapes}
    n_colour = {c: sum(o.colour == c for o in objects) for c in config.colours}
    for o in objects:
        r, c = o.cell
        block = (slice(r, r + o.span), slice(c, c + o.span))
        out["shape"][block] = 1 + config.shapes.index(o.shape)
        out["colour"][block] = 1 + config.colours.index(o.colour)
        out["count_shape"][block] = n_shape[o.shape]
        out["count_colour"][block] = n_colour[o.colour]
        if g / 2 not in o.centre:
            out["quadrant"][block] = shapes.POSITIONS.index(shapes.position_word(o.centre, g))
        centre[block] = np.array(o.centre, np.float32) / (g / 2) - 1
    labels = {k: v.reshape(-1) for k, v in out.items()}
    labels["centre"] = centre.reshape(g * g, 2)
    return labels


def _object_labels(
    o: shapes.ShapeObject, objects: Sequence[shapes.ShapeObject], config: shapes.ShapesConfig
) -> dict[str, Any]:
    """Every task's label of one object (what `patch_labels` writes on its patches)."""
    g = config.grid
    return {
        "shape": 1 + config.shapes.index(o.shape),
        "colour": 1 + config.colours.index(o.colour),
        "count_shape": sum(p.shape == o.shape for p in objects),
        "count_colour": sum(p.colour == o.colour for p in objects),
        "quadrant": IGNORE
        if g / 2 in o.centre
        else shapes.POSITIONS.index(shapes.position_word(o.centre, g)),
        "centre": np.array(o.centre, np.float32) / (g / 2) - 1,
    }


def _find_last(ids: Sequence[int], word: Sequence[int], lo: int, hi: int) -> int | None:
    """Position of the last token of the last occurrence of `word` in ids[lo:hi]."""
    n = len(word)
    for end in range(hi, lo + n - 1, -1):
        if list(ids[end - n : end]) == list(word):
            return end - 1
    return None


def question_word_labels(
    ids: torch.Tensor,
    turn: torch.Tensor,
    questions: Sequence[shapes.Question],
    objects: Sequence[shapes.ShapeObject],
    tokenizer: Any,
    config: shapes.ShapesConfig,
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Targets at the words of each question that name something in the scene: positions in
    `ids` (the last token of the word) and per-position labels shaped like `patch_labels`'.

    A word that names one object of the scene (the shape in "What colour is the circle?",
    the colour in "What shape is the red object?", the shape after its colour in "Where is the
    red circle?", either object of a relation, a present object of "Is there a red circle?")
    gets that object's labels; the word of a count question ("How many circles ...") and an
    absent object's shape get the counts only. `turn` marks each turn's answer tokens (-1
    elsewhere), which delimits the questions."""
    ids_l = ids.tolist()
    answer_at = [int((turn == i).nonzero()[0]) for i in range(len(questions))]
    ends = [int((turn == i).nonzero()[-1]) for i in range(len(questions))]
    positions: list[int] = []
    rows: list[dict[str, Any]] = []

    def word_ids(word: str) -> list[int]:
        return tokenizer(" " + word, add_special_tokens=False)["input_ids"]

    for i, q in enumerate(questions):
        lo, hi = (ends[i - 1] + 1 if i else 0), answer_at[i]
        found: list[tuple[str, dict[str, Any]]] = []
        qq = q.query
        names = [("", qq)]
        if q.type == "relation":
            other = {k[len("other_") :]: v for k, v in qq.items() if k.startswith("other_")}
            names = [("", {k: v for k, v in qq.items() if k in ("shape", "colour")}), ("", other)]
        for _, ref in names:
            shape, colour = ref.get("shape"), ref.get("colour")
            match = [
                o
                for o in objects
                if (shape is None or o.shape == shape) and (colour is None or o.colour == colour)
            ]
            if q.type == "count_shape" and shape is not None:
                found.append((shapes.plural(shape), {"count_shape": len(match)}))
            elif q.type == "count_colour" and colour is not None:
                found.append((colour, {"count_colour": len(match)}))
            elif len(match) == 1:
                found.append((shape or colour or "", _object_labels(match[0], objects, config)))
            elif shape is not None and colour is not None:  # an absent object
                found.append(
                    (
                        shape,
                        {
                            "count_shape": sum(o.shape == shape for o in objects),
                            "count_colour": sum(o.colour == colour for o in objects),
                        },
                    )
                )
        for word, labels in found:
            at = _find_last(ids_l, word_ids(word), lo, hi) if word else None
            if at is not None:
                positions.append(at)
                rows.append(labels)
    out: dict[str, np.ndarray] = {
        k: np.array([r.get(k, IGNORE) for r in rows], np.int64) for k in class_counts(config)
    }
    out["centre"] = np.array(
        [r.get("centre", np.full(2, np.nan, np.float32)) for r in rows], np.float32
    ).reshape(-1, 2)
    return positions, out


MATCH_CLASSES = 3
"""Classes of `match_labels`: 0 not asked about, 1 the (first) named object, 2 a relation's
second object."""


def match_labels(
    question: shapes.Question,
    objects: Sequence[shapes.ShapeObject],
    config: shapes.ShapesConfig,
) -> np.ndarray:
    """Per patch (int64 ``[grid * grid]``, row-major) which object of the question it belongs
    to: 1 on the patches of every object matching what the question names (the shape of a
    colour question, the colour and shape of a position or existence question, the counted
    shape or colour), 2 on a relation's second object, 0 elsewhere (so an absent object or a
    count of zero is all 0).

    The target of a question-conditioned per-patch loss: with the question before the image,
    each image token can compare itself with the question, and a head reading the decoder
    there learns the lookup that every answer needs, with a label per patch instead of one
    answer token."""
    g = config.grid
    out = np.zeros((g, g), np.int64)
    q = question.query
    first = {k: v for k, v in q.items() if k in ("shape", "colour")}
    other = {k[len("other_") :]: v for k, v in q.items() if k.startswith("other_")}
    for o in objects:
        r, c = o.cell
        block = (slice(r, r + o.span), slice(c, c + o.span))
        if other and all(getattr(o, k) == v for k, v in other.items()):
            out[block] = 2
        elif first and all(getattr(o, k) == v for k, v in first.items()):
            out[block] = 1
    return out.reshape(-1)


RELATION_AXES: tuple[str, ...] = ("row", "column")
"""The axes of `relation_labels`, in order."""


def relation_labels(question: shapes.Question, objects: Sequence[shapes.ShapeObject]) -> np.ndarray:
    """For a relation question about objects A and B (the first and the second it names):
    int64 ``[2]``, per axis of `RELATION_AXES`, 0 when A's block ends before B's begins (A
    above / left of B), 1 when B's ends before A's (A below / right of B), `IGNORE` when the
    blocks overlap along that axis; all `IGNORE` for any other question type.

    The target of a training-only loss at the answer position (the last prompt token): the
    answer to any relation question is one of these two signs read through the relation word,
    so a head there gets the comparison of the two places as dense supervision, independent
    of which of the four relations was asked and whether the answer is yes or no."""
    out = np.full(len(RELATION_AXES), IGNORE, np.int64)
    if question.type != "relation":
        return out
    a, b = shapes.relation_objects(objects, question.query)
    for axis in range(len(RELATION_AXES)):
        if a.cell[axis] + a.span <= b.cell[axis]:
            out[axis] = 0
        elif b.cell[axis] + b.span <= a.cell[axis]:
            out[axis] = 1
    return out


def relation_centres(
    question: shapes.Question, objects: Sequence[shapes.ShapeObject], config: shapes.ShapesConfig
) -> np.ndarray:
    """For a relation question: float32 ``[4]``, the (row, column) centres of its first and
    second named objects, in patches scaled to [-1, 1] (as `patch_labels`' ``centre``); NaN
    for any other question type. A regression target at the answer position that rewards
    fetching each object's place on its own, before the two are compared."""
    if question.type != "relation":
        return np.full(4, np.nan, np.float32)
    a, b = shapes.relation_objects(objects, question.query)
    half = config.grid / 2
    return ((np.array([*a.centre, *b.centre], np.float64) - half) / half).astype(np.float32)


def relation_word_label(question: shapes.Question) -> int:
    """Which relation word a relation question asks, as its index in `shapes.RELATIONS`
    (left, right, above, below: the axis and the direction the answer reads the places
    through), from the question's structured ``query`` (not its text, whose three wordings per
    relation all map to one class); `IGNORE` for any other question type.

    A training-only target at the answer position: the probe on run 2 found the sign of the
    places there after layer 3 but the word asked only after layer 4, so the last layer had to
    fetch the word and combine it with the sign in one step."""
    if question.type != "relation":
        return IGNORE
    relation = question.query.get("relation")
    if relation not in shapes.RELATIONS:
        raise ValueError(f"{question.text!r}: relation question without a known relation word")
    return shapes.RELATIONS.index(relation)


_Tap = TypeVar("_Tap", bound="LayerTap")


class LayerTap:
    """Keeps the last output (hidden states) of one module of a model while installed."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        from vlmscope.models.hooked import register_vlmscope_hook

        self._handle = register_vlmscope_hook(module, self._keep)

    def _keep(self, _module: nn.Module, _inputs: object, output: Any) -> None:
        self.output = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        """Uninstall the hook."""
        self._handle.remove()

    def __enter__(self: _Tap) -> _Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def collate_labels(per_image: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-image labels into ``[batch, patches]`` (and ``[batch, patches, 2]``) tensors."""
    return {k: torch.from_numpy(np.stack([p[k] for p in per_image])) for k in per_image[0]}


class PatchHead(nn.Module):
    """One linear map from a projector output to every task's logits (and the centre)."""

    def __init__(self, dim: int, config: shapes.ShapesConfig) -> None:
        super().__init__()
        self.classes = class_counts(config)
        self.grid = config.grid
        self.proj = nn.Linear(dim, sum(self.classes.values()) + 2)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per task ``[..., classes]`` and ``centre`` ``[..., 2]``."""
        out = self.proj(features)
        parts = out.split([*self.classes.values(), 2], dim=-1)
        return dict(zip([*self.classes, "centre"], parts, strict=True))

    def loss(
        self, features: torch.Tensor, labels: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed task losses on ``[batch, patches, dim]`` features, and each task's accuracy on
        the patches of objects (background is most patches; the centre's score is its mean
        absolute error in patches)."""
        pred = self(features.float())
        total = features.new_zeros(())
        scores: dict[str, float] = {}
        for task in self.classes:
            y = labels[task].reshape(-1)
            logits = pred[task].reshape(y.shape[0], -1)
            keep = y != IGNORE
            if keep.any():
                total = total + nn.functional.cross_entropy(logits[keep], y[keep])
                hit = (logits.detach().argmax(-1) == y)[keep & (labels["shape"].reshape(-1) > 0)]
                scores[task] = float(hit.float().mean())  # on the objects' patches
        target = labels["centre"].reshape(-1, 2)
        keep = ~target.isnan().any(-1)
        if keep.any():
            diff = pred["centre"].reshape(-1, 2)[keep] - target[keep]
            total = total + 4 * diff.pow(2).mean()
            scores["centre_mae"] = float(diff.detach().abs().mean()) * self.grid / 2
        return total, scores


class ProjectorTap(LayerTap):
    """Keeps the last output of a LLaVA's multi-modal projector (``[images, patches, dim]``)
    while installed, through a forward hook (the model's code is untouched)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model.model.multi_modal_projector)
