"""Aya Vision: SigLIP tiles and a global view, Cohere2 decoder with parallel blocks.

Cohere2 layers are parallel: `input_layernorm` feeds attention and the MLP alike and both add
to the layer's input, so hook_resid_mid (the stream the MLP reads) is the layer's input and a
CLT's layer-l encoder reads what attention of layer l reads too; attention's output of layer
l reaches dictionaries from layer l+1 on. RoPE applies on sliding-window layers only.

An image is `<|START_OF_IMG|>`, per tile `TILE_k` and one run of patch tokens, `TILE_GLOBAL`
and the global view's run, `<|END_OF_IMG|>`. The crop grid's shape is not in the inputs, so
tiles are views 1..n in processor order and the global view is view 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, LayerMap, TileRunViews
from vlmscope.models.adapters.llava import grid_cells
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter

PARALLEL_LAYER = LayerMap(mlp_in_norm="input_layernorm")


def tiles_then_global(tiles: int, g: int) -> torch.Tensor:
    """Views 1..tiles-1 (crops, in order) then view 0 (the whole image), each g x g; a
    single-tile image is view 0 alone."""
    if tiles == 1:
        return grid_cells(g, g)
    return torch.cat([*(grid_cells(g, g, view=v) for v in range(1, tiles)), grid_cells(g, g)])


@register_adapter
class AyaVisionAdapter(TileRunViews):
    family = "aya_vision"
    model_types = ("aya_vision",)
    architectures = ("AyaVisionForConditionalGeneration",)
    vision_blocks = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"
    layer_map = PARALLEL_LAYER
    capabilities = Capabilities(
        contiguous_image_tokens=False, sliding_window=True, parallel_block=True
    )
    #: Cohere's LayerNorm centres and scales (weight only): frozen as a LayerNorm.
    centred_norms = ("Cohere2LayerNorm",)
    start_token = "<|START_OF_IMG|>"
    end_token = "<|END_OF_IMG|>"

    def apply_rope(
        self, i: int, q: torch.Tensor, k: torch.Tensor, position_embeddings: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cohere2 rotates q and k on sliding-window layers only; global layers use none."""
        if self.sliding_window(i) is None:
            return q, k
        return super().apply_rope(i, q, k, position_embeddings)

    def tile_grid(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size) // int(self.config.downsample_factor)

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Per image, its runs of patch tokens between the start and end markers: one run
        per tile plus the global view's."""
        g = self.tile_grid()
        tok = self.tokenizer
        start, end = (
            tok.convert_tokens_to_ids(self.start_token),
            tok.convert_tokens_to_ids(self.end_token),
        )
        patch = self.image_token_ids()[0]
        out: list[torch.Tensor] = []
        runs_total = 0
        for b, row in enumerate(inputs["input_ids"].tolist()):
            runs: list[int] | None = None
            n = 0
            for t in row:
                if t == patch:
                    n += 1
                    continue
                if n and runs is not None:
                    runs.append(n)
                n = 0
                if t == start:
                    runs = []
                elif t == end and runs is not None:
                    if any(r != g * g for r in runs) or not runs:
                        raise ImageTokenMismatchError(
                            f"sample {b}: an image's patch runs are {runs} tokens long, "
                            f"expected runs of {g * g} (one per tile and the global view)"
                        )
                    out.append(tiles_then_global(len(runs), g))
                    runs_total += len(runs)
                    runs = None
        n_tiles = int(inputs["pixel_values"].shape[0])
        if runs_total != n_tiles:
            raise ImageTokenMismatchError(
                f"the prompts' image markers hold {runs_total} tile(s) but pixel_values holds "
                f"{n_tiles}; the images passed and the placeholders disagree"
            )
        return out
