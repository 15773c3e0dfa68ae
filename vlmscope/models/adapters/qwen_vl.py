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
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter
from vlmscope.models.vision import VisionLayoutError


class QwenVLAdapter(ModelAdapter):
    """Shared layout: each image is one row-major grid of merged patches per frame."""

    vision_blocks = "model.visual.blocks"
    projector = "model.visual.merger"
    positions_from_padding = False

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        if inputs.get("pixel_values_videos") is not None or "video_grid_thw" in inputs:
            # Their <|video_pad|> tokens would be neither image nor text in the masks, and the
            # tower's second run (the videos) has no layout here: say so, not KeyError.
            raise ImageTokenMismatchError(
                f"{self.family}: video inputs (pixel_values_videos) are not supported yet; "
                "pass a video's frames as images"
            )
        m = int(self.config.vision_config.spatial_merge_size)
        out = []
        for t, h, w in inputs["image_grid_thw"].tolist():
            frames = [grid_cells(h // m, w // m, view=f) for f in range(t)]
            out.append(torch.cat(frames))
        return out

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Flat rows: per image and frame (view), the merge groups of the merged grid in
        row-major order, and inside the tower each group's m x m patches; the projector's
        output has one row per group."""
        m = int(self.config.vision_config.spatial_merge_size)
        merged = name.startswith("projector.")
        parts = []
        for i, (t, h, w) in enumerate(inputs["image_grid_thw"].tolist()):
            f, hb, wb = torch.meshgrid(
                torch.arange(t), torch.arange(h // m), torch.arange(w // m), indexing="ij"
            )
            groups = torch.stack([torch.full_like(f, i), f, hb, wb], -1).reshape(-1, 1, 4)
            if not merged:
                mr, mc = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
                inner = torch.stack([mr, mc], -1).reshape(1, m * m, 2)
                groups = groups.expand(-1, m * m, 4).clone()
                groups[..., 2:] = groups[..., 2:] * m + inner
            parts.append(groups)
        cells = torch.cat(parts) if parts else torch.zeros(0, 1, 4, dtype=torch.long)
        order = self._window_order(inputs)
        if order is not None:
            cells = cells[order]
        cells = cells.reshape(-1, 4)
        if len(shape) != 1 or shape[0] != len(cells):
            raise VisionLayoutError(
                f"{name}: activation of shape {list(shape)} (width left out), but the images' "
                f"grids (image_grid_thw) give {len(cells)} rows"
            )
        return cells

    def _window_order(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """The order of merge groups inside the tower, where it is not the images' own."""
        return None


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

    def _window_order(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Window attention permutes the merge groups inside the tower (and the projector's
        output, which the model un-permutes afterwards): the window index of transformers."""
        from transformers.vision_utils import get_vision_window_index

        vc = self.config.vision_config
        index, _ = get_vision_window_index(
            inputs["image_grid_thw"].cpu(),
            spatial_merge_size=int(vc.spatial_merge_size),
            window_size=int(vc.window_size),
            patch_size=int(vc.patch_size),
        )
        return index


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """DeepStack adds vision features to image positions after the first layers, outside the
    decoder layers: resid_post[i] and resid_pre[i+1] differ there."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    architectures = ("Qwen3VLForConditionalGeneration",)
    layer_map = LayerMap(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    capabilities = Capabilities(strict_residual_stream=False)
