"""Mllama (Llama 3.2 Vision): images enter through gated cross-attention layers, not tokens.

The prompt holds one `<|image|>` marker per image; the masks mark it as the image's token (a
cell outside any grid). The image itself is the projected vision features every
cross-attention layer reads: per sample, images x tiles x (1 + g*g) vectors, each tile's CLS
first, then its g x g patches row by row. `vision_token_grid` lays those out as (image, tile,
row, col), the patch map of attribution's image-patch nodes.

Cross-attention layers have `cross_attn` (q from the text, k and v from the vision features,
per-head q/k norms, no RoPE, no causal mask: the base adapter's cross-attention scores) and
tanh gates: attn.hook_out and mlp.hook_out
there are the modules' outputs before the gates (and before the mask that zeroes the MLP for
text rows that see no image); the layer adds gate * output. Without images the model skips
these layers, and their hooks do not fire. hook_k / hook_v of a cross-attention layer are over
the vision features as k_proj sees them: [batch x images x tiles, 1 + g*g, kv_heads, d_head].

Batches: transformers gives a text row that sees no image (tokens before a sample's first
`<|image|>`) a cross-attention mask of zeros, i.e. uniform attention over every vision feature
of the sample's image slots, padding slots included; only its MLP update is zeroed. When a
batch pads a sample's image slots (it has fewer images than another sample), those rows, and
through self-attention every later row, differ from the sample run alone. Samples with as many
images as the batch's widest are unaffected; attribution runs one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlmscope.models.adapter import Capabilities, LayerMap, ModelAdapter
from vlmscope.models.adapters.llava import non_grid_cells
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter
from vlmscope.models.vision import VisionLayoutError

CROSS_LAYER = LayerMap(
    attn="cross_attn",
    q="cross_attn.q_proj",
    k="cross_attn.k_proj",
    v="cross_attn.v_proj",
    o="cross_attn.o_proj",
    q_norm="cross_attn.q_norm",
    k_norm="cross_attn.k_norm",
    attn_out="cross_attn.o_proj",
)


@register_adapter
class MllamaAdapter(ModelAdapter):
    family = "mllama"
    model_types = ("mllama",)
    architectures = ("MllamaForConditionalGeneration",)
    vision_blocks = "model.vision_model.transformer.layers"
    projector = "model.multi_modal_projector"
    capabilities = Capabilities(patch_grid=False, cross_attention=True)

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        self.cross_layers = frozenset(self.text_config.cross_attention_layers or ())

    def layer_map_of(self, i: int) -> LayerMap:
        return CROSS_LAYER if i in self.cross_layers else self.layer_map

    def skippable_blocks(self) -> frozenset[int]:
        return self.cross_layers

    def image_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.image_token_index),)

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """One marker token per image, outside any grid: the image's patches are not in the
        sequence (see `vision_token_grid`). Checks each sample's markers against its images."""
        ids = inputs["input_ids"]
        markers = (ids == self.image_token_ids()[0]).sum(1).tolist()
        real = self.images_per_sample(inputs)
        for b, (m, r) in enumerate(zip(markers, real, strict=True)):
            if m != r:
                raise ImageTokenMismatchError(
                    f"sample {b} has {m} <|image|> marker(s) but {r} image(s) in pixel_values; "
                    "the prompt's image placeholders and the images passed disagree"
                )
        return [non_grid_cells(1) for _ in range(sum(markers))]

    @staticmethod
    def images_per_sample(inputs: Mapping[str, Any]) -> list[int]:
        """Real images per sample: padding image slots have aspect ratio id 0."""
        return (inputs["aspect_ratio_ids"] > 0).sum(1).tolist()

    def tile_grid(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def vision_token_grid(self, inputs: Mapping[str, Any], sample: int) -> torch.Tensor:
        """(image, tile, row, col) of every vision feature of `sample` that cross-attention
        reads, in their order: [images x tiles x (1 + g*g), 4]. CLS tokens, padding tiles and
        padding images get -1 in every field but the first ones they do belong to."""
        g = self.tile_grid()
        pv = inputs["pixel_values"]
        n_img, n_tiles = int(pv.shape[1]), int(pv.shape[2])
        tiles_used = inputs["aspect_ratio_mask"][sample].long()  # [images, tiles] 1 = real tile
        real_images = self.images_per_sample(inputs)[sample]
        rows = []
        for k in range(n_img):
            for t in range(n_tiles):
                cells = torch.full((1 + g * g, 4), -1, dtype=torch.long)
                if k < real_images and bool(tiles_used[k, t]):
                    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
                    cells[:, 0], cells[:, 1] = k, t
                    cells[0, 2:] = -1  # the tile's CLS token
                    cells[1:, 2], cells[1:, 3] = r.reshape(-1), c.reshape(-1)
                rows.append(cells)
        return torch.cat(rows)

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """(image, tile, row, col) of every row of a vision hook: per sample, image slot and
        tile, its CLS row (-1), its g x g patches, then the rows the encoder pads each tile
        with (vision blocks only: to a multiple of 8) and every row of a padding tile or image
        slot (-2; image -1 for a padding slot). Images are numbered over the batch."""
        g = self.tile_grid()
        p = 1 + g * g
        pv = inputs["pixel_values"]
        n_b, n_img, n_tiles = (int(n) for n in pv.shape[:3])
        total = int(torch.Size(shape).numel())
        per = total // max(1, n_b * n_img * n_tiles)
        if per < p or per * n_b * n_img * n_tiles != total:
            raise VisionLayoutError(
                f"{name}: activation of shape {list(shape)} (width left out) does not hold "
                f"{n_b} x {n_img} x {n_tiles} tiles of at least {p} rows"
            )
        real = self.images_per_sample(inputs)
        used = inputs["aspect_ratio_mask"]
        r = torch.arange(g * g)
        out, image = [], 0
        for b in range(n_b):
            for k in range(n_img):
                for t in range(n_tiles):
                    cells = torch.full((per, 4), -2, dtype=torch.long)
                    cells[:, 0], cells[:, 1] = (image if k < real[b] else -1), t
                    if k < real[b] and bool(used[b, k, t]):
                        cells[0, 2:] = -1  # the tile's CLS token
                        cells[1:p, 2], cells[1:p, 3] = r // g, r % g
                    out.append(cells)
                image += int(k < real[b])
        return torch.cat(out)
