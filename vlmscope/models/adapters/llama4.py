"""Llama 4: tiled ViT with pixel shuffle, and a decoder of mixture-of-experts MLPs.

`feed_forward` is a dense MLP on some layers and a mixture of experts (router, routed experts,
shared expert) on the others: mlp.hook_in / hook_out are the whole block's input and output
either way (the MoE block returns its output flattened to [tokens, d]; hooks see
[batch, pos, d]), so a transcoder or CLT replaces the block, not one expert.

Attention differs per layer: RoPE layers rotate q and k as complex numbers, L2-normalise them
and attend within chunks; NoPE layers skip RoPE and scale queries by a log-position
temperature. An image's tokens are read from its markers: tiles row by row (stitched into one
grid, view 1), then `<|image|>` and the global view (view 0).

transformers 5.24's `Llama4ForConditionalGeneration.forward` builds its output from
`outputs.image_outputs` of its language model, whose output class has no such field: every
call with return_dict=True raises AttributeError. The adapter adds a forward hook on the
language model that gives its output that field (None), so the unmodified forward completes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from vlmscope.models.adapter import (
    AttentionInputs,
    Capabilities,
    LayerMap,
    TileRunViews,
    get_submodule,
)
from vlmscope.models.adapters.llava import grid_cells
from vlmscope.models.masks import ImageTokenMismatchError
from vlmscope.models.registry import register_adapter


def _with_image_outputs(_m: nn.Module, _args: Any, output: Any) -> Any:
    """Give the language model's output the `image_outputs` field its caller reads."""
    if not isinstance(output, tuple) and not hasattr(output, "image_outputs"):
        output.image_outputs = None
    return output


MOE_LAYER = LayerMap(mlp="feed_forward", mlp_out="feed_forward", mlp_projections={})


@register_adapter
class Llama4Adapter(TileRunViews):
    family = "llama4"
    model_types = ("llama4",)
    architectures = ("Llama4ForConditionalGeneration",)
    language_model = "language_model.model"
    lm_head = "language_model.lm_head"
    vision_blocks = "vision_model.model.layers"
    projector = "multi_modal_projector"
    layer_map = MOE_LAYER
    capabilities = Capabilities(contiguous_image_tokens=False, moe_mlp=True)

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        lm = get_submodule(model, "language_model")
        if not getattr(lm, "_vlmscope_image_outputs_hook", False):
            from vlmscope.models.hooked import register_vlmscope_hook

            register_vlmscope_hook(lm, _with_image_outputs)
            lm._vlmscope_image_outputs_hook = True

    markers: ClassVar[dict[str, str]] = {
        "start": "<|image_start|>",
        "end": "<|image_end|>",
        "x": "<|tile_x_separator|>",
        "y": "<|tile_y_separator|>",
        "global": "<|image|>",
    }

    def apply_rope(
        self, i: int, q: torch.Tensor, k: torch.Tensor, position_embeddings: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama 4's complex rotation, on [batch, pos, heads, d] as the model applies it."""
        module = sys.modules[type(self.part(i, "attn")).__module__]
        return module.apply_rotary_emb(q, k, position_embeddings.to(q.device))

    def attention_scores(
        self, i: int, q: torch.Tensor, k: torch.Tensor, ctx: AttentionInputs
    ) -> torch.Tensor:
        attn = self.part(i, "attn")
        if attn.use_rope:
            q, k = self.apply_rope(i, q, k, ctx.position_embeddings)
        if hasattr(attn, "qk_norm"):
            q, k = attn.qk_norm(q), attn.qk_norm(k)
        if attn.attn_temperature_tuning and not attn.use_rope:
            # As the model does: by index in the (padded) sequence, not by position id.
            pos = torch.arange(q.shape[1], device=q.device, dtype=torch.float32)
            scale = torch.log1p(torch.floor((pos + 1.0) / attn.floor_scale)) * attn.attn_scale + 1
            q = q * scale[None, :, None, None]
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        return self._mask_scores(i, scores, ctx.attention_mask, attn)

    def _mask_scores(
        self, i: int, scores: torch.Tensor, mask: Any, attn: nn.Module
    ) -> torch.Tensor:
        scores = super()._mask_scores(i, scores, mask, attn)
        chunk = self.text_config.attention_chunk_size
        if mask is None and chunk and self.text_config.layer_types[i] == "chunked_attention":
            n_q, n_k = scores.shape[-2:]
            qi = torch.arange(n_k - n_q, n_k, device=scores.device)[:, None]
            ki = torch.arange(n_k, device=scores.device)[None, :]
            scores = scores.masked_fill(qi // chunk != ki // chunk, float("-inf"))
        return scores

    def tile_grid(self) -> int:
        vc = self.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return int(side * float(vc.pixel_shuffle_ratio))

    def vision_layout(
        self, inputs: Mapping[str, Any], name: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """As the base layout, except that the vision encoder appends its CLS token to each
        tile (last row, not first); the projector's rows have none."""
        cells = super().vision_layout(inputs, name, shape)
        if name.startswith("vision.") and len(cells):
            per = cells.reshape(len(self.vision_views(inputs)), -1, 4)
            if bool((per[:, 0, 2] == -1).all()):  # base layout put a CLS row first
                cells = torch.cat([per[:, 1:], per[:, :1]], 1).reshape(-1, 4)
        return cells

    def image_token_grids(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Grids read from the markers around each image's patch tokens."""
        g = self.tile_grid()
        ids = {k: self.tokenizer.convert_tokens_to_ids(v) for k, v in self.markers.items()}
        patch = self.image_token_ids()[0]
        out: list[torch.Tensor] = []
        for b, row in enumerate(inputs["input_ids"].tolist()):
            parts: list[torch.Tensor] | None = None
            ty = tx = n = 0
            view = 1
            for t in [*row, -1]:
                if t == patch:
                    n += 1
                    continue
                if n and parts is not None:
                    if n != g * g:
                        raise ImageTokenMismatchError(
                            f"sample {b}: an image tile has {n} patch tokens, expected {g * g}"
                        )
                    cells = grid_cells(g, g, view=view)
                    if view == 1:
                        cells[:, 1] += ty * g
                        cells[:, 2] += tx * g
                    parts.append(cells)
                n = 0
                if t == ids["start"]:
                    parts, ty, tx, view = [], 0, 0, 1
                elif t == ids["x"]:
                    tx += 1
                elif t == ids["y"]:
                    ty, tx = ty + 1, 0
                elif t == ids["global"]:
                    view = 0
                elif t == ids["end"] and parts is not None:
                    out.append(torch.cat(parts))
                    parts = None
        n_tiles = int(inputs["pixel_values"].shape[0])
        views = sum(len(c) for c in out) // (g * g)
        if views != n_tiles:
            raise ImageTokenMismatchError(
                f"the prompts' image markers hold {views} tile(s) but pixel_values holds "
                f"{n_tiles}; the images passed and the placeholders disagree"
            )
        return out
