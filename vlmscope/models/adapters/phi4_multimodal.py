"""Phi-4-multimodal: SigLIP crops pooled 2x2, Phi decoder with fused projections.

Attention projects q, k and v with one `qkv_proj` (hook_q / hook_k / hook_v are its slices)
and the MLP gate and up with one `gate_up_proj`. Images arrive as `image_pixel_values`
[images, 1 + crops, 3, s, s] (global view first). In the sequence an image is its crops
stitched into one grid (view 1) with a newline token closing each row, one separator, then the
global view's grid (view 0) with its newlines; the crops' useful rows and columns come from
`image_attention_mask`, as the model computes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.models.adapter import Capabilities, LayerMap, ModelAdapter
from vlmscope.models.adapters.llava import grid_cells, non_grid_cells
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter
from vlmscope.models.vision import VisionLayoutError


@register_adapter
class Phi4MultimodalAdapter(ModelAdapter):
    family = "phi4_multimodal"
    model_types = ("phi4_multimodal",)
    architectures = ("Phi4MultimodalForCausalLM",)
    language_model = "model"
    vision_blocks = "model.embed_tokens_extend.image_embed.img_processor.encoder.layers"
    projector = "model.embed_tokens_extend.image_embed.img_projection_down"
    layer_map = LayerMap(
        qkv="self_attn.qkv_proj",
        mlp_projections={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
    )
    capabilities = Capabilities()
    pixel_keys = ("image_pixel_values",)

    def image_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.vision_config.image_token_id),)

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        vc = self.config.vision_config
        crop = int(vc.crop_size)
        m = int(vc.image_size) // int(vc.patch_size)
        half = m // 2 + m % 2  # pooled cells per crop side
        sizes = inputs["image_sizes"].reshape(-1, 2).tolist()
        masks = inputs["image_attention_mask"]
        if len(sizes) != int(inputs["image_pixel_values"].shape[0]):
            raise ImageTokenMismatchError(
                f"image_sizes has {len(sizes)} rows but image_pixel_values holds "
                f"{int(inputs['image_pixel_values'].shape[0])} images"
            )
        out = []
        for k, (h, w) in enumerate(sizes):
            rows, cols = int(h) // crop, int(w) // crop
            used = masks[k, 1 : rows * cols + 1, 0::2, 0::2]
            used = used.reshape(rows, cols, half, half).transpose(1, 2)
            used = used.reshape(rows * half, cols * half)
            uh, uw = int(used[:, 0].sum()), int(used[0, :].sum())
            out.append(torch.cat([
                grid_cells(uh, uw, view=1, newline=True),
                non_grid_cells(1),  # separator between the crops and the global view
                grid_cells(half, half, view=0, newline=True),
            ]))  # fmt: skip
        return out

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Rows of the vision blocks, [images x (1 + crops), g*g]: per image the global view
        (view 0), then its crops stitched row-major into view 1; patches that
        `image_attention_mask` marks as padding, and crops past the image's own, are -2.
        The projector runs once per image over its token sequence (`_projector_layout`)."""
        if not name.startswith("vision."):
            return self._projector_layout(inputs, name, shape)
        pv, mask = inputs["image_pixel_values"], inputs["image_attention_mask"]
        n_img, n_views = int(pv.shape[0]), int(pv.shape[1])
        side = int(mask.shape[-1])
        if tuple(int(n) for n in shape) != (n_img * n_views, side * side):
            raise VisionLayoutError(
                f"{name}: activation of shape {list(shape)} (width left out) is not "
                f"[{n_img} images x {n_views} views, {side * side} patches]"
            )
        crop = int(self.config.vision_config.crop_size)
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        out = []
        for k, (h, w) in enumerate(inputs["image_sizes"].reshape(-1, 2).tolist()):
            rows, cols = int(h) // crop, int(w) // crop
            for j in range(n_views):
                cells = torch.full((side * side, 4), -2, dtype=torch.long)
                cells[:, 0], cells[:, 1] = k, min(j, 1)
                if j <= rows * cols:
                    tr, tc = divmod(j - 1, cols) if j else (0, 0)
                    used = mask[k, j].reshape(-1).bool().cpu()
                    cells[used, 2] = (r + tr * side)[used]
                    cells[used, 3] = (c + tc * side)[used]
                out.append(cells)
        return torch.cat(out)

    def _projector_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Rows of the projector, every image's token sequence in order (crops with a newline
        row closing each grid row, a separator, the global view with its newlines), as
        `run_with_cache` joins its once-per-image firings; each row's (view, row, col) is its
        token's in `TokenMasks.patch_map` (a newline: col -1; the separator: -1, -1). One
        firing alone, as a hook function sees it, cannot be told apart from another image's of
        the same size, so it is refused (unless the batch has one image)."""
        grids = self.image_token_grids(inputs)
        per_image = [len(g) for g in grids]
        n = math.prod(shape)
        if n != sum(per_image):
            raise VisionLayoutError(
                f"{name}: activation of shape {list(shape)} (width left out) does not hold the "
                f"{sum(per_image)} projector rows of the batch's {len(grids)} image(s) "
                f"({per_image} each): Phi-4-multimodal runs its projector once per image, and "
                "only all of them together are laid out (run_with_cache and training join "
                "them); a hook that edits one firing at a time needs one image per batch"
            )
        out = [
            torch.cat([torch.full((len(cells), 1), k, dtype=torch.long), cells.long()], dim=1)
            for k, cells in enumerate(grids)
        ]
        return torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.long)
