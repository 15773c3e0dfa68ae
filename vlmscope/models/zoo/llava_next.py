"""Tiny LLaVA-NeXT (1.6): CLIP vision tower, anyres tiling with image_newline, Llama decoder.

Anyres is kept as in the real model, only scaled down: a 32px base view plus 32px tiles chosen from
small grid pinpoints, so one image gives 16 base tokens, then the unpadded high-res grid row by row
with an image_newline token closing each row.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import LLAVA_USER_ASSISTANT, train_tokenizer
from vlmscope.models.zoo.llava import tiny_llama_text_config
from vlmscope.models.zoo.text import perturb_constant_params

IMAGE_SIZE = 32
PATCH = 8
# (height, width) resolutions the image is resized and padded to before being cut into 32px tiles:
# 1x1, 1x2, 2x1 and 2x2 tiles, like the real [[336, 672], [672, 336], [672, 672], ...].
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


@register("llava_next", description="LLaVA-NeXT (CLIP + anyres tiles + newline + Llama)")
def build_llava_next() -> tuple[Any, Any]:
    """LLaVA-NeXT: image tokens depend on each image's size (anyres), unlike LLaVA-1.5."""
    tokenizer = train_tokenizer(
        ["<image>"], named_tokens={"image_token": "<image>"}, chat_template=LLAVA_USER_ASSISTANT
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    # CLIP has a CLS token that the "default" strategy drops: the processor counts it in
    # (num_additional_image_tokens=1) and then subtracts it again, as for the hub checkpoints.
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_USER_ASSISTANT,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=tiny_llama_text_config(
            len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=GRID_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    return perturb_constant_params(LlavaNextForConditionalGeneration(config)), processor
