"""Phi-4-multimodal's PIL dynamic-HD image processor against crops worked out by hand."""

from __future__ import annotations

from tests.conftest import random_image
from vlmscope.models.zoo.phi4_multimodal import Phi4MMImageProcessorPil, crop_grid


def test_crop_grid() -> None:
    assert crop_grid(32, 40, 32, 4) == (2, 1)  # ceil(40/32) columns, one row
    # 10 x 4 crops would exceed 4: the grid with the closest aspect ratio (3:1) instead.
    assert crop_grid(100, 300, 32, 4) == (3, 1)


def test_crops_masks_and_token_count() -> None:
    proc = Phi4MMImageProcessorPil(size={"height": 32, "width": 32}, patch_size=8, dynamic_hd=4)
    out = proc([random_image(32, 40, 1)], return_tensors="pt")
    # 40 px wide on a 64 px canvas: 24 px of padding = 3 masked patch columns of 8.
    assert out["image_pixel_values"].shape == (1, 3, 3, 32, 32)  # global + 2 crops
    mask = out["image_attention_mask"][0]
    assert mask[1].sum() == 16 and mask[2][:, 0].tolist() == [1, 1, 1, 1]
    assert mask[2][0].tolist() == [1, 0, 0, 0]
    # Global: 2x2 pooled + 2 newlines; separator; crops: 2 rows of 3 useful cells + newlines.
    assert out["num_img_tokens"].tolist() == [2 * 2 + 2 + 1 + 2 * 3 + 2]
