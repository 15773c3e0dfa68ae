"""LLaVA-1.5: CLIP vision tower, MLP projector, Llama (or other) decoder; one grid per image."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, ModelAdapter
from vlmscope.models.masks import ImageTokenMismatchError, check_images_per_sample
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


def image_sizes(inputs: Mapping[str, Any]) -> list[list[int]]:
    """`image_sizes` rows, checked to be one per image of pixel_values ([images, tiles, ...])."""
    sizes = inputs["image_sizes"].tolist()
    n = inputs["pixel_values"].shape[0]
    if len(sizes) != n:
        raise ImageTokenMismatchError(
            f"image_sizes has {len(sizes)} rows but pixel_values holds {n} images; give one "
            "size per image, as the processor does"
        )
    return sizes


def anyres_cells(
    image_size: tuple[int, int],
    pinpoints: list[list[int]],
    tile: int,
    grid: int,
    max_patches: int | None = None,
) -> torch.Tensor:
    """Base view (grid x grid) then the unpadded high-resolution view with a newline token
    after each row, as LLaVA-NeXT / OneVision pack an "anyres" image."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    rows, cols = get_anyres_image_grid_shape(image_size, pinpoints, tile)
    h, w = unpad_image(torch.zeros(1, rows * grid, cols * grid), image_size).shape[1:]
    if max_patches is not None:
        ratio = math.sqrt(h * w / (max_patches * grid**2))
        if ratio > 1.1:  # OneVision shrinks large grids by interpolation
            h, w = int(h // ratio), int(w // ratio)
    return torch.cat([grid_cells(grid, grid), grid_cells(int(h), int(w), view=1, newline=True)])


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    architectures = ("LlavaNextForConditionalGeneration",)
    capabilities = Capabilities(contiguous_image_tokens=True)

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        vc = self.config.vision_config
        g = int(vc.image_size) // int(vc.patch_size)
        return [
            anyres_cells((int(h), int(w)), self.config.image_grid_pinpoints, int(vc.image_size), g)
            for h, w in image_sizes(inputs)
        ]


@register_adapter
class LlavaOnevisionAdapter(LlavaAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    architectures = ("LlavaOnevisionForConditionalGeneration",)

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        vc = self.config.vision_config
        g = int(vc.image_size) // int(vc.patch_size)
        max_patches = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        sizes = image_sizes(inputs)
        per_sample = inputs.get("batch_num_images")
        if per_sample is not None:
            check_images_per_sample(per_sample.tolist(), len(sizes), "batch_num_images")
        # Samples with several images keep only the base view plus one newline token.
        tiled = (
            [n == 1 for n in per_sample.tolist() for _ in range(n)]
            if per_sample is not None
            else [True] * len(sizes)
        )
        out = []
        for (h, w), t in zip(sizes, tiled, strict=True):
            if t:
                out.append(anyres_cells((int(h), int(w)), self.config.image_grid_pinpoints,
                                        int(vc.image_size), g, max_patches))  # fmt: skip
            else:
                out.append(torch.cat([grid_cells(g, g), non_grid_cells(1)]))
        return out
