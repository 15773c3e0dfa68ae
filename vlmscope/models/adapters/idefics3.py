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
from vlmscope.models.registry import register_adapter

_ROW_COL = re.compile(r"<row_(\d+)_col_(\d+)>")


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
        image_id = self.image_token_ids()[0]
        markers = self._markers()
        out: list[torch.Tensor] = []
        for ids in inputs["input_ids"].tolist():
            tiles: list[tuple[int, int]] = []
            cur: tuple[int, int] | str | None = "none"
            run = 0
            for t in [*ids, -1]:
                if t == image_id:
                    run += 1
                    continue
                if run:
                    g = math.isqrt(run)
                    if cur is None:  # global view closes an image
                        out.append(self._image_cells(tiles, g))
                        tiles = []
                    elif isinstance(cur, tuple):
                        tiles.append(cur)
                    run = 0
                if t in markers:
                    cur = markers[t]
        return out

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
