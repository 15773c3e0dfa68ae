"""Llama 4's PIL tiling image processor against canvases worked out by hand."""

from __future__ import annotations

from tests.conftest import random_image
from vlmscope.models.zoo.llama4 import (
    Llama4TilingImageProcessorPil,
    best_canvas,
    fit_without_distortion,
    tile_canvases,
)


def test_canvases_and_the_chosen_fit() -> None:
    canvases = tile_canvases(4, 32)
    assert sorted(canvases) == sorted(
        [(32, 128), (64, 64), (128, 32), (32, 96), (96, 32), (32, 64), (64, 32), (32, 32)]
    )
    # 32x40 fits 32x64 unscaled (scale 1, the least upscaling that fits).
    assert best_canvas((32, 40), canvases, to_max=False) == (32, 64)
    # 100x300 fits nothing: the least downscaling is 0.32, reached by 32x128 and 32x96; the
    # smaller area wins.
    assert best_canvas((100, 300), canvases, to_max=False) == (32, 96)
    assert fit_without_distortion((100, 300), (32, 96)) == (32, 96)
    assert fit_without_distortion((32, 40), (32, 64)) == (32, 40)


def test_tiles_plus_a_global_view() -> None:
    proc = Llama4TilingImageProcessorPil(size={"height": 32, "width": 32}, max_patches=4)
    out = proc([random_image(100, 300, 1), random_image(20, 40, 2)], return_tensors="pt")
    # 1x3 tiles + the global view; then 20x40 on a 32x64 canvas: 1x2 tiles + the global view.
    assert out["pixel_values"].shape == (7, 3, 32, 32)
    assert out["aspect_ratios"].tolist() == [[1, 3], [1, 2]]
    # 20x40 is not upscaled past one tile's size (40 > 32 wide stays 40), then padded right
    # and bottom with zeros, -1 after normalising with mean = std = 0.5.
    left, right = out["pixel_values"][4], out["pixel_values"][5]
    assert bool((left[:, 20:] == -1).all()) and not bool((left[:, :20] == -1).all())
    assert bool((right[:, :, 8:] == -1).all()) and bool((right[:, 20:] == -1).all())
