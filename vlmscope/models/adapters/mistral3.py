"""Mistral 3 (Pixtral vision): each image at its own aspect ratio, one token per merged patch.

The processor writes an image as rows of `[IMG]` tokens, each row closed by `[IMG_BREAK]` (the
last by `[IMG_END]`). Only `[IMG]` positions hold image features; the markers are ordinary
embedded tokens (special in the masks), so an image's tokens are not one unbroken run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, ModelAdapter
from vlmscope.models.adapters.llava import grid_cells, image_sizes
from vlmscope.models.registry import register_adapter


@register_adapter
class Mistral3Adapter(ModelAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    architectures = ("Mistral3ForConditionalGeneration",)
    vision_blocks = "model.vision_tower.transformer.layers"
    projector = "model.multi_modal_projector"
    capabilities = Capabilities(contiguous_image_tokens=False)

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """One (rows x cols) grid per image; `image_sizes` holds each image's size after the
        processor resized it to a multiple of patch x merge pixels."""
        step = int(self.config.vision_config.patch_size) * int(self.config.spatial_merge_size)
        return [grid_cells(int(h) // step, int(w) // step) for h, w in image_sizes(inputs)]
