"""Signed heatmaps: the image keeps its colours, outlines diverge around zero, a colour bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from tests.attribution.test_export import image_graph
from tests.conftest import random_image
from vlmscope.attribution.heatmap import heatmap_figure, heatmap_path, save_heatmap_png

PURPLE = (128, 0, 160)


def rendered(fig: Any) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def pixel(fig: Any, pix: np.ndarray, x: float, y: float) -> tuple[int, ...]:
    """The rendered pixel at image coordinates (x, y) of the figure's main axes."""
    dx, dy = fig.axes[0].transData.transform((x, y))
    return tuple(int(v) for v in pix[round(pix.shape[0] - dy), round(dx)])


def test_outlines_keep_the_image_colours_and_diverge_by_sign() -> None:
    image = Image.new("RGB", (64, 64), PURPLE)
    heat = torch.tensor([[1.0, -0.5], [0.03, 0.0]])  # 0.03 is under the 5% outline cut
    fig = heatmap_figure(image, heat, title="target ' purple'   p = 1.00", width_in=4, dpi=100)
    pix = rendered(fig)
    # Every cell's middle shows the picture untouched: no tint hides the colour asked about.
    for x, y in ((16, 16), (48, 16), (16, 48), (48, 48)):
        assert pixel(fig, pix, x, y) == PURPLE
    # The outline of the positive cell is red, of the negative one blue (top edge, inset 8%).
    r, _, b = pixel(fig, pix, 16, 32 * 0.08)
    assert r > 150 > 60 > b
    r, _, b = pixel(fig, pix, 48, 32 * 0.08)
    assert b > 200 > 150 > r
    assert pixel(fig, pix, 16, 32 + 32 * 0.08) == PURPLE  # the 3% cell: no outline
    # A colour bar, symmetric around zero, and the title.
    bar = fig.axes[1]
    assert bar.get_ylim() == pytest.approx((-1.0, 1.0))
    assert fig.axes[0].get_title() == "target ' purple'   p = 1.00"


def test_region_places_the_grid_on_the_pixels_the_model_saw() -> None:
    image = Image.new("RGB", (80, 64), PURPLE)
    fig = heatmap_figure(image, torch.tensor([[1.0]]), region=(8, 0, 72, 64), width_in=4)
    pix = rendered(fig)
    r, _, b = pixel(fig, pix, 8 + 64 * 0.08, 32)  # the left edge of the one cell
    assert r > 150 > 60 > b
    assert pixel(fig, pix, 3, 32) == PURPLE  # left of the region: the picture only
    with pytest.raises(ValueError, match="outside"):
        heatmap_figure(image, torch.ones(1, 1), region=(0, 0, 100, 64))


def test_save_heatmap_png_for_a_graph(tmp_path: Path) -> None:
    g = image_graph()
    pic = random_image(32, 40, 3)
    p = save_heatmap_png(g, pic, tmp_path / "h.png")
    out = Image.open(p)
    assert out.format == "PNG" and out.width > 300
    p = save_heatmap_png(g, pic, tmp_path / "h2.png", view=1, image_index=1)
    assert p.exists()
    with pytest.raises(ValueError, match="no view 0"):
        save_heatmap_png(g, pic, tmp_path / "x.png", view=0, image_index=1)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["h.png", "h2.png"]


def test_one_heatmap_name() -> None:
    assert heatmap_path("out/circle.json") == Path("out/circle.heatmap.png")
    assert heatmap_path("g.json", 1, 2) == Path("g.heatmap-1.png")
