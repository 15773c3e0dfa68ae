"""Tiny Llama 4: tiled ViT with pixel shuffle, MoE decoder with chunked and NoPE layers.

The decoder mixes what makes Llama 4 different: a dense MLP on layer 0 and mixture-of-experts
blocks (a router, routed experts and a shared expert) after it; RoPE layers with chunked
attention and an L2 norm on q and k; a last NoPE layer (no RoPE, global attention). An image is
`<|image_start|>`, its tiles row by row (`<|tile_x_separator|>` between tiles, then
`<|tile_y_separator|>` closing each row), `<|image|>` and the global view, `<|image_end|>`;
every tile's features sit on `<|patch|>` tokens. The processor pads on the left.

The stock image processor needs torchvision, so `Llama4TilingImageProcessorPil` below does its steps
with PIL and NumPy: choose the tile canvas, resize without distortion, pad right and bottom,
cut into tiles, add a resized global view when there is more than one tile.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from transformers import (
    AutoImageProcessor,
    BatchFeature,
    Llama4Config,
    Llama4ForConditionalGeneration,
)
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.llama4.processing_llama4 import Llama4Processor
from transformers.processing_utils import ImagesKwargs

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import train_tokenizer
from vlmscope.models.zoo.text import perturb_constant_params

TILE = 32
PATCH = 8
MAX_TILES = 4
SHUFFLE = 0.5  # pixel shuffle: (32 / 8)^2 = 16 patches -> 4 tokens per tile

SPECIALS = (
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)

LLAMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|header_start|>{{ message['role'] }}<|header_end|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def tile_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every (height, width) made of r x c tiles with r * c <= max_tiles, grouped by aspect
    ratio as Llama 4 enumerates them (the order only breaks exact ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for r in (d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(r / (n // r), []).append((r * tile, (n // r) * tile))
    return [c for group in by_ratio.values() for c in group]


def best_canvas(
    size: tuple[int, int], canvases: list[tuple[int, int]], to_max: bool
) -> tuple[int, int]:
    """The canvas an image of `size` is fitted to: the least upscaling that fits (the most
    with `to_max`), else the least downscaling; the smallest area among equal scales."""
    h, w = size
    scales = [min(ch / h, cw / w) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = (max(up) if to_max else min(up)) if up else max(scales)
    fits = [c for c, s in zip(canvases, scales, strict=True) if s == chosen]
    return min(fits, key=lambda c: c[0] * c[1])


def fit_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) of `size`'s aspect ratio inside `target` (floored)."""
    (h, w), (th, tw) = size, target
    if tw / w < th / h:
        return max(min(int(h * tw / w), th), 1), tw
    return th, max(min(int(w * th / h), tw), 1)


class Llama4ImagesKwargs(ImagesKwargs, total=False):
    max_patches: int
    resize_to_max_canvas: bool


class Llama4TilingImageProcessorPil(PilBackend):
    """Llama 4's image preprocessing on PIL/NumPy (the stock class needs torchvision).

    Differences from the stock class: resizing is PIL's bilinear filter (torchvision's
    antialiased bilinear rounds differently), and normalisation stays in float32 where the
    stock class rounds through bfloat16."""

    resample = PILImageResampling.BILINEAR
    image_mean: ClassVar[list[float]] = [0.5, 0.5, 0.5]
    image_std: ClassVar[list[float]] = [0.5, 0.5, 0.5]
    size: ClassVar[dict[str, int]] = {"height": 336, "width": 336}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_patches = 16
    resize_to_max_canvas = False
    valid_kwargs = Llama4ImagesKwargs
    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        return_tensors: Any,
        max_patches: int = 16,
        resize_to_max_canvas: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        tile = int(size.height)
        canvases = tile_canvases(max_patches, tile)
        tiles_out, ratios = [], []

        def finish(x: np.ndarray) -> np.ndarray:
            if do_rescale:
                x = self.rescale(x, rescale_factor)
            if do_normalize:
                x = self.normalize(x, image_mean, image_std)
            return x

        for image in images:  # channels first
            h, w = image.shape[-2:]
            th, tw = best_canvas((h, w), canvases, resize_to_max_canvas)
            if not resize_to_max_canvas:  # upscale at most to one tile's size
                th, tw = min(max(h, tile), th), min(max(w, tile), tw)
            nh, nw = fit_without_distortion((h, w), (th, tw))
            x = self.resize(image, SizeDict(height=nh, width=nw), resample)
            ch, cw = best_canvas((h, w), canvases, resize_to_max_canvas)
            x = np.pad(x, ((0, 0), (0, ch - nh), (0, cw - nw)))
            x = finish(x)
            rows, cols = ch // tile, cw // tile
            tiles = [x[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
                     for r in range(rows) for c in range(cols)]  # fmt: skip
            if rows * cols > 1:
                tiles.append(
                    finish(self.resize(image, SizeDict(height=tile, width=tile), resample))
                )
            tiles_out += tiles
            ratios.append([rows, cols])
        data = {"pixel_values": np.stack(tiles_out), "aspect_ratios": np.array(ratios)}
        return BatchFeature(data=data, tensor_type=return_tensors)


# Saved copies name this class; AutoImageProcessor finds it by name once this module is loaded.
AutoImageProcessor.register(
    "vlmscope.zoo:Llama4TilingImageProcessorPil",
    image_processor_classes={"pil": Llama4TilingImageProcessorPil},
    exist_ok=True,
)


@register("llama4", description="Llama 4 (tiled ViT + pixel shuffle + MoE, chunked/NoPE layers)")
def build_llama4() -> tuple[Any, Any]:
    """Llama 4: dense layer 0, MoE layers 1-2, chunks of 8 on RoPE layers, NoPE layer 2."""
    tokenizer = train_tokenizer(
        SPECIALS,
        bos="<|begin_of_text|>",
        eos="<|eot|>",
        pad="<|finetune_right_pad|>",
        unk=None,
        chat_template=LLAMA4_TEMPLATE,
    )
    processor = Llama4Processor(
        image_processor=Llama4TilingImageProcessorPil(
            size={"height": TILE, "width": TILE}, max_patches=MAX_TILES
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        pixel_shuffle_ratio=SHUFFLE,
        chat_template=LLAMA4_TEMPLATE,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=128,  # 4 x hidden: the pixel-shuffled width
        num_hidden_layers=2,
        num_attention_heads=2,
        vision_output_dim=64,
        projector_input_dim=64,
        projector_output_dim=64,
        image_size=TILE,
        patch_size=PATCH,
        pixel_shuffle_ratio=SHUFFLE,
        initializer_range=0.2,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,  # per expert
        intermediate_size_mlp=128,  # the dense layers
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        moe_layers=[1, 2],
        no_rope_layers=[1, 1, 0],  # 1 = RoPE; layer 2 is NoPE
        attention_chunk_size=8,
        use_qk_norm=True,
        max_position_embeddings=512,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Llama4Config(
        vision_config=vision,
        text_config=text,
        image_token_index=ids("<|patch|>"),
        boi_token_index=ids("<|image_start|>"),
        eoi_token_index=ids("<|image_end|>"),
        tie_word_embeddings=False,
    )
    return perturb_constant_params(Llama4ForConditionalGeneration(config)), processor
