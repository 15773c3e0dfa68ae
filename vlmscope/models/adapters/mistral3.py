"""Mistral 3 (Pixtral vision): each image at its own aspect ratio, one token per merged patch.

The processor writes an image as rows of `[IMG]` tokens, each row closed by `[IMG_BREAK]` (the
last by `[IMG_END]`). Only `[IMG]` positions hold image features; the markers are ordinary
embedded tokens (special in the masks), so an image's tokens are not one unbroken run.

Vision hooks: Pixtral runs every image's patches as one flat sequence (its own h x w grid per
image, row-major, images one after another, no CLS), and the projector's patch merger turns
each image's grid into (h / m) x (w / m) merged rows, again row-major: the tokens' grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, ModelAdapter
from vlmscope.models.adapters.llava import grid_cells, image_sizes
from vlmscope.models.registry import register_adapter
from vlmscope.models.vision import VisionLayoutError


@register_adapter
class Mistral3Adapter(ModelAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    architectures = ("Mistral3ForConditionalGeneration",)
    vision_blocks = "model.vision_tower.transformer.layers"
    projector = "model.multi_modal_projector"
    vision_mlp = "feed_forward"
    capabilities = Capabilities(contiguous_image_tokens=False)

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """One (rows x cols) grid per image; `image_sizes` holds each image's size after the
        processor resized it to a multiple of patch x merge pixels."""
        step = int(self.config.vision_config.patch_size) * int(self.config.spatial_merge_size)
        return [grid_cells(int(h) // step, int(w) // step) for h, w in image_sizes(inputs)]

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """(image, 0, row, col) of every flat vision row: each image's patch grid (or, after
        the projector, its merged grid) row by row, images in order."""
        patch = int(self.config.vision_config.patch_size)
        step = patch * (int(self.config.spatial_merge_size) if name.startswith("projector.") else 1)
        cells = []
        for i, (h, w) in enumerate(image_sizes(inputs)):
            g = grid_cells(int(h) // step, int(w) // step)
            cells.append(torch.cat([torch.full((len(g), 1), i, dtype=torch.long), g], 1))
        out = torch.cat(cells) if cells else torch.zeros(0, 4, dtype=torch.long)
        if len(out) != int(torch.Size(shape).numel()):
            raise VisionLayoutError(
                f"{name}: activation of shape {list(shape)} (width left out) does not hold the "
                f"{len(out)} patches the images' sizes give"
            )
        return out
