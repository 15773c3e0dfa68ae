"""InternVL 2.5 / 3: InternViT tiles, pixel shuffle, one run of context tokens per image.

The processor crops an image into up to `max_patches` tiles (row-major) and, when it made more
than one, appends a thumbnail of the whole image; every tile becomes `image_seq_length` tokens
(a g x g grid after the pixel shuffle), all between one `<img>` and `</img>`. The crop grid's
shape is not in the model inputs, so tiles are separate views 1..n in processor order and the
thumbnail is view 0 (a single-tile image is view 0 alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import TileRunViews
from vlmscope.models.adapters.llava import grid_cells
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter


def image_token_runs(input_ids: torch.Tensor, image_ids: tuple[int, ...]) -> list[int]:
    """Lengths of the unbroken runs of image tokens, sample by sample, in sequence order."""
    is_image = torch.isin(input_ids.cpu(), torch.tensor(image_ids, dtype=input_ids.dtype))
    runs: list[int] = []
    for row in is_image.tolist():
        n = 0
        for x in [*row, False]:
            if x:
                n += 1
            elif n:
                runs.append(n)
                n = 0
    return runs


@register_adapter
class InternVLAdapter(TileRunViews):
    family = "internvl"
    model_types = ("internvl",)
    architectures = ("InternVLForConditionalGeneration",)
    vision_blocks = "model.vision_tower.encoder.layer"
    projector = "model.multi_modal_projector"

    def vision_mlp_out_scale(self, i: int) -> torch.Tensor | None:
        """InternViT's layer scale: a block adds lambda_2 * mlp(x) to its stream."""
        blocks = self.vision_block_list()
        assert blocks is not None
        return getattr(blocks[i], "lambda_2", None)  # type: ignore[index]

    def tile_grid(self) -> int:
        """Side of one tile's token grid: (image size / patch size) x downsample ratio."""
        vc = self.config.vision_config
        side = int(vc.image_size[0]) // int(vc.patch_size[0])
        return int(side * float(self.config.downsample_ratio))

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        g = self.tile_grid()
        runs = image_token_runs(inputs["input_ids"], self.image_token_ids())
        tiles = [n // (g * g) for n in runs]
        n_tiles = int(inputs["pixel_values"].shape[0])
        if any(n % (g * g) for n in runs) or sum(tiles) != n_tiles:
            raise ImageTokenMismatchError(
                f"the prompts' image placeholders make {len(runs)} image(s) of {runs} tokens, "
                f"i.e. {sum(tiles)} tiles of {g * g} tokens, but pixel_values holds {n_tiles} "
                "tiles; the images passed and the placeholders disagree"
            )
        out = []
        for t in tiles:
            if t == 1:
                out.append(grid_cells(g, g))
            else:  # crops first (views 1..t-1), the thumbnail last (view 0)
                out.append(torch.cat([*(grid_cells(g, g, view=v) for v in range(1, t)),
                                      grid_cells(g, g)]))  # fmt: skip
        return out
