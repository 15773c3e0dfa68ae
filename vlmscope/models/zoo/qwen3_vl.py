"""Tiny Qwen3-VL: ViT with learned + 2D RoPE positions and DeepStack mergers, Qwen3 decoder
(q/k RMSNorm) with interleaved M-RoPE."""

from __future__ import annotations

from typing import Any

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from vlmscope.models.zoo import register
from vlmscope.models.zoo.common import CHATML_VISION
from vlmscope.models.zoo.qwen2_vl import (
    INIT_RANGE,
    MERGE,
    PATCH,
    TEMPORAL_PATCH,
    TEXT_HEADS,
    TEXT_HIDDEN,
    QwenVideoProcessorMixin,
    qwen_image_processor,
    qwen_text_kwargs,
    qwen_tokenizer,
    register_processor,
    token_ids,
)

# Qwen3-VL uses [24, 20, 20] of 64 pairs; about the same proportions over 16 pairs.
MROPE_SECTION_QWEN3 = [6, 5, 5]


@register_processor
class Qwen3VLFramesProcessor(QwenVideoProcessorMixin, Qwen3VLProcessor):
    """Qwen3VLProcessor with videos through `qwen2_vl.QwenFramesAsVideo`."""


@register_processor
class Qwen3VLImageOnlyProcessor(Qwen3VLFramesProcessor):
    """The name zoo folders saved before videos (ZOO_VERSION 2) record: they load with it
    (an unregistered name would load as the bare tokenizer)."""


@register(
    "qwen3_vl", description="Qwen3-VL (ViT + DeepStack mergers + Qwen3 with interleaved M-RoPE)"
)
def build_qwen3_vl() -> tuple[Any, Any]:
    """DeepStack, interleaved M-RoPE and q/k norms: the parts adapters must handle."""
    tokenizer = qwen_tokenizer()
    processor = Qwen3VLFramesProcessor(
        # Qwen3-VL checkpoints normalise with mean = std = 0.5, not the CLIP statistics.
        image_processor=qwen_image_processor(image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer,
        chat_template=CHATML_VISION,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=TEXT_HIDDEN,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        num_position_embeddings=64,  # an 8x8 learned grid, bilinearly resampled to each image
        # Both blocks feed a DeepStack merger; their outputs are added to the hidden states after
        # decoder layers 0 and 1 (the real model taps blocks 8, 16, 24 for layers 0, 1, 2).
        deepstack_visual_indexes=[0, 1],
        initializer_range=INIT_RANGE,
    )
    text = dict(
        qwen_text_kwargs(len(tokenizer), tokenizer),
        head_dim=TEXT_HIDDEN // TEXT_HEADS,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": MROPE_SECTION_QWEN3,
            "mrope_interleaved": True,
        },
    )
    config = Qwen3VLConfig(vision_config=vision, text_config=text, **token_ids(tokenizer))
    return Qwen3VLForConditionalGeneration(config), processor
