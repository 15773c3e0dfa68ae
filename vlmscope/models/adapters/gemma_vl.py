"""PaliGemma and Gemma 3: SigLIP tower, one square grid of tokens per image, Gemma decoder.

PaliGemma attends bidirectionally over its prefix and Gemma 3 within each image's block; both
reach attention as an explicit mask, which the pattern recomputation applies as given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlmscope.models.adapter import GEMMA_LAYER, Capabilities, LayerMap, ModelAdapter
from vlmscope.models.adapters.llava import grid_cells
from vlmscope.models.registry import register_adapter


def square_grid(n_tokens: int, n_images: int) -> list[torch.Tensor]:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} tokens per image do not form a square grid")
    return [grid_cells(side, side)] * n_images


@register_adapter
class PaliGemmaAdapter(ModelAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    architectures = ("PaliGemmaForConditionalGeneration",)
    positions_from_padding = False
    vision_blocks = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        # PaliGemma 1 decodes with Gemma (two norms), PaliGemma 2 with Gemma 2 (four norms).
        layer = self.blocks()[0]
        if hasattr(layer, "pre_feedforward_layernorm"):
            self.layer_map = GEMMA_LAYER  # type: ignore[misc]
            self.capabilities = Capabilities(sliding_window=True, attn_softcap=True)  # type: ignore[misc]

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        n = int(self.text_config.num_image_tokens)
        return square_grid(n, inputs["pixel_values"].shape[0])


@register_adapter
class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    architectures = ("Gemma3ForConditionalGeneration",)
    vision_blocks = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"
    layer_map = LayerMap(
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        attn_out=GEMMA_LAYER.attn_out,
        mlp_in_norm=GEMMA_LAYER.mlp_in_norm,
        mlp_out=GEMMA_LAYER.mlp_out,
    )
    capabilities = Capabilities(sliding_window=True)

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        n = int(self.config.mm_tokens_per_image)
        return square_grid(n, inputs["pixel_values"].shape[0])
