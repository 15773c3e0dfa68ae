"""Vision-encoder positions: which (image, view, row, col) each row of a vision hook holds.

A vision hook's activation (`vision.blocks.{i}.*`, `projector.hook_out`) has no language-model
token positions: its rows are the vision encoder's own, laid out per family:

    one view per image, CLS first      LLaVA (CLIP): [images, 1 + g*g, d]
    one view per image                 PaliGemma, Gemma 3 (SigLIP): [images, g*g, d]
    tiles + base view per image        LLaVA-NeXT / OneVision: [tiles, (1 +) g*g, d], base first
    tiles + global view per image      Idefics3 / SmolVLM: [views, g*g, d], global last
    flat merged patches                Qwen2-VL / 2.5-VL / 3-VL: [patches, d] in 2x2 merge groups
                                       (2.5-VL: in window order inside the tower); a batch's
                                       videos are a second run, after the images

`ModelAdapter.vision_views(inputs)` lists the views the encoder sees, in its order, as
(image, view, tile_row, tile_col); `view_layout` turns that into one (image, view, row, col)
per row for a hook whose activation has shape [views, P, d]: P = g*g grid cells in row-major
order, or 1 + g*g with a CLS token first. View 0 is the whole (or base / global) image; tiles are
view 1 on one stitched grid (tile (tr, tc) covers rows tr*g .. tr*g + g - 1), the convention of
`TokenMasks.patch_map`. Rows outside the grid (CLS, registers) get row = col = -1, patches
of padding around an image (LLaVA-NeXT's tiles) row = col = -2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

VisionView = tuple[int, int, int, int]
"""(image index in pixel_values order, view, tile row, tile column) of one encoder view."""


class VisionLayoutError(ValueError):
    """A vision hook's activation does not have the shape its family's layout implies."""


def is_vision_hook(name: str) -> bool:
    """Hook points of the vision tower or the projector (rows are vision positions)."""
    return name.startswith(("vision.", "projector."))


def grid_side(per_view: int) -> tuple[int, int]:
    """(leading non-grid rows, grid side) of a view with `per_view` rows: g*g, or 1 + g*g."""
    side = math.isqrt(per_view)
    if side * side == per_view:
        return 0, side
    side = math.isqrt(per_view - 1)
    if per_view > 1 and side * side == per_view - 1:
        return 1, side
    return -1, 0


def view_layout(views: Sequence[VisionView], shape: Sequence[int], name: str) -> torch.Tensor:
    """[views * P, 4] (image, view, row, col) of an activation of shape [views, P] (width
    left out), views in `views` order (see the module docstring)."""
    if len(shape) != 2 or shape[0] != len(views):
        raise VisionLayoutError(
            f"{name}: activation of shape {list(shape)} (width left out) does not hold one row "
            f"of positions per encoder view: the images give {len(views)} view(s)"
        )
    extra, side = grid_side(int(shape[1]))
    if extra < 0:
        raise VisionLayoutError(
            f"{name}: {shape[1]} positions per view are neither a square grid nor a CLS token "
            "plus one; this family needs its own vision_views / vision_layout"
        )
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cells = torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)
    cells = torch.cat([torch.full((extra, 2), -1, dtype=torch.long), cells])
    out = []
    for image, view, tr, tc in views:
        grid = cells.clone()
        on = grid[:, 0] >= 0
        grid[on, 0] += tr * side
        grid[on, 1] += tc * side
        head = torch.tensor([image, view], dtype=torch.long).expand(len(grid), 2)
        out.append(torch.cat([head, grid], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.long)


def vision_row_mask(layout: torch.Tensor, include_special: bool = False) -> torch.Tensor:
    """[rows] bool of a layout: its image patches (grid cells), plus the rows outside the grid
    with `include_special` (CLS / register tokens: row = col = -1; a row's closing newline
    token: col = -1); padding patches (row = col = -2) never."""
    low = -1 if include_special else 0
    return (layout[:, 2] >= low) & (layout[:, 3] >= low)


def join_firings(previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The rows of two firings of one vision hook in a forward (a part that runs once per
    image, as Phi-4-multimodal's projector), in order: [rows, width]."""
    width = new.shape[-1]
    return torch.cat([previous.reshape(-1, width), new.reshape(-1, width)])


def views_from_token_grids(grids: Sequence[torch.Tensor], per_view: int) -> list[VisionView]:
    """Encoder views in token order, read from each image's token cells (`image_token_grids`:
    [n, 3] (view, row, col)) for families whose encoder sees one view per run of `per_view`
    grid tokens (tiles, then or before a global view): (image, view, tile row, tile column),
    the tile's offset being its first cell's (row, col) // side."""
    side = math.isqrt(per_view)
    out: list[VisionView] = []
    for i, cells in enumerate(grids):
        on = cells[cells[:, 1] >= 0]
        for k in range(0, len(on), per_view):
            v, r, c = (int(x) for x in on[k])
            out.append((i, v, r // side, c // side))
    return out


def per_view_shape(shape: Sequence[int], n_views: int) -> tuple[int, ...]:
    """[views, P] for an activation whose rows are views x P but whose shape splits or merges
    them differently ([views, h, w] before a flatten, or [views * P] flat)."""
    total = math.prod(int(n) for n in shape)
    if n_views and total % n_views == 0 and (len(shape) != 2 or shape[0] != n_views):
        return (n_views, total // n_views)
    return tuple(int(n) for n in shape)


def one_view_per_image(inputs: Mapping[str, Any]) -> list[VisionView]:
    """Each image of pixel_values ([images, C, H, W]) is one view of the encoder."""
    pv = inputs.get("pixel_values")
    return [] if pv is None else [(i, 0, 0, 0) for i in range(int(pv.shape[0]))]


__all__ = [
    "VisionLayoutError",
    "VisionView",
    "grid_side",
    "is_vision_hook",
    "join_firings",
    "one_view_per_image",
    "per_view_shape",
    "view_layout",
    "views_from_token_grids",
    "vision_row_mask",
]
