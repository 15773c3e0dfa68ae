"""Idefics3 and SmolVLM: images split into tiles plus a global view, pixel-shuffled tokens.

Each tile's tokens follow a `<row_r_col_c>` marker and the global view's follow
`<global-img>`; the layout is read from those markers in input_ids.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, ModelAdapter
from vlmscope.models.adapters.llava import grid_cells
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter
from vlmscope.models.vision import VisionView

_ROW_COL = re.compile(r"<row_(\d+)_col_(\d+)>")


def real_views_per_sample(inputs: Mapping[str, Any], batch: int) -> list[int]:
    """Non-padding image views per sample in [batch, views, C, H, W] pixel_values; padding
    views are all zeros, the same rule transformers uses to drop them."""
    pv = inputs["pixel_values"]
    if pv.dim() != 5 or pv.shape[0] != batch:
        rows = pv.shape[0] if pv.dim() == 5 else 0
        which = f" (sample {rows} onwards has none)" if 0 < rows < batch else ""
        raise ImageTokenMismatchError(
            f"pixel_values has shape {tuple(pv.shape)}, but Idefics3/SmolVLM expect one row of "
            f"image views per sample: [{batch} samples, views, channels, height, width]{which}"
        )
    pam = inputs.get("pixel_attention_mask")
    if pam is not None and tuple(pam.shape[:2]) != tuple(pv.shape[:2]):
        raise ImageTokenMismatchError(
            f"pixel_attention_mask has shape {tuple(pam.shape)}, which does not match "
            f"pixel_values {tuple(pv.shape)} in its first two (sample, view) dimensions"
        )
    return (pv.flatten(2) != 0).any(-1).sum(1).tolist()


@register_adapter
class Idefics3Adapter(ModelAdapter):
    family = "idefics3"
    model_types = ("idefics3",)
    architectures = ("Idefics3ForConditionalGeneration",)
    language_model = "model.text_model"
    vision_blocks = "model.vision_model.encoder.layers"
    projector = "model.connector"
    #: tiles are separated by marker tokens, so an image's tokens are not one run.
    capabilities = Capabilities(contiguous_image_tokens=False)
    global_image_token = "<global-img>"

    def _markers(self) -> dict[int, tuple[int, int] | None]:
        """Token id -> (row, col) of a tile marker, or None for the global-image marker."""
        tok = self.tokenizer
        out: dict[int, tuple[int, int] | None] = {}
        for text, i in tok.get_vocab().items():
            m = _ROW_COL.fullmatch(text)
            if m:
                out[i] = (int(m.group(1)) - 1, int(m.group(2)) - 1)
        out[tok.convert_tokens_to_ids(self.global_image_token)] = None
        return out

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Grids read from the markers in input_ids, after checking each sample's image views
        (one run of image tokens per tile or global view) against its real views in
        pixel_values: the layout comes from the ids alone, so only this catches images that
        the prompt does not mention, or placeholders with no image behind them."""
        image_id = self.image_token_ids()[0]
        markers = self._markers()
        rows = inputs["input_ids"].tolist()
        real = real_views_per_sample(inputs, len(rows))
        out: list[torch.Tensor] = []
        for b, ids in enumerate(rows):
            grids, views = self._sample_grids(ids, image_id, markers)
            if views != real[b]:
                said = (
                    "no image tokens"
                    if not views
                    else f"image tokens for {views} view(s) ({len(grids)} image(s), each its "
                    "tiles plus a global view)"
                )
                raise ImageTokenMismatchError(
                    f"sample {b} has {said} but pixel_values holds {real[b]} real image "
                    "view(s) for it; the prompt's image placeholders and the images passed "
                    "disagree"
                )
            out += grids
        return out

    def _sample_grids(
        self, ids: list[int], image_id: int, markers: dict[int, tuple[int, int] | None]
    ) -> tuple[list[torch.Tensor], int]:
        """One sample's image grids and its number of image-token runs (views)."""
        out: list[torch.Tensor] = []
        tiles: list[tuple[int, int]] = []
        cur: tuple[int, int] | str | None = "none"
        run = views = 0
        for t in [*ids, -1]:
            if t == image_id:
                run += 1
                continue
            if run:
                views += 1
                g = math.isqrt(run)
                if cur is None:  # global view closes an image
                    out.append(self._image_cells(tiles, g))
                    tiles = []
                elif isinstance(cur, tuple):
                    tiles.append(cur)
                run = 0
            if t in markers:
                cur = markers[t]
        return out, views

    def vision_views(self, inputs: Mapping[str, Any]) -> list[VisionView]:
        """Per image, in prompt order: its tiles (view 1 at their marker's row and column),
        then its global view (0), as the real views of pixel_values reach the encoder."""
        image_id = self.image_token_ids()[0]
        markers = self._markers()
        views: list[VisionView] = []
        image = 0
        for ids in inputs["input_ids"].tolist():
            tiles: list[tuple[int, int]] = []
            cur: tuple[int, int] | str | None = "none"
            run = 0
            for t in [*ids, -1]:
                if t == image_id:
                    run += 1
                    continue
                if run:
                    if cur is None:  # the global view closes an image
                        views += [(image, 1, r, c) for r, c in tiles] + [(image, 0, 0, 0)]
                        image, tiles = image + 1, []
                    elif isinstance(cur, tuple):
                        tiles.append(cur)
                    run = 0
                if t in markers:
                    cur = markers[t]
        return views

    @staticmethod
    def _image_cells(tiles: list[tuple[int, int]], g: int) -> torch.Tensor:
        """Tiles as view 1 on one stitched (rows*g, cols*g) grid, then the global view 0."""
        parts = []
        for r, c in tiles:
            cells = grid_cells(g, g, view=1)
            cells[:, 1] += r * g
            cells[:, 2] += c * g
            parts.append(cells)
        parts.append(grid_cells(g, g, view=0))
        return torch.cat(parts)


@register_adapter
class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_types = ("smolvlm",)
    architectures = ("SmolVLMForConditionalGeneration",)
