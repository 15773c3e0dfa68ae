"""LLaVA-1.5: CLIP vision tower, MLP projector, Llama (or other) decoder; one grid per image."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, ModelAdapter
from vlmscope.models.masks import ImageTokenMismatchError, check_images_per_sample
from vlmscope.models.registry import register_adapter
from vlmscope.models.vision import VisionView


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


def anyres_views(
    image: int, size: tuple[int, int], pinpoints: list[list[int]], tile: int, tiled: bool = True
) -> list[VisionView]:
    """Encoder views of one "anyres" image: the base view, then its tiles row-major (tile t
    at (t // cols, t % cols) of the high-resolution grid), as LLaVA-NeXT feeds its tower."""
    if not tiled:
        return [(image, 0, 0, 0)]
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    rows, cols = get_anyres_image_grid_shape(size, pinpoints, tile)
    n = image_size_to_num_patches(size, pinpoints, tile) - 1
    if n != rows * cols:
        raise ImageTokenMismatchError(
            f"image {image}: {n} tiles for a {rows}x{cols} high-resolution grid"
        )
    return [(image, 0, 0, 0)] + [(image, 1, t // cols, t % cols) for t in range(n)]


def unpad_tiles(
    cells: torch.Tensor, sizes: list[list[int]], pinpoints: list[list[int]], tile: int
) -> torch.Tensor:
    """Tile cells (view 1) moved to the unpadded high-resolution grid the language model
    sees (transformers' `unpad_image`); patches of the padding around the image get row =
    col = -2: they hold no image."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    cells = cells.clone()
    tiles = cells[:, 1] == 1
    if not bool(tiles.any()):
        return cells
    for i, (h, w) in enumerate(sizes):
        on = tiles & (cells[:, 0] == i) & (cells[:, 2] >= 0)
        if not bool(on.any()):
            continue
        rows, cols = get_anyres_image_grid_shape((int(h), int(w)), pinpoints, tile)
        g = (int(cells[on, 2].max()) + 1) // rows  # one tile's grid side
        height, width = rows * g, cols * g
        index = torch.arange(height * width).reshape(1, height, width)
        kept = unpad_image(index, (int(h), int(w)))
        top, left = divmod(int(kept[0, 0, 0]), width)
        r, c = cells[on, 2] - top, cells[on, 3] - left
        inside = (r >= 0) & (r < kept.shape[1]) & (c >= 0) & (c < kept.shape[2])
        cells[on, 2] = torch.where(inside, r, -2)
        cells[on, 3] = torch.where(inside, c, -2)
    return cells


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

    def vision_views(self, inputs: Mapping[str, Any]) -> list[VisionView]:
        tile = int(self.config.vision_config.image_size)
        pins = self.config.image_grid_pinpoints
        return [
            v
            for i, (h, w) in enumerate(image_sizes(inputs))
            for v in anyres_views(i, (int(h), int(w)), pins, tile)
        ]

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        cells = super().vision_layout(inputs, name, shape)
        tile = int(self.config.vision_config.image_size)
        return unpad_tiles(cells, image_sizes(inputs), self.config.image_grid_pinpoints, tile)


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

    def vision_views(self, inputs: Mapping[str, Any]) -> list[VisionView]:
        tile = int(self.config.vision_config.image_size)
        pins = self.config.image_grid_pinpoints
        per_sample = inputs.get("batch_num_images")
        sizes = image_sizes(inputs)
        # As the model does: a sample with several images feeds only their base views.
        tiled = (
            [n == 1 for n in per_sample.tolist() for _ in range(n)]
            if per_sample is not None
            else [True] * len(sizes)
        )
        return [
            v
            for i, ((h, w), t) in enumerate(zip(sizes, tiled, strict=True))
            for v in anyres_views(i, (int(h), int(w)), pins, tile, t)
        ]

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Tiles on the unpadded grid, as for LLaVA-NeXT; OneVision may then shrink a large
        grid by interpolation before the language model, which these cells do not follow."""
        cells = super().vision_layout(inputs, name, shape)
        tile = int(self.config.vision_config.image_size)
        return unpad_tiles(cells, image_sizes(inputs), self.config.image_grid_pinpoints, tile)
