"""Signed image-patch heatmaps as PNG (matplotlib), drawn by the same rules as the viewer's.

Rules, so that a heatmap answers "which patches pushed this answer up or down" at a glance:
- the image keeps its own colours: nothing is tinted; each patch is *outlined*, in a diverging
  colour (blue pushes the logit down, red pushes it up, pale near zero), with a line width that
  grows with |value| and a dark halo so the outline shows on any background;
- the scale is symmetric around zero (`[-m, m]`, m = the largest |value|) and a colour bar with
  values sits beside the image;
- the title names the target token and its probability.

Values come from `export.patch_effect(graph, k)`: each patch's signed total effect on the
target logit through the graph (optionally against competing answers' logits), the map that
puts most of its mass on the asked-about object in the grounding benchmark
(benchmarks/README.md). Patches under 5% of m get no outline, so a heatmap with one strong
patch shows one box, not a grid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from vlmscope.attribution.export import patch_effect
from vlmscope.attribution.graph import Graph
from vlmscope.files import write_atomically

PathLike = str | os.PathLike[str]

#: matplotlib's name of the diverging colour map (the viewer samples the same map).
CMAP = "coolwarm"
#: cells below this share of the largest |value| get no outline.
MIN_SHARE = 0.05


def heatmap_figure(
    image: Image.Image,
    heat: Tensor | np.ndarray,
    *,
    region: Sequence[float] | None = None,
    title: str | None = None,
    label: str = "signed effect",
    width_in: float = 5.0,
    dpi: int = 100,
) -> object:
    """A matplotlib Figure (no pyplot, no global state) of `image` with the [rows, cols] signed
    `heat` outlined over `region` (x0, y0, x1, y1 in image pixels; default: the whole image)."""
    from matplotlib import patheffects
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h = np.asarray(heat.detach().double().cpu() if isinstance(heat, Tensor) else heat, float)
    if h.ndim != 2:
        raise ValueError(f"heat must be [rows, cols], got shape {h.shape}")
    w_px, h_px = image.size
    x0, y0, x1, y1 = (0.0, 0.0, float(w_px), float(h_px)) if region is None else region
    if x0 < 0 or y0 < 0 or x1 > w_px + 1e-6 or y1 > h_px + 1e-6 or x1 <= x0 or y1 <= y0:
        raise ValueError(f"region {tuple(region or ())} is outside the {image.size} image")
    m = float(np.nanmax(np.abs(h))) if h.size else 0.0
    m = m if m > 0 else 1.0
    norm = Normalize(-m, m)
    mappable = ScalarMappable(norm=norm, cmap=CMAP)
    fig = Figure(figsize=(width_in, width_in * h_px / w_px * 0.82 + 0.5), dpi=dpi)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()
    ax.imshow(np.asarray(image.convert("RGB")), extent=(0, w_px, h_px, 0), interpolation="nearest")
    ax.set_xlim(0, w_px)
    ax.set_ylim(h_px, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    rows, cols = h.shape
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    inset = 0.08
    for r in range(rows):
        for c in range(cols):
            v = float(h[r, c])
            share = abs(v) / m
            if not np.isfinite(v) or share < MIN_SHARE:
                continue
            lw = 0.8 + 3.2 * share
            rect = Rectangle(
                (x0 + (c + inset) * cw, y0 + (r + inset) * ch),
                cw * (1 - 2 * inset),
                ch * (1 - 2 * inset),
                fill=False,
                edgecolor=mappable.to_rgba(v),
                linewidth=lw,
            )
            rect.set_path_effects(
                [patheffects.withStroke(linewidth=lw + 1.6, foreground="#111111")]
            )
            ax.add_patch(rect)
    bar = fig.colorbar(mappable, ax=ax, fraction=0.06, pad=0.03)
    bar.set_label(label)
    bar.ax.axhline(0.0, color="#111111", linewidth=0.8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def render_heatmap(image: Image.Image, heat: Tensor | np.ndarray, **kwargs: object) -> Image.Image:
    """`heatmap_figure` rendered to an RGB PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = heatmap_figure(image, heat, **kwargs)  # type: ignore[arg-type]
    canvas = FigureCanvasAgg(fig)  # type: ignore[arg-type]
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def heatmap_title(token: str, probability: float) -> str:
    return f"target {token!r}   p = {probability:.2f}"


def save_heatmap_png(
    graph: Graph,
    image: Image.Image | PathLike,
    path: PathLike,
    logit_index: int = 0,
    view: int = 0,
    *,
    image_index: int = 0,
    region: Sequence[float] | None = None,
    against: Sequence[int] = (),
) -> Path:
    """PNG of one view of one image with each patch's signed effect on logit `logit_index`
    (minus the mean of the logits `against`, e.g. the answer's competitors: `patch_effect`).

    View 0 is the whole (base) image; tiled / high-resolution views (>= 1) are stitched grids
    that also cover the whole image. `region` narrows where the grid lands (see
    `export.center_crop_box`)."""
    heat = patch_effect(graph, logit_index, against=against).get(image_index, {})
    if view not in heat:
        raise ValueError(
            f"image {image_index} has no view {view} in this graph (views: {sorted(heat)})"
        )
    img = Image.open(image) if isinstance(image, str | os.PathLike) else image
    t = graph.logit_targets[logit_index]
    png = render_heatmap(
        img,
        heat[view],
        region=region,
        title=heatmap_title(t.token, t.probability),
        label=f"signed effect on {t.token!r}" + (f" vs {len(against)} others" if against else ""),
    )
    return write_atomically(path, lambda tmp: png.save(tmp, format="PNG"))


def heatmap_path(json_path: PathLike, image_index: int = 0, n_images: int = 1) -> Path:
    """The one heatmap name the CLI and the demo use: `<graph stem>.heatmap.png` next to the
    graph JSON (`<stem>.heatmap-<i>.png` when the prompt has several images)."""
    p = Path(json_path)
    suffix = "" if n_images <= 1 else f"-{image_index}"
    return p.with_name(f"{p.stem}.heatmap{suffix}.png")
