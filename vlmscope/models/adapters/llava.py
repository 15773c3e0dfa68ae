"""LLaVA-1.5: CLIP vision tower, MLP projector, Llama (or other) decoder; one grid per image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import ModelAdapter
from vlmscope.models.registry import register_adapter


def grid_cells(rows: int, cols: int, view: int = 0, newline: bool = False) -> torch.Tensor:
    """(view, row, col) for a row-major grid; with `newline`, a (row, -1) token ends each row."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    cells = torch.stack([torch.full_like(r, view), r, c], dim=-1)
    if newline:
        nl = torch.stack(
            [torch.full((rows,), view), torch.arange(rows), torch.full((rows,), -1)], -1
        )
        cells = torch.cat([cells, nl[:, None, :]], dim=1)
    return cells.reshape(-1, 3)


def non_grid_cells(n: int, view: int = 0) -> torch.Tensor:
    """(view, -1, -1) for image tokens that are not grid cells (e.g. a CLS token)."""
    return torch.tensor([[view, -1, -1]] * n, dtype=torch.long).reshape(n, 3)


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    architectures = ("LlavaForConditionalGeneration",)
    vision_blocks = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        pv = inputs["pixel_values"]
        patch = int(self.config.vision_config.patch_size)
        rows, cols = pv.shape[-2] // patch, pv.shape[-1] // patch
        cells = grid_cells(rows, cols)
        if self.config.vision_feature_select_strategy == "full":
            cells = torch.cat([non_grid_cells(1), cells])
        return [cells] * pv.shape[0]
