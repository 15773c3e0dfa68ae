"""The toy's per-patch auxiliary targets, checked against the shapes world's own per-patch labels
and against the image's pixels; the projector tap against `get_image_features`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from vlmscope.data.shapes import COLOURS, POSITIONS, ShapesConfig, generate
from vlmscope.models.toy.aux import IGNORE, PatchHead, ProjectorTap, collate_labels, patch_labels
from vlmscope.models.toy.train import build_toy

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
