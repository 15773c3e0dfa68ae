"""Vision-encoder positions against layouts written out by hand (every family's layout is
checked against its language model's image tokens in tests/acceptance)."""

from __future__ import annotations

import pytest
import torch

from vlmscope.models.vision import VisionLayoutError, grid_side, view_layout, vision_row_mask


def test_grid_side_tells_a_cls_token_from_a_square_grid() -> None:
    assert grid_side(16) == (0, 4)
    assert grid_side(17) == (1, 4)
    assert grid_side(1) == (0, 1)
    assert grid_side(18) == (-1, 0)


def test_view_layout_of_a_cls_token_plus_tiles_on_a_stitched_grid() -> None:
    # Image 0: one view; image 1: a base view and two tiles side by side; 2x2 grids + CLS.
    views = [(0, 0, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0), (1, 1, 0, 1)]
    cells = view_layout(views, (4, 5), "vision.blocks.0.hook_resid_post").tolist()
    assert cells[:5] == [[0, 0, -1, -1], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert cells[10:15] == [[1, 1, -1, -1], [1, 1, 0, 0], [1, 1, 0, 1], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert cells[15:] == [[1, 1, -1, -1], [1, 1, 0, 2], [1, 1, 0, 3], [1, 1, 1, 2], [1, 1, 1, 3]]


def test_view_layout_names_the_hook_when_shapes_disagree() -> None:
    with pytest.raises(VisionLayoutError, match=r"projector.hook_out: .*\[3, 4\].* 2 view"):
        view_layout([(0, 0, 0, 0), (1, 0, 0, 0)], (3, 4), "projector.hook_out")
    with pytest.raises(VisionLayoutError, match="neither a square grid nor a CLS"):
        view_layout([(0, 0, 0, 0)], (1, 7), "x")


def test_row_mask_keeps_patches_and_optionally_cls_but_never_padding() -> None:
    layout = torch.tensor([[0, 0, -1, -1], [0, 0, 0, 0], [0, 1, -2, -2], [0, 1, 0, 1]])
    assert vision_row_mask(layout).tolist() == [False, True, False, True]
    assert vision_row_mask(layout, include_special=True).tolist() == [True, True, False, True]
