"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: ViT with 2x2 patch merger, M-RoPE decoder.

M-RoPE needs no special handling here: the rotary module mixes the (t, h, w) sections into
cos/sin, and attention applies them with the plain rotate-half function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, LayerMap, ModelAdapter
from vlmscope.models.adapters.llava import grid_cells
from vlmscope.models.registry import register_adapter


class QwenVLAdapter(ModelAdapter):
    """Shared layout: each image is one row-major grid of merged patches per frame."""

    vision_blocks = "model.visual.blocks"
    projector = "model.visual.merger"
    positions_from_padding = False

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        m = int(self.config.vision_config.spatial_merge_size)
        out = []
        for t, h, w in inputs["image_grid_thw"].tolist():
            frames = [grid_cells(h // m, w // m, view=f) for f in range(t)]
            out.append(torch.cat(frames))
        return out


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    architectures = ("Qwen2VLForConditionalGeneration",)


@register_adapter
class Qwen2_5VLAdapter(QwenVLAdapter):
    """Vision blocks run in window-permuted token order; hooks there see that order."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    architectures = ("Qwen2_5_VLForConditionalGeneration",)


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """DeepStack adds vision features to image positions after the first layers, outside the
    decoder layers: resid_post[i] and resid_pre[i+1] differ there."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    architectures = ("Qwen3VLForConditionalGeneration",)
    layer_map = LayerMap(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    capabilities = Capabilities(strict_residual_stream=False)
